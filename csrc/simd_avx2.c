/*
 * AVX2 kernels (with FMA and F16C): the fa_kernels_avx2 table.
 *
 * Compiled for that target with function attributes; dispatch.c only hands
 * this table out when CPUID says the CPU runs it.
 *
 * Order of operations:
 *   float types   value i goes to accumulator (i / 8) % 4, lane i % 8
 *   block types   block b is dequantized in registers (four vectors of 8)
 *                 and vector j goes to accumulator j
 *   the four accumulators are added as (a0 + a1) + (a2 + a3), then lanes.
 * Each x row has its own accumulators, so a kernel applying a weight row to
 * nr (<= 2, what 16 registers hold) x rows computes each row as it would alone.
 */
#include <math.h>

#include "fa_internal.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#define T256 __attribute__((target("avx2,fma,f16c")))
#define INL static inline __attribute__((always_inline)) T256
#define AVX2_ROWS 2

/* ------------------------------------------------------------ helpers */

INL float hsum8(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

INL float hsum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    return hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
}

/* A maskload mask selecting lanes [0, rem), rem clamped to 0 .. 8. */
INL __m256i tail_mask(int64_t rem) {
    if (rem < 0) rem = 0;
    if (rem > 8) rem = 8;
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)rem),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

INL __m256 load_w_full(int type, const uint8_t *w, int64_t i) {
    if (type == FA_F32) return _mm256_loadu_ps((const float *)w + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + i));
    if (type == FA_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* Weights i .. i + rem - 1 (rem < 8) of a float-type row, the rest 0. */
INL __m256 load_w_part(int type, const uint8_t *w, int64_t i, int64_t rem) {
    if (type == FA_F32) return _mm256_maskload_ps((const float *)w + i, tail_mask(rem));
    float tmp[8] = {0};
    for (int64_t j = 0; j < rem; j++) {
        uint16_t h = fa_read_u16(w + 2 * (i + j));
        tmp[j] = type == FA_F16 ? fa_f16_to_f32(h) : fa_bf16_to_f32(h);
    }
    return _mm256_loadu_ps(tmp);
}

/* ------------------------------------------------------ float-type dots */

INL void dot_float(int type, const uint8_t *w, const float *x, int64_t ldx, const int nr,
                   int64_t n, float *y, int64_t ldy) {
    __m256 acc[AVX2_ROWS][4];
    for (int r = 0; r < nr; r++)
        for (int j = 0; j < 4; j++) acc[r][j] = _mm256_setzero_ps();

    /* whole groups of 32 values */
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        for (int j = 0; j < 4; j++) {
            __m256 wv = load_w_full(type, w, i + 8 * j);
            for (int r = 0; r < nr; r++)
                acc[r][j] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + r * ldx + i + 8 * j),
                                            acc[r][j]);
        }
    }

    /* the last 0 .. 31 values, same accumulator per 8 as above */
    for (int j = 0; j < 4 && i + 8 * j < n; j++) {
        int64_t at = i + 8 * j, rem = n - at;
        __m256 wv = rem >= 8 ? load_w_full(type, w, at) : load_w_part(type, w, at, rem);
        __m256i m = tail_mask(rem);
        for (int r = 0; r < nr; r++)
            acc[r][j] = _mm256_fmadd_ps(wv, _mm256_maskload_ps(x + r * ldx + at, m), acc[r][j]);
    }

    for (int r = 0; r < nr; r++)
        y[r * ldy] = hsum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
}

/* ------------------------------------------------------ block-type dots */

/* Dequantize one 32-value block into w[0..3], 8 values each, in order.
 * Scales come from fa_f16_table by broadcast loads. */
INL void decode_block(int type, const uint8_t *b, __m256 w[4]) {
    __m256 d = _mm256_set1_ps(fa_f16_table[fa_read_u16(b)]);
    if (type == FA_Q8_0) {
        for (int j = 0; j < 4; j++) {
            __m128i q = _mm_loadl_epi64((const __m128i *)(b + 2 + 8 * j));
            w[j] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d);
        }
        return;
    }
    /* byte j of qs: value j in its low nibble, value j + 16 in its high one */
    const int q4_1 = type == FA_Q4_1;
    __m128i qs = _mm_loadu_si128((const __m128i *)(b + (q4_1 ? 4 : 2)));
    __m256i v0 = _mm256_cvtepu8_epi32(qs);
    __m256i v1 = _mm256_cvtepu8_epi32(_mm_srli_si128(qs, 8));
    __m256i low = _mm256_set1_epi32(15);
    __m256i q[4] = {_mm256_and_si256(v0, low), _mm256_and_si256(v1, low),
                    _mm256_srli_epi32(v0, 4), _mm256_srli_epi32(v1, 4)};
    if (q4_1) {
        __m256 m = _mm256_set1_ps(fa_f16_table[fa_read_u16(b + 2)]);
        for (int j = 0; j < 4; j++) w[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q[j]), d, m);
    } else {
        __m256i eight = _mm256_set1_epi32(8);
        for (int j = 0; j < 4; j++)
            w[j] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(q[j], eight)), d);
    }
}

