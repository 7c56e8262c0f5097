"""Text in, text out: prompts, chat templates, sampling, stop strings, streaming.

    >>> model = Model.load()                         # the default SmolLM2-135M
    >>> model.generate("The capital of France is", max_new_tokens=8, temperature=0)
    >>> for piece in model.stream("Once upon a time", max_new_tokens=32, seed=1):
    ...     print(piece, end="", flush=True)
    >>> model.chat([{"role": "user", "content": "Name three colours."}], temperature=0)
    >>> model.score("The quick brown fox jumps over the lazy dog.").perplexity

When generation stops.  At whichever comes first:
  "eos"      the model produced one of tokenizer.eos_ids (its text is not returned);
  "stop"     the text produced contains one of the stop strings (the text from
             the stop string on is not returned);
  "length"   max_new_tokens tokens were produced;
  "context"  prompt + generated tokens filled the context (n_ctx).  This is not
             an error: the text so far is returned.  Only a prompt that leaves
             no room for a single new token (len(prompt) >= n_ctx) raises
             ContextOverflowError.
`model.last_stats["stopped"]` says which, with the timings of the call
("interrupted" if the caller closed a stream before it ended, or Ctrl-C
came in the middle of it).  The prompt goes to the engine in pieces of
PREFILL_CHUNK tokens, so a Ctrl-C during a long prefill is seen when the
current piece is done, not at the end of the prompt.

Threads.  Each generate / stream / chat / score call builds its own State (KV
cache) and Sampler; the Transformer is read-only, so several Python threads
may call one Model at once and each call gives what it gives alone.
`last_stats` is kept per thread: a thread sees the stats of its own last call.

Sessions.  `model.session()` is a KV cache that outlives one call: pass it as
session= and a call computes only the tokens after the longest prefix it
shares with the previous call (a chat's earlier turns).  The result is the same
as without it.  A session serves one conversation, one call at a time; a
second call on it while the first runs raises GenerationError.
"""
import logging
import math
import re
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from .errors import (ContextOverflowError, FastAttnError, ModelFileError,
                     OutOfMemoryError, TokenizerError, UnsupportedError)
from .model import MAX_CHUNK
from .sampling import Sampler

logger = logging.getLogger("fastattn")

# How many prompt tokens one call into the engine takes when a generation
# prefills its prompt.  A call into C does not look at signals, so Ctrl-C is
# seen between pieces: the wait is bounded by one piece, not the whole prompt.
# MAX_CHUNK is the piece the engine cuts a long call into by itself, so the
# pieces fall at the same places and the results are the same bits.
PREFILL_CHUNK = MAX_CHUNK

# How many prompt tokens one prefill call takes when all logits are wanted
# (score): the logits of a chunk are [chunk, n_vocab] float32, 100 MB at 512.
SCORE_CHUNK = 512


class GenerationError(FastAttnError, ValueError):
    """A request that cannot be carried out as asked: an empty prompt, a bad
    max_new_tokens or stop list, text too short to score."""


class ChatTemplateError(FastAttnError, ValueError):
    """The chat template failed to render the messages (a bad message list, a
    template that raised, or a template that does not parse)."""


@dataclass
class ScoreResult:
    """tokens [n]: the ids scored, the bos first if the model adds one.
    token_logprobs [n] float64: log p(tokens[i] | tokens[:i]); NaN at 0, which
    has no context.  perplexity: exp(-mean of the non-NaN log-probs)."""
    tokens: list
    token_logprobs: np.ndarray
    perplexity: float

    @property
    def nll(self) -> float:
        """Mean negative log-likelihood per scored token (nats)."""
        return float(-np.nanmean(self.token_logprobs))


# ------------------------------------------------------------------ stop strings

class StopMatcher:
    """Holds back text that might be the start of a stop string.

    push(piece) -> (text safe to emit, stopped).  Text is emitted only once no
    stop string can begin inside it, so a stop string split over several
    tokens is still caught and never shown.  At the end, flush() returns what
    was held back (it was not a stop string after all)."""

    def __init__(self, stop: Sequence[str]):
        self.stop = [s for s in stop if s]
        self.held = ""

    def push(self, piece: str):
        if not self.stop:
            return piece, False
        text = self.held + piece

        # a complete stop string: emit what precedes the earliest one
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.held = ""
            return text[:min(hits)], True

        # hold back the longest tail that begins some stop string
        hold = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), hold, -1):
                if s.startswith(text[len(text) - n:]):
                    hold = n
                    break
        self.held = text[len(text) - hold:] if hold else ""
        return text[:len(text) - hold], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


