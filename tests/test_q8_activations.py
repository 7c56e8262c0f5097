"""The opt-in "q8 activations" mode (csrc/quant_act.c).

The kernels are checked bit for bit against a numpy model of the same
integer arithmetic (see the comment at the top of csrc/quant_act.c); the mode
as a whole is checked for its divergence from the exact float path, on random
models and on SmolLM2.  The packed copy a q8-mode model makes at load is
checked against a numpy model of its layout and for giving the same bits as
the file form, kernel by kernel and model by model.
"""
from fractions import Fraction

import numpy as np
import pytest

from fastattn import _kernels as K
from fastattn import weights as W
from fastattn.model import Transformer
from fastattn.testing import random_config, random_ids, random_weights

LEVELS = K.available_simd_levels()
Q_TYPES = [W.Q8_0, W.Q4_0, W.Q4_1]
BLOCK_BYTES = {W.Q8_0: 34, W.Q4_0: 18, W.Q4_1: 20}
f32 = np.float32


# ------------------------------------------------------------ numpy model


def np_quantize(x):
    """x [n] float32 -> (q int8 [n], d [nb], s [nb]) as the C code rounds.
    A block whose max |x| or 1 / d is inf or NaN rounds to zeros."""
    xb = x.astype(f32).reshape(-1, 32)
    # max |x| on the bit patterns: the float max, and NaN above everything
    amax = (xb.view(np.uint32) & np.uint32(0x7FFFFFFF)).max(axis=1).view(f32)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        d = (amax / f32(127)).astype(f32)
        idv = np.where(d != 0, f32(1) / d, f32(0)).astype(f32)
        zero = ~np.isfinite(amax) | ~np.isfinite(idv)
        q = np.where(zero[:, None], f32(0), np.rint(xb * idv[:, None])).astype(np.int32)
        s = (d * q.sum(axis=1).astype(f32)).astype(f32)
    return q.astype(np.int8).reshape(-1), d, s


def np_weight_blocks(w):
    """WeightTensor -> (values int32 [n_out, nb, 32], d [n_out, nb], m [n_out, nb])."""
    n_out, n_in = w.shape
    nb = n_in // 32
    raw = w.data.reshape(n_out, nb, BLOCK_BYTES[w.qtype])
    d = raw[:, :, 0:2].copy().view(np.float16)[..., 0].astype(f32)
    m = np.zeros_like(d)
    if w.qtype == W.Q8_0:
        v = raw[:, :, 2:34].copy().view(np.int8).astype(np.int32)
    else:
        qs = raw[:, :, 4:20] if w.qtype == W.Q4_1 else raw[:, :, 2:18]
        v = np.concatenate([qs & 0x0F, qs >> 4], axis=2).astype(np.int32)
        if w.qtype == W.Q4_0:
            v -= 8
        else:
            m = raw[:, :, 2:4].copy().view(np.float16)[..., 0].astype(f32)
    return v, d, m


def np_fma(a, b, c):
    """fma(a, b, c) in float32, rounded once: a * b is exact in float64, the
    sum's float64 rounding error comes from TwoSum, and it decides the one
    case where rounding the float64 sum to float32 again could go the wrong
    way (the sum landing exactly halfway between two float32 values)."""
    a, b, c = (np.asarray(v, f32) for v in (a, b, c))
    a, b, c = np.broadcast_arrays(a, b, c)
    ab = a.astype(np.float64) * b.astype(np.float64)
    c64 = c.astype(np.float64)
    s = ab + c64
    with np.errstate(invalid="ignore", over="ignore"):
        bb = s - ab
        err = (ab - (s - bb)) + (c64 - bb)
        r = s.astype(f32)
        other = np.nextafter(r, np.where(s > r, f32(np.inf), f32(-np.inf)))
        tie = (np.isfinite(s) & (r.astype(np.float64) != s)
               & ((r.astype(np.float64) + other.astype(np.float64)) / 2 == s) & (err != 0))
        up = err > 0
        hi, lo = np.maximum(r, other), np.minimum(r, other)
    return np.where(tie, np.where(up, hi, lo), r).astype(f32)


