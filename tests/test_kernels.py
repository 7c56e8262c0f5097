"""The C kernels against numpy, at every SIMD level the CPU runs.

Oracles are float64 numpy: fastattn.weights.dequantize for the storage types,
softmax(q k^T / sqrt(head_dim) + causal mask) v for attention.  Sizes are odd
on purpose (n_in not a multiple of 8 or 16, one row, one head, one position)
so that vector tails and edge cases are exercised.
"""
import numpy as np
import pytest

from fastattn import _kernels as K
from fastattn import weights as W
from fastattn.errors import FastAttnError, UnsupportedError

LEVELS = K.available_simd_levels()
FLOAT_TYPES = [W.F32, W.F16, W.BF16]
BLOCK_TYPES = [W.Q8_0, W.Q4_0, W.Q4_1]
ALL_TYPES = FLOAT_TYPES + BLOCK_TYPES


def rand(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def make_weight(rng, qtype, n_out, n_in):
    return W.WeightTensor.from_float(rand(rng, n_out, n_in), qtype, name="w")


def assert_matmul_close(y, x, wf):
    """|y - x W^T| within float32 rounding of the sum of |x| |W|."""
    x64, w64 = x.astype(np.float64), wf.astype(np.float64)
    ref = x64 @ w64.T
    bound = 2e-5 * (np.abs(x64) @ np.abs(w64).T) + 1e-30
    err = np.abs(y.astype(np.float64) - ref)
    assert np.all(err <= bound), f"max err {err.max()} (bound {bound[err > bound].min()})"


def guarded(shape, dtype):
    """A zeroed C-contiguous array whose last byte sits just before a page
    that may not be read, so a kernel reading past the end crashes the test
    instead of passing by luck."""
    import ctypes
    import mmap
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    page = mmap.PAGESIZE
    n_pages = (nbytes + page - 1) // page + 1
    buf = mmap.mmap(-1, n_pages * page)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    assert libc.mprotect(addr + (n_pages - 1) * page, page, 0) == 0   # PROT_NONE
    offset = (n_pages - 1) * page - nbytes
    return np.frombuffer(buf, dtype=np.uint8, count=nbytes, offset=offset).view(dtype) \
        .reshape(shape)


def n_in_for(qtype, odd):
    """An awkward width: odd for float types, a block count that is odd and
    not a multiple of 2 or 4 blocks for block types."""
    return odd if qtype in FLOAT_TYPES else 32 * 7


# ------------------------------------------------------------------ sizes


def test_row_bytes():
    assert K.row_bytes(W.F32, 37) == 148
    assert K.row_bytes(W.F16, 37) == 74
    assert K.row_bytes(W.BF16, 3) == 6
    assert K.row_bytes(W.Q8_0, 64) == 68
    assert K.row_bytes(W.Q4_0, 576) == 18 * 18
    assert K.row_bytes(W.Q4_1, 576) == 18 * 20
    for qtype in BLOCK_TYPES:
        assert K.row_bytes(qtype, 33) == 0
        assert K.row_bytes(qtype, 0) == 0
    assert K.row_bytes(W.F32, 0) == 0
    assert K.row_bytes(W.F32, -5) == 0
    assert K.row_bytes(W.F32, 1 << 33) == 0  # wider than any model: refused
    assert K.row_bytes(7, 64) == 0          # Q5_0 is not supported
    assert K.row_bytes(-1, 64) == 0


# ------------------------------------------------------------- products


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=W.type_name)
@pytest.mark.parametrize("n_seq", [1, 3, 9])
def test_matmul_vs_numpy(level, qtype, n_seq):
    rng = np.random.default_rng(qtype * 100 + n_seq)
    n_in = n_in_for(qtype, 1001)
    w = make_weight(rng, qtype, 13, n_in)
    x = rand(rng, n_seq, n_in)
    y = K.matmul(w, x, n_threads=2)
    assert y.shape == (n_seq, 13) and y.dtype == np.float32
    assert_matmul_close(y, x, w.to_float())


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=W.type_name)
def test_matmul_small_widths(level, qtype):
    """Widths below one vector and one row of output."""
    rng = np.random.default_rng(7)
    for n_in in ([1, 5, 8, 15, 16, 17, 31, 33, 63, 65] if qtype in FLOAT_TYPES
                 else [32, 64, 96, 160]):
        w = make_weight(rng, qtype, 1, n_in)
        x = rand(rng, 2, n_in)
        assert_matmul_close(K.matmul(w, x, n_threads=1), x, w.to_float())


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=W.type_name)
def test_matmul_prefill_equals_decode(level, qtype):
    """k rows at once are bit-identical to k single-row calls, across row
    tiles (n_out large enough for several) and row groups that do not divide k."""
    rng = np.random.default_rng(11 + qtype)
    n_in = n_in_for(qtype, 1003) if qtype in FLOAT_TYPES else 32 * 33
    n_out = 300
    w = make_weight(rng, qtype, n_out, n_in)
    for n_seq in (2, 5, 11):
        x = rand(rng, n_seq, n_in)
        y = K.matmul(w, x, n_threads=2)
        for s in range(n_seq):
            one = K.matmul(w, x[s:s + 1], n_threads=1)
            np.testing.assert_array_equal(y[s:s + 1], one)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=W.type_name)
