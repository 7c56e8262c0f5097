/*
 * AVX-512 kernels over panel-packed weights (layout and arithmetic: packed.h).
 * One 512-bit vector is one panel's 16 rows, so each output row is one lane
 * and its chain of fused multiply-adds is the one the generic C code runs.
 *
 * A call runs NP panels over NT tokens with NP x NT accumulators (and as many
 * block partial sums for the quantized types) held in registers:
 *   decode   NP = 4, NT = 1   four independent chains hide the FMA latency
 *   prefill  NP = 2, NT = 6   each decoded weight vector feeds 6 tokens
 * A 4-bit column costs one shift and one vpermps (which reads only the low
 * 4 bits of each index lane, so the nibble needs no mask) to become 16 floats.
 */
#include <stdlib.h>

#include "packed.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#define INL static inline __attribute__((always_inline)) T512

INL void store_rows(float *y, __m512 v, int64_t rows) {
    if (rows >= 16)
        _mm512_storeu_ps(y, v);
    else if (rows > 0)
        _mm512_mask_storeu_ps(y, (__mmask16)((1u << rows) - 1), v);
}

INL __m512 load_column(int type, const uint8_t *w, int64_t k) {
    if (type == FA_F32) return _mm512_loadu_ps((const float *)w + 16 * k);
    __m256i h = _mm256_loadu_si256((const __m256i *)(w + 32 * k));
    if (type == FA_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

INL void float_tile(const int type, const uint8_t *w, size_t pb, const int NP,
                    const float *x, int64_t ldx, const int NT, int64_t n_in, float *y,
                    int64_t ldy, int64_t rows) {
    __m512 acc[4][6];
    _Pragma("GCC unroll 8")
    for (int p = 0; p < NP; p++)
        _Pragma("GCC unroll 8")
        for (int t = 0; t < NT; t++) acc[p][t] = _mm512_setzero_ps();
    for (int64_t k = 0; k < n_in; k++) {
        __m512 wv[4];
        _Pragma("GCC unroll 8")
        for (int p = 0; p < NP; p++) wv[p] = load_column(type, w + p * pb, k);
        _Pragma("GCC unroll 8")
        for (int t = 0; t < NT; t++) {
            __m512 xv = _mm512_set1_ps(x[t * ldx + k]);
            _Pragma("GCC unroll 8")
            for (int p = 0; p < NP; p++) acc[p][t] = _mm512_fmadd_ps(wv[p], xv, acc[p][t]);
        }
    }
    _Pragma("GCC unroll 8")
    for (int p = 0; p < NP; p++)
        _Pragma("GCC unroll 8")
        for (int t = 0; t < NT; t++) store_rows(y + t * ldy + 16 * p, acc[p][t], rows - 16 * p);
}

/* One column of a block: a[p][t] = q[p] * x[t][col] for the block's first
 * column, a[p][t] += q[p] * x[t][col] (fused) for the others. */
INL void column_step(const int NP, const int NT, __m512 a[4][6], const __m512 q[4],
                     const float *x, int64_t ldx, int64_t col, const int first) {
    _Pragma("GCC unroll 8")
    for (int t = 0; t < NT; t++) {
        __m512 xv = _mm512_set1_ps(x[t * ldx + col]);
        _Pragma("GCC unroll 8")
        for (int p = 0; p < NP; p++)
            a[p][t] = first ? _mm512_mul_ps(q[p], xv) : _mm512_fmadd_ps(q[p], xv, a[p][t]);
    }
}

/* The end of block b: acc += d a, then (Q4_1) acc += m sx[b]. */
INL void block_scale(const int type, const int NP, const int NT, __m512 acc[4][6],
                     __m512 a[4][6], const __m512 d[4], const __m512 m[4],
                     const float *sx, int64_t ldsx, int64_t b) {
    _Pragma("GCC unroll 8")
    for (int p = 0; p < NP; p++) {
        _Pragma("GCC unroll 8")
        for (int t = 0; t < NT; t++) acc[p][t] = _mm512_fmadd_ps(d[p], a[p][t], acc[p][t]);
        if (type == FA_Q4_1) {
            _Pragma("GCC unroll 8")
            for (int t = 0; t < NT; t++)
                acc[p][t] = _mm512_fmadd_ps(m[p], _mm512_set1_ps(sx[t * ldsx + b]), acc[p][t]);
        }
    }
}

/* The block types.  decoded == 0: the weights are decoded in registers from
 * the packed bytes w.  decoded == 1: qt holds the same panels already
 * decoded by decode_tile below (floats, layout there) and w is not read.
 * decoded is a compile-time constant at every call, so each instance keeps
 * only its own branch (and its accumulators in registers). */
INL void block_tile(const int type, const int decoded, const uint8_t *w, size_t pb,
                    const float *qt, const int NP, const float *x, int64_t ldx,
                    const float *sx, int64_t ldsx, const int NT, int64_t n_in, float *y,
                    int64_t ldy, int64_t rows) {
    const size_t bb = type == FA_Q8_0 ? 544 : type == FA_Q4_0 ? 288 : 320;
    const size_t qoff = type == FA_Q4_1 ? 64 : 32;
    const __m512 table = type == FA_Q4_0
        ? _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7)
        : _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512 acc[4][6];
    _Pragma("GCC unroll 8")
    for (int p = 0; p < NP; p++)
        _Pragma("GCC unroll 8")
        for (int t = 0; t < NT; t++) acc[p][t] = _mm512_setzero_ps();

    for (int64_t b = 0; b < n_in / FA_QK; b++) {
        const uint8_t *blk = w + (size_t)b * bb;
        const float *xb = x + b * FA_QK;
        __m512 a[4][6], q[4], d[4], m[4];
        if (decoded) {
            const float *qb = qt + b * FA_QK * NP * 16;
            _Pragma("GCC unroll 8")
            for (int j = 0; j < FA_QK; j++) {
                _Pragma("GCC unroll 8")
                for (int p = 0; p < NP; p++) q[p] = _mm512_loadu_ps(qb + (j * NP + p) * 16);
                column_step(NP, NT, a, q, xb, ldx, j, j == 0);
            }
            const float *db = qt + (n_in / FA_QK) * FA_QK * NP * 16 + b * 2 * NP * 16;
            _Pragma("GCC unroll 8")
            for (int p = 0; p < NP; p++) {
                d[p] = _mm512_loadu_ps(db + p * 16);
                m[p] = type == FA_Q4_1 ? _mm512_loadu_ps(db + (NP + p) * 16)
                                       : _mm512_setzero_ps();
            }
            block_scale(type, NP, NT, acc, a, d, m, sx, ldsx, b);
            continue;
        }
        if (NT == 1) {
            /* A decode streams every byte once.  Ask for this block of the
             * panels the next call reads (NP on, while still in the matrix):
             * a whole group of panels ahead hides DRAM latency better than a
             * block or two (benchmarks/stream_decode.c, Q4_1, 2 threads: 20 -> 24
             * GB/s), and those panels would otherwise start cold. */
            _Pragma("GCC unroll 8")
            for (int p = 0; p < NP; p++)
                if (16 * (p + NP) < rows)
                    for (size_t off = 0; off < bb; off += 64)
                        _mm_prefetch((const char *)(blk + (p + NP) * pb + off),
                                     FA_PREFETCH_STREAM);
        }
        if (type == FA_Q8_0) {
            /* byte j of each lane to a float: a load 3 - j bytes early puts
             * it in the top byte of its lane (the bytes below belong to the
             * lane before, or to the block's scales, and are shifted out),
             * and an arithmetic shift down sign-extends it */
            _Pragma("GCC unroll 8")
            for (int g = 0; g < 8; g++) {
                _Pragma("GCC unroll 8")
                for (int j = 0; j < 4; j++) {
                    _Pragma("GCC unroll 8")
                    for (int p = 0; p < NP; p++) {
                        __m512i u = _mm512_loadu_si512(
                            (const void *)(blk + p * pb + 32 + 64 * g + j - 3));
                        q[p] = _mm512_cvtepi32_ps(_mm512_srai_epi32(u, 24));
                    }
                    column_step(NP, NT, a, q, xb, ldx, 4 * g + j, g == 0 && j == 0);
                }
            }
        } else {
            _Pragma("GCC unroll 8")
            for (int g = 0; g < 4; g++) {
                __m512i nib[4];
                _Pragma("GCC unroll 8")
                for (int p = 0; p < NP; p++)
                    nib[p] = _mm512_loadu_si512((const void *)(blk + p * pb + qoff + 64 * g));
                _Pragma("GCC unroll 8")
                for (int j = 0; j < 8; j++) {
                    _Pragma("GCC unroll 8")
                    for (int p = 0; p < NP; p++) {
                        q[p] = _mm512_permutexvar_ps(nib[p], table);
                        nib[p] = _mm512_srli_epi32(nib[p], 4);
                    }
                    column_step(NP, NT, a, q, xb, ldx, 8 * g + j, g == 0 && j == 0);
                }
            }
        }
        _Pragma("GCC unroll 8")
        for (int p = 0; p < NP; p++) {
            const uint8_t *bp = blk + p * pb;
            d[p] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)bp));
            m[p] = type == FA_Q4_1
                ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(bp + 32)))
                : _mm512_setzero_ps();
        }
        block_scale(type, NP, NT, acc, a, d, m, sx, ldsx, b);
    }
    _Pragma("GCC unroll 8")
    for (int p = 0; p < NP; p++)
        _Pragma("GCC unroll 8")
        for (int t = 0; t < NT; t++) store_rows(y + t * ldy + 16 * p, acc[p][t], rows - 16 * p);
}

