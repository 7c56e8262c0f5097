/*
 * The opt-in "q8 activations" matmul: x is rounded to 8-bit blocks once per
 * call and every product with a Q4_0, Q4_1 or Q8_0 weight becomes an integer
 * dot product.  This changes the numbers (by the rounding of x to 8 bits), so
 * it is never the default: fa_matmul_act with FA_ACT_Q8 asks for it.
 *
 * Quantized activation row of n values, nb = n / 32 blocks:
 *   d[b]   = max_j |x[32 b + j]| / 127            float32
 *   q[i]   = rint(x[i] * (1 / d[b]))              int8 in [-127, 127]; 0 if d = 0
 *   s[b]   = d[b] * sum_j q[32 b + j]             float32 (Q4_1's min term)
 *
 * Dot of a weight row (integer values wq, scale dw, for Q4_1 a min mw) with it,
 * the same operations at every SIMD level, so all levels agree bit for bit:
 *   p[b][k]  = sum_{j = 4k .. 4k+3} wq[32 b + j] q[32 b + j]   k < 8, exact int32
 *   acc[b % 4][k] += (dw d[b]) * (float)p[b][k]                 a multiply, then an add
 *   m[b % 4]      += mw s[b]                                    Q4_1 only
 *   a[k] = (acc[0][k] + acc[1][k]) + (acc[2][k] + acc[3][k])
 *   y = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)) + ((m0 + m1) + (m2 + m3))
 * Four chains rather than one: a row is too long for the CPU to overlap one
 * row's additions with the next row's, so a single chain's latency bounds it.
 * The file is compiled with floating-point contraction off so no multiply and
 * add pair is fused into an FMA at one level and not at another.
 *
 * Threads: every thread quantizes the whole of x for itself (x is at most a
 * few thousand floats per token) instead of sharing one copy, which would need
 * a barrier between quantizing and multiplying.  Quantizing is a pure
 * function of the row, so each y element depends neither on the thread count
 * nor on n_seq: prefill and decode give bit-identical products.
 *
 * Known shortcomings: the kernels take one x row at a time (a prefill reads
 * each weight tile from L2 once per token instead of once per four tokens);
 * the AVX-512 level takes two blocks per 512-bit VNNI step for Q4_1 and
 * Q8_0 but one block at a time for Q4_0; the AVX2 level quantizes x with the
 * generic C code; the Q4_1 min term is a scalar multiply-add per block.
 */
#pragma GCC optimize("fp-contract=off")

#include <math.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "fa_internal.h"

/* One quantized activation row. */
typedef struct {
    int8_t *q;  /* [n] */
    float *d;   /* [n / 32] */
    float *s;   /* [n / 32] */
} q8_row;

typedef void (*q8_dot_fn)(const uint8_t *w, const q8_row *x, int64_t nb, float *y);
typedef void (*q8_quant_fn)(const float *x, int64_t nb, q8_row *out);

/* Sum the four accumulator sets in the documented order. */
static inline float q8_finish(const float *a0, const float *a1, const float *a2,
                              const float *a3, const float *m) {
    float a[8];
    for (int k = 0; k < 8; k++) a[k] = (a0[k] + a1[k]) + (a2[k] + a3[k]);
    return (((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7])))
           + ((m[0] + m[1]) + (m[2] + m[3]));
}

/* ------------------------------------------------------------- generic */

static void generic_quantize(const float *x, int64_t nb, q8_row *out) {
    for (int64_t b = 0; b < nb; b++) {
        const float *xb = x + b * FA_QK;
        float amax = 0.0f;
        for (int j = 0; j < FA_QK; j++) {
            float a = fabsf(xb[j]);
            if (a > amax) amax = a;
        }
        float d = amax / 127.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        int sum = 0;
        for (int j = 0; j < FA_QK; j++) {
            int v = (int)nearbyintf(xb[j] * id);
            out->q[b * FA_QK + j] = (int8_t)v;
            sum += v;
        }
        out->d[b] = d;
        out->s[b] = d * (float)sum;
    }
}

