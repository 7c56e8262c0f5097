"""Kernel benchmarks (pytest-benchmark).  Run from the repo root:

    python -m pytest benchmarks/test_kernels_bench.py --benchmark-columns=min,median,ops -s

Shapes are SmolLM2-135M's: n_embd 576, n_ff 1536, vocab 49152.  Each GEMV
records the weight bytes it streams and the GB/s achieved in extra_info (and
prints them with -s).  `test_model_pass` runs one GEMV over every matrix of a
SmolLM2-sized model (30 layers of Q4_1 plus the Q8_0 output head, ~96 MB, far
larger than L3), which bounds decode speed from weight traffic alone.
Rates (GB/s, GFLOP/s) are computed from the best round.
Levels: set FASTATTN_SIMD, or see the `level` parameter of the GEMV benchmarks.
Layouts: `file` is the weight as the file stores it, `packed` the 16-row
panels a Model repacks it into at load (csrc/packed.c), which is what the
engine runs; for the q8 cases, `packed` is the q8 kernels' copy a q8-mode
Model makes (csrc/quant_act.c).
"""
import os

import numpy as np
import pytest

from fastattn import _kernels as K
from fastattn import weights as W

N_THREADS = os.cpu_count() or 1
LEVELS = K.available_simd_levels()
TYPES = [W.F32, W.F16, W.BF16, W.Q8_0, W.Q4_0, W.Q4_1]


@pytest.fixture(params=LEVELS)
def level(request):
    before = K.simd_level()
    K.set_simd_level(request.param)
    yield request.param
    K.set_simd_level(before)


def random_weight(qtype, n_out, n_in, seed=0):
    """A weight of random bytes with sane scales (quantizing 28M floats in numpy
    would dominate the benchmark's setup time)."""
    rng = np.random.default_rng(seed)
    rb = W.row_bytes(qtype, n_in)
    if qtype in (W.F32, W.F16, W.BF16):
        return W.WeightTensor.from_float(rng.standard_normal((n_out, n_in), np.float32)
                                         * 0.05, qtype)
    data = rng.integers(0, 256, size=(n_out, rb), dtype=np.uint8)
    blocks = data.reshape(-1, W.TYPES[qtype][2])
    scale = np.array([0.01], np.float16).view(np.uint8)
    blocks[:, 0:2] = scale                            # d
    if qtype == W.Q4_1:
        blocks[:, 2:4] = np.array([-0.08], np.float16).view(np.uint8)  # m
    return W.WeightTensor(data, qtype, (n_out, n_in))


def best_time(benchmark):
    """Best seconds per call, or None under --benchmark-disable.  The minimum,
    not the mean: on a shared 2-core machine the mean measures the neighbours."""
    stats = getattr(benchmark, "stats", None)
    return stats.stats.min if stats else None


def report(benchmark, nbytes, label):
    best = best_time(benchmark)
    if best is None:
        return
    gbs = nbytes / best / 1e9
    benchmark.extra_info["weight_bytes"] = nbytes
    benchmark.extra_info["GB/s"] = round(gbs, 2)
    print(f"\n{label}: {best * 1e6:9.1f} us  {gbs:6.2f} GB/s")


LAYOUTS = ["file", "packed"]


def laid_out(w, layout):
    return K.Packed(w) if layout == "packed" else w


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("qtype", TYPES, ids=W.type_name)
@pytest.mark.parametrize("n_out,n_in", [(576, 1536), (1536, 576), (49152, 576)])
def test_gemv(benchmark, level, qtype, n_out, n_in, layout):
    if n_out == 49152 and qtype in (W.F32, W.F16, W.BF16) and level == "generic":
        pytest.skip("slow and uninformative")
    w = random_weight(qtype, n_out, n_in)
    x = np.random.default_rng(1).standard_normal((1, n_in)).astype(np.float32)
    benchmark(K.matmul, laid_out(w, layout), x, N_THREADS)
    report(benchmark, w.data.nbytes,
           f"gemv {W.type_name(qtype)} {n_out}x{n_in} {layout} {level} x{N_THREADS}")


Q8_TYPES = [W.Q8_0, W.Q4_0, W.Q4_1]


def laid_out_q8(w, layout):
    """`packed` is the q8 kernels' copy a q8-mode Model makes at load."""
    return K.PackedQ8(w) if layout == "packed" else w


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("qtype", Q8_TYPES, ids=W.type_name)
@pytest.mark.parametrize("n_out,n_in", [(576, 1536), (1536, 576), (49152, 576)])
def test_gemv_q8(benchmark, level, qtype, n_out, n_in, layout):
    """The opt-in "q8 activations" product (csrc/quant_act.c), not exact.
    Also reports GMAC/s per thread (multiply-adds a second, over N_THREADS)."""
    w = random_weight(qtype, n_out, n_in)
    x = np.random.default_rng(1).standard_normal((1, n_in)).astype(np.float32)
    benchmark(K.matmul_q8, laid_out_q8(w, layout), x, N_THREADS)
    report(benchmark, w.data.nbytes,
           f"gemv q8-act {W.type_name(qtype)} {n_out}x{n_in} {layout} {level} x{N_THREADS}")
    if best_time(benchmark):
        gmac = n_out * n_in / best_time(benchmark) / 1e9 / N_THREADS
        benchmark.extra_info["GMAC/s per thread"] = round(gmac, 1)
        print(f"  = {gmac:.1f} GMAC/s per thread")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("qtype", Q8_TYPES, ids=W.type_name)
