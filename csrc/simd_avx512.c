/*
 * AVX-512 kernels (F, BW, VL, with FMA and F16C): the fa_kernels_avx512 table.
 *
 * Compiled for that target with function attributes, so the rest of the
 * build stays portable; dispatch.c only hands this table out when CPUID says
 * the CPU runs it.
 *
 * Order of operations (what makes results reproducible):
 *   float types   value i goes to accumulator (i / 16) % 4, lane i % 16
 *   block types   block b is dequantized in registers (32 values, two
 *                 vectors) and goes to accumulators 2 (b % 2) and 2 (b % 2) + 1
 *   the four accumulators are added as (a0 + a1) + (a2 + a3), then lanes.
 * Each x row has its own accumulators, so a kernel applying a weight row to
 * nr x rows computes every row exactly as it would alone.
 *
 * A model built at this level does not run these dot products: it repacks
 * its matrices into 16-row panels and uses packed_avx512.c, which is faster
 * for every type (a Q4_1 decode GEMV from cache: about 17 here, 28 GMAC/s
 * there, per Zen 4 core).  These kernels serve weights used as the file
 * stores them (fastattn._kernels.matmul, and any weight the packer refuses).
 * Known limit: a Q4_1 block costs about 14 vector slots here (index
 * expansion, two table lookups, the table itself, two FMAs).
 */
#include <math.h>

#include "fa_internal.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#define INL static inline __attribute__((always_inline)) T512

/* ------------------------------------------------------------ helpers */

INL float hsum4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

/* Lanes [0, rem) of a 16-lane vector, rem clamped to 0 .. 16. */
INL __mmask16 tail_mask(int64_t rem) {
    if (rem <= 0) return 0;
    if (rem >= 16) return 0xffff;
    return (__mmask16)((1u << rem) - 1);
}

/* 16 weights from index i of a float-type row, lanes outside m read as 0. */
INL __m512 load_w(int type, const uint8_t *w, int64_t i, __mmask16 m) {
    if (type == FA_F32) return _mm512_maskz_loadu_ps(m, (const float *)w + i);
    __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)w + i);
    if (type == FA_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

INL __m512 load_w_full(int type, const uint8_t *w, int64_t i) {
    if (type == FA_F32) return _mm512_loadu_ps((const float *)w + i);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)w + i));
    if (type == FA_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* ------------------------------------------------------ float-type dots */

/* Known limit: from DRAM, F16 and BF16 rows ran 10-25% slower here than with
 * the AVX2 kernel on the machine this was measured on (noisy, shared); from
 * cache they are as fast or faster.  The cause was not found. */
INL void dot_float(int type, const uint8_t *w, const float *x, int64_t ldx, const int nr,
                   int64_t n, float *y, int64_t ldy) {
    __m512 acc[FA_MAX_ROWS][4];
    for (int r = 0; r < nr; r++)
        for (int j = 0; j < 4; j++) acc[r][j] = _mm512_setzero_ps();

    /* whole groups of 64 values */
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        for (int j = 0; j < 4; j++) {
            __m512 wv = load_w_full(type, w, i + 16 * j);
            for (int r = 0; r < nr; r++)
                acc[r][j] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + r * ldx + i + 16 * j),
                                            acc[r][j]);
        }
    }

    /* the last 0 .. 63 values, masked, same accumulator per 16 as above */
    if (i < n) {
        for (int j = 0; j < 4; j++) {
            __mmask16 m = tail_mask(n - i - 16 * j);
            if (!m) break;
            __m512 wv = load_w(type, w, i + 16 * j, m);
            for (int r = 0; r < nr; r++)
                acc[r][j] = _mm512_fmadd_ps(
                    wv, _mm512_maskz_loadu_ps(m, x + r * ldx + i + 16 * j), acc[r][j]);
        }
    }

    for (int r = 0; r < nr; r++)
        y[r * ldy] = hsum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
}

/* ------------------------------------------------------ block-type dots */