/* The integer values of block b of a weight row, its scale and its min. */
static inline void generic_wblock(int type, const uint8_t *w, int64_t b, int8_t *v,
                                  float *dw, float *mw) {
    *mw = 0.0f;
    if (type == FA_Q8_0) {
        const uint8_t *p = w + b * FA_Q8_0_BYTES;
        *dw = fa_f16_table[fa_read_u16(p)];
        memcpy(v, p + 2, FA_QK);
        return;
    }
    const int q4_1 = type == FA_Q4_1;
    const uint8_t *p = w + b * (q4_1 ? FA_Q4_1_BYTES : FA_Q4_0_BYTES);
    *dw = fa_f16_table[fa_read_u16(p)];
    if (q4_1) *mw = fa_f16_table[fa_read_u16(p + 2)];
    const uint8_t *qs = p + (q4_1 ? 4 : 2);
    const int off = q4_1 ? 0 : 8;
    for (int j = 0; j < 16; j++) {
        v[j] = (int8_t)((qs[j] & 0x0f) - off);
        v[j + 16] = (int8_t)((qs[j] >> 4) - off);
    }
}

static inline void generic_dot(int type, const uint8_t *w, const q8_row *x, int64_t nb,
                               float *y) {
    float acc[4][8] = {{0}};
    float m[4] = {0};
    int8_t v[FA_QK];
    for (int64_t b = 0; b < nb; b++) {
        float dw, mw;
        generic_wblock(type, w, b, v, &dw, &mw);
        const int8_t *q = x->q + b * FA_QK;
        float dd = dw * x->d[b];
        for (int k = 0; k < 8; k++) {
            int p = 0;
            for (int j = 4 * k; j < 4 * k + 4; j++) p += (int)v[j] * (int)q[j];
            float t = dd * (float)p;
            acc[b & 3][k] = acc[b & 3][k] + t;
        }
        if (type == FA_Q4_1) {
            float t = mw * x->s[b];
            m[b & 3] = m[b & 3] + t;
        }
    }
    *y = q8_finish(acc[0], acc[1], acc[2], acc[3], m);
}

