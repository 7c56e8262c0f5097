"""Run one fuzz harness (tests/fuzz/harnesses.py).

    python tests/fuzz/run.py HARNESS [--iterations N] [--seconds S] [--seed K]
    python tests/fuzz/run.py HARNESS --engine atheris --seconds 3600
    python tests/fuzz/run.py HARNESS --reproduce crash-file

Two engines run the same harness:

  python   (default) a seeded mutation loop in pure Python: file harnesses
           start from their valid seed files and change a few bytes, fields
           or lengths at a time (most changes land in the header, before the
           tensor data); the other harnesses read fresh random bytes.  The
           same --seed gives the same inputs, so a finding replays exactly.
  atheris  libFuzzer through atheris (pip install atheris), coverage-guided
           over fastattn's Python code; libFuzzer flags after `--`.

An input that raises anything but what the harness allows, breaks one of its
invariants, or runs longer than --input-timeout seconds is a finding: it is
written to --artifacts (default ./fuzz-artifacts), the traceback is printed,
and the run exits with status 1.  A crash in C kills the process (ASan or
the kernel prints why); run under a subprocess to tell it from a finding.
The last line printed is a JSON summary: harness, engine, iterations,
seconds, and the tally of outcomes.

--rlimit-as BYTES caps the address space (default 6 GiB; 0: no cap), so a
hostile size that the code believes fails as MemoryError here instead of
taking the machine's memory.  Under AddressSanitizer (libasan in LD_PRELOAD),
which reserves terabytes of address space, there is no cap.
"""
import argparse
import collections
import faulthandler
import hashlib
import json
import logging
import os
import random
import resource
import signal
import struct
import sys
import time
import traceback
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
try:                                   # the installed (or PYTHONPATH) fastattn first,
    import fastattn  # noqa: F401     # the checkout's own only when there is none
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))


def instrument_fastattn():
    """Under atheris, import fastattn's modules with coverage instrumentation:
    this must come before anything else imports them."""
    import atheris
    with atheris.instrument_imports(include=["fastattn"]):
        import fastattn.generation       # noqa: F401
        import fastattn.loaders.gguf     # noqa: F401
        import fastattn.loaders.hf       # noqa: F401
        import fastattn.loaders.safetensors   # noqa: F401
        import fastattn.model            # noqa: F401
        import fastattn.sampling         # noqa: F401
        import fastattn.tokenizer        # noqa: F401


if "atheris" in sys.argv[1:]:
    instrument_fastattn()

import harnesses  # noqa: E402


class InputTimeout(Exception):
    """An input ran longer than --input-timeout (raised from the alarm handler)."""


# ---------------------------------------------------------------- mutations

INTERESTING_U32 = [0, 1, 2, 3, 4, 7, 8, 9, 12, 13, 31, 32, 64, 255, 256, 0x7FFF, 0xFFFF,
                   0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]
INTERESTING_U64 = [0, 1, 4, 32, 0x100000000, 0x7FFFFFFFFFFFFFFF, 0x8000000000000000,
                   0xFFFFFFFFFFFFFFFF, 0xFFFFFFFFFFFFFFE0, 1 << 40, 1 << 62]


def mutate(data: bytes, header_len: int, rng: random.Random, others) -> bytes:
    """A few random changes to data; 80% of them inside data[:header_len]."""
    out = bytearray(data)
    for _ in range(rng.choice([1, 1, 1, 2, 2, 3, 4, 8])):
        if not out:
            out += bytes(rng.randrange(1, 64))
            continue
        limit = header_len if rng.random() < 0.8 and header_len > 0 else len(out)
        at = rng.randrange(min(limit, len(out)))
        op = rng.randrange(11)
        if op == 0:
            out[at] ^= 1 << rng.randrange(8)
        elif op == 1:
            out[at] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)])
        elif op in (2, 3):
            value = rng.choice(INTERESTING_U32)
            if rng.random() < 0.3:
                value = (value + rng.randrange(-2, 3)) % 2**32
            out[at:at + 4] = struct.pack("<I", value)
        elif op in (4, 5):
            value = rng.choice(INTERESTING_U64 + [len(out), len(out) - at,
                                                  rng.randrange(1 << 20)])
            out[at:at + 8] = struct.pack("<Q", value % 2**64)
        elif op == 6:
            del out[rng.randrange(len(out)):]                       # truncate
        elif op == 7:
            n = rng.randrange(1, 17)
            out[at:at] = bytes(rng.randrange(256) for _ in range(n))  # insert
        elif op == 8:
            del out[at:at + rng.randrange(1, 33)]                    # delete
        elif op == 9:
            n = rng.randrange(1, 65)
            out[at:at] = out[at:at + n]                              # duplicate
        else:
            other = rng.choice(others)                               # splice
            if other:
                j = rng.randrange(len(other))
                n = rng.randrange(1, 65)
                out[at:at + n] = other[j:j + n]
    return bytes(out)


def random_bytes(rng: random.Random) -> bytes:
    n = rng.choice([8, 32, 64, 128, 256, 512, 1024])
    return rng.randbytes(rng.randrange(n + 1))


# ------------------------------------------------------------------- running

def save_artifact(folder, harness, data):
    os.makedirs(folder, exist_ok=True)
    digest = hashlib.sha1(data).hexdigest()[:16]
    path = os.path.join(folder, f"{harness}-{digest}.bin")
    with open(path, "wb") as f:
        f.write(data)
    return path


def call(fn, data, timeout):
    """fn(data) under a soft time limit; the outcome label."""
    if timeout:
        signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        return fn(data)
    finally:
        if timeout:
            signal.setitimer(signal.ITIMER_REAL, 0)


