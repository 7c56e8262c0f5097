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

void fa_rope(float *x, int64_t n_seq, int n_head, int head_dim, int64_t pos0,
             float theta, int neox, int ith, int nth) {
    if (!x || n_seq <= 0 || n_head <= 0 || head_dim <= 0 || head_dim % 2 || pos0 < 0
        || !(theta > 0.0f))
        return;
    const int half = head_dim / 2;
    const int64_t row = (int64_t)n_head * head_dim;
    int64_t s0, s1;
    fa_share(n_seq, ith, nth, &s0, &s1);

    /* pairs in chunks, so each frequency theta^(-2i / head_dim) is computed
     * once per call rather than once per row */
    enum { CHUNK = 64 };
    double freq[CHUNK];
    for (int i0 = 0; i0 < half; i0 += CHUNK) {
        int n_i = half - i0 < CHUNK ? half - i0 : CHUNK;
        for (int j = 0; j < n_i; j++) freq[j] = pow((double)theta, -2.0 * (i0 + j) / head_dim);

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

void fa_attention(const float *q, const float *k, const float *v, float *out,
                  int64_t n_seq, int64_t pos0, int n_head, int n_kv_head, int head_dim,
                  int64_t n_ctx, float *scratch, int ith, int nth) {
    if (!q || !k || !v || !out || !scratch || n_seq <= 0 || pos0 < 0 || n_head <= 0
        || n_kv_head <= 0 || n_head % n_kv_head || head_dim <= 0 || n_ctx <= 0
        || pos0 + n_seq > n_ctx || nth < 1 || ith < 0 || ith >= nth)
        return;
    const fa_kernels *kern = fa_kernels_current();
    const int group = n_head / n_kv_head;
    const int64_t n_kv = pos0 + n_seq;
    const int64_t row = (int64_t)n_head * head_dim;
    const float scale = 1.0f / sqrtf((float)head_dim);
    float *score = scratch + (int64_t)ith * n_kv;

    /* this thread's (head, query) pairs, head-major */
    int64_t u0, u1;
    fa_share((int64_t)n_head * n_seq, ith, nth, &u0, &u1);
    for (int64_t u = u0; u < u1; u++) {
        int h = (int)(u / n_seq);
        int64_t s = u % n_seq;
        int64_t n_t = pos0 + s + 1;  /* causal: positions 0 .. pos0 + s */
        const float *qh = q + s * row + (int64_t)h * head_dim;
        const float *kh = k + (int64_t)(h / group) * n_ctx * head_dim;
        const float *vh = v + (int64_t)(h / group) * n_ctx * head_dim;
        float *oh = out + s * row + (int64_t)h * head_dim;

        /* scores = q k^T / sqrt(head_dim) and their max */
        kern->scores(score, qh, kh, n_t, head_dim, scale);
        float mx = -INFINITY;
        for (int64_t t = 0; t < n_t; t++)
            if (score[t] > mx) mx = score[t];

        /* softmax numerators, then out = (sum_t p_t v_t) / sum_t p_t */
        float sum = kern->softmax_exp(score, n_t, mx);
        kern->wsum(oh, score, vh, n_t, head_dim);
        float inv = 1.0f / sum;
        for (int i = 0; i < head_dim; i++) oh[i] *= inv;
    }
}

void fa_parallel_attention(const float *q, const float *k, const float *v, float *out,
                           int64_t n_seq, int64_t pos0, int n_head, int n_kv_head,
                           int head_dim, int64_t n_ctx, int n_threads) {
    if (n_threads < 1) n_threads = 1;
    if (n_seq <= 0 || pos0 < 0 || pos0 + n_seq > n_ctx) return;
    /* Known shortcoming: the void signature cannot report a failed
     * allocation; out is then filled with NaN so the failure is not silent. */
    float *scratch = malloc(sizeof(float) * (size_t)n_threads * (size_t)(pos0 + n_seq));
    if (!scratch) {
        if (out && n_head > 0 && head_dim > 0)
            for (int64_t i = 0; i < n_seq * n_head * head_dim; i++) out[i] = NAN;
        return;
    }
#ifdef _OPENMP
#pragma omp parallel num_threads(n_threads)
    fa_attention(q, k, v, out, n_seq, pos0, n_head, n_kv_head, head_dim, n_ctx, scratch,
                 omp_get_thread_num(), omp_get_num_threads());
#else
    fa_attention(q, k, v, out, n_seq, pos0, n_head, n_kv_head, head_dim, n_ctx, scratch,
                 0, 1);
#endif
    free(scratch);
}