INL void dot_blocks(int type, size_t block_bytes, const uint8_t *w, const float *x,
                    int64_t ldx, const int nr, int64_t n, float *y, int64_t ldy) {
    __m256 acc[AVX2_ROWS][4];
    for (int r = 0; r < nr; r++)
        for (int j = 0; j < 4; j++) acc[r][j] = _mm256_setzero_ps();
    const int64_t nb = n / FA_QK;
    __m256 wv[4];

    for (int64_t b = 0; b < nb; b++) {
        decode_block(type, w + b * block_bytes, wv);
        for (int r = 0; r < nr; r++) {
            const float *xb = x + r * ldx + b * FA_QK;
            for (int j = 0; j < 4; j++)
                acc[r][j] = _mm256_fmadd_ps(wv[j], _mm256_loadu_ps(xb + 8 * j), acc[r][j]);
        }
    }

    for (int r = 0; r < nr; r++)
        y[r * ldy] = hsum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
}

#define DOT_ENTRY(name, call)                                                          \
    T256 static void name(const void *wrow, const float *x, int64_t ldx, int nr,       \
                          int64_t n, float *y, int64_t ldy) {                          \
        const uint8_t *w = (const uint8_t *)wrow;                                      \
        if (nr == 1) call(1); else call(2);                                            \
    }

#define CALL_F32(R) dot_float(FA_F32, w, x, ldx, R, n, y, ldy)
#define CALL_F16(R) dot_float(FA_F16, w, x, ldx, R, n, y, ldy)
#define CALL_BF16(R) dot_float(FA_BF16, w, x, ldx, R, n, y, ldy)
#define CALL_Q8_0(R) dot_blocks(FA_Q8_0, FA_Q8_0_BYTES, w, x, ldx, R, n, y, ldy)
#define CALL_Q4_0(R) dot_blocks(FA_Q4_0, FA_Q4_0_BYTES, w, x, ldx, R, n, y, ldy)
#define CALL_Q4_1(R) dot_blocks(FA_Q4_1, FA_Q4_1_BYTES, w, x, ldx, R, n, y, ldy)
DOT_ENTRY(avx2_dot_f32, CALL_F32)
DOT_ENTRY(avx2_dot_f16, CALL_F16)
DOT_ENTRY(avx2_dot_bf16, CALL_BF16)
DOT_ENTRY(avx2_dot_q8_0, CALL_Q8_0)
DOT_ENTRY(avx2_dot_q4_0, CALL_Q4_0)
DOT_ENTRY(avx2_dot_q4_1, CALL_Q4_1)

/* ----------------------------------------------------------- attention */

/* The lane sums of four vectors, as one vector [sum a0, sum a1, sum a2, sum a3]. */
INL __m128 hsum_x4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

/* 8 cache values from element i of a float32 or (f16) float16 row, widened:
 * the f16 kernels below are the f32 ones with this load. */
INL __m256 load_kv(const void *p, int f16, int64_t i) {
    if (!f16) return _mm256_loadu_ps((const float *)p + i);
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)));
}

/* The same for elements i .. i + rem - 1 (rem clamped to 0 .. 8), the rest 0. */
INL __m256 load_kv_part(const void *p, int f16, int64_t i, int64_t rem) {
    if (!f16) return _mm256_maskload_ps((const float *)p + i, tail_mask(rem));
    uint16_t tmp[8] = {0};  /* half 0 widens to 0.0f, as maskload's empty lanes */
    for (int64_t j = 0; j < rem && j < 8; j++) tmp[j] = ((const uint16_t *)p)[i + j];
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)tmp));
}

/* Scores of four keys at a time, so one reduction tree serves four dot
 * products; past the last key the group repeats key n_t - 1 and drops those
 * results, so every score is computed the same way wherever it falls. */
