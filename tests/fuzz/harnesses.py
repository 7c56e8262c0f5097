"""Fuzz harnesses: one function per target, each taking the fuzzer's bytes.

    gguf               the bytes are a GGUF file (seeds: small valid models);
                       load it, and if it loads, build the tokenizer, the
                       transformer, a full-size state, run two tokens, and
                       generate and chat through generation.Model
    gguf_fields        the bytes steer changes to a valid model's fields (a
                       metadata value, a tensor's dims, type or offset, the
                       vocabulary, the merges), then as `gguf`
    tokenizer          encode arbitrary text with every kind of allowed_special,
                       decode arbitrary id lists, run the stream decoder
    tokenizer_fields   Tokenizer.from_gguf on a changed vocabulary, merges,
                       token types and special ids, then round trips
    sampling           Sampler with arbitrary parameters (NaN, inf, negative,
                       huge, wrong types) on logits with NaN / inf
    safetensors        the bytes are a safetensors file (seeds: small valid
                       files); open it and read every tensor
    safetensors_fields the bytes steer changes to a valid header's JSON

A harness returns a short outcome label ("loaded", "refused:ModelFileError")
for the run's tally.  What is allowed to go wrong is a FastAttnError (and, in
`sampling`, a TypeError when the harness itself passed an argument of the
wrong type).  Anything else escapes the harness and is a finding, as is a
broken invariant (Finding): a round trip that does not give the text back, a
sampled token outside the top-k, logits of the wrong shape.
"""
import atexit
import copy
import json
import os
import shutil
import struct
import sys
import tempfile
from functools import lru_cache

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
ROOT = os.path.dirname(TESTS)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)
try:                                   # the installed (or PYTHONPATH) fastattn first,
    import fastattn  # noqa: F401     # the checkout's own only when there is none
except ImportError:
    sys.path.insert(0, ROOT)

from fastattn.errors import FastAttnError  # noqa: E402

from provider import INTERESTING_FLOATS, INTERESTING_INTS, Provider  # noqa: E402


class Finding(AssertionError):
    """An invariant the fuzzed code broke (not an exception it raised)."""


def check(condition, message):
    if not condition:
        raise Finding(message)


def refused(e):
    if os.environ.get("FUZZ_VERBOSE"):
        print(f"refused: {type(e).__name__}: {e}", file=sys.stderr)
    return f"refused:{type(e).__name__}"


def round_trips(tok):
    """Whether decode(encode(text)) must be the text: every byte has a one-byte
    token (a byte without one is left out, as Hugging Face does), and no merge
    makes a special token (whose text, not bytes, decode gives back; Hugging
    Face does the same)."""
    specials = list(tok.special_tokens.values())
    return bool((tok._byte_ids >= 0).all()) and not np.isin(
        tok._merge_ids[:, 2], specials).any()


# ---------------------------------------------------------------- scratch files

_SCRATCH = None


def scratch_path(suffix):
    """A per-process file on a RAM disk when there is one."""
    global _SCRATCH
    if _SCRATCH is None:
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        _SCRATCH = tempfile.mkdtemp(prefix="fastattn-fuzz-", dir=base)
        atexit.register(shutil.rmtree, _SCRATCH, True)
    return os.path.join(_SCRATCH, "input" + suffix)


def write_scratch(data, suffix):
    path = scratch_path(suffix)
    with open(path, "wb") as f:
        f.write(data)
    return path


# ------------------------------------------------------------------- GGUF seeds

def _gpt2_gguf_bytes():
    """A one-layer GPT-2 GGUF written with gguf.GGUFWriter (test_gguf's helper)."""
    import test_gguf
    from fastattn.weights import F16, F32, Q4_1, Q8_0
    hparams = dict(test_gguf.GPT2, n_layer=1)
    path = scratch_path(".seed.gguf")
    tensors = test_gguf.tensors_for("gpt2", hparams, len(test_gguf.TOKENS),
                                    [F32, Q8_0, Q4_1, F16])
    test_gguf.write_gguf(path, "gpt2", hparams, tensors, test_gguf.TOKENS)
    with open(path, "rb") as f:
        return f.read()


