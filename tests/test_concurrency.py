"""One model, many Python threads; the GIL; Ctrl-C.

  threads      8 threads share one loaded model, each with its own state,
               prompt and sampler (greedy and sampled, different seeds), all
               released at once by a barrier: each gets exactly the tokens and
               the logits, bit for bit, of the same generation run alone.  A
               small random model with 2 OpenMP threads per call (so 8 OpenMP
               teams at once), a tiny GGUF through generation.Model (generate,
               stream, chat, score mixed), and SmolLM2 (marked `model`).
  one state    a state used by two threads at once is refused with a clear
               error, and the running call is not disturbed.
  the GIL      a pure-Python counter thread keeps counting while a long
               prefill runs in C; during a C call that holds the GIL (re.sub)
               it does not, which shows the measurement can tell them apart.
  fork         a child forked after the parent ran 2-thread forwards (what
               multiprocessing does by default on Linux) runs the same model
               and kernels to the parent's bits instead of hanging in libgomp.
  Ctrl-C       `fastattn generate` on a terminal (a pty): Ctrl-C after the
               first output prints what was generated, the timings, exits 130,
               no traceback.  In-process: how long a SIGINT takes to become a
               KeyboardInterrupt while decoding and while prefilling.
"""
import os
import re
import select
import signal
import sys
import threading
import time

import numpy as np
import pytest

from fastattn.errors import FastAttnError
from fastattn.generation import Model
from fastattn.model import Transformer
from fastattn.sampling import Sampler
from fastattn.testing import random_config, random_ids, random_weights
from fastattn.weights import Q4_1, Q8_0
from tinyllama_gguf import write_tiny_llama

import fastattn  # noqa: E402

# The folder holding the fastattn being tested (site-packages once installed):
# child processes import that one, never the uncompiled source tree.
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(fastattn.__file__)))
N_THREADS = 8


def run_in_threads(work, n, timeout=300):
    """work(i) for i < n, each in its own thread, released together by a
    barrier; -> [result of work(i)].  An exception in a thread fails the test."""
    barrier = threading.Barrier(n)
    results = [None] * n
    errors = []

    def body(i):
        try:
            barrier.wait()
            results[i] = work(i)
        except BaseException as e:       # reported in the main thread
            errors.append((i, e))

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    assert not errors, errors
    return results


# ---------------------------------------------------------------- token loops

def generate_tokens(model, prompt, seed, n_new):
    """Tokens and the logits [n_new, n_vocab] each was drawn from; even seeds
    are greedy, odd seeds sample (temperature 0.9, top-k 20, top-p 0.9)."""
    if seed % 2 == 0:
        sampler = Sampler(temperature=0, seed=seed)
    else:
        sampler = Sampler(temperature=0.9, top_k=20, top_p=0.9, repeat_penalty=1.1,
                          seed=seed)
    state = model.new_state(len(prompt) + n_new)
    logits = model.prefill(state, prompt)
    history = list(prompt)
    tokens, rows = [], []
    for _ in range(n_new):
        token = sampler.sample(logits, history)
        tokens.append(token)
        history.append(token)
        rows.append(logits)
        logits = model.decode(state, token)
    return tokens, np.stack(rows)


def check_same(serial, threaded):
    for i, ((want_t, want_l), (got_t, got_l)) in enumerate(zip(serial, threaded)):
        assert got_t == want_t, f"thread {i}: tokens {got_t} != {want_t}"
        np.testing.assert_array_equal(got_l, want_l, err_msg=f"thread {i}: logits")


@pytest.fixture(scope="module")
def small():
    """A random llama with GQA, Q4_1 matrices and a Q8_0 embedding."""
    config = random_config("llama", n_vocab=96, n_ctx=128, n_embd=64, n_layer=2,
                           n_head=4, n_kv_head=2, n_ff=96)
    weights = random_weights(config, qtype=Q4_1, embd_qtype=Q8_0, seed=3)
    return config, Transformer(config, weights, n_threads=2)


def test_eight_threads_match_the_serial_run(small):
    config, model = small
    prompts = [random_ids(config, 5 + 3 * i, seed=i).tolist() for i in range(N_THREADS)]
    serial = [generate_tokens(model, prompts[i], i, 24) for i in range(N_THREADS)]
    assert len({tuple(t) for t, _ in serial}) > 1          # the runs differ
    for _ in range(3):
        threaded = run_in_threads(
            lambda i: generate_tokens(model, prompts[i], i, 24), N_THREADS)
        check_same(serial, threaded)