/* One function per type, switching to a tile shape fixed at compile time so
 * the accumulator arrays live in registers: NP panels x NT tokens, for NT of
 * 2 to 6 (a prefill) or 1 (a decode, up to 4 panels). */
#define PREFILL_CASES(CALL, NP)                                                        \
    case NP * 8 + 2: CALL(NP, 2); break;                                               \
    case NP * 8 + 3: CALL(NP, 3); break;                                               \
    case NP * 8 + 4: CALL(NP, 4); break;                                               \
    case NP * 8 + 5: CALL(NP, 5); break;                                               \
    case NP * 8 + 6: CALL(NP, 6); break;
#define SHAPES(CALL)                                                                   \
    switch (np * 8 + nt) {                                                             \
    case 1 * 8 + 1: CALL(1, 1); break;                                                 \
    case 2 * 8 + 1: CALL(2, 1); break;                                                 \
    case 3 * 8 + 1: CALL(3, 1); break;                                                 \
    case 4 * 8 + 1: CALL(4, 1); break;                                                 \
    PREFILL_CASES(CALL, 1)                                                             \
    PREFILL_CASES(CALL, 2)                                                             \
    default: break;                                                                    \
    }

/* The float types have no block partial sums, so their prefill tile can be
 * 4 panels x 6 tokens (24 accumulators). */