static void generic_dot_q8_0(const uint8_t *w, const q8_row *x, int64_t nb, float *y) {
    generic_dot(FA_Q8_0, w, x, nb, y);
}
static void generic_dot_q4_0(const uint8_t *w, const q8_row *x, int64_t nb, float *y) {
    generic_dot(FA_Q4_0, w, x, nb, y);
}
static void generic_dot_q4_1(const uint8_t *w, const q8_row *x, int64_t nb, float *y) {
    generic_dot(FA_Q4_1, w, x, nb, y);
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

/* ------------------------------------------------------- AVX2 and VNNI */

#define TAVX2 __attribute__((target("avx2,fma,f16c")))
#define TVNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))
#define INLV static inline __attribute__((always_inline)) TVNNI

/* The 32 weight values of block b: unsigned (0..15) for Q4_1, signed otherwise.
 * The body is shared by both targets through this macro. */
#define LOAD_WBLOCK(type, w, b, wv, dw, mw)                                             \
    do {                                                                               \
        if (type == FA_Q8_0) {                                                         \
            const uint8_t *p_ = w + (b) * FA_Q8_0_BYTES;                               \
            dw = fa_f16_table[fa_read_u16(p_)];                                        \
            wv = _mm256_loadu_si256((const __m256i *)(p_ + 2));                        \
        } else {                                                                       \
            const int q41_ = type == FA_Q4_1;                                          \
            const uint8_t *p_ = w + (b) * (q41_ ? FA_Q4_1_BYTES : FA_Q4_0_BYTES);      \
            dw = fa_f16_table[fa_read_u16(p_)];                                        \
            if (q41_) mw = fa_f16_table[fa_read_u16(p_ + 2)];                          \
            __m128i qs_ = _mm_loadu_si128((const __m128i *)(p_ + (q41_ ? 4 : 2)));    \
            const __m128i lo4_ = _mm_set1_epi8(0x0f);                                  \
            __m128i lo_ = _mm_and_si128(qs_, lo4_);                                    \
            __m128i hi_ = _mm_and_si128(_mm_srli_epi16(qs_, 4), lo4_);                 \
            wv = _mm256_inserti128_si256(_mm256_castsi128_si256(lo_), hi_, 1);         \
            if (!q41_) wv = _mm256_sub_epi8(wv, _mm256_set1_epi8(8));                  \
        }                                                                              \
    } while (0)

/* One block into accumulator A and min sum M; PDOT(wv, xv) gives the 8 int32
 * group sums.  The kernel body takes four blocks per iteration so every
 * accumulator is named by a constant (an indexed array of them would live in
 * memory). */
#define Q8_STEP(type, PDOT, bb, A, M)                                                  \
    do {                                                                               \
        float dw_, mw_ = 0.0f;                                                         \
        __m256i wv_;                                                                   \
        LOAD_WBLOCK(type, w, bb, wv_, dw_, mw_);                                       \
        __m256i xv_ = _mm256_loadu_si256((const __m256i *)(x->q + (bb) * FA_QK));      \
        __m256 pf_ = _mm256_cvtepi32_ps(PDOT(wv_, xv_));                               \
        A = _mm256_add_ps(A, _mm256_mul_ps(_mm256_set1_ps(dw_ * x->d[bb]), pf_));      \
        if (type == FA_Q4_1) {                                                         \
            float tm_ = mw_ * x->s[bb];                                                \
            M = M + tm_;                                                               \
        }                                                                              \
    } while (0)

#define Q8_DOT_BODY(type, PDOT)                                                        \
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                        \
    float m[4] = {0.0f, 0.0f, 0.0f, 0.0f};                                             \
    float m0 = 0.0f, m1 = 0.0f, m2 = 0.0f, m3 = 0.0f;                                  \
    int64_t b = 0;                                                                     \
    for (; b + 4 <= nb; b += 4) {                                                      \
        Q8_STEP(type, PDOT, b, a0, m0);                                                \
        Q8_STEP(type, PDOT, b + 1, a1, m1);                                            \
        Q8_STEP(type, PDOT, b + 2, a2, m2);                                            \
        Q8_STEP(type, PDOT, b + 3, a3, m3);                                            \
    }                                                                                  \
    if (b < nb) Q8_STEP(type, PDOT, b, a0, m0);                                        \
    if (b + 1 < nb) Q8_STEP(type, PDOT, b + 1, a1, m1);                                \
    if (b + 2 < nb) Q8_STEP(type, PDOT, b + 2, a2, m2);                                \
    float a[4][8];                                                                     \
    _mm256_storeu_ps(a[0], a0);                                                        \
    _mm256_storeu_ps(a[1], a1);                                                        \
    _mm256_storeu_ps(a[2], a2);                                                        \
    _mm256_storeu_ps(a[3], a3);                                                        \
    m[0] = m0; m[1] = m1; m[2] = m2; m[3] = m3;                                        \
    *y = q8_finish(a[0], a[1], a[2], a[3], m);

/* AVX2: maddubs takes unsigned x signed bytes; for signed weights the sign
 * moves onto x (|w| <= 128, |q| <= 127, so pairs stay within int16). */
#define PDOT_AVX2_U(wv, xv) _mm256_madd_epi16(_mm256_maddubs_epi16(wv, xv), _mm256_set1_epi16(1))
#define PDOT_AVX2_S(wv, xv)                                                            \
    _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(wv), _mm256_sign_epi8(xv, wv)), \
                      _mm256_set1_epi16(1))
