/*
 * Row-wise kernels: norms, activations, bias, rotary embedding, attention.
 *
 *   x, y    [n_seq, n]                         activations, row-major
 *   q, out  [n_seq, n_head * head_dim]
 *   k, v    [n_kv_head, n_ctx, head_dim]       one layer's KV cache
 *
 * Every kernel does thread ith's share of nth: whole rows, a contiguous
 * range of values, whole (heads, block of queries) units for attention, or
 * (query, KV head, key chunk) units for the split attention a decode uses.  A result
 * never depends on nth.  Bad sizes make a kernel return without writing.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "fa_internal.h"
#include "model.h"

/* ---------------------------------------------------------------- norms */

/* The sum over i of (x[i] - c), or of (x[i] - c)^2 if square, in double.
 * Eight running sums (element i goes to sum i % 8), added pairwise in a fixed
 * order at the end: the same bits everywhere, whatever the compiler does with
 * the loop, and eight dependent chains of additions instead of one (a decode's
 * norm of 576 values was 2.8% of its time as one chain). */
static double sum_dev_d(const float *x, int64_t n, double c, int square) {
    double acc[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) {
            double d = (double)x[i + j] - c;
            acc[j] += square ? d * d : d;
        }
    for (int j = 0; i + j < n; j++) {
        double d = (double)x[i + j] - c;
        acc[j] += square ? d * d : d;
    }
    return ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
}

void fa_layer_norm(const float *x, const float *g, const float *b, float *y,
                   int64_t n_seq, int64_t n, float eps, int ith, int nth) {
    if (!x || !g || !y || n_seq <= 0 || n <= 0) return;
    int64_t s0, s1;
    fa_share(n_seq, ith, nth, &s0, &s1);
    for (int64_t s = s0; s < s1; s++) {
        const float *xs = x + s * n;
        float *ys = y + s * n;

        /* mean and variance, summed in double */
        double mean = sum_dev_d(xs, n, 0.0, 0) / (double)n;
        double sq = sum_dev_d(xs, n, mean, 1);
        float rstd = (float)(1.0 / sqrt(sq / (double)n + (double)eps));
        float fmean = (float)mean;

        /* normalize, scale, shift */
        for (int64_t i = 0; i < n; i++) {
            float t = (xs[i] - fmean) * rstd * g[i];
            ys[i] = b ? t + b[i] : t;
        }
    }
}

void fa_rms_norm(const float *x, const float *g, float *y,
                 int64_t n_seq, int64_t n, float eps, int ith, int nth) {
    if (!x || !g || !y || n_seq <= 0 || n <= 0) return;
    int64_t s0, s1;
    fa_share(n_seq, ith, nth, &s0, &s1);
    for (int64_t s = s0; s < s1; s++) {
        const float *xs = x + s * n;
        float *ys = y + s * n;
        double sq = sum_dev_d(xs, n, 0.0, 1);
        float scale = (float)(1.0 / sqrt(sq / (double)n + (double)eps));
        for (int64_t i = 0; i < n; i++) ys[i] = xs[i] * scale * g[i];
    }
}

/* ---------------------------------------------------------- activations */

void fa_gelu(float *x, int64_t n, int ith, int nth) {
    if (!x || n <= 0) return;
    int64_t i0, i1;
    fa_share(n, ith, nth, &i0, &i1);
    if (i1 > i0) fa_kernels_current()->gelu(x + i0, i1 - i0);
}

void fa_swiglu(float *gate, const float *up, int64_t n, int ith, int nth) {
    if (!gate || !up || n <= 0) return;
    int64_t i0, i1;
    fa_share(n, ith, nth, &i0, &i1);
    if (i1 > i0) fa_kernels_current()->swiglu(gate + i0, up + i0, i1 - i0);
}

void fa_add_bias(float *x, const float *b, int64_t n_seq, int64_t n, int ith, int nth) {
    if (!x || !b || n_seq <= 0 || n <= 0) return;
    int64_t s0, s1;
    fa_share(n_seq, ith, nth, &s0, &s1);
    for (int64_t s = s0; s < s1; s++)
        for (int64_t i = 0; i < n; i++) x[s * n + i] += b[i];
}