/* Dequantize one 32-value block into w0 (values 0..15) and w1 (16..31).
 * Scales come from fa_f16_table by broadcast loads. */
INL void decode_block(int type, const uint8_t *b, __m512 *w0, __m512 *w1) {
    __m512 d = _mm512_set1_ps(fa_f16_table[fa_read_u16(b)]);
    if (type == FA_Q8_0) {
        __m512i q0 = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b + 2)));
        __m512i q1 = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b + 18)));
        *w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(q0), d);
        *w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(q1), d);
        return;
    }
    /* Q4_0: d * (q - 8); Q4_1: d * q + m.  The 16 possible values of the
     * block go in a table, and each nibble picks its value by vpermps (which
     * reads only the low 4 bits of each index): cheaper than converting 32
     * integers, and the same numbers as (q - 8) * d and fma(q, d, m). */
    const __m512 k16 = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512 table;
    __m512i v;
    if (type == FA_Q4_0) {
        table = _mm512_mul_ps(_mm512_sub_ps(k16, _mm512_set1_ps(8.0f)), d);
        v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(b + 2)));
    } else {
        __m512 m = _mm512_set1_ps(fa_f16_table[fa_read_u16(b + 2)]);
        table = _mm512_fmadd_ps(k16, d, m);
        v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(b + 4)));
    }
    *w0 = _mm512_permutexvar_ps(v, table);                        /* low nibbles */
    *w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);  /* high nibbles */
}

INL void dot_blocks(int type, size_t block_bytes, const uint8_t *w, const float *x,
                    int64_t ldx, const int nr, int64_t n, float *y, int64_t ldy) {
    __m512 acc[FA_MAX_ROWS][4];
    for (int r = 0; r < nr; r++)
        for (int j = 0; j < 4; j++) acc[r][j] = _mm512_setzero_ps();
    const int64_t nb = n / FA_QK;
    __m512 w0, w1;

    /* pairs of blocks: even ones to accumulators 0, 1, odd ones to 2, 3 */
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
        for (int k = 0; k < 2; k++) {
            decode_block(type, w + (b + k) * block_bytes, &w0, &w1);
            for (int r = 0; r < nr; r++) {
                const float *xb = x + r * ldx + (b + k) * FA_QK;
                acc[r][2 * k] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xb), acc[r][2 * k]);
                acc[r][2 * k + 1] =
                    _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb + 16), acc[r][2 * k + 1]);
            }
        }
    }
    if (b < nb) {
        decode_block(type, w + b * block_bytes, &w0, &w1);
        for (int r = 0; r < nr; r++) {
            const float *xb = x + r * ldx + b * FA_QK;
            acc[r][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xb), acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb + 16), acc[r][1]);
        }
    }

    for (int r = 0; r < nr; r++)
        y[r * ldy] = hsum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
}

/* One entry point per type; the switch makes nr a constant in each copy. */
#define DOT_ENTRY(name, call)                                                          \
    T512 static void name(const void *wrow, const float *x, int64_t ldx, int nr,       \
                          int64_t n, float *y, int64_t ldy) {                          \
        const uint8_t *w = (const uint8_t *)wrow;                                      \
        switch (nr) {                                                                  \
        case 1: call(1); break;                                                        \
        case 2: call(2); break;                                                        \
        case 3: call(3); break;                                                        \
        default: call(4); break;                                                       \
        }                                                                              \
    }