def f32_nearest(v):
    """The float32 nearest the rational v, ties to even."""
    near = f32(float(v))  # within a float64 step of v: the answer is it or a neighbour
    cands = [near, np.nextafter(near, f32(-np.inf)), np.nextafter(near, f32(np.inf))]
    return min(cands, key=lambda c: (abs(Fraction(float(c)) - v), int(c.view(np.int32)) & 1))


def test_np_fma_rounds_once():
    # a * b = 2^-24 - 2^-70 and c = 1 + 2^-23: the float64 sum rounds to
    # 1 + 3 * 2^-24, halfway between two float32 values, and rounding that
    # to even would go up; the exact value is below the midpoint
    a, b, c = f32(1 + 2.0 ** -23), f32(2.0 ** -24 - 2.0 ** -47), f32(1 + 2.0 ** -23)
    assert (a.astype(np.float64) * b + c.astype(np.float64)).astype(f32) != c
    assert np_fma(a, b, c) == c
    assert np_fma(1, 1, f32(2.0 ** -24)) == f32(1)  # an exact tie goes to even
    rng = np.random.default_rng(3)
    a, b, c = (rng.standard_normal(400).astype(f32) for _ in range(3))
    c[:100] = -(a[:100] * b[:100]) * f32(1 + 2.0 ** -20)  # cancellation
    want = [f32_nearest(Fraction(float(p)) * Fraction(float(q)) + Fraction(float(r)))
            for p, q, r in zip(a, b, c)]
    np.testing.assert_array_equal(np_fma(a, b, c), np.array(want, f32))


def np_matmul_q8(w, x):
    """The documented order of operations, in float32, for one x row."""
    v, dw, mw = np_weight_blocks(w)
    q, dx, sx = np_quantize(x)
    n_out, nb, _ = v.shape
    qb = q.astype(np.int32).reshape(nb, 32)
    acc = np.zeros(n_out, f32)
    for b in range(nb):
        p = (v[:, b, :] * qb[b]).sum(axis=1)  # exact ints
        dd = (dw[:, b] * dx[b]).astype(f32)
        acc = np_fma(dd, p.astype(f32), acc)
        if w.qtype == W.Q4_1:
            acc = np_fma(mw[:, b], sx[b], acc)
    return acc


def make(rng, qtype, n_out, n_in):
    return W.WeightTensor.from_float(rng.standard_normal((n_out, n_in)).astype(f32),
                                     qtype, name="w")


# ----------------------------------------------------------------- kernels


def test_quantize_matches_numpy(level):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(1536) * 3).astype(f32)
    x[64:96] = 0.0  # an all-zero block: d = 0, q = 0
    x[100] = 1e-30
    q, d, s = K.quantize_act_q8(x)
    q2, d2, s2 = np_quantize(x)
    np.testing.assert_array_equal(q, q2)
    np.testing.assert_array_equal(d, d2)
    np.testing.assert_array_equal(s, s2)
    assert np.abs(q.astype(np.int32)).max() == 127
    # the rounding error is at most half a step per value
    err = np.abs(q.reshape(-1, 32) * d[:, None] - x.reshape(-1, 32))
    assert np.all(err <= 0.5 * d[:, None] * (1 + 1e-6))


