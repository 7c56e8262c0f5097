/*
 * Panel-packed matrix products: packing a weight at load, the driver that
 * splits a product into panel-by-token tiles, and the portable C kernel.
 * The layout and the exact arithmetic are documented in packed.h; the AVX2
 * and AVX-512 kernels are in packed_avx2.c and packed_avx512.c.
 *
 * Why pack: the file's row-major blocks make every SIMD lane a different
 * column of one row, so each output ends in a horizontal sum, each block's
 * scales are broadcast per row, and a prefill can reuse a dequantized block
 * only across the few tokens whose accumulators fit beside it.  Interleaving
 * 16 rows puts 16 outputs in the lanes instead: the scales of 16 rows arrive
 * in one load, there is no horizontal sum, and a tile of 2 panels x 6 tokens
 * runs 12 multiply-adds per decoded weight vector.
 */
#include <math.h>
#include <stdlib.h>

#include "packed.h"
#ifdef __SSE2__
#include <immintrin.h>
#endif

/* ----------------------------------------------------------- layout */

static size_t block_bytes(int type) {
    switch (type) {
    case FA_Q8_0: return 2 * FA_PANEL + FA_QK * FA_PANEL;      /* 544 */
    case FA_Q4_0: return 2 * FA_PANEL + FA_QK * FA_PANEL / 2;  /* 288 */
    case FA_Q4_1: return 4 * FA_PANEL + FA_QK * FA_PANEL / 2;  /* 320 */
    default: return 0;
    }
}

size_t fa_panel_bytes(int type, int64_t n_in) {
    if (n_in <= 0 || n_in > (int64_t)1 << 40) return 0;
    switch (type) {
    case FA_F32: return (size_t)n_in * FA_PANEL * 4;
    case FA_F16:
    case FA_BF16: return (size_t)n_in * FA_PANEL * 2;
    case FA_Q8_0:
    case FA_Q4_0:
    case FA_Q4_1:
        if (n_in % FA_QK || n_in / FA_QK > FA_PACK_MAX_BLOCKS) return 0;
        return (size_t)(n_in / FA_QK) * block_bytes(type);
    default: return 0;
    }
}

size_t fa_packed_bytes(const fa_weight *w) {
    if (!w || !w->data || w->n_out <= 0 || w->n_in <= 0) return 0;
    if (w->row_bytes == 0 || w->row_bytes != fa_row_bytes(w->type, w->n_in)) return 0;
    size_t pb = fa_panel_bytes(w->type, w->n_in), total;
    size_t n_panels = (size_t)((w->n_out + FA_PANEL - 1) / FA_PANEL);
    if (pb == 0 || __builtin_mul_overflow(pb, n_panels, &total)) return 0;
    return total;
}

