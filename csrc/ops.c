/*
 * Row-wise kernels: norms, activations, bias, rotary embedding, attention.
 *
 *   x, y    [n_seq, n]                         activations, row-major
 *   q, out  [n_seq, n_head * head_dim]
 *   k, v    [n_kv_head, n_ctx, head_dim]       one layer's KV cache
 *
 * Every kernel does thread ith's share of nth: whole rows, a contiguous
 * range of values, or whole (head, query) pairs for attention.  A result
 * never depends on nth.  Bad sizes make a kernel return without writing.
 */
#include <math.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "fa_internal.h"

/* ---------------------------------------------------------------- norms */

void fa_layer_norm(const float *x, const float *g, const float *b, float *y,
                   int64_t n_seq, int64_t n, float eps, int ith, int nth) {
    if (!x || !g || !y || n_seq <= 0 || n <= 0) return;
    int64_t s0, s1;
    fa_share(n_seq, ith, nth, &s0, &s1);
    for (int64_t s = s0; s < s1; s++) {
        const float *xs = x + s * n;
        float *ys = y + s * n;

        /* mean and variance, summed in double */
        double sum = 0.0;
        for (int64_t i = 0; i < n; i++) sum += xs[i];
        double mean = sum / (double)n;
        double sq = 0.0;
        for (int64_t i = 0; i < n; i++) {
            double d = xs[i] - mean;
            sq += d * d;
        }
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
        double sq = 0.0;
        for (int64_t i = 0; i < n; i++) sq += (double)xs[i] * xs[i];
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
#define ATT_CHUNK 64
/* Query heads that share one pass over a KV head's chunks. */
#define ATT_GROUP 8
/* Columns of the output one step of the weighted sum holds. */
#define ATT_COLS 256

/* Attention of query s for the query heads h0 .. h0 + n_h - 1, which all read
 * KV head kh / vh.  Softmax runs online over chunks of keys: each head keeps
 * its running max mx, its running sum l, and its output o scaled to mx; a new
 * chunk with a higher max rescales them by exp(old - new).  Chunks start at
 * multiples of ATT_CHUNK, so a query gives the same numbers in a prefill and
 * in a decode. */
static void attend_group(const fa_kernels *kern, const float *q, const float *kh,
                         const float *vh, float *out, int n_h, int head_dim, int64_t n_t,
                         float scale) {
    float score[ATT_GROUP][ATT_CHUNK];
    float part[ATT_COLS];
    float mx[ATT_GROUP], l[ATT_GROUP];

    for (int64_t t0 = 0; t0 < n_t; t0 += ATT_CHUNK) {
        int64_t c = n_t - t0 < ATT_CHUNK ? n_t - t0 : ATT_CHUNK;
        const float *kc = kh + t0 * head_dim, *vc = vh + t0 * head_dim;

        /* scores of this chunk for every head, and their max: one pass over
         * the K chunk */
        float chunk_max[ATT_GROUP];
        for (int g = 0; g < n_h; g++)
            chunk_max[g] = kern->scores(score[g], q + (int64_t)g * head_dim, kc, c, head_dim,
                                        scale);

        for (int g = 0; g < n_h; g++) {
            float *o = out + (int64_t)g * head_dim;

            /* new running max; the factor that rescales what came before */
            float m = chunk_max[g];
            float factor = 0.0f;
            if (t0 > 0) {
                if (mx[g] > m) m = mx[g];
                factor = expf(mx[g] - m);
            }
            mx[g] = m;
            float sum = kern->softmax_exp(score[g], c, m);
            l[g] = t0 > 0 ? l[g] * factor + sum : sum;

            /* o = o * factor + sum_t p_t v_t over the chunk, ATT_COLS at a time */
            for (int i0 = 0; i0 < head_dim; i0 += ATT_COLS) {
                int n_i = head_dim - i0 < ATT_COLS ? head_dim - i0 : ATT_COLS;
                if (t0 == 0) {
                    kern->wsum(o + i0, score[g], vc + i0, head_dim, c, n_i);
                } else {
                    kern->wsum(part, score[g], vc + i0, head_dim, c, n_i);
                    for (int i = 0; i < n_i; i++) o[i0 + i] = o[i0 + i] * factor + part[i];
                }
            }
        }
    }

    /* out = o / l */
    for (int g = 0; g < n_h; g++) {
        float inv = 1.0f / l[g];
        float *o = out + (int64_t)g * head_dim;
        for (int i = 0; i < head_dim; i++) o[i] *= inv;
    }
}

void fa_attention(const float *q, const float *k, const float *v, float *out,
                  int64_t n_seq, int64_t pos0, int n_head, int n_kv_head, int head_dim,
                  int64_t n_ctx, float *scratch, int ith, int nth) {
    if (!q || !k || !v || !out || !scratch || n_seq <= 0 || pos0 < 0 || n_head <= 0
        || n_kv_head <= 0 || n_head % n_kv_head || head_dim <= 0 || n_ctx <= 0
        || pos0 + n_seq > n_ctx || nth < 1 || ith < 0 || ith >= nth)
        return;
    /* scratch is part of the contract but no longer needed: scores live in
     * a fixed stack buffer per chunk (see attend_group) */
    const fa_kernels *kern = fa_kernels_current();
    const int group = n_head / n_kv_head;

    /* Query heads per unit of work: up to ATT_GROUP share each pass over the
     * keys, but fewer when that leaves too few units to balance the threads
     * (a decode of 9 heads over 3 KV heads on 2 threads).  A head's numbers do
     * not depend on which heads share its unit. */
    int per_unit = group < ATT_GROUP ? group : ATT_GROUP;
    while (per_unit > 1
           && (int64_t)n_kv_head * ((group + per_unit - 1) / per_unit) * n_seq < 4 * nth)
        per_unit = (per_unit + 1) / 2;
    const int n_sub = (group + per_unit - 1) / per_unit;  /* units per KV head and query */
    const int64_t row = (int64_t)n_head * head_dim;
    const float scale = 1.0f / sqrtf((float)head_dim);

    /* this thread's (KV head, subgroup, query) units, KV-head-major */
    int64_t u0, u1;
    fa_share((int64_t)n_kv_head * n_sub * n_seq, ith, nth, &u0, &u1);
    for (int64_t u = u0; u < u1; u++) {
        int64_t s = u % n_seq;
        int sub = (int)(u / n_seq);
        int kv = sub / n_sub;
        int h0 = kv * group + (sub % n_sub) * per_unit;
        int n_h = kv * group + group - h0 < per_unit ? kv * group + group - h0 : per_unit;
        const float *kh = k + (int64_t)kv * n_ctx * head_dim;
        const float *vh = v + (int64_t)kv * n_ctx * head_dim;
        attend_group(kern, q + s * row + (int64_t)h0 * head_dim, kh, vh,
                     out + s * row + (int64_t)h0 * head_dim, n_h, head_dim, pos0 + s + 1,
                     scale);
    }
}

void fa_parallel_attention(const float *q, const float *k, const float *v, float *out,
                           int64_t n_seq, int64_t pos0, int n_head, int n_kv_head,
                           int head_dim, int64_t n_ctx, int n_threads) {
    if (n_threads < 1) n_threads = 1;
    float unused;  /* fa_attention keeps its scores on its own stack (see above) */
#ifdef _OPENMP
#pragma omp parallel num_threads(n_threads)
    fa_attention(q, k, v, out, n_seq, pos0, n_head, n_kv_head, head_dim, n_ctx, &unused,
                 omp_get_thread_num(), omp_get_num_threads());
#else
    fa_attention(q, k, v, out, n_seq, pos0, n_head, n_kv_head, head_dim, n_ctx, &unused, 0, 1);
#endif
}
