/*
 * The opt-in "q8 activations" matmul: x is rounded to 8-bit blocks once per
 * call and every product with a Q4_0, Q4_1 or Q8_0 weight becomes an integer
 * dot product.  This changes the numbers (by the rounding of x to 8 bits), so
 * it is never the default: fa_matmul_act with FA_ACT_Q8 asks for it.
 *
 * Quantized activation row of n values, nb = n / 32 blocks:
 *   d[b]   = max_j |x[32 b + j]| / 127            float32
 *   q[i]   = rint(x[i] * (1 / d[b]))              int8 in [-127, 127]; 0 if d = 0,
 *            and 0 when max |x| or 1 / d is inf or NaN (q8_block_zero)
 *   s[b]   = d[b] * sum_j q[32 b + j]             float32 (Q4_1's min term)
 *
 * Dot of a weight row (integer values wq, scale dw, for Q4_1 a min mw) with
 * it; the same operations at every SIMD level, so all levels agree bit for bit:
 *   p[b] = sum_{j < 32} wq[32 b + j] q[32 b + j]       exact int32
 *   y = 0
 *   for b = 0, 1, .. in order:
 *       y = fma(dw[b] d[b], (float)p[b], y)
 *       y = fma(mw[b], s[b], y)                          Q4_1 only
 * fma(a, b, c) is a * b + c rounded once (fmaf, _mm512_fmadd_ps); the other
 * multiply is a float32 operation of its own.  The file is compiled with
 * floating-point contraction off so the compiler fuses no other pair at one
 * level and not at another.  This float work is what a block costs most of
 * after the integer sums: a convert, a multiply and two fmas per x row and
 * 16 weight rows, against a convert, three multiplies and two adds when
 * each product was rounded on its own and the min terms had a sum of their
 * own (on an Intel Xeon with AMX, a SmolLM2 q8 prefill ran 3-5 % faster with
 * the fmas; the decode, bound by memory, did not change).  One accumulator
 * per output also leaves registers for twice the x rows in the AMX kernel's
 * float work.  One chain per output is enough: the kernels always work on
 * many outputs at once (16 weight rows per vector at the AVX-512 level), so
 * the chains' latencies overlap.
 *
 * The AVX-512 VNNI kernel puts weight rows in vector lanes: lane r of a
 * 512-bit register holds 4 consecutive values of row r, so one vpdpbusd
 * with x's matching 4 bytes broadcast adds 4 products to each of 16 rows, 8
 * of them make p[b] for 16 rows, and the float work (a convert, a multiply,
 * an fma and for Q4_1 a second fma) is done once per 16 rows instead of
 * once per row.  vpdpbusd takes unsigned weights, so signed ones are stored
 * as u = wq + off (Q4_0: off 8, which is the nibble itself; Q8_0: off 128)
 * and the sum starts from -off * sum_j q[32 b + j]: the same exact integer
 * p[b].
 * A model in q8 mode keeps a packed copy of each Q4_0, Q4_1 and Q8_0 weight
 * in that lane layout, made once at load (fa_q8_pack_weight; the layout is
 * described above qp_pack_groups).  It holds the file's bytes rearranged, 4-bit
 * values still packed two to a byte and scales still halves, so a decode
 * streams no more bytes than the file holds, and each thread's rows are one
 * sequential region.  Per block and 16 rows the kernel loads 4 vectors (Q8_0:
 * 8), splits the nibbles with an and, a shift and an and, and runs 8 vpdpbusd
 * per x row with x's bytes as broadcast memory operands, and prefetches the
 * bytes 16 KiB ahead of its reads.  A decode is then bound by memory: on one
 * core about 117 GMAC/s for Q4_1 from L2 and 22-24 GB/s from DRAM (what a
 * plain read loop gets on this machine); in a SmolLM2 decode the two kernels'
 * time splits as the bytes of their weights do.  The copy costs memory: a
 * second copy of those weights (96 MB for SmolLM2), and about 0.1 s at load.
 * A prefill (8 or more x rows) passes every group of 8 x rows over a tile of
 * groups kept in L2, splitting the nibbles again on each pass; it runs as
 * fast as the former per-call tiles of expanded bytes did (Q4_1, 512 rows
 * through 1536 x 576 on one core: 146-148 against 137-150 GMAC/s), bound by
 * the float multiplies sharing the vector ports with vpdpbusd.  Where the CPU
 * has AMX-INT8, a prefill's blocks of 16 x rows go through the tile unit
 * instead (amx_groups, below), with the same integer sums and float work:
 * on an Intel Xeon with AMX, Q4_1 512 x 1536 x 576 on one core went from 163
 * to 232 GMAC/s, and a SmolLM2 q8 prefill ran 10.5% faster (8 of 8
 * interleaved pairs).
 * A weight without the copy (kernel tests, a model built without it) gives
 * the same numbers by other ways: for a prefill each thread packs a tile of
 * its rows (up to 384 KiB) into the same layout per call; for a decode, or
 * when that buffer cannot be allocated, the kernel builds the registers from
 * the rows as it goes (a 16 x 4 transpose of 32-bit words per 16 bytes) and
 * prefetches the rows two groups ahead.  Either way each y element sees the
 * same operations, whatever n_seq, ith, nth and the layout are.
 *
 * Threads: fa_matmul_q8 quantizes the whole of x on every thread instead
 * of sharing one copy, which would need a barrier between quantizing and
 * multiplying.  A prefill's inputs that come right after a norm (to q, k,
 * v and to up, gate), which is followed by a barrier anyway, are quantized
 * once, each thread its own rows (fa_q8_quantize_rows), and their products
 * read that copy (fa_matmul_q8_rows): a SmolLM2 q8 prefill ran about 2 %
 * faster (median of 14 interleaved pairs).  Quantizing is a pure function of
 * the row, so each y element depends neither on the thread count nor on
 * n_seq nor on which way it was quantized: prefill and decode give
 * bit-identical products.
 *
 * The MLP activation, the down product's input, is quantized the same way
 * by each thread for the columns it computed (fa_q8_quantize_cols): +1.3 %.
 *
 * Known shortcomings: the out product of a prefill still quantizes all of x
 * on both threads, into a scratch buffer allocated per call; a
 * thread whose share of rows starts or ends inside a group of 16 computes that
 * group whole and stores part of it (fa_matmul_share splits rows evenly,
 * not by groups); without the packed copy a prefill repacks its rows on
 * every call (about 4% of a prefill) and a decode spends as much on the
 * transpose as on the products; the AVX2 level works one row and one x row
 * at a time, adding each block's 8 partial sums horizontally, and quantizes
 * x with the generic C code.
 */
#pragma GCC optimize("fp-contract=off")

#include <math.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "fa_internal.h"
#include "packed.h"

/* n_seq quantized activation rows of n_in values, nb = n_in / 32 blocks. */
typedef struct {
    int64_t n_in, nb;
    const int8_t *q;      /* [n_seq][n_in] */
    const float *d;       /* [n_seq][nb] */
    const float *s;       /* [n_seq][nb] */
    const int32_t *neg;   /* [n_seq][nb]: minus the sum of the block's q */
} q8_act;

/* Rounds one row of nb blocks; neg (may be NULL) gets minus each block's sum. */
typedef void (*q8_quant_fn)(const float *x, int64_t nb, int8_t *q, float *d, float *s,
                            int32_t *neg);
/* y[t * ldy + r] for rows r0 <= r < r1 of w and all n_seq rows of x.  pk is w's
 * packed copy (fa_q8_pack_weight) or NULL; kernels that cannot use it read w.
 * Kernels that prefetch ask for nothing past row r_pf (>= r1). */
typedef void (*q8_run_fn)(int type, const uint8_t *w, size_t rb, const uint8_t *pk,
                          int64_t r0, int64_t r1, const q8_act *x, int64_t n_seq, float *y,
                          int64_t ldy, int64_t r_pf);

/* What vpdpbusd-style kernels add to a signed weight to make it unsigned. */
static int q8_offset(int type) {
    return type == FA_Q8_0 ? 128 : type == FA_Q4_0 ? 8 : 0;
}

/* ------------------------------------------------------- packed copy */