INL float scores_any(float *score, const float *q, const void *k, const int f16,
                     int64_t n_t, int64_t n, float scale) {
    const __m128 vscale = _mm_set1_ps(scale);
    __m128 vmax = _mm_set1_ps(-INFINITY);  /* repeated keys past the end change no max */
    for (int64_t t = 0; t < n_t; t += 4) {
        const int64_t k0 = t * n;
        const int64_t k1 = (t + 1 < n_t ? t + 1 : n_t - 1) * n;
        const int64_t k2 = (t + 2 < n_t ? t + 2 : n_t - 1) * n;
        const int64_t k3 = (t + 3 < n_t ? t + 3 : n_t - 1) * n;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        int64_t i = 0;
        for (; i + 8 <= n; i += 8) {
            __m256 qv = _mm256_loadu_ps(q + i);
            a0 = _mm256_fmadd_ps(qv, load_kv(k, f16, k0 + i), a0);
            a1 = _mm256_fmadd_ps(qv, load_kv(k, f16, k1 + i), a1);
            a2 = _mm256_fmadd_ps(qv, load_kv(k, f16, k2 + i), a2);
            a3 = _mm256_fmadd_ps(qv, load_kv(k, f16, k3 + i), a3);
        }
        if (i < n) {
            __m256i m = tail_mask(n - i);
            __m256 qv = _mm256_maskload_ps(q + i, m);
            a0 = _mm256_fmadd_ps(qv, load_kv_part(k, f16, k0 + i, n - i), a0);
            a1 = _mm256_fmadd_ps(qv, load_kv_part(k, f16, k1 + i, n - i), a1);
            a2 = _mm256_fmadd_ps(qv, load_kv_part(k, f16, k2 + i, n - i), a2);
            a3 = _mm256_fmadd_ps(qv, load_kv_part(k, f16, k3 + i, n - i), a3);
        }
        __m128 sc = _mm_mul_ps(vscale, hsum_x4(a0, a1, a2, a3));
        vmax = _mm_max_ps(vmax, sc);
        if (n_t - t >= 4) {
            _mm_storeu_ps(score + t, sc);
        } else {
            float tmp[4];
            _mm_storeu_ps(tmp, sc);
            for (int64_t j = 0; j < n_t - t; j++) score[t + j] = tmp[j];
        }
    }
    vmax = _mm_max_ps(vmax, _mm_movehl_ps(vmax, vmax));
    vmax = _mm_max_ss(vmax, _mm_movehdup_ps(vmax));
    return _mm_cvtss_f32(vmax);
}

/* out[i] = sum_t p[t] v[t, i], 32 columns at a time held in registers. */
INL void wsum_any(float *out, const float *p, const void *v, const int f16, int64_t ldv,
                  int64_t n_t, int64_t n) {
    for (int64_t i0 = 0; i0 < n; i0 += 32) {
        __m256i m0 = tail_mask(n - i0), m1 = tail_mask(n - i0 - 8);
        __m256i m2 = tail_mask(n - i0 - 16), m3 = tail_mask(n - i0 - 24);
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        if (n - i0 >= 32) {
            for (int64_t t = 0; t < n_t; t++) {
                const int64_t vt = t * ldv + i0;
                __m256 pt = _mm256_set1_ps(p[t]);
                a0 = _mm256_fmadd_ps(pt, load_kv(v, f16, vt), a0);
                a1 = _mm256_fmadd_ps(pt, load_kv(v, f16, vt + 8), a1);
                a2 = _mm256_fmadd_ps(pt, load_kv(v, f16, vt + 16), a2);
                a3 = _mm256_fmadd_ps(pt, load_kv(v, f16, vt + 24), a3);
            }
        } else {
            for (int64_t t = 0; t < n_t; t++) {
                const int64_t vt = t * ldv + i0;
                __m256 pt = _mm256_set1_ps(p[t]);
                a0 = _mm256_fmadd_ps(pt, load_kv_part(v, f16, vt, n - i0), a0);
                a1 = _mm256_fmadd_ps(pt, load_kv_part(v, f16, vt + 8, n - i0 - 8), a1);
                a2 = _mm256_fmadd_ps(pt, load_kv_part(v, f16, vt + 16, n - i0 - 16), a2);
                a3 = _mm256_fmadd_ps(pt, load_kv_part(v, f16, vt + 24, n - i0 - 24), a3);
            }
        }
        _mm256_maskstore_ps(out + i0, m0, a0);
        _mm256_maskstore_ps(out + i0 + 8, m1, a1);
        _mm256_maskstore_ps(out + i0 + 16, m2, a2);
        _mm256_maskstore_ps(out + i0 + 24, m3, a3);
    }
}

T256 static float avx2_scores(float *score, const float *q, const float *k, int64_t n_t,
                              int64_t n, float scale) {
    return scores_any(score, q, k, 0, n_t, n, scale);
}

T256 static float avx2_scores_f16(float *score, const float *q, const uint16_t *k,
                                  int64_t n_t, int64_t n, float scale) {
    return scores_any(score, q, k, 1, n_t, n, scale);
}