def _bpe_llama_gguf_bytes():
    """A small llama with a real byte-level BPE vocabulary and chat template."""
    import tinyllama_gguf
    path = scratch_path(".seed.gguf")
    tinyllama_gguf.write_tiny_llama(path, n_embd=32, n_layer=1, n_head=2, n_kv_head=1,
                                    n_ff=32, n_ctx=32, n_merges=40)
    with open(path, "rb") as f:
        return f.read()


@lru_cache(maxsize=None)
def gguf_seeds():
    """[(file bytes, header length)]: the bytes before the data section, where
    the mutations that matter land."""
    import hostile
    from fastattn.loaders.gguf import scan_layout
    files = [hostile.tiny_llama().build()[0], hostile.tiny_llama(tied=False).build()[0],
             _gpt2_gguf_bytes(), _bpe_llama_gguf_bytes()]
    return [(data, scan_layout(data, "seed").data_start) for data in files]


# ------------------------------------------------------------------- harness: gguf

def gguf(data: bytes) -> str:
    path = write_scratch(data, ".gguf")
    return load_and_run(path)


def load_and_run(path) -> str:
    """Load a GGUF file and, if it loads, use every part of it."""
    from fastattn.generation import Model
    from fastattn.loaders import load_model_files
    from fastattn.model import Transformer
    from fastattn.tokenizer import Tokenizer

    try:
        loaded = load_model_files(path)
    except FastAttnError as e:
        return refused(e)
    config = loaded.config

    try:
        tok = Tokenizer.from_loaded(loaded.tokenizer)
    except FastAttnError:
        tok = None
    if tok is not None and round_trips(tok):
        text = "hello <|im_start|> world 42"
        check(tok.decode(tok.encode(text)) == text, f"{path}: round trip of {text!r}")

    try:
        model = Transformer(config, loaded.weights, n_threads=1)
    except FastAttnError as e:
        return "loaded, " + refused(e)

    # a state of the file's full n_ctx: a hostile n_ctx must fail as a fastattn
    # error (too much memory), not MemoryError
    try:
        model.new_state()
    except FastAttnError:
        pass
    state = model.new_state(min(4, config.n_ctx))
    ids = [0, config.n_vocab - 1][:state.n_ctx]
    logits = model.prefill(state, ids)
    check(logits.shape == (config.n_vocab,), f"logits shape {logits.shape}")
    if state.n_past < state.n_ctx:
        logits = model.decode(state, config.n_vocab // 2)
        check(logits.shape == (config.n_vocab,), f"logits shape {logits.shape}")

    if tok is None:
        return "ran"
    try:
        m = Model(model, tok, config, loaded.chat_template, keepalive=loaded.keepalive)
        m.generate("hi", max_new_tokens=3, temperature=0)
        m.generate("hi", max_new_tokens=3, temperature=1.0, seed=1)
        if loaded.chat_template:
            m.chat([{"role": "user", "content": "hi"}], max_new_tokens=2, temperature=0)
    except FastAttnError as e:
        return "ran, " + refused(e)
    return "generated"


# ------------------------------------------------------------ harness: gguf_fields

# Keys a change may target besides those the seed has.
GGUF_KEYS = [
    "general.architecture", "general.alignment", "general.name", "general.file_type",
    "llama.context_length", "llama.embedding_length", "llama.block_count",
    "llama.feed_forward_length", "llama.attention.head_count",
    "llama.attention.head_count_kv", "llama.rope.freq_base",
    "llama.attention.layer_norm_rms_epsilon", "llama.rope.dimension_count",
    "llama.vocab_size", "llama.attention.key_length", "llama.rope.scaling.type",
    "llama.rope.scale_linear", "llama.expert_count", "tokenizer.ggml.model",
    "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges", "tokenizer.ggml.scores", "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
    "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
    "tokenizer.chat_template",
]

TEMPLATES = [
    "{{ messages }}", "{% for m in messages %}{{ m.content }}{% endfor %}",
    "{{ raise_exception('no') }}", "{% if %}", "{{ messages[0].__class__ }}",
    "{{ ''.__class__.__mro__ }}", "{{ messages|length * 3 }}", "{{ x.y.z }}",
    "{% for i in range(3) %}{{ i }}{% endfor %}", "{{ strftime_now('%Y') }}",
    "{{ bos_token }}{{ eos_token }}<|im_start|>",
    "{% set x = namespace(a=1) %}{{ x.a }}",
]


def _float32(value):
    """value rounded to float32 (out of range: an infinity), so struct packs it."""
    with np.errstate(over="ignore"):
        return float(np.float32(value))


def _random_value(p, key):
    """(vtype, value, item type) for a metadata value of any GGUF type."""
    import hostile as h
    vtype = p.choice([h.U8, h.I8, h.U16, h.I16, h.U32, h.I32, h.F32V, h.BOOL, h.STR,
                      h.ARR, h.U64, h.I64, h.F64V])
    if vtype == h.STR:
        if key == "tokenizer.chat_template":
            return vtype, p.choice(TEMPLATES), None
        return vtype, p.choice(["llama", "gpt2", "smollm", "default", "", "mamba",
                                "none", "yarn", "\u00e9", "x" * p.int(0, 300)]), None
    if vtype == h.ARR:
        item = p.choice([h.U8, h.I32, h.U32, h.F32V, h.STR, h.I64])
        n = p.int(0, 70)
        if item == h.STR:
            return vtype, [p.choice(["a", "t1", "t 1", "", "<s>", "\u0120a"])
                           for _ in range(n)], item
        if item == h.F32V:
            values = [_float32(p.choice(INTERESTING_FLOATS)) for _ in range(n)]
            return vtype, values, item
        lo, hi = {h.U8: (0, 255), h.I32: (-2**31, 2**31 - 1), h.U32: (0, 2**32 - 1),
                  h.I64: (-2**63, 2**63 - 1)}[item]
        return vtype, [min(hi, max(lo, p.any_int(0, 8))) for _ in range(n)], item
    if vtype in (h.F32V, h.F64V):
        value = p.float()
        return vtype, _float32(value) if vtype == h.F32V else value, None
    if vtype == h.BOOL:
        return vtype, p.bool(), None
    bits = {h.U8: 8, h.I8: 8, h.U16: 16, h.I16: 16, h.U32: 32, h.I32: 32, h.U64: 64,
            h.I64: 64}[vtype]
    signed = vtype in (h.I8, h.I16, h.I32, h.I64)
    if signed:
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    else:
        lo, hi = 0, (1 << bits) - 1
    return vtype, min(hi, max(lo, p.any_int(0, 300))), None


def _change_tokens(p, g):
    import hostile as h
    tokens = h.tiny_tokens(h.TINY["n_vocab"])
    for _ in range(p.int(1, 4)):
        i = p.int(0, len(tokens) - 1)
        tokens[i] = p.choice([tokens[0], "", "t 1", "x" * p.int(1, 2000),
                              b"\xc3(", b"\xff", "<s>", "\u0120", "a\u0000b",
                              "<|im_start|>"])
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
    if p.bool():
        types[p.int(0, len(types) - 1)] = p.choice([0, 2, 4, 5, 6, 7, -1, 2**31 - 1,
                                                    -2**31])
    g.set("tokenizer.ggml.tokens", h.ARR, tokens, h.STR)
    g.set("tokenizer.ggml.token_type", h.ARR, types, h.I32)


def _change_merges(p, g):
    import hostile as h
    merges = [p.choice(["t 1", "t 2", "t1 2", "t t", "t", " t 1", "t  1", "t 1 2",
                        "", "<s> t", "x y", "t\u00001"]) for _ in range(p.int(0, 6))]
    g.set("tokenizer.ggml.merges", h.ARR, merges, h.STR)


def _change_tensor(p, g):
    from fastattn.weights import TYPES
    if not g.tensors:
        return
    t = p.choice(g.tensors)
    what = p.int(0, 5)
    if what == 0:
        t.ne = [p.choice([1, 2, 16, 32, 48, 64, 96, 128, 2**31, 2**32, 2**63])
                for _ in range(p.int(0, 5))]
    elif what == 1:
        t.qtype = p.choice(list(TYPES) + [2, 3, 10, 14, 99, 2**31, 2**32 - 1])
    elif what == 2:
        t.offset = p.choice([0, 4, 32, 64, 1 << 20, 2**63, 2**64 - 32])
    elif what == 3:
        g.tensors.remove(t)
    elif what == 4:
        t.name = p.choice([x.name for x in g.tensors] + ["output.weight", "x",
                                                         "blk.1.attn_q.weight"])
    else:
        t.data = t.data[:p.int(0, len(t.data))]


def gguf_fields(data: bytes) -> str:
    import hostile as h
    p = Provider(data)
    g = h.tiny_llama(tied=p.bool())
    for _ in range(p.int(1, 4)):
        if not p.remaining:
            break
        op = p.int(0, 7)
        if op <= 1:
            key = p.choice(GGUF_KEYS + [k for k, _, _ in g.kvs])
            vtype, value, item = _random_value(p, key)
            g.set(key, vtype, value, item)
        elif op == 2:
            if g.kvs:
                g.kvs.pop(p.int(0, len(g.kvs) - 1))
        elif op == 3:
            _change_tensor(p, g)
        elif op == 4:
            _change_tokens(p, g)
        elif op == 5:
            _change_merges(p, g)
        elif op == 6:
            g.tensor_count = p.choice([None, 0, len(g.tensors) - 1, len(g.tensors) + 1])
            g.kv_count = p.choice([None, 0, len(g.kvs) - 1, len(g.kvs) + 1])
        else:
            g.alignment = p.choice([1, 8, 32, 64, 4096])
            g.set("general.alignment", h.U32, g.alignment)
    return gguf(g.build()[0])


# ---------------------------------------------------------------- tokenizer seeds

@lru_cache(maxsize=None)
def bpe_fields():
    """The tokenizer description of the small BPE llama (real merges)."""
    from fastattn.loaders import load_model_files
    path = scratch_path(".bpe.gguf")
    with open(path, "wb") as f:
        f.write(_bpe_llama_gguf_bytes())
    return load_model_files(path).tokenizer


@lru_cache(maxsize=None)
def tokenizers():
    """The small BPE vocabulary with the smollm and the gpt2 pre-tokenizer."""
    from fastattn.tokenizer import Tokenizer
    fields = bpe_fields()
    return [Tokenizer.from_gguf(fields), Tokenizer.from_gguf(dict(fields, pre="gpt2"))]


SPECIAL_TEXTS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|im_", "<|", "|>",
                 "<|im_start|><|im_end|>", "<|im_end|>>", "<<|im_start|>"]


