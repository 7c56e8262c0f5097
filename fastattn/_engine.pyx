# cython: language_level=3
"""The compiled model: Cython classes over csrc/forward.c.

    Model(config, matrices, vectors)   the read-only weights, as fa_model
    State(model, n_ctx, max_chunk, kv_type)  one sequence's KV cache and scratch
    model.forward(state, ids, all_logits, n_threads) -> logits
    model.decode(state, token, n_threads) -> logits [n_vocab]

Every matrix the layers multiply by (and the output head) is repacked at
build into 16-row panels (csrc/packed.c) when the SIMD level in use runs its
type faster that way (fa_pack_wanted: every type with AVX-512, the float
types with AVX2, none with the generic C); that costs a second copy of those
weights in memory.  The token embedding stays as the file has it.  In the q8
activation mode the Q4_0, Q4_1 and Q8_0 matrices get instead the q8 kernels'
copy (16 rows side by side, csrc/quant_act.c) when the SIMD level in use reads
one (fa_q8_pack_wanted: AVX-512 with VNNI), else keep only their file form.

fastattn.model.Transformer validates names, types and shapes and builds these;
this module checks again every size it hands to C, so that no call from
Python can make the C code read or write out of bounds.  A Model keeps a
reference to every array its pointers point into.  forward releases the GIL;
several States may run on one Model at once from different threads, but one
State runs one call at a time.
"""
import numpy as np

cimport numpy as cnp
from libc.stdint cimport int32_t, int64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memset

from .errors import ContextOverflowError, FastAttnError, OutOfMemoryError, TokenizerError

cnp.import_array()


cdef extern from "fastattn.h" nogil:
    int fa_simd_level()
    int fa_set_simd_level(int level)


cdef extern from "fa_internal.h" nogil:
    void fa_q8_set_amx(int on)
    int fa_q8_amx_in_use()
    int fa_team_started()
    void fa_team_lose()


# This module is built from the same C files as fastattn._kernels and keeps
# its own copy of their runtime switches; _kernels.set_simd_level and
# _kernels.set_q8_amx call these so that the two move together.

def _simd_level():
    return fa_simd_level()


def _set_simd_level(int level):
    return fa_set_simd_level(level)


def _set_q8_amx(int on):
    fa_q8_set_amx(on)


def _q8_amx_in_use():
    return bool(fa_q8_amx_in_use())


def _team_started():
    return bool(fa_team_started())


def _lose_team():
    fa_team_lose()


from . import _fork  # noqa: E402
_fork.register()


cdef extern from "model.h" nogil:
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
    int fa_act_q8_supports(int type)
    int fa_pack_wanted(int type)
    size_t fa_q8_packed_bytes(const fa_weight *w)
    int fa_q8_pack_weight(const fa_weight *w, void *dst, size_t dst_bytes)
    int fa_q8_pack_wanted(int type)
    void fa_advise_huge(void *p, size_t n)

    ctypedef struct fa_layer:
        const float *attn_norm_w
        const float *attn_norm_b
        const float *ffn_norm_w
        const float *ffn_norm_b
        fa_weight attn_qkv
        const float *attn_qkv_b
        fa_weight attn_q
        fa_weight attn_k
        fa_weight attn_v
        const float *attn_q_b
        const float *attn_k_b
        const float *attn_v_b
        fa_weight attn_output
        const float *attn_output_b
        fa_weight ffn_gate
        const float *ffn_gate_b
        fa_weight ffn_up
        const float *ffn_up_b
        fa_weight ffn_down
        const float *ffn_down_b

    ctypedef struct fa_model:
        int family
        int64_t n_vocab, n_ctx, n_embd, n_layer, n_head, n_kv_head, head_dim, n_ff
        float norm_eps, rope_theta
        int rope_neox
        fa_weight token_embd
        fa_weight position_embd
        fa_weight output
        const float *output_norm_w
        const float *output_norm_b
        fa_layer *layers
        int act

    ctypedef struct fa_state:
        int64_t n_ctx
        int64_t n_past
        int64_t max_chunk
        int kv_type

    enum:
        FA_GPT2, FA_LLAMA
        FA_OK, FA_ERR_ARG, FA_ERR_BAD_ID, FA_ERR_OVERFLOW, FA_ERR_NOMEM

    int fa_model_check(const fa_model *m)
    int fa_state_init(fa_state *s, const fa_model *m, int64_t n_ctx, int64_t max_chunk)
    int fa_state_init_kv(fa_state *s, const fa_model *m, int64_t n_ctx, int64_t max_chunk,
                         int kv_type)
    void fa_state_free(fa_state *s)
    int fa_forward(const fa_model *m, fa_state *s, const int32_t *ids, int64_t n_seq,
                   float *logits, int all_logits, int n_threads)