/* The copy a model keeps of each Q4_0, Q4_1 and Q8_0 weight for the VNNI
 * kernels (fa_q8_pack_weight): 16 rows side by side, so that one 512-bit load
 * gives 4 values of each of 16 rows and nothing is transposed per call.
 * Group g holds rows 16 g .. 16 g + 15 (rows past n_out are zero); groups
 * follow each other, so a thread's share of the rows is one sequential
 * region.  Inside a group of nb blocks, each part block after block:
 *   quants [nb][nv][16][4 bytes]  lane i of vector k: bytes 4k .. 4k+3 of row
 *          i's block.  Q4_0 / Q4_1: nv = 4 over the file's 16 nibble bytes, so
 *          w & 15 are values 4k .. 4k+3 and (w >> 4) & 15 values 16+4k ..
 *          16+4k+3.  Q8_0: nv = 8 over the 32 values, each + 128 (unsigned,
 *          as vpdpbusd takes them).
 *   scales [nb][16] half          the file's d of each row
 *   mins   [nb][16] half          Q4_1 only, the file's m
 * then zeros up to a multiple of 64 bytes, so every quant vector of a 64-byte
 * aligned copy is aligned.  The copy holds the file's bytes rearranged: a
 * decode streams no more than the file holds. */
#define QP_ROWS 16

/* Bytes of one block's quants in a group. */
static size_t qp_quant_bytes(int type) {
    return type == FA_Q8_0 ? 8 * 64 : 4 * 64;
}

/* Bytes of one group of nb blocks, padded to 64. */
static size_t qp_group_bytes(int type, int64_t nb) {
    size_t per_block = qp_quant_bytes(type) + (type == FA_Q4_1 ? 64 : 32);
    return ((size_t)nb * per_block + 63) & ~(size_t)63;
}

/* Groups [g0, g1) of w's packed copy, group g0 at dst. */
static void qp_pack_groups(const fa_weight *w, int64_t g0, int64_t g1, uint8_t *dst) {
    const int type = w->type;
    const int64_t nb = w->n_in / FA_QK;
    const size_t rb = w->row_bytes, qb = qp_quant_bytes(type);
    const size_t gb = qp_group_bytes(type, nb);
    const size_t block = type == FA_Q8_0   ? FA_Q8_0_BYTES
                         : type == FA_Q4_1 ? FA_Q4_1_BYTES
                                           : FA_Q4_0_BYTES;
    const size_t qoff = type == FA_Q4_1 ? 4 : 2;
    const int nv = (int)(qb / 64);
    for (int64_t g = g0; g < g1; g++) {
        uint8_t *pg = dst + (size_t)(g - g0) * gb;
        uint8_t *scales = pg + (size_t)nb * qb, *mins = scales + (size_t)nb * 32;
        memset(pg, 0, gb);
        for (int i = 0; i < QP_ROWS && g * QP_ROWS + i < w->n_out; i++) {
            const uint8_t *row = (const uint8_t *)w->data + (size_t)(g * QP_ROWS + i) * rb;
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *blk = row + (size_t)b * block;
                memcpy(scales + 32 * b + 2 * i, blk, 2);
                if (type == FA_Q4_1) memcpy(mins + 32 * b + 2 * i, blk + 2, 2);
                for (int k = 0; k < nv; k++) {
                    uint8_t *o = pg + (size_t)b * qb + 64 * k + 4 * i;
                    memcpy(o, blk + qoff + 4 * k, 4);
                    if (type == FA_Q8_0)
                        for (int j = 0; j < 4; j++) o[j] ^= 0x80;
                }
            }
        }
    }
}

size_t fa_q8_packed_bytes(const fa_weight *w) {
    if (!w || !w->data || !fa_act_q8_supports(w->type) || w->n_out <= 0 || w->n_in <= 0)
        return 0;
    size_t rb = fa_row_bytes(w->type, w->n_in);
    if (rb == 0 || rb != w->row_bytes) return 0;
    const size_t gb = qp_group_bytes(w->type, w->n_in / FA_QK);
    const uint64_t n_groups = ((uint64_t)w->n_out + QP_ROWS - 1) / QP_ROWS;
    if (n_groups > SIZE_MAX / gb) return 0;
    return (size_t)n_groups * gb;
}

int fa_q8_pack_weight(const fa_weight *w, void *dst, size_t dst_bytes) {
    size_t n = fa_q8_packed_bytes(w);
    if (n == 0 || !dst || dst_bytes < n) return -1;
    qp_pack_groups(w, 0, (w->n_out + QP_ROWS - 1) / QP_ROWS, (uint8_t *)dst);
    return 0;
}

/* ------------------------------------------------------------- generic */

/* Is the block with max |x| amax and reciprocal scale id rounded to all
 * zeros?  Yes when either is inf or NaN: an inf or NaN value (then d is inf or
 * NaN and the products turn NaN, as the float path's would), or a scale so
 * small that 1 / d overflows (max |x| below about 3.7e-37, a block of nearly
 * zeros: it then adds exactly 0, s being d * 0).  x * id would otherwise be
 * inf or NaN, whose conversion to an integer C leaves undefined. */
static inline int q8_block_zero(float amax, float id) {
    return !isfinite(amax) || !isfinite(id);
}

