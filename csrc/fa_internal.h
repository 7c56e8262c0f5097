/*
 * Private to the kernel files: the per-SIMD-level kernel table and the small
 * helpers every level shares.  Not part of the contract in fastattn.h.
 */
#ifndef FA_INTERNAL_H
#define FA_INTERNAL_H

#include <string.h>
#include "fastattn.h"

/* The cache level a kernel's software prefetches of streamed data (packed
 * weights, the KV cache) ask for: L2 (hint T1), not L1.  A core keeps only a
 * few dozen L1 misses in flight, so a stream prefetched into L1 stalls near
 * 13-15 GB/s a core on Zen 4; L2 keeps more in flight, and the kernel's own
 * loads then find the lines one level closer.  Measured with T1 instead of
 * T0 (benchmarks/stream_decode.c, 2 threads): Q4_1 products 28.4 -> 31.5
 * GB/s, decode attention 38.8 -> 41.4 GB/s; SmolLM2 decode after 512 tokens
 * 211 -> 250 tok/s (exact), 277 -> 289 (q8).  Use as the second argument of
 * _mm_prefetch, in files that include immintrin.h. */
#define FA_PREFETCH_STREAM _MM_HINT_T1

/* Most x rows one dot kernel applies a weight row to at once.  Every level's
 * kernel computes each of its rows with exactly the operations it would use
 * for that row alone, so the group size never changes a result. */
#define FA_MAX_ROWS 4

/* y[s * ldy] = dot(W row, x[s * ldx .. + n_in])  for s < nr, 1 <= nr <= FA_MAX_ROWS.
 * wrow holds one row of n_in values in the kernel's storage type. */
typedef void (*fa_dot_fn)(const void *wrow, const float *x, int64_t ldx, int nr,
                          int64_t n_in, float *y, int64_t ldy);

/* One SIMD level's kernels; a NULL dot means the type is not supported. */
typedef struct {
    fa_dot_fn dot_f32, dot_f16, dot_bf16, dot_q8_0, dot_q4_0, dot_q4_1;
    int max_rows;  /* rows the level's kernels take at once, <= FA_MAX_ROWS */
    /* attention over one head, head_dim = n:
     * scores: score[t] = scale * sum_i q[i] k[t, i], t < n_t; returns max_t score[t]
     * wsum:   out[i] = sum_t p[t] v[t * ldv + i], t in order   i < n
     * softmax_exp: p[t] = exp(score[t] - mx), returns sum_t p[t] */
    float (*scores)(float *score, const float *q, const float *k, int64_t n_t,
                   int64_t n, float scale);
    void (*wsum)(float *out, const float *p, const float *v, int64_t ldv, int64_t n_t,
                 int64_t n);
    float (*softmax_exp)(float *score, int64_t n_t, float mx);
    /* activations over n values, as fa_swiglu and fa_gelu define them */
    void (*swiglu)(float *gate, const float *up, int64_t n);
    void (*gelu)(float *x, int64_t n);
    /* Attention's scores and wsum steps for nr query rows over one block of keys, each key
     * and value row loaded once for several query rows.  Row r has its own
     * key count n_t[r] (rows of later queries see more keys) and gets exactly
     * the numbers scores / wsum give it alone:
     * scores_rows: score[r * lds + t] for t < n_t[r] of query row qrow[r],
     *              mx[r] its max; reads keys below max_r n_t[r], and may write
 *              a row's scores up to n_t[r] rounded up to 4 (lds leaves room)
     * wsum_rows:   out[r * ldo + i] = sum_t p[r * ldp + t] v[t * ldv + i], t < n_t[r]
     * NULL at a level that has none: ops.c then calls scores / wsum per row. */
    void (*scores_rows)(float *score, int64_t lds, const float *const *qrow, int nr,
                        const float *k, const int64_t *n_t, int64_t n, float scale,
                        float *mx);
    void (*wsum_rows)(float *out, int64_t ldo, const float *p, int64_t ldp, int nr,
                      const float *v, int64_t ldv, const int64_t *n_t, int64_t n);
    /* The same four over a float16 KV cache (fa_state_init_kv's FA_F16): k and
     * v hold IEEE halves, each widened to float32 as it is loaded, then the
     * arithmetic of the float32 kernel above, in its order, so the numbers are
     * those of the float32 kernel over the widened cache. */
    float (*scores_f16)(float *score, const float *q, const uint16_t *k, int64_t n_t,
                        int64_t n, float scale);
    void (*wsum_f16)(float *out, const float *p, const uint16_t *v, int64_t ldv,
                     int64_t n_t, int64_t n);
    void (*scores_rows_f16)(float *score, int64_t lds, const float *const *qrow, int nr,
                            const uint16_t *k, const int64_t *n_t, int64_t n, float scale,
                            float *mx);
    void (*wsum_rows_f16)(float *out, int64_t ldo, const float *p, int64_t ldp, int nr,
                          const uint16_t *v, int64_t ldv, const int64_t *n_t, int64_t n);
    /* dst[i] = src[i] rounded to the nearest half, ties to even (fa_f32_to_f16's
     * bits at every level), i < n */
    void (*to_f16)(uint16_t *dst, const float *src, int64_t n);
} fa_kernels;

extern const fa_kernels fa_kernels_generic;
extern const fa_kernels fa_kernels_avx2;
extern const fa_kernels fa_kernels_avx512;

/* The table of the level now in use. */
const fa_kernels *fa_kernels_current(void);
fa_dot_fn fa_dot_for(const fa_kernels *k, int type);

