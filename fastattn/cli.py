"""The `fastattn` command line (also `python -m fastattn`).

    fastattn generate -p "Once upon a time" -n 64 --temp 0
    fastattn chat --system "You are terse."
    fastattn score notes.txt -v
    fastattn download
    fastattn info -m model.gguf

Flags follow llama.cpp's: -m model, -p prompt, -f prompt file, -n tokens to
predict, -c context, -t threads, --temp, --top-k, --top-p, --min-p,
--repeat-penalty, --seed.  The text goes to stdout; the model's dimensions
(aligned `key = value` lines, at load) and the timings (at the end) go to
stderr, so `fastattn generate ... > out.txt` keeps only the text.
"""
import argparse
import logging
import os
import sys
import time

from .errors import FastAttnError

PROG = "fastattn"


# ------------------------------------------------------------------ arguments

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Fast, exact transformer inference on the CPU.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    def model_flags(p, sampling=True):
        p.add_argument("-m", "--model", metavar="PATH",
                       help="GGUF file or Hugging Face folder (default: SmolLM2-135M-"
                            "Instruct, downloaded on first use)")
        p.add_argument("-t", "--threads", type=_thread_count, metavar="N",
                       help="threads, at most 256 (default: the CPUs this process may "
                            "use)")
        p.add_argument("-c", "--ctx-size", type=_ctx_size, metavar="N",
                       help="context length, at least 2 (default: the model's)")
        p.add_argument("--activations", choices=["f32", "q8"], default="f32",
                       help="q8: round activations to 8 bits for quantized weights "
                            "(faster, not exact; default f32, exact)")
        p.add_argument("--kv-cache", choices=["f32", "f16"], default="f32",
                       help="f16: store the KV cache as float16, half its memory "
                            "and a faster decode over long contexts; not exact: keys "
                            "and values are rounded to half precision, about 3 "
                            "significant digits (default f32, exact)")
        p.add_argument("-v", "--verbose", action="store_true", help="say more on stderr")
        p.add_argument("-q", "--quiet", action="store_true",
                       help="no model dimensions or timings on stderr")
        if not sampling:
            return
        p.add_argument("-n", "--n-predict", type=int, default=None, metavar="N",
                       help="tokens to generate (default 128; per reply in `chat`: "
                            "512; a negative N: until the context is full)")
        p.add_argument("--temp", type=float, default=0.8, metavar="T",
                       help="temperature; 0 or less is greedy (default 0.8)")
        p.add_argument("--top-k", type=int, default=40, metavar="K",
                       help="keep the K most likely tokens; 0 keeps all (default 40)")
        p.add_argument("--top-p", type=float, default=0.95, metavar="P",
                       help="nucleus: keep the most likely tokens up to mass P "
                            "(default 0.95; 1 is off)")
        p.add_argument("--min-p", type=float, default=0.0, metavar="P",
                       help="drop tokens less likely than P x the best (default 0: off)")
        p.add_argument("--repeat-penalty", type=float, default=1.0, metavar="R",
                       help="penalize the last 64 tokens (default 1.0: off)")
        p.add_argument("-s", "--seed", type=int, default=-1, metavar="S",
                       help="random seed; -1 picks one (default -1)")
        p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                       help="stop when this text appears (repeatable); it is not printed")

    p = commands.add_parser("generate", help="continue a prompt",
                            description="Continue a prompt and stream the text to stdout.")
    model_flags(p)
    p.add_argument("-p", "--prompt", help="the prompt text")
    p.add_argument("-f", "--file", metavar="FILE",
                   help='read the prompt from FILE ("-": standard input)')
    p.add_argument("--chat", action="store_true",
                   help="treat the prompt as a user message in the model's chat template")
    p.add_argument("--system", metavar="TEXT", help="system message (with --chat)")
    p.add_argument("--no-display-prompt", action="store_true",
                   help="print only the generated text, not the prompt first")
    p.set_defaults(run=cmd_generate, command_parser=p)

    p = commands.add_parser("chat", help="talk to the model (reads lines from stdin)",
                            description="Interactive chat: one line per user turn; "
                                        "EOF or Ctrl-C at the prompt ends it, Ctrl-C "
                                        "during a reply stops the reply.")
    model_flags(p)
    p.add_argument("--system", metavar="TEXT", help="system message")
    p.set_defaults(run=cmd_chat, command_parser=p)

    p = commands.add_parser("score", help="log-probabilities and perplexity of a text",
                            description="Score FILE: perplexity (and per-token "
                                        "log-probabilities with -v).")
    p.add_argument("file", metavar="FILE", help='the text; "-" reads standard input')
    model_flags(p, sampling=False)
    p.set_defaults(run=cmd_score, command_parser=p)

    p = commands.add_parser("download", help="fetch the default model and print its path")
    p.add_argument("--force", action="store_true", help="fetch again even if cached")
    p.set_defaults(run=cmd_download, command_parser=p)

    from .lab import add_verify_parser
    add_verify_parser(commands)

    p = commands.add_parser("info", help="print a model's configuration and tensor types")
    p.add_argument("-m", "--model", metavar="PATH", help="GGUF file or Hugging Face folder")
    p.add_argument("-v", "--verbose", action="store_true", help="also list every tensor")
    p.set_defaults(run=cmd_info, command_parser=p)
    return parser


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _ctx_size(text):
    # a prompt takes one position and a new token another: below 2 nothing
    # can run, whatever the model (its own limit is checked once it is read)
    value = _positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2, got {value}")
    return value