def _stop_list(stop) -> list:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop] if stop else []
    stop = list(stop)
    for s in stop:
        if not isinstance(s, str):
            raise GenerationError(f"stop must be a string or a list of strings, "
                                  f"got item {s!r}")
    return [s for s in stop if s]


# ------------------------------------------------------------------ chat templates

# A chat template comes from the model file: untrusted code.  jinja2's sandbox
# keeps it from Python's internals and bounds each range(), but not the work of
# nested loops nor the size of what it builds ('x' * 10**10).  These bound both.
# Shortcoming: the size bounds are per operation (the operators, filters and
# str methods below).  A template can still join many bounded pieces (a list of 10^6
# strings of 10^6 characters, say) into one string of terabytes; Python then
# fails the allocation with a MemoryError (reported as ChatTemplateError), or,
# for a few gigabytes, may get it, and the output check comes after.
TEMPLATE_MAX_CHARS = 1 << 24       # any string or list the template builds, and its output
TEMPLATE_MAX_SECONDS = 1.0         # a real chat template renders in milliseconds


def render_chat_template(template: str, messages, bos_token="", eos_token="",
                         add_generation_prompt=True, **extra) -> str:
    """Render a Hugging Face chat template (Jinja) in a sandbox.

    The sandbox (ImmutableSandboxedEnvironment) lets the template read the
    messages but not reach Python objects or change the lists it is given;
    sizes and render time are bounded (TEMPLATE_MAX_CHARS, TEMPLATE_MAX_SECONDS)
    and a template past them raises ChatTemplateError."""
    from jinja2 import TemplateError

    _check_messages(messages)
    env = _template_environment()
    try:
        compiled = env.from_string(template)
    except TemplateError as e:
        raise ModelFileError(f"chat template does not parse: {e}") from None
    variables = dict(messages=messages, bos_token=bos_token, eos_token=eos_token,
                     add_generation_prompt=add_generation_prompt, **extra)
    try:
        with _deadline(TEMPLATE_MAX_SECONDS):
            pieces, n_chars = [], 0
            for piece in compiled.generate(**variables):
                n_chars += len(piece)
                if n_chars > TEMPLATE_MAX_CHARS:
                    raise ChatTemplateError(f"chat template output passed "
                                            f"{TEMPLATE_MAX_CHARS} characters")
                pieces.append(piece)
            return "".join(pieces)
    except ChatTemplateError:
        raise
    except TemplateError as e:
        raise ChatTemplateError(f"chat template failed: {e}") from None
    except Exception as e:  # 1/0, 'abc'[::0], a bad format, ...: the template's bug
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None


def _template_environment():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        # the operators that can make a value much bigger than their operands
        intercepted_binops = frozenset(["*", "+", "**", "%"])

        def call_binop(self, context, operator, left, right):
            _check_binop(operator, left, right)
            return super().call_binop(context, operator, left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # every call the template makes
            _check_call(__obj, args, kwargs)
            return super().call(__context, __obj, *args, **kwargs)

        def wrap_str_format(self, value):
            # str.format reaches the template as jinja2's own wrapper, not as
            # the method: check its arguments before the wrapper runs
            wrapped = super().wrap_str_format(value)
            if wrapped is None:
                return None

            def bounded_format(*args, **kwargs):
                _check_call(value, args, kwargs)
                return wrapped(*args, **kwargs)
            return bounded_format

    def raise_exception(message):
        raise ChatTemplateError(f"chat template refused the messages: {message}")

    def strftime_now(fmt):
        return time.strftime(fmt)

    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True,
                         extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    # Jinja's own tojson escapes <, > and & for HTML; templates written for
    # transformers expect plain JSON
    env.filters["tojson"] = _tojson
    # filters whose output size is set by an argument rather than the input
    for name in ("center", "indent", "replace", "wordwrap", "format", "truncate"):
        env.filters[name] = _bounded_filter(env.filters[name], name)
    return env


def _size(value) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple)) else 0


def _check_binop(operator, left, right):
    """Refuse an operation whose result would pass TEMPLATE_MAX_CHARS."""
    too_big = False
    if operator == "*":
        for seq, n in ((left, right), (right, left)):
            if _size(seq) and isinstance(n, int):
                too_big |= _size(seq) * n > TEMPLATE_MAX_CHARS
    elif operator == "+":
        too_big = _size(left) + _size(right) > TEMPLATE_MAX_CHARS
    elif operator == "**":
        if isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
            too_big = right * max(abs(left).bit_length(), 1) > 4096    # bits
    elif operator == "%" and isinstance(left, str):
        args = right if isinstance(right, tuple) else (right,)
        stars = [a for a in args if isinstance(a, int)] if "*" in left else []
        too_big = max([_format_width(left)] + stars) > TEMPLATE_MAX_CHARS
    if too_big:
        raise ChatTemplateError(f"chat template: the result of {operator!r} would pass "
                                f"{TEMPLATE_MAX_CHARS} characters")