#define CALL_F32(R) dot_float(FA_F32, w, x, ldx, R, n, y, ldy)
#define CALL_F16(R) dot_float(FA_F16, w, x, ldx, R, n, y, ldy)
#define CALL_BF16(R) dot_float(FA_BF16, w, x, ldx, R, n, y, ldy)
#define CALL_Q8_0(R) dot_blocks(FA_Q8_0, FA_Q8_0_BYTES, w, x, ldx, R, n, y, ldy)
#define CALL_Q4_0(R) dot_blocks(FA_Q4_0, FA_Q4_0_BYTES, w, x, ldx, R, n, y, ldy)
#define CALL_Q4_1(R) dot_blocks(FA_Q4_1, FA_Q4_1_BYTES, w, x, ldx, R, n, y, ldy)
DOT_ENTRY(avx512_dot_f32, CALL_F32)
DOT_ENTRY(avx512_dot_f16, CALL_F16)
DOT_ENTRY(avx512_dot_bf16, CALL_BF16)
DOT_ENTRY(avx512_dot_q8_0, CALL_Q8_0)
DOT_ENTRY(avx512_dot_q4_0, CALL_Q4_0)
DOT_ENTRY(avx512_dot_q4_1, CALL_Q4_1)

/* ----------------------------------------------------------- attention */

/* The lane sums of four vectors, as one vector [sum a0, sum a1, sum a2, sum a3]. */
INL __m128 hsum_x4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
    __m512 t01 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
    __m512 t23 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
    __m512 u = _mm512_add_ps(
        _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t01), _mm512_castps_pd(t23))),
        _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t01), _mm512_castps_pd(t23))));
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(u),
                             _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(u), 1)));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

/* 16 cache values from element i of a float32 or (f16) float16 row, lanes
 * outside m 0, widened: the f16 kernels below are the f32 ones with this load. */
INL __m512 load_kv(const void *p, const int f16, int64_t i, __mmask16 m) {
    if (!f16) return _mm512_maskz_loadu_ps(m, (const float *)p + i);
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, (const uint16_t *)p + i));
}

/* Scores of four keys at a time, so one reduction tree serves four dot
 * products.  Past the last key the group repeats key n_t - 1 (never reading
 * beyond the filled cache) and drops those results, so every score is
 * computed the same way wherever it falls in a group. */
INL float scores_any(float *score, const float *q, const void *k, const int f16,
                     int64_t n_t, int64_t n, float scale) {
    const __m128 vscale = _mm_set1_ps(scale);
    __m128 vmax = _mm_set1_ps(-INFINITY);  /* repeated keys past the end change no max */
    for (int64_t t = 0; t < n_t; t += 4) {
        const int64_t k0 = t * n;
        const int64_t k1 = (t + 1 < n_t ? t + 1 : n_t - 1) * n;
        const int64_t k2 = (t + 2 < n_t ? t + 2 : n_t - 1) * n;
        const int64_t k3 = (t + 3 < n_t ? t + 3 : n_t - 1) * n;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t i = 0; i < n; i += 16) {
            __mmask16 m = tail_mask(n - i);
            __m512 qv = _mm512_maskz_loadu_ps(m, q + i);
            a0 = _mm512_fmadd_ps(qv, load_kv(k, f16, k0 + i, m), a0);
            a1 = _mm512_fmadd_ps(qv, load_kv(k, f16, k1 + i, m), a1);
            a2 = _mm512_fmadd_ps(qv, load_kv(k, f16, k2 + i, m), a2);
            a3 = _mm512_fmadd_ps(qv, load_kv(k, f16, k3 + i, m), a3);
        }
        __m128 sc = _mm_mul_ps(vscale, hsum_x4(a0, a1, a2, a3));
        vmax = _mm_max_ps(vmax, sc);
        if (n_t - t >= 4)  /* a plain store: masked ones are slow and block forwarding */
            _mm_storeu_ps(score + t, sc);
        else
            _mm_mask_storeu_ps(score + t, (__mmask8)((1u << (n_t - t)) - 1), sc);
    }
    vmax = _mm_max_ps(vmax, _mm_movehl_ps(vmax, vmax));
    vmax = _mm_max_ss(vmax, _mm_movehdup_ps(vmax));
    return _mm_cvtss_f32(vmax);
}

/* out[i] = sum_t p[t] v[t, i], 64 columns at a time held in registers.
 * Even and odd keys go to separate accumulators (two FMA chains instead of
 * one), added at the end. */