def test_matmul_threads_bit_identical(level, qtype):
    rng = np.random.default_rng(5)
    n_in = n_in_for(qtype, 77)
    w = make_weight(rng, qtype, 41, n_in)
    x = rand(rng, 6, n_in)
    np.testing.assert_array_equal(K.matmul(w, x, n_threads=1), K.matmul(w, x, n_threads=2))
    np.testing.assert_array_equal(K.matmul(w, x, n_threads=1), K.matmul(w, x, n_threads=3))


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=W.type_name)
def test_matmul_reads_nothing_past_the_end(level, qtype):
    """Weights and x end at an unreadable page: vector tails must stay inside."""
    rng = np.random.default_rng(6)
    for n_in in ([1, 15, 17, 33, 77] if qtype in FLOAT_TYPES else [32, 96]):
        src = make_weight(rng, qtype, 3, n_in)
        data = guarded(src.data.shape, np.uint8)
        data[...] = src.data
        w = W.WeightTensor(data, qtype, (3, n_in))
        x = guarded((5, n_in), np.float32)
        x[...] = rand(rng, 5, n_in)
        assert_matmul_close(K.matmul(w, x, n_threads=2), x, src.to_float())
        np.testing.assert_array_equal(K.dequant_row(w, 2), src.to_float()[2])


def test_matmul_tuple_and_vector_forms():
    rng = np.random.default_rng(2)
    w = make_weight(rng, W.Q4_1, 5, 64)
    x = rand(rng, 64)
    y = K.matmul((w.data, w.qtype, w.shape), x)
    assert y.shape == (5,)
    np.testing.assert_array_equal(y, K.matmul(w, x[None])[0])


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=W.type_name)
def test_dequant_row(qtype):
    rng = np.random.default_rng(3)
    n_in = n_in_for(qtype, 45)
    w = make_weight(rng, qtype, 4, n_in)
    ref = w.to_float()
    for row in (0, 3):
        np.testing.assert_array_equal(K.dequant_row(w, row), ref[row])


def test_f16_special_values(level):
    """Subnormal, zero, negative zero, max and inf halfs decode exactly."""
    vals = np.array([0.0, -0.0, 6e-8, -3e-6, 6.1e-5, 1.0, -2.5, 65504.0, -65504.0,
                     np.inf, 1e-7, 0.33325195], dtype=np.float16)
    w = W.WeightTensor(vals.view(np.uint8).copy(), W.F16, (1, len(vals)))
    np.testing.assert_array_equal(K.dequant_row(w, 0), vals.astype(np.float32))
    finite = np.isfinite(vals)
    w = W.WeightTensor(vals[finite].view(np.uint8).copy(), W.F16, (1, int(finite.sum())))
    for j in (2, 3, 4, 7):                  # x = one-hot picks one weight out exactly
        x = np.zeros((1, w.n_in), np.float32)
        x[0, j] = 1.0
        assert K.matmul(w, x)[0, 0] == np.float32(vals[finite][j])