/* ----------------------------------------------------------------- rope */

/* Rotation frequencies theta^(-2i / head_dim), i = i0 .. i0 + n_i - 1.  Each
 * thread keeps those of the last (theta, head_dim) it saw, since a model
 * calls rope with one pair of values, often one row at a time; wider heads
 * than the cache holds get them computed into buf. */
#define ROPE_CHUNK 64
#define ROPE_CACHE 256
static _Thread_local struct {
    float theta;
    int head_dim;
    double freq[ROPE_CACHE];
} rope_cache;

static const double *rope_freqs(float theta, int head_dim, int i0, int n_i, double *buf) {
    if (head_dim / 2 > ROPE_CACHE) {
        for (int j = 0; j < n_i; j++) buf[j] = pow((double)theta, -2.0 * (i0 + j) / head_dim);
        return buf;
    }
    if (rope_cache.head_dim != head_dim || rope_cache.theta != theta) {
        for (int i = 0; i < head_dim / 2; i++)
            rope_cache.freq[i] = pow((double)theta, -2.0 * i / head_dim);
        rope_cache.theta = theta;
        rope_cache.head_dim = head_dim;
    }
    return rope_cache.freq + i0;
}

void fa_rope(float *x, int64_t n_seq, int n_head, int head_dim, int64_t pos0,
             float theta, int neox, int ith, int nth) {
    if (!x || n_seq <= 0 || n_head <= 0 || head_dim <= 0 || head_dim % 2 || pos0 < 0
        || !(theta > 0.0f))
        return;
    const int half = head_dim / 2;
    const int64_t row = (int64_t)n_head * head_dim;
    int64_t s0, s1;
    fa_share(n_seq, ith, nth, &s0, &s1);

    /* pairs in chunks of frequencies theta^(-2i / head_dim) */
    double buf[ROPE_CHUNK];
    for (int i0 = 0; i0 < half; i0 += ROPE_CHUNK) {
        int n_i = half - i0 < ROPE_CHUNK ? half - i0 : ROPE_CHUNK;
        const double *freq = rope_freqs(theta, head_dim, i0, n_i, buf);

        for (int64_t s = s0; s < s1; s++) {
            float *xs = x + s * row;
            double pos = (double)(pos0 + s);
            for (int j = 0; j < n_i; j++) {
                int i = i0 + j;
                double angle = pos * freq[j];
                float c = (float)cos(angle), sn = (float)sin(angle);  /* one sincos call */
                int a = neox ? i : 2 * i;
                int b = neox ? i + half : 2 * i + 1;
                for (int h = 0; h < n_head; h++) {
                    float *xh = xs + (int64_t)h * head_dim;
                    float x0 = xh[a], x1 = xh[b];
                    xh[a] = x0 * c - x1 * sn;
                    xh[b] = x0 * sn + x1 * c;
                }
            }
        }
    }
}

/* ------------------------------------------------------------ attention */

/* Keys a chunk holds: 64 keys of head_dim 64 are 16 KB of K and 16 KB of V,
 * which stay in L1 while every query head of a KV group uses them. */
#define ATT_CHUNK FA_ATT_CHUNK
/* Query heads that share one pass over a KV head's chunks. */
#define ATT_GROUP 8
/* Query rows (consecutive queries x heads of one KV group) that share one
 * pass over a chunk in a prefill: 4 queries of SmolLM2's 3-head groups.
 * 12 measured a little faster than 24 (whose scores and states crowd K and
 * V out of L1). */
#define ATT_ROWS 12
_Static_assert(ATT_ROWS >= ATT_GROUP, "a decode unit's heads are one block of rows");