def test_threads_on_one_prompt_differ_only_by_seed(small):
    """The same prompt in every thread: the greedy threads agree with each
    other, the sampled ones follow their own seeds."""
    config, model = small
    prompt = random_ids(config, 12, seed=99).tolist()
    serial = [generate_tokens(model, prompt, i, 16) for i in range(N_THREADS)]
    threaded = run_in_threads(lambda i: generate_tokens(model, prompt, i, 16),
                              N_THREADS)
    check_same(serial, threaded)
    greedy = {tuple(t) for t, _ in threaded[0::2]}
    assert len(greedy) == 1


# ----------------------------------------------------- the generation layer

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_tiny_llama(tmp_path_factory.mktemp("conc") / "tiny.gguf", n_ctx=96)
    return Model.load(path, n_threads=1)


def model_call(model, i):
    """A different kind of call per thread: generate, stream, chat, score."""
    prompt = ["the quick brown fox", "once upon a time", "hello world", "def main():",
              "the sea and the sky", "it read the whole", "stories about", "42"][i]
    kind = i % 4
    if kind == 0:
        out = model.generate(prompt, max_new_tokens=20, temperature=0)
    elif kind == 1:
        out = "|".join(model.stream(prompt, max_new_tokens=20, temperature=0.8,
                                    seed=i))
    elif kind == 2:
        out = model.chat([{"role": "user", "content": prompt}], max_new_tokens=16,
                         temperature=0.7, seed=i)
    else:
        out = model.score(prompt + " the end of the story").token_logprobs.tobytes()
    stats = model.last_stats          # per thread: this thread's own call
    return out, stats["prompt_tokens"], stats["gen_tokens"]


def test_generation_model_in_eight_threads(tiny):
    serial = [model_call(tiny, i) for i in range(N_THREADS)]
    for _ in range(2):
        assert run_in_threads(lambda i: model_call(tiny, i), N_THREADS) == serial


@pytest.mark.model
def test_smollm2_eight_threads_match_the_serial_run(smollm2_path):
    model = Model.load(smollm2_path, n_threads=1)
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time",
               "The best way to learn", "1, 2, 3, 4,", "Water boils at",
               "My favourite colour is", "import numpy as np"]
    prompts = [model.encode(p) for p in prompts]
    transformer = model.transformer
    serial = [generate_tokens(transformer, prompts[i], i, 16) for i in range(N_THREADS)]
    threaded = run_in_threads(
        lambda i: generate_tokens(transformer, prompts[i], i, 16), N_THREADS)
    check_same(serial, threaded)


# ---------------------------------------------------------------- one state

@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() on this platform")
def test_a_forked_child_runs_instead_of_hanging(small):
    """libgomp cannot follow fork(): a child's first region with several
    threads waits forever for the parent's pool.  fastattn runs the child's
    regions on one thread instead (fastattn/_fork.py); the numbers are the
    parent's, since no result depends on the thread count."""
    from fastattn import _kernels
    config, model = small
    ids = random_ids(config, 21, seed=4)
    want = model.forward(ids)                      # a 2-thread team has run
    rng = np.random.default_rng(5)
    w = random_weights(config, qtype=Q4_1, seed=6)["blk.0.ffn_up.weight"]
    x = rng.standard_normal((9, w.shape[1])).astype(np.float32)
    want_mm = _kernels.matmul(w, x, n_threads=2)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        status = 1
        try:
            os.close(read_fd)
            got = model.forward(ids)
            got_mm = _kernels.matmul(w, x, n_threads=2)
            ok = np.array_equal(got, want) and np.array_equal(got_mm, want_mm)
            os.write(write_fd, b"same" if ok else b"different")
            status = 0
        finally:
            os._exit(status)
    os.close(write_fd)
    deadline = time.monotonic() + 120
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung")
        time.sleep(0.05)
    with os.fdopen(read_fd, "rb") as f:
        said = f.read()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    assert said == b"same"
    # the parent keeps its threads
    np.testing.assert_array_equal(model.forward(ids), want)


def test_a_state_in_two_threads_is_refused(small):
    """While one thread runs a prefill, another thread's use of that state is
    refused, and the prefill still gives the answer it gives alone."""
    config, model = small
    ids = random_ids(config, 120, seed=7)
    want = model.forward(ids)[-1]
    for _ in range(5):
        state = model.new_state()
        result = {}
        worker = threading.Thread(
            target=lambda: result.setdefault("logits", model.prefill(state, ids)))
        refusals = []
        worker.start()
        while worker.is_alive():
            # assigning n_past its own value: a no-op unless the state is busy
            try:
                state._state.n_past = state._state.n_past
            except FastAttnError as e:
                refusals.append(str(e))
                break
        worker.join()
        np.testing.assert_array_equal(result["logits"], want)
        if refusals:
            break
    assert refusals and re.search("another thread|while it runs", refusals[0]), refusals
    with pytest.raises(FastAttnError, match="already running"):
        busy_state_decode(model)


