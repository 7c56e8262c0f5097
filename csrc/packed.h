/*
 * Panel-packed weights: the layout, and the per-SIMD-level kernel table that
 * reads it.  Private to csrc/packed*.c.
 *
 * A weight [n_out, n_in] is cut into panels of FA_PANEL = 16 consecutive rows
 * (the last one padded with zero rows).  Inside a panel the 16 rows are
 * interleaved so that one vector load gives the same column k of all 16 rows:
 * a product then runs down k with one vector lane per output row, and each
 * output is a single chain of fused multiply-adds in k order.  That chain is
 * the same whether one token or many pass over the panel, and whatever the
 * vector width, which is what keeps prefill == decode (and every SIMD level)
 * bit for bit.
 *
 * Per panel, in k order:
 *   F32        [n_in][16] float32
 *   F16, BF16  [n_in][16] 16-bit values
 *   Q8_0       per 32-column block: d[16] f16, then 8 groups of [16] 4-byte
 *              words; group g, lane r holds row r's columns 4g .. 4g+3 of the
 *              block, column 4g + j in byte j (a signed 8-bit q)
 *   Q4_0       per block: d[16] f16, then 4 groups of [16] uint32
 *   Q4_1       per block: d[16] f16, m[16] f16, then 4 groups of [16] uint32
 * In the 4-bit types, group g, lane r holds row r's columns 8g .. 8g+7 of the
 * block, column 8g + j in bits 4j .. 4j+3.
 *
 * Arithmetic of one output y = row . x (fma is fused, exactly rounded):
 *   float types   y = 0;  y = fma(w[k], x[k], y)  for k = 0 .. n_in - 1
 *   block types   y = 0;  for each block b:
 *                   a = v[0] x[0];  a = fma(v[j], x[j], a)  j = 1 .. 31
 *                   y = fma(d, a, y)                    (v = q, or nibble - 8 for Q4_0)
 *                   Q4_1 only: y = fma(m, sx[b], y)     (v = nibble)
 *   sx[b] is the block's sum of x in the fixed tree order of fa_block_sums.
 */
#ifndef FA_PACKED_H
#define FA_PACKED_H

#include "fa_internal.h"

#define FA_PANEL 16

/* Largest n_in / 32 fa_pack_weight takes for Q4_1: the block sums of a
 * token then fit the driver's stack buffer. */
#define FA_PACK_MAX_BLOCKS 8192

/* Bytes of one packed panel, 0 if the type is unknown or n_in unusable. */
size_t fa_panel_bytes(int type, int64_t n_in);

/* sx[b] = sum of x[32 b .. 32 b + 31] for b < nb, in this fixed order:
 * s16[i] = x[i] + x[i+16]; s8[i] = s16[i] + s16[i+8]; s4, s2 likewise;
 * sum = s2[0] + s2[1]. */
void fa_block_sums(const float *x, int64_t nb, float *sx);

/* Run np panels (consecutive, pb bytes apart) over nt tokens:
 *   y[t * ldy + 16 p + r] = (row r of panel p) . x[t * ldx ..]   for
 *   16 p + r < rows (rows <= 16 np: the last panel may be partly padding).
 * sx [nt, ldsx] are the tokens' block sums (Q4_1 only, else unused). */
typedef void (*fa_panel_fn)(int type, const uint8_t *w, size_t pb, int np,
                            const float *x, int64_t ldx, const float *sx, int64_t ldsx,
                            int nt, int64_t n_in, float *y, int64_t ldy, int64_t rows);

/* Optional: n_panels panels over n_tok tokens, the whole tile a prefill
 * call gives a thread; the same products as fa_panel_fn calls would give.
 * Returns 0 if it did nothing (the caller then loops over fa_panel_fn). */
typedef int (*fa_prefill_fn)(int type, const uint8_t *w, size_t pb, int64_t n_panels,
                             const float *x, int64_t ldx, const float *sx, int64_t ldsx,
                             int64_t n_tok, int64_t n_in, float *y, int64_t ldy,
                             int64_t rows);

typedef struct {
    fa_panel_fn run;
    fa_prefill_fn prefill;  /* may be NULL */
    int np_decode;    /* panels per call when nt == 1 */
    int np_prefill;   /* panels per call when nt > 1 */
    int nt_prefill;   /* most tokens per call */
    unsigned pack_types;  /* bit (1 << type) set: faster than the file layout */
} fa_panel_kernels;

/* fa_matmul for a weight whose packed field is set, and the rows it gives
 * thread ith: whole panels, split as evenly as panels allow. */
void fa_matmul_packed(const fa_weight *w, const float *x, float *y, int64_t n_seq,
                      int ith, int nth);
/* Its panels [p0, p1) for every token; sx_all, when not NULL, holds the
 * block sums of every token of x ([n_seq][n_in / 32], fa_block_sums) so that
 * a caller running several panel ranges sums x once. */
void fa_matmul_packed_panels(const fa_weight *w, const float *x, const float *sx_all,
                             float *y, int64_t n_seq, int64_t p0, int64_t p1);
void fa_packed_share(const fa_weight *w, int ith, int nth, int64_t *r0, int64_t *r1);
/* Panels one decode call of the level's kernels runs side by side. */
int fa_packed_decode_panels(void);

extern const fa_panel_kernels fa_panel_kernels_generic;
extern const fa_panel_kernels fa_panel_kernels_avx2;
extern const fa_panel_kernels fa_panel_kernels_avx512;

#endif
