/*
 * Matrix products against weights in their storage form, and row lookup.
 *
 *   W  [n_out, n_in]   in one of the fa_type storage forms
 *   x  [n_seq, n_in]   float32
 *   y  [n_seq, n_out]  float32,  y[s, r] = sum_i W[r, i] * x[s, i]
 *
 * This file holds the driver (thread shares, cache tiling) and the generic
 * C kernels.  The AVX2 and AVX-512 kernels are in simd_avx2.c and
 * simd_avx512.c; all of them fill the same fa_kernels table.
 */
#include <math.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "fa_internal.h"
#include "packed.h"

/* ------------------------------------------------------ generic kernels */

/* Decode values i .. i + n - 1 of a row of `type` into w[0 .. n - 1].  For the
 * block types, i is a multiple of 32 and n is 32. */
static inline void generic_decode(int type, const uint8_t *row, int64_t i, int n,
                                  float *w) {
    switch (type) {
    case FA_F32:
        memcpy(w, row + 4 * i, 4 * (size_t)n);
        break;
    case FA_F16:
        for (int j = 0; j < n; j++) w[j] = fa_f16_table[fa_read_u16(row + 2 * (i + j))];
        break;
    case FA_BF16:
        for (int j = 0; j < n; j++) w[j] = fa_bf16_to_f32(fa_read_u16(row + 2 * (i + j)));
        break;
    case FA_Q8_0: {
        const uint8_t *b = row + (i / FA_QK) * FA_Q8_0_BYTES;
        float d = fa_f16_table[fa_read_u16(b)];
        const int8_t *q = (const int8_t *)(b + 2);
        for (int j = 0; j < FA_QK; j++) w[j] = d * (float)q[j];
        break;
    }
    case FA_Q4_0: {
        const uint8_t *b = row + (i / FA_QK) * FA_Q4_0_BYTES;
        float d = fa_f16_table[fa_read_u16(b)];
        const uint8_t *qs = b + 2;
        for (int j = 0; j < 16; j++) {
            w[j] = d * (float)((qs[j] & 0x0f) - 8);
            w[j + 16] = d * (float)((qs[j] >> 4) - 8);
        }
        break;
    }
    case FA_Q4_1: {
        const uint8_t *b = row + (i / FA_QK) * FA_Q4_1_BYTES;
        float d = fa_f16_table[fa_read_u16(b)];
        float m = fa_f16_table[fa_read_u16(b + 2)];
        const uint8_t *qs = b + 4;
        for (int j = 0; j < 16; j++) {
            w[j] = d * (float)(qs[j] & 0x0f) + m;
            w[j + 16] = d * (float)(qs[j] >> 4) + m;
        }
        break;
    }
    }
}

/* Generic dot: 8 lane accumulators per x row, lane = index mod 8, summed
 * pairwise at the end.  The order depends only on n_in, never on nr. */
static inline void generic_dot(int type, const void *wrow, const float *x, int64_t ldx,
                               int nr, int64_t n_in, float *y, int64_t ldy) {
    float acc[FA_MAX_ROWS][8];
    float w[FA_QK];
    memset(acc, 0, sizeof acc);

    for (int64_t i = 0; i < n_in; i += FA_QK) {
        int n = n_in - i < FA_QK ? (int)(n_in - i) : FA_QK;
        generic_decode(type, (const uint8_t *)wrow, i, n, w);
        for (int r = 0; r < nr; r++) {
            const float *xr = x + r * ldx + i;
            for (int j = 0; j < n; j++) acc[r][j & 7] += w[j] * xr[j];
        }
    }

    for (int r = 0; r < nr; r++) {
        const float *a = acc[r];
        y[r * ldy] = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
    }
}

#define GENERIC_DOT(name, type)                                                        \
    static void name(const void *wrow, const float *x, int64_t ldx, int nr,            \
                     int64_t n_in, float *y, int64_t ldy) {                            \
        generic_dot(type, wrow, x, ldx, nr, n_in, y, ldy);                             \
    }