def busy_state_decode(model):
    """decode on a state whose prefill is running in another thread."""
    state = model.new_state()
    ids = np.arange(120) % model.config.n_vocab
    worker = threading.Thread(target=model.prefill, args=(state, ids))
    worker.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                state._state.n_past = state._state.n_past
            except FastAttnError:
                return model.decode(state, 0)       # busy now: must be refused
            if not worker.is_alive():
                state = model.new_state()           # missed it: try again
                worker.join()
                worker = threading.Thread(target=model.prefill, args=(state, ids))
                worker.start()
        raise AssertionError("never caught the state busy")
    finally:
        worker.join()


# ------------------------------------------------------------------- the GIL

class Counter(threading.Thread):
    """Counts as fast as pure Python can; `value` is read from other threads."""

    def __init__(self):
        super().__init__(daemon=True)
        self.value = 0
        self.running = True

    def run(self):
        n = 0
        while self.running:
            n += 1
            self.value = n


def counted(counter, call):
    """(counts per second while call() ran, its seconds)."""
    before, start = counter.value, time.perf_counter()
    call()
    seconds = time.perf_counter() - start
    return (counter.value - before) / seconds, seconds


def test_prefill_releases_the_gil():
    config = random_config("llama", n_vocab=256, n_ctx=1024, n_embd=256, n_layer=4,
                           n_head=4, n_ff=512)
    model = Transformer(config, random_weights(config, seed=1), n_threads=1)
    ids = random_ids(config, 1024)
    text = "a" * 12_000_000
    counter = Counter()
    counter.start()
    try:
        time.sleep(0.05)
        free, _ = counted(counter, lambda: time.sleep(0.3))
        during_prefill, seconds = counted(counter, lambda: model.forward(ids))
        # a C call that keeps the GIL, as a control: re never releases it
        during_re, re_seconds = counted(counter, lambda: re.sub("a", "b", text))
    finally:
        counter.running = False
        counter.join()
    print(f"\ncounter: {free:.3g}/s alone, {during_prefill:.3g}/s during a "
          f"{seconds:.2f} s prefill, {during_re:.3g}/s during a {re_seconds:.2f} s "
          f"re.sub that holds the GIL")
    assert seconds > 0.05 and re_seconds > 0.05
    assert during_prefill > 0.2 * free
    assert during_re < 0.1 * free


def test_two_prefills_overlap():
    """Two threads prefilling at once: each gets its lone answer; their CPU
    seconds together exceed the wall time they took (reported, not asserted:
    a loaded machine can starve one of them)."""
    config = random_config("llama", n_vocab=256, n_ctx=512, n_embd=256, n_layer=4,
                           n_head=4, n_ff=512)
    model = Transformer(config, random_weights(config, seed=2), n_threads=1)
    prompts = [random_ids(config, 512, seed=s) for s in (1, 2)]
    want = [model.forward(p) for p in prompts]

    def work(i):
        cpu = time.thread_time()
        got = model.forward(prompts[i])
        return got, time.thread_time() - cpu

    start = time.perf_counter()
    results = run_in_threads(work, 2)
    wall = time.perf_counter() - start
    for (got, _), w in zip(results, want):
        np.testing.assert_array_equal(got, w)
    cpu = sum(c for _, c in results)
    print(f"\ntwo prefills: {cpu:.2f} CPU s in {wall:.2f} wall s "
          f"({cpu / wall:.2f} cores busy)")


# ------------------------------------------------------------------- Ctrl-C

def write_endless_llama(path, **dims):
    """write_tiny_llama's model, except that it never ends a turn: the output
    head's rows of the three specials (eos and end of turn) are zero, so
    their logit 0 loses to the largest of ~300 random logits."""
    from fastattn.loaders.gguf import scan_layout
    path = write_tiny_llama(path, **dims)
    with open(path, "r+b") as f:
        layout = scan_layout(f.read(), str(path))
        head = next(t for t in layout.tensors if t.name == "output.weight")
        f.seek(layout.data_start + head.offset)
        f.write(bytes(3 * head.ne[0] * 4))          # F32 rows 0, 1, 2
    return path