def test_quantize_blocks_it_cannot_scale(level):
    """A block holding NaN or inf, or so near zero that 1 / d overflows,
    rounds to zeros with the same d at every level; a NaN or inf then
    turns the products NaN, a near-zero block adds exactly nothing."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal(7 * 32).astype(f32)
    x[5] = np.nan                     # block 0
    x[32 + 9] = np.inf                # block 1
    x[64 + 31] = -np.inf              # block 2
    x[96:128] *= f32(1e-38)           # block 3: d subnormal, 1 / d overflows
    x[128:160] = f32(3e-45)           # block 4: d rounds to 0
    x[160 + 3] = -np.nan              # block 5, with the sign bit
    q, d, s = K.quantize_act_q8(x)
    q2, d2, s2 = np_quantize(x)
    np.testing.assert_array_equal(q, q2)
    np.testing.assert_array_equal(d, d2)
    np.testing.assert_array_equal(s, s2)
    qb = q.reshape(-1, 32)
    assert not qb[:6].any() and np.abs(qb[6]).max() == 127
    assert np.isnan(d[[0, 5]]).all() and np.isinf(d[[1, 2]]).all()
    assert 0 < d[3] < np.finfo(f32).tiny and d[4] == 0
    assert np.isnan(s[[0, 1, 2, 5]]).all() and s[3] == 0 and s[4] == 0

    for qtype in Q_TYPES:
        w = make(rng, qtype, 19, 7 * 32)
        rows = np.stack([x, np.where(np.isfinite(x), x, f32(0))])
        rows[1, 96:160] = 0               # the near-zero blocks as zeros
        y = K.matmul_q8(w, rows, n_threads=1)
        assert np.isnan(y[0]).all()
        y_tiny = K.matmul_q8(w, np.where(np.isfinite(x), x, f32(0))[None], n_threads=1)
        np.testing.assert_array_equal(y_tiny[0], y[1])


@pytest.mark.parametrize("qtype", Q_TYPES)
@pytest.mark.parametrize("n_out,n_in,n_seq", [(37, 32, 3), (64, 96, 3), (20, 160, 3),
                                              (33, 576, 3), (37, 96, 11), (70, 160, 17)])
def test_dot_matches_numpy_model(level, qtype, n_out, n_in, n_seq):
    # n_seq >= 8 takes the AVX-512 level's packed prefill path, fewer the direct one
    rng = np.random.default_rng(n_in + qtype)
    w = make(rng, qtype, n_out, n_in)
    x = rng.standard_normal((n_seq, n_in)).astype(f32)
    y = K.matmul_q8(w, x, n_threads=1)
    for r in range(n_seq):
        np.testing.assert_array_equal(y[r], np_matmul_q8(w, x[r]))


@pytest.mark.parametrize("qtype", Q_TYPES)
def test_levels_threads_and_rows_agree(qtype):
    rng = np.random.default_rng(7)
    w = make(rng, qtype, 301, 576)
    # 21 rows: tiles of 8, 8 and 5 x rows on the packed path; 1 to 4 rows direct
    x = rng.standard_normal((21, 576)).astype(f32)
    before = K.simd_level()
    try:
        outs = []
        for lv in LEVELS:
            K.set_simd_level(K.SIMD_LEVELS[lv])
            y1 = K.matmul_q8(w, x, n_threads=1)
            y2 = K.matmul_q8(w, x, n_threads=2)
            np.testing.assert_array_equal(y1, y2)
            for r in (0, 7, 8, 20):  # a row alone gives the row of the batch
                np.testing.assert_array_equal(K.matmul_q8(w, x[r], n_threads=2), y1[r])
            np.testing.assert_array_equal(K.matmul_q8(w, x[3:7], n_threads=1), y1[3:7])
            np.testing.assert_array_equal(K.matmul_q8(w, x[5:14], n_threads=2), y1[5:14])
            outs.append(y1)
    finally:
        K.set_simd_level(before)
    for y in outs[1:]:
        np.testing.assert_array_equal(y, outs[0])


@pytest.mark.parametrize("qtype", Q_TYPES)
def test_odd_scales_levels_agree(qtype):
    """Subnormal, zero, huge and infinite half scales (and mins): the VNNI
    kernels widen them with vcvtph2ps, the others through a table; every
    level must give the same outputs (inf * 0 and inf - inf give NaN)."""
    rng = np.random.default_rng(5)
    w = make(rng, qtype, 40, 96)
    raw = w.data.reshape(40, 3, BLOCK_BYTES[qtype])
    odd = np.array([0x0001, 0x03FF, 0x8001, 0x0000, 0x7BFF, 0x7C00, 0x0400], np.uint16)
    for i, h in enumerate(odd):
        raw[3 * i, i % 3, 0:2] = np.frombuffer(h.tobytes(), np.uint8)
        if qtype == W.Q4_1:
            raw[3 * i + 1, (i + 1) % 3, 2:4] = np.frombuffer(h.tobytes(), np.uint8)
    x = rng.standard_normal((10, 96)).astype(f32)
    before = K.simd_level()
    try:
        outs = []
        for lv in LEVELS:
            K.set_simd_level(K.SIMD_LEVELS[lv])
            y = K.matmul_q8(w, x, n_threads=1)
            np.testing.assert_array_equal(K.matmul_q8(w, x[:3], n_threads=2), y[:3])
            outs.append(y)
    finally:
        K.set_simd_level(before)
    for y in outs[1:]:
        np.testing.assert_array_equal(y, outs[0])
    finite = np.isfinite(outs[0])
    assert finite.sum() > 0.8 * finite.size and (~finite).any()
    with np.errstate(invalid="ignore", over="ignore"):
        for r in (0, 9):
            ref = np_matmul_q8(w, x[r])
            np.testing.assert_array_equal(np.isfinite(outs[0][r]), np.isfinite(ref))
            np.testing.assert_array_equal(outs[0][r][np.isfinite(ref)], ref[np.isfinite(ref)])


@pytest.mark.skipif(not K.q8_amx_available(), reason="no AMX-INT8 on this CPU or kernel")
@pytest.mark.parametrize("qtype", Q_TYPES)
def test_amx_tiles_give_the_vnni_bits(qtype):
    """With AMX-INT8 a prefill's products run 16 x rows at a time on the tile
    unit and the rest on the VNNI tiles; either way every output is the VNNI
    tiles' bits: odd half scales, row counts and x rows that are not whole
    groups, more rows than one tile of groups, rows of more blocks than the
    tile unit's sums are stored for at once (21, 41 and 48 blocks: chunks of
    11 + 10, 14 + 14 + 13, 3 x 16), 1 and 3 threads."""
    rng = np.random.default_rng(12)
    cases = [(301, 576, 37), (16, 32, 16), (1100, 576, 48), (40, 96, 33), (37, 1536, 20),
             (18, 672, 16), (21, 1312, 32)]
    try:
        for n_out, n_in, n_seq in cases:
            w = make(rng, qtype, n_out, n_in)
            raw = w.data.reshape(n_out, n_in // 32, BLOCK_BYTES[qtype])
            raw[3, 0, 0:2] = np.frombuffer(np.uint16(0x0001).tobytes(), np.uint8)  # subnormal d
            raw[5, -1, 0:2] = np.frombuffer(np.uint16(0x7C00).tobytes(), np.uint8)  # inf d
            x = (rng.standard_normal((n_seq, n_in)) * 2).astype(f32)
            for n_threads in (1, 3):
                K.set_q8_amx(False)
                vnni = K.matmul_q8(w, x, n_threads=n_threads)
                K.set_q8_amx(True)
                amx = K.matmul_q8(w, x, n_threads=n_threads)
                np.testing.assert_array_equal(amx, vnni)
                assert np.isfinite(amx).mean() > 0.9
            for r in (0, n_seq - 1):  # a row alone (the VNNI tiles) gives the batch's row
                np.testing.assert_array_equal(K.matmul_q8(w, x[r], n_threads=1), amx[r])
    finally:
        K.set_q8_amx(True)


def test_many_pack_tiles_agree():
    """More rows than one packed tile holds (the AVX-512 level packs about
    544 rows of 576 values at a time): every tile, thread share and row
    group edge gives the numbers a lone x row gets."""
    rng = np.random.default_rng(11)
    w = make(rng, W.Q4_1, 1250, 576)
    x = rng.standard_normal((9, 576)).astype(f32)
    y1 = K.matmul_q8(w, x, n_threads=1)
    np.testing.assert_array_equal(K.matmul_q8(w, x, n_threads=2), y1)
    np.testing.assert_array_equal(K.matmul_q8(w, x[4], n_threads=1), y1[4])
    rows = [0, 15, 16, 543, 544, 624, 625, 1087, 1088, 1249]
    np.testing.assert_array_equal(y1[8, rows], np_matmul_q8(w, x[8])[rows])


@pytest.mark.parametrize("qtype", Q_TYPES)
def test_q8_close_to_exact(qtype):
    """Rounding x to 8 bits moves each product by at most half a step of x
    per value, times |W|: a bound the result must meet."""
    rng = np.random.default_rng(3)
    w = make(rng, qtype, 200, 1536)
    x = rng.standard_normal(1536).astype(f32)
    exact = K.matmul(w, x, n_threads=1).astype(np.float64)
    y = K.matmul_q8(w, x, n_threads=1).astype(np.float64)
    _, d, _ = np_quantize(x)
    step = np.repeat(d.astype(np.float64), 32)
    wf = w.to_float().astype(np.float64)
    bound = 0.5 * (np.abs(wf) @ step) * 1.001 + 1e-4 * (np.abs(wf) @ np.abs(x))
    assert np.all(np.abs(y - exact) <= bound)
    rel = np.abs(y - exact).max() / np.abs(exact).max()
    assert rel < 0.02, rel


def test_rejects_float_weights():
    w = W.WeightTensor.from_float(np.ones((4, 32), f32), W.F32, name="w")
    with pytest.raises(ValueError, match="Q4_0, Q4_1 or Q8_0"):
        K.matmul_q8(w, np.ones(32, f32))
    with pytest.raises(ValueError, match="multiple of 32"):
        K.quantize_act_q8(np.ones(33, f32))


# ------------------------------------------------------------- packed copy


def np_q8_pack(w):
    """The packed copy's documented layout (csrc/quant_act.c), in numpy."""
    n_out, n_in = w.shape
    nb = n_in // 32
    raw = w.data.reshape(n_out, nb, BLOCK_BYTES[w.qtype])
    n_groups = -(-n_out // 16)
    pad = np.zeros((n_groups * 16, nb, raw.shape[2]), np.uint8)
    pad[:n_out] = raw
    g = pad.reshape(n_groups, 16, nb, -1).transpose(0, 2, 1, 3)  # [group, block, lane, byte]
    if w.qtype == W.Q8_0:
        quants = g[..., 2:34] ^ np.uint8(0x80)
    else:
        quants = g[..., 4:20] if w.qtype == W.Q4_1 else g[..., 2:18]
    nv = quants.shape[3] // 4
    # [group, block, lane, vector, 4] -> [group, block, vector, lane, 4]
    q = quants.reshape(n_groups, nb, 16, nv, 4).transpose(0, 1, 3, 2, 4)
    parts = [q.reshape(n_groups, -1), g[..., 0:2].reshape(n_groups, -1)]
    if w.qtype == W.Q4_1:
        parts.append(g[..., 2:4].reshape(n_groups, -1))
    groups = np.concatenate(parts, axis=1)
    width = -(-groups.shape[1] // 64) * 64
    out = np.zeros((n_groups, width), np.uint8)
    out[:, :groups.shape[1]] = groups
    if w.qtype == W.Q8_0 and n_out % 16:
        # rows past n_out are zero in the copy, quants included (not zero + 128)
        last = out[-1, :nb * 512].reshape(nb, 8, 16, 4)
        last[:, :, n_out % 16:, :] = 0
    return out.reshape(-1)


@pytest.mark.parametrize("qtype", Q_TYPES)
@pytest.mark.parametrize("n_out,n_in", [(37, 32), (16, 96), (301, 576)])
def test_packed_copy_layout(qtype, n_out, n_in):
    rng = np.random.default_rng(n_out + qtype)
    w = make(rng, qtype, n_out, n_in)
    packed = K.q8_pack(w)
    assert packed.nbytes == K.q8_packed_bytes(w)
    np.testing.assert_array_equal(packed, np_q8_pack(w))
    # as compact as the file: only the padding of the last group and of each
    # group to 64 bytes is added
    assert packed.nbytes <= (-(-n_out // 16) * 16) * w.data.nbytes // n_out + 64 * -(-n_out // 16)


def test_packed_copy_refuses_bad_sizes():
    rng = np.random.default_rng(2)
    w = make(rng, W.Q4_1, 37, 96)
    n = K.q8_packed_bytes(w)
    assert n == 3 * 3 * 320  # 3 groups of 3 blocks of (4 x 64 + 32 + 32) bytes
    for told in (0, 1, n - 1):
        with pytest.raises(ValueError, match="q8 packing refused"):
            K.q8_pack(w, dst_bytes=told)
    assert K.q8_pack(w, dst_bytes=n + 64).nbytes == n  # a larger buffer is fine
    f = W.WeightTensor.from_float(np.ones((4, 32), f32), W.F16, name="w")
    assert K.q8_packed_bytes(f) == 0
    with pytest.raises(ValueError, match="q8 packing refused"):
        K.q8_pack(f)
    with pytest.raises(ValueError, match="Q4_0, Q4_1 or Q8_0"):
        K.PackedQ8(f)
    with pytest.raises(ValueError, match="Q4_0, Q4_1 or Q8_0"):
        K.matmul_q8(f, np.ones(32, f32), packed=True)


def test_pack_wanted_only_with_vnni(level):
    wanted = [K.q8_pack_wanted(t) for t in Q_TYPES]
    assert K.q8_pack_wanted(W.F32) == 0 and K.q8_pack_wanted(W.F16) == 0
    assert K.q8_pack_wanted(-1) == 0
    if level != "avx512":
        assert wanted == [0, 0, 0]
    else:
        assert wanted in ([0, 0, 0], [1, 1, 1])  # 1 if the CPU has VNNI


@pytest.mark.parametrize("qtype", Q_TYPES)
@pytest.mark.parametrize("n_out,n_in", [(37, 32), (16, 64), (301, 576), (45, 2048)])
def test_packed_same_bits_as_unpacked(level, qtype, n_out, n_in):
    """The packed copy changes where the bytes are, not one bit of y: at every
    level, for 1 .. 9 and 20 x rows (the decode kernel, the 8-row prefill
    tiles and both), on 1 and 2 threads (2 threads split 37 and 301 rows
    inside a group of 16)."""
    rng = np.random.default_rng(n_out * n_in + qtype)
    w = make(rng, qtype, n_out, n_in)
    pw = K.PackedQ8(w)
    x = rng.standard_normal((20, n_in)).astype(f32)
    for n_seq in list(range(1, 10)) + [20]:
        for nt in (1, 2):
            want = K.matmul_q8(w, x[:n_seq], n_threads=nt)
            np.testing.assert_array_equal(K.matmul_q8(pw, x[:n_seq], n_threads=nt), want)
    np.testing.assert_array_equal(K.matmul_q8(w, x[3], n_threads=1, packed=True),
                                  np_matmul_q8(w, x[3]))


def test_packed_many_tiles_and_odd_scales():
    """More groups than one prefill tile holds, odd half scales and mins:
    packed and unpacked agree bit for bit, NaN positions included."""
    rng = np.random.default_rng(13)
    w = make(rng, W.Q4_1, 1250, 576)
    raw = w.data.reshape(1250, 18, 20)
    raw[5, 3, 0:2] = np.frombuffer(np.uint16(0x7C00).tobytes(), np.uint8)   # inf d
    raw[700, 17, 2:4] = np.frombuffer(np.uint16(0x0001).tobytes(), np.uint8)  # subnormal m
    pw = K.PackedQ8(w)
    x = rng.standard_normal((17, 576)).astype(f32)
    with np.errstate(invalid="ignore", over="ignore"):
        for n_seq in (1, 4, 17):
            for nt in (1, 2):
                want = K.matmul_q8(w, x[:n_seq], n_threads=nt)
                got = K.matmul_q8(pw, x[:n_seq], n_threads=nt)
                np.testing.assert_array_equal(got, want)
    assert np.isnan(want[:, 5]).all() or np.isinf(want[:, 5]).all()


def test_model_with_and_without_packed_copy():
    """A q8 model keeps a packed copy of every quantized matrix when the
    engine's SIMD level reads one (AVX-512 with VNNI); one built without the
    copies gives the same logits bit for bit, prefill and decode."""
    from fastattn import _engine
    config = random_config("llama", n_embd=96, n_head=3, n_kv_head=1, n_ff=160,
                           n_layer=2, n_vocab=200, n_ctx=64)
    weights = random_weights(config, qtype=W.Q4_1, embd_qtype=W.Q8_0, seed=4)
    ids = random_ids(config, 19, seed=5)
    packed = Transformer(config, weights, n_threads=2, activations="q8")
    plain = Transformer(config, weights, n_threads=2, activations="q8")
    matrices = {n: t for n, t in weights.items() if len(t.shape) == 2}
    vectors = {n: t.to_float() for n, t in weights.items() if len(t.shape) == 1}
    plain._engine = _engine.Model(config, matrices, vectors, 1, q8_pack=False)
    assert plain._engine.packed_bytes == 0
    expected = sum(K.q8_packed_bytes(t) for n, t in matrices.items()
                   if n not in ("token_embd.weight", "output.weight"))
    expected += K.q8_packed_bytes(weights.get("output.weight", weights["token_embd.weight"]))
    if packed._engine.packed_bytes == 0:
        pytest.skip("the engine's SIMD level has no VNNI q8 kernels: nothing to compare")
    assert packed._engine.packed_bytes == expected
    a = packed.forward(ids)
    np.testing.assert_array_equal(a, plain.forward(ids))
    for model in (packed, plain):
        state = model.new_state()
        steps = np.stack([model.decode(state, int(t)) for t in ids])
        np.testing.assert_array_equal(steps, a)


# ------------------------------------------------------------------ models


def log_softmax(z):
    z = z.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def divergence(exact, approx):
    """(max |logit diff|, mean KL, max KL) of softmax(exact) || softmax(approx), per row."""
    lp, lq = log_softmax(exact), log_softmax(approx)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    return float(np.abs(exact - approx).max()), float(kl.mean()), float(kl.max())


def test_activations_argument():
    config = random_config("llama", n_embd=64, n_head=4, n_kv_head=2)
    weights = random_weights(config, qtype=W.Q4_1, seed=0)
    with pytest.raises(ValueError, match="activations"):
        Transformer(config, weights, n_threads=1, activations="int8")
    assert Transformer(config, weights, n_threads=1).activations == "f32"


def test_float_weights_unchanged_by_q8():
    config = random_config("llama", n_embd=64, n_head=4, n_kv_head=2)
    weights = random_weights(config, qtype=W.F16, seed=0)
    ids = random_ids(config, 12, seed=1)
    a = Transformer(config, weights, n_threads=1).forward(ids)
    b = Transformer(config, weights, n_threads=1, activations="q8").forward(ids)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("family,qtype", [("llama", W.Q4_1), ("llama", W.Q4_0),
                                          ("llama", W.Q8_0), ("gpt2", W.Q4_1)])
def test_random_model_q8_vs_exact(family, qtype):
    config = random_config(family, n_embd=128, n_head=4, n_ff=256, n_layer=3,
                           n_vocab=256, n_ctx=64)
    weights = random_weights(config, qtype=qtype, seed=2)
    ids = random_ids(config, 40, seed=3)
    exact = Transformer(config, weights, n_threads=1).forward(ids)
    q1 = Transformer(config, weights, n_threads=1, activations="q8")
    q2 = Transformer(config, weights, n_threads=2, activations="q8")
    y1 = q1.forward(ids)
    np.testing.assert_array_equal(y1, q2.forward(ids))
    # prefill vs token-by-token decode: bit-identical
    state = q1.new_state()
    steps = np.stack([q1.decode(state, int(t)) for t in ids])
    np.testing.assert_array_equal(steps, y1)
    mx, kl_mean, kl_max = divergence(exact, y1)
    spread = float(np.abs(exact).max())
    # measured (these seeds): max diff 0.26-0.54 with logits up to ~32 (<= 1.7%),
    # KL mean 4.7e-4 .. 8.5e-4, KL max 3.2e-3 .. 9.3e-3, greedy agreement 100%
    assert mx < 0.05 * spread, (mx, spread)
    assert kl_mean < 5e-3 and kl_max < 5e-2, (kl_mean, kl_max)
    agree = np.mean(exact.argmax(-1) == y1.argmax(-1))
    assert agree >= 0.9, agree


# ----------------------------------------------------------------- SmolLM2

PARAGRAPH = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, "
    "carrying a lantern and a thermos of tea. From the top he could see the "
    "fishing boats returning to the harbor, their wakes silver in the fading "
    "light, and the gulls wheeling above the breakwater. He had kept the light "
    "for thirty years, and in all that time no ship had been lost on the rocks "
    "below the cliff.")


@pytest.mark.model
def test_smollm2_q8_divergence(smollm2_path):
    from fastattn.generation import Model
    m = Model.load(smollm2_path, n_threads=2)
    mq = Model.load(smollm2_path, n_threads=2, activations="q8")
    assert ("activations", "q8") in mq.describe()
    ids = m.tokenizer.encode(PARAGRAPH)
    exact = m.transformer.forward(ids)
    approx = mq.transformer.forward(ids)
    mx, kl_mean, kl_max = divergence(exact, approx)
    agree = float(np.mean(exact.argmax(-1) == approx.argmax(-1)))
    print(f"\nSmolLM2 q8 vs exact over {len(ids)} tokens: max |dlogit| {mx:.4f}, "
          f"KL mean {kl_mean:.2e} max {kl_max:.2e}, greedy agreement {agree:.3f}")
    # measured (the fma contract, one accumulator per output): max |dlogit| 1.88,
    # KL mean 2.85e-3, max 1.3e-2, agreement 0.901 (8 of 81 positions flip, near
    # ties); before the fmas: 2.13, 2.8e-3 to 3.1e-3, 1.2e-2, 0.926 (6 of 81)
    assert kl_mean < 1e-2 and kl_max < 0.1, (kl_mean, kl_max)
    assert agree >= 0.85, agree
    assert mx < 3.0, mx
    for i in np.nonzero(exact.argmax(-1) != approx.argmax(-1))[0]:
        top2 = np.sort(exact[i])[-2:]
        assert top2[1] - top2[0] < 0.5, (i, top2)  # only near ties flip


def test_cli_flag():
    from fastattn.cli import build_parser
    parser = build_parser()
    for cmd in (["generate", "-p", "hi"], ["chat"], ["score", "f.txt"]):
        assert parser.parse_args(cmd + ["--activations", "q8"]).activations == "q8"
        assert parser.parse_args(cmd).activations == "f32"
    with pytest.raises(SystemExit):
        parser.parse_args(["chat", "--activations", "int4"])
