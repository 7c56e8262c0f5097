# cython: language_level=3
"""Python entry points to the C kernels in csrc/, for tests and benchmarks.

Each wrapper checks types, dtypes, shapes and contiguity before it touches a
pointer, raises ValueError (or a fastattn error) naming the argument and the
value at fault, and releases the GIL around the C call.  Results are new
float32 arrays; inputs are never modified.

    >>> import numpy as np
    >>> from fastattn import _kernels, weights
    >>> w = weights.WeightTensor.from_float(np.eye(32, dtype=np.float32), weights.Q8_0)
    >>> _kernels.matmul(w, np.ones((1, 32), np.float32))[0, :3]
    array([1., 1., 1.], dtype=float32)

Shapes: x [n_seq, n_in], W [n_out, n_in], y [n_seq, n_out];
q, out [n_seq, n_head * head_dim]; k_cache, v_cache [n_kv_head, n_ctx, head_dim].
"""
import os

import numpy as np

cimport numpy as cnp
cimport openmp
from cython.parallel cimport parallel
from libc.stdint cimport int8_t, int64_t, uint8_t, uint16_t

from .errors import UnsupportedError
from .weights import TYPES, type_name

cnp.import_array()


cdef extern from "fastattn.h" nogil:
    ctypedef struct fa_weight:
        const void *data
        int type
        int64_t n_out
        int64_t n_in
        size_t row_bytes
        const void *packed
        const void *packed_q8

    size_t fa_row_bytes(int type, int64_t n_in)
    size_t fa_packed_bytes(const fa_weight *w)
    int fa_pack_weight(const fa_weight *w, void *dst, size_t dst_bytes)
    size_t fa_q8_packed_bytes(const fa_weight *w)
    int fa_q8_pack_weight(const fa_weight *w, void *dst, size_t dst_bytes)
    int fa_q8_pack_wanted(int type)
    int fa_simd_level()
    int fa_set_simd_level(int level)
    const char *fa_simd_name(int level)

    void fa_matmul(const fa_weight *w, const float *x, float *y, int64_t n_seq,
                   int ith, int nth)
    void fa_dequant_row(const fa_weight *w, int64_t row, float *out)
    void fa_layer_norm(const float *x, const float *g, const float *b, float *y,
                       int64_t n_seq, int64_t n, float eps, int ith, int nth)
    void fa_rms_norm(const float *x, const float *g, float *y,
                     int64_t n_seq, int64_t n, float eps, int ith, int nth)
    void fa_gelu(float *x, int64_t n, int ith, int nth)
    void fa_swiglu(float *gate, const float *up, int64_t n, int ith, int nth)
    void fa_add_bias(float *x, const float *b, int64_t n_seq, int64_t n, int ith, int nth)
    void fa_rope(float *x, int64_t n_seq, int n_head, int head_dim, int64_t pos0,
                 float theta, int neox, int ith, int nth)
    void fa_attention(const float *q, const float *k, const float *v, float *out,
                      int64_t n_seq, int64_t pos0, int n_head, int n_kv_head,
                      int head_dim, int64_t n_ctx, float *scratch, int ith, int nth)
    void fa_parallel_matmul(const fa_weight *w, const float *x, float *y, int64_t n_seq,
                            int n_threads)
    int fa_act_q8_supports(int type)
    void fa_parallel_matmul_act(int act, const fa_weight *w, const float *x, float *y,
                                int64_t n_seq, int n_threads)
    void fa_quantize_act_q8(const float *x, int64_t n, int8_t *q, float *d, float *s)


cdef extern from "model.h" nogil:
    void fa_attention_kv(const float *q, const void *k, const void *v, int kv_type,
                         float *out, int64_t n_seq, int64_t pos0, int n_head,
                         int n_kv_head, int head_dim, int64_t n_ctx, int ith, int nth)