def _thread_count(text):
    from .model import MAX_THREADS
    value = _positive_int(text)
    if value > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_THREADS}, got {value}")
    return value


def _version():
    from . import __version__
    return __version__


# ------------------------------------------------------------------ printing

def err(text=""):
    print(text, file=sys.stderr, flush=True)


def print_pairs(pairs, file=None):
    """Aligned `key = value` lines, llama.cpp style."""
    file = file or sys.stderr
    width = max((len(str(k)) for k, _ in pairs), default=0)
    for key, value in pairs:
        if isinstance(value, float):
            value = f"{value:g}"          # 1e-05, not 9.999999747378752e-06
        print(f"{key:<{width}} = {value}", file=file)
    file.flush()


def print_timings(stats, total_s):
    """llama.cpp's closing lines: load, prompt eval and eval times."""
    def line(label, seconds, count, unit):
        ms = seconds * 1e3
        if count and seconds > 0:
            rate = (f" ({ms / count:8.2f} ms per token, "
                    f"{count / seconds:8.2f} tokens per second)")
        else:
            rate = ""
        return f"{PROG}: {label:<16} = {ms:10.2f} ms / {count:5d} {unit}{rate}"

    err(f"{PROG}: {'load time':<16} = {stats.get('load_s', 0.0) * 1e3:10.2f} ms")
    err(line("prompt eval time", stats.get("prompt_s", 0.0),
             stats.get("prompt_eval_tokens", stats.get("prompt_tokens", 0)), "tokens"))
    if stats.get("stopped"):                  # a generation, not a score
        err(line("eval time", stats.get("gen_s", 0.0), stats.get("gen_tokens", 0),
                 "tokens"))
    err(f"{PROG}: {'total time':<16} = {total_s * 1e3:10.2f} ms")
    if stats.get("stopped"):
        err(f"{PROG}: {'stopped by':<16} = {stats['stopped']}")


# whether stdout's last line is unfinished (text written without a final
# newline): an error message then starts with one, so it gets its own line
_line_open = False


def write_out(text):
    global _line_open
    sys.stdout.write(text)
    sys.stdout.flush()
    if text:
        _line_open = not text.endswith("\n")


def end_line():
    """Finish stdout's unfinished line, if there is one (the prompt or a reply
    cut short by an error)."""
    if _line_open:
        try:
            write_out("\n")
        except OSError:              # stdout is gone (a closed pipe): nothing to finish
            pass


def error_text(e) -> str:
    """The message of e once, without the "fastattn: " that some messages
    (the engine's) already start with: the caller adds its own prefix."""
    text = str(e).strip()
    while text.startswith(f"{PROG}:"):
        text = text[len(PROG) + 1:].lstrip()
    return text or type(e).__name__