static void generic_quantize(const float *x, int64_t nb, int8_t *q, float *d, float *s,
                             int32_t *neg) {
    for (int64_t b = 0; b < nb; b++) {
        const float *xb = x + b * FA_QK;
        /* max |x| on the bit patterns (avx512_quantize says why): the float
         * max, and a NaN, the one with the largest payload, sticks */
        uint32_t amax_bits = 0;
        for (int j = 0; j < FA_QK; j++) {
            uint32_t u;
            memcpy(&u, xb + j, sizeof u);
            u &= 0x7fffffffu;
            if (u > amax_bits) amax_bits = u;
        }
        float amax;
        memcpy(&amax, &amax_bits, sizeof amax);
        float db = amax / 127.0f;
        float id = db != 0.0f ? 1.0f / db : 0.0f;
        const int zero = q8_block_zero(amax, id);
        int sum = 0;
        for (int j = 0; j < FA_QK; j++) {
            int v = zero ? 0 : (int)nearbyintf(xb[j] * id);
            q[b * FA_QK + j] = (int8_t)v;
            sum += v;
        }
        d[b] = db;
        s[b] = db * (float)sum;
        if (neg) neg[b] = -sum;
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

/* Up to Q8_CHUNK x rows share each decoded weight block. */
#define Q8_CHUNK 8

static void generic_run(int type, const uint8_t *w, size_t rb, const uint8_t *pk,
                        int64_t r0, int64_t r1, const q8_act *x, int64_t n_seq, float *y,
                        int64_t ldy, int64_t r_pf) {
    (void)pk;  /* the packed copy is laid out for the VNNI kernels */
    (void)r_pf;
    const int64_t nb = x->nb, n_in = x->n_in;
    int8_t v[FA_QK];
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *wr = w + (size_t)r * rb;
        for (int64_t t0 = 0; t0 < n_seq; t0 += Q8_CHUNK) {
            int nt = n_seq - t0 < Q8_CHUNK ? (int)(n_seq - t0) : Q8_CHUNK;
            float acc[Q8_CHUNK] = {0};
            for (int64_t b = 0; b < nb; b++) {
                float dw, mw;
                generic_wblock(type, wr, b, v, &dw, &mw);
                for (int t = 0; t < nt; t++) {
                    const int8_t *q = x->q + (t0 + t) * n_in + b * FA_QK;
                    int p = 0;
                    for (int j = 0; j < FA_QK; j++) p += (int)v[j] * (int)q[j];
                    float dd = dw * x->d[(t0 + t) * nb + b];
                    acc[t] = fmaf(dd, (float)p, acc[t]);
                    if (type == FA_Q4_1) acc[t] = fmaf(mw, x->s[(t0 + t) * nb + b], acc[t]);
                }
            }
            for (int t = 0; t < nt; t++) y[(t0 + t) * ldy + r] = acc[t];
        }
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

/* ---------------------------------------------------------------- AVX2 */

#define TAVX2 __attribute__((target("avx2,fma,f16c")))
#define TVNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))
#define INL2 static inline __attribute__((always_inline)) TAVX2
#define INLV static inline __attribute__((always_inline)) TVNNI

/* The 32 weight values of block b: unsigned (0..15) for Q4_1, signed otherwise. */
INL2 __m256i avx2_wblock(int type, const uint8_t *w, int64_t b, float *dw, float *mw) {
    if (type == FA_Q8_0) {
        const uint8_t *p = w + b * FA_Q8_0_BYTES;
        *dw = fa_f16_table[fa_read_u16(p)];
        return _mm256_loadu_si256((const __m256i *)(p + 2));
    }
    const int q41 = type == FA_Q4_1;
    const uint8_t *p = w + b * (q41 ? FA_Q4_1_BYTES : FA_Q4_0_BYTES);
    *dw = fa_f16_table[fa_read_u16(p)];
    if (q41) *mw = fa_f16_table[fa_read_u16(p + 2)];
    __m128i qs = _mm_loadu_si128((const __m128i *)(p + (q41 ? 4 : 2)));
    const __m128i lo4 = _mm_set1_epi8(0x0f);
    __m128i lo = _mm_and_si128(qs, lo4);
    __m128i hi = _mm_and_si128(_mm_srli_epi16(qs, 4), lo4);
    __m256i wv = _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
    if (!q41) wv = _mm256_sub_epi8(wv, _mm256_set1_epi8(8));
    return wv;
}

/* sum of the 32 products of weight values wv and x bytes xv, exact.  maddubs
 * takes unsigned x signed bytes; for signed weights the sign moves onto x
 * (|w| <= 128, |q| <= 127, so pairs stay within int16). */
INL2 int avx2_pdot(int type, __m256i wv, __m256i xv) {
    __m256i pr = type == FA_Q4_1
                     ? _mm256_maddubs_epi16(wv, xv)
                     : _mm256_maddubs_epi16(_mm256_abs_epi8(wv), _mm256_sign_epi8(xv, wv));
    __m256i s8 = _mm256_madd_epi16(pr, _mm256_set1_epi16(1));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
    return _mm_cvtsi128_si32(s4);
}

INL2 void avx2_run_type(int type, const uint8_t *w, size_t rb, int64_t r0, int64_t r1,
                        const q8_act *x, int64_t n_seq, float *y, int64_t ldy) {
    const int64_t nb = x->nb, n_in = x->n_in;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *wr = w + (size_t)r * rb;
        for (int64_t t0 = 0; t0 < n_seq; t0 += Q8_CHUNK) {
            int nt = n_seq - t0 < Q8_CHUNK ? (int)(n_seq - t0) : Q8_CHUNK;
            float acc[Q8_CHUNK] = {0};
            for (int64_t b = 0; b < nb; b++) {
                float dw, mw = 0.0f;
                __m256i wv = avx2_wblock(type, wr, b, &dw, &mw);
                for (int t = 0; t < nt; t++) {
                    const int64_t xb = (t0 + t) * nb + b;
                    __m256i xv = _mm256_loadu_si256(
                        (const __m256i *)(x->q + (t0 + t) * n_in + b * FA_QK));
                    int p = avx2_pdot(type, wv, xv);
                    float dd = dw * x->d[xb];
                    acc[t] = fmaf(dd, (float)p, acc[t]);
                    if (type == FA_Q4_1) acc[t] = fmaf(mw, x->s[xb], acc[t]);
                }
            }
            for (int t = 0; t < nt; t++) y[(t0 + t) * ldy + r] = acc[t];
        }
    }
}

TAVX2 static void avx2_run(int type, const uint8_t *w, size_t rb, const uint8_t *pk,
                           int64_t r0, int64_t r1, const q8_act *x, int64_t n_seq, float *y,
                           int64_t ldy, int64_t r_pf) {
    (void)r_pf;
    (void)pk;  /* the packed copy is laid out for the VNNI kernels */
    if (type == FA_Q8_0) avx2_run_type(FA_Q8_0, w, rb, r0, r1, x, n_seq, y, ldy);
    else if (type == FA_Q4_0) avx2_run_type(FA_Q4_0, w, rb, r0, r1, x, n_seq, y, ldy);
    else avx2_run_type(FA_Q4_1, w, rb, r0, r1, x, n_seq, y, ldy);
}

/* -------------------------------------------------------- AVX-512 VNNI */

/* Rows per lane group (the packed copy's groups), x rows per tile. */
#define QV_ROWS QP_ROWS
#define QV_T 8

/* out[k] lane i = 32-bit word k of the 16 bytes at src[i] + off, i < 16. */
INLV void vnni_t16x4(const uint8_t *const *src, size_t off, __m512i out[4]) {
    __m512i z[4];
    for (int i = 0; i < 4; i++) {
        /* z[i] 128-bit lane j holds row 4 j + i, so the unpacks below leave
         * row 4 j + i in position 4 j + i */
        __m512i v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(src[i] + off)));
        v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(src[4 + i] + off)), 1);
        v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(src[8 + i] + off)), 2);
        z[i] = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(src[12 + i] + off)), 3);
    }
    __m512i ab0 = _mm512_unpacklo_epi32(z[0], z[1]), ab1 = _mm512_unpackhi_epi32(z[0], z[1]);
    __m512i cd0 = _mm512_unpacklo_epi32(z[2], z[3]), cd1 = _mm512_unpackhi_epi32(z[2], z[3]);
    out[0] = _mm512_unpacklo_epi64(ab0, cd0);
    out[1] = _mm512_unpackhi_epi64(ab0, cd0);
    out[2] = _mm512_unpacklo_epi64(ab1, cd1);
    out[3] = _mm512_unpackhi_epi64(ab1, cd1);
}

/* Block b of 16 file rows in the packed copy's layout: q[k] as the quant
 * vectors (4 for Q4_0 / Q4_1, 8 for Q8_0, already + 128), hd and hm the 16
 * half scales and mins. */
INLV void vnni_gather(int type, const uint8_t *const *rows, int64_t b, __m512i q[8],
                      uint16_t hd[QV_ROWS], uint16_t hm[QV_ROWS]) {
    const size_t bytes = type == FA_Q8_0   ? FA_Q8_0_BYTES
                         : type == FA_Q4_1 ? FA_Q4_1_BYTES
                                           : FA_Q4_0_BYTES;
    const size_t o = (size_t)b * bytes;
    for (int i = 0; i < QV_ROWS; i++) hd[i] = fa_read_u16(rows[i] + o);
    if (type == FA_Q4_1)
        for (int i = 0; i < QV_ROWS; i++) hm[i] = fa_read_u16(rows[i] + o + 2);
    if (type == FA_Q8_0) {
        const __m512i flip = _mm512_set1_epi8((char)0x80);
        vnni_t16x4(rows, o + 2, q);
        vnni_t16x4(rows, o + 18, q + 4);
        for (int k = 0; k < 8; k++) q[k] = _mm512_xor_si512(q[k], flip);
        return;
    }
    vnni_t16x4(rows, o + (type == FA_Q4_1 ? 4 : 2), q);
}

/* The 8 vectors of unsigned values (wq + off) a block's quant vectors hold:
 * wv[k] lane i = values 4k .. 4k+3 of row i. */
INLV void vnni_values(int type, const __m512i *q, __m512i wv[8]) {
    if (type == FA_Q8_0) {
        for (int k = 0; k < 8; k++) wv[k] = q[k];
        return;
    }
    const __m512i lo4 = _mm512_set1_epi8(0x0f);
    for (int k = 0; k < 4; k++) {
        wv[k] = _mm512_and_si512(q[k], lo4);
        wv[4 + k] = _mm512_and_si512(_mm512_srli_epi32(q[k], 4), lo4);
    }
}

/* p += the 4 products in each lane of unsigned w and the 4 signed bytes at
 * ptr: vpdpbusd with its broadcast memory operand, which the compiler does
 * not form from _mm512_set1_epi32 (it spends a separate broadcast on each). */
#define VNNI_DPBUSD_X4(p, w, ptr)                                                      \
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(p) : "v"(w), "m"(*(const int32_t *)(ptr)))

/* One group of 16 rows (lane i = row r + i, stored where lanes has bit i)
 * against T x rows t0 .. t0 + T - 1.  Reads the group of a packed copy at pk,
 * or if direct builds each block from rows[] on the way, prefetching its share
 * of the pf_bytes at pf.  The halves are widened by vcvtph2ps, exact like
 * fa_f16_table (a NaN scale may come out with other payload bits, and makes
 * the outputs NaN at every level). */