INL void wsum_any(float *out, const float *p, const void *v, const int f16, int64_t ldv,
                  int64_t n_t, int64_t n) {
    for (int64_t i0 = 0; i0 < n; i0 += 64) {
        __mmask16 m[4];
        for (int j = 0; j < 4; j++) m[j] = tail_mask(n - i0 - 16 * j);
        __m512 a[2][4];
        for (int e = 0; e < 2; e++)
            for (int j = 0; j < 4; j++) a[e][j] = _mm512_setzero_ps();
        int64_t t = 0;
        for (; t + 2 <= n_t; t += 2) {
            for (int e = 0; e < 2; e++) {
                const int64_t vt = (t + e) * ldv + i0;
                __m512 pt = _mm512_set1_ps(p[t + e]);
                for (int j = 0; j < 4; j++)
                    a[e][j] = _mm512_fmadd_ps(pt, load_kv(v, f16, vt + 16 * j, m[j]),
                                              a[e][j]);
            }
        }
        if (t < n_t) {
            const int64_t vt = t * ldv + i0;
            __m512 pt = _mm512_set1_ps(p[t]);
            for (int j = 0; j < 4; j++)
                a[0][j] = _mm512_fmadd_ps(pt, load_kv(v, f16, vt + 16 * j, m[j]), a[0][j]);
        }
        for (int j = 0; j < 4; j++)
            _mm512_mask_storeu_ps(out + i0 + 16 * j, m[j], _mm512_add_ps(a[0][j], a[1][j]));
    }
}

/* avx512_scores for R query rows at once (R a constant after inlining):
 * each group of four keys is loaded once and feeds every row's own four
 * accumulators, so row r's scores are avx512_scores' numbers.  Keys run to
 * the largest count n_hi; a row whose count ends inside a group takes, in
 * the lanes past its end, its last key's score (what avx512_scores' repeated
 * key gives), so its max is taken over the same values in the same order. */
INL void scores_rows_r(float *score, int64_t lds, const float *const *qrow, const int R,
                       const void *k, const int f16, const int64_t *n_t, int64_t n,
                       float scale, float *mx) {
    const __m128 vscale = _mm_set1_ps(scale);
    int64_t n_hi = 0;
    for (int r = 0; r < R; r++) n_hi = n_t[r] > n_hi ? n_t[r] : n_hi;
    __m128 vmax[6];
    for (int r = 0; r < R; r++) vmax[r] = _mm_set1_ps(-INFINITY);
    for (int64_t t = 0; t < n_hi; t += 4) {
        const int64_t k0 = t * n;
        const int64_t k1 = (t + 1 < n_hi ? t + 1 : n_hi - 1) * n;
        const int64_t k2 = (t + 2 < n_hi ? t + 2 : n_hi - 1) * n;
        const int64_t k3 = (t + 3 < n_hi ? t + 3 : n_hi - 1) * n;
        /* the keys 32 on (8 KiB of head_dim 64 rows, often the next chunk,
         * which lies right after this one): with it a decode's attention
         * read the cache from DRAM at 15-16 GB/s on one core instead of 12-13
         * (ahead 16 or 64 gave about the same).  The same ask for V in
         * wsum_rows measured no gain. */
        const size_t es = f16 ? 2 : 4;  /* bytes per value; a line is 64 */
        for (size_t o = 0; o < 4 * (size_t)n * es; o += 64)
            _mm_prefetch((const char *)k + (size_t)(t + 32) * n * es + o, FA_PREFETCH_STREAM);
        __m512 a[6][4];
        for (int r = 0; r < R; r++)
            for (int j = 0; j < 4; j++) a[r][j] = _mm512_setzero_ps();
        for (int64_t i = 0; i < n; i += 16) {
            __mmask16 m = tail_mask(n - i);
            __m512 kv0 = load_kv(k, f16, k0 + i, m), kv1 = load_kv(k, f16, k1 + i, m);
            __m512 kv2 = load_kv(k, f16, k2 + i, m), kv3 = load_kv(k, f16, k3 + i, m);
            for (int r = 0; r < R; r++) {
                __m512 qv = _mm512_maskz_loadu_ps(m, qrow[r] + i);
                a[r][0] = _mm512_fmadd_ps(qv, kv0, a[r][0]);
                a[r][1] = _mm512_fmadd_ps(qv, kv1, a[r][1]);
                a[r][2] = _mm512_fmadd_ps(qv, kv2, a[r][2]);
                a[r][3] = _mm512_fmadd_ps(qv, kv3, a[r][3]);
            }
        }
        for (int r = 0; r < R; r++) {
            int64_t left = n_t[r] - t;
            if (left <= 0) continue;
            __m128 sc = _mm_mul_ps(vscale, hsum_x4(a[r][0], a[r][1], a[r][2], a[r][3]));
            if (left < 4) {  /* lanes past the row's last key repeat it */
                __m128i last = _mm_set1_epi32((int)left - 1);
                __m128i idx = _mm_min_epi32(_mm_setr_epi32(0, 1, 2, 3), last);
                sc = _mm_permutevar_ps(sc, idx);
            }
            vmax[r] = _mm_max_ps(vmax[r], sc);
            _mm_storeu_ps(score + r * lds + t, sc);  /* rows hold ATT_CHUNK-padded space */
        }
    }
    for (int r = 0; r < R; r++) {
        __m128 v = vmax[r];
        v = _mm_max_ps(v, _mm_movehl_ps(v, v));
        v = _mm_max_ss(v, _mm_movehdup_ps(v));
        mx[r] = _mm_cvtss_f32(v);
    }
}