#define PDOT_VNNI_U(wv, xv) _mm256_dpbusd_epi32(_mm256_setzero_si256(), wv, xv)
#define PDOT_VNNI_S(wv, xv)                                                            \
    _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_abs_epi8(wv), _mm256_sign_epi8(xv, wv))

TAVX2 static void avx2_dot_q8_0(const uint8_t *w, const q8_row *x, int64_t nb, float *y) {
    Q8_DOT_BODY(FA_Q8_0, PDOT_AVX2_S)
}
TAVX2 static void avx2_dot_q4_0(const uint8_t *w, const q8_row *x, int64_t nb, float *y) {
    Q8_DOT_BODY(FA_Q4_0, PDOT_AVX2_S)
}
TAVX2 static void avx2_dot_q4_1(const uint8_t *w, const q8_row *x, int64_t nb, float *y) {
    Q8_DOT_BODY(FA_Q4_1, PDOT_AVX2_U)
}
/* Two blocks per 512-bit step: lanes 0-7 hold block b (even) and lanes 8-15
 * block b + 1, so one accumulator's halves are acc[0] and acc[1] of the
 * documented order, and every number is the one the per-block code gives. */
INLV __m512 vnni_pair_scale(float d0, float d1) {
    return _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_set1_ps(d0)),
                              _mm256_set1_ps(d1), 1);
}

/* acc[0] holds the pairs starting at b % 4 = 0 (blocks 0 and 1 mod 4),
 * acc[1] those at b % 4 = 2; tail, if any, is the last block, even, which
 * belongs to the low half of acc[tb / 2] for tb = its index mod 4. */
INLV void vnni_pair_finish(const __m512 *acc, __m256 tail, int64_t tb, const float *m,
                           float *y) {
    float a[4][8];
    __m256 lo0 = _mm512_castps512_ps256(acc[0]), lo2 = _mm512_castps512_ps256(acc[1]);
    if (tb == 0) lo0 = _mm256_add_ps(lo0, tail);
    if (tb == 2) lo2 = _mm256_add_ps(lo2, tail);
    _mm256_storeu_ps(a[0], lo0);
    _mm256_storeu_ps(a[1], _mm512_extractf32x8_ps(acc[0], 1));
    _mm256_storeu_ps(a[2], lo2);
    _mm256_storeu_ps(a[3], _mm512_extractf32x8_ps(acc[1], 1));
    *y = q8_finish(a[0], a[1], a[2], a[3], m);
}

/* Blocks b and b + 1 of a Q8_0 row against x: their 16 scaled group sums. */
INLV __m512 vnni_pair_q8_0(const uint8_t *w, const q8_row *x, int64_t b) {
    const uint8_t *p0 = w + b * FA_Q8_0_BYTES, *p1 = p0 + FA_Q8_0_BYTES;
    __m512i wv = _mm512_inserti64x4(
        _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(p0 + 2))),
        _mm256_loadu_si256((const __m256i *)(p1 + 2)), 1);
    __m512i xv = _mm512_loadu_si512((const void *)(x->q + b * FA_QK));
    /* |w| as unsigned, the sign of w moved onto x (|q| <= 127) */
    __mmask64 neg = _mm512_movepi8_mask(wv);
    xv = _mm512_mask_sub_epi8(xv, neg, _mm512_setzero_si512(), xv);
    __m512i pi = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_abs_epi8(wv), xv);
    float d0 = fa_f16_table[fa_read_u16(p0)] * x->d[b];
    float d1 = fa_f16_table[fa_read_u16(p1)] * x->d[b + 1];
    return _mm512_mul_ps(vnni_pair_scale(d0, d1), _mm512_cvtepi32_ps(pi));
}