GENERIC_DOT(generic_dot_f32, FA_F32)
GENERIC_DOT(generic_dot_f16, FA_F16)
GENERIC_DOT(generic_dot_bf16, FA_BF16)
GENERIC_DOT(generic_dot_q8_0, FA_Q8_0)
GENERIC_DOT(generic_dot_q4_0, FA_Q4_0)
GENERIC_DOT(generic_dot_q4_1, FA_Q4_1)

/* Attention's inner loops over one head (see fa_kernels), over a float32 or
 * (f16) a float16 cache: element i of k or v, widened exactly to float32. */
static inline float kv_at(const void *p, int f16, int64_t i) {
    return f16 ? fa_f16_table[((const uint16_t *)p)[i]] : ((const float *)p)[i];
}

static inline float scores_any(float *score, const float *q, const void *k, int f16,
                               int64_t n_t, int64_t n, float scale) {
    float mx = -INFINITY;
    for (int64_t t = 0; t < n_t; t++) {
        float acc[8] = {0};
        for (int64_t i = 0; i < n; i++) acc[i & 7] += q[i] * kv_at(k, f16, t * n + i);
        score[t] = scale * (((acc[0] + acc[1]) + (acc[2] + acc[3]))
                            + ((acc[4] + acc[5]) + (acc[6] + acc[7])));
        if (score[t] > mx) mx = score[t];
    }
    return mx;
}

static inline void wsum_any(float *out, const float *p, const void *v, int f16,
                            int64_t ldv, int64_t n_t, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = 0.0f;
    for (int64_t t = 0; t < n_t; t++)
        for (int64_t i = 0; i < n; i++) out[i] += p[t] * kv_at(v, f16, t * ldv + i);
}

static float generic_scores(float *score, const float *q, const float *k, int64_t n_t,
                            int64_t n, float scale) {
    return scores_any(score, q, k, 0, n_t, n, scale);
}

static float generic_scores_f16(float *score, const float *q, const uint16_t *k,
                                int64_t n_t, int64_t n, float scale) {
    return scores_any(score, q, k, 1, n_t, n, scale);
}

static void generic_wsum(float *out, const float *p, const float *v, int64_t ldv,
                         int64_t n_t, int64_t n) {
    wsum_any(out, p, v, 0, ldv, n_t, n);
}

static void generic_wsum_f16(float *out, const float *p, const uint16_t *v, int64_t ldv,
                             int64_t n_t, int64_t n) {
    wsum_any(out, p, v, 1, ldv, n_t, n);
}

static void generic_to_f16(uint16_t *dst, const float *src, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = fa_f32_to_f16(src[i]);
}

static float generic_softmax_exp(float *score, int64_t n_t, float mx) {
    float sum = 0.0f;
    for (int64_t t = 0; t < n_t; t++) {
        score[t] = expf(score[t] - mx);
        sum += score[t];
    }
    return sum;
}

static void generic_swiglu(float *gate, const float *up, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float z = gate[i];
        gate[i] = z / (1.0f + expf(-z)) * up[i];
    }
}

static void generic_gelu(float *x, int64_t n) {
    const float c = 0.7978845608028654f;  /* sqrt(2 / pi) */
    for (int64_t i = 0; i < n; i++) {
        float v = x[i];
        x[i] = 0.5f * v * (1.0f + tanhf(c * (v + 0.044715f * v * v * v)));
    }
}

const fa_kernels fa_kernels_generic = {
    generic_dot_f32, generic_dot_f16, generic_dot_bf16,
    generic_dot_q8_0, generic_dot_q4_0, generic_dot_q4_1,
    FA_MAX_ROWS, generic_scores, generic_wsum, generic_softmax_exp,
    generic_swiglu, generic_gelu,
    NULL, NULL,
    generic_scores_f16, generic_wsum_f16, NULL, NULL, generic_to_f16,
};

/* ---------------------------------------------------------------- driver */

/* Weight bytes one tile of rows may take: the tile stays in L2 while every
 * group of x rows passes over it. */
#define FA_TILE_BYTES (256 * 1024)