# ------------------------------------------------------------- harness: tokenizer

def _ids(p, n_vocab):
    """A list of ids, mostly valid, some hostile (negative, huge, non-int)."""
    out = []
    for _ in range(p.int(0, 40)):
        kind = p.int(0, 15)
        if kind <= 10:
            out.append(p.int(0, n_vocab - 1))
        elif kind == 11:
            out.append(p.choice(INTERESTING_INTS + [n_vocab, n_vocab - 1]))
        elif kind == 12:
            out.append(p.choice([np.int64(3), np.uint64(2**64 - 1), np.int8(-1),
                                 np.int32(n_vocab), np.uint8(5), np.int64(-2**63)]))
        elif kind == 13:
            out.append(p.choice([1.0, 3.5, np.float32(2.0), np.float64(1.0), True,
                                 False, float("nan")]))
        elif kind == 14:
            out.append(p.choice(["3", b"3", None, [1], (2,), np.array(3),
                                 np.array([1, 2]), 1j]))
        else:
            out.append(p.choice([np.int16(7), np.uint32(n_vocab + 1)]))
    return out


def _is_valid_id(i, n_vocab):
    """An integer in [0, n_vocab): int, numpy integer, or a 0-d integer array."""
    if isinstance(i, np.ndarray) and i.ndim == 0 and i.dtype.kind in "iu":
        i = i[()]
    return (isinstance(i, (int, np.integer)) and not isinstance(i, (bool, np.bool_))
            and 0 <= int(i) < n_vocab)