#define FLOAT_SHAPES(CALL)                                                             \
    switch (np * 8 + nt) {                                                             \
    PREFILL_CASES(CALL, 3)                                                             \
    PREFILL_CASES(CALL, 4)                                                             \
    default: SHAPES(CALL)                                                              \
    }

#define FLOAT_RUN(name, TYPE)                                                          \
    static T512 void name(const uint8_t *w, size_t pb, int np, const float *x,         \
                          int64_t ldx, int nt, int64_t n_in, float *y, int64_t ldy,    \
                          int64_t rows) {                                              \
        _Pragma("GCC diagnostic push")                                                 \
        _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")                    \
        FLOAT_SHAPES(FLOAT_CALL)                                                       \
        _Pragma("GCC diagnostic pop")                                                  \
    }
#define FLOAT_CALL(NP, NT) float_tile(TYPE_, w, pb, NP, x, ldx, NT, n_in, y, ldy, rows)

#define BLOCK_RUN(name)                                                                \
    static T512 void name(const uint8_t *w, size_t pb, int np, const float *x,         \
                          int64_t ldx, const float *sx, int64_t ldsx, int nt,          \
                          int64_t n_in, float *y, int64_t ldy, int64_t rows) {         \
        _Pragma("GCC diagnostic push")                                                 \
        _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")                    \
        SHAPES(BLOCK_CALL)                                                             \
        _Pragma("GCC diagnostic pop")                                                  \
    }
#define BLOCK_CALL(NP, NT)                                                             \
    block_tile(TYPE_, 0, w, pb, NULL, NP, x, ldx, sx, ldsx, NT, n_in, y, ldy, rows)
#define DECODED_CALL(NP, NT)                                                           \
    block_tile(TYPE_, 1, NULL, 0, qt, NP, x, ldx, sx, ldsx, NT, n_in, y, ldy, rows)

#define DECODED_RUN(name)                                                              \
    static T512 void name(const float *qt, int np, const float *x, int64_t ldx,        \
                          const float *sx, int64_t ldsx, int nt, int64_t n_in,         \
                          float *y, int64_t ldy, int64_t rows) {                       \
        _Pragma("GCC diagnostic push")                                                 \
        _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")                    \
        SHAPES(DECODED_CALL)                                                           \
        _Pragma("GCC diagnostic pop")                                                  \
    }

#define TYPE_ FA_F32
FLOAT_RUN(run_f32, FA_F32)
#undef TYPE_
#define TYPE_ FA_F16
FLOAT_RUN(run_f16, FA_F16)
#undef TYPE_
#define TYPE_ FA_BF16
FLOAT_RUN(run_bf16, FA_BF16)
#undef TYPE_
#define TYPE_ FA_Q8_0
BLOCK_RUN(run_q8_0)
DECODED_RUN(decoded_q8_0)
#undef TYPE_
#define TYPE_ FA_Q4_0
BLOCK_RUN(run_q4_0)
DECODED_RUN(decoded_q4_0)
#undef TYPE_
#define TYPE_ FA_Q4_1
BLOCK_RUN(run_q4_1)
DECODED_RUN(decoded_q4_1)
#undef TYPE_

/* Decode np (1 or 2) packed panels of a block type into floats, in the order
 * block_tile reads them: for each block, for each column j, for each panel,
 * 16 values (the integer q, nibble or nibble - 8); then for each block the
 * d of each panel, then (Q4_1) the m of each panel. */
static T512 void decode_tile(int type, const uint8_t *w, size_t pb, int np, int64_t n_in,
                             float *qt) {
    const int64_t nb = n_in / FA_QK;
    const size_t bb = type == FA_Q8_0 ? 544 : type == FA_Q4_0 ? 288 : 320;
    const size_t qoff = type == FA_Q4_1 ? 64 : 32;
    const __m512 table = type == FA_Q4_0
        ? _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7)
        : _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    float *scales = qt + nb * FA_QK * np * 16;
    for (int64_t b = 0; b < nb; b++) {
        float *qb = qt + b * FA_QK * np * 16;
        for (int p = 0; p < np; p++) {
            const uint8_t *blk = w + p * pb + (size_t)b * bb;
            if (type == FA_Q8_0) {
                for (int g = 0; g < 8; g++) {
                    __m512i v = _mm512_loadu_si512((const void *)(blk + 32 + 64 * g));
                    for (int j = 0; j < 4; j++) {
                        __m512i u = j == 3 ? v : _mm512_slli_epi32(v, 24 - 8 * j);
                        _mm512_storeu_ps(qb + ((4 * g + j) * np + p) * 16,
                                         _mm512_cvtepi32_ps(_mm512_srai_epi32(u, 24)));
                    }
                }
            } else {
                for (int g = 0; g < 4; g++) {
                    __m512i nib = _mm512_loadu_si512((const void *)(blk + qoff + 64 * g));
                    for (int j = 0; j < 8; j++) {
                        _mm512_storeu_ps(qb + ((8 * g + j) * np + p) * 16,
                                         _mm512_permutexvar_ps(nib, table));
                        nib = _mm512_srli_epi32(nib, 4);
                    }
                }
            }
            float *sb = scales + b * 2 * np * 16;
            _mm512_storeu_ps(sb + p * 16,
                             _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)blk)));
            if (type == FA_Q4_1)
                _mm512_storeu_ps(sb + (np + p) * 16, _mm512_cvtph_ps(_mm256_loadu_si256(
                                                         (const __m256i *)(blk + 32))));
        }
    }
}