static int weight_ok(const fa_weight *w) {
    if (!w || !w->data || w->n_out <= 0 || w->n_in <= 0) return 0;
    size_t rb = fa_row_bytes(w->type, w->n_in);
    return rb != 0 && rb == w->row_bytes;
}

/* Rows [r0, r1) of y from the file form of w (no packed copy). */
static void matmul_rows(const fa_weight *w, const float *x, float *y, int64_t n_seq,
                        int64_t r0, int64_t r1) {
    const fa_kernels *k = fa_kernels_current();
    fa_dot_fn dot = fa_dot_for(k, w->type);
    if (!dot) return;

    const uint8_t *wdata = (const uint8_t *)w->data;
    const int64_t n_in = w->n_in, n_out = w->n_out;
    const size_t rb = w->row_bytes;

    /* tiles of weight rows; inside one, groups of up to max_rows x rows */
    int64_t tile = (int64_t)(FA_TILE_BYTES / rb);
    if (tile < 1) tile = 1;
    for (int64_t rt = r0; rt < r1; rt += tile) {
        int64_t rt_end = rt + tile < r1 ? rt + tile : r1;
        for (int64_t s = 0; s < n_seq; s += k->max_rows) {
            int nr = n_seq - s < k->max_rows ? (int)(n_seq - s) : k->max_rows;
            const float *xs = x + s * n_in;
            float *ys = y + s * n_out;
            for (int64_t r = rt; r < rt_end; r++)
                dot(wdata + (size_t)r * rb, xs, n_in, nr, n_in, ys + r, n_out);
        }
    }
}

void fa_matmul(const fa_weight *w, const float *x, float *y, int64_t n_seq,
               int ith, int nth) {
    if (!weight_ok(w) || !x || !y || n_seq <= 0) return;
    if (w->packed) {
        fa_matmul_packed(w, x, y, n_seq, ith, nth);
        return;
    }
    int64_t r0, r1;
    fa_share(w->n_out, ith, nth, &r0, &r1);
    matmul_rows(w, x, y, n_seq, r0, r1);
}

void fa_matmul_f32_range(const fa_weight *w, const float *x, const float *sx, float *y,
                         int64_t n_seq, int64_t r0, int64_t r1) {
    if (!weight_ok(w) || !x || !y || n_seq <= 0 || r0 < 0 || r1 > w->n_out || r0 >= r1)
        return;
    if (w->packed) {
        if (r0 % FA_PANEL || (r1 % FA_PANEL && r1 != w->n_out)) return;
        fa_matmul_packed_panels(w, x, sx, y, n_seq, r0 / FA_PANEL,
                                (r1 + FA_PANEL - 1) / FA_PANEL);
        return;
    }
    matmul_rows(w, x, y, n_seq, r0, r1);
}

void fa_matmul_share(int act, const fa_weight *w, int ith, int nth, int64_t *r0,
                     int64_t *r1) {
    *r0 = *r1 = 0;
    if (!w || w->n_out <= 0) return;
    if (w->packed && !(act == FA_ACT_Q8 && fa_act_q8_supports(w->type)))
        fa_packed_share(w, ith, nth, r0, r1);
    else
        fa_share(w->n_out, ith, nth, r0, r1);
}

void fa_parallel_matmul(const fa_weight *w, const float *x, float *y, int64_t n_seq,
                        int n_threads) {
    n_threads = fa_team_threads(n_threads);
#ifdef _OPENMP
#pragma omp parallel num_threads(n_threads)
    fa_matmul(w, x, y, n_seq, omp_get_thread_num(), omp_get_num_threads());
#else
    fa_matmul(w, x, y, n_seq, 0, 1);
#endif
}

/* --------------------------------------------------------- row lookup */

void fa_dequant_row(const fa_weight *w, int64_t row, float *out) {
    if (!weight_ok(w) || !out || row < 0 || row >= w->n_out) return;
    const uint8_t *r = (const uint8_t *)w->data + (size_t)row * w->row_bytes;
    for (int64_t i = 0; i < w->n_in; i += FA_QK) {
        int n = w->n_in - i < FA_QK ? (int)(w->n_in - i) : FA_QK;
        generic_decode(w->type, r, i, n, out + i);
    }
}
