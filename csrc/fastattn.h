/*
 * fastattn C kernels: the one header every C file in csrc/ and both Cython
 * modules include.
 *
 * Shapes use one notation across the project:
 *   [n_seq, n_embd]        activations, row-major
 *   [n_out, n_in]          weight matrices as stored (rows are output features)
 *   [n_kv_head, n_ctx, head_dim]  one layer's K or V cache
 *
 * Threading: every kernel that can split its work takes (ith, nth), the
 * calling thread's index and the thread count, and does only its own share.
 * Shares are whole output rows (products, norms) or whole heads (attention),
 * so a result never depends on nth.  A kernel never opens a parallel region
 * itself: the caller opens one (the whole decode step runs inside a single
 * region) and puts barriers between dependent steps.  fa_parallel_* helpers
 * below open a region around one kernel, for tests and one-off calls.
 */
#ifndef FASTATTN_H
#define FASTATTN_H

#include <stddef.h>
#include <stdint.h>

/* ---------------------------------------------------------------- types */

/* Storage types; the values are ggml's type ids. */
enum fa_type {
    FA_F32 = 0,
    FA_F16 = 1,
    FA_Q4_0 = 2,
    FA_Q4_1 = 3,
    FA_Q8_0 = 8,
    FA_BF16 = 30,
};

/* A weight in its file's storage form: n_out rows of row_bytes each.
 * packed, when not NULL, is the same matrix repacked by fa_pack_weight for the
 * panel kernels (csrc/packed.c); fa_matmul then reads it instead of data.
 * packed_q8, when not NULL, is the copy fa_q8_pack_weight makes for the q8
 * activation kernels (csrc/quant_act.c), which then read it instead of data.
 * Whoever builds a fa_weight sets packed and packed_q8 to NULL or to a filled
 * buffer. */
typedef struct {
    const void *data;
    int type;          /* enum fa_type */
    int64_t n_out;
    int64_t n_in;
    size_t row_bytes;  /* == fa_row_bytes(type, n_in) */
    const void *packed;
    const void *packed_q8;
} fa_weight;

/* Bytes one row of n_in values takes in `type`; 0 if the type is unknown or
 * n_in is not a positive multiple of its block size. */
size_t fa_row_bytes(int type, int64_t n_in);

/* ------------------------------------------------------- SIMD dispatch */

enum fa_simd { FA_SIMD_GENERIC = 0, FA_SIMD_AVX2 = 1, FA_SIMD_AVX512 = 2 };

/* The level in use: the best the CPU supports, capped by the environment
 * variable FASTATTN_SIMD ("generic", "avx2", "avx512") read at first use. */
int fa_simd_level(void);
/* Force a level (capped at what the CPU supports); returns the level set. */
int fa_set_simd_level(int level);
const char *fa_simd_name(int level);

/* ------------------------------------------------------------- kernels */

/* y[s, r] = sum_i W[r, i] * x[s, i]  for this thread's rows r.
 * x [n_seq, n_in], y [n_seq, n_out].  Each y element is computed by the same
 * sequence of operations whatever n_seq, ith and nth are, so a prefill and a
 * decode of the same token give bit-identical products. */
void fa_matmul(const fa_weight *w, const float *x, float *y, int64_t n_seq,
               int ith, int nth);

/* Panel packing (csrc/packed.c): a copy of a weight laid out for the panel
 * kernels, which fa_matmul uses when w->packed points at it.  Products with a
 * packed weight differ from the unpacked ones in rounding only (another order
 * of the same sums), and are the same whatever n_seq, ith, nth and SIMD level.
 * fa_packed_bytes: bytes the copy takes, or 0 if w cannot be packed (unknown
 * type, a block type with n_in / 32 > 8192, inconsistent sizes).
 * fa_pack_weight: fill dst (dst_bytes >= fa_packed_bytes(w)); 0, or -1 on bad
 * arguments.  Runs on the calling thread (about 0.1 s for 135M 4-bit weights). */
size_t fa_packed_bytes(const fa_weight *w);
/* 1 if the SIMD level now in use multiplies `type` faster packed than as the
 * file stores it (a model packs only those weights), else 0. */
int fa_pack_wanted(int type);
int fa_pack_weight(const fa_weight *w, void *dst, size_t dst_bytes);

/* The rows [*r0, *r1) of y that fa_matmul_act(act, w, ...) writes on thread
 * ith of nth.  A caller that fuses an element-wise step into the product (a
 * thread finishing its own rows without a barrier) asks here. */
void fa_matmul_share(int act, const fa_weight *w, int ith, int nth, int64_t *r0,
                     int64_t *r1);

/* The weight bytes fa_matmul_act(act, w, ...) reads on thread ith of nth, as
 * one region: returns its length and sets *start, or returns 0.  The forward
 * asks for the start of the next product's region into cache while a thread
 * waits at a barrier. */
size_t fa_matmul_region(int act, const fa_weight *w, int ith, int nth, const void **start);

/* Ask the system to back the 2 MiB-aligned part of [p, p + n) with huge pages
 * (Linux transparent huge pages; elsewhere nothing).  For memory a decode
 * streams through whole at every step (packed weights, the KV cache): fewer
 * TLB misses.  A hint, best called before the memory is first written. */
void fa_advise_huge(void *p, size_t n);

/* out[i] = W[row, i] as float32, i < n_in (embedding lookup). */
void fa_dequant_row(const fa_weight *w, int64_t row, float *out);

/* y = (x - mean) / sqrt(var + eps) * g + b, per row.  x, y [n_seq, n]; b may be NULL. */
void fa_layer_norm(const float *x, const float *g, const float *b, float *y,
                   int64_t n_seq, int64_t n, float eps, int ith, int nth);