T256 static void avx2_wsum(float *out, const float *p, const float *v, int64_t ldv,
                           int64_t n_t, int64_t n) {
    wsum_any(out, p, v, 0, ldv, n_t, n);
}

T256 static void avx2_wsum_f16(float *out, const float *p, const uint16_t *v, int64_t ldv,
                               int64_t n_t, int64_t n) {
    wsum_any(out, p, v, 1, ldv, n_t, n);
}

/* Rounded to nearest even by F16C, 8 at a time; the tail one by one. */
T256 static void avx2_to_f16(uint16_t *dst, const float *src, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + i),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    for (; i < n; i++)
        dst[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

/* exp(x): x = n ln2 + r, exp(r) by Cephes' expf polynomial, 2^n built in
 * the exponent bits.  Below -87.3 (where 2^n leaves the normal range) the
 * result is 0; above 88.7 it is inf (n = 128 makes the exponent all ones). */
INL __m256 exp256(__m256 x) {
    __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_LT_OQ);
    __m256 huge = _mm256_cmp_ps(x, _mm256_set1_ps(88.7f), _CMP_GT_OQ);
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
    x = _mm256_min_ps(x, _mm256_set1_ps(88.7f));
    __m256 nf = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(nf, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(nf, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(nf),
                                                   _mm256_set1_epi32(127)), 23);
    p = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    p = _mm256_blendv_ps(p, _mm256_set1_ps(INFINITY), huge);
    return _mm256_andnot_ps(tiny, p);
}

T256 static float avx2_softmax_exp(float *score, int64_t n_t, float mx) {
    __m256 sum = _mm256_setzero_ps();
    __m256 vmx = _mm256_set1_ps(mx);
    int64_t t = 0;
    for (; t + 8 <= n_t; t += 8) {
        __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(score + t), vmx));
        _mm256_storeu_ps(score + t, e);
        sum = _mm256_add_ps(sum, e);
    }
    if (t < n_t) {
        __m256i m = tail_mask(n_t - t);
        __m256 e = exp256(_mm256_sub_ps(_mm256_maskload_ps(score + t, m), vmx));
        e = _mm256_and_ps(e, _mm256_castsi256_ps(m));
        _mm256_maskstore_ps(score + t, m, e);
        sum = _mm256_add_ps(sum, e);
    }
    return hsum8(sum);
}

/* ---------------------------------------------------------- activations */

INL __m256 swiglu8(__m256 z, __m256 u) {
    __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), z));
    return _mm256_mul_ps(_mm256_div_ps(z, _mm256_add_ps(_mm256_set1_ps(1.0f), e)), u);
}

T256 static void avx2_swiglu(float *gate, const float *up, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(gate + i, swiglu8(_mm256_loadu_ps(gate + i), _mm256_loadu_ps(up + i)));
    if (i < n) {
        __m256i m = tail_mask(n - i);
        __m256 y = swiglu8(_mm256_maskload_ps(gate + i, m), _mm256_maskload_ps(up + i, m));
        _mm256_maskstore_ps(gate + i, m, y);
    }
}

/* tanh(u) = 1 - 2 / (1 + exp(2u)), which saturates to +-1 correctly. */
INL __m256 gelu8(__m256 v) {
    const __m256 one = _mm256_set1_ps(1.0f), two = _mm256_set1_ps(2.0f);
    __m256 u = _mm256_mul_ps(_mm256_set1_ps(0.7978845608028654f),
                             _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), v),
                                             _mm256_mul_ps(v, v), v));
    __m256 e = exp256(_mm256_mul_ps(two, u));
    __m256 th = _mm256_sub_ps(one, _mm256_div_ps(two, _mm256_add_ps(one, e)));
    return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), v), _mm256_add_ps(one, th));
}

T256 static void avx2_gelu(float *x, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, gelu8(_mm256_loadu_ps(x + i)));
    if (i < n) {
        __m256i m = tail_mask(n - i);
        _mm256_maskstore_ps(x + i, m, gelu8(_mm256_maskload_ps(x + i, m)));
    }
}

const fa_kernels fa_kernels_avx2 = {
    avx2_dot_f32, avx2_dot_f16, avx2_dot_bf16,
    avx2_dot_q8_0, avx2_dot_q4_0, avx2_dot_q4_1,
    AVX2_ROWS, avx2_scores, avx2_wsum, avx2_softmax_exp,
    avx2_swiglu, avx2_gelu,
    NULL, NULL,
    avx2_scores_f16, avx2_wsum_f16, NULL, NULL, avx2_to_f16,
};

#else  /* not x86-64 with GCC-style intrinsics: never selected by dispatch.c */

const fa_kernels fa_kernels_avx2 = {0};

#endif
