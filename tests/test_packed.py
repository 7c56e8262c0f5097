"""Panel-packed weights (csrc/packed.c): the products a Model runs.

What must hold: packed products agree with a float64 product of the
dequantized weight; each output is the same bits whatever the number of
tokens in the call, the thread count and the SIMD level (prefill == decode
rests on this); rows past the last full panel come out right; weights that
cannot be packed say so.
"""
import numpy as np
import pytest

from fastattn import _kernels as K
from fastattn import weights as W

LEVELS = K.available_simd_levels()
TYPES = [W.F32, W.F16, W.BF16, W.Q8_0, W.Q4_0, W.Q4_1]
# (n_out, n_in): a partial panel, exact panels, odd panel counts, long rows
SHAPES = [(37, 64), (48, 96), (16, 32), (1, 32), (100, 1536), (200, 576)]


@pytest.fixture
def level():
    before = K.simd_level()
    yield
    K.set_simd_level(before)


def _case(qtype, n_out, n_in, n_seq, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_out, n_in)).astype(np.float32)
    data = W.quantize(w, qtype)
    x = rng.standard_normal((n_seq, n_in)).astype(np.float32)
    return (data, qtype, (n_out, n_in)), x


def _reference(wt, x):
    data, qtype, shape = wt
    deq = W.dequantize(data, qtype, shape).astype(np.float64)
    return x.astype(np.float64) @ deq.T


@pytest.mark.parametrize("qtype", TYPES, ids=W.type_name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_packed_matches_float64(level, qtype, shape):
    wt, x = _case(qtype, *shape, n_seq=9)
    ref = _reference(wt, x)
    scale = np.abs(ref).max()
    results = {}
    for lv in LEVELS:
        K.set_simd_level(lv)
        y = K.matmul(wt, x, packed=True)
        assert y.shape == ref.shape
        err = np.abs(y - ref).max() / scale
        assert err < 2e-6, (lv, err)
        results[lv] = y
    # every level runs the same chain of fused multiply-adds per output
    for lv, y in results.items():
        np.testing.assert_array_equal(y, results[LEVELS[0]], err_msg=f"level {lv}")


@pytest.mark.parametrize("qtype", TYPES, ids=W.type_name)
def test_packed_same_bits_for_any_call_shape(level, qtype):
    wt, x = _case(qtype, 200, 576, n_seq=23, seed=1)
    for lv in LEVELS:
        K.set_simd_level(lv)
        whole = K.matmul(wt, x, packed=True, n_threads=1)
        one_by_one = np.stack([K.matmul(wt, x[s], packed=True) for s in range(len(x))])
        np.testing.assert_array_equal(whole, one_by_one, err_msg=f"{lv}: n_seq changed bits")
        for threads in (2, 3, 5):
            np.testing.assert_array_equal(
                whole, K.matmul(wt, x, packed=True, n_threads=threads),
                err_msg=f"{lv}: {threads} threads changed bits")
        pieces = np.concatenate([K.matmul(wt, x[a:b], packed=True)
                                 for a, b in ((0, 5), (5, 6), (6, 23))])
        np.testing.assert_array_equal(whole, pieces, err_msg=f"{lv}: chunks changed bits")


def test_packed_and_unpacked_agree_in_rounding_only():
    wt, x = _case(W.Q4_1, 576, 1536, n_seq=4, seed=2)
    a = K.matmul(wt, x)
    b = K.matmul(wt, x, packed=True)
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-6 * np.abs(a).max())


def test_packed_bytes():
    for qtype, n_in, per_panel in [(W.F32, 64, 64 * 16 * 4), (W.F16, 64, 64 * 32),
                                   (W.Q8_0, 64, 2 * 544), (W.Q4_0, 64, 2 * 288),
                                   (W.Q4_1, 64, 2 * 320)]:
        wt, _ = _case(qtype, 37, n_in, 1)
        assert K.packed_bytes(wt) == 3 * per_panel  # 37 rows -> 3 panels
    # a block row longer than the packer takes stays unpacked, and says so
    n_in = 32 * 8193
    data = np.zeros(W.row_bytes(W.Q4_1, n_in), dtype=np.uint8)
    wt = (data, W.Q4_1, (1, n_in))
    assert K.packed_bytes(wt) == 0
    with pytest.raises(ValueError, match="cannot be packed"):
        K.matmul(wt, np.zeros(n_in, np.float32), packed=True)
    # the unpacked kernels still take it
    assert K.matmul(wt, np.zeros(n_in, np.float32)).shape == (1,)