/* y = x / sqrt(mean(x^2) + eps) * g, per row.  x, y [n_seq, n]. */
void fa_rms_norm(const float *x, const float *g, float *y,
                 int64_t n_seq, int64_t n, float eps, int ith, int nth);

/* x := 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), in place, n values. */
void fa_gelu(float *x, int64_t n, int ith, int nth);

/* gate := silu(gate) * up, n values; silu(z) = z / (1 + exp(-z)). */
void fa_swiglu(float *gate, const float *up, int64_t n, int ith, int nth);

/* x := x + b per row.  x [n_seq, n], b [n]. */
void fa_add_bias(float *x, const float *b, int64_t n_seq, int64_t n, int ith, int nth);

/* Rotary embedding in place.  x [n_seq, n_head * head_dim]; row s is at
 * position pos0 + s.  Pair i of a head (i < head_dim / 2) turns by angle
 * pos * theta^(-2i / head_dim).  neox = 0 pairs adjacent values (2i, 2i+1),
 * as GGUF llama files expect; neox = 1 pairs (i, i + head_dim/2), as Hugging
 * Face checkpoints expect. */
void fa_rope(float *x, int64_t n_seq, int n_head, int head_dim, int64_t pos0,
             float theta, int neox, int ith, int nth);

/* Causal attention of n_seq queries over a KV cache, for this thread's heads.
 *   q      [n_seq, n_head * head_dim], query s at position pos0 + s
 *   k, v   [n_kv_head, n_ctx, head_dim], positions 0 .. pos0 + n_seq - 1 filled
 *   out    [n_seq, n_head * head_dim]
 *   scratch  nth * (pos0 + n_seq) floats; thread ith uses its own slice
 * Query head h reads KV head h / (n_head / n_kv_head).  Query s attends to
 * positions 0 .. pos0 + s: out = softmax(q k^T / sqrt(head_dim)) v, with the
 * max subtracted before exp.  Decode is the case n_seq = 1. */
void fa_attention(const float *q, const float *k, const float *v, float *out,
                  int64_t n_seq, int64_t pos0, int n_head, int n_kv_head, int head_dim,
                  int64_t n_ctx, float *scratch, int ith, int nth);

/* One-kernel wrappers that open their own OpenMP region of n_threads. */
void fa_parallel_matmul(const fa_weight *w, const float *x, float *y, int64_t n_seq,
                        int n_threads);
void fa_parallel_attention(const float *q, const float *k, const float *v, float *out,
                           int64_t n_seq, int64_t pos0, int n_head, int n_kv_head,
                           int head_dim, int64_t n_ctx, int n_threads);

/* Opt-in "q8 activations" products (csrc/quant_act.c): for Q4_0, Q4_1 and
 * Q8_0 weights x is rounded to 8-bit blocks (a float scale per 32 values) and
 * the products are integer dot products.  Not exact: results differ from
 * fa_matmul by the rounding of x.  Other weight types take fa_matmul.
 * fa_matmul_act(FA_ACT_F32, ...) is fa_matmul. */
enum fa_act { FA_ACT_F32 = 0, FA_ACT_Q8 = 1 };
int fa_act_q8_supports(int type);
void fa_matmul_q8(const fa_weight *w, const float *x, float *y, int64_t n_seq,
                  int ith, int nth);
void fa_matmul_act(int act, const fa_weight *w, const float *x, float *y,
                   int64_t n_seq, int ith, int nth);
void fa_parallel_matmul_act(int act, const fa_weight *w, const float *x, float *y,
                            int64_t n_seq, int n_threads);
/* The same products from rows quantized once: fa_q8_quantize_rows writes
 * rows [t0, t1) of x [n_seq, n_in] into a buffer of fa_q8_rows_bytes(n_seq,
 * n_in) bytes (0: n_in not a multiple of 32), and fa_matmul_q8_rows(w, rows,
 * x, ...) gives fa_matmul_q8(w, x, ...)'s bits once every row is there.  A
 * prefill quantizes a normed input once, each thread its rows, for the 2 or
 * 3 products that read it, instead of every thread quantizing all of it for
 * each.  x must be the rows' float values: a weight the q8 kernels do not
 * take uses it. */
size_t fa_q8_rows_bytes(int64_t n_seq, int64_t n_in);
void fa_q8_quantize_rows(const float *x, int64_t n_in, int64_t n_seq, int64_t t0, int64_t t1,
                         void *rows);
void fa_matmul_q8_rows(const fa_weight *w, const void *rows, const float *x, float *y,
                       int64_t n_seq, int ith, int nth);
/* x [n] -> q [n] int8, d [n / 32] scales, s [n / 32] = d * sum of the block's q;
 * n a positive multiple of 32. */
void fa_quantize_act_q8(const float *x, int64_t n, int8_t *q, float *d, float *s);

/* The q8 kernels' packed copy of a Q4_0, Q4_1 or Q8_0 weight (16 rows side by
 * side, the same bytes as the file rearranged), made once at load; products
 * with it are bit-identical to those without.  fa_q8_packed_bytes: bytes of
 * the copy, 0 if w cannot be packed (another type, inconsistent sizes).
 * fa_q8_pack_weight: fill dst (dst_bytes >= fa_q8_packed_bytes(w)); 0, or -1
 * on bad arguments.  fa_q8_pack_wanted: 1 if the q8 kernels of the SIMD level
 * now in use read such a copy (AVX-512 VNNI), else 0. */
size_t fa_q8_packed_bytes(const fa_weight *w);
int fa_q8_pack_weight(const fa_weight *w, void *dst, size_t dst_bytes);
int fa_q8_pack_wanted(int type);

#endif