INLV void vnni_tile(int type, const int direct, const uint8_t *pk,
                    const uint8_t *const *rows, int64_t r, __mmask16 lanes, const q8_act *x,
                    int64_t t0, const int T, float *y, int64_t ldy, const char *pf,
                    size_t pf_bytes) {
    const int64_t nb = x->nb, n_in = x->n_in;
    const int off = q8_offset(type);
    const size_t qb = qp_quant_bytes(type);
    const uint8_t *scales = direct ? NULL : pk + (size_t)nb * qb;
    const uint8_t *mins = direct ? NULL : scales + (size_t)nb * 32;
    __m512 acc[QV_T];
#pragma GCC unroll 8
    for (int t = 0; t < T; t++) acc[t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m512i wv[8];
        __m512 dw, mw = _mm512_setzero_ps();
        if (!direct) {
            /* this block's share of the bytes to prefetch */
            const size_t step = ((pf_bytes + nb - 1) / nb + 63) & ~(size_t)63;
            for (size_t o = (size_t)b * step; o < (size_t)(b + 1) * step && o < pf_bytes; o += 64)
                _mm_prefetch(pf + o, FA_PREFETCH_STREAM);
            __m512i q[8];
            for (int k = 0; k < (int)(qb / 64); k++)
                q[k] = _mm512_loadu_si512((const void *)(pk + (size_t)b * qb + 64 * k));
            vnni_values(type, q, wv);
            dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scales + 32 * b)));
            if (type == FA_Q4_1)
                mw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(mins + 32 * b)));
        } else {
            /* this block's share of the rows QV_PREFETCH groups ahead */
            const size_t step = QV_ROWS * (type == FA_Q8_0   ? FA_Q8_0_BYTES
                                           : type == FA_Q4_1 ? FA_Q4_1_BYTES
                                                             : FA_Q4_0_BYTES);
            for (size_t o = (size_t)b * step; o < (size_t)(b + 1) * step && o < pf_bytes; o += 64)
                _mm_prefetch(pf + o, FA_PREFETCH_STREAM);
            __m512i q[8];
            uint16_t hd[QV_ROWS], hm[QV_ROWS];
            vnni_gather(type, rows, b, q, hd, hm);
            vnni_values(type, q, wv);
            dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)hd));
            if (type == FA_Q4_1) mw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)hm));
        }
        /* with few x rows, two integer sums per row (values 0-15 and 16-31
         * of the block) halve the chain of dependent vpdpbusd; p is exact
         * either way */
        const int split = T <= 2;
        __m512i p[QV_T], p2[QV_T];
#pragma GCC unroll 8
        for (int t = 0; t < T; t++) {
            p[t] = off ? _mm512_set1_epi32(off * x->neg[(t0 + t) * nb + b])
                       : _mm512_setzero_si512();
            p2[t] = _mm512_setzero_si512();
        }
        const int8_t *xq = x->q + t0 * n_in + b * FA_QK;
#pragma GCC unroll 8
        for (int k = 0; k < 8; k++) {
#pragma GCC unroll 8
            for (int t = 0; t < T; t++) {
                if (split && k >= 4) VNNI_DPBUSD_X4(p2[t], wv[k], xq + t * n_in + 4 * k);
                else VNNI_DPBUSD_X4(p[t], wv[k], xq + t * n_in + 4 * k);
            }
        }
        if (split)
#pragma GCC unroll 8
            for (int t = 0; t < T; t++) p[t] = _mm512_add_epi32(p[t], p2[t]);
#pragma GCC unroll 8
        for (int t = 0; t < T; t++) {
            const int64_t xb = (t0 + t) * nb + b;
            __m512 dd = _mm512_mul_ps(dw, _mm512_set1_ps(x->d[xb]));
            acc[t] = _mm512_fmadd_ps(dd, _mm512_cvtepi32_ps(p[t]), acc[t]);
            if (type == FA_Q4_1) acc[t] = _mm512_fmadd_ps(mw, _mm512_set1_ps(x->s[xb]), acc[t]);
        }
    }
#pragma GCC unroll 8
    for (int t = 0; t < T; t++) _mm512_mask_storeu_ps(y + (t0 + t) * ldy + r, lanes, acc[t]);
}

/* One function per (type, T): inside, T is a constant, so the compiler keeps
 * p, acc and m in registers. */
typedef void (*vnni_tile_fn)(const uint8_t *pk, const uint8_t *const *rows, int64_t r,
                             __mmask16 lanes, const q8_act *x, int64_t t0, float *y,
                             int64_t ldy, const char *pf, size_t pf_bytes);
#define VNNI_TILE(type, dir, T)                                                        \
    TVNNI static void vnni_tile_##type##_##dir##_##T(                                  \
        const uint8_t *pk, const uint8_t *const *rows, int64_t r, __mmask16 lanes,      \
        const q8_act *x, int64_t t0, float *y, int64_t ldy, const char *pf,             \
        size_t pf_bytes) {                                                              \
        vnni_tile(type, dir, pk, rows, r, lanes, x, t0, T, y, ldy, pf, pf_bytes);       \
    }
#define VNNI_TILES(type, dir)                                                          \
    VNNI_TILE(type, dir, 1) VNNI_TILE(type, dir, 2) VNNI_TILE(type, dir, 3)             \
    VNNI_TILE(type, dir, 4) VNNI_TILE(type, dir, 5) VNNI_TILE(type, dir, 6)             \
    VNNI_TILE(type, dir, 7) VNNI_TILE(type, dir, 8)                                     \
    static const vnni_tile_fn vnni_tiles_##type##_##dir[QV_T + 1] = {                  \
        NULL, vnni_tile_##type##_##dir##_1, vnni_tile_##type##_##dir##_2,               \
        vnni_tile_##type##_##dir##_3, vnni_tile_##type##_##dir##_4,                     \
        vnni_tile_##type##_##dir##_5, vnni_tile_##type##_##dir##_6,                     \
        vnni_tile_##type##_##dir##_7, vnni_tile_##type##_##dir##_8};
VNNI_TILES(FA_Q8_0, 0)
VNNI_TILES(FA_Q4_0, 0)
VNNI_TILES(FA_Q4_1, 0)
VNNI_TILES(FA_Q8_0, 1)
VNNI_TILES(FA_Q4_0, 1)
VNNI_TILES(FA_Q4_1, 1)

/* Pointers to rows r .. r + 15 of w; past r1 the last row repeats (its lanes
 * are computed and never stored).  Returns the mask of real rows. */
static __mmask16 vnni_group_rows(const uint8_t *w, size_t rb, int64_t r, int64_t r1,
                                 const uint8_t **rows) {
    int n = r1 - r < QV_ROWS ? (int)(r1 - r) : QV_ROWS;
    for (int i = 0; i < QV_ROWS; i++) rows[i] = w + (size_t)(r + (i < n ? i : n - 1)) * rb;
    return (__mmask16)((1u << n) - 1);
}

/* The packed layout of one group, every block, into pk (the VNNI way of
 * qp_pack_groups, for a prefill over a weight without a packed copy).  Lanes
 * past the real rows repeat the last one; they are never stored. */
TVNNI static void vnni_pack(int type, const uint8_t *const *rows, int64_t nb, uint8_t *pk) {
    const size_t qb = qp_quant_bytes(type);
    uint8_t *scales = pk + (size_t)nb * qb, *mins = scales + (size_t)nb * 32;
    for (int64_t b = 0; b < nb; b++) {
        __m512i q[8];
        uint16_t hd[QV_ROWS], hm[QV_ROWS];
        vnni_gather(type, rows, b, q, hd, hm);
        for (int k = 0; k < (int)(qb / 64); k++)
            _mm512_storeu_si512((void *)(pk + (size_t)b * qb + 64 * k), q[k]);
        memcpy(scales + 32 * b, hd, 32);
        if (type == FA_Q4_1) memcpy(mins + 32 * b, hm, 32);
    }
}

/* Bytes of packed groups a tile may take: the tile stays in L2 while every
 * group of 8 x rows passes over it. */
#define QV_TILE_BYTES (384 * 1024)

/* How far ahead of its reads a thread prefetches its packed groups.  The
 * hardware prefetcher alone left a 2-thread SmolLM2 decode about 20% slower
 * (measured 8 to 24 KiB: alike within the noise of a shared machine). */
#define QP_PREFETCH_BYTES (16 * 1024)

/* --------------------------------------------------------- AMX-INT8
 *
 * On a CPU with AMX, a prefill's groups go through the tile unit: for 16 x
 * rows at a time and each block b, one tdpbsud multiplies x's 16 rows of 32
 * signed bytes (tile A) by the group's 16 weight rows of 32 unsigned values
 * (tile B, 8 rows of 64 bytes: the packed copy's lane layout, 4 values of
 * each weight row per 4 bytes) into 16 x 16 exact int32 sums, the same p[b]
 * the vpdpbusd chains make once off * neg is added; then the float work is
 * the VNNI tile's, operation for operation, so every level still agrees bit
 * for bit.  Q8_0's packed quant vectors are tile B as they are; Q4_0 and
 * Q4_1 have their nibbles split into bytes once per tile of groups (wexp)
 * and reused by every 16 x rows.  The sums of a chunk of blocks are stored
 * (cbuf, at most AMX_CHUNK_MAX blocks) and their float work runs for all 16
 * x rows at once, its 16 accumulators in registers.  Fewer than 16 x rows
 * left over take the VNNI tiles.  Linux lends a process the tile registers
 * only once it asks (arch_prctl); if the kernel refuses, or FASTATTN_NO_AMX
 * is set, or fa_q8_set_amx(0) was called, the VNNI tiles do everything. */