def tokenizer(data: bytes) -> str:
    from fastattn.errors import TokenizerError
    p = Provider(data)
    tok = p.choice(tokenizers())
    action = p.int(0, 3)

    if action <= 1:
        text = p.text(48, SPECIAL_TEXTS)
        allowed = p.choice(["none", "all", frozenset(), {"<|im_start|>"},
                            {"<|im_end|>", "<|endoftext|>"}, {"<|nope|>"}, "some",
                            None, 7, ["<|im_end|>"], "<|im_start|>"])
        allowed_kw = frozenset() if allowed == "none" else allowed
        wrong = p.chance(1, 20)
        try:
            ids = tok.encode(b"x" if wrong else text, allowed_special=allowed_kw)
        except TokenizerError as e:
            return refused(e)
        check(not wrong, "encode took bytes")
        check(all(isinstance(i, int) and 0 <= i < tok.n_vocab for i in ids),
              f"encode({text!r}) gave ids outside the vocabulary: {ids}")
        check(tok.decode(ids) == text, f"decode(encode({text!r}, allowed_special="
                                       f"{allowed!r})) = {tok.decode(ids)!r}")
        if allowed_kw in (frozenset(), None):
            check(not set(ids) & set(tok.special_tokens.values()),
                  f"encode({text!r}) with no specials allowed gave a special id: {ids}")
        return "encoded"

    ids = _ids(p, tok.n_vocab)
    container = p.choice(["list", "tuple", "array", "iter"])
    if container == "array":
        try:
            arg = np.array(ids)
            ids = list(arg)              # what decode sees: numpy scalars
        except (ValueError, TypeError):
            arg = ids
    all_valid = all(_is_valid_id(i, tok.n_vocab) for i in ids)
    if container == "tuple":
        arg = tuple(ids)
    elif container == "iter":
        arg = iter(ids)
    elif container == "list":
        arg = ids
    try:
        text = tok.decode(arg)
    except TokenizerError as e:
        check(not all_valid, f"decode refused valid ids {ids!r}: {e}")
        return refused(e)
    check(isinstance(text, str), "decode gave a non-str")
    if not all_valid:
        # only ids that are integers in range may decode
        raise Finding(f"decode accepted invalid ids {ids!r} -> {text!r}")

    if action == 2:
        # the stream decoder gives decode's text, piece by piece
        decoder = tok.stream_decoder()
        pieces = [decoder.feed(i) for i in ids] + [decoder.flush()]
        check("".join(pieces) == text, f"stream decode of {ids} gave {pieces}, "
                                       f"decode gave {text!r}")
        return "stream-decoded"
    return "decoded"