static void avx512_run(int type, const uint8_t *w, size_t pb, int np, const float *x,
                       int64_t ldx, const float *sx, int64_t ldsx, int nt, int64_t n_in,
                       float *y, int64_t ldy, int64_t rows) {
    switch (type) {
    case FA_F32: run_f32(w, pb, np, x, ldx, nt, n_in, y, ldy, rows); break;
    case FA_F16: run_f16(w, pb, np, x, ldx, nt, n_in, y, ldy, rows); break;
    case FA_BF16: run_bf16(w, pb, np, x, ldx, nt, n_in, y, ldy, rows); break;
    case FA_Q8_0: run_q8_0(w, pb, np, x, ldx, sx, ldsx, nt, n_in, y, ldy, rows); break;
    case FA_Q4_0: run_q4_0(w, pb, np, x, ldx, sx, ldsx, nt, n_in, y, ldy, rows); break;
    case FA_Q4_1: run_q4_1(w, pb, np, x, ldx, sx, ldsx, nt, n_in, y, ldy, rows); break;
    default: break;
    }
}

/* A prefill over n_panels panels and n_tok tokens.  Float types: tiles of
 * 4 panels x 6 tokens.  Block types: each pair of panels is decoded to floats
 * once and then multiplied with every token, instead of decoding it again for
 * each group of 6 tokens.  The same products as block_tile from the packed
 * bytes, bit for bit.  Returns 0 (and does nothing) when the tile buffer
 * cannot be allocated. */