cdef dict _ALIGN = {0: 4, 1: 2, 30: 2}  # F32, F16, BF16: element size


cdef class Model:
    """fa_model over the given weights.

    matrices: {canonical name: WeightTensor} for every 2-D weight
    vectors:  {canonical name: float32 array [n]} for norms and biases
    """
    cdef fa_model m
    cdef fa_layer *layers
    cdef list keep          # every array a pointer of self.m points into
    cdef list pending       # (fa_weight address, name, q8, bytes) for _pack_all
    cdef readonly size_t packed_bytes  # memory the packed copies (panel or q8) take
    cdef readonly object config
    cdef bint q8_pack       # build the q8 kernels' packed copies where wanted

    def __cinit__(self):
        memset(&self.m, 0, sizeof(fa_model))
        self.layers = NULL
        self.keep = []
        self.pending = []

    def __init__(self, config, dict matrices, dict vectors, int act=0, *,
                 bint q8_pack=True):
        # q8_pack=False: no q8 packed copies, the q8 kernels read the file form
        # (same numbers; for tests that compare both)
        cdef fa_model *m = &self.m
        cdef fa_layer *L
        cdef int64_t E = config.n_embd, F = config.n_ff
        cdef int64_t Ekv = config.n_kv_head * config.head_dim
        if self.layers != NULL:
            raise FastAttnError("fastattn: a Model is built once")
        self.config = config
        gpt2 = config.family == "gpt2"
        m.family = FA_GPT2 if gpt2 else FA_LLAMA
        m.n_vocab = config.n_vocab
        m.n_ctx = config.n_ctx
        m.n_embd = config.n_embd
        m.n_layer = config.n_layer
        m.n_head = config.n_head
        m.n_kv_head = config.n_kv_head
        m.head_dim = config.head_dim
        m.n_ff = config.n_ff
        m.norm_eps = config.norm_eps
        m.rope_theta = config.rope_theta
        m.rope_neox = 1 if config.rope_neox else 0
        m.act = act  # 0 exact float products, 1 q8 activations (csrc/quant_act.c)
        self.q8_pack = q8_pack

        self.layers = <fa_layer *>calloc(config.n_layer, sizeof(fa_layer))
        if self.layers == NULL:
            raise OutOfMemoryError(f"fastattn: cannot allocate the layer table of "
                                   f"{config.n_layer} layers "
                                   f"({config.n_layer * sizeof(fa_layer)} bytes)")
        m.layers = self.layers

        m.token_embd = self._weight(matrices, "token_embd.weight", config.n_vocab, E)
        out_name = "output.weight" if "output.weight" in matrices else "token_embd.weight"
        m.output = self._weight(matrices, out_name, config.n_vocab, E)
        self._pack(&m.output, out_name, act)
        m.output_norm_w = self._vector(vectors, "output_norm.weight", E, True)
        m.output_norm_b = self._vector(vectors, "output_norm.bias", E, gpt2)
        if gpt2:
            m.position_embd = self._weight(matrices, "position_embd.weight", config.n_ctx, E)

        for i in range(config.n_layer):
            L = &self.layers[i]
            p = f"blk.{i}."
            L.attn_norm_w = self._vector(vectors, p + "attn_norm.weight", E, True)
            L.attn_norm_b = self._vector(vectors, p + "attn_norm.bias", E, gpt2)
            L.ffn_norm_w = self._vector(vectors, p + "ffn_norm.weight", E, True)
            L.ffn_norm_b = self._vector(vectors, p + "ffn_norm.bias", E, gpt2)
            L.attn_output = self._weight(matrices, p + "attn_output.weight", E, E)
            self._pack(&L.attn_output, p + "attn_output.weight", act)
            L.attn_output_b = self._vector(vectors, p + "attn_output.bias", E, gpt2)
            L.ffn_up = self._weight(matrices, p + "ffn_up.weight", F, E)
            self._pack(&L.ffn_up, p + "ffn_up.weight", act)
            L.ffn_up_b = self._vector(vectors, p + "ffn_up.bias", F, gpt2)
            L.ffn_down = self._weight(matrices, p + "ffn_down.weight", E, F)
            self._pack(&L.ffn_down, p + "ffn_down.weight", act)
            L.ffn_down_b = self._vector(vectors, p + "ffn_down.bias", E, gpt2)
            if gpt2:
                L.attn_qkv = self._weight(matrices, p + "attn_qkv.weight", 3 * E, E)
                self._pack(&L.attn_qkv, p + "attn_qkv.weight", act)
                L.attn_qkv_b = self._vector(vectors, p + "attn_qkv.bias", 3 * E, True)
            else:
                L.attn_q = self._weight(matrices, p + "attn_q.weight", E, E)
                self._pack(&L.attn_q, p + "attn_q.weight", act)
                L.attn_k = self._weight(matrices, p + "attn_k.weight", Ekv, E)
                self._pack(&L.attn_k, p + "attn_k.weight", act)
                L.attn_v = self._weight(matrices, p + "attn_v.weight", Ekv, E)
                self._pack(&L.attn_v, p + "attn_v.weight", act)
                L.attn_q_b = self._vector(vectors, p + "attn_q.bias", E, False)
                L.attn_k_b = self._vector(vectors, p + "attn_k.bias", Ekv, False)
                L.attn_v_b = self._vector(vectors, p + "attn_v.bias", Ekv, False)
                L.ffn_gate = self._weight(matrices, p + "ffn_gate.weight", F, E)
                self._pack(&L.ffn_gate, p + "ffn_gate.weight", act)
                L.ffn_gate_b = self._vector(vectors, p + "ffn_gate.bias", F, False)

        self._pack_all()
        if fa_model_check(&self.m) != FA_OK:
            raise FastAttnError("fastattn: the model's sizes or pointers are inconsistent")

    def __dealloc__(self):
        free(self.layers)

    cdef fa_weight _weight(self, dict matrices, str name, int64_t n_out,
                           int64_t n_in) except *:
        """The fa_weight over matrices[name], after checking its byte size."""
        cdef fa_weight w
        t = matrices.get(name)
        if t is None:
            raise FastAttnError(f"fastattn: weight {name} is missing")
        rb = fa_row_bytes(t.qtype, n_in)
        data = t.data
        if (rb == 0 or tuple(t.shape) != (n_out, n_in) or not isinstance(data, np.ndarray)
                or data.dtype != np.uint8 or data.nbytes != n_out * rb):
            raise FastAttnError(f"fastattn: weight {name} has shape {t.shape}, type "
                                f"{t.qtype} and {getattr(data, 'nbytes', '?')} bytes; "
                                f"expected ({n_out}, {n_in})")
        # float rows are read as floats: copy a view that a file left unaligned
        align = _ALIGN.get(t.qtype, 1)
        if not data.flags.c_contiguous or data.ctypes.data % align:
            data = np.array(data, order="C", copy=True)
        self.keep.append(data)
        w.data = <const void *>cnp.PyArray_DATA(data)
        w.type = t.qtype
        w.n_out = n_out
        w.n_in = n_in
        w.row_bytes = rb
        w.packed = NULL
        w.packed_q8 = NULL
        return w

    cdef int _pack(self, fa_weight *w, str name, int act) except -1:
        """Mark w for a panel-packed copy (or in q8 mode, the q8 kernels' copy),
        made by _pack_all once every weight is known."""
        cdef bint q8 = act == 1 and fa_act_q8_supports(w.type)
        if q8 and not (self.q8_pack and fa_q8_pack_wanted(w.type)):
            return 0
        if not q8 and not fa_pack_wanted(w.type):
            return 0
        cdef size_t n = fa_q8_packed_bytes(w) if q8 else fa_packed_bytes(w)
        if n == 0:
            return 0  # a block row too long to pack: the unpacked kernels take it
        self.pending.append((<size_t>w, name, q8, n))
        return 0

    cdef int _pack_all(self) except -1:
        """Make the copies _pack marked, side by side in one buffer on huge pages
        (fa_advise_huge): a decode streams through all of them at every token,
        and with 4 KiB pages it keeps missing the TLB (decode-shaped Q4_1
        products, 2 threads, benchmarks/stream_decode.c: 19.5 -> 20.9 GMAC/s
        per thread).  Each copy starts on a 64-byte line."""
        cdef size_t huge = 2 << 20, total = 0, at = 0, n, addr
        cdef void *dst
        cdef fa_weight *w
        cdef int rc
        cdef bint q8
        for _, _, _, n in self.pending:
            total += (n + 63) // 64 * 64
        if total == 0:
            return 0
        try:
            buf = np.empty(total + huge, dtype=np.uint8)
        except MemoryError:
            raise OutOfMemoryError(f"fastattn: cannot allocate {total} bytes to repack "
                                   f"the model's matrices") from None
        buf = buf[(-buf.ctypes.data) % huge:][:total]
        cdef char *base = <char *>cnp.PyArray_DATA(<cnp.ndarray>buf)
        fa_advise_huge(base, total)
        for addr, name, q8, n in self.pending:
            w = <fa_weight *>addr
            dst = base + at
            with nogil:
                rc = fa_q8_pack_weight(w, dst, n) if q8 else fa_pack_weight(w, dst, n)
            if rc != 0:
                raise FastAttnError(f"fastattn: weight {name} could not be repacked")
            if q8:
                w.packed_q8 = dst
            else:
                w.packed = dst
            at += (n + 63) // 64 * 64
            self.packed_bytes += n
        self.keep.append(buf)
        self.pending = []
        return 0

    cdef const float *_vector(self, dict vectors, str name, int64_t n,
                              bint required) except? NULL:
        """The float pointer of vectors[name] [n]; NULL if absent and optional."""
        v = vectors.get(name)
        if v is None:
            if required:
                raise FastAttnError(f"fastattn: vector {name} is missing")
            return NULL
        # aligned too: a float32 view into a file mapped at an odd offset is
        # contiguous but not aligned, and C may not load floats from it
        cdef cnp.ndarray a = np.require(v, dtype=np.float32, requirements="CA")
        if a.ndim != 1 or a.shape[0] != n:
            raise FastAttnError(f"fastattn: vector {name} has shape {np.shape(v)}, "
                                f"expected ({n},)")
        self.keep.append(a)
        return <const float *>cnp.PyArray_DATA(a)

    def forward(self, State state not None, ids, bint all_logits=False, int n_threads=1):
        """Run ids [n_seq] (int32) after state.n_past positions.

        Returns logits [n_vocab] for the last position, or [n_seq, n_vocab].
        """
        if state.model is not self:
            raise FastAttnError("fastattn: this state belongs to another model")
        cdef cnp.ndarray a = np.require(ids, dtype=np.int32, requirements="CA")
        if a.ndim != 1 or a.shape[0] == 0:
            raise TokenizerError(f"ids must be a non-empty 1-D sequence, got shape "
                                 f"{np.shape(ids)}")
        cdef int64_t n_seq = a.shape[0]
        cdef cnp.ndarray logits
        if all_logits:
            logits = np.empty((n_seq, self.m.n_vocab), dtype=np.float32)
        else:
            logits = np.empty(self.m.n_vocab, dtype=np.float32)
        cdef const int32_t *pids = <const int32_t *>cnp.PyArray_DATA(a)
        cdef float *plogits = <float *>cnp.PyArray_DATA(logits)
        cdef int rc
        cdef int all_ = 1 if all_logits else 0
        if n_threads < 1:
            n_threads = 1

        state.enter()
        try:
            with nogil:
                rc = fa_forward(&self.m, &state.s, pids, n_seq, plogits, all_, n_threads)
        finally:
            state.leave()

        if rc == FA_OK:
            return logits
        if rc == FA_ERR_BAD_ID:
            bad = a[(a < 0) | (a >= self.m.n_vocab)]
            raise TokenizerError(f"token id {int(bad[0])} is outside the vocabulary "
                                 f"[0, {self.m.n_vocab})")
        if rc == FA_ERR_OVERFLOW:
            raise ContextOverflowError(
                f"context overflow: n_past {state.s.n_past} + requested {n_seq} "
                f"> n_ctx {state.s.n_ctx}")
        if rc == FA_ERR_NOMEM:
            raise OutOfMemoryError(f"fastattn: cannot allocate the attention scratch "
                                   f"of the forward pass ({n_threads} threads x n_ctx "
                                   f"{state.s.n_ctx} floats = "
                                   f"{4 * n_threads * state.s.n_ctx} bytes)")
        raise FastAttnError(f"fastattn: fa_forward failed with code {rc}")


    def decode(self, State state not None, int64_t token, int n_threads=1):
        """Run one token after state.n_past positions; logits [n_vocab]."""
        if state.model is not self:
            raise FastAttnError("fastattn: this state belongs to another model")
        if token < 0 or token >= self.m.n_vocab:
            raise TokenizerError(f"token id {token} is outside the vocabulary "
                                 f"[0, {self.m.n_vocab})")
        cdef int32_t id32 = <int32_t>token
        cdef cnp.ndarray logits = np.empty(self.m.n_vocab, dtype=np.float32)
        cdef float *plogits = <float *>cnp.PyArray_DATA(logits)
        cdef int rc
        if n_threads < 1:
            n_threads = 1

        state.enter()
        try:
            with nogil:
                rc = fa_forward(&self.m, &state.s, &id32, 1, plogits, 0, n_threads)
        finally:
            state.leave()

        if rc == FA_OK:
            return logits
        if rc == FA_ERR_OVERFLOW:
            raise ContextOverflowError(
                f"context overflow: n_past {state.s.n_past} + requested 1 "
                f"> n_ctx {state.s.n_ctx}")
        if rc == FA_ERR_NOMEM:
            raise OutOfMemoryError(f"fastattn: cannot allocate the attention scratch "
                                   f"of the forward pass ({n_threads} threads x n_ctx "
                                   f"{state.s.n_ctx} floats = "
                                   f"{4 * n_threads * state.s.n_ctx} bytes)")
        raise FastAttnError(f"fastattn: fa_forward failed with code {rc}")