/* Pack rows r0 .. r0 + 15 (rows past n_out read as zero) into one panel. */
static void pack_panel(const fa_weight *w, int64_t r0, uint8_t *dst) {
    const uint8_t *src = (const uint8_t *)w->data;
    const int64_t n_in = w->n_in;
    const size_t pb = fa_panel_bytes(w->type, n_in);
    memset(dst, 0, pb);
    for (int r = 0; r < FA_PANEL && r0 + r < w->n_out; r++) {
        const uint8_t *row = src + (size_t)(r0 + r) * w->row_bytes;
        if (w->type == FA_F32 || w->type == FA_F16 || w->type == FA_BF16) {
            const size_t es = w->type == FA_F32 ? 4 : 2;
            for (int64_t k = 0; k < n_in; k++)
                memcpy(dst + ((size_t)k * FA_PANEL + r) * es, row + (size_t)k * es, es);
            continue;
        }
        const size_t bb = block_bytes(w->type);
        for (int64_t b = 0; b < n_in / FA_QK; b++) {
            uint8_t *pbk = dst + (size_t)b * bb;
            if (w->type == FA_Q8_0) {
                const uint8_t *s = row + (size_t)b * FA_Q8_0_BYTES;
                memcpy(pbk + 2 * r, s, 2);
                for (int j = 0; j < FA_QK; j++)
                    pbk[2 * FA_PANEL + ((j / 4) * FA_PANEL + r) * 4 + j % 4] = s[2 + j];
                continue;
            }
            /* Q4_0: d, qs[16];  Q4_1: d, m, qs[16].  Value j < 16 is the
             * low nibble of qs[j], value j + 16 its high nibble. */
            const int q41 = w->type == FA_Q4_1;
            const uint8_t *s = row + (size_t)b * (q41 ? FA_Q4_1_BYTES : FA_Q4_0_BYTES);
            memcpy(pbk + 2 * r, s, 2);
            if (q41) memcpy(pbk + 2 * FA_PANEL + 2 * r, s + 2, 2);
            const uint8_t *qs = s + (q41 ? 4 : 2);
            uint8_t *groups = pbk + (q41 ? 4 : 2) * FA_PANEL;
            for (int g = 0; g < 4; g++) {
                uint32_t word = 0;
                for (int j = 0; j < 8; j++) {
                    int c = 8 * g + j;
                    uint32_t v = c < 16 ? (qs[c] & 0x0f) : (qs[c - 16] >> 4);
                    word |= v << (4 * j);
                }
                memcpy(groups + (size_t)(g * FA_PANEL + r) * 4, &word, 4);
            }
        }
    }
}

int fa_pack_weight(const fa_weight *w, void *dst, size_t dst_bytes) {
    size_t need = fa_packed_bytes(w);
    if (need == 0 || !dst || dst_bytes < need) return -1;
    const size_t pb = fa_panel_bytes(w->type, w->n_in);
    const int64_t n_panels = (w->n_out + FA_PANEL - 1) / FA_PANEL;
    for (int64_t p = 0; p < n_panels; p++)
        pack_panel(w, p * FA_PANEL, (uint8_t *)dst + (size_t)p * pb);
    return 0;
}

void fa_block_sums(const float *x, int64_t nb, float *sx) {
#ifdef __SSE2__
    /* the same tree four lanes at a time (x86-64 always has SSE2): a prefill
     * sums every token's blocks for each Q4_1 product on each thread, and the
     * scalar loop took about 3 % of an exact SmolLM2 prefill.  The same bits
     * for every input but NaNs, whose payload follows the operand order (the
     * compiler was free to swap a scalar add's operands) */
    for (int64_t b = 0; b < nb; b++) {
        const float *v = x + b * FA_QK;
        __m128 s0 = _mm_add_ps(_mm_loadu_ps(v), _mm_loadu_ps(v + 16));      /* s16[0..3] */
        __m128 s1 = _mm_add_ps(_mm_loadu_ps(v + 4), _mm_loadu_ps(v + 20));  /* s16[4..7] */
        __m128 s2 = _mm_add_ps(_mm_loadu_ps(v + 8), _mm_loadu_ps(v + 24));
        __m128 s3 = _mm_add_ps(_mm_loadu_ps(v + 12), _mm_loadu_ps(v + 28));
        __m128 s4 = _mm_add_ps(_mm_add_ps(s0, s2), _mm_add_ps(s1, s3));  /* s8, then s4 */
        __m128 t = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));                /* s2 in lanes 0, 1 */
        sx[b] = _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
    }
#else
    for (int64_t b = 0; b < nb; b++) {
        const float *v = x + b * FA_QK;
        float s[16];
        for (int i = 0; i < 16; i++) s[i] = v[i] + v[i + 16];
        for (int i = 0; i < 8; i++) s[i] = s[i] + s[i + 8];
        for (int i = 0; i < 4; i++) s[i] = s[i] + s[i + 4];
        for (int i = 0; i < 2; i++) s[i] = s[i] + s[i + 2];
        sx[b] = s[0] + s[1];
    }
#endif
}

/* ---------------------------------------------------- generic kernel */