static int avx512_prefill(int type, const uint8_t *w, size_t pb, int64_t n_panels,
                          const float *x, int64_t ldx, const float *sx, int64_t ldsx,
                          int64_t n_tok, int64_t n_in, float *y, int64_t ldy, int64_t rows) {
    typedef void (*decoded_fn)(const float *, int, const float *, int64_t, const float *,
                               int64_t, int, int64_t, float *, int64_t, int64_t);
    if (type == FA_F32 || type == FA_F16 || type == FA_BF16) {
        for (int64_t p = 0; p < n_panels; p += 4) {
            const int np = n_panels - p < 4 ? (int)(n_panels - p) : 4;
            for (int64_t t = 0; t < n_tok; t += 6) {
                const int nt = n_tok - t < 6 ? (int)(n_tok - t) : 6;
                avx512_run(type, w + p * pb, pb, np, x + t * ldx, ldx, NULL, 0, nt, n_in,
                           y + t * ldy + p * FA_PANEL, ldy, rows - p * FA_PANEL);
            }
        }
        return 1;
    }
    decoded_fn run = type == FA_Q8_0 ? decoded_q8_0
                     : type == FA_Q4_0 ? decoded_q4_0
                     : type == FA_Q4_1 ? decoded_q4_1
                                       : NULL;
    if (!run) return 0;
    const int64_t nb = n_in / FA_QK;
    /* 2 panels: 32 x 16 values and 2 x 16 scales per block each */
    float *qt = malloc(sizeof(float) * (size_t)nb * 2 * (FA_QK + 2) * 16);
    if (!qt) return 0;
    for (int64_t p = 0; p < n_panels; p += 2) {
        const int np = n_panels - p < 2 ? 1 : 2;
        decode_tile(type, w + p * pb, pb, np, n_in, qt);
        for (int64_t t = 0; t < n_tok; t += 6) {
            const int nt = n_tok - t < 6 ? (int)(n_tok - t) : 6;
            run(qt, np, x + t * ldx, ldx, sx + t * ldsx, ldsx, nt, n_in,
                y + t * ldy + p * FA_PANEL, ldy, rows - p * FA_PANEL);
        }
    }
    free(qt);
    return 1;
}


const fa_panel_kernels fa_panel_kernels_avx512 = {
    avx512_run, avx512_prefill, 4, 2, 6,
    1u << FA_F32 | 1u << FA_F16 | 1u << FA_BF16 | 1u << FA_Q8_0 | 1u << FA_Q4_0 | 1u << FA_Q4_1,
};

#else  /* not x86-64 with GCC: dispatch never selects this level */

const fa_panel_kernels fa_panel_kernels_avx512 = {0, 0, 1, 1, 1, 0};

#endif
