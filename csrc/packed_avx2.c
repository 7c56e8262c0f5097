/*
 * AVX2 + FMA kernels over panel-packed weights (layout and arithmetic:
 * packed.h).  A 16-row panel is two 256-bit halves, rows 0-7 and 8-15; each
 * output row is still one lane running the chain the generic C code runs, so
 * this level agrees with the others bit for bit.
 *
 * Sixteen vector registers hold fewer accumulators than AVX-512's 32:
 *   decode   NP = 2, NT = 1
 *   prefill  NP = 1, NT = 2
 * A 4-bit column costs a mask and a convert per half (vpermps here has only
 * 8 table entries, too few for a nibble).
 */
#include "packed.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#define T256 __attribute__((target("avx2,fma,f16c")))
#define INL static inline __attribute__((always_inline)) T256

INL void store_rows8(float *y, __m256 v, int64_t rows) {
    if (rows >= 8) {
        _mm256_storeu_ps(y, v);
    } else if (rows > 0) {
        float tmp[8];
        _mm256_storeu_ps(tmp, v);
        memcpy(y, tmp, sizeof(float) * (size_t)rows);
    }
}

/* Half h (rows 8h .. 8h+7) of column k of a float-type panel. */
INL __m256 load_half(int type, const uint8_t *w, int64_t k, int h) {
    if (type == FA_F32) return _mm256_loadu_ps((const float *)w + 16 * k + 8 * h);
    __m128i v = _mm_loadu_si128((const __m128i *)(w + 32 * k + 16 * h));
    if (type == FA_F16) return _mm256_cvtph_ps(v);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

INL void float_tile(const int type, const uint8_t *w, size_t pb, const int NP,
                    const float *x, int64_t ldx, const int NT, int64_t n_in, float *y,
                    int64_t ldy, int64_t rows) {
    __m256 acc[2][2][2];
    for (int p = 0; p < NP; p++)
        for (int h = 0; h < 2; h++)
            for (int t = 0; t < NT; t++) acc[p][h][t] = _mm256_setzero_ps();
    for (int64_t k = 0; k < n_in; k++) {
        for (int p = 0; p < NP; p++) {
            __m256 w0 = load_half(type, w + p * pb, k, 0);
            __m256 w1 = load_half(type, w + p * pb, k, 1);
            for (int t = 0; t < NT; t++) {
                __m256 xv = _mm256_broadcast_ss(x + t * ldx + k);
                acc[p][0][t] = _mm256_fmadd_ps(w0, xv, acc[p][0][t]);
                acc[p][1][t] = _mm256_fmadd_ps(w1, xv, acc[p][1][t]);
            }
        }
    }
    for (int p = 0; p < NP; p++)
        for (int h = 0; h < 2; h++)
            for (int t = 0; t < NT; t++)
                store_rows8(y + t * ldy + 16 * p + 8 * h, acc[p][h][t], rows - 16 * p - 8 * h);
}

INL void block_tile(const int type, const uint8_t *w, size_t pb, const int NP,
                    const float *x, int64_t ldx, const float *sx, int64_t ldsx,
                    const int NT, int64_t n_in, float *y, int64_t ldy, int64_t rows) {
    const size_t bb = type == FA_Q8_0 ? 544 : type == FA_Q4_0 ? 288 : 320;
    const size_t qoff = type == FA_Q4_1 ? 64 : 32;
    const __m256i low4 = _mm256_set1_epi32(0x0f);
    const __m256i eight = _mm256_set1_epi32(type == FA_Q4_0 ? 8 : 0);
    __m256 acc[2][2][2];
    for (int p = 0; p < NP; p++)
        for (int h = 0; h < 2; h++)
            for (int t = 0; t < NT; t++) acc[p][h][t] = _mm256_setzero_ps();

    for (int64_t b = 0; b < n_in / FA_QK; b++) {
        const uint8_t *blk = w + (size_t)b * bb;
        const float *xb = x + b * FA_QK;
        __m256 a[2][2][2];
        for (int p = 0; p < NP; p++) {
            const uint8_t *bp = blk + p * pb;
            for (int h = 0; h < 2; h++) {
                if (type == FA_Q8_0) {
                    for (int g = 0; g < 8; g++) {
                        __m256i v = _mm256_loadu_si256(
                            (const __m256i *)(bp + 32 + 64 * g + 32 * h));
                        for (int j = 0; j < 4; j++) {
                            __m256i u = j == 3 ? v : _mm256_slli_epi32(v, 24 - 8 * j);
                            __m256 q = _mm256_cvtepi32_ps(_mm256_srai_epi32(u, 24));
                            for (int t = 0; t < NT; t++) {
                                __m256 xv = _mm256_broadcast_ss(xb + t * ldx + 4 * g + j);
                                a[p][h][t] = g == 0 && j == 0
                                                 ? _mm256_mul_ps(q, xv)
                                                 : _mm256_fmadd_ps(q, xv, a[p][h][t]);
                            }
                        }
                    }
                } else {
                    for (int g = 0; g < 4; g++) {
                        __m256i nib = _mm256_loadu_si256(
                            (const __m256i *)(bp + qoff + 64 * g + 32 * h));
                        for (int j = 0; j < 8; j++) {
                            __m256 q = _mm256_cvtepi32_ps(
                                _mm256_sub_epi32(_mm256_and_si256(nib, low4), eight));
                            nib = _mm256_srli_epi32(nib, 4);
                            for (int t = 0; t < NT; t++) {
                                __m256 xv = _mm256_broadcast_ss(xb + t * ldx + 8 * g + j);
                                a[p][h][t] = g == 0 && j == 0
                                                 ? _mm256_mul_ps(q, xv)
                                                 : _mm256_fmadd_ps(q, xv, a[p][h][t]);
                            }
                        }
                    }
                }
                __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(bp + 16 * h)));
                for (int t = 0; t < NT; t++)
                    acc[p][h][t] = _mm256_fmadd_ps(d, a[p][h][t], acc[p][h][t]);
                if (type == FA_Q4_1) {
                    __m256 m = _mm256_cvtph_ps(
                        _mm_loadu_si128((const __m128i *)(bp + 32 + 16 * h)));
                    for (int t = 0; t < NT; t++)
                        acc[p][h][t] = _mm256_fmadd_ps(m, _mm256_broadcast_ss(sx + t * ldsx + b),
                                                       acc[p][h][t]);
                }
            }
        }
    }
    for (int p = 0; p < NP; p++)
        for (int h = 0; h < 2; h++)
            for (int t = 0; t < NT; t++)
                store_rows8(y + t * ldy + 16 * p + 8 * h, acc[p][h][t], rows - 16 * p - 8 * h);
}

