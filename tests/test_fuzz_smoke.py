"""A short, seeded run of every fuzz harness (tests/fuzz/), and the bugs the
fuzzers found, each as a direct test.

Each harness runs in a child process (tests/fuzz/run.py, the pure-Python
engine), so that a crash in C fails its test instead of killing pytest; the
child's address space is capped, so a size believed from a hostile input
fails there as MemoryError (a finding) instead of taking the machine's memory.
The same seed gives the same inputs on every run.  The long runs (atheris,
minutes to hours) are in docs/HARDENING.md.
"""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from fastattn.errors import ModelFileError, TokenizerError
from fastattn.sampling import Sampler, SamplingError

import fastattn  # noqa: E402

RUN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fuzz", "run.py")
# The folder holding the fastattn being tested (site-packages once installed):
# child processes import that one, never the uncompiled source tree.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(fastattn.__file__)))

# harness: (iterations, outcomes the run must reach at least once: proof that
# the inputs get past the first check and exercise the code behind it)
BUDGET = {
    "gguf": (2000, {"generated", "refused:ModelFileError"}),
    "gguf_fields": (1200, {"ran", "refused:ModelFileError"}),
    "tokenizer": (4000, {"encoded", "decoded", "stream-decoded",
                         "refused:TokenizerError"}),
    "tokenizer_fields": (800, {"built", "refused:ModelFileError"}),
    "sampling": (5000, {"sampled", "refused:SamplingError", "refused:TypeError"}),
    "safetensors": (4000, {"read", "refused:ModelFileError"}),
    "safetensors_fields": (3000, {"read", "refused:ModelFileError"}),
}


@pytest.mark.parametrize("harness", sorted(BUDGET))
def test_fuzz_harness(harness, tmp_path):
    iterations, must_reach = BUDGET[harness]
    proc = subprocess.run(
        [sys.executable, RUN, harness, "--iterations", str(iterations), "--seconds",
         "120", "--seed", "20240601", "--artifacts", str(tmp_path), "--rlimit-as",
         str(4 << 30)],
        capture_output=True, text=True, timeout=400, cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT))
    assert proc.returncode == 0, (proc.stdout[-3000:] + proc.stderr[-6000:])
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\n{harness}: {summary['iterations']} inputs in {summary['seconds']} s: "
          f"{summary['outcomes']}")
    assert summary["findings"] == []
    assert summary["iterations"] > iterations // 4
    assert must_reach <= set(summary["outcomes"]), summary["outcomes"]