def print_error(e):
    end_line()
    err(f"{PROG}: error: {error_text(e)}")


# ------------------------------------------------------------------ loading

def resolve_model(path):
    """The model path: the flag's, or the default (downloaded, with a word on stderr)."""
    if path is not None:
        if not path:
            raise UsageError("-m: the path is empty")
        return path
    from .download import default_model_path
    try:
        return default_model_path(download=False)
    except FastAttnError:
        pass
    err(f"{PROG}: the default model is not cached yet; downloading it (once)")
    return default_model_path(download=True, progress=True)


def load_model(args):
    from .generation import Model
    # verbose=False: the banner below is the CLI's, the library need not log it too
    model = Model.load(resolve_model(args.model), n_threads=args.threads,
                       n_ctx=args.ctx_size, verbose=False, activations=args.activations,
                       kv_cache=args.kv_cache)
    if not args.quiet:
        print_pairs([("model", model.source)] + model.describe())
    return model


def sampling_kwargs(args, model):
    n = args.n_predict
    if n is None:
        n = 128
    elif n < 0:
        n = model.n_ctx                 # until the context is full
    return dict(max_new_tokens=n, temperature=args.temp, top_k=args.top_k,
                top_p=args.top_p, min_p=args.min_p, repeat_penalty=args.repeat_penalty,
                seed=None if args.seed < 0 else args.seed, stop=args.stop or None)


# ------------------------------------------------------------------ commands

def cmd_generate(args):
    if args.prompt is None and args.file is None:
        raise UsageError("generate needs a prompt: -p TEXT or -f FILE")
    if args.prompt is not None and args.file is not None:
        raise UsageError("give the prompt with -p or -f, not both")
    if args.system is not None and not args.chat:
        raise UsageError("--system is a chat message: it needs --chat")
    if args.file is not None:
        prompt = _read_text(args.file)
    else:
        prompt = args.prompt

    start = time.perf_counter()
    model = load_model(args)
    kwargs = sampling_kwargs(args, model)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": prompt})
        pieces = model.chat(messages, stream=True, **kwargs)
    else:
        pieces = model.stream(prompt, **kwargs)
    if args.verbose:
        ids = model._chat_ids(messages) if args.chat else model.encode(prompt)
        err(f"{PROG}: prompt: {len(ids)} tokens: {ids}")
    if not args.chat and not args.no_display_prompt:
        write_out(prompt)

    try:
        for piece in pieces:
            write_out(piece)
    except KeyboardInterrupt:
        pieces.close()
        write_out("\n")
        if not args.quiet:
            print_timings(model.last_stats, time.perf_counter() - start)
        return 130
    write_out("\n")
    if not args.quiet:
        print_timings(model.last_stats, time.perf_counter() - start)
    return 0


def cmd_chat(args):
    from .errors import ContextOverflowError

    if sys.stdin is None:
        raise FastAttnError("stdin is closed: chat reads one user turn per line from it")
    model = load_model(args)
    kwargs = sampling_kwargs(args, model)
    if args.n_predict is None:
        kwargs["max_new_tokens"] = 512
    system = [{"role": "system", "content": args.system}] if args.system else []
    history = []
    # the conversation's KV cache: each turn computes only the new tokens
    session = model.session()
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    if interactive and not args.quiet:
        err(f"{PROG}: chat: one line per turn; Ctrl-C stops a reply, Ctrl-D or Ctrl-C "
            f"here quits")

    while True:
        # read one user turn
        try:
            if interactive:
                line = input("> ")
            else:
                line = sys.stdin.readline()
                if not line:
                    return 0                    # end of piped input
        except (EOFError, KeyboardInterrupt):   # Ctrl-D or Ctrl-C at the prompt
            write_out("\n")
            return 0
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        problem = _unsupported_text(line, "input")
        if problem:
            # this turn cannot be tokenized: say so, and wait for another
            print_error(FastAttnError(problem + "; the line was skipped"))
            continue
        history.append({"role": "user", "content": line})

        # fit the conversation in the context: drop the oldest turns first
        pieces = None
        while pieces is None:
            try:
                pieces = model.chat(system + history, stream=True, session=session,
                                    **kwargs)
            except ContextOverflowError as e:
                if len(history) <= 1:
                    # this message alone does not fit: say so, and wait for another
                    print_error(e)
                    history.pop()
                    break
                history = history[2:]
                logging.getLogger("fastattn").info("dropped the oldest turn to fit n_ctx")
        if pieces is None:
            continue

        # stream the reply; Ctrl-C ends it and keeps what was said
        reply = []
        try:
            for piece in pieces:
                reply.append(piece)
                write_out(piece)
        except KeyboardInterrupt:
            pieces.close()
        write_out("\n")
        history.append({"role": "assistant", "content": "".join(reply)})
        if args.verbose:
            stats = model.last_stats
            err(f"{PROG}: {stats.get('prompt_tokens', 0)} prompt tokens "
                f"({stats.get('cached_tokens', 0)} cached), "
                f"{stats.get('gen_tokens', 0)} generated, "
                f"{stats.get('gen_tok_s', 0.0):.1f} tokens/s, "
                f"stopped by {stats.get('stopped')}")