#if defined(__linux__) && (__GNUC__ >= 11)
#include <sys/syscall.h>
#include <unistd.h>
#define HAVE_AMX 1
#define TAMX                                                                      \
    __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512dq,"    \
                          "avx512vnni,avx2,fma,f16c")))

static int amx_state = -1;  /* -1 not asked yet, 0 no, 1 yes */
static int amx_wanted = 1;  /* fa_q8_set_amx */

/* CPUID.7.0:EDX bits 24 (AMX-TILE) and 25 (AMX-INT8), XCR0 bits 17-18 (the
 * OS saves tile state), and the kernel's leave to use it. */
static int amx_probe(void) {
    if (getenv("FASTATTN_NO_AMX")) return 0;
    unsigned a, b, c, d;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
    if (((d >> 24) & 3) != 3) return 0;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(1), "c"(0));
    if (!((c >> 27) & 1)) return 0;  /* OSXSAVE */
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if (((lo >> 17) & 3) != 3) return 0;
    const long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

static int amx_supported(void) {
    int st = __atomic_load_n(&amx_state, __ATOMIC_ACQUIRE);
    if (st < 0) {
        st = amx_probe();
        __atomic_store_n(&amx_state, st, __ATOMIC_RELEASE);
    }
    return st;
}

static int amx_usable(void) {
    return amx_supported() && __atomic_load_n(&amx_wanted, __ATOMIC_RELAXED);
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed)) amx_config;

/* Tiles: 0 and 1 the sums (16 x rows x 16 weight rows, int32), 2 and 3 x
 * (16 x 32 bytes), 4 and 5 the weights (8 x 64 bytes); two sets, so that
 * one block's product can run while the other's is stored. */
TAMX static void amx_begin(void) {
    amx_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int i = 0; i < 2; i++) {
        cfg.colsb[i] = 64, cfg.rows[i] = 16;
        cfg.colsb[2 + i] = 32, cfg.rows[2 + i] = 16;
        cfg.colsb[4 + i] = 64, cfg.rows[4 + i] = 8;
    }
    /* not _tile_loadconfig: GCC 12 dropped the zeroing of the fields the
     * intrinsic reads but does not name (seen: unused tiles left with stack
     * garbage, and ldtilecfg faulting); an "m" operand of the whole struct
     * keeps every byte written */
    __asm__ volatile("ldtilecfg %0" : : "m"(cfg));
}

TAMX static void amx_end(void) { _tile_release(); }

/* Block b of a Q4_0 / Q4_1 group's packed nibbles as tile B: 8 rows of
 * 64 bytes, row k = values 4k .. 4k + 3 of each of the 16 weight rows. */
TAMX static void amx_expand(const uint8_t *q, uint8_t *dst) {
    const __m512i lo4 = _mm512_set1_epi8(0x0f);
    for (int k = 0; k < 4; k++) {
        __m512i v = _mm512_loadu_si512((const void *)(q + 64 * k));
        _mm512_storeu_si512((void *)(dst + 64 * k), _mm512_and_si512(v, lo4));
        _mm512_storeu_si512((void *)(dst + 64 * (4 + k)),
                            _mm512_and_si512(_mm512_srli_epi32(v, 4), lo4));
    }
}

/* Blocks whose sums amx_groups stores before their float work runs: at
 * most AMX_CHUNK_MAX, so that the stored sums (1 KiB a block), the blocks'
 * weight tiles and x's 16 rows of them stay in L1 together.  A row with more
 * blocks runs them in equal chunks and carries the accumulators through
 * memory from one chunk to the next.  Measured, Q4_1 with 512 x rows on one
 * core: 1536 inputs (48 blocks) went from 174 GMAC/s unchunked to 204 in
 * chunks of 24 and 240 in chunks of 16; 576 inputs (18 blocks) ran 264
 * whole, 240 as 16 + 2. */
#define AMX_CHUNK_MAX 20

static int64_t amx_chunk(int64_t nb) {
    const int64_t n = (nb + AMX_CHUNK_MAX - 1) / AMX_CHUNK_MAX;
    return (nb + n - 1) / n;
}

/* amx_groups' scratch, 64-byte aligned: a chunk's sums (1 KiB a block), 16
 * carried accumulators (1 KiB), and the scales of the 16 x rows in hand laid
 * out block by block (d, s and off * neg: 3 x 64 bytes a block), so that
 * the float work reaches them from one pointer instead of one per x row. */
#define AMX_CBUF_BYTES(nb) ((size_t)amx_chunk(nb) * 1024 + 1024 + (size_t)(nb) * 192)

/* The float work of the VNNI tile on stored sums, for 16 x rows and blocks
 * [b0, b1): sums cb[b - b0][t][16], x scales xd, xs, xn [b][t].  The
 * accumulators start at zero for b0 = 0 and go to y (rows t * ldy) after the
 * row's last block; otherwise they come from and go to carry. */
TAMX static inline __attribute__((always_inline)) void amx_finish(
    int type, const uint8_t *scales, const uint8_t *mins, const int32_t *cb, const float *xd,
    const float *xs, const int32_t *xn, int64_t nb, int64_t b0, int64_t b1, float *y,
    int64_t ldy, int64_t r, __mmask16 lanes, float *carry) {
    const int off = q8_offset(type);
    __m512 acc[16];
#pragma GCC unroll 16
    for (int t = 0; t < 16; t++)
        acc[t] = b0 ? _mm512_load_ps(carry + 16 * t) : _mm512_setzero_ps();
    for (int64_t b = b0; b < b1; b++) {
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scales + 32 * b)));
        const __m512 mw = type == FA_Q4_1
            ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(mins + 32 * b)))
            : _mm512_setzero_ps();
        const int32_t *cbb = cb + (b - b0) * 256, *nbb = xn + 16 * b;
        const float *db = xd + 16 * b, *sb = xs + 16 * b;
#pragma GCC unroll 16
        for (int t = 0; t < 16; t++) {
            __m512i p = _mm512_load_si512((const void *)(cbb + 16 * t));
            if (off) p = _mm512_add_epi32(p, _mm512_set1_epi32(nbb[t]));
            __m512 dd = _mm512_mul_ps(dw, _mm512_set1_ps(db[t]));
            acc[t] = _mm512_fmadd_ps(dd, _mm512_cvtepi32_ps(p), acc[t]);
            if (type == FA_Q4_1) acc[t] = _mm512_fmadd_ps(mw, _mm512_set1_ps(sb[t]), acc[t]);
        }
    }
    if (b1 < nb) {
#pragma GCC unroll 16
        for (int t = 0; t < 16; t++) _mm512_store_ps(carry + 16 * t, acc[t]);
        return;
    }
#pragma GCC unroll 16
    for (int t = 0; t < 16; t++) _mm512_mask_storeu_ps(y + t * ldy + r, lanes, acc[t]);
}

#define AMX_FINISH(type)                                                                  \
    TAMX static void amx_finish_##type(const uint8_t *scales, const uint8_t *mins,         \
                                       const int32_t *cb, const float *xd, const float *xs, \
                                       const int32_t *xn, int64_t nb, int64_t b0,          \
                                       int64_t b1, float *y, int64_t ldy, int64_t r,       \
                                       __mmask16 lanes, float *carry) {                    \
        amx_finish(type, scales, mins, cb, xd, xs, xn, nb, b0, b1, y, ldy, r, lanes,       \
                   carry);                                                                \
    }
AMX_FINISH(FA_Q8_0)
AMX_FINISH(FA_Q4_0)
AMX_FINISH(FA_Q4_1)

/* x rows [0, n_tok) (n_tok a multiple of 16) against the packed groups
 * [g0, g1) at pk (group g holds rows row0 + 16 g ..), y rows [r0, r1) only.
 * wexp: (g1 - g0) * nb * 512 bytes for Q4 types; cbuf: AMX_CBUF_BYTES(nb),
 * 64-byte aligned. */