# ------------------------------------------------------- harness: tokenizer_fields

def tokenizer_fields(data: bytes) -> str:
    from fastattn.tokenizer import Tokenizer
    p = Provider(data)
    base = bpe_fields()
    fields = dict(base)
    tokens = list(base["tokens"])
    merges = list(base.get("merges", []))
    types = list(base.get("token_type", [1] * len(tokens)))

    for _ in range(p.int(1, 5)):
        op = p.int(0, 8)
        if op == 0 and tokens:      # a token's text
            tokens[p.int(0, len(tokens) - 1)] = p.choice(
                [tokens[p.int(0, len(tokens) - 1)], "", " ", "a b", "x" * 5000,
                 b"\xc3(", b"ok", "\udc80", "<|im_start|>", "\u0100\u0100", "\x00"])
        elif op == 1 and merges:    # a merge line
            merges[p.int(0, len(merges) - 1)] = p.choice(
                ["a", "a  b", " a b", "a b ", "a b c", "", b"\xff \xfe",
                 "\u0120 \u0120",
                 merges[p.int(0, len(merges) - 1)], "<|im_start|> a",
                 "\u0120t he", "h e"])
        elif op == 2:               # drop or add entries
            what = p.choice(["tokens", "merges", "types"])
            target = {"tokens": tokens, "merges": merges, "types": types}[what]
            if target and p.bool():
                target.pop(p.int(0, len(target) - 1))
            else:
                target.append(p.choice(["zz", "a b", 1, 4]) if what != "types"
                              else p.choice([1, 3]))
        elif op == 3 and types:     # a token type
            types[p.int(0, len(types) - 1)] = p.choice([0, 1, 2, 3, 4, 5, 6, 7, -1,
                                                        2**31 - 1, -2**31, 2**63])
        elif op == 4:               # special ids
            key = p.choice(["bos_id", "eos_id", "eot_id", "eom_id", "unk_id"])
            fields[key] = p.choice([0, 1, 2, len(tokens) - 1, len(tokens), 2**31,
                                    2**64 - 1, None])
        elif op == 5:
            fields["pre"] = p.choice(["gpt2", "smollm", "default", "llama-bpe", "",
                                      None])
        elif op == 6:
            fields["model"] = p.choice(["gpt2", "llama", "bert", "", None])
        elif op == 7:
            fields["add_bos"] = p.bool()
        else:
            merges.reverse()
    fields.update(tokens=tokens, merges=merges, token_type=types)

    try:
        tok = Tokenizer.from_gguf(fields)
    except FastAttnError as e:
        return refused(e)
    for text in ["hello world", "the quick brown fox 123", "<|im_start|>x",
                 "\u0120\u0100", p.text(24, SPECIAL_TEXTS)]:
        try:
            ids = tok.encode(text)
        except FastAttnError as e:
            # only text that has no UTF-8 form (a lone surrogate) may be refused
            check("surrogate" in str(e), f"encode({text!r}) refused: {e}")
            continue
        check(all(0 <= i < tok.n_vocab for i in ids),
              f"ids outside the vocabulary {ids}")
        if round_trips(tok):
            check(tok.decode(ids) == text,
                  f"round trip of {text!r}: {tok.decode(ids)!r}")
    return "built"