def cmd_score(args):
    text = _read_text(args.file)
    start = time.perf_counter()
    model = load_model(args)
    result = model.score(text)
    if args.verbose:
        decode = model.tokenizer.decode
        print(f"{'i':>6} {'id':>7} {'logprob':>10}  token")
        for i, (token, lp) in enumerate(zip(result.tokens, result.token_logprobs)):
            print(f"{i:6d} {token:7d} {lp:10.4f}  {decode([token])!r}")
    n_scored = int((~_isnan(result.token_logprobs)).sum())
    print_pairs([("tokens", len(result.tokens)), ("scored", n_scored),
                 ("nll", f"{result.nll:.6f}"), ("perplexity", f"{result.perplexity:.6f}")],
                file=sys.stdout)
    if not args.quiet:
        print_timings(model.last_stats, time.perf_counter() - start)
    return 0


def cmd_download(args):
    from .download import download_default
    path = download_default(force=args.force)
    print(path)
    return 0


def cmd_info(args):
    from .loaders import load_model_files
    from .weights import type_name

    loaded = load_model_files(resolve_model(args.model))
    config = loaded.config
    counts = {}
    n_params = 0
    for w in loaded.weights.values():
        counts[type_name(w.qtype)] = counts.get(type_name(w.qtype), 0) + 1
        n = 1
        for s in w.shape:
            n *= s
        n_params += n
    pairs = [("model", config.source or args.model), ("name", config.name)]
    pairs += list(config.describe())
    pairs += [("tied_output", config.tied_output), ("n_tensors", len(loaded.weights)),
              ("n_params", f"{n_params:,}")]
    pairs += [(f"tensors {name}", count) for name, count in
              sorted(counts.items(), key=lambda item: -item[1])]
    pairs += [("tokenizer", loaded.tokenizer.get("kind", "?")),
              ("chat_template", "yes" if loaded.chat_template else "no")]
    print_pairs(pairs, file=sys.stdout)
    if args.verbose:
        for name, w in loaded.weights.items():
            print(f"{name:<32} {type_name(w.qtype):<5} {list(w.shape)}")
    return 0


# ------------------------------------------------------------------ main

class UsageError(FastAttnError):
    """A flag combination the parser cannot catch (exit status 2)."""


# A prompt or a text to score larger than this is a mistake (a device, a
# runaway pipe): SmolLM2's whole context is about 30 KiB of English.
TEXT_FILE_LIMIT = 64 << 20


def _read_text(path):
    """A -f prompt or a text to score: a regular file, or a pipe (as in
    `-f <(command)`), read up to TEXT_FILE_LIMIT bytes; "-" is standard input
    (a pipe or a redirected file, not a terminal)."""
    from .files import read_text
    if path == "-":
        if sys.stdin is None or sys.stdin.isatty():
            raise UsageError("-: standard input is a terminal (or closed); pipe or "
                             "redirect the text into it")
        path = "/dev/stdin"
    return read_text(path, TEXT_FILE_LIMIT, error=FastAttnError, pipes=True)