def test_f16_every_half():
    """All 65536 half bit patterns decode as numpy decodes them (NaNs as NaNs)."""
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    w = W.WeightTensor(bits.view(np.uint8).copy(), W.F16, (1, 65536))
    np.testing.assert_array_equal(K.dequant_row(w, 0), bits.view(np.float16).astype(np.float32))


def test_matmul_bad_input():
    rng = np.random.default_rng(0)
    w = make_weight(rng, W.Q8_0, 4, 64)
    x = rand(rng, 2, 64)
    with pytest.raises(ValueError, match="x: has 63 columns"):
        K.matmul(w, x[:, :63].copy())
    with pytest.raises(ValueError, match="dtype float32"):
        K.matmul(w, x.astype(np.float64))
    with pytest.raises(ValueError, match="C-contiguous"):
        K.matmul(w, rand(rng, 64, 2).T)
    with pytest.raises(ValueError, match="at least one row"):
        K.matmul(w, np.zeros((0, 64), np.float32))
    with pytest.raises(UnsupportedError, match="tensor type 7"):
        K.matmul((w.data, 7, (4, 64)), x)
    with pytest.raises(ValueError, match="needs 272"):
        K.matmul((w.data[:3], W.Q8_0, (4, 64)), x)
    with pytest.raises(ValueError, match="block size"):
        K.matmul((w.data, W.Q8_0, (4, 48)), x)
    with pytest.raises(ValueError, match="shape"):
        K.matmul((w.data, W.Q8_0, (4, 2 ** 70)), x)
    with pytest.raises(ValueError, match="shape"):
        K.matmul((w.data, W.Q8_0, (0, 64)), x)
    with pytest.raises(ValueError, match="WeightTensor"):
        K.matmul("weights", x)
    with pytest.raises(ValueError, match="n_threads"):
        K.matmul(w, x, n_threads=0)
    with pytest.raises(ValueError, match="row"):
        K.dequant_row(w, 4)
    with pytest.raises(ValueError, match="row"):
        K.dequant_row(w, -1)


# ------------------------------------------------------------------ norms


@pytest.mark.parametrize("shape", [(1, 1), (1, 576), (5, 37)])
def test_rms_norm(level, shape):
    rng = np.random.default_rng(shape[1])
    x, g = rand(rng, *shape, scale=3.0), rand(rng, shape[1])
    x64 = x.astype(np.float64)
    ref = x64 / np.sqrt((x64 ** 2).mean(axis=1, keepdims=True) + 1e-5) * g
    y = K.rms_norm(x, g, 1e-5, n_threads=2)
    np.testing.assert_allclose(y, ref, rtol=2e-6, atol=1e-6)
    np.testing.assert_array_equal(y, K.rms_norm(x, g, 1e-5, n_threads=1))


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 2), (1, 768), (7, 37)])
def test_layer_norm(level, shape, with_bias):
    rng = np.random.default_rng(shape[1] + 1)
    x = rand(rng, *shape, scale=3.0) + 1.5
    g, b = rand(rng, shape[1]), rand(rng, shape[1])
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=1, keepdims=True)
    ref = (x64 - mean) / np.sqrt(x64.var(axis=1, keepdims=True) + 1e-5) * g
    if with_bias:
        ref = ref + b
    y = K.layer_norm(x, g, b if with_bias else None, 1e-5, n_threads=2)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(
        y, K.layer_norm(x, g, b if with_bias else None, 1e-5, n_threads=1))