# --------------------------------------------------------------- harness: sampling

WRONG_TYPES = [None, "1.0", b"1", [1.0], {}, 1j, object()]


# A plausible range per parameter; a hostile value replaces it one time in four.
PARAM_RANGES = {"temperature": (-0.5, 3.0), "top_k": (0, 300), "top_p": (0.0, 1.0),
                "min_p": (0.0, 1.0), "repeat_penalty": (0.0, 3.0),
                "repeat_last_n": (-1, 100), "seed": (0, 1000)}


def _param(p, name, kind):
    """(value, wrong_type) for a float or int parameter."""
    lo, hi = PARAM_RANGES[name]
    r = p.int(0, 39)
    if r == 0:
        return p.choice(WRONG_TYPES), True
    if r == 1:
        return p.choice([True, False]), True
    if kind == "float":
        if r <= 7:
            return p.float(), False
        if r == 8:
            return p.choice([np.float32("nan"), np.float32(0.5), np.float64(2.0),
                             np.float16(65504), np.int64(1)]), False
        if r == 9:
            from fractions import Fraction
            return Fraction(p.int(0, 10), p.int(1, 10)), False
        return p.small_float(lo, hi), False
    if r <= 7:
        return p.any_int(lo, hi), False
    if r == 8:
        return p.choice([np.int64(5), np.uint64(2**64 - 1), np.int8(-1)]), False
    if r == 9:
        return p.choice([1.0, 2.5, float("nan")]), True
    return p.int(lo, hi), False


def _logits(p):
    """(logits, wrong_type)."""
    n = p.int(1, 300)
    dtype = p.choice([np.float32] * 6 + [np.float64, np.float16, np.longdouble,
                                         np.int32, np.bool_, object])
    values = np.array([p.small_float(-8, 8) for _ in range(n)], dtype=np.float64)
    for _ in range(p.choice([0, 0, 0, 1, 2, 4])):
        values[p.int(0, n - 1)] = p.choice([np.nan, np.inf, -np.inf, 1e38, -1e38, 3e38,
                                            1e300, -1e300, 5e-324, 0.0])
    if p.chance(1, 10):
        values[:] = p.choice([-np.inf, np.nan, 0.0, 1e30])
    with np.errstate(all="ignore"):
        logits = values.astype(dtype)
    shape = p.choice(["1d"] * 12 + ["2d", "0d", "empty", "list"])
    if shape == "2d":
        logits = logits.reshape(1, -1)
    elif shape == "0d":
        logits = logits[0]
    elif shape == "empty":
        logits = logits[:0]
    elif shape == "list":
        logits = logits.tolist()
    # ints and bools are not logits; an object array is, once listed as floats
    wrong = shape not in ("empty", "0d") and (
        dtype in (np.int32, np.bool_) or (dtype is object and shape != "list"))
    return logits, wrong