def _check_call(fn, args, kwargs):
    """Refuse a str (or bytes) method call whose result would pass
    TEMPLATE_MAX_CHARS: the methods whose output size an argument sets
    ('x'.center(10**9), '{:>999999999}'.format(1), ...)."""
    owner, name = getattr(fn, "__self__", None), getattr(fn, "__name__", "")
    if not isinstance(owner, (str, bytes)):
        return
    values = list(args) + list(kwargs.values())
    ints = [a for a in values if isinstance(a, int)]
    size = len(owner)
    if name in ("center", "ljust", "rjust", "zfill"):
        size = max([size] + ints)
    elif name == "expandtabs":
        tab = ints[0] if ints else 8
        size += owner.count("\t" if isinstance(owner, str) else b"\t") * max(tab, 0)
    elif name in ("format", "format_map"):
        # widths written in the string, or passed as arguments ('{:{}}')
        if name == "format_map" and values and isinstance(values[0], dict):
            ints += [v for v in values[0].values() if isinstance(v, int)]
        size += _brace_width(owner) + max(ints, default=0)
        size += sum(_size(a) for a in values)
    elif name == "replace" and len(values) >= 2:
        old, new = values[0], values[1]
        if isinstance(old, type(owner)) and isinstance(new, type(owner)):
            count = owner.count(old) if old else len(owner) + 1
            size += count * max(0, len(new) - len(old))
    elif name == "join" and values and isinstance(values[0], (list, tuple)):
        items = values[0]
        size = len(owner) * max(len(items) - 1, 0) + sum(_size(x) for x in items)
    if size > TEMPLATE_MAX_CHARS:
        raise ChatTemplateError(f"chat template: {type(owner).__name__}.{name} would make "
                                f"more than {TEMPLATE_MAX_CHARS} characters")


def _brace_width(fmt) -> int:
    """The largest number written in the format specs of a str.format string."""
    import re
    if not isinstance(fmt, str):
        return 0
    specs = re.findall(r"\{[^{}]*:([^{}]*)\}", fmt)
    return max((int(n) for spec in specs for n in re.findall(r"\d+", spec)), default=0)


def _format_width(fmt: str) -> int:
    """The largest width or precision written in a %-format string."""
    import re
    return max((int(n) for n in re.findall(r"%[-+ #0]*\.?(\d+)", fmt)), default=0)


def _bounded_filter(fn, name):
    """fn, refusing arguments that would make its output pass TEMPLATE_MAX_CHARS."""
    takes_context = hasattr(fn, "jinja_pass_arg")     # @pass_environment and kin

    def bounded(*args, **kwargs):
        value, rest = (args[1], args[2:]) if takes_context else (args[0], args[1:])
        extra = list(rest) + list(kwargs.values())
        size = len(value) if isinstance(value, str) else len(str(value))
        size += max((a for a in extra if isinstance(a, int)), default=0)
        size += sum(len(a) for a in extra if isinstance(a, str))
        if name == "replace" and len(rest) >= 2 and isinstance(value, str):
            old, new = str(rest[0]), str(rest[1])
            count = value.count(old) if old else len(value) + 1
            size += count * max(0, len(new) - len(old))
        if name == "format" and isinstance(value, str):
            size += _format_width(value)
        if size > TEMPLATE_MAX_CHARS:
            raise ChatTemplateError(f"chat template: filter {name!r} would make more "
                                    f"than {TEMPLATE_MAX_CHARS} characters")
        return fn(*args, **kwargs)

    bounded.__name__ = name
    if takes_context:
        bounded.jinja_pass_arg = fn.jinja_pass_arg
    return bounded


class _deadline:
    """Raise ChatTemplateError in this thread once `seconds` have passed.

    A trace function sees each line the compiled template runs, so a template
    stuck in nested loops is stopped; a tracer already set (a debugger,
    coverage) is put back afterwards."""

    def __init__(self, seconds):
        self.seconds = seconds

    def __enter__(self):
        import sys
        end = time.monotonic() + self.seconds
        count = [0]

        def tracer(frame, event, arg):
            count[0] += 1
            if count[0] & 1023 == 0 and time.monotonic() > end:
                raise ChatTemplateError(f"chat template ran for more than "
                                        f"{self.seconds:g} s")
            return tracer

        self.previous = sys.gettrace()
        sys.settrace(tracer)
        return self

    def __exit__(self, *exc):
        import sys
        sys.settrace(self.previous)
        return False


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    import json
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                      separators=separators, sort_keys=sort_keys)