/* Softmax runs over chunks of keys: each chunk c (keys 64c .. 64c + 63)
 * gives, per head, a partial state (m_c its max score, l_c = sum exp(s - m_c),
 * o_c = sum exp(s - m_c) v), and the states are merged in chunk order.
 * Chunks start at multiples of ATT_CHUNK and every step below is one
 * compiled function (noinline), so a query gives the same numbers whether
 * one thread walks all its chunks (attend_block, prefill) or the chunks are
 * spread over threads and merged afterwards (fa_attention_chunks and
 * fa_attention_merge, decode).
 *
 * Several query rows go through a chunk together (a prefill block: up to
 * ATT_ROWS rows, several consecutive queries times the heads of one KV
 * group; a decode unit: the group's heads of one query), so each K and V row
 * is loaded once per block rather than once per query.  The rows kernels
 * (scores_rows, wsum_rows) give every row the exact operations the one-row
 * kernels give it, so neither the block nor its size changes a number; a
 * level without them runs the one-row kernels row by row. */

/* The cache's storage type: float32 (f16 = 0) or IEEE half (f16 = 1), whose
 * kernels widen each value as they load it and then compute what the float32
 * ones compute (fa_kernels), so everything below holds for both.  k and v
 * are then `const void *`; kv_ptr finds element i. */
static inline const void *kv_ptr(const void *base, int f16, int64_t i) {
    return (const char *)base + i * (f16 ? 2 : 4);
}

/* Scores and weighted sums of nr query rows over one chunk of keys, row r
 * reading its first c[r] keys of kc, vc [.., head_dim]: scores_rows and
 * wsum_rows where the level has them, else scores / wsum row by row (the
 * same numbers either way).  score: nr rows of ATT_CHUNK floats. */
static void rows_scores(const fa_kernels *kern, int f16, float *score,
                        const float *const *qrow, int nr, const void *kc, const int64_t *c,
                        int head_dim, float scale, float *mx) {
    if (f16 && kern->scores_rows_f16) {
        kern->scores_rows_f16(score, ATT_CHUNK, qrow, nr, kc, c, head_dim, scale, mx);
        return;
    }
    if (!f16 && kern->scores_rows) {
        kern->scores_rows(score, ATT_CHUNK, qrow, nr, kc, c, head_dim, scale, mx);
        return;
    }
    for (int r = 0; r < nr; r++) {
        float *sr = score + r * ATT_CHUNK;
        mx[r] = f16 ? kern->scores_f16(sr, qrow[r], kc, c[r], head_dim, scale)
                    : kern->scores(sr, qrow[r], kc, c[r], head_dim, scale);
    }
}

static void rows_wsum(const fa_kernels *kern, int f16, float *out, int64_t ldo,
                      const float *p, int nr, const void *vc, const int64_t *c,
                      int head_dim) {
    if (f16 && kern->wsum_rows_f16) {
        kern->wsum_rows_f16(out, ldo, p, ATT_CHUNK, nr, vc, head_dim, c, head_dim);
        return;
    }
    if (!f16 && kern->wsum_rows) {
        kern->wsum_rows(out, ldo, p, ATT_CHUNK, nr, vc, head_dim, c, head_dim);
        return;
    }
    for (int r = 0; r < nr; r++) {
        if (f16)
            kern->wsum_f16(out + r * ldo, p + r * ATT_CHUNK, vc, head_dim, c[r], head_dim);
        else
            kern->wsum(out + r * ldo, p + r * ATT_CHUNK, vc, head_dim, c[r], head_dim);
    }
}

/* The partial states of nr query rows (all reading one KV head) over one
 * chunk of keys kc, vc, row r over its first c[r] keys: row r's state at
 * part + r * ld is o [head_dim], then m, then l (FA_ATT_PART(head_dim) floats). */
__attribute__((noinline)) static void chunk_partial_rows(const fa_kernels *kern, int f16,
                                                         const float *const *qrow, int nr,
                                                         const void *kc, const void *vc,
                                                         const int64_t *c, int head_dim,
                                                         float scale, float *part,
                                                         int64_t ld) {
    float score[ATT_ROWS * ATT_CHUNK];
    float chunk_max[ATT_ROWS];
    /* every row's scores first: one pass over the K chunk */
    rows_scores(kern, f16, score, qrow, nr, kc, c, head_dim, scale, chunk_max);
    for (int r = 0; r < nr; r++) {
        float *pr = part + r * ld;
        pr[head_dim] = chunk_max[r];
        pr[head_dim + 1] = kern->softmax_exp(score + r * ATT_CHUNK, c[r], chunk_max[r]);
    }
    /* then every row's weighted values: one pass over the V chunk */
    rows_wsum(kern, f16, part, ld, score, nr, vc, c, head_dim);
}