def _history(p, n):
    kind = p.int(0, 9)
    if kind <= 5:
        return [p.int(0, n - 1) for _ in range(p.int(0, 80))], False
    if kind == 6:
        return [p.any_int(-5, n + 5) for _ in range(p.int(0, 20))], False
    if kind == 7:
        dtype = p.choice([np.int32, np.int64, np.uint8])
        top = min(n - 1, np.iinfo(dtype).max)
        ids = [p.int(0, top) for _ in range(p.int(0, 20))]
        return np.array(ids, dtype=dtype), False
    if kind == 8:
        return p.choice([[1.5], ["a"], [None], "abc", [[1, 2]]]), True
    return (), False


def sampling(data: bytes) -> str:
    from fastattn.sampling import Sampler
    p = Provider(data)
    wrong = False
    params = {}
    for name, kind in (("temperature", "float"), ("top_k", "int"), ("top_p", "float"),
                       ("min_p", "float"), ("repeat_penalty", "float"),
                       ("repeat_last_n", "int"), ("seed", "int")):
        if p.chance(1, 3):
            continue            # the default
        value, bad = _param(p, name, kind)
        if name == "seed" and value is None:
            bad = False
        params[name] = value
        wrong |= bad
    try:
        sampler = Sampler(**params)
    except FastAttnError as e:
        return refused(e)
    except TypeError as e:
        check(wrong, f"Sampler({params}) raised TypeError for well-typed "
                     f"arguments: {e}")
        return refused(e)

    logits, bad_logits = _logits(p)
    n = np.size(logits)
    history, bad_history = _history(p, max(n, 1))
    try:
        token = sampler.sample(logits, history)
    except FastAttnError as e:
        return refused(e)
    except TypeError as e:
        check(bad_logits or bad_history,
              f"sample raised TypeError on well-typed arguments: {e}")
        return refused(e)

    # the token is a valid id that was not banned, among the top k
    check(isinstance(token, int) and 0 <= token < n,
          f"{params}: token {token!r} outside [0, {n})")
    x = np.asarray(logits, dtype=np.float64).reshape(-1)
    check(not bad_logits, f"{params}: sample accepted logits of dtype "
                          f"{np.asarray(logits).dtype}")
    check(np.isfinite(x[token]), f"{params}: chose token {token} whose logit is "
                                 f"{x[token]} of {x.tolist()[:20]}")
    penalty_off = sampler.repeat_penalty == 1.0 or sampler.repeat_last_n == 0 \
        or len(history) == 0
    if penalty_off:
        better = int(np.count_nonzero(x > x[token]))
        if sampler.greedy:
            check(better == 0, f"{params}: greedy chose {token} ({x[token]}) below "
                               f"the maximum {np.nanmax(x)}")
        else:
            if 0 < sampler.top_k:
                check(better < sampler.top_k, f"{params}: chose {token} with {better} "
                                              f"logits above it, top_k {sampler.top_k}")
            # a token whose probability exp(-(max - x) / T) underflows to 0 can
            # never be drawn: with a tiny T, only the maximum can
            finite = x[np.isfinite(x)]
            with np.errstate(all="ignore"):
                gap = (finite.max() - x[token]) / sampler.temperature
            check(gap < 760, f"{params}: chose {token} ({x[token]}) whose probability "
                             f"is exp(-{gap}) = 0; maximum {finite.max()}")
    return "sampled"


# ------------------------------------------------------------- safetensors seeds

@lru_cache(maxsize=None)
def safetensors_seeds():
    from fastattn.loaders.safetensors import save_file
    rng = np.random.default_rng(0)
    sets = [
        {"a": rng.standard_normal((3, 4)).astype(np.float32),
         "b": np.arange(5, dtype=np.int64), "c": np.zeros((0, 2), np.float16)},
        {"wte.weight": rng.standard_normal((8, 4)).astype(np.float16),
         "ln.bias": np.ones(4, np.float32), "scalar": np.array(2.5, np.float64),
         "mask": np.array([True, False]), "u16": np.arange(6, dtype=np.uint16)},
        {},
    ]
    out = []
    for i, tensors in enumerate(sets):
        path = scratch_path(f".seed{i}.safetensors")
        save_file(tensors, path, metadata={"format": "pt"} if i == 1 else None)
        with open(path, "rb") as f:
            data = f.read()
        out.append((data, 8 + int.from_bytes(data[:8], "little")))
    return out