TAMX static void amx_groups(int type, const uint8_t *pk, size_t gb, int64_t row0, int64_t r0,
                            int64_t r1, int64_t g0, int64_t g1, const q8_act *x,
                            int64_t n_tok, float *y, int64_t ldy, uint8_t *wexp,
                            int32_t *cbuf, const char *pf, size_t pf_bytes) {
    const int64_t nb = x->nb, n_in = x->n_in;
    const size_t qb = qp_quant_bytes(type);
    void (*finish)(const uint8_t *, const uint8_t *, const int32_t *, const float *,
                   const float *, const int32_t *, int64_t, int64_t, int64_t, float *, int64_t,
                   int64_t, __mmask16, float *) =
        type == FA_Q8_0 ? amx_finish_FA_Q8_0 : type == FA_Q4_0 ? amx_finish_FA_Q4_0
                                                                : amx_finish_FA_Q4_1;

    /* split the tile's nibbles once, asking for the next tile's bytes meanwhile */
    if (type != FA_Q8_0) {
        const size_t step = (pf_bytes / (size_t)(g1 - g0) + 63) & ~(size_t)63;
        for (int64_t g = g0; g < g1; g++) {
            const size_t o0 = (size_t)(g - g0) * step, o1 = o0 + step;
            for (size_t o = o0; o < o1 && o < pf_bytes; o += 64)
                _mm_prefetch(pf + o, FA_PREFETCH_STREAM);
            for (int64_t b = 0; b < nb; b++)
                amx_expand(pk + (size_t)g * gb + (size_t)b * qb,
                           wexp + ((size_t)(g - g0) * nb + b) * 512);
        }
    }
    const int64_t chunk = amx_chunk(nb);
    const int off = q8_offset(type);
    float *carry = (float *)(cbuf + chunk * 256);
    float *xd = carry + 256, *xs = xd + nb * 16;
    int32_t *xn = (int32_t *)(xs + nb * 16);
    for (int64_t tc = 0; tc < n_tok; tc += 16) {
        const int8_t *xq = x->q + tc * n_in;
        for (int64_t b = 0; b < nb; b++)
            for (int t = 0; t < 16; t++) {
                const int64_t xb = (tc + t) * nb + b;
                xd[16 * b + t] = x->d[xb];
                xs[16 * b + t] = x->s[xb];
                xn[16 * b + t] = off ? off * x->neg[xb] : 0;
            }
        for (int64_t g = g0; g < g1; g++) {
            const int64_t gr = row0 + g * QV_ROWS;
            const uint8_t *grp = pk + (size_t)g * gb;
            const uint8_t *wb = type == FA_Q8_0 ? grp : wexp + (size_t)(g - g0) * nb * 512;
            const size_t wstride = type == FA_Q8_0 ? qb : 512;

            int lo = (int)((r0 > gr ? r0 : gr) - gr);
            int hi = (int)((r1 < gr + QV_ROWS ? r1 : gr + QV_ROWS) - gr);
            __mmask16 lanes = (__mmask16)(((1u << hi) - 1) & ~((1u << lo) - 1));
            const uint8_t *scales = grp + (size_t)nb * qb, *mins = scales + (size_t)nb * 32;
            for (int64_t b0 = 0; b0 < nb; b0 += chunk) {
                const int64_t b1 = b0 + chunk < nb ? b0 + chunk : nb;
                /* the exact sums of the chunk's blocks, two at a time */
                int64_t b = b0;
                for (; b + 2 <= b1; b += 2) {
                    _tile_zero(0);
                    _tile_zero(1);
                    _tile_loadd(2, xq + b * FA_QK, n_in);
                    _tile_loadd(4, wb + (size_t)b * wstride, 64);
                    _tile_loadd(3, xq + (b + 1) * FA_QK, n_in);
                    _tile_loadd(5, wb + (size_t)(b + 1) * wstride, 64);
                    _tile_dpbsud(0, 2, 4);
                    _tile_dpbsud(1, 3, 5);
                    _tile_stored(0, cbuf + (b - b0) * 256, 64);
                    _tile_stored(1, cbuf + (b + 1 - b0) * 256, 64);
                }
                if (b < b1) {
                    _tile_zero(0);
                    _tile_loadd(2, xq + b * FA_QK, n_in);
                    _tile_loadd(4, wb + (size_t)b * wstride, 64);
                    _tile_dpbsud(0, 2, 4);
                    _tile_stored(0, cbuf + (b - b0) * 256, 64);
                }
                /* then their float work */
                finish(scales, mins, cbuf, xd, xs, xn, nb, b0, b1, y + tc * ldy, ldy, gr, lanes,
                       carry);
            }
        }
    }
}
#endif

/* Rows [r0, r1) of y from packed groups at pk, the first holding rows row0 ..
 * row0 + 15 (row0 <= r0): tiles of groups, each passed by every 8 x rows.
 * Known shortcoming: a group that straddles r0 or r1 (a thread share not on
 * a multiple of 16 rows) is computed whole by both threads and stored in part. */
TVNNI static void vnni_run_packed(int type, const uint8_t *pk, int64_t row0, int64_t r0,
                                  int64_t r1, const q8_act *x, int64_t n_seq, float *y,
                                  int64_t ldy, int64_t r_pf) {
    const vnni_tile_fn *tiles = type == FA_Q8_0   ? vnni_tiles_FA_Q8_0_0
                                : type == FA_Q4_0 ? vnni_tiles_FA_Q4_0_0
                                                  : vnni_tiles_FA_Q4_1_0;
    const size_t gb = qp_group_bytes(type, x->nb);
    const int64_t g_first = (r0 - row0) / QV_ROWS, g_end = (r1 - row0 + QV_ROWS - 1) / QV_ROWS;
    const int64_t g_pf = (r_pf - row0 + QV_ROWS - 1) / QV_ROWS;  /* prefetch up to here */
    int64_t tile = (int64_t)(QV_TILE_BYTES / gb);
    if (tile < 1) tile = 1;
#ifdef HAVE_AMX
    /* whole blocks of 16 x rows through the tile unit (see amx_groups) */
    int amx = n_seq >= 16 && amx_usable();
    uint8_t *wexp = NULL;
    int32_t *cbuf = NULL;
    if (amx) {
        cbuf = aligned_alloc(64, AMX_CBUF_BYTES(x->nb));
        if (type != FA_Q8_0) wexp = aligned_alloc(64, (size_t)tile * (size_t)x->nb * 512);
        amx = cbuf && (type == FA_Q8_0 || wexp);
        if (amx) amx_begin();
    }
#endif
    for (int64_t g0 = g_first; g0 < g_end; g0 += tile) {
        int64_t g1 = g0 + tile < g_end ? g0 + tile : g_end;
        int64_t t_first = 0;  /* x rows the VNNI tiles start at */
#ifdef HAVE_AMX
        if (amx) {
            t_first = n_seq / 16 * 16;
            const size_t from = (size_t)g1 * gb, to = (size_t)(g1 + (g1 - g0)) * gb;
            const size_t limit = (size_t)g_pf * gb;
            const size_t pf_bytes = from >= limit ? 0 : (to < limit ? to : limit) - from;
            amx_groups(type, pk, gb, row0, r0, r1, g0, g1, x, t_first, y, ldy, wexp, cbuf,
                       (const char *)(pk + from), pf_bytes);
        }
#endif
        for (int64_t t0 = t_first; t0 < n_seq; t0 += QV_T) {
            int nt = n_seq - t0 < QV_T ? (int)(n_seq - t0) : QV_T;
            for (int64_t g = g0; g < g1; g++) {
                const int64_t gr = row0 + g * QV_ROWS;
                int lo = (int)((r0 > gr ? r0 : gr) - gr);
                int hi = (int)((r1 < gr + QV_ROWS ? r1 : gr + QV_ROWS) - gr);
                __mmask16 lanes = (__mmask16)(((1u << hi) - 1) & ~((1u << lo) - 1));
                /* the group's share of the prefetching: gb bytes, QP_PREFETCH_BYTES
                 * ahead, not past group g_pf */
                const size_t here = (size_t)g * gb, end = (size_t)g_pf * gb;
                const size_t ahead = here + QP_PREFETCH_BYTES;
                size_t pf_bytes = ahead >= end ? 0 : end - ahead < gb ? end - ahead : gb;
                tiles[nt](pk + here, NULL, gr, lanes, x, t0, y, ldy, (const char *)(pk + ahead),
                          t0 == 0 ? pf_bytes : 0);
            }
        }
    }
#ifdef HAVE_AMX
    if (amx) amx_end();
    free(cbuf);
    free(wexp);
#endif
}

/* Ask for rows r .. r + 15 (those below r1) to come into cache.  The kernels
 * read 16 rows side by side, a pattern the hardware prefetcher follows
 * poorly, so each group asks for the one QV_PREFETCH groups ahead. */