INL void scores_rows_any(float *score, int64_t lds, const float *const *qrow, int nr,
                         const void *k, const int f16, const int64_t *n_t, int64_t n,
                         float scale, float *mx) {
    /* R a constant in every call, so each size gets its own unrolled body */
#define ROWS(R) scores_rows_r(score + r * lds, lds, qrow + r, R, k, f16, n_t + r, n, scale, mx + r)
    int r = 0;
    for (; r + 6 <= nr; r += 6) ROWS(6);
    switch (nr - r) {
    case 5: ROWS(5); break;
    case 4: ROWS(4); break;
    case 3: ROWS(3); break;
    case 2: ROWS(2); break;
    case 1: ROWS(1); break;
    default: break;
    }
#undef ROWS
}

/* avx512_wsum for R rows at once: each value row is loaded once and feeds
 * every row's even/odd accumulators.  A row stops at its own key count; its
 * odd last key goes to the even accumulators, as in avx512_wsum. */
INL void wsum_rows_r(float *out, int64_t ldo, const float *p, int64_t ldp, const int R,
                     const void *v, const int f16, int64_t ldv, const int64_t *n_t,
                     int64_t n) {
    int64_t n_lo = n_t[0], n_hi = n_t[0];
    for (int r = 1; r < R; r++) {
        n_lo = n_t[r] < n_lo ? n_t[r] : n_lo;
        n_hi = n_t[r] > n_hi ? n_t[r] : n_hi;
    }
    for (int64_t i0 = 0; i0 < n; i0 += 64) {
        __mmask16 m[4];
        for (int j = 0; j < 4; j++) m[j] = tail_mask(n - i0 - 16 * j);
        __m512 a[3][2][4];
        for (int r = 0; r < R; r++)
            for (int e = 0; e < 2; e++)
                for (int j = 0; j < 4; j++) a[r][e][j] = _mm512_setzero_ps();
        int64_t t = 0;
        for (; t + 2 <= n_lo; t += 2) {
            for (int e = 0; e < 2; e++) {
                const int64_t vt = (t + e) * ldv + i0;
                __m512 vv[4];
                for (int j = 0; j < 4; j++) vv[j] = load_kv(v, f16, vt + 16 * j, m[j]);
                for (int r = 0; r < R; r++) {
                    __m512 pt = _mm512_set1_ps(p[r * ldp + t + e]);
                    for (int j = 0; j < 4; j++) a[r][e][j] = _mm512_fmadd_ps(pt, vv[j], a[r][e][j]);
                }
            }
        }
        for (; t < n_hi; t += 2) {  /* past the shortest row: each row to its own end */
            for (int e = 0; e < 2 && t + e < n_hi; e++) {
                const int64_t vt = (t + e) * ldv + i0;
                __m512 vv[4];
                for (int j = 0; j < 4; j++) vv[j] = load_kv(v, f16, vt + 16 * j, m[j]);
                for (int r = 0; r < R; r++) {
                    if (t + e >= n_t[r]) continue;
                    __m512 pt = _mm512_set1_ps(p[r * ldp + t + e]);
                    for (int j = 0; j < 4; j++) a[r][e][j] = _mm512_fmadd_ps(pt, vv[j], a[r][e][j]);
                }
            }
        }
        for (int r = 0; r < R; r++)
            for (int j = 0; j < 4; j++)
                _mm512_mask_storeu_ps(out + r * ldo + i0 + 16 * j, m[j],
                                      _mm512_add_ps(a[r][0][j], a[r][1][j]));
    }
}