def test_a_finding_fails_the_run_and_is_saved(tmp_path):
    """The driver itself: an input that breaks an invariant is reported, saved
    and replayable (a deliberately broken harness, via an env hook)."""
    code = ("import sys, runpy; sys.argv = sys.argv[1:]; sys.path.insert(0, %r);"
            "import harnesses;"
            "harnesses.HARNESSES['sampling'] = lambda data: 1 / 0;"
            "runpy.run_path(%r, run_name='__main__')"
            % (os.path.dirname(RUN), RUN))
    proc = subprocess.run([sys.executable, "-c", code, RUN, "sampling", "--iterations",
                           "5", "--artifacts", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 1
    assert "FINDING in sampling" in proc.stderr and "ZeroDivisionError" in proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    saved = summary["findings"]
    assert len(saved) == 1 and os.path.exists(saved[0])


# ----------------------------------------------- what the fuzzers found

def test_safetensors_header_with_a_5001_digit_integer(tmp_path):
    from fastattn.loaders.safetensors import SafetensorsFile
    header = b'{"a": {"dtype": "F32", "shape": [1' + b"0" * 5000 + b'], ' \
             b'"data_offsets": [0, 4]}}'
    path = tmp_path / "big-int.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
    with pytest.raises(ModelFileError, match="header: invalid JSON") as info:
        SafetensorsFile(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("shape", [[0, 2**64], [2**70, 0], [0, 10**30], [1] * 65])
def test_safetensors_shape_numpy_cannot_hold(tmp_path, shape):
    """Few bytes (none with a zero dimension, one for 65 dimensions of 1), but
    a shape no numpy array can take: refused at open, not in array()."""
    from fastattn.loaders.safetensors import SafetensorsFile
    n = 0 if 0 in shape else 1
    header = json.dumps({"a": {"dtype": "U8", "shape": shape,
                               "data_offsets": [0, n]}}).encode()
    path = tmp_path / "shape.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(n))
    with pytest.raises(ModelFileError, match="field 'shape'") as info:
        SafetensorsFile(path).array("a")
    assert str(path) in str(info.value)


def test_token_text_with_a_lone_surrogate():
    from fastattn.tokenizer import Tokenizer
    with pytest.raises(ModelFileError, match="token 1 .* lone surrogate"):
        Tokenizer(["a", "\udc80b"], [], source="tokenizer.json")


@pytest.mark.parametrize("bad", [np.float32(2.0), np.float32(2.5), np.float64(1.0),
                                 np.float32("nan"), 2.0, True])
def test_decode_refuses_float_ids(bad):
    from fastattn.tokenizer import Tokenizer
    tok = Tokenizer(["a", "b", "c"], [])
    assert tok.decode([np.int64(2), np.array(1), 0]) == "cba"
    with pytest.raises(TokenizerError, match="not an integer"):
        tok.decode([0, bad])


@pytest.mark.parametrize("field,value", [("norm_eps", 1e-129), ("norm_eps", 1e-46),
                                         ("rope_theta", 1e39), ("rope_theta", 1e300)])
def test_config_values_float32_cannot_hold(field, value):
    from fastattn.testing import random_config
    with pytest.raises(ModelFileError, match=f"{field} = .* float32 range"):
        random_config(**{field: value})


def test_tiny_temperature_is_greedy():
    logits = np.array([1.0, 3.0, 2.0, 3.0 - 1e-6], dtype=np.float32)
    for t in (1e-310, 5e-324, 1e-40, 1e-20):
        sampler = Sampler(temperature=t, top_k=0, top_p=1.0, seed=0)
        assert {sampler.sample(logits) for _ in range(20)} == {1}


@pytest.mark.parametrize("penalty", [1e-300, 5e-324, 1e200, 1.7e308])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_extreme_repeat_penalty(penalty, dtype):
    """A penalty p applies logit / p (positive) or logit * p (negative) to the
    ids in the history: the result may be huge, never NaN, and a finite
    logit is never dropped as if banned."""
    logits = np.array([0.0, 2.0, -1.0, 1.0], dtype=dtype)
    sampler = Sampler(temperature=1e-3, top_k=0, top_p=1.0, repeat_penalty=penalty,
                      repeat_last_n=-1, seed=0)
    token = sampler.sample(logits, history=[0, 1, 2])
    if penalty < 1:
        assert token == 1               # 2 / tiny: the largest by far
    else:
        assert token == 3               # 2 / huge ~ 0 < 1: the unpenalized one wins
    assert sampler.sample(np.zeros(3, dtype), history=[0, 1, 2]) in (0, 1, 2)


@pytest.mark.parametrize("history", [[2**70], [-2**64], ["a"], "abc", [None]])
def test_history_that_is_not_ids(history):
    sampler = Sampler(repeat_penalty=1.1, seed=0)
    with pytest.raises(SamplingError, match="history"):
        sampler.sample(np.zeros(4, np.float32), history)


def test_sampled_token_can_have_a_nonzero_probability():
    """Every draw is a token whose probability exp(-(max - x) / T) is not 0."""
    rng = np.random.default_rng(0)
    for t in (1e-3, 0.1, 1.0):
        sampler = Sampler(temperature=t, top_k=0, top_p=1.0, seed=1)
        for _ in range(200):
            logits = rng.standard_normal(50).astype(np.float32) * 30
            token = sampler.sample(logits)
            assert (logits.max() - logits[token]) / t < 745 or math.isclose(
                logits[token], logits.max())