/* The same for Q4_1, with the blocks' min terms in *u0, *u1. */
INLV __m512 vnni_pair_q4_1(const uint8_t *w, const q8_row *x, int64_t b, float *u0,
                           float *u1) {
    /* [qs0, qs0, qs1, qs1] >> [0, 4, 0, 4] per 128 bits, & 15:
     * [lo0, hi0, lo1, hi1] = values 0..31 of block b, then of block b + 1 */
    const __m512i shifts = _mm512_setr_epi64(0, 0, 4, 4, 0, 0, 4, 4);
    const uint8_t *p0 = w + b * FA_Q4_1_BYTES, *p1 = p0 + FA_Q4_1_BYTES;
    __m512i qs = _mm512_inserti64x4(
        _mm512_castsi256_si512(_mm256_broadcastsi128_si256(
            _mm_loadu_si128((const __m128i *)(p0 + 4)))),
        _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(p1 + 4))), 1);
    __m512i wv = _mm512_and_si512(_mm512_srlv_epi64(qs, shifts), _mm512_set1_epi8(0x0f));
    __m512i xv = _mm512_loadu_si512((const void *)(x->q + b * FA_QK));
    __m512i pi = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, xv);
    float d0 = fa_f16_table[fa_read_u16(p0)] * x->d[b];
    float d1 = fa_f16_table[fa_read_u16(p1)] * x->d[b + 1];
    *u0 = fa_f16_table[fa_read_u16(p0 + 2)] * x->s[b];
    *u1 = fa_f16_table[fa_read_u16(p1 + 2)] * x->s[b + 1];
    return _mm512_mul_ps(vnni_pair_scale(d0, d1), _mm512_cvtepi32_ps(pi));
}

/* Four blocks per iteration so every accumulator index is a constant (an
 * indexed array of accumulators would live in memory). */
TVNNI static void vnni_dot_q8_0(const uint8_t *w, const q8_row *x, int64_t nb, float *y) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int64_t b = 0;
    for (; b + 4 <= nb; b += 4) {
        acc0 = _mm512_add_ps(acc0, vnni_pair_q8_0(w, x, b));
        acc1 = _mm512_add_ps(acc1, vnni_pair_q8_0(w, x, b + 2));
    }
    if (b + 2 <= nb) {
        acc0 = _mm512_add_ps(acc0, vnni_pair_q8_0(w, x, b));
        b += 2;
    }
    __m256 tail = _mm256_setzero_ps();
    if (b < nb) {
        const uint8_t *p0 = w + b * FA_Q8_0_BYTES;
        __m256i wv = _mm256_loadu_si256((const __m256i *)(p0 + 2));
        __m256i xv = _mm256_loadu_si256((const __m256i *)(x->q + b * FA_QK));
        __m256 pf = _mm256_cvtepi32_ps(PDOT_VNNI_S(wv, xv));
        tail = _mm256_mul_ps(_mm256_set1_ps(fa_f16_table[fa_read_u16(p0)] * x->d[b]), pf);
    }
    const __m512 acc[2] = {acc0, acc1};
    const float m[4] = {0};
    vnni_pair_finish(acc, tail, b < nb ? (b & 3) : -1, m, y);
}
TVNNI static void vnni_dot_q4_0(const uint8_t *w, const q8_row *x, int64_t nb, float *y) {
    Q8_DOT_BODY(FA_Q4_0, PDOT_VNNI_S)
}
TVNNI static void vnni_dot_q4_1(const uint8_t *w, const q8_row *x, int64_t nb, float *y) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    float m0 = 0.0f, m1 = 0.0f, m2 = 0.0f, m3 = 0.0f, u0, u1, u2, u3;
    int64_t b = 0;
    for (; b + 4 <= nb; b += 4) {
        acc0 = _mm512_add_ps(acc0, vnni_pair_q4_1(w, x, b, &u0, &u1));
        acc1 = _mm512_add_ps(acc1, vnni_pair_q4_1(w, x, b + 2, &u2, &u3));
        m0 = m0 + u0;
        m1 = m1 + u1;
        m2 = m2 + u2;
        m3 = m3 + u3;
    }
    if (b + 2 <= nb) {
        acc0 = _mm512_add_ps(acc0, vnni_pair_q4_1(w, x, b, &u0, &u1));
        m0 = m0 + u0;
        m1 = m1 + u1;
        b += 2;
    }
    __m256 tail = _mm256_setzero_ps();
    if (b < nb) {
        float dw, mw = 0.0f;
        __m256i wv;
        LOAD_WBLOCK(FA_Q4_1, w, b, wv, dw, mw);
        __m256i xv = _mm256_loadu_si256((const __m256i *)(x->q + b * FA_QK));
        __m256 pf = _mm256_cvtepi32_ps(PDOT_VNNI_U(wv, xv));
        tail = _mm256_mul_ps(_mm256_set1_ps(dw * x->d[b]), pf);
        float tm = mw * x->s[b];
        if ((b & 3) == 0) m0 = m0 + tm;
        else m2 = m2 + tm;
    }
    const __m512 acc[2] = {acc0, acc1};
    const float m[4] = {m0, m1, m2, m3};
    vnni_pair_finish(acc, tail, b < nb ? (b & 3) : -1, m, y);
}