# KV cache value types fa_state_init_kv takes (ggml's ids): bytes per value
KV_BYTES = {0: 4, 1: 2}  # FA_F32, FA_F16


def state_bytes(config, n_ctx, max_chunk, kv_type=0):
    """(KV cache bytes, scratch bytes) that fa_state_init_kv allocates for a
    state of n_ctx positions run in chunks of max_chunk tokens, its cache of
    kv_type (0 float32, 1 float16)."""
    E, F, Ekv = config.n_embd, config.n_ff, config.n_kv_head * config.head_dim
    kv = 2 * config.n_layer * n_ctx * Ekv * KV_BYTES[kv_type]
    chunk = min(max_chunk, n_ctx)
    qkv = 3 * E if config.family == "gpt2" else 2 * Ekv
    scratch = chunk * (4 * E + qkv + 2 * F) * 4
    for width in (E, F):  # normed rows and the MLP activation quantized for q8 products
        if width % 32 == 0:  # (fa_q8_rows_bytes)
            scratch += chunk * (width + 3 * 4 * (width // 32))
    return kv, scratch


cdef class State:
    """One sequence's KV cache [n_layer][n_kv_head][n_ctx][head_dim] and scratch.

    kv_type: 0 (default) a float32 cache, exact; 1 a float16 cache, half the
    bytes, each key and value rounded to the nearest half (not exact)."""
    cdef fa_state s
    cdef readonly Model model
    cdef bint busy

    def __cinit__(self, Model model not None, int64_t n_ctx, int64_t max_chunk=256,
                  int kv_type=0):
        memset(&self.s, 0, sizeof(fa_state))
        self.model = model
        self.busy = False
        if n_ctx <= 0 or n_ctx > model.m.n_ctx:
            raise ContextOverflowError(f"n_ctx {n_ctx} must be in [1, {model.m.n_ctx}]")
        if kv_type not in KV_BYTES:
            raise ValueError(f"kv_type must be one of {sorted(KV_BYTES)} (0 float32, "
                             f"1 float16), got {kv_type}")
        if max_chunk <= 0:
            raise ValueError(f"max_chunk must be at least 1, got {max_chunk}")
        cdef int rc = fa_state_init_kv(&self.s, &model.m, n_ctx, max_chunk, kv_type)
        if rc == FA_ERR_NOMEM:
            kv, scratch = state_bytes(model.config, n_ctx, max_chunk, kv_type)
            raise OutOfMemoryError(
                f"fastattn: cannot allocate a state of n_ctx {n_ctx}: it needs "
                f"{kv + scratch} bytes ({(kv + scratch) / 2**30:.2f} GiB: KV cache "
                f"{kv}, scratch {scratch}); use a smaller n_ctx")
        if rc != FA_OK:
            raise FastAttnError(f"fastattn: fa_state_init failed with code {rc}")

    def __dealloc__(self):
        fa_state_free(&self.s)

    cdef enter(self):
        # the GIL is held here, so checking and setting the flag is atomic
        if self.busy:
            raise FastAttnError("fastattn: this state is already running a forward call "
                                "in another thread; use one state per thread")
        self.busy = True

    cdef leave(self):
        self.busy = False

    @property
    def n_ctx(self):
        return self.s.n_ctx

    @property
    def max_chunk(self):
        return self.s.max_chunk

    @property
    def kv_type(self):
        """0: float32 KV cache, 1: float16."""
        return self.s.kv_type

    @property
    def n_past(self):
        return self.s.n_past

    @n_past.setter
    def n_past(self, int64_t value):
        """Forget positions >= value (0 <= value <= n_past)."""
        if self.busy:
            raise FastAttnError("fastattn: cannot rewind a state while it runs")
        if value < 0 or value > self.s.n_past:
            raise ValueError(f"n_past must be in [0, {self.s.n_past}], got {value}")
        self.s.n_past = value