#define QV_PREFETCH 2
static inline void vnni_prefetch_rows(const uint8_t *w, size_t rb, int64_t r, int64_t r1) {
    if (r >= r1) return;
    const char *p = (const char *)(w + (size_t)r * rb);
    size_t bytes = (size_t)(r1 - r < QV_ROWS ? r1 - r : QV_ROWS) * rb;
    for (size_t o = 0; o < bytes; o += 64) _mm_prefetch(p + o, FA_PREFETCH_STREAM);
}

TVNNI static void vnni_run(int type, const uint8_t *w, size_t rb, const uint8_t *pk,
                           int64_t r0, int64_t r1, const q8_act *x, int64_t n_seq, float *y,
                           int64_t ldy, int64_t r_pf) {
    /* the model's packed copy: nothing to rearrange */
    if (pk) {
        vnni_run_packed(type, pk, 0, r0, r1, x, n_seq, y, ldy, r_pf);
        return;
    }
    const int64_t nb = x->nb;
    const size_t gb = qp_group_bytes(type, nb);
    const int64_t n_groups = (r1 - r0 + QV_ROWS - 1) / QV_ROWS;
    const uint8_t *rows[QV_ROWS];

    /* without one, a prefill packs a tile of its rows at a time (packing pays
     * off once several x rows read it); without memory for that, or for a
     * decode, the same numbers come from the rows as they are */
    int64_t tile = (int64_t)(QV_TILE_BYTES / gb);
    if (tile < 1) tile = 1;
    if (tile > n_groups) tile = n_groups;
    uint8_t *buf = n_seq >= QV_T ? malloc((size_t)tile * gb) : NULL;
    if (!buf) {
        const vnni_tile_fn *direct = type == FA_Q8_0   ? vnni_tiles_FA_Q8_0_1
                                     : type == FA_Q4_0 ? vnni_tiles_FA_Q4_0_1
                                                       : vnni_tiles_FA_Q4_1_1;
        for (int64_t r = r0; r < r1; r += QV_ROWS) {
            __mmask16 lanes = vnni_group_rows(w, rb, r, r1, rows);
            const int64_t rp = r + QV_PREFETCH * QV_ROWS;
            const char *pf = (const char *)(w + (size_t)rp * rb);
            size_t pf_bytes =
                rp < r_pf ? (size_t)(r_pf - rp < QV_ROWS ? r_pf - rp : QV_ROWS) * rb : 0;
            for (int64_t t0 = 0; t0 < n_seq; t0 += QV_T) {
                int nt = n_seq - t0 < QV_T ? (int)(n_seq - t0) : QV_T;
                direct[nt](NULL, rows, r, lanes, x, t0, y, ldy, pf, t0 ? 0 : pf_bytes);
            }
        }
        return;
    }
    for (int64_t g0 = 0; g0 < n_groups; g0 += tile) {
        int64_t g1 = g0 + tile < n_groups ? g0 + tile : n_groups;
        for (int64_t g = g0; g < g1; g++) {
            vnni_prefetch_rows(w, rb, r0 + (g + QV_PREFETCH) * QV_ROWS, r1);
            vnni_group_rows(w, rb, r0 + g * QV_ROWS, r1, rows);
            vnni_pack(type, rows, nb, buf + (size_t)(g - g0) * gb);
        }
        const int64_t row0 = r0 + g0 * QV_ROWS;
        const int64_t end = r0 + g1 * QV_ROWS < r1 ? r0 + g1 * QV_ROWS : r1;
        vnni_run_packed(type, buf, row0, row0, end, x, n_seq, y, ldy, end);
    }
    free(buf);
}

/* The generic quantizer's numbers, 16 values at a time.  The max of |x| is
 * taken on the bit patterns: without the sign bit, integer order is float
 * order, with NaN above inf above every finite value, so it is the float max
 * and a NaN sticks as in generic_quantize.  d and 1 / d are the same scalar
 * divisions, cvtps rounds to nearest even as nearbyintf does, and the integer
 * sum is exact in any order. */
TVNNI static void avx512_quantize(const float *x, int64_t nb, int8_t *q, float *d, float *s,
                                  int32_t *neg) {
    const __m512i abs_bits = _mm512_set1_epi32(0x7fffffff);
    for (int64_t b = 0; b < nb; b++) {
        __m512 x0 = _mm512_loadu_ps(x + b * FA_QK);
        __m512 x1 = _mm512_loadu_ps(x + b * FA_QK + 16);
        __m512i a = _mm512_max_epi32(_mm512_and_si512(_mm512_castps_si512(x0), abs_bits),
                                     _mm512_and_si512(_mm512_castps_si512(x1), abs_bits));
        int32_t amax_bits = _mm512_reduce_max_epi32(a);
        float amax;
        memcpy(&amax, &amax_bits, sizeof amax);
        float db = amax / 127.0f;
        float id = db != 0.0f ? 1.0f / db : 0.0f;
        int sum = 0;
        if (q8_block_zero(amax, id)) {
            memset(q + b * FA_QK, 0, FA_QK);
        } else {
            __m512 vid = _mm512_set1_ps(id);
            __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, vid));
            __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, vid));
            _mm_storeu_si128((__m128i *)(q + b * FA_QK), _mm512_cvtepi32_epi8(q0));
            _mm_storeu_si128((__m128i *)(q + b * FA_QK + 16), _mm512_cvtepi32_epi8(q1));
            sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
        }
        d[b] = db;
        s[b] = db * (float)sum;
        if (neg) neg[b] = -sum;
    }
}
#define HAVE_X86_Q8 1
#endif

void fa_q8_set_amx(int on) {
#ifdef HAVE_AMX
    __atomic_store_n(&amx_wanted, on ? 1 : 0, __ATOMIC_RELAXED);
#else
    (void)on;
#endif
}

int fa_q8_amx_in_use(void) {
#ifdef HAVE_AMX
    return amx_usable();
#else
    return 0;
#endif
}

int fa_q8_amx_available(void) {
#ifdef HAVE_AMX
    return amx_supported();
#else
    return 0;
#endif
}

/* ------------------------------------------------------------ dispatch */

typedef struct {
    q8_run_fn run;
    q8_quant_fn quantize;
} q8_kernels;

static const q8_kernels q8_generic = {generic_run, generic_quantize};
#ifdef HAVE_X86_Q8
static const q8_kernels q8_avx2 = {avx2_run, generic_quantize};
static const q8_kernels q8_vnni = {vnni_run, avx512_quantize};
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

int fa_q8_pack_wanted(int type) {
#ifdef HAVE_X86_Q8
    return fa_act_q8_supports(type) && q8_current() == &q8_vnni;
#else
    (void)type;
    return 0;
#endif
}

void fa_quantize_act_q8(const float *x, int64_t n, int8_t *q, float *d, float *s) {
    if (!x || !q || !d || !s || n <= 0 || n % FA_QK) return;
    q8_current()->quantize(x, n / FA_QK, q, d, s, NULL);
}

/* Bytes one quantized row of n_in values takes in the scratch buffer. */
static size_t q8_row_bytes(int64_t n_in) {
    return (size_t)n_in + 3 * sizeof(float) * (size_t)(n_in / FA_QK);
}

/* Quantized rows (fa_q8_quantize_rows): d, s and neg [n_seq][nb] each, then
 * q [n_seq][n_in]; the layout of the product's scratch copy too. */
static q8_act q8_rows_view(const void *rows, int64_t n_in, int64_t n_seq) {
    const int64_t nb = n_in / FA_QK;
    const float *d = (const float *)rows, *s = d + n_seq * nb;
    const int32_t *neg = (const int32_t *)(s + n_seq * nb);
    const q8_act xa = {n_in, nb, (const int8_t *)(neg + n_seq * nb), d, s, neg};
    return xa;
}

size_t fa_q8_rows_bytes(int64_t n_seq, int64_t n_in) {
    if (n_seq <= 0 || n_in <= 0 || n_in % FA_QK) return 0;
    const size_t rb = q8_row_bytes(n_in);
    return (size_t)n_seq > SIZE_MAX / rb ? 0 : (size_t)n_seq * rb;
}