/* The same for the n_h query heads q [n_h, head_dim] of one query, all over
 * the c keys of the chunk (the decode's unit). */
static void chunk_partial(const fa_kernels *kern, int f16, const float *q, const void *kc,
                          const void *vc, int64_t c, int n_h, int head_dim, float scale,
                          float *part, int64_t ld) {
    const float *qrow[ATT_GROUP];
    int64_t cr[ATT_GROUP];
    for (int g = 0; g < n_h; g++) {
        qrow[g] = q + (int64_t)g * head_dim;
        cr[g] = c;
    }
    chunk_partial_rows(kern, f16, qrow, n_h, kc, vc, cr, head_dim, scale, part, ld);
}

/* acc := acc merged with the next chunk's state p (both FA_ATT_PART floats). */
__attribute__((noinline)) static void merge_partial(float *acc, const float *p,
                                                    int head_dim) {
    float m_old = acc[head_dim], m_c = p[head_dim];
    float m = m_old > m_c ? m_old : m_c;
    float a = expf(m_old - m), b = expf(m_c - m);
    for (int i = 0; i < head_dim; i++) acc[i] = acc[i] * a + p[i] * b;
    acc[head_dim] = m;
    acc[head_dim + 1] = acc[head_dim + 1] * a + p[head_dim + 1] * b;
}

/* out [head_dim] = o / l of a merged state. */
__attribute__((noinline)) static void finish_partial(const float *acc, float *out,
                                                     int head_dim) {
    float inv = 1.0f / acc[head_dim + 1];
    for (int i = 0; i < head_dim; i++) out[i] = acc[i] * inv;
}

/* Attention of nq consecutive queries for the query heads [h0, h0 + n_h) of
 * one KV group, which all read KV head kh / vh; query j (its rows at
 * q + j * row) walks n_t + j keys; out likewise at out + j * row.  Each
 * chunk of keys is loaded once for all nq * n_h rows; a row's states are
 * merged in chunk order exactly as alone.  acc, part: nq * n_h states each.
 *
 * Measured: one layer of a 512-token SmolLM2 prefill (9 heads, 3 KV heads,
 * head_dim 64, one thread) went from 6.9 ms (one query at a time) to
 * 4.3 ms; attention is still about 13% of a q8-mode prefill.
 *
 * Known shortcomings: each score is still its own 16-lane reduction tree
 * (the arithmetic the decode path shares, so changing it means changing
 * both), which costs about as much as the score's FMAs and leaves scores
 * the largest part of attention; the rows of a block's last chunk end at
 * different keys and take per-row branches; only the AVX-512 level has
 * rows kernels (AVX2 and generic run their one-row kernels row by row). */
static void attend_block(const fa_kernels *kern, int f16, const float *q, const void *kh,
                         const void *vh, float *out, int64_t row, int nq, int n_h,
                         int head_dim, int64_t n_t, float scale, float *acc, float *part) {
    const int64_t np = FA_ATT_PART(head_dim);
    const int nr = nq * n_h;
    const float *qrow[ATT_ROWS];
    for (int j = 0; j < nq; j++)
        for (int g = 0; g < n_h; g++) qrow[j * n_h + g] = q + j * row + (int64_t)g * head_dim;
    const int64_t n_last = n_t + nq - 1;  /* keys the last query walks */
    for (int64_t t0 = 0; t0 < n_last; t0 += ATT_CHUNK) {
        /* the rows that reach this chunk: queries j with n_t + j > t0, a tail */
        int j0 = t0 < n_t ? 0 : (int)(t0 - n_t + 1);
        int r0 = j0 * n_h;
        int64_t c[ATT_ROWS];
        for (int j = j0; j < nq; j++) {
            int64_t len = n_t + j - t0 < ATT_CHUNK ? n_t + j - t0 : ATT_CHUNK;
            for (int g = 0; g < n_h; g++) c[j * n_h + g] = len;
        }
        chunk_partial_rows(kern, f16, qrow + r0, nr - r0, kv_ptr(kh, f16, t0 * head_dim),
                           kv_ptr(vh, f16, t0 * head_dim), c + r0, head_dim, scale,
                           (t0 == 0 ? acc : part) + r0 * np, np);
        if (t0 > 0)
            for (int r = r0; r < nr; r++) merge_partial(acc + r * np, part + r * np, head_dim);
    }
    for (int j = 0; j < nq; j++)
        for (int g = 0; g < n_h; g++)
            finish_partial(acc + (j * n_h + g) * np, out + j * row + (int64_t)g * head_dim,
                           head_dim);
}