def test_norm_bad_input():
    x = np.ones((2, 8), np.float32)
    with pytest.raises(ValueError, match="g: expected length 8"):
        K.rms_norm(x, np.ones(7, np.float32))
    with pytest.raises(ValueError, match="b: expected length 8"):
        K.layer_norm(x, np.ones(8, np.float32), np.ones(9, np.float32))
    with pytest.raises(ValueError, match="2 dimensions"):
        K.rms_norm(x[0], np.ones(8, np.float32))


# ------------------------------------------------------------ activations


EXTREMES = np.array([0.0, -0.0, 1e-8, -1e-8, 30.0, -30.0, 88.0, -88.0, 100.0, -100.0,
                     1e4, -1e4, 3e38, -3e38], np.float32)


def test_gelu(level):
    rng = np.random.default_rng(9)
    x = rand(rng, 3, 37, scale=4.0)
    x[0, :len(EXTREMES)] = EXTREMES
    x64 = x.astype(np.float64)
    ref = 0.5 * x64 * (1 + np.tanh(np.sqrt(2 / np.pi) * (x64 + 0.044715 * x64 ** 3)))
    y = K.gelu(x, n_threads=2)
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(y, K.gelu(x, n_threads=1))


def test_swiglu(level):
    rng = np.random.default_rng(10)
    gate, up = rand(rng, 2, 1537, scale=5.0), rand(rng, 2, 1537)
    gate[0, :len(EXTREMES) - 2] = EXTREMES[:-2]      # 3e38 * up may overflow float32
    g64 = gate.astype(np.float64)
    with np.errstate(over="ignore"):
        ref = g64 / (1 + np.exp(-g64)) * up
    y = K.swiglu(gate, up, n_threads=2)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(y, K.swiglu(gate, up, n_threads=1))
    with pytest.raises(ValueError, match="up: shape"):
        K.swiglu(gate, up[:, :5].copy())


def test_add_bias():
    rng = np.random.default_rng(12)
    x, b = rand(rng, 3, 37), rand(rng, 37)
    np.testing.assert_array_equal(K.add_bias(x, b, n_threads=2), x + b)


# ------------------------------------------------------------------- rope


def rope_ref(x, n_head, head_dim, pos0, theta, neox):
    """Rotary embedding in float64; pair i turns by pos * theta^(-2i/head_dim)."""
    n_seq = x.shape[0]
    y = x.astype(np.float64).reshape(n_seq, n_head, head_dim).copy()
    half = head_dim // 2
    i = np.arange(half)
    ang = (pos0 + np.arange(n_seq))[:, None] * theta ** (-2.0 * i / head_dim)  # [n_seq, half]
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    a, b = (i, i + half) if neox else (2 * i, 2 * i + 1)
    x0, x1 = y[:, :, a].copy(), y[:, :, b].copy()
    y[:, :, a] = x0 * c - x1 * s
    y[:, :, b] = x0 * s + x1 * c
    return y.reshape(n_seq, n_head * head_dim)


@pytest.mark.parametrize("neox", [False, True])
@pytest.mark.parametrize("n_seq,n_head,head_dim,pos0", [
    (1, 1, 2, 0), (1, 9, 64, 517), (6, 3, 10, 0), (4, 2, 64, 8000),
    (2, 1, 640, 33)])                  # wider than the per-thread frequency cache
def test_rope(level, neox, n_seq, n_head, head_dim, pos0):
    rng = np.random.default_rng(head_dim + pos0)
    x = rand(rng, n_seq, n_head * head_dim)
    y = K.rope(x, n_head, head_dim, pos0, 100000.0, neox, n_threads=2)
    ref = rope_ref(x, n_head, head_dim, pos0, 100000.0, neox)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(
        y, K.rope(x, n_head, head_dim, pos0, 100000.0, neox, n_threads=1))