void fa_q8_quantize_rows(const float *x, int64_t n_in, int64_t n_seq, int64_t t0, int64_t t1,
                         void *rows) {
    if (!x || !rows || fa_q8_rows_bytes(n_seq, n_in) == 0 || t0 < 0 || t1 > n_seq) return;
    const q8_kernels *k = q8_current();
    const q8_act xa = q8_rows_view(rows, n_in, n_seq);
    const int64_t nb = xa.nb;
    for (int64_t t = t0; t < t1; t++)
        k->quantize(x + t * n_in, nb, (int8_t *)xa.q + t * n_in, (float *)xa.d + t * nb,
                    (float *)xa.s + t * nb, (int32_t *)xa.neg + t * nb);
}

void fa_q8_quantize_cols(const float *x, int64_t n_in, int64_t n_seq, int64_t b0, int64_t b1,
                         void *rows) {
    if (!x || !rows || fa_q8_rows_bytes(n_seq, n_in) == 0 || b0 < 0 || b1 > n_in / FA_QK
        || b0 >= b1)
        return;
    const q8_kernels *k = q8_current();
    const q8_act xa = q8_rows_view(rows, n_in, n_seq);
    const int64_t nb = xa.nb;
    for (int64_t t = 0; t < n_seq; t++)
        k->quantize(x + t * n_in + b0 * FA_QK, b1 - b0, (int8_t *)xa.q + t * n_in + b0 * FA_QK,
                    (float *)xa.d + t * nb + b0, (float *)xa.s + t * nb + b0,
                    (int32_t *)xa.neg + t * nb + b0);
}

/* 1 if the q8 kernels take w (else its products take the float path). */
static int q8_takes(const fa_weight *w) {
    size_t rb = fa_row_bytes(w->type, w->n_in);
    return fa_act_q8_supports(w->type) && rb != 0 && rb == w->row_bytes;
}

/* What both products check first: 1 if this thread has q8 work; 0 after
 * bad arguments, for no rows, or once the float path has taken a weight the
 * q8 kernels do not (float types stay exact).  [*r0, *r1): its rows. */
static int q8_starts(const fa_weight *w, const float *x, float *y, int64_t n_seq, int ith,
                     int nth, int64_t *r0, int64_t *r1) {
    if (!w || !w->data || !x || !y || n_seq <= 0 || w->n_out <= 0 || w->n_in <= 0) return 0;
    if (!q8_takes(w)) {
        fa_matmul(w, x, y, n_seq, ith, nth);
        return 0;
    }
    fa_share(w->n_out, ith, nth, r0, r1);
    return *r0 < *r1;
}

void fa_matmul_q8_rows(const fa_weight *w, const void *rows, const float *x, float *y,
                       int64_t n_seq, int ith, int nth) {
    int64_t r0, r1;
    if (!rows || !q8_starts(w, x, y, n_seq, ith, nth, &r0, &r1)) return;
    const q8_act xa = q8_rows_view(rows, w->n_in, n_seq);
    q8_current()->run(w->type, (const uint8_t *)w->data, w->row_bytes,
                      (const uint8_t *)w->packed_q8, r0, r1, &xa, n_seq, y, w->n_out, r1);
}

void fa_matmul_q8(const fa_weight *w, const float *x, float *y, int64_t n_seq, int ith,
                  int nth) {
    int64_t r0, r1;
    if (!q8_starts(w, x, y, n_seq, ith, nth, &r0, &r1)) return;

    /* this thread's copy of x, quantized; a decode row fits on the stack */
    float stack_buf[2048];
    void *buf = stack_buf;
    const size_t bytes = fa_q8_rows_bytes(n_seq, w->n_in);
    if (bytes == 0) buf = NULL;
    else if (bytes > sizeof stack_buf) buf = malloc(bytes);
    if (!buf) {
        /* Known shortcoming: with no memory for the scratch copy this call
         * falls back to the exact float path rather than failing. */
        fa_matmul(w, x, y, n_seq, ith, nth);
        return;
    }
    fa_q8_quantize_rows(x, w->n_in, n_seq, 0, n_seq, buf);
    fa_matmul_q8_rows(w, buf, x, y, n_seq, ith, nth);
    if (buf != stack_buf) free(buf);
}

size_t fa_matmul_region(int act, const fa_weight *w, int ith, int nth, const void **start) {
    int64_t r0, r1;
    fa_matmul_share(act, w, ith, nth, &r0, &r1);  /* the rows fa_matmul_act computes */
    return fa_matmul_region_rows(act, w, r0, r1, start);
}

size_t fa_prepare_bytes(int64_t n_seq, int64_t n_in) {
    /* the q8 rows; the block sums ([n_seq][nb] floats) take less */
    return fa_q8_rows_bytes(n_seq, n_in);
}

void fa_matmul_prepare(fa_prepared *p, int act, const float *x, int64_t n_seq, int64_t n_in,
                       void *scratch) {
    const fa_prepared none = {act, x, n_seq, n_in, NULL, NULL};
    *p = none;
    if (!x || !scratch || fa_prepare_bytes(n_seq, n_in) == 0) return;
    if (act == FA_ACT_Q8) {
        fa_q8_quantize_rows(x, n_in, n_seq, 0, n_seq, scratch);
        p->xq = scratch;
    } else {
        const int64_t nb = n_in / FA_QK;
        for (int64_t t = 0; t < n_seq; t++)
            fa_block_sums(x + t * n_in, nb, (float *)scratch + t * nb);
        p->sx = (const float *)scratch;
    }
}

void fa_matmul_range(const fa_prepared *p, const fa_weight *w, float *y, int64_t r0,
                     int64_t r1, int64_t r_pf) {
    if (!p || !p->x || !w || !w->data || !y || p->n_seq <= 0 || w->n_in != p->n_in
        || r0 < 0 || r1 > w->n_out || r0 >= r1)
        return;
    if (p->act == FA_ACT_Q8 && q8_takes(w)) {
        /* x quantized by fa_matmul_prepare, or here if it had no scratch */
        const void *xq = p->xq;
        void *own = NULL;
        if (!xq) {
            const size_t bytes = fa_q8_rows_bytes(p->n_seq, p->n_in);
            if (!bytes || !(own = malloc(bytes))) {
                /* as in fa_matmul_q8: without memory, the exact float path */
                fa_matmul_f32_range(w, p->x, NULL, y, p->n_seq, r0, r1);
                return;
            }
            fa_q8_quantize_rows(p->x, p->n_in, p->n_seq, 0, p->n_seq, own);
            xq = own;
        }
        const q8_act xa = q8_rows_view(xq, w->n_in, p->n_seq);
        if (r_pf < r1) r_pf = r1;
        if (r_pf > w->n_out) r_pf = w->n_out;
        q8_current()->run(w->type, (const uint8_t *)w->data, w->row_bytes,
                          (const uint8_t *)w->packed_q8, r0, r1, &xa, p->n_seq, y, w->n_out,
                          r_pf);
        free(own);
        return;
    }
    fa_matmul_f32_range(w, p->x, w->type == FA_Q4_1 ? p->sx : NULL, y, p->n_seq, r0, r1);
}

int64_t fa_matmul_unit_rows(int act, const fa_weight *w) {
    if (act == FA_ACT_Q8 && q8_takes(w)) return QP_ROWS;
    if (w->packed) return FA_PANEL * fa_packed_decode_panels();
    return 16;
}

size_t fa_matmul_region_rows(int act, const fa_weight *w, int64_t r0, int64_t r1,
                             const void **start) {
    *start = NULL;
    if (!w || !w->data || w->n_out <= 0 || w->n_in <= 0 || r0 < 0 || r1 > w->n_out
        || r0 >= r1)
        return 0;
    const int q8 = act == FA_ACT_Q8 && q8_takes(w);
    const uint8_t *copy = q8 ? (const uint8_t *)w->packed_q8 : (const uint8_t *)w->packed;
    if (!copy) {
        *start = (const uint8_t *)w->data + (size_t)r0 * w->row_bytes;
        return (size_t)(r1 - r0) * w->row_bytes;
    }
    /* both packed copies hold groups (panels) of 16 rows */
    const size_t gb = q8 ? qp_group_bytes(w->type, w->n_in / FA_QK)
                         : fa_panel_bytes(w->type, w->n_in);
    if (gb == 0) return 0;
    const int64_t g0 = r0 / 16, g1 = (r1 + 15) / 16;
    *start = copy + (size_t)g0 * gb;
    return (size_t)(g1 - g0) * gb;
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
    n_threads = fa_team_threads(n_threads);
#ifdef _OPENMP
#pragma omp parallel num_threads(n_threads)
    fa_matmul_act(act, w, x, y, n_seq, omp_get_thread_num(), omp_get_num_threads());
#else
    fa_matmul_act(act, w, x, y, n_seq, 0, 1);
#endif
}