INL void wsum_rows_any(float *out, int64_t ldo, const float *p, int64_t ldp, int nr,
                       const void *v, const int f16, int64_t ldv, const int64_t *n_t,
                       int64_t n) {
    int r = 0;
    for (; r + 3 <= nr; r += 3)
        wsum_rows_r(out + r * ldo, ldo, p + r * ldp, ldp, 3, v, f16, ldv, n_t + r, n);
    if (nr - r == 2) wsum_rows_r(out + r * ldo, ldo, p + r * ldp, ldp, 2, v, f16, ldv, n_t + r, n);
    if (nr - r == 1) wsum_rows_r(out + r * ldo, ldo, p + r * ldp, ldp, 1, v, f16, ldv, n_t + r, n);
}

/* The table's entries: each kernel above over a float32 and a float16 cache. */
T512 static float avx512_scores(float *score, const float *q, const float *k, int64_t n_t,
                               int64_t n, float scale) {
    return scores_any(score, q, k, 0, n_t, n, scale);
}

T512 static float avx512_scores_f16(float *score, const float *q, const uint16_t *k,
                                   int64_t n_t, int64_t n, float scale) {
    return scores_any(score, q, k, 1, n_t, n, scale);
}

T512 static void avx512_wsum(float *out, const float *p, const float *v, int64_t ldv,
                             int64_t n_t, int64_t n) {
    wsum_any(out, p, v, 0, ldv, n_t, n);
}

T512 static void avx512_wsum_f16(float *out, const float *p, const uint16_t *v,
                                 int64_t ldv, int64_t n_t, int64_t n) {
    wsum_any(out, p, v, 1, ldv, n_t, n);
}

T512 static void avx512_scores_rows(float *score, int64_t lds, const float *const *qrow,
                                    int nr, const float *k, const int64_t *n_t, int64_t n,
                                    float scale, float *mx) {
    scores_rows_any(score, lds, qrow, nr, k, 0, n_t, n, scale, mx);
}

T512 static void avx512_scores_rows_f16(float *score, int64_t lds, const float *const *qrow,
                                        int nr, const uint16_t *k, const int64_t *n_t,
                                        int64_t n, float scale, float *mx) {
    scores_rows_any(score, lds, qrow, nr, k, 1, n_t, n, scale, mx);
}

T512 static void avx512_wsum_rows(float *out, int64_t ldo, const float *p, int64_t ldp,
                                  int nr, const float *v, int64_t ldv, const int64_t *n_t,
                                  int64_t n) {
    wsum_rows_any(out, ldo, p, ldp, nr, v, 0, ldv, n_t, n);
}