def _check_messages(messages):
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatTemplateError(f"messages must be a non-empty list of {{'role': ..., "
                                f"'content': ...}} dicts, got {messages!r:.80}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                or not isinstance(m.get("content"), str):
            raise ChatTemplateError(f"messages[{i}] must be a dict with string 'role' and "
                                    f"'content', got {m!r:.80}")


# ------------------------------------------------------------------ the model

class Model:
    """A loaded model ready to generate: transformer, tokenizer, chat template.

    n_ctx is the longest sequence (prompt + generated) a call may reach; it
    defaults to the model's trained context.  A call's KV cache is sized to
    what the call can use, min(n_ctx, prompt + max_new_tokens), not n_ctx."""

    def __init__(self, transformer, tokenizer, config, chat_template=None, n_ctx=None,
                 source="", load_s=0.0, keepalive=None, metadata=None, weight_types=None):
        self.transformer = transformer
        self.tokenizer = tokenizer
        self.config = config
        self.chat_template = chat_template
        self.source = source
        self.load_s = load_s
        self.metadata = metadata or {}
        self._keepalive = keepalive          # the mapped file the weights view
        self.weight_types = weight_types or {}   # {"Q4_1": 210, ...}
        if n_ctx is None:
            n_ctx = config.n_ctx
        if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 2:
            raise GenerationError(f"n_ctx must be an integer >= 2, got {n_ctx!r}")
        if n_ctx > config.n_ctx:
            raise ContextOverflowError(f"n_ctx = {n_ctx} is longer than the {config.n_ctx} "
                                       f"tokens {source or 'the model'} was trained for")
        self.n_ctx = n_ctx
        self._local = threading.local()

    @classmethod
    def load(cls, model=None, n_threads=None, n_ctx=None, verbose=False,
             activations="f32", kv_cache="f32") -> "Model":
        """model: a GGUF file, a Hugging Face folder, or None for the default
        model (downloaded on first use).  activations: "f32" (exact) or "q8"
        (faster, not exact; see Transformer).  kv_cache: "f32" (exact) or
        "f16" (half the cache's memory, keys and values rounded to half
        precision: not exact; see Transformer)."""
        from .loaders import load_model_files
        from .model import Transformer, check_kv_cache
        from .tokenizer import Tokenizer

        check_kv_cache(kv_cache)  # before the file is read
        start = time.perf_counter()
        if model is None:
            from .download import default_model_path
            model = default_model_path()
        loaded = load_model_files(model)
        try:
            transformer = Transformer(loaded.config, loaded.weights, n_threads=n_threads,
                                      activations=activations, kv_cache=kv_cache)
            tokenizer = Tokenizer.from_loaded(loaded.tokenizer)
        except MemoryError as e:  # OutOfMemoryError included: name the model
            # out here the half-built model's memory is free again: say what it needs
            mapped = sum(w.data.nbytes for w in loaded.weights.values())
            detail = f" ({e})" if isinstance(e, OutOfMemoryError) else ""
            raise OutOfMemoryError(
                f"{model}: out of memory while building the model{detail}: its weights "
                f"take {mapped} bytes ({mapped / 2**20:.1f} MiB) mapped from the file, "
                f"and the engine keeps a repacked copy of its matrices (up to as much "
                f"again)"
            ) from None
        load_s = time.perf_counter() - start

        from .weights import type_name
        weight_types = {}
        for w in loaded.weights.values():
            weight_types[type_name(w.qtype)] = weight_types.get(type_name(w.qtype), 0) + 1
        self = cls(transformer, tokenizer, loaded.config, loaded.chat_template,
                   n_ctx=n_ctx, source=str(model), load_s=load_s,
                   keepalive=loaded.keepalive, metadata=loaded.metadata,
                   weight_types=weight_types)
        level = logging.INFO if verbose else logging.DEBUG
        for key, value in self.describe():
            logger.log(level, "%-12s = %s", key, value)
        logger.log(level, "loaded %s in %.1f ms", model, load_s * 1e3)
        return self

    def describe(self) -> list:
        """(key, value) pairs for the load banner: dims, weight types, SIMD, threads."""
        pairs = list(self.config.describe())
        if self.n_ctx != self.config.n_ctx:
            pairs.append(("n_ctx_used", self.n_ctx))
        if self.weight_types:
            pairs.append(("weights", ", ".join(
                f"{name} x {count}" for name, count in
                sorted(self.weight_types.items(), key=lambda item: -item[1]))))
        simd = _simd_name()
        if simd:
            pairs.append(("simd", simd))
        pairs.append(("n_threads", getattr(self.transformer, "n_threads", None)))
        pairs.append(("activations", getattr(self.transformer, "activations", "f32")))
        pairs.append(("kv_cache", getattr(self.transformer, "kv_cache", "f32")))
        return pairs

    # ---------------------------------------------------------- stats

    @property
    def last_stats(self) -> dict:
        """Timings and the stop reason of this thread's last call:
        load_s, prompt_tokens (the prompt's length), prompt_eval_tokens (those
        this call computed: not the ones a session had cached, nor those an
        interrupted prefill did not reach), prompt_s, prompt_tok_s (of the
        computed ones), gen_tokens, gen_s, gen_tok_s, stopped ("eos", "stop",
        "length", "context", "interrupted")."""
        return getattr(self._local, "stats", {})

    def _set_stats(self, stats):
        self._local.stats = stats

    # ---------------------------------------------------------- prompts

    def encode(self, prompt, allowed_special=frozenset()) -> list:
        """A prompt -> ids.  Text is encoded (specials in it as plain text unless
        allowed) with the bos in front if the model adds one; a list of ids is
        checked and used as given."""
        tok = self.tokenizer
        if isinstance(prompt, str):
            ids = list(tok.encode(prompt, allowed_special=allowed_special))
            if tok.add_bos and tok.bos_id is not None and (not ids or ids[0] != tok.bos_id):
                ids = [tok.bos_id] + ids
            return ids
        if isinstance(prompt, np.ndarray):
            prompt = prompt.tolist()
        if not isinstance(prompt, (list, tuple)):
            raise TypeError(f"prompt must be a string or a list of token ids, "
                            f"got {type(prompt).__name__}")
        ids = []
        for i, t in enumerate(prompt):
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
                raise TypeError(f"prompt[{i}] must be a token id (int), got {t!r}")
            if not 0 <= t < tok.n_vocab:
                raise TokenizerError(f"prompt[{i}] = {t} is outside the vocabulary "
                                     f"[0, {tok.n_vocab})")
            ids.append(int(t))
        return ids

    def apply_chat_template(self, messages, add_generation_prompt=True) -> str:
        if not self.chat_template:
            raise UnsupportedError(f"{self.source or 'the model'} has no chat template "
                                   f"(tokenizer.chat_template); use generate() instead")
        tok = self.tokenizer
        bos = tok.decode([tok.bos_id]) if tok.bos_id is not None else ""
        eos = tok.decode([tok.eos_id]) if tok.eos_id is not None else ""
        return render_chat_template(self.chat_template, messages, bos_token=bos,
                                    eos_token=eos,
                                    add_generation_prompt=add_generation_prompt)

    def _chat_ids(self, messages) -> list:
        """The rendered chat as ids.  The template writes the specials (role
        markers, bos if the model wants it) as text, and they are encoded as the
        special tokens they name; the messages' contents are encoded as plain
        text, so that a user who types "<|im_start|>system" cannot open a turn
        of their own (generate() treats specials in a prompt the same way)."""
        text = self.apply_chat_template(messages)
        marked, spans = self._content_spans(messages, text)
        if spans is not None:
            return list(self.tokenizer.encode_chat(text, spans))
        # The contents could not be found in the text (a template that
        # rewrites them).  Recognising every special is safe only if the
        # contents added none: the text must hold the specials the template
        # wrote with every content replaced by a marker, and no more.
        found = self.tokenizer.special_texts_in(text)
        if marked is None or found != self.tokenizer.special_texts_in(marked):
            raise ChatTemplateError(
                "the chat template rewrites message contents, and the rendered chat "
                "holds special tokens the template alone does not write: a message "
                "holds special-token text, which fastattn cannot then keep plain; "
                "remove it from the message")
        return list(self.tokenizer.encode(text, allowed_special="all"))

    def _content_spans(self, messages, text):
        """(the chat rendered with a marker for each content, [(start, end)]
        of each content in text), text being the chat rendered as it is.  The
        markers give the places; a content may appear as it is or stripped of
        surrounding white space (a template's `| trim`).  The spans are None
        when no such reading gives text exactly."""
        nonce = secrets.token_hex(8)
        marked = [dict(m, content=f"\ue000{nonce}:{i}\ue001")
                  for i, m in enumerate(messages)]
        try:
            rendered = self.apply_chat_template(marked)
        except FastAttnError:
            return None, None
        spans, at, pos = [], 0, 0
        for m in re.finditer("\ue000" + nonce + r":(\d+)\ue001", rendered):
            between = rendered[pos:m.start()]
            if not text.startswith(between, at):
                return rendered, None
            at += len(between)
            content = messages[int(m.group(1))]["content"]
            for form in (content, content.strip()):
                if text.startswith(form, at):
                    break
            else:
                return rendered, None
            spans.append((at, at + len(form)))
            at += len(form)
            pos = m.end()
        if text[at:] != rendered[pos:]:
            return rendered, None
        return rendered, spans

    # ---------------------------------------------------------- generation

    def generate(self, prompt: Union[str, list], max_new_tokens=128, temperature=0.8,
                 top_k=40, top_p=0.95, min_p=0.0, repeat_penalty=1.0, seed=None,
                 stop=None, session=None) -> str:
        """The continuation of prompt as one string (see the module docstring
        for when it stops).  session: a Session whose cached prefix to reuse."""
        return "".join(self.stream(prompt, max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_k=top_k, top_p=top_p,
                                   min_p=min_p, repeat_penalty=repeat_penalty,
                                   seed=seed, stop=stop, session=session))

    def stream(self, prompt: Union[str, list], max_new_tokens=128, temperature=0.8,
               top_k=40, top_p=0.95, min_p=0.0, repeat_penalty=1.0, seed=None,
               stop=None, session=None) -> Iterator[str]:
        """Like generate, yielding the text in pieces as they complete.

        The arguments are checked (and the prompt encoded) before the first
        piece is asked for, so errors raise here, not at the first next()."""
        ids = self.encode(prompt)
        return self._stream_ids(ids, max_new_tokens, stop,
                                Sampler(temperature=temperature, top_k=top_k, top_p=top_p,
                                        min_p=min_p, repeat_penalty=repeat_penalty,
                                        seed=seed), session=session)

    def chat(self, messages, max_new_tokens=256, temperature=0.8, top_k=40, top_p=0.95,
             min_p=0.0, repeat_penalty=1.0, seed=None, stop=None, stream=False,
             session=None):
        """The assistant's reply to messages ([{"role": ..., "content": ...}]),
        rendered with the model's chat template; an iterator of pieces if
        stream is true.  With a session, the turns already in its cache are
        not computed again."""
        ids = self._chat_ids(messages)
        pieces = self._stream_ids(ids, max_new_tokens, stop,
                                  Sampler(temperature=temperature, top_k=top_k,
                                          top_p=top_p, min_p=min_p,
                                          repeat_penalty=repeat_penalty, seed=seed),
                                  session=session)
        return pieces if stream else "".join(pieces)

    def generate_ids(self, prompt, max_new_tokens=128, session=None, **sampling) -> list:
        """The generated token ids (eos not included), without stop strings."""
        ids = self.encode(prompt)
        out = []
        for _ in self._stream_ids(ids, max_new_tokens, None, Sampler(**sampling),
                                  out_ids=out, session=session):
            pass
        return out

    def session(self) -> "Session":
        """A KV cache that lives across calls, for one conversation at a time."""
        return Session(self)

    def _stream_ids(self, ids, max_new_tokens, stop, sampler, out_ids=None,
                    session=None):
        """Check everything, then return the generator that does the work."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
                or max_new_tokens < 0:
            raise GenerationError(f"max_new_tokens must be an integer >= 0, "
                                  f"got {max_new_tokens!r}")
        stop = _stop_list(stop)
        if not ids:
            raise GenerationError("the prompt gives no tokens (it is empty, or holds only "
                                  "bytes the vocabulary has no token for) and the model "
                                  "adds no bos token: there is nothing to continue")
        if len(ids) >= self.n_ctx:
            raise ContextOverflowError(f"the prompt is {len(ids)} tokens; the context "
                                       f"(n_ctx) is {self.n_ctx}, which leaves no room "
                                       f"for a new token")
        if session is not None and session.model is not self:
            raise GenerationError("the session belongs to another Model")
        return self._run(ids, max_new_tokens, stop, sampler, out_ids, session)

    def _run(self, ids, max_new_tokens, stop, sampler, out_ids, session):
        """_loop, holding the session (if any) for as long as the stream runs:
        a second call on it meanwhile, from this thread (a stream not yet
        finished) or another, would rewind the cache under the first."""
        if session is not None and not session._in_use.acquire(blocking=False):
            raise GenerationError("the session is in use by another call (a stream not "
                                  "finished or closed yet, or another thread); a session "
                                  "serves one call at a time")
        try:
            yield from self._loop(ids, max_new_tokens, stop, sampler, out_ids, session)
        finally:
            if session is not None:
                session._in_use.release()

    def _loop(self, ids, max_new_tokens, stop, sampler, out_ids, session):
        """The generation loop: prefill the prompt, then sample / decode."""
        tok = self.tokenizer
        eos_ids = tok.eos_ids
        n_prompt = len(ids)
        stats = {"load_s": self.load_s, "prompt_tokens": n_prompt, "prompt_s": 0.0,
                 "prompt_eval_tokens": 0, "cached_tokens": 0, "gen_tokens": 0,
                 "gen_s": 0.0, "stopped": "length"}
        self._set_stats(stats)
        if max_new_tokens == 0:
            _finish(stats)
            return

        if session is None:
            # The cache holds what this call can reach: the last sampled token is
            # never fed back, so prompt + max_new_tokens - 1 positions are enough.
            state = self.transformer.new_state(
                n_ctx=min(self.n_ctx, n_prompt + max_new_tokens))
            cached = 0
        else:
            # keep the longest prefix the cache already holds (at least one prompt
            # token is computed again: its logits choose the first new token)
            state = session.state
            cached = min(_common_prefix(session.ids, ids), n_prompt - 1)
            state.rewind(cached)
            session.ids = list(ids)          # what the cache will hold, trimmed below
        stats["cached_tokens"] = cached
        decoder = tok.stream_decoder()
        matcher = StopMatcher(stop)
        history = list(ids)
        n_gen = 0
        clock = time.perf_counter
        prefill_start = None
        try:
            # in pieces, so that a KeyboardInterrupt (Ctrl-C) is raised between
            # them rather than after the whole prompt
            start = prefill_start = clock()
            for begin in range(cached, n_prompt, PREFILL_CHUNK):
                logits = self.transformer.prefill(state, ids[begin:begin + PREFILL_CHUNK])
                stats["prompt_s"] = clock() - start
            stats["prompt_eval_tokens"] = n_prompt - cached
            prefill_start = None

            # gen_s counts the time spent here, not the caller's time between pieces
            while True:
                start = clock()
                token = sampler.sample(logits, history)
                if token in eos_ids:
                    stats["stopped"] = "eos"
                    break
                n_gen += 1
                stats["gen_tokens"] = n_gen
                history.append(token)
                if out_ids is not None:
                    out_ids.append(token)
                text, hit = matcher.push(decoder.feed(token))
                stats["gen_s"] += clock() - start
                if text:
                    yield text
                if hit:
                    stats["stopped"] = "stop"
                    break
                if n_gen >= max_new_tokens:
                    stats["stopped"] = "length"
                    break
                if n_prompt + n_gen >= self.n_ctx:
                    stats["stopped"] = "context"
                    break
                start = clock()
                logits = self.transformer.decode(state, token)
                stats["gen_s"] += clock() - start
                if session is not None:
                    session.ids.append(token)

            # what the decoder and the stop matcher still hold
            if stats["stopped"] != "stop":
                text, hit = matcher.push(decoder.flush())
                if hit:
                    stats["stopped"] = "stop"
                else:
                    text += matcher.flush()
                if text:
                    yield text
        except (GeneratorExit, KeyboardInterrupt):
            stats["stopped"] = "interrupted"      # the caller stopped reading, or Ctrl-C
            if prefill_start is not None:
                # a Ctrl-C in the prefill: count what the cache holds (the last
                # piece may have finished as the interrupt came), not the prompt
                stats["prompt_eval_tokens"] = max(0, min(state.n_past, n_prompt) - cached)
                stats["prompt_s"] = clock() - prefill_start
            raise
        finally:
            if session is not None:
                # an interrupted prefill may leave the cache shorter than planned
                del session.ids[state.n_past:]
            _finish(stats)

    # ---------------------------------------------------------- scoring

    def score(self, text: Union[str, list]) -> ScoreResult:
        """Log-probability of each token of text given the tokens before it.

        The first token has no context and gets NaN; with a model that adds a
        bos, the bos is that first token and every token of the text is scored.
        Text longer than n_ctx raises ContextOverflowError (no sliding window)."""
        ids = self.encode(text)
        if len(ids) < 2:
            raise GenerationError(f"score needs at least 2 tokens (context + one scored), "
                                  f"the text gives {len(ids)}")
        # Shortcoming: no sliding window.  A text longer than the context is
        # refused rather than scored in pieces, so `fastattn score` cannot
        # measure the perplexity of a long document in one call.
        if len(ids) > self.n_ctx:
            raise ContextOverflowError(f"the text is {len(ids)} tokens, longer than the "
                                       f"context (n_ctx) of {self.n_ctx}; score shorter "
                                       f"pieces")
        start = time.perf_counter()
        state = self.transformer.new_state(n_ctx=len(ids))
        logprobs = np.full(len(ids), np.nan)
        target = np.asarray(ids, dtype=np.int64)
        # the last token's logits predict nothing we have, so it is not fed
        for begin in range(0, len(ids) - 1, SCORE_CHUNK):
            end = min(begin + SCORE_CHUNK, len(ids) - 1)
            logits = self.transformer.prefill(state, ids[begin:end], all_logits=True)
            logits = np.asarray(logits, dtype=np.float64).reshape(end - begin, -1)
            _check_finite(logits, begin, getattr(self.transformer, "kv_cache", "f32"))
            logprobs[begin + 1:end + 1] = _log_softmax_at(logits, target[begin + 1:end + 1])
        elapsed = time.perf_counter() - start
        nll = float(-np.nanmean(logprobs))
        # a model this sure of the wrong tokens: exp would overflow a float
        perplexity = math.exp(nll) if nll < math.log(np.finfo(np.float64).max) else math.inf
        self._set_stats(_finish({"load_s": self.load_s, "prompt_tokens": len(ids),
                                 "prompt_eval_tokens": len(ids) - 1, "prompt_s": elapsed,
                                 "gen_tokens": 0, "gen_s": 0.0, "stopped": None}))
        return ScoreResult(ids, logprobs, perplexity)


def _check_finite(logits, first_pos: int, kv_cache: str) -> None:
    """GenerationError if a row of logits (positions first_pos ...) holds a NaN
    or an infinity: a score would otherwise come out NaN with no word why."""
    bad = ~np.isfinite(logits)
    if not bad.any():
        return
    row = int(np.flatnonzero(bad.any(axis=1))[0])
    why = ("a key or value beyond 65504 overflows the float16 KV cache "
           "(kv_cache='f16'), or the model overflows float32"
           if kv_cache == "f16" else "the model overflows float32")
    raise GenerationError(f"the model's logits at position {first_pos + row} contain "
                          f"{int(bad[row].sum())} NaN/inf values: {why}")


def _common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Session:
    """A KV cache kept between calls: a chat that renders its whole history
    each turn computes only what is new since the last call (the longest
    common prefix of the token ids is reused; generation is otherwise the
    same, token for token).  One conversation, one call at a time: a call
    while another (or a stream not yet finished) runs on it raises
    GenerationError.

        >>> session = model.session()
        >>> model.chat(messages, session=session)          # computes it all
        >>> model.chat(messages + [reply, question], session=session)  # the new turn

    The cache has room for model.n_ctx positions, allocated once."""

    def __init__(self, model: "Model"):
        self.model = model
        self.state = model.transformer.new_state(n_ctx=model.n_ctx)
        self.ids = []                      # the ids whose keys and values are cached
        self._in_use = threading.Lock()    # held by the call running on it

    def reset(self):
        if not self._in_use.acquire(blocking=False):
            raise GenerationError("the session is in use by a call; reset it after "
                                  "that call ends")
        try:
            self.state.reset()
            self.ids = []
        finally:
            self._in_use.release()


def _log_softmax_at(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """logits [n_seq, n_vocab], ids [n_seq] -> log softmax(logits[i])[ids[i]] [n_seq]."""
    top = logits.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
    return logits[np.arange(len(ids)), ids] - log_z


def _finish(stats: dict) -> dict:
    # the rate of the tokens this call computed: not those a session had
    # cached, nor those a Ctrl-C kept it from reaching
    stats["prompt_tok_s"] = (stats["prompt_eval_tokens"] / stats["prompt_s"]
                             if stats["prompt_s"] > 0 else 0.0)
    stats["gen_tok_s"] = stats["gen_tokens"] / stats["gen_s"] if stats["gen_s"] > 0 else 0.0
    return stats


def _simd_name() -> Optional[str]:
    try:
        from . import _kernels
    except ImportError:
        return None
    for name in ("simd_name", "simd_level_name"):
        fn = getattr(_kernels, name, None)
        if callable(fn):
            try:
                return str(fn())
            except Exception:        # a missing level is not worth failing a load
                return None
    return None