cdef extern from "fa_internal.h" nogil:
    int fa_q8_amx_available()
    void fa_q8_set_amx(int on)
    int fa_q8_amx_in_use()
    int fa_team_threads(int n_threads)
    int fa_team_started()
    void fa_team_lose()
    ctypedef struct fa_kernels:
        void (*to_f16)(uint16_t *dst, const float *src, int64_t n) noexcept nogil
    const fa_kernels *fa_kernels_current()

SIMD_LEVELS = {"generic": 0, "avx2": 1, "avx512": 2}


def _engine():
    """fastattn._engine, the model's compiled core.  It is built from the
    same C files as this module and so holds its own copy of every runtime
    switch (the SIMD level, the AMX switch); the setters here move both."""
    from . import _engine as engine
    return engine


def _team_started():
    """True if this module has run a parallel region with more than one thread."""
    return bool(fa_team_started())


def _lose_team():
    """Run every parallel region on one thread from now on (fastattn/_fork.py)."""
    fa_team_lose()


from . import _fork  # noqa: E402
_fork.register()

# ------------------------------------------------------------------ checks


cdef int _threads(n_threads) except -1:
    """n_threads, defaulting to os.cpu_count(); must be a positive int."""
    if n_threads is None:
        return os.cpu_count() or 1
    if isinstance(n_threads, bool) or not isinstance(n_threads, (int, np.integer)):
        raise ValueError(f"n_threads: expected a positive int, got {n_threads!r}")
    if n_threads < 1 or n_threads > 256:  # fastattn.model.MAX_THREADS, and why
        raise ValueError(f"n_threads: expected 1 .. 256, got {n_threads}")
    return fa_team_threads(n_threads)  # 1 in a forked child (fastattn/_fork.py)


cdef cnp.ndarray _f32(a, str name, int ndim):
    """Check that `a` is a C-contiguous float32 ndarray of ndim dimensions."""
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{name}: expected a numpy float32 array, got {type(a).__name__}")
    if a.dtype != np.float32:
        raise ValueError(f"{name}: expected dtype float32, got {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {a.shape}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name}: array must be C-contiguous")
    if not a.flags.aligned:     # a float32 view at an odd byte offset
        raise ValueError(f"{name}: array must be aligned to 4 bytes")
    return a


cdef cnp.ndarray _f16(a, str name, int ndim):
    """Check that `a` is a C-contiguous float16 ndarray of ndim dimensions."""
    if not isinstance(a, np.ndarray) or a.dtype != np.float16:
        raise ValueError(f"{name}: expected a numpy float16 array (as k_cache), got "
                         f"{getattr(a, 'dtype', type(a).__name__)}")
    if a.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {a.shape}")
    if not a.flags.c_contiguous or not a.flags.aligned:
        raise ValueError(f"{name}: array must be C-contiguous and aligned to 2 bytes")
    return a


cdef int64_t _as_int(v, str name, lo, hi=None) except? -1:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise ValueError(f"{name}: expected an int, got {v!r}")
    if v < lo:
        raise ValueError(f"{name}: must be >= {lo}, got {v}")
    if hi is not None and v > hi:
        raise ValueError(f"{name}: must be <= {hi}, got {v}")
    return v