@pytest.fixture(scope="module")
def slow_gguf(tmp_path_factory):
    """A model big enough that 8000 tokens take seconds, so that Ctrl-C lands
    mid-run; it never stops by itself."""
    return str(write_endless_llama(tmp_path_factory.mktemp("slow") / "slow.gguf",
                                   n_embd=256, n_layer=4, n_head=4, n_kv_head=2,
                                   n_ff=512, n_ctx=8192))


def read_pty(fd, until, timeout):
    """Bytes from the pty master until until(bytes read) or EOF or timeout."""
    out = b""
    deadline = time.monotonic() + timeout
    while not until(out):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out; read {out[-400:]!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError:                 # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    return out


def test_ctrl_c_on_a_terminal(slow_gguf):
    import pty
    prompt = "Once upon a time"
    pid, fd = pty.fork()
    if pid == 0:                         # the child: fastattn on the terminal
        os.environ["PYTHONPATH"] = PACKAGE_ROOT
        os.execv(sys.executable, [sys.executable, "-m", "fastattn", "generate", "-m",
                                  slow_gguf, "-p", prompt, "-n", "8000", "--temp", "0",
                                  "-t", "1"])
    try:
        # wait for the prompt and 20 more characters, then press Ctrl-C
        head = read_pty(fd, lambda out: len(out.split(prompt.encode(), 1)[-1]) >= 20
                        if prompt.encode() in out else False, timeout=120)
        pressed = time.monotonic()
        os.write(fd, b"\x03")
        rest = read_pty(fd, lambda out: False, timeout=60)
        latency = time.monotonic() - pressed
        _, status = os.waitpid(pid, 0)
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)
    out = (head + rest).decode("utf-8", errors="replace").replace("\r\n", "\n")
    print(f"\nCtrl-C to exit: {latency * 1e3:.0f} ms")
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 130, (status, out[-800:])
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-2000:]
    generated = (head + rest).split(prompt.encode(), 1)[1].split(b"fastattn: ")[0]
    assert len(generated) >= 20                      # what was generated is there
    assert "eval time" in out                        # and the timings after it
    assert latency < 10


def sigint_latency(call, after):
    """Send this process SIGINT `after` seconds into call(); -> (seconds from the
    signal to the KeyboardInterrupt, seconds call() ran in all)."""
    assert threading.current_thread() is threading.main_thread()
    sent = []

    def fire():
        sent.append(time.perf_counter())
        os.kill(os.getpid(), signal.SIGINT)

    timer = threading.Timer(after, fire)
    start = time.perf_counter()
    timer.start()
    try:
        call()
    except KeyboardInterrupt:
        caught = time.perf_counter()
    else:
        timer.cancel()
        raise AssertionError(f"call() ended after {time.perf_counter() - start:.2f} s "
                             f"without the interrupt")
    finally:
        timer.join()
    return caught - sent[0], caught - start


def test_ctrl_c_between_tokens_is_prompt(slow_gguf):
    model = Model.load(slow_gguf, n_threads=1)
    for _ in model.stream("warm up", max_new_tokens=4, temperature=0):
        pass
    per_token = model.last_stats["gen_s"] / max(1, model.last_stats["gen_tokens"])

    def decode_many():
        for _ in model.stream("Once upon a time", max_new_tokens=8000, temperature=0):
            pass

    latency, _ = sigint_latency(decode_many, after=0.5)
    print(f"\nSIGINT while decoding: KeyboardInterrupt after {latency * 1e3:.1f} ms "
          f"({per_token * 1e3:.2f} ms per token)")
    assert latency < max(0.5, 20 * per_token)
    assert model.last_stats["gen_tokens"] > 0
    assert model.last_stats["stopped"] == "interrupted"


@pytest.mark.model
def test_ctrl_c_during_a_long_prefill(smollm2_path):
    """How long a SIGINT waits while a long prompt is prefilled.  The prefill
    is one call into C, which does not look at signals: the KeyboardInterrupt
    comes when it returns, so it can wait for the rest of the prompt."""
    model = Model.load(smollm2_path, n_threads=os.cpu_count())
    ids = (model.encode(" The quick brown fox jumps over the lazy dog.") * 100)[:1024]
    start = time.perf_counter()
    model.transformer.prefill(model.transformer.new_state(len(ids)), ids)
    prefill_s = time.perf_counter() - start

    def prefill():
        for _ in model.stream(ids, max_new_tokens=1, temperature=0):
            pass

    latency, ran = sigint_latency(prefill, after=0.3)
    print(f"\nSIGINT 0.3 s into a {len(ids)}-token prefill of {prefill_s:.2f} s: "
          f"KeyboardInterrupt after {latency:.2f} s")
    assert model.last_stats["stopped"] == "interrupted"
    assert latency < 1.5 * prefill_s + 1.0