#define SHAPES(CALL)                                                                   \
    switch (np * 8 + nt) {                                                             \
    case 1 * 8 + 1: CALL(1, 1); break;                                                 \
    case 2 * 8 + 1: CALL(2, 1); break;                                                 \
    case 1 * 8 + 2: CALL(1, 2); break;                                                 \
    default: break;                                                                    \
    }
#define FLOAT_CALL(NP, NT) float_tile(TYPE_, w, pb, NP, x, ldx, NT, n_in, y, ldy, rows)
#define BLOCK_CALL(NP, NT)                                                             \
    block_tile(TYPE_, w, pb, NP, x, ldx, sx, ldsx, NT, n_in, y, ldy, rows)
#define RUN(name, CALL)                                                                \
    static T256 void name(int type, const uint8_t *w, size_t pb, int np,               \
                          const float *x, int64_t ldx, const float *sx, int64_t ldsx,  \
                          int nt, int64_t n_in, float *y, int64_t ldy, int64_t rows) { \
        (void)type;                                                                    \
        (void)sx;                                                                      \
        (void)ldsx;                                                                    \
        _Pragma("GCC diagnostic push")                                                 \
        _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")                    \
        SHAPES(CALL)                                                                   \
        _Pragma("GCC diagnostic pop")                                                  \
    }

#define TYPE_ FA_F32
RUN(run_f32, FLOAT_CALL)
#undef TYPE_
#define TYPE_ FA_F16
RUN(run_f16, FLOAT_CALL)
#undef TYPE_
#define TYPE_ FA_BF16
RUN(run_bf16, FLOAT_CALL)
#undef TYPE_
#define TYPE_ FA_Q8_0
RUN(run_q8_0, BLOCK_CALL)
#undef TYPE_
#define TYPE_ FA_Q4_0
RUN(run_q4_0, BLOCK_CALL)
#undef TYPE_
#define TYPE_ FA_Q4_1
RUN(run_q4_1, BLOCK_CALL)
#undef TYPE_

static void avx2_run(int type, const uint8_t *w, size_t pb, int np, const float *x,
                     int64_t ldx, const float *sx, int64_t ldsx, int nt, int64_t n_in,
                     float *y, int64_t ldy, int64_t rows) {
    fa_panel_fn f = type == FA_F32    ? run_f32
                    : type == FA_F16  ? run_f16
                    : type == FA_BF16 ? run_bf16
                    : type == FA_Q8_0 ? run_q8_0
                    : type == FA_Q4_0 ? run_q4_0
                    : type == FA_Q4_1 ? run_q4_1
                                      : NULL;
    if (f) f(type, w, pb, np, x, ldx, sx, ldsx, nt, n_in, y, ldy, rows);
}

/* Known shortcoming: at this width the block types run slower packed than in
 * the file layout (measured on Zen 4 forced to AVX2: a Q4_1 decode GEMV at
 * 8 against 13 GMAC/s, a 64-token product at 16 against 22), so only the
 * float types are packed for it.  A prefill path that decodes a panel tile to
 * floats once and reuses it for every token would change that. */
const fa_panel_kernels fa_panel_kernels_avx2 = {
    avx2_run, NULL, 2, 1, 2, 1u << FA_F32 | 1u << FA_F16 | 1u << FA_BF16,
};

#else

const fa_panel_kernels fa_panel_kernels_avx2 = {0, 0, 1, 1, 1, 0};

#endif