def _check_sampling(args):
    """The sampling flags, checked by the sampler's own rules before the model
    loads: a bad value is a usage error naming its flag."""
    from .sampling import Sampler, SamplingError
    if not hasattr(args, "temp"):
        return
    flags = {"temperature": "--temp", "top_k": "--top-k", "top_p": "--top-p",
             "min_p": "--min-p", "repeat_penalty": "--repeat-penalty", "seed": "--seed"}
    try:
        Sampler(temperature=args.temp, top_k=args.top_k, top_p=args.top_p,
                min_p=args.min_p, repeat_penalty=args.repeat_penalty,
                seed=None if args.seed < 0 else args.seed)
    except SamplingError as e:
        name = str(e).split(" ", 1)[0]
        raise UsageError(f"{flags.get(name, name)}: {e}") from None


def _unsupported_text(value, what):
    """None if value is text Python can encode as UTF-8, else the message
    naming the first bad byte (undecodable input bytes arrive as lone
    surrogates U+DC80..U+DCFF)."""
    try:
        value.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        bad = value[e.start]
        where = (f"byte 0x{ord(bad) - 0xDC00:02x}" if 0xDC80 <= ord(bad) <= 0xDCFF
                 else f"U+{ord(bad):04X}")
        return f"{what}: the text is not valid UTF-8 ({where} at character {e.start})"


def _check_argv_text(args):
    """Text given on the command line must be UTF-8; name the bad byte."""
    for name, flag in (("prompt", "-p"), ("system", "--system")):
        value = getattr(args, name, None)
        if isinstance(value, str):
            problem = _unsupported_text(value, flag)
            if problem:
                raise UsageError(problem)


def _isnan(array):
    import numpy as np
    return np.isnan(array)


def _quiet_exit_flush():
    """Point stdout at devnull: what is still buffered for a stdout that fails
    would fail again when the interpreter flushes it on exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv=None) -> int:
    global _line_open
    # a stream the shell closed (`>&-`) is None here; argparse and the error
    # messages need somewhere to write
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")
    stdout_closed = sys.stdout is None
    if stdout_closed:
        sys.stdout = open(os.devnull, "w")
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # named by the subcommand's parser, whose usage lists what it takes
        # (argparse's own parse_args reports them with the top-level usage)
        (getattr(args, "command_parser", None) or parser).error(
            "unrecognized arguments: " + " ".join(unknown))

    # library messages (fastattn.*) on stderr; -v shows the INFO ones too
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    logger = logging.getLogger("fastattn")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if getattr(args, "verbose", False) else logging.WARNING)
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    if hasattr(sys.stdin, "reconfigure"):
        # bytes that are not UTF-8 arrive as lone surrogates, which chat
        # names, instead of a decoding error in the middle of a read
        sys.stdin.reconfigure(errors="surrogateescape")

    _line_open = False
    try:
        if stdout_closed:
            raise FastAttnError("stdout is closed: there is nowhere to write the output")
        _check_argv_text(args)
        _check_sampling(args)
        return args.run(args) or 0
    except UsageError as e:
        # as argparse words its own: the subcommand's usage and name
        end_line()
        sub = getattr(args, "command_parser", parser)
        sub.print_usage(sys.stderr)
        err(f"{sub.prog}: error: {error_text(e)}")
        return 2
    except FastAttnError as e:
        print_error(e)
        return 1
    except KeyboardInterrupt:
        # outside a reply (loading, say): stop quietly, as a shell expects,
        # on a fresh line (after the terminal's "^C")
        if _line_open:
            end_line()
        else:
            err("")
        return 130
    except BrokenPipeError:
        # the reader went away (`fastattn generate ... | head`): not an error
        _quiet_exit_flush()
        return 0
    except OSError as e:
        # writing the output failed (a full disk; /dev/full): files fastattn
        # reads report their own errors as FastAttnError
        where = f"{e.filename}: " if e.filename else "writing the output: "
        print_error(FastAttnError(where + (e.strerror or str(e))))
        _quiet_exit_flush()
        return 1
    except MemoryError as e:
        # an allocation outside the engine's own checks (numpy's, say)
        print_error(FastAttnError("out of memory" + (f": {e}" if str(e) else "")))
        return 1
    finally:
        logger.removeHandler(handler)