def test_gemm_prefill_q8(benchmark, qtype, layout):
    """512 rows through a 1536x576 weight with q8 activations."""
    w = random_weight(qtype, 1536, 576)
    x = np.random.default_rng(1).standard_normal((512, 576)).astype(np.float32)
    benchmark(K.matmul_q8, laid_out_q8(w, layout), x, N_THREADS)
    if best_time(benchmark) is None:
        return
    benchmark.extra_info["GFLOP/s"] = round(2 * 512 * 1536 * 576 / best_time(benchmark) / 1e9, 1)
    print(f"\ngemm q8-act {W.type_name(qtype)} 512x1536x576 {layout} {K.simd_name()}: "
          f"{benchmark.extra_info['GFLOP/s']} GFLOP/s")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("qtype", TYPES, ids=W.type_name)
def test_gemm_prefill(benchmark, qtype, layout):
    """512 rows through a 1536x576 weight: the cache-aware path."""
    w = random_weight(qtype, 1536, 576)
    x = np.random.default_rng(1).standard_normal((512, 576)).astype(np.float32)
    benchmark(K.matmul, laid_out(w, layout), x, N_THREADS)
    flops = 2 * 512 * 1536 * 576
    if best_time(benchmark) is None:
        return
    benchmark.extra_info["GFLOP/s"] = round(flops / best_time(benchmark) / 1e9, 1)
    print(f"\ngemm {W.type_name(qtype)} 512x1536x576 {K.simd_name()}: "
          f"{benchmark.extra_info['GFLOP/s']} GFLOP/s")


@pytest.mark.parametrize("n_ctx", [128, 1024, 4096])
@pytest.mark.parametrize("n_seq", [1, 64])
def test_attention(benchmark, n_ctx, n_seq):
    """SmolLM2 heads: 9 query heads over 3 KV heads of 64."""
    if n_seq > n_ctx:
        pytest.skip("prefill longer than the context")
    rng = np.random.default_rng(0)
    q = rng.standard_normal((n_seq, 9 * 64)).astype(np.float32)
    k = rng.standard_normal((3, n_ctx, 64)).astype(np.float32)
    v = rng.standard_normal((3, n_ctx, 64)).astype(np.float32)
    benchmark(K.attention, q, k, v, n_ctx - n_seq, 9, 3, N_THREADS)


@pytest.mark.parametrize("n_seq", [1, 512])
def test_rms_norm(benchmark, n_seq):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n_seq, 576)).astype(np.float32)
    g = rng.standard_normal(576).astype(np.float32)
    benchmark(K.rms_norm, x, g, 1e-5, N_THREADS)


@pytest.mark.parametrize("n_seq", [1, 512])
def test_swiglu(benchmark, n_seq):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n_seq, 1536)).astype(np.float32)
    b = rng.standard_normal((n_seq, 1536)).astype(np.float32)
    benchmark(K.swiglu, a, b, N_THREADS)


def smollm2_matrices():
    """One weight per matrix a SmolLM2-135M decode step reads, as (n_out, n_in, type)."""
    layer = [(576, 576), (192, 576), (192, 576), (576, 576),      # q k v o
             (1536, 576), (1536, 576), (576, 1536)]               # gate up down
    mats = [(o, i, W.Q4_1) for _ in range(30) for o, i in layer]
    return mats + [(49152, 576, W.Q8_0)]                          # tied output head


@pytest.fixture(scope="module")
def model_weights():
    return [random_weight(t, o, i, seed=n) for n, (o, i, t) in enumerate(smollm2_matrices())]


def model_pass(benchmark, level, model_weights, layout, q8):
    """One GEMV over every matrix of a SmolLM2-sized model, one call each.
    Each call opens its own OpenMP region (a decode step opens one for all),
    so with 2 threads the waking of threads weighs in; stream_decode.c times
    the pass without that."""
    xs = {n: np.random.default_rng(n).standard_normal((1, n)).astype(np.float32)
          for n in (576, 1536)}
    lay = laid_out_q8 if q8 else laid_out
    product = K.matmul_q8 if q8 else K.matmul
    weights = [(lay(w, layout), w.n_in) for w in model_weights]

    def one_pass():
        for w, n_in in weights:
            product(w, xs[n_in], N_THREADS)

    benchmark(one_pass)
    nbytes = sum(w.data.nbytes for w in model_weights)
    report(benchmark, nbytes, f"model pass{' q8-act' if q8 else ''} {nbytes / 1e6:.0f} MB "
                              f"{layout} {level} x{N_THREADS}")
    if best_time(benchmark):
        print(f"  = {1 / best_time(benchmark):.0f} passes/s (tok/s bound from weights)")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_model_pass_q8(benchmark, level, model_weights, layout):
    """The pass with q8 activations: `packed` is what a q8-mode Model runs."""
    model_pass(benchmark, level, model_weights, layout, q8=True)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_model_pass(benchmark, level, model_weights, layout):
    """The pass with float activations: `packed` is what a Model runs."""
    model_pass(benchmark, level, model_weights, layout, q8=False)