/* Block sizes of the quantized types: values and bytes per block. */
#define FA_QK 32
#define FA_Q8_0_BYTES 34
#define FA_Q4_0_BYTES 18
#define FA_Q4_1_BYTES 20

/* IEEE half -> float, exact for every input (subnormals, inf, nan). */
static inline float fa_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t man = h & 0x3ff;
    uint32_t bits;
    if (exp == 0x1f) {                       /* inf or nan */
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {                   /* normal */
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {                   /* signed zero */
        bits = sign;
    } else {                                 /* subnormal: renormalize */
        int e = -1;
        do { man <<= 1; e++; } while (!(man & 0x400));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* float -> IEEE half, rounded to nearest with ties to even, as F16C's
 * vcvtps2ph with _MM_FROUND_TO_NEAREST_INT gives it: out of range -> inf,
 * below half the smallest subnormal -> signed zero, a NaN stays a NaN (made
 * quiet, the top of its payload kept). */
static inline uint16_t fa_f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    uint32_t a = x & 0x7fffffffu;
    if (a > 0x7f800000u)                     /* nan */
        return (uint16_t)(sign | 0x7e00 | ((a >> 13) & 0x3ff));
    if (a >= 0x477ff000u)                    /* >= 65520 (or inf): inf */
        return (uint16_t)(sign | 0x7c00);
    if (a >= 0x38800000u) {                  /* a normal half: rebias, round */
        uint32_t r = a - 0x38000000u;
        r += 0xfff + ((r >> 13) & 1);
        return (uint16_t)(sign | (r >> 13));
    }
    int e = (int)(a >> 23);                  /* a subnormal half, or zero */
    if (e < 102) return sign;                /* below 2^-25 */
    uint32_t m = (a & 0x7fffffu) | 0x800000u;
    int shift = 126 - e;                     /* 14 .. 24: units of 2^-24 */
    uint32_t q = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1))) q++;
    return (uint16_t)(sign | q);
}

/* fa_f16_to_f32 of every half, filled when the library loads.  A block's
 * scale then reaches a vector register by one broadcast load, which costs the
 * vector units nothing (cvtph2ps plus a register broadcast costs three ops). */
extern float fa_f16_table[65536];

static inline float fa_bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t fa_read_u16(const uint8_t *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

/* ------------------------------------------ products by ranges of rows
 *
 * A thread's input to a product, prepared once (fa_matmul_prepare) for any
 * number of row ranges of products that read it (fa_matmul_range): in q8
 * mode x quantized, on the float path the Q4_1 block sums of x.  A range
 * [r0, r1) starts at a multiple of 16 rows and ends at one or at n_out (the
 * packed copies hold groups of 16 rows); weights past row r_pf are not
 * prefetched.  Every y element is the one fa_matmul_act(act, w, x, ...)
 * writes, whichever ranges and threads compute it. */
typedef struct {
    int act;
    const float *x;      /* [n_seq, n_in] */
    int64_t n_seq, n_in;
    const void *xq;      /* q8 mode: x quantized (fa_q8_quantize_rows), or NULL */
    const float *sx;     /* float path: block sums of x [n_seq][n_in / 32], or NULL */
} fa_prepared;

/* Bytes of scratch fa_matmul_prepare needs (0: n_in is not whole blocks,
 * and the products work from x alone). */
size_t fa_prepare_bytes(int64_t n_seq, int64_t n_in);
void fa_matmul_prepare(fa_prepared *p, int act, const float *x, int64_t n_seq, int64_t n_in,
                       void *scratch);
void fa_matmul_range(const fa_prepared *p, const fa_weight *w, float *y, int64_t r0,
                     int64_t r1, int64_t r_pf);
/* Blocks [b0, b1) of every row of x [n_seq, n_in] into quantized rows
 * (fa_q8_quantize_rows' layout). */
void fa_q8_quantize_cols(const float *x, int64_t n_in, int64_t n_seq, int64_t b0, int64_t b1,
                         void *rows);

/* The q8 kernels' AMX-INT8 path (csrc/quant_act.c): whether this CPU and
 * kernel let it run, and a switch to turn it off (1 on, the default) so that
 * tests can compare it with the VNNI kernels. */
int fa_q8_amx_available(void);
void fa_q8_set_amx(int on);
/* 1 if the q8 kernels run prefills on AMX now (available and not switched off) */
int fa_q8_amx_in_use(void);

/* The threads a parallel region may use: n_threads, or 1 in a child forked
 * after this process ran a team (see dispatch.c). */
int fa_team_threads(int n_threads);
int fa_team_started(void);
void fa_team_lose(void);

/* Rows of w a range should hold to keep the kernels at full speed (a
 * multiple of 16): the float path's decode runs several panels side by side. */
int64_t fa_matmul_unit_rows(int act, const fa_weight *w);
/* The weight bytes fa_matmul_range reads for rows [r0, r1) (at *start). */
size_t fa_matmul_region_rows(int act, const fa_weight *w, int64_t r0, int64_t r1,
                             const void **start);
/* fa_matmul's rows [r0, r1) (the float path), with the block sums sx of x
 * when the caller has them (else NULL). */
void fa_matmul_f32_range(const fa_weight *w, const float *x, const float *sx, float *y,
                         int64_t n_seq, int64_t r0, int64_t r1);


/* The half-open share [*lo, *hi) of n items that thread ith of nth owns. */
static inline void fa_share(int64_t n, int ith, int nth, int64_t *lo, int64_t *hi) {
    if (nth < 1) nth = 1;
    if (ith < 0 || ith >= nth) { *lo = *hi = 0; return; }
    *lo = n * ith / nth;
    *hi = n * (ith + 1) / nth;
}

#endif