def run_python(args, fn):
    rng = random.Random(args.seed)
    seeds = harnesses.FILE_SEEDS.get(args.harness)
    seeds = seeds() if seeds else None
    others = [s for s, _ in seeds] if seeds else []
    tally = collections.Counter()
    findings = {}
    start = time.monotonic()
    n = 0
    while (args.iterations is None or n < args.iterations) and (
            args.seconds is None or time.monotonic() - start < args.seconds):
        if seeds:
            base, header_len = seeds[rng.randrange(len(seeds))]
            data = base if n < len(seeds) else mutate(base, header_len, rng, others)
        else:
            data = random_bytes(rng)
        n += 1
        try:
            # the first input pays for lazy imports: no time limit on it
            outcome = call(fn, data, args.input_timeout if n > 1 else None)
        except BaseException as e:          # noqa: B902 - every escape is a finding
            if isinstance(e, KeyboardInterrupt):
                raise
            # one report per place it went wrong
            frames = traceback.extract_tb(e.__traceback__)
            where = [f for f in frames if f.name != "check"][-1]
            key = (type(e).__name__, where.filename, where.lineno)
            if key in findings:
                tally["finding:" + type(e).__name__] += 1
                continue
            path = save_artifact(args.artifacts, args.harness, data)
            findings[key] = path
            print(f"FINDING in {args.harness} at iteration {n} (seed {args.seed}): "
                  f"{type(e).__name__}: {str(e)[:2000]}", file=sys.stderr)
            traceback.print_exc()
            print(f"input saved to {path}; replay with: python {sys.argv[0]} "
                  f"{args.harness} --reproduce {path}", file=sys.stderr)
            tally["finding:" + type(e).__name__] += 1
            if not args.keep_going:
                break
            continue
        tally[outcome] += 1
    summary(args, "python", n, start, tally, findings=list(findings.values()))
    return 1 if findings else 0


def run_atheris(args, fn, extra):
    import atheris
    import tempfile
    seeds = harnesses.FILE_SEEDS.get(args.harness)
    corpus = args.corpus or tempfile.mkdtemp(prefix=f"fuzz-{args.harness}-")
    os.makedirs(corpus, exist_ok=True)
    max_len = 4096
    if seeds:
        for i, (data, _) in enumerate(seeds()):
            with open(os.path.join(corpus, f"seed{i}"), "wb") as f:
                f.write(data)
            max_len = max(max_len, len(data) + 1024)
    os.makedirs(args.artifacts, exist_ok=True)
    argv = [sys.argv[0], corpus, f"-artifact_prefix={args.artifacts}/{args.harness}-",
            f"-max_len={max_len}", f"-timeout={int(args.input_timeout or 60)}",
            f"-seed={args.seed}", "-rss_limit_mb=6144"]
    if args.seconds:
        argv.append(f"-max_total_time={int(args.seconds)}")
    if args.iterations:
        argv.append(f"-runs={args.iterations}")
    atheris.Setup(argv + extra, lambda data: fn(data))
    atheris.Fuzz()


def summary(args, engine, n, start, tally, findings=()):
    print(json.dumps({"harness": args.harness, "engine": engine, "seed": args.seed,
                      "iterations": n, "seconds": round(time.monotonic() - start, 2),
                      "outcomes": dict(tally.most_common()),
                      "findings": list(findings)}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("harness", choices=sorted(harnesses.HARNESSES))
    parser.add_argument("--engine", choices=["python", "atheris"], default="python")
    parser.add_argument("--iterations", type=int)
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--input-timeout", type=float, default=10.0)
    parser.add_argument("--rlimit-as", type=int, default=6 << 30)
    parser.add_argument("--artifacts", default="fuzz-artifacts")
    parser.add_argument("--corpus", help="atheris: corpus folder (kept between runs)")
    parser.add_argument("--reproduce", metavar="FILE", help="run one saved input")
    parser.add_argument("--keep-going", action="store_true",
                        help="python engine: go on after a finding (one report per "
                             "exception type and line)")
    args, extra = parser.parse_known_args()
    if extra and extra[0] == "--":
        extra = extra[1:]
    if args.iterations is None and args.seconds is None and not args.reproduce:
        args.iterations = 1000

    if "libasan" in os.environ.get("LD_PRELOAD", ""):
        args.rlimit_as = 0      # ASan's shadow memory needs terabytes of addresses
    if args.rlimit_as:
        resource.setrlimit(resource.RLIMIT_AS, (args.rlimit_as, args.rlimit_as))
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)    # "no tokenizer.ggml.pre" on every input

    if args.engine == "python":     # libFuzzer keeps SIGALRM for its -timeout
        def on_alarm(signum, frame):
            raise InputTimeout(f"input ran longer than {args.input_timeout} s")
        signal.signal(signal.SIGALRM, on_alarm)

    fn = harnesses.HARNESSES[args.harness]
    if args.input_timeout:
        # a hang in C cannot be interrupted by the soft alarm: dump every
        # thread's stack and exit if an input takes three times too long
        inner = fn

        def fn(data):
            faulthandler.dump_traceback_later(3 * args.input_timeout, exit=True)
            try:
                return inner(data)
            finally:
                faulthandler.cancel_dump_traceback_later()

    harnesses.prepare(args.harness)
    if args.reproduce:
        with open(args.reproduce, "rb") as f:
            data = f.read()
        print(call(fn, data, args.input_timeout))
        return 0
    if args.engine == "atheris":
        return run_atheris(args, fn, extra)
    return run_python(args, fn)


if __name__ == "__main__":
    sys.exit(main())