/* Weight value of row r, column k of a panel, for the float types. */
static inline float float_at(int type, const uint8_t *w, int64_t k, int r) {
    const size_t at = (size_t)k * FA_PANEL + r;
    if (type == FA_F32) {
        float f;
        memcpy(&f, w + 4 * at, 4);
        return f;
    }
    uint16_t h = fa_read_u16(w + 2 * at);
    return type == FA_F16 ? fa_f16_table[h] : fa_bf16_to_f32(h);
}

/* The integer value of row r, column j of block blk (q, nibble or nibble - 8). */
static inline float block_value(int type, const uint8_t *blk, int j, int r) {
    if (type == FA_Q8_0)
        return (float)(int8_t)blk[2 * FA_PANEL + ((j / 4) * FA_PANEL + r) * 4 + j % 4];
    const uint8_t *groups = blk + (type == FA_Q4_1 ? 4 : 2) * FA_PANEL;
    uint32_t word;
    memcpy(&word, groups + (size_t)((j / 8) * FA_PANEL + r) * 4, 4);
    int v = (int)((word >> (4 * (j % 8))) & 0x0f);
    return (float)(type == FA_Q4_0 ? v - 8 : v);
}

/* Known shortcoming: fmaf is what makes this level agree with the SIMD ones
 * bit for bit; on an x86 CPU without FMA it is a slow library call. */
static void generic_run(int type, const uint8_t *w, size_t pb, int np, const float *x,
                        int64_t ldx, const float *sx, int64_t ldsx, int nt, int64_t n_in,
                        float *y, int64_t ldy, int64_t rows) {
    const int blocks = type == FA_Q8_0 || type == FA_Q4_0 || type == FA_Q4_1;
    const size_t bb = block_bytes(type);
    for (int p = 0; p < np; p++) {
        const uint8_t *wp = w + (size_t)p * pb;
        for (int t = 0; t < nt; t++) {
            const float *xt = x + t * ldx;
            for (int r = 0; r < FA_PANEL && 16 * p + r < rows; r++) {
                float acc = 0.0f;
                if (!blocks) {
                    for (int64_t k = 0; k < n_in; k++)
                        acc = fmaf(float_at(type, wp, k, r), xt[k], acc);
                } else {
                    for (int64_t b = 0; b < n_in / FA_QK; b++) {
                        const uint8_t *blk = wp + (size_t)b * bb;
                        const float *xb = xt + b * FA_QK;
                        float a = block_value(type, blk, 0, r) * xb[0];
                        for (int j = 1; j < FA_QK; j++)
                            a = fmaf(block_value(type, blk, j, r), xb[j], a);
                        acc = fmaf(fa_f16_table[fa_read_u16(blk + 2 * r)], a, acc);
                        if (type == FA_Q4_1)
                            acc = fmaf(fa_f16_table[fa_read_u16(blk + 2 * FA_PANEL + 2 * r)],
                                       sx[t * ldsx + b], acc);
                    }
                }
                y[t * ldy + 16 * p + r] = acc;
            }
        }
    }
}

/* Never faster than the file-layout C kernels: nothing is packed for it. */
const fa_panel_kernels fa_panel_kernels_generic = {generic_run, NULL, 1, 1, 1, 0};

/* ------------------------------------------------------------ driver */

static const fa_panel_kernels *panel_kernels(void) {
    switch (fa_simd_level()) {
    case FA_SIMD_AVX512: return &fa_panel_kernels_avx512;
    case FA_SIMD_AVX2: return &fa_panel_kernels_avx2;
    default: return &fa_panel_kernels_generic;
    }
}

/* Packed weight bytes one tile of panels may take: it stays in L2 while
 * every group of tokens passes over it. */
#define PANEL_TILE_BYTES (256 * 1024)

void fa_matmul_packed(const fa_weight *w, const float *x, float *y, int64_t n_seq,
                      int ith, int nth) {
    int64_t p0, p1;
    fa_share((w->n_out + FA_PANEL - 1) / FA_PANEL, ith, nth, &p0, &p1);
    fa_matmul_packed_panels(w, x, NULL, y, n_seq, p0, p1);
}