cdef class _Weight:
    """A checked fa_weight view that keeps its byte buffer alive."""
    cdef fa_weight w
    cdef object data
    cdef object packed_buf
    cdef object packed_q8_buf
    cdef str name

    def __init__(self, w):
        if isinstance(w, tuple) and len(w) == 3:
            data, qtype, shape = w
            name = "weight"
        elif hasattr(w, "data") and hasattr(w, "qtype") and hasattr(w, "shape"):
            data, qtype, shape = w.data, w.qtype, w.shape
            name = getattr(w, "name", "") or "weight"
        else:
            raise ValueError("weight: expected a WeightTensor or a (data, qtype, shape) "
                             f"tuple, got {type(w).__name__}")
        self.name = name
        if isinstance(qtype, bool) or not isinstance(qtype, (int, np.integer)) \
                or int(qtype) not in TYPES:
            raise UnsupportedError(f"{name}: tensor type {qtype!r} is not supported "
                                   f"(supported: {', '.join(n for n, _, _ in TYPES.values())})")
        try:
            shape = tuple(int(s) for s in shape)
        except TypeError:
            raise ValueError(f"{name}: shape must be a tuple of ints, got {shape!r}")
        if len(shape) == 1:
            shape = (1,) + shape
        if len(shape) != 2 or not (1 <= shape[0] <= 1 << 40 and 1 <= shape[1] <= 1 << 40):
            raise ValueError(f"{name}: expected shape (n_out, n_in) with both in "
                             f"1 .. 2**40, got {shape}")
        cdef size_t rb = fa_row_bytes(int(qtype), shape[1])
        if rb == 0:
            raise ValueError(f"{name}: row length {shape[1]} is not a positive multiple "
                             f"of the {type_name(int(qtype))} block size")
        if not isinstance(data, np.ndarray):
            raise ValueError(f"{name}: data must be a numpy array, got {type(data).__name__}")
        if not data.flags.c_contiguous:
            raise ValueError(f"{name}: data must be C-contiguous")
        if data.nbytes != shape[0] * rb:
            raise ValueError(f"{name}: data holds {data.nbytes} bytes, shape {shape} of "
                             f"{type_name(int(qtype))} needs {shape[0] * rb}")
        if data.ctypes.data % {0: 4, 1: 2, 30: 2}.get(int(qtype), 1):
            raise ValueError(f"{name}: {type_name(int(qtype))} data must be aligned to "
                             f"its element size")
        self.data = data
        self.w.data = cnp.PyArray_DATA(<cnp.ndarray>data)
        self.w.type = int(qtype)
        self.w.n_out = shape[0]
        self.w.n_in = shape[1]
        self.w.row_bytes = rb
        self.w.packed = NULL
        self.w.packed_q8 = NULL

    cdef pack(self, bint q8=False):
        """Point w.packed at a panel-packed copy (csrc/packed.c), or with q8
        w.packed_q8 at the q8 kernels' copy (csrc/quant_act.c)."""
        cdef size_t n = fa_q8_packed_bytes(&self.w) if q8 else fa_packed_bytes(&self.w)
        if n == 0:
            raise ValueError(f"{self.name}: cannot be packed"
                             f"{' for q8 activations' if q8 else ''} "
                             f"({type_name(self.w.type)}, n_in = {self.w.n_in})")
        buf = _pack_into(self, n, q8)
        if q8:
            self.packed_q8_buf = buf
            self.w.packed_q8 = cnp.PyArray_DATA(<cnp.ndarray>buf)
        else:
            self.packed_buf = buf
            self.w.packed = cnp.PyArray_DATA(<cnp.ndarray>buf)


cdef _pack_into(_Weight wt, size_t dst_bytes, bint q8):
    """fa_pack_weight (q8: fa_q8_pack_weight) into a new 64-byte aligned buffer
    of dst_bytes; ValueError if the C code refuses."""
    buf = np.zeros(dst_bytes + 64, dtype=np.uint8)
    buf = buf[(-buf.ctypes.data) % 64:][:dst_bytes]
    cdef void *dst = cnp.PyArray_DATA(<cnp.ndarray>buf) if dst_bytes else NULL
    cdef int rc
    with nogil:
        if q8:
            rc = fa_q8_pack_weight(&wt.w, dst, dst_bytes)
        else:
            rc = fa_pack_weight(&wt.w, dst, dst_bytes)
    if rc != 0:
        need = fa_q8_packed_bytes(&wt.w) if q8 else fa_packed_bytes(&wt.w)
        raise ValueError(f"{wt.name}: {'q8 ' if q8 else ''}packing refused "
                         f"({type_name(wt.w.type)}, shape ({wt.w.n_out}, {wt.w.n_in}), "
                         f"buffer of {dst_bytes} bytes, {need} needed)")
    return buf


# ---------------------------------------------------------------- products