T512 static void avx512_wsum_rows_f16(float *out, int64_t ldo, const float *p, int64_t ldp,
                                      int nr, const uint16_t *v, int64_t ldv,
                                      const int64_t *n_t, int64_t n) {
    wsum_rows_any(out, ldo, p, ldp, nr, v, 1, ldv, n_t, n);
}

/* Rounded to nearest even by F16C, 16 at a time, the tail masked. */
T512 static void avx512_to_f16(uint16_t *dst, const float *src, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = tail_mask(n - i);
        __m256i h = _mm512_cvtps_ph(_mm512_maskz_loadu_ps(m, src + i),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm256_mask_storeu_epi16(dst + i, m, h);
    }
}

/* exp(x): x = n ln2 + r, |r| <= ln2 / 2, exp(r) by a degree-6 polynomial
 * (Cephes' expf coefficients), times 2^n by scalef, which underflows to 0
 * and overflows to inf gracefully.  Within 2 ulp of expf. */
INL __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
    x = _mm512_min_ps(x, _mm512_set1_ps(89.0f));
    __m512 nf = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(nf, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(nf, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, nf);
}

T512 static float avx512_softmax_exp(float *score, int64_t n_t, float mx) {
    __m512 sum = _mm512_setzero_ps();
    __m512 vmx = _mm512_set1_ps(mx);
    int64_t t = 0;
    for (; t + 16 <= n_t; t += 16) {
        __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(score + t), vmx));
        _mm512_storeu_ps(score + t, e);
        sum = _mm512_add_ps(sum, e);
    }
    if (t < n_t) {
        __mmask16 m = tail_mask(n_t - t);
        __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, score + t), vmx));
        _mm512_mask_storeu_ps(score + t, m, e);
        sum = _mm512_mask_add_ps(sum, m, sum, e);
    }
    return _mm512_reduce_add_ps(sum);
}

/* ---------------------------------------------------------- activations */

T512 static void avx512_swiglu(float *gate, const float *up, int64_t n) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = tail_mask(n - i);
        __m512 z = _mm512_maskz_loadu_ps(m, gate + i);
        __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), z));
        __m512 silu = _mm512_div_ps(z, _mm512_add_ps(one, e));
        _mm512_mask_storeu_ps(gate + i, m, _mm512_mul_ps(silu, _mm512_maskz_loadu_ps(m, up + i)));
    }
}

/* tanh(u) = 1 - 2 / (1 + exp(2u)), which saturates to +-1 correctly. */
T512 static void avx512_gelu(float *x, int64_t n) {
    const __m512 one = _mm512_set1_ps(1.0f), two = _mm512_set1_ps(2.0f);
    const __m512 c = _mm512_set1_ps(0.7978845608028654f), a = _mm512_set1_ps(0.044715f);
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = tail_mask(n - i);
        __m512 v = _mm512_maskz_loadu_ps(m, x + i);
        __m512 u = _mm512_mul_ps(c, _mm512_fmadd_ps(_mm512_mul_ps(a, v), _mm512_mul_ps(v, v), v));
        __m512 e = exp512(_mm512_mul_ps(two, u));
        __m512 th = _mm512_sub_ps(one, _mm512_div_ps(two, _mm512_add_ps(one, e)));
        __m512 y = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), v), _mm512_add_ps(one, th));
        _mm512_mask_storeu_ps(x + i, m, y);
    }
}

const fa_kernels fa_kernels_avx512 = {
    avx512_dot_f32, avx512_dot_f16, avx512_dot_bf16,
    avx512_dot_q8_0, avx512_dot_q4_0, avx512_dot_q4_1,
    4, avx512_scores, avx512_wsum, avx512_softmax_exp,
    avx512_swiglu, avx512_gelu,
    avx512_scores_rows, avx512_wsum_rows,
    avx512_scores_f16, avx512_wsum_f16, avx512_scores_rows_f16, avx512_wsum_rows_f16,
    avx512_to_f16,
};

#else  /* not x86-64 with GCC-style intrinsics: the generic kernels stand in */

const fa_kernels fa_kernels_avx512 = {0};

#endif