def test_packed_special_values(level):
    """Zero scales and zero rows give exact zeros; inf in x spreads as it should."""
    wt, x = _case(W.Q4_1, 20, 64, 2, seed=3)
    data = wt[0].copy()
    data[:] = 0  # every scale and min zero
    for lv in LEVELS:
        K.set_simd_level(lv)
        y = K.matmul((data, W.Q4_1, (20, 64)), x, packed=True)
        assert np.all(y == 0)
        f32 = (np.ones((3, 32), np.float32).view(np.uint8).reshape(-1), W.F32, (3, 32))
        xi = np.zeros((1, 32), np.float32)
        xi[0, 5] = np.inf
        assert np.all(np.isposinf(K.matmul(f32, xi, packed=True)))


def _tree_sums(x):
    """Block sums of x [n, 32 b] in the order packed.h fixes, in float32."""
    s = x.reshape(len(x), -1, 32)
    s = s[..., :16] + s[..., 16:]
    s = s[..., :8] + s[..., 8:]
    s = s[..., :4] + s[..., 4:]
    s = s[..., :2] + s[..., 2:]
    return s[..., 0] + s[..., 1]


def test_packed_q4_1_block_sums_in_the_documented_order(level):
    """A Q4_1 row with d = 0 and m = 1 turns each output into x's block sum
    (y = fma(1, sx, 0 * a)): it must be the documented tree's, to the bit, at
    every level and for decode (one token) and prefill calls alike."""
    n_out, n_in = 16, 32
    block = np.zeros(20, np.uint8)
    block[:4] = np.array([0.0, 1.0], np.float16).view(np.uint8)  # d, m
    data = np.tile(block, n_out)
    rng = np.random.default_rng(7)
    # magnitudes spread over 16 decades, so the order of the adds shows
    x = (rng.standard_normal((40, n_in)) * 10.0 ** rng.uniform(-8, 8, (40, n_in)))
    x = x.astype(np.float32)
    want = _tree_sums(x)[:, 0]
    # the test can fail: a plain left-to-right sum differs for some tokens
    assert np.any(np.cumsum(x, axis=1, dtype=np.float32)[:, -1] != want)
    for lv in LEVELS:
        K.set_simd_level(lv)
        for got in (K.matmul((data, W.Q4_1, (n_out, n_in)), x, packed=True),
                    np.stack([K.matmul((data, W.Q4_1, (n_out, n_in)), t, packed=True)
                              for t in x])):
            np.testing.assert_array_equal(got, np.repeat(want[:, None], n_out, axis=1),
                                          err_msg=f"level {lv}")


# ------------------------------------------------------------- in a model

def _tiny_model(family):
    from fastattn.testing import random_config, random_ids, random_weights

    config = random_config(family, n_embd=64, n_head=4,
                           n_kv_head=2 if family == "llama" else None, n_ff=96, n_layer=2)
    weights = random_weights(config, W.Q4_1, embd_qtype=W.Q8_0)
    return config, weights, random_ids(config, 12)


@pytest.mark.skipif("avx512" not in LEVELS or K.simd_name() != "avx512",
                    reason="needs the AVX-512 level (the engine packs every type there)")
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_model_runs_packed_weights(family, tmp_path):
    """At the AVX-512 level a model packs every matrix it multiplies by (not the
    embeddings), gives the reference's answer, and the same bits for prefill +
    decode as for one forward.  The same model built at the generic level runs
    the file layout: close to the packed answer, not the same bits."""
    import subprocess
    import sys

    from fastattn.model import Transformer
    from fastattn.reference import forward as reference_forward

    config, weights, ids = _tiny_model(family)
    ref = reference_forward(config, weights, ids)[-1]
    model = Transformer(config, weights, n_threads=2)
    multiplied = [n for n in weights if len(weights[n].shape) == 2
                  and n not in ("token_embd.weight", "position_embd.weight")]
    head = weights.get("output.weight", weights["token_embd.weight"])
    expected = sum(K.packed_bytes(weights[n]) for n in multiplied) + K.packed_bytes(head)
    assert model._engine.packed_bytes == expected > 0

    state = model.new_state()
    whole = model.prefill(state, ids)
    np.testing.assert_allclose(whole, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    split = model.new_state()
    model.prefill(split, ids[:7])
    for t in ids[7:]:
        last = model.decode(split, int(t))
    np.testing.assert_array_equal(last, whole)

    # the generic level packs nothing (the engine reads FASTATTN_SIMD at first use)
    out = tmp_path / "generic.npy"
    code = (f"import numpy as np, sys; sys.path.insert(0, {str(__import__('os').path.dirname(__file__))!r});"
            f"from test_packed import _tiny_model; from fastattn.model import Transformer;"
            f"c, w, ids = _tiny_model({family!r}); m = Transformer(c, w, n_threads=2);"
            f"assert m._engine.packed_bytes == 0, m._engine.packed_bytes;"
            f"np.save({str(out)!r}, m.prefill(m.new_state(), ids))")
    env = {**__import__("os").environ, "FASTATTN_SIMD": "generic"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    plain = np.load(out)
    np.testing.assert_allclose(plain, whole, rtol=1e-5, atol=1e-5 * np.abs(whole).max())
    assert not np.array_equal(plain, whole)