class Packed:
    """A weight packed once into 16-row panels, for repeated matmul calls
    (benchmarks, tests): Packed(w) where w is what matmul takes."""

    def __init__(self, w):
        cdef _Weight wt = _Weight(w)
        wt.pack()
        self.weight = wt


def packed_bytes(w):
    """fa_packed_bytes: bytes of w's panel-packed copy, 0 if it cannot be packed."""
    cdef _Weight wt = _Weight(w)
    return fa_packed_bytes(&wt.w)


def row_bytes(qtype, n_in):
    """fa_row_bytes: bytes one row of n_in values takes, 0 if the type is
    unknown or n_in is not a positive multiple of its block size."""
    return fa_row_bytes(_as_int(qtype, "qtype", -(1 << 31), (1 << 31) - 1),
                        _as_int(n_in, "n_in", -(1 << 62), 1 << 62))


cdef _product(_Weight wt, x, n_threads, int act):
    """y = x W^T through fa_parallel_matmul_act(act, ...), x [n_seq, n_in] or [n_in]."""
    cdef int nt = _threads(n_threads)
    squeeze = isinstance(x, np.ndarray) and x.ndim == 1
    cdef cnp.ndarray xa = _f32(x[None, :] if squeeze else x, "x", 2)
    if xa.shape[1] != wt.w.n_in:
        raise ValueError(f"x: has {xa.shape[1]} columns, {wt.name} has n_in = {wt.w.n_in}")
    if xa.shape[0] < 1:
        raise ValueError("x: needs at least one row (n_seq >= 1)")
    cdef int64_t n_seq = xa.shape[0]
    cdef cnp.ndarray y = np.empty((n_seq, wt.w.n_out), dtype=np.float32)
    cdef const float *px = <const float *>cnp.PyArray_DATA(xa)
    cdef float *py = <float *>cnp.PyArray_DATA(y)
    with nogil:
        fa_parallel_matmul_act(act, &wt.w, px, py, n_seq, nt)
    return y[0] if squeeze else y


def matmul(w, x, n_threads=None, packed=False):
    """y = x W^T.  w: WeightTensor or (data, qtype, (n_out, n_in));
    x [n_seq, n_in] (or [n_in]) float32 -> y [n_seq, n_out] (or [n_out]).
    packed: repack w into 16-row panels first (what a Model does at load);
    w may also be a Packed weight."""
    cdef _Weight wt
    if isinstance(w, Packed):
        wt = w.weight
    else:
        wt = _Weight(w)
        if packed:
            wt.pack()
    return _product(wt, x, n_threads, 0)


class PackedQ8:
    """A Q4_0 / Q4_1 / Q8_0 weight with the q8 kernels' packed copy made once
    (what a Model in q8 mode does at load), for repeated matmul_q8 calls:
    PackedQ8(w) where w is what matmul_q8 takes."""

    def __init__(self, w):
        cdef _Weight wt = _Weight(w)
        _q8_weight_check(wt)
        wt.pack(True)
        self.weight = wt


cdef _q8_weight_check(_Weight wt):
    if not fa_act_q8_supports(wt.w.type):
        raise ValueError(f"{wt.name}: q8 activations take Q4_0, Q4_1 or Q8_0 weights, "
                         f"got {type_name(wt.w.type)}")


def matmul_q8(w, x, n_threads=None, packed=False):
    """matmul with "q8 activations" (csrc/quant_act.c): x rounded to 8-bit
    blocks, integer dot products.  Q4_0 / Q4_1 / Q8_0 weights only.
    packed: make the q8 kernels' packed copy of w first (what a Model in q8
    mode does at load); w may also be a PackedQ8 weight.  The SIMD levels
    without VNNI ignore the copy.  Same numbers either way."""
    cdef _Weight wt
    if isinstance(w, PackedQ8):
        wt = w.weight
    else:
        wt = _Weight(w)
        _q8_weight_check(wt)
        if packed:
            wt.pack(True)
    return _product(wt, x, n_threads, 1)