def test_rope_theta_and_width_changes():
    """Calls alternating theta and head_dim (the frequency cache must follow)."""
    rng = np.random.default_rng(2)
    x = rand(rng, 3, 64)
    for theta, n_head, head_dim in [(1e4, 1, 64), (1e5, 1, 64), (1e5, 2, 32), (1e4, 1, 64)]:
        y = K.rope(x, n_head, head_dim, 7, theta, False, n_threads=1)
        np.testing.assert_allclose(y, rope_ref(x, n_head, head_dim, 7, theta, False),
                                   rtol=1e-5, atol=1e-5)


def test_rope_layouts_differ_and_preserve_norm():
    rng = np.random.default_rng(1)
    x = rand(rng, 2, 16)
    a = K.rope(x, 2, 8, 3, 10000.0, False)
    b = K.rope(x, 2, 8, 3, 10000.0, True)
    assert not np.allclose(a, b)
    for y in (a, b):
        np.testing.assert_allclose(np.linalg.norm(y.reshape(4, 8), axis=1),
                                   np.linalg.norm(x.reshape(4, 8), axis=1), rtol=1e-5)
    with pytest.raises(ValueError, match="n_head \\* head_dim"):
        K.rope(x, 3, 8)
    with pytest.raises(ValueError, match="even"):
        K.rope(rand(rng, 1, 9), 1, 9)


# -------------------------------------------------------------- attention