/* The generic quantizer's numbers, 16 values at a time: the max is exact in
 * any order, d and 1/d are the same scalar divisions, and cvtps rounds to
 * nearest even as nearbyintf does. */
TVNNI static void avx512_quantize(const float *x, int64_t nb, q8_row *out) {
    for (int64_t b = 0; b < nb; b++) {
        __m512 x0 = _mm512_loadu_ps(x + b * FA_QK);
        __m512 x1 = _mm512_loadu_ps(x + b * FA_QK + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
        float d = amax / 127.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        __m512 vid = _mm512_set1_ps(id);
        __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, vid));
        __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, vid));
        _mm_storeu_si128((__m128i *)(out->q + b * FA_QK), _mm512_cvtepi32_epi8(q0));
        _mm_storeu_si128((__m128i *)(out->q + b * FA_QK + 16), _mm512_cvtepi32_epi8(q1));
        int sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
        out->d[b] = d;
        out->s[b] = d * (float)sum;
    }
}
#define HAVE_X86_Q8 1
#endif

/* ------------------------------------------------------------ dispatch */

typedef struct {
    q8_dot_fn q8_0, q4_0, q4_1;
    q8_quant_fn quantize;
} q8_kernels;

static const q8_kernels q8_generic = {generic_dot_q8_0, generic_dot_q4_0,
                                      generic_dot_q4_1, generic_quantize};
#ifdef HAVE_X86_Q8
static const q8_kernels q8_avx2 = {avx2_dot_q8_0, avx2_dot_q4_0, avx2_dot_q4_1,
                                   generic_quantize};
static const q8_kernels q8_vnni = {vnni_dot_q8_0, vnni_dot_q4_0, vnni_dot_q4_1,
                                   avx512_quantize};
#endif

/* The table for the SIMD level in use; the AVX-512 level takes the VNNI
 * kernels only when the CPU has VNNI, otherwise the AVX2 ones. */
static const q8_kernels *q8_current(void) {
#ifdef HAVE_X86_Q8
    int level = fa_simd_level();
    if (level >= FA_SIMD_AVX512) {
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512dq"))
            return &q8_vnni;
        return &q8_avx2;
    }
    if (level >= FA_SIMD_AVX2) return &q8_avx2;
#endif
    return &q8_generic;
}

int fa_act_q8_supports(int type) {
    return type == FA_Q8_0 || type == FA_Q4_0 || type == FA_Q4_1;
}

void fa_quantize_act_q8(const float *x, int64_t n, int8_t *q, float *d, float *s) {
    if (!x || !q || !d || !s || n <= 0 || n % FA_QK) return;
    q8_row r = {q, d, s};
    q8_current()->quantize(x, n / FA_QK, &r);
}