def q8_packed_bytes(w):
    """fa_q8_packed_bytes: bytes of w's q8 packed copy, 0 if it cannot be packed."""
    cdef _Weight wt = _Weight(w)
    return fa_q8_packed_bytes(&wt.w)


def q8_pack(w, dst_bytes=None):
    """The q8 packed copy of w as uint8 [q8_packed_bytes(w)] (for tests).
    dst_bytes: the buffer size to tell fa_q8_pack_weight (default: the size
    needed); a smaller one must be refused with ValueError."""
    cdef _Weight wt = _Weight(w)
    cdef size_t n = fa_q8_packed_bytes(&wt.w)
    if dst_bytes is None:
        return _pack_into(wt, n, True)
    return _pack_into(wt, _as_int(dst_bytes, "dst_bytes", 0, n + 4096), True)[:n]


def q8_pack_wanted(qtype):
    """fa_q8_pack_wanted: 1 if the SIMD level in use reads q8 packed copies of
    qtype (AVX-512 with VNNI and a Q4_0 / Q4_1 / Q8_0 type), else 0."""
    return fa_q8_pack_wanted(_as_int(qtype, "qtype", -(1 << 31), (1 << 31) - 1))


def q8_amx_available():
    """True if the q8 kernels can run a prefill's products on AMX-INT8 tiles
    (the CPU has them, Linux lends them, FASTATTN_NO_AMX is not set)."""
    return bool(fa_q8_amx_available())


def set_q8_amx(on):
    """Let the q8 kernels use AMX-INT8 where available (on, the default), or
    keep them on the VNNI tiles; the numbers are the same either way.  Applies
    to the kernels here and to the model engine alike."""
    fa_q8_set_amx(1 if on else 0)
    _engine()._set_q8_amx(1 if on else 0)


def q8_amx_in_use():
    """True if the q8 kernels run a prefill's products on AMX now (available,
    and not switched off by set_q8_amx)."""
    return bool(fa_q8_amx_in_use())