static int attention_args_ok(const float *q, const void *k, const void *v, int kv_type,
                             int64_t n_seq, int64_t pos0, int n_head, int n_kv_head,
                             int head_dim, int64_t n_ctx, int ith, int nth) {
    return q && k && v && (kv_type == FA_F32 || kv_type == FA_F16) && n_seq > 0
           && pos0 >= 0 && n_head > 0 && n_kv_head > 0 && n_head % n_kv_head == 0
           && head_dim > 0 && n_ctx > 0 && pos0 + n_seq <= n_ctx && nth >= 1 && ith >= 0
           && ith < nth;
}

void fa_attention(const float *q, const float *k, const float *v, float *out,
                  int64_t n_seq, int64_t pos0, int n_head, int n_kv_head, int head_dim,
                  int64_t n_ctx, float *scratch, int ith, int nth) {
    if (!scratch) return;
    fa_attention_kv(q, k, v, FA_F32, out, n_seq, pos0, n_head, n_kv_head, head_dim, n_ctx,
                    ith, nth);
}

void fa_attention_kv(const float *q, const void *k, const void *v, int kv_type, float *out,
                     int64_t n_seq, int64_t pos0, int n_head, int n_kv_head, int head_dim,
                     int64_t n_ctx, int ith, int nth) {
    if (!out
        || !attention_args_ok(q, k, v, kv_type, n_seq, pos0, n_head, n_kv_head, head_dim,
                              n_ctx, ith, nth))
        return;
    const int f16 = kv_type == FA_F16;
    /* scratch is part of the contract but no longer needed: scores and
     * partial states live on the stack, or in malloc'd memory for heads wider
     * than FA_ATT_STACK_DIM */
    const fa_kernels *kern = fa_kernels_current();
    const int group = n_head / n_kv_head;

    /* Query heads per unit of work: up to ATT_GROUP share each pass over the
     * keys, but fewer when that leaves too few units to balance the threads.
     * A head's numbers do not depend on which heads share its unit. */
    int per_unit = group < ATT_GROUP ? group : ATT_GROUP;
    while (per_unit > 1
           && (int64_t)n_kv_head * ((group + per_unit - 1) / per_unit) * n_seq < 4 * nth)
        per_unit = (per_unit + 1) / 2;
    const int64_t row = (int64_t)n_head * head_dim;
    const float scale = 1.0f / sqrtf((float)head_dim);

    /* two sets of partial states (merged and next chunk's) per row of a
     * unit, on the stack: fewer rows per unit when heads are wide, and for
     * heads wider than the stack holds even alone (over 2000 values), malloc */
    float stack[2 * ATT_GROUP * FA_ATT_PART(FA_ATT_STACK_DIM)];
    const int64_t fit = (int64_t)(sizeof stack / sizeof *stack) / (2 * FA_ATT_PART(head_dim));
    if (per_unit > fit && fit >= 1) per_unit = (int)fit;
    float *states = stack;
    if (fit < 1) {
        per_unit = 1;
        states = malloc(sizeof(float) * 2 * (size_t)FA_ATT_PART(head_dim));
    }
    const int n_sub = (group + per_unit - 1) / per_unit;  /* units per KV head and query */

    /* Consecutive queries per unit (a block): as many as ATT_ROWS rows and
     * the stack allow, fewer when that leaves too few units for the threads.
     * A row's numbers do not depend on which rows share its unit either. */
    int per_block = ATT_ROWS / per_unit;
    if (states == stack && (int64_t)per_block * per_unit > fit) per_block = (int)(fit / per_unit);
    if (states != stack || per_block < 1) per_block = 1;
    while (per_block > 1
           && (int64_t)n_kv_head * n_sub * ((n_seq + per_block - 1) / per_block) < 4 * nth)
        per_block = (per_block + 1) / 2;
    const int64_t n_blk = (n_seq + per_block - 1) / per_block;
    float *acc = states, *part = states + per_block * per_unit * FA_ATT_PART(head_dim);

    /* this thread's (KV head, subgroup, query block) units, KV-head-major: a
     * contiguous run of them holding its share of the keys to walk (query s
     * walks pos0 + s + 1 of them), since even counts of causal units are
     * uneven work (the later queries of a prefill walk the most keys) */
    const int64_t n_units = (int64_t)n_kv_head * n_sub * n_blk;
    const __int128 total =
        (__int128)n_kv_head * n_sub * ((__int128)n_seq * pos0 + (__int128)n_seq * (n_seq + 1) / 2);
    __int128 done = 0;  /* keys of the units before u */
    for (int64_t u = 0; u < n_units; u++) {
        int64_t s = (u % n_blk) * per_block;
        int nq = n_seq - s < per_block ? (int)(n_seq - s) : per_block;
        __int128 before = done;
        done += (__int128)nq * (pos0 + s + 1) + (__int128)nq * (nq - 1) / 2;
        if (before * nth / total != ith) continue;
        int sub = (int)(u / n_blk);
        int kv = sub / n_sub;
        int h0 = kv * group + (sub % n_sub) * per_unit;
        int n_h = kv * group + group - h0 < per_unit ? kv * group + group - h0 : per_unit;
        const void *kh = kv_ptr(k, f16, (int64_t)kv * n_ctx * head_dim);
        const void *vh = kv_ptr(v, f16, (int64_t)kv * n_ctx * head_dim);
        if (!states) {  /* no memory for the states: NaN, never a stale output */
            for (int j = 0; j < nq; j++)
                for (int64_t i = 0; i < (int64_t)n_h * head_dim; i++)
                    out[(s + j) * row + (int64_t)h0 * head_dim + i] = NAN;
            continue;
        }
        attend_block(kern, f16, q + s * row + (int64_t)h0 * head_dim, kh, vh,
                     out + s * row + (int64_t)h0 * head_dim, row, nq, n_h, head_dim,
                     pos0 + s + 1, scale, acc, part);
    }
    if (states && states != stack) free(states);
}