/* Bytes one quantized row of n_in values takes in the scratch buffer. */
static size_t q8_row_bytes(int64_t n_in) {
    return (size_t)n_in + 2 * sizeof(float) * (size_t)(n_in / FA_QK);
}

void fa_matmul_q8(const fa_weight *w, const float *x, float *y, int64_t n_seq, int ith,
                  int nth) {
    if (!w || !w->data || !x || !y || n_seq <= 0 || w->n_out <= 0 || w->n_in <= 0) return;
    size_t rb = fa_row_bytes(w->type, w->n_in);
    if (!fa_act_q8_supports(w->type) || rb == 0 || rb != w->row_bytes) {
        fa_matmul(w, x, y, n_seq, ith, nth);  /* float types stay exact */
        return;
    }
    const q8_kernels *k = q8_current();
    q8_dot_fn dot = w->type == FA_Q8_0 ? k->q8_0 : w->type == FA_Q4_0 ? k->q4_0 : k->q4_1;
    const int64_t n_in = w->n_in, n_out = w->n_out, nb = n_in / FA_QK;
    int64_t r0, r1;
    fa_share(n_out, ith, nth, &r0, &r1);
    if (r0 >= r1) return;

    /* this thread's copy of x, quantized; a decode row fits on the stack */
    const size_t qrb = q8_row_bytes(n_in);
    float stack_buf[2048];
    void *buf = stack_buf;
    if ((size_t)n_seq > SIZE_MAX / qrb) buf = NULL;
    else if ((size_t)n_seq * qrb > sizeof stack_buf) buf = malloc((size_t)n_seq * qrb);
    if (!buf) {
        /* Known shortcoming: with no memory for the scratch copy this call
         * falls back to the exact float path rather than failing. */
        fa_matmul(w, x, y, n_seq, ith, nth);
        return;
    }
    /* layout: all d, then all s (4-byte aligned), then all q */
    float *dall = (float *)buf, *sall = dall + n_seq * nb;
    int8_t *qall = (int8_t *)(sall + n_seq * nb);
    for (int64_t s = 0; s < n_seq; s++) {
        q8_row r = {qall + s * n_in, dall + s * nb, sall + s * nb};
        k->quantize(x + s * n_in, nb, &r);
    }

    const uint8_t *wdata = (const uint8_t *)w->data;
    int64_t tile = (int64_t)((256 * 1024) / rb);  /* rows kept in L2 across x rows */
    if (tile < 1) tile = 1;
    for (int64_t rt = r0; rt < r1; rt += tile) {
        int64_t rt_end = rt + tile < r1 ? rt + tile : r1;
        for (int64_t s = 0; s < n_seq; s++) {
            q8_row r = {qall + s * n_in, dall + s * nb, sall + s * nb};
            float *ys = y + s * n_out;
            for (int64_t i = rt; i < rt_end; i++) dot(wdata + (size_t)i * rb, &r, nb, ys + i);
        }
    }
    if (buf != stack_buf) free(buf);
}

void fa_matmul_act(int act, const fa_weight *w, const float *x, float *y, int64_t n_seq,
                   int ith, int nth) {
    if (act == FA_ACT_Q8)
        fa_matmul_q8(w, x, y, n_seq, ith, nth);
    else
        fa_matmul(w, x, y, n_seq, ith, nth);
}

void fa_parallel_matmul_act(int act, const fa_weight *w, const float *x, float *y,
                            int64_t n_seq, int n_threads) {
    if (n_threads < 1) n_threads = 1;
#ifdef _OPENMP
#pragma omp parallel num_threads(n_threads)
    fa_matmul_act(act, w, x, y, n_seq, omp_get_thread_num(), omp_get_num_threads());
#else
    fa_matmul_act(act, w, x, y, n_seq, 0, 1);
#endif
}
