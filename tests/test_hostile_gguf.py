"""Hostile GGUF files (tests/hostile.py) must each raise the fastattn error
meant for them, with a message naming the file and the problem: no other
exception, no hang, no huge allocation."""
import json
import os
import random
import signal
import subprocess
import sys
from contextlib import contextmanager

import pytest

from fastattn.errors import FastAttnError, ModelFileError
from fastattn.loaders.gguf import load_gguf

import hostile

CASES = hostile.cases()
SMALL = [c for c in CASES if not c.big]
BIG = [c for c in CASES if c.big]
ADDRESS_SPACE_LIMIT = 4 << 30


@contextmanager
def time_limit(seconds):
    """Fail instead of hanging (SIGALRM; pytest runs tests in the main thread)."""
    def expired(signum, frame):
        raise TimeoutError(f"no answer within {seconds} s")
    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return hostile.write_all(tmp_path_factory.mktemp("hostile"))


def check_message(case, path, message):
    assert path in message, message
    for words in case.words:
        assert any(w in message for w in words.split("|")), (words, message)


def test_enough_distinct_cases():
    names = [c.name for c in CASES]
    assert len(set(names)) == len(names)
    assert len(CASES) >= 35
    assert len({c.data for c in CASES}) == len(CASES)
    assert len(BIG) >= 8


def test_the_file_they_break_loads(tmp_path):
    path = tmp_path / "tiny.gguf"
    path.write_bytes(hostile.tiny_llama().build()[0])
    model = load_gguf(path)
    assert model.config.n_vocab == hostile.TINY["n_vocab"]
    assert len(model.weights) == 11


@pytest.mark.parametrize("case", SMALL, ids=[c.name for c in SMALL])
def test_hostile_file(case, files):
    path = files[case.name]
    with time_limit(20), pytest.raises(FastAttnError) as info:
        load_gguf(path)
    assert type(info.value) is case.error, info.value
    check_message(case, path, str(info.value))


# Run in a child process with its address space capped, so that a loader that
# believed a declared size would die of MemoryError there instead of taking the
# machine's memory.
CHILD = r"""
import json, resource, sys
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from fastattn.loaders.gguf import load_gguf
try:
    load_gguf(sys.argv[1])
    result = {"error": None, "message": ""}
except BaseException as e:
    result = {"error": type(e).__name__, "message": str(e)}
print(json.dumps(result))
"""


def run_limited(path, timeout=60):
    import fastattn
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastattn.__file__)))  # the fastattn under test
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", CHILD, path, str(ADDRESS_SPACE_LIMIT)],
                          capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", BIG, ids=[c.name for c in BIG])
def test_huge_declared_size_under_memory_limit(case, files):
    path = files[case.name]
    result = run_limited(path)
    assert result["error"] == case.error.__name__, result
    check_message(case, path, result["message"])


def test_every_prefix_of_the_header_is_refused(tmp_path):
    """The valid file cut after every byte up to its data section."""
    data, marks = hostile.tiny_llama().build()
    data_start = dict(marks)["at data start"]
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:data_start])
    accepted = []
    with time_limit(120):
        for n in range(data_start, -1, -1):
            os.truncate(path, n)      # cheaper than writing 2000 files
            try:
                load_gguf(path)
                accepted.append(n)
            except ModelFileError as e:
                assert "cut.gguf" in str(e)
    assert accepted == []


def test_random_byte_changes_never_crash(tmp_path):
    """Bytes of the header changed at random (seeded): the file loads or raises a
    fastattn error; nothing else."""
    data, marks = hostile.tiny_llama().build()
    data_start = dict(marks)["at data start"]
    rng = random.Random(1234)
    path = tmp_path / "flipped.gguf"
    outcomes = {"loaded": 0, "refused": 0}
    with time_limit(120):
        for _ in range(400):
            mutated = bytearray(data)
            for _ in range(rng.randint(1, 4)):
                at = rng.randrange(data_start)
                mutated[at] = rng.choice([0x00, 0xFF, 0x7F, 0x80, rng.randrange(256)])
            path.write_bytes(bytes(mutated))
            try:
                load_gguf(path)
                outcomes["loaded"] += 1
            except FastAttnError as e:
                assert str(path) in str(e), e
                outcomes["refused"] += 1
    assert outcomes["refused"] > 100, outcomes


@pytest.mark.slow
def test_array_just_under_the_cap_loads_in_bounded_time(tmp_path):
    """The worst a file within the limits can make GGUFReader do: about a
    million array items (a few seconds, a few hundred MB), not more."""
    import struct
    from fastattn.loaders.gguf import MAX_ARRAY_ITEMS
    g = hostile.tiny_llama()
    used = sum(struct.unpack_from("<Q", raw, 4)[0] for _, t, raw in g.kvs
               if t == hostile.ARR)
    n = MAX_ARRAY_ITEMS - used
    g.kvs.append(("general.junk", hostile.ARR,
                  struct.pack("<IQ", hostile.U8, n) + bytes(n)))
    path = tmp_path / "many_items.gguf"
    path.write_bytes(g.build()[0])
    result = run_limited(str(path), timeout=300)
    assert result == {"error": None, "message": ""}