def attention_ref(q, k, v, pos0, n_head, n_kv_head):
    """softmax(q k^T / sqrt(head_dim) + causal mask) v, float64, with GQA."""
    n_seq = q.shape[0]
    head_dim = k.shape[2]
    n_kv = pos0 + n_seq
    group = n_head // n_kv_head
    qh = q.astype(np.float64).reshape(n_seq, n_head, head_dim).transpose(1, 0, 2)
    kh = np.repeat(k[:, :n_kv].astype(np.float64), group, axis=0)   # [n_head, n_kv, hd]
    vh = np.repeat(v[:, :n_kv].astype(np.float64), group, axis=0)
    scores = qh @ kh.transpose(0, 2, 1) / np.sqrt(head_dim)          # [n_head, n_seq, n_kv]
    pos = pos0 + np.arange(n_seq)
    mask = np.where(np.arange(n_kv)[None, :] <= pos[:, None], 0.0, -np.inf)
    scores = scores + mask
    p = np.exp(scores - scores.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    out = p @ vh                                                     # [n_head, n_seq, hd]
    return out.transpose(1, 0, 2).reshape(n_seq, n_head * head_dim)


def make_cache(rng, n_kv_head, n_ctx, head_dim, n_filled):
    """A cache with garbage past the filled positions, which must not be read."""
    k = rand(rng, n_kv_head, n_ctx, head_dim)
    v = rand(rng, n_kv_head, n_ctx, head_dim)
    k[:, n_filled:] = np.nan
    v[:, n_filled:] = np.nan
    return k, v


@pytest.mark.parametrize("n_seq,pos0,n_head,n_kv_head,head_dim,n_ctx", [
    (1, 0, 1, 1, 8, 1),          # one head, one position
    (1, 37, 9, 3, 64, 64),       # decode, SmolLM2 heads (GQA 3:1)
    (7, 0, 9, 3, 64, 16),        # prefill, causal
    (5, 11, 4, 4, 13, 20),       # prefill after a cached prefix, odd head_dim
    (3, 2, 6, 1, 24, 8),         # multi-query
    (1, 300, 9, 3, 64, 301),     # decode over five key chunks, the last partial
    (70, 60, 4, 2, 16, 130),     # prefill crossing chunk boundaries
    (2, 127, 18, 1, 8, 129),     # 18 query heads on one KV head: two head subgroups
    (1, 200, 2, 1, 300, 201),    # head_dim wider than one column step
])
def test_attention(level, n_seq, pos0, n_head, n_kv_head, head_dim, n_ctx):
    rng = np.random.default_rng(n_seq * 31 + pos0)
    q = rand(rng, n_seq, n_head * head_dim, scale=2.0)
    k, v = make_cache(rng, n_kv_head, n_ctx, head_dim, pos0 + n_seq)
    out = K.attention(q, k, v, pos0, n_head, n_kv_head, n_threads=2)
    ref = attention_ref(q, k, v, pos0, n_head, n_kv_head)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(
        out, K.attention(q, k, v, pos0, n_head, n_kv_head, n_threads=1))


@pytest.mark.parametrize("ramp", ["rising", "falling"])
def test_attention_running_max(level, ramp):
    """Scores that rise (each chunk raises the running max, so earlier chunks
    are rescaled) or fall (the first chunk holds the max) across 200 keys."""
    rng = np.random.default_rng(8)
    n_kv, head_dim = 200, 16
    q = rand(rng, 1, head_dim)
    alpha = np.linspace(-3, 12, n_kv, dtype=np.float32)
    if ramp == "falling":
        alpha = alpha[::-1].copy()
    k = (alpha[:, None] * q[0] / np.linalg.norm(q[0]) * 4)[None].astype(np.float32)
    v = rand(rng, 1, n_kv, head_dim)
    out = K.attention(q, k, v, n_kv - 1, 1, 1)
    np.testing.assert_allclose(out, attention_ref(q, k, v, n_kv - 1, 1, 1), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("head_dim", [5, 16, 70])
def test_attention_reads_nothing_past_the_end(level, head_dim):
    """q and a cache filled to its last row end at an unreadable page."""
    rng = np.random.default_rng(head_dim)
    n_seq, pos0, n_head, n_kv_head = 3, 67, 4, 2
    n_ctx = pos0 + n_seq
    q = guarded((n_seq, n_head * head_dim), np.float32)
    q[...] = rand(rng, n_seq, n_head * head_dim)
    k = guarded((n_kv_head, n_ctx, head_dim), np.float32)
    v = guarded((n_kv_head, n_ctx, head_dim), np.float32)
    k[...] = rand(rng, n_kv_head, n_ctx, head_dim)
    v[...] = rand(rng, n_kv_head, n_ctx, head_dim)
    out = K.attention(q, k, v, pos0, n_head, n_kv_head, n_threads=2)
    np.testing.assert_allclose(out, attention_ref(q, k, v, pos0, n_head, n_kv_head),
                               rtol=1e-5, atol=1e-5)


def test_attention_prefill_equals_decode(level):
    """Query s of a prefill is bit-identical to a decode of it at pos0 + s,
    across key chunks (64 keys each)."""
    rng = np.random.default_rng(4)
    n_seq, n_head, n_kv_head, head_dim = 140, 9, 3, 64
    q = rand(rng, n_seq, n_head * head_dim, scale=3.0)
    k, v = make_cache(rng, n_kv_head, 150, head_dim, n_seq)
    full = K.attention(q, k, v, 0, n_head, n_kv_head)
    for s in (0, 1, 5, 63, 64, 65, 100, 127, 128, 139):
        one = K.attention(q[s:s + 1], k, v, s, n_head, n_kv_head, n_threads=1)
        np.testing.assert_array_equal(full[s:s + 1], one)


def test_attention_bad_input():
    rng = np.random.default_rng(0)
    q = rand(rng, 2, 4 * 8)
    k, v = make_cache(rng, 2, 5, 8, 5)
    with pytest.raises(ValueError, match="does not divide"):
        K.attention(q, k, v, 0, 4, 3)
    with pytest.raises(ValueError, match="exceeds the cache's n_ctx = 5"):
        K.attention(q, k, v, 4, 4, 2)
    with pytest.raises(ValueError, match="k_cache: has 2 heads"):
        K.attention(q, k, v, 0, 4, 1)
    with pytest.raises(ValueError, match="v_cache: shape"):
        K.attention(q, k, v[:, :4].copy(), 0, 4, 2)
    with pytest.raises(ValueError, match="q: has 32 columns"):
        K.attention(q, k, v, 0, 2, 2)
    with pytest.raises(ValueError, match="pos0"):
        K.attention(q, k, v, -1, 4, 2)


# ------------------------------------------------------------------- SIMD


def test_simd_levels():
    before = K.simd_level()
    try:
        assert LEVELS[0] == "generic"
        assert K.set_simd_level("generic") == 0 and K.simd_name() == "generic"
        best = K.set_simd_level(2)
        assert K.simd_name(best) == LEVELS[-1]
        with pytest.raises(ValueError, match="level"):
            K.set_simd_level("sse9")
        with pytest.raises(ValueError, match="level"):
            K.set_simd_level(5)
    finally:
        K.set_simd_level(before)


def test_simd_env_cap():
    """FASTATTN_SIMD caps the level chosen at first use (fresh interpreter)."""
    import subprocess
    import sys
    code = "from fastattn import _kernels as K; print(K.simd_name())"
    for name in LEVELS:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**__import__("os").environ, "FASTATTN_SIMD": name},
                             check=True)
        assert out.stdout.strip() == name