void fa_matmul_packed_panels(const fa_weight *w, const float *x, const float *sx_all,
                             float *y, int64_t n_seq, int64_t p0, int64_t p1) {
    const fa_panel_kernels *k = panel_kernels();
    const int type = w->type;
    const int64_t n_in = w->n_in, n_out = w->n_out, nb = n_in / FA_QK;
    const size_t pb = fa_panel_bytes(type, n_in);
    const uint8_t *base = (const uint8_t *)w->packed;
    if (p0 < 0 || p0 >= p1 || p1 > (n_out + FA_PANEL - 1) / FA_PANEL || pb == 0) return;

    /* Q4_1's block sums of x, given for every token, or computed here for as
     * many tokens as fit at a time (nb <= FA_PACK_MAX_BLOCKS, so at least one
     * does) */
    float sx_buf[FA_PACK_MAX_BLOCKS];
    const int q41 = type == FA_Q4_1;
    const int64_t group = q41 && !sx_all ? FA_PACK_MAX_BLOCKS / nb : n_seq;

    int64_t tile = (int64_t)(PANEL_TILE_BYTES / pb);
    tile -= tile % k->np_prefill;
    if (tile < k->np_prefill) tile = k->np_prefill;

    for (int64_t g0 = 0; g0 < n_seq; g0 += group) {
        const int64_t gn = n_seq - g0 < group ? n_seq - g0 : group;
        const float *xg = x + g0 * n_in;
        float *yg = y + g0 * n_out;
        const float *sx = sx_buf;
        if (q41 && sx_all)
            sx = sx_all + g0 * nb;
        else if (q41)
            for (int64_t t = 0; t < gn; t++) fa_block_sums(xg + t * n_in, nb, sx_buf + t * nb);

        if (gn == 1) {
            for (int64_t p = p0; p < p1; p += k->np_decode) {
                int np = p1 - p < k->np_decode ? (int)(p1 - p) : k->np_decode;
                k->run(type, base + (size_t)p * pb, pb, np, xg, n_in, sx, nb, 1, n_in,
                       yg + p * FA_PANEL, n_out, n_out - p * FA_PANEL);
            }
            continue;
        }
        if (k->prefill && k->prefill(type, base + (size_t)p0 * pb, pb, p1 - p0, xg, n_in, sx,
                                     nb, gn, n_in, yg + p0 * FA_PANEL, n_out,
                                     n_out - p0 * FA_PANEL))
            continue;
        for (int64_t pt = p0; pt < p1; pt += tile) {
            const int64_t pe = pt + tile < p1 ? pt + tile : p1;
            for (int64_t t = 0; t < gn; t += k->nt_prefill) {
                int nt = gn - t < k->nt_prefill ? (int)(gn - t) : k->nt_prefill;
                for (int64_t p = pt; p < pe; p += k->np_prefill) {
                    int np = pe - p < k->np_prefill ? (int)(pe - p) : k->np_prefill;
                    k->run(type, base + (size_t)p * pb, pb, np, xg + t * n_in, n_in,
                           sx + t * nb, nb, nt, n_in, yg + t * n_out + p * FA_PANEL, n_out,
                           n_out - p * FA_PANEL);
                }
            }
        }
    }
}

int fa_packed_decode_panels(void) { return panel_kernels()->np_decode; }

int fa_pack_wanted(int type) {
    return type >= 0 && type < 32 && ((panel_kernels()->pack_types >> type) & 1);
}

void fa_packed_share(const fa_weight *w, int ith, int nth, int64_t *r0, int64_t *r1) {
    int64_t p0, p1;
    fa_share((w->n_out + FA_PANEL - 1) / FA_PANEL, ith, nth, &p0, &p1);
    *r0 = p0 * FA_PANEL < w->n_out ? p0 * FA_PANEL : w->n_out;
    *r1 = p1 * FA_PANEL < w->n_out ? p1 * FA_PANEL : w->n_out;
}
