"""The opt-in float16 KV cache (kv_cache="f16"): its rounding, its attention
kernels, the forward pass over it and its promises, its errors, its flag.

Not exact against the float32 cache (keys and values are rounded to halves),
but exact in every other sense: the f16 kernels widen each value and then do
the float32 kernels' arithmetic, so prefill + decode == one forward bit for
bit at any thread count or chunking, and the forward matches the numpy
reference that rounds K and V to np.float16 as closely as the f32 path
matches the plain reference."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import fastattn
import fastattn.model
from fastattn import _engine, reference
from fastattn import _kernels as K
from fastattn.errors import ArgumentError
from fastattn.generation import Model
from fastattn.model import Transformer
from fastattn.testing import random_config, random_ids, random_weights
from fastattn.weights import F32, Q4_1, Q8_0
from tinyllama_gguf import write_tiny_llama

LEVELS = K.available_simd_levels()
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(fastattn.__file__)))


# (family, config overrides): n_ctx 160 lets a sequence cross two 64-key chunks
CONFIGS = {
    "llama-gqa-4/2": ("llama", dict(n_embd=64, n_head=4, n_kv_head=2, n_layer=3,
                                    n_ff=96, n_ctx=160)),
    "gpt2-3layer": ("gpt2", dict(n_embd=96, n_head=6, n_layer=3, n_ff=128,
                                 n_vocab=101, n_ctx=160)),
    "llama-odd-gqa": ("llama", dict(n_embd=36, n_head=3, n_kv_head=1, n_layer=2,
                                    n_ff=50, n_vocab=61, rope_neox=True, n_ctx=160)),
}


def make(name, qtype=Q8_0, n_threads=2, **kw):
    family, over = CONFIGS[name]
    config = random_config(family, **over)
    weights = random_weights(config, qtype, seed=0)
    return config, weights, Transformer(config, weights, n_threads=n_threads,
                                        kv_cache="f16", **kw)


def assert_close_rel(got, want, rel=1e-4):
    """|got - want| <= rel * max|want| everywhere (tests/test_model.py's bound)."""
    scale = float(np.abs(want).max())
    err = float(np.abs(got - want).max())
    assert err <= rel * scale, f"max error {err:.3g} > {rel} * {scale:.3g}"


# ------------------------------------------------------------ the rounding


def test_to_f16_rounds_as_numpy_at_every_level():
    """The cache's converter (F16C at avx2 / avx512, portable C at generic) gives
    numpy's round-to-nearest-even bits, and the same NaN bits at every level."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2**32, size=400_000, dtype=np.uint64).astype(np.uint32)
    x = x.view(np.float32)
    edges = np.array([0.0, -0.0, 1.0, 65504.0, 65519.996, 65520.0, 65536.0, np.inf,
                      -np.inf, 2.0**-14, 2.0**-24, 2.0**-25, 2.0**-25 * 1.0000001,
                      3 * 2.0**-26, 1e-8, 0.1, 1 / 3], dtype=np.float32)
    tiny = (rng.random(50_000) * 2.0**-13).astype(np.float32)  # halves' subnormals
    x = np.concatenate([x, edges, -edges, tiny, -tiny])
    nan = np.isnan(x)
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).view(np.uint16)
    before = K.simd_level()
    try:
        bits = {}
        for lv in LEVELS:
            K.set_simd_level(lv)
            got = K.to_f16(x)
            assert got.dtype == np.float16 and got.shape == x.shape
            bits[lv] = got.view(np.uint16)
            np.testing.assert_array_equal(bits[lv][~nan], want[~nan])
            assert np.isnan(got[nan]).all()
        for lv in LEVELS:
            np.testing.assert_array_equal(bits[lv], bits["generic"])
    finally:
        K.set_simd_level(before)


# ------------------------------------------------------------ the kernels


@pytest.mark.parametrize("n_seq,pos0,n_head,n_kv_head,head_dim,n_ctx", [
    (1, 37, 9, 3, 64, 64),       # decode, SmolLM2 heads
    (7, 0, 9, 3, 64, 16),        # prefill, causal
    (5, 11, 4, 4, 13, 20),       # odd head_dim
    (70, 60, 4, 2, 16, 130),     # prefill crossing chunk boundaries
    (1, 300, 9, 3, 64, 301),     # decode over five key chunks, the last partial
    (2, 127, 18, 1, 8, 129),     # two head subgroups
    (1, 200, 2, 1, 300, 201),    # head_dim wider than one column step
])
def test_attention_f16_is_f32_over_the_widened_cache(level, n_seq, pos0, n_head,
                                                       n_kv_head, head_dim, n_ctx):
    """Bit for bit, at every level and thread count; and close to float64 maths."""
    rng = np.random.default_rng(n_seq * 7 + pos0)
    q = rng.standard_normal((n_seq, n_head * head_dim)).astype(np.float32) * 2
    k = rng.standard_normal((n_kv_head, n_ctx, head_dim)).astype(np.float16)
    v = rng.standard_normal((n_kv_head, n_ctx, head_dim)).astype(np.float16)
    k[:, pos0 + n_seq:] = np.nan  # never read
    v[:, pos0 + n_seq:] = np.nan
    got = K.attention(q, k, v, pos0, n_head, n_kv_head, n_threads=2)
    want = K.attention(q, k.astype(np.float32), v.astype(np.float32), pos0, n_head,
                       n_kv_head, n_threads=2)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(
        got, K.attention(q, k, v, pos0, n_head, n_kv_head, n_threads=1))
    assert np.isfinite(got).all()


def test_attention_f16_bad_input():
    q = np.zeros((1, 16), np.float32)
    k = np.zeros((2, 4, 8), np.float16)
    with pytest.raises(ValueError, match="v_cache: expected a numpy float16 array"):
        K.attention(q, k, np.zeros((2, 4, 8), np.float32), 0, 2, 2)
    with pytest.raises(ValueError, match="k_cache: array must be C-contiguous"):
        K.attention(q, np.zeros((2, 8, 4), np.float16).transpose(0, 2, 1), k, 0, 2, 2)


# ------------------------------------------------------------ the forward pass


@pytest.mark.parametrize("name,qtype", [("llama-gqa-4/2", Q8_0), ("gpt2-3layer", F32),
                                        ("llama-odd-gqa", F32),
                                        ("llama-gqa-4/2", Q4_1)])
def test_matches_the_f16_reference(name, qtype):
    config, weights, model = make(name, qtype)
    ids = random_ids(config, 23, seed=1)
    got = model.forward(ids)
    assert_close_rel(got, reference.forward(config, weights, ids, kv_cache="f16"))
    # and it is not the float32 cache's answer (the rounding is real)
    f32 = Transformer(config, weights, n_threads=2).forward(ids)
    assert not np.array_equal(got, f32)
    assert_close_rel(got, f32, rel=2e-3)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_then_decode_equals_one_forward_at_any_thread_count(name):
    config, weights, model = make(name, Q4_1 if "odd" not in name else F32, n_threads=1)
    ids = random_ids(config, 140, seed=5)                   # three 64-key chunks
    full = model.forward(ids)                                # [140, n_vocab]
    for n_threads in (1, 2, 3):
        model.n_threads = n_threads
        np.testing.assert_array_equal(model.forward(ids), full)
        state = model.new_state()
        assert state.kv_cache == "f16"
        np.testing.assert_array_equal(model.prefill(state, ids[:61]), full[60])
        for t in range(61, 140):
            np.testing.assert_array_equal(model.decode(state, int(ids[t])), full[t])


@pytest.mark.parametrize("name", ["gpt2-3layer", "llama-gqa-4/2"])
def test_pieces_and_internal_chunks_equal_one_pass(name, monkeypatch):
    config, weights, model = make(name, Q8_0)
    ids = random_ids(config, 100, seed=6)
    whole = model.forward(ids)
    state = model.new_state()
    parts = [model.prefill(state, ids[a:b], all_logits=True)
             for a, b in [(0, 7), (7, 8), (8, 70), (70, 71), (71, 100)]]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    monkeypatch.setattr(fastattn.model, "MAX_CHUNK", 8)     # chunks inside C
    state = model.new_state()
    np.testing.assert_array_equal(model.prefill(state, ids, all_logits=True), whole)


def test_every_simd_level(level):
    """At each level: the reference's numbers and prefill + decode == forward.
    (Levels differ from each other in rounding, as with the float32 cache.)"""
    config, weights, model = make("llama-gqa-4/2", Q8_0)
    ids = random_ids(config, 80, seed=9)
    full = model.forward(ids)
    assert_close_rel(full, reference.forward(config, weights, ids, kv_cache="f16"))
    state = model.new_state()
    model.prefill(state, ids[:70])
    for t in range(70, 80):
        np.testing.assert_array_equal(model.decode(state, int(ids[t])), full[t])


def test_a_state_of_either_type_on_one_model():
    config, weights, model = make("llama-gqa-4/2", Q8_0)
    f32 = Transformer(config, weights, n_threads=2)
    ids = random_ids(config, 30, seed=3)
    state = model.new_state(40, kv_cache="f32")
    assert state.kv_cache == "f32" and "kv_cache='f32'" in repr(state)
    np.testing.assert_array_equal(model.prefill(state, ids, all_logits=True),
                                  f32.forward(ids))
    state = f32.new_state(40, kv_cache="f16")
    np.testing.assert_array_equal(f32.prefill(state, ids, all_logits=True),
                                  model.forward(ids))


def test_cache_bytes_halve():
    config, _, _ = make("llama-gqa-4/2")
    kv32, scratch32 = _engine.state_bytes(config, 160, 256)
    kv16, scratch16 = _engine.state_bytes(config, 160, 256, 1)
    assert kv32 == 2 * 3 * 160 * 2 * 16 * 4 and kv16 * 2 == kv32
    assert scratch16 == scratch32


# ------------------------------------------------------------ errors


def test_bad_values(tmp_path):
    config, weights, model = make("llama-gqa-4/2")
    allowed = r"kv_cache must be one of \['f16', 'f32'\]"
    for bad in ("f8", "F16", "bf16", None, 1):
        with pytest.raises(ValueError, match=allowed):
            Transformer(config, weights, kv_cache=bad)
    with pytest.raises(ValueError, match=r"kv_cache must be one of \['f16', 'f32'\], "
                                         r"got 'q8'"):
        model.new_state(kv_cache="q8")
    with pytest.raises(ValueError, match="kv_cache must be one of"):
        reference.forward(config, weights, [1, 2], kv_cache="f8")
    with pytest.raises(ValueError, match=r"kv_type must be one of \[0, 1\]"):
        _engine.State(model._engine, 16, 8, 2)
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"max_chunk must be at least 1, got {bad}"):
            _engine.State(model._engine, 16, bad)
    # checked before the file is read: a missing file is not the error
    with pytest.raises(ValueError, match="kv_cache must be one of"):
        Model.load(str(tmp_path / "missing.gguf"), kv_cache="half")


def test_mode_attributes_are_checked():
    config, weights, model = make("llama-gqa-4/2")
    # the cache type may change between states; a bad one fails at the
    # assignment, not later inside new_state
    model.kv_cache = "f16"
    assert model.new_state(8).kv_cache == "f16"
    with pytest.raises(ArgumentError, match="got 'bogus'"):
        model.kv_cache = "bogus"
    assert model.kv_cache == "f16" and model.new_state(8).kv_cache == "f16"
    # the activation mode is fixed at build time (the engine packed for it):
    # assigning to it would be silently ignored, so it cannot be assigned
    with pytest.raises(AttributeError):
        model.activations = "q8"
    assert model.activations == "f32"
    for bad in ("q4", ["q8"], None):
        with pytest.raises(ArgumentError, match="activations must be one of"):
            Transformer(config, weights, activations=bad)


# ------------------------------------------------------------ the command line


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kv16")
    return str(write_tiny_llama(folder / "tiny.gguf", n_ctx=256))


def run(args):
    env = dict(os.environ, PYTHONPATH=PACKAGE_ROOT, PYTHONIOENCODING="utf-8")
    return subprocess.run([sys.executable, "-m", "fastattn", *args],
                          capture_output=True, text=True, env=env, timeout=120,
                          cwd=os.path.dirname(PACKAGE_ROOT))


def test_cli_flag(tiny):
    prompt = "the quick brown fox"
    r = run(["generate", "-m", tiny, "-p", prompt, "-n", "12", "--temp", "0", "-t", "1",
             "--kv-cache", "f16"])
    assert r.returncode == 0, r.stderr
    model = Model.load(tiny, n_threads=1, kv_cache="f16")
    want = model.generate(prompt, max_new_tokens=12, temperature=0)
    assert r.stdout == prompt + want + "\n"
    assert re.search(r"^kv_cache\s+= f16$", r.stderr, re.M)
    r = run(["score", os.devnull, "-m", tiny, "--kv-cache", "f8"])
    assert r.returncode == 2 and "invalid choice: 'f8'" in r.stderr
    r = run(["chat", "--help"])
    assert "--kv-cache {f32,f16}" in r.stdout and "half precision" in r.stdout


# ------------------------------------------------------------ the real model


@pytest.mark.model
def test_smollm2_divergence_from_the_f32_cache(smollm2_path):
    """Measured (f32 activations): max |dlogit| 0.024 over a 256-token prompt
    (logits up to 36), the same argmax at all 256 positions, the same 64 greedy
    tokens.  The bounds leave a margin of about 4x."""
    model = Model.load(smollm2_path, n_threads=2)
    text = ("The history of the lighthouse begins in the ancient world, when fires "
            "were lit on hilltops to guide ships into harbour. The most famous of "
            "these was the Pharos of Alexandria, built in the third century BC, which "
            "stood for more than a thousand years. In the centuries that followed, "
            "towers of stone and brick rose along the coasts of Europe, each with a "
            "keeper who tended the flame through the night. ")
    ids = model.encode(text * 8)[:256]
    assert len(ids) == 256
    tr = model.transformer
    logits, greedy = {}, {}
    for kv in ("f32", "f16"):
        state = tr.new_state(256 + 64, kv_cache=kv)
        logits[kv] = tr.prefill(state, ids, all_logits=True)   # [256, n_vocab]
        last, out = logits[kv][-1], []
        for _ in range(64):
            out.append(int(np.argmax(last)))
            last = tr.decode(state, out[-1])
        greedy[kv] = out
    d = np.abs(logits["f16"] - logits["f32"])
    assert 0 < d.max() <= 0.1, d.max()
    agree = (logits["f16"].argmax(1) == logits["f32"].argmax(1)).mean()
    assert agree >= 0.98, agree
    assert greedy["f16"][:48] == greedy["f32"][:48]