# ------------------------------------------------------------- harness: safetensors

def safetensors(data: bytes) -> str:
    from fastattn.loaders.safetensors import DTYPES, SafetensorsFile, load_file
    path = write_scratch(data, ".safetensors")
    try:
        f = SafetensorsFile(path)
    except FastAttnError as e:
        return refused(e)
    size = os.path.getsize(path)
    for name in f.names():
        info = f.info(name)
        raw = f.raw(name)
        check(raw.nbytes == info.nbytes, f"{name}: raw has {raw.nbytes} bytes, "
                                         f"info says {info.nbytes}")
        check(f.data_offset + info.end <= size, f"{name}: ends past the file")
        a = f.array(name)
        check(a.shape == info.shape and a.itemsize == DTYPES[info.dtype][1],
              f"{name}: array {a.shape} {a.dtype} against {info}")
        int(raw.sum())        # touch every byte of the view
    load_file(path)
    f.close()
    return "read"


def safetensors_fields(data: bytes) -> str:
    p = Provider(data)
    seed, _ = p.choice(safetensors_seeds())
    n = int.from_bytes(seed[:8], "little")
    header = json.loads(seed[8:8 + n])
    body = seed[8 + n:]
    names = list(header)
    hostile_values = (INTERESTING_INTS + INTERESTING_FLOATS
                      + [None, True, "F32", "BF16", "x", [], {}, [0], [1, 2, 3],
                         [-1, 4], [2**64, 0], [0, 2**64], [0, 10**30], [1] * 65,
                         [1.5], ["1"], {"a": 1}, "BIGINT", ["BIGINT"]])

    def pick(values):
        return copy.deepcopy(p.choice(values))     # never one object in two places

    for _ in range(p.int(1, 4)):
        op = p.int(0, 6)
        if op <= 2 and names:
            entry = header.get(p.choice(names))
            if isinstance(entry, dict) and entry:
                key = p.choice(list(entry))
                entry[key] = pick(hostile_values)
        elif op == 3:
            header[p.choice(names + ["new", "__metadata__"])] = pick(
                hostile_values + [{"dtype": "F32", "shape": [1],
                                   "data_offsets": [0, 4]},
                                  {"k": "v"}, {"k": 1}])
        elif op == 4:
            if p.bool():
                body = body[:p.int(0, len(body))]
            else:
                body = body + bytes(p.int(1, 64))
        elif op == 5 and names:
            header.pop(p.choice(names), None)
        else:
            header[p.choice(names + ["x"])] = p.choice(["[" * 5000 + "]" * 5000, "{}"])

    text = json.dumps(header).encode()
    # values json.dumps cannot write: 5000 nested lists, a 5001-digit integer
    text = text.replace(b'"[[[[', b"[[[[").replace(b']]]]"', b"]]]]")
    text = text.replace(b'"BIGINT"', b"1" + b"0" * 5000)
    length = len(text)
    if p.chance(1, 8):
        length = p.choice([0, length - 1, length + 1, 2**63, 2**64 - 1])
    return safetensors(struct.pack("<Q", length) + text + body)


# ----------------------------------------------------------------------- registry

HARNESSES = {
    "gguf": gguf,
    "gguf_fields": gguf_fields,
    "tokenizer": tokenizer,
    "tokenizer_fields": tokenizer_fields,
    "sampling": sampling,
    "safetensors": safetensors,
    "safetensors_fields": safetensors_fields,
}

# Harnesses whose input is a whole file, and their seed files; the others
# take bytes that a Provider reads, and start from random bytes.
FILE_SEEDS = {"gguf": gguf_seeds, "safetensors": safetensors_seeds}


def prepare(name):
    """Build what a harness caches (seed files, tokenizers, the scanner's
    class table) before any time limit starts."""
    import fastattn.generation      # noqa: F401 - imports, once
    {"gguf": gguf_seeds, "gguf_fields": gguf_seeds, "tokenizer": tokenizers,
     "tokenizer_fields": tokenizers, "safetensors": safetensors_seeds,
     "safetensors_fields": safetensors_seeds}.get(name, lambda: None)()