def quantize_act_q8(x):
    """x [n] float32, n a multiple of 32 -> (q int8 [n], d float32 [n/32],
    s float32 [n/32]): the activation rounding matmul_q8 applies to each row."""
    cdef cnp.ndarray xa = _f32(x, "x", 1)
    cdef int64_t n = xa.shape[0]
    if n < 32 or n % 32:
        raise ValueError(f"x: length must be a positive multiple of 32, got {n}")
    cdef cnp.ndarray q = np.empty(n, dtype=np.int8)
    cdef cnp.ndarray d = np.empty(n // 32, dtype=np.float32)
    cdef cnp.ndarray s = np.empty(n // 32, dtype=np.float32)
    cdef const float *px = <const float *>cnp.PyArray_DATA(xa)
    cdef int8_t *pq = <int8_t *>cnp.PyArray_DATA(q)
    cdef float *pd = <float *>cnp.PyArray_DATA(d)
    cdef float *ps = <float *>cnp.PyArray_DATA(s)
    with nogil:
        fa_quantize_act_q8(px, n, pq, pd, ps)
    return q, d, s


def dequant_row(w, row):
    """W[row, :] as float32 [n_in]."""
    cdef _Weight wt = _Weight(w)
    cdef int64_t r = _as_int(row, "row", 0, wt.w.n_out - 1)
    cdef cnp.ndarray out = np.empty(wt.w.n_in, dtype=np.float32)
    cdef float *po = <float *>cnp.PyArray_DATA(out)
    with nogil:
        fa_dequant_row(&wt.w, r, po)
    return out


# ------------------------------------------------------------------- norms


def _vector(v, str name, int64_t n):
    cdef cnp.ndarray a = _f32(v, name, 1)
    if a.shape[0] != n:
        raise ValueError(f"{name}: expected length {n}, got {a.shape[0]}")
    return a


def layer_norm(x, g, b=None, eps=1e-5, n_threads=None):
    """y = (x - mean) / sqrt(var + eps) * g + b per row; x [n_seq, n]."""
    cdef int nt = _threads(n_threads)
    cdef cnp.ndarray xa = _f32(x, "x", 2)
    cdef int64_t n_seq = xa.shape[0], n = xa.shape[1]
    cdef cnp.ndarray ga = _vector(g, "g", n)
    cdef cnp.ndarray ba = _vector(b, "b", n) if b is not None else None
    cdef cnp.ndarray y = np.empty_like(xa)
    cdef float feps = float(eps)
    cdef const float *px = <const float *>cnp.PyArray_DATA(xa)
    cdef const float *pg = <const float *>cnp.PyArray_DATA(ga)
    cdef const float *pb = <const float *>cnp.PyArray_DATA(ba) if ba is not None else NULL
    cdef float *py = <float *>cnp.PyArray_DATA(y)
    if n_seq == 0 or n == 0:
        return y
    with nogil, parallel(num_threads=nt):
        fa_layer_norm(px, pg, pb, py, n_seq, n, feps,
                      openmp.omp_get_thread_num(), openmp.omp_get_num_threads())
    return y


def rms_norm(x, g, eps=1e-5, n_threads=None):
    """y = x / sqrt(mean(x^2) + eps) * g per row; x [n_seq, n]."""
    cdef int nt = _threads(n_threads)
    cdef cnp.ndarray xa = _f32(x, "x", 2)
    cdef int64_t n_seq = xa.shape[0], n = xa.shape[1]
    cdef cnp.ndarray ga = _vector(g, "g", n)
    cdef cnp.ndarray y = np.empty_like(xa)
    cdef float feps = float(eps)
    cdef const float *px = <const float *>cnp.PyArray_DATA(xa)
    cdef const float *pg = <const float *>cnp.PyArray_DATA(ga)
    cdef float *py = <float *>cnp.PyArray_DATA(y)
    if n_seq == 0 or n == 0:
        return y
    with nogil, parallel(num_threads=nt):
        fa_rms_norm(px, pg, py, n_seq, n, feps,
                    openmp.omp_get_thread_num(), openmp.omp_get_num_threads())
    return y


# ------------------------------------------------------------- activations


def _contiguous_copy(x, str name):
    if not isinstance(x, np.ndarray) or x.dtype != np.float32:
        raise ValueError(f"{name}: expected a numpy float32 array, got "
                         f"{getattr(x, 'dtype', type(x).__name__)}")
    if not x.flags.c_contiguous:
        raise ValueError(f"{name}: array must be C-contiguous")
    return x.copy()


def gelu(x, n_threads=None):
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), any shape."""
    cdef int nt = _threads(n_threads)
    cdef cnp.ndarray y = _contiguous_copy(x, "x")
    cdef int64_t n = y.size
    cdef float *py = <float *>cnp.PyArray_DATA(y)
    if n == 0:
        return y
    with nogil, parallel(num_threads=nt):
        fa_gelu(py, n, openmp.omp_get_thread_num(), openmp.omp_get_num_threads())
    return y


def swiglu(gate, up, n_threads=None):
    """silu(gate) * up, silu(z) = z / (1 + exp(-z)); gate and up of one shape."""
    cdef int nt = _threads(n_threads)
    cdef cnp.ndarray y = _contiguous_copy(gate, "gate")
    if not isinstance(up, np.ndarray) or up.dtype != np.float32 \
            or not up.flags.c_contiguous:
        raise ValueError("up: expected a C-contiguous numpy float32 array")
    if up.shape != gate.shape:
        raise ValueError(f"up: shape {up.shape} differs from gate's {gate.shape}")
    cdef cnp.ndarray ua = up
    cdef int64_t n = y.size
    cdef float *py = <float *>cnp.PyArray_DATA(y)
    cdef const float *pu = <const float *>cnp.PyArray_DATA(ua)
    if n == 0:
        return y
    with nogil, parallel(num_threads=nt):
        fa_swiglu(py, pu, n, openmp.omp_get_thread_num(), openmp.omp_get_num_threads())
    return y


def add_bias(x, b, n_threads=None):
    """x + b per row; x [n_seq, n], b [n]."""
    cdef int nt = _threads(n_threads)
    _f32(x, "x", 2)
    cdef cnp.ndarray y = x.copy()
    cdef int64_t n_seq = y.shape[0], n = y.shape[1]
    cdef cnp.ndarray ba = _vector(b, "b", n)
    cdef float *py = <float *>cnp.PyArray_DATA(y)
    cdef const float *pb = <const float *>cnp.PyArray_DATA(ba)
    if n_seq == 0 or n == 0:
        return y
    with nogil, parallel(num_threads=nt):
        fa_add_bias(py, pb, n_seq, n,
                    openmp.omp_get_thread_num(), openmp.omp_get_num_threads())
    return y


# -------------------------------------------------------------- attention


def rope(x, n_head, head_dim, pos0=0, theta=10000.0, neox=False, n_threads=None):
    """Rotary embedding of x [n_seq, n_head * head_dim], row s at pos0 + s.
    neox=False rotates pairs (2i, 2i+1), neox=True pairs (i, i + head_dim/2)."""
    cdef int nt = _threads(n_threads)
    cdef int nh = _as_int(n_head, "n_head", 1, 1 << 16)
    cdef int hd = _as_int(head_dim, "head_dim", 2, 1 << 16)
    cdef int64_t p0 = _as_int(pos0, "pos0", 0)
    if hd % 2:
        raise ValueError(f"head_dim: must be even, got {hd}")
    if not theta > 0:
        raise ValueError(f"theta: must be positive, got {theta}")
    _f32(x, "x", 2)
    if x.shape[1] != nh * hd:
        raise ValueError(f"x: has {x.shape[1]} columns, n_head * head_dim = {nh * hd}")
    cdef cnp.ndarray y = x.copy()
    cdef int64_t n_seq = y.shape[0]
    cdef float ftheta = float(theta)
    cdef int fneox = 1 if neox else 0
    cdef float *py = <float *>cnp.PyArray_DATA(y)
    if n_seq == 0:
        return y
    with nogil, parallel(num_threads=nt):
        fa_rope(py, n_seq, nh, hd, p0, ftheta, fneox,
                openmp.omp_get_thread_num(), openmp.omp_get_num_threads())
    return y


def attention(q, k_cache, v_cache, pos0, n_head, n_kv_head, n_threads=None):
    """Causal attention.  q [n_seq, n_head * head_dim], query s at position
    pos0 + s; k_cache, v_cache [n_kv_head, n_ctx, head_dim] filled for positions
    0 .. pos0 + n_seq - 1, both float32 or both float16 (the f16 KV cache's
    kernels).  Returns out [n_seq, n_head * head_dim]."""
    cdef int nt = _threads(n_threads)
    cdef int nh = _as_int(n_head, "n_head", 1, 1 << 16)
    cdef int nkv = _as_int(n_kv_head, "n_kv_head", 1, nh)
    if nh % nkv:
        raise ValueError(f"n_kv_head: {nkv} does not divide n_head = {nh}")
    cdef int64_t p0 = _as_int(pos0, "pos0", 0)
    cdef cnp.ndarray qa = _f32(q, "q", 2)
    cdef bint f16 = isinstance(k_cache, np.ndarray) and k_cache.dtype == np.float16
    cdef cnp.ndarray ka, va
    if f16:
        ka, va = _f16(k_cache, "k_cache", 3), _f16(v_cache, "v_cache", 3)
    else:
        ka, va = _f32(k_cache, "k_cache", 3), _f32(v_cache, "v_cache", 3)
    if ka.shape[0] != nkv:
        raise ValueError(f"k_cache: has {ka.shape[0]} heads, n_kv_head = {nkv}")
    if va.shape[0] != ka.shape[0] or va.shape[1] != ka.shape[1] \
            or va.shape[2] != ka.shape[2]:
        raise ValueError(f"v_cache: shape {(<object>va).shape} differs from k_cache's "
                         f"{(<object>ka).shape}")
    cdef int64_t n_ctx = ka.shape[1]
    cdef int hd = ka.shape[2]
    cdef int64_t n_seq = qa.shape[0]
    if hd < 1 or n_ctx < 1:
        raise ValueError(f"k_cache: empty shape {(<object>ka).shape}")
    if qa.shape[1] != <int64_t>nh * hd:
        raise ValueError(f"q: has {qa.shape[1]} columns, n_head * head_dim = {nh * hd}")
    if n_seq < 1:
        raise ValueError("q: needs at least one row (n_seq >= 1)")
    if p0 + n_seq > n_ctx:
        raise ValueError(f"pos0 + n_seq = {p0 + n_seq} exceeds the cache's n_ctx = {n_ctx}")
    cdef cnp.ndarray out = np.empty_like(qa)
    cdef cnp.ndarray scratch = np.empty(nt * (p0 + n_seq), dtype=np.float32)
    cdef const float *pq = <const float *>cnp.PyArray_DATA(qa)
    cdef const float *pk = <const float *>cnp.PyArray_DATA(ka)
    cdef const float *pv = <const float *>cnp.PyArray_DATA(va)
    cdef float *po = <float *>cnp.PyArray_DATA(out)
    cdef float *ps = <float *>cnp.PyArray_DATA(scratch)
    if f16:
        with nogil, parallel(num_threads=nt):
            fa_attention_kv(pq, pk, pv, 1, po, n_seq, p0, nh, nkv, hd, n_ctx,
                            openmp.omp_get_thread_num(), openmp.omp_get_num_threads())
        return out
    with nogil, parallel(num_threads=nt):
        fa_attention(pq, pk, pv, po, n_seq, p0, nh, nkv, hd, n_ctx, ps,
                     openmp.omp_get_thread_num(), openmp.omp_get_num_threads())
    return out


def to_f16(x):
    """x (float32, any shape) rounded to IEEE halves by the converter the f16
    KV cache writes with at the SIMD level in use: a float16 array."""
    cdef cnp.ndarray a = np.ascontiguousarray(x, dtype=np.float32)
    cdef cnp.ndarray h = np.empty((<object>a).shape, dtype=np.float16)
    cdef int64_t n = a.size
    cdef const float *src = <const float *>cnp.PyArray_DATA(a)
    cdef uint16_t *dst = <uint16_t *>cnp.PyArray_DATA(h)
    cdef const fa_kernels *kern = fa_kernels_current()
    with nogil:
        kern.to_f16(dst, src, n)
    return h


# ------------------------------------------------------------------- SIMD


def simd_level():
    """The SIMD level in use: 0 generic, 1 avx2, 2 avx512."""
    return fa_simd_level()


def simd_name(level=None):
    """The name of `level` (default: the level in use)."""
    cdef int lv = fa_simd_level() if level is None else _as_int(level, "level", 0, 2)
    return fa_simd_name(lv).decode()


def set_simd_level(level):
    """Use `level` ("generic", "avx2", "avx512" or 0/1/2), capped at what the CPU
    supports; returns the level now in use.  It applies to these kernels and
    to the model engine alike.  A model lays its weights out at build for the
    level then in use (fastattn/_engine.pyx), so a model built after this call
    runs as one in a process started at that level (FASTATTN_SIMD) would."""
    if isinstance(level, str):
        if level not in SIMD_LEVELS:
            raise ValueError(f"level: expected one of {sorted(SIMD_LEVELS)}, got {level!r}")
        level = SIMD_LEVELS[level]
    cdef int lv = _as_int(level, "level", 0, 2)
    got = fa_set_simd_level(lv)
    _engine()._set_simd_level(lv)  # the model's engine holds its own copy
    return got


def available_simd_levels():
    """The levels this CPU runs, lowest first, as names."""
    cdef int now = fa_simd_level()
    cdef int best = fa_set_simd_level(2)
    fa_set_simd_level(now)
    return [name for name, lv in SIMD_LEVELS.items() if lv <= best]