_LEVEL_MODEL = """
import hashlib, sys
from fastattn import _kernels as K
from fastattn.model import Transformer
from fastattn.testing import random_config, random_ids, random_weights
from fastattn.weights import Q4_1
c = random_config("llama", n_embd=64, n_head=4, n_kv_head=2, n_ff=96, n_vocab=77)
for level in sys.argv[1:] or [None]:
    if level:
        K.set_simd_level(level)
    m = Transformer(c, random_weights(c, Q4_1, seed=0), n_threads=2)
    print(hashlib.sha1(m.forward(random_ids(c, 20, seed=1)).tobytes()).hexdigest())
"""


def test_set_simd_level_reaches_the_model():
    """The model's engine is built from the same C files as the kernels module
    and keeps its own copy of the level; set_simd_level moves both, so a
    model built after it gives the bits of a process started at that level."""
    import os
    import subprocess
    import sys
    run = lambda args, env: subprocess.run(  # noqa: E731
        [sys.executable, "-c", _LEVEL_MODEL, *args], capture_output=True, text=True,
        env={**os.environ, **env}, check=True).stdout.split()
    switched = run(LEVELS, {})
    started = [run([], {"FASTATTN_SIMD": name})[0] for name in LEVELS]
    assert switched == started
    if len(LEVELS) > 1:  # the float path rounds differently by level, so this can tell
        assert len(set(started)) > 1


def test_set_q8_amx_reaches_the_model():
    from fastattn import _engine
    try:
        K.set_q8_amx(False)
        assert not K.q8_amx_in_use() and not _engine._q8_amx_in_use()
        K.set_q8_amx(True)
        assert K.q8_amx_in_use() == _engine._q8_amx_in_use() == K.q8_amx_available()
    finally:
        K.set_q8_amx(True)


def test_errors_are_fastattn_or_value_errors():
    with pytest.raises((FastAttnError, ValueError)):
        K.matmul(("x", W.F32, (1, 1)), np.zeros((1, 1), np.float32))


# ------------------------------------------------------- the real model file


@pytest.mark.model
def test_matmul_real_q4_1_weight(smollm2_path):
    """A real Q4_1 projection and the Q8_0 embedding of SmolLM2."""
    import gguf
    reader = gguf.GGUFReader(smollm2_path)
    tensors = {t.name: t for t in reader.tensors}
    rng = np.random.default_rng(0)
    for name in ("blk.0.ffn_down.weight", "token_embd.weight"):
        t = tensors[name]
        n_in, n_out = (int(d) for d in t.shape[:2])
        w = W.WeightTensor(np.asarray(t.data).view(np.uint8), int(t.tensor_type),
                           (n_out, n_in), name)
        n_part = min(n_out, 700)               # a slice keeps the numpy oracle quick
        part = W.WeightTensor(w.data[:n_part], w.qtype, (n_part, n_in), name)
        x = rand(rng, 3, n_in)
        assert_matmul_close(K.matmul(part, x), x, part.to_float())
        np.testing.assert_array_equal(K.dequant_row(w, 123), part.to_float()[123])