/* (query, KV head, chunk) units: thread ith's even share of them, each the
 * partial states of the group's query heads over one chunk of keys. */
void fa_attention_chunks(const float *q, const float *k, const float *v, float *part,
                         int64_t n_seq, int64_t pos0, int n_head, int n_kv_head,
                         int head_dim, int64_t n_ctx, int ith, int nth) {
    fa_attention_chunks_kv(q, k, v, FA_F32, part, n_seq, pos0, n_head, n_kv_head, head_dim,
                           n_ctx, ith, nth);
}

void fa_attention_chunks_kv(const float *q, const void *k, const void *v, int kv_type,
                            float *part, int64_t n_seq, int64_t pos0, int n_head,
                            int n_kv_head, int head_dim, int64_t n_ctx, int ith, int nth) {
    if (!part
        || !attention_args_ok(q, k, v, kv_type, n_seq, pos0, n_head, n_kv_head, head_dim,
                              n_ctx, ith, nth))
        return;
    const int f16 = kv_type == FA_F16;
    const fa_kernels *kern = fa_kernels_current();
    const int group = n_head / n_kv_head;
    const int64_t row = (int64_t)n_head * head_dim, np = FA_ATT_PART(head_dim);
    const int64_t max_chunks = (n_ctx + ATT_CHUNK - 1) / ATT_CHUNK;
    const float scale = 1.0f / sqrtf((float)head_dim);

    /* units of query s: n_kv_head * chunks(s); queries one after the other */
    int64_t total = 0;
    for (int64_t s = 0; s < n_seq; s++)
        total += n_kv_head * ((pos0 + s + ATT_CHUNK) / ATT_CHUNK);
    int64_t u0, u1;
    fa_share(total, ith, nth, &u0, &u1);

    int64_t base = 0;
    for (int64_t s = 0; s < n_seq && base < u1; s++) {
        const int64_t n_t = pos0 + s + 1, n_c = (n_t + ATT_CHUNK - 1) / ATT_CHUNK;
        const int64_t units = n_kv_head * n_c;
        for (int64_t u = u0 > base ? u0 - base : 0; u < units && base + u < u1; u++) {
            int kv = (int)(u / n_c);
            int64_t c = u % n_c, t0 = c * ATT_CHUNK;
            int64_t len = n_t - t0 < ATT_CHUNK ? n_t - t0 : ATT_CHUNK;
            int h0 = kv * group;
            for (int g0 = 0; g0 < group; g0 += ATT_GROUP) {
                int n_h = group - g0 < ATT_GROUP ? group - g0 : ATT_GROUP;
                const int64_t at = kv * n_ctx * head_dim + t0 * head_dim;
                chunk_partial(kern, f16, q + s * row + (int64_t)(h0 + g0) * head_dim,
                              kv_ptr(k, f16, at), kv_ptr(v, f16, at), len, n_h, head_dim, scale,
                              part + ((s * n_head + h0 + g0) * max_chunks + c) * np,
                              max_chunks * np);
            }
        }
        base += units;
    }
}

/* out [n_seq, n_head * head_dim] for the heads [h0, h1) of every query
 * from the partial states fa_attention_chunks left, merged in chunk order as
 * attend_block does; part is only read, so every thread may merge the same
 * heads into its own out.  acc: FA_ATT_PART(head_dim) floats of scratch. */
void fa_attention_merge(const float *part, float *out, int64_t n_seq, int64_t pos0,
                        int n_head, int head_dim, int64_t n_ctx, int h0, int h1,
                        float *acc) {
    if (!part || !out || !acc || n_seq <= 0 || pos0 < 0 || n_head <= 0 || head_dim <= 0
        || pos0 + n_seq > n_ctx || h0 < 0 || h1 > n_head)
        return;
    const int64_t row = (int64_t)n_head * head_dim, np = FA_ATT_PART(head_dim);
    const int64_t max_chunks = (n_ctx + ATT_CHUNK - 1) / ATT_CHUNK;
    for (int64_t s = 0; s < n_seq; s++) {
        const int64_t n_c = (pos0 + s + ATT_CHUNK) / ATT_CHUNK;
        for (int h = h0; h < h1; h++) {
            const float *ph = part + (s * n_head + h) * max_chunks * np;
            memcpy(acc, ph, sizeof(float) * (size_t)np);
            for (int64_t c = 1; c < n_c; c++) merge_partial(acc, ph + c * np, head_dim);
            finish_partial(acc, out + s * row + (int64_t)h * head_dim, head_dim);
        }
    }
}

void fa_parallel_attention(const float *q, const float *k, const float *v, float *out,
                           int64_t n_seq, int64_t pos0, int n_head, int n_kv_head,
                           int head_dim, int64_t n_ctx, int n_threads) {
    n_threads = fa_team_threads(n_threads);
    float unused;  /* fa_attention keeps its scores on its own stack (see above) */
#ifdef _OPENMP
#pragma omp parallel num_threads(n_threads)
    fa_attention(q, k, v, out, n_seq, pos0, n_head, n_kv_head, head_dim, n_ctx, &unused,
                 omp_get_thread_num(), omp_get_num_threads());
#else
    fa_attention(q, k, v, out, n_seq, pos0, n_head, n_kv_head, head_dim, n_ctx, &unused, 0, 1);
#endif
}
