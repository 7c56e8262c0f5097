/*
 * The whole-model forward pass, GPT-2 and Llama, over the kernels of
 * fastattn.h.
 *
 * Letters, as everywhere in fastattn:
 *   n   tokens in the current chunk (n_seq of the call, cut in chunks)
 *   E   n_embd     Ekv  n_embd_kv = n_kv_head * head_dim     F  n_ff
 *
 * One call runs every layer inside ONE OpenMP parallel region.  Each thread
 * walks the same list of steps; a step is either a kernel doing the thread's
 * share (matmul rows, attention heads) or a "row-local" step where each
 * thread handles whole token rows in plain C (residual adds, biases, norms,
 * rope, cache writes).  A barrier (team_wait below, not OpenMP's) separates
 * a step from the next one that reads its output.  Every value is computed
 * by one thread in a fixed order, so results depend neither on the thread
 * count nor on how a prompt is cut into chunks or calls: prefill + decode ==
 * one forward, bit for bit.
 */
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "model.h"

/* ------------------------------------------------------------ barrier */

/* The threads of one forward call wait for each other here, between steps.
 * OpenMP's own barrier spins without yielding for a long while (libgomp:
 * GOMP_SPINCOUNT) before it sleeps; on a machine busier than its core count,
 * a waiting thread then burns the time slice its partner needs, and a decode
 * step ran 8x slower with 2 threads than with 1.  This barrier spins briefly,
 * then yields the CPU on every check, which costs nothing when the machine is
 * idle (sched_yield returns at once) and lets the partner run when it is not.
 * A sense-reversing counter: the last thread to arrive resets the count and
 * flips the shared sense; the others wait for the flip. */
typedef struct {
    atomic_int count;
    atomic_int sense;
} team_barrier;

typedef struct {
    team_barrier *barrier;
    int ith, nth;
    int sense;  /* this thread's copy, flipped at each wait */
} team;

#ifndef SPINS_BEFORE_YIELD
#define SPINS_BEFORE_YIELD 200
#endif

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static void team_wait(team *t) {
    if (t->nth <= 1) return;
    team_barrier *b = t->barrier;
    t->sense = !t->sense;
    if (atomic_fetch_add(&b->count, 1) == t->nth - 1) {
        atomic_store(&b->count, 0);
        atomic_store(&b->sense, t->sense);  /* releases every write made before */
        return;
    }
    for (int spins = 0; atomic_load(&b->sense) != t->sense; spins++) {
        if (spins < SPINS_BEFORE_YIELD)
            cpu_relax();
        else
            sched_yield();
    }
}

#define BARRIER team_wait(tm);

/* ------------------------------------------------------------ helpers */

/* The half-open share [*lo, *hi) of n items that thread ith of nth owns. */
static void share(int64_t n, int ith, int nth, int64_t *lo, int64_t *hi) {
    *lo = n * ith / nth;
    *hi = n * (ith + 1) / nth;
}

/* a * b * c * d floats, or NULL if the byte count overflows or malloc fails. */
static float *alloc_floats(int64_t a, int64_t b, int64_t c, int64_t d) {
    size_t n = 1;
    int64_t dims[4] = {a, b, c, d};
    for (int i = 0; i < 4; i++) {
        if (dims[i] <= 0 || __builtin_mul_overflow(n, (size_t)dims[i], &n)) return NULL;
    }
    if (__builtin_mul_overflow(n, sizeof(float), &n)) return NULL;
    return malloc(n);
}

static int weight_ok(const fa_weight *w, int64_t n_out, int64_t n_in) {
    return w->data && w->n_out == n_out && w->n_in == n_in && w->row_bytes > 0
           && w->row_bytes == fa_row_bytes(w->type, n_in);
}

/* ----------------------------------------------------------- the model */

int fa_model_check(const fa_model *m) {
    if (!m || !m->layers) return FA_ERR_ARG;
    if (m->family != FA_GPT2 && m->family != FA_LLAMA) return FA_ERR_ARG;
    if (m->n_vocab <= 0 || m->n_ctx <= 0 || m->n_embd <= 0 || m->n_layer <= 0
        || m->n_head <= 0 || m->n_kv_head <= 0 || m->head_dim <= 0 || m->n_ff <= 0)
        return FA_ERR_ARG;
    if (m->n_vocab > INT32_MAX || m->n_head > INT32_MAX || m->head_dim > INT32_MAX)
        return FA_ERR_ARG;
    if (m->n_head * m->head_dim != m->n_embd || m->n_head % m->n_kv_head)
        return FA_ERR_ARG;
    if (!(m->norm_eps > 0.0f) || !(m->rope_theta > 0.0f)) return FA_ERR_ARG;

    const int64_t E = m->n_embd, Ekv = m->n_kv_head * m->head_dim, F = m->n_ff;
    const int gpt2 = m->family == FA_GPT2;
    if (!weight_ok(&m->token_embd, m->n_vocab, E) || !weight_ok(&m->output, m->n_vocab, E)
        || !m->output_norm_w || (gpt2 && !m->output_norm_b))
        return FA_ERR_ARG;
    if (gpt2 && !weight_ok(&m->position_embd, m->n_ctx, E)) return FA_ERR_ARG;

    for (int64_t l = 0; l < m->n_layer; l++) {
        const fa_layer *L = &m->layers[l];
        if (!L->attn_norm_w || !L->ffn_norm_w) return FA_ERR_ARG;
        if (!weight_ok(&L->attn_output, E, E) || !weight_ok(&L->ffn_up, F, E)
            || !weight_ok(&L->ffn_down, E, F))
            return FA_ERR_ARG;
        if (gpt2) {
            if (!weight_ok(&L->attn_qkv, 3 * E, E)) return FA_ERR_ARG;
            if (!L->attn_norm_b || !L->ffn_norm_b || !L->attn_qkv_b || !L->attn_output_b
                || !L->ffn_up_b || !L->ffn_down_b)
                return FA_ERR_ARG;
        } else {
            if (!weight_ok(&L->attn_q, E, E) || !weight_ok(&L->attn_k, Ekv, E)
                || !weight_ok(&L->attn_v, Ekv, E) || !weight_ok(&L->ffn_gate, F, E))
                return FA_ERR_ARG;
        }
    }
    return FA_OK;
}

/* ----------------------------------------------------------- the state */

int fa_state_init(fa_state *s, const fa_model *m, int64_t n_ctx, int64_t max_chunk) {
    if (!s) return FA_ERR_ARG;
    memset(s, 0, sizeof(*s));
    if (fa_model_check(m) != FA_OK || n_ctx <= 0 || n_ctx > m->n_ctx || max_chunk <= 0)
        return FA_ERR_ARG;

    const int64_t E = m->n_embd, Ekv = m->n_kv_head * m->head_dim, F = m->n_ff;
    const int64_t chunk = max_chunk < n_ctx ? max_chunk : n_ctx;
    s->n_layer = m->n_layer;
    s->n_kv_head = m->n_kv_head;
    s->head_dim = m->head_dim;
    s->n_embd = E;
    s->n_ctx = n_ctx;
    s->max_chunk = chunk;

    /* the cache: [n_layer][n_kv_head][n_ctx][head_dim] each for K and V */
    s->k_cache = alloc_floats(m->n_layer, m->n_kv_head, n_ctx, m->head_dim);
    s->v_cache = alloc_floats(m->n_layer, m->n_kv_head, n_ctx, m->head_dim);

    /* scratch for one chunk of tokens */
    s->x = alloc_floats(chunk, E, 1, 1);
    s->xn = alloc_floats(chunk, E, 1, 1);
    s->q = alloc_floats(chunk, E, 1, 1);
    s->qkv = alloc_floats(chunk, m->family == FA_GPT2 ? 3 * E : 2 * Ekv, 1, 1);
    s->att = alloc_floats(chunk, E, 1, 1);
    s->ffn_a = alloc_floats(chunk, F, 1, 1);
    s->ffn_b = alloc_floats(chunk, F, 1, 1);
    if (!s->k_cache || !s->v_cache || !s->x || !s->xn || !s->q || !s->qkv || !s->att
        || !s->ffn_a || !s->ffn_b) {
        fa_state_free(s);
        return FA_ERR_NOMEM;
    }
    return FA_OK;
}

void fa_state_free(fa_state *s) {
    if (!s) return;
    free(s->k_cache);
    free(s->v_cache);
    free(s->x);
    free(s->xn);
    free(s->q);
    free(s->qkv);
    free(s->att);
    free(s->ffn_a);
    free(s->ffn_b);
    free(s->att_scratch);
    memset(s, 0, sizeof(*s));
}

/* ------------------------------------------------------ row-local steps */

/* Known shortcoming: these steps split by token rows, so while decoding one
 * token they all run on thread 0 while the others wait at the next barrier.
 * For SmolLM2 that is the two norms, rope of q and k (which recomputes its
 * cos/sin every layer) and the cache writes, about 1% of a token's time. */

/* x = token_embd[ids] (+ position_embd[pos0 ..] for gpt2), for rows t0 .. t1.
 * tmp [n, E] holds the position rows. */
static void embed_rows(const fa_model *m, const int32_t *ids, int64_t pos0, float *x,
                       float *tmp, int64_t t0, int64_t t1) {
    const int64_t E = m->n_embd;
    for (int64_t t = t0; t < t1; t++) {
        float *xt = x + t * E;
        fa_dequant_row(&m->token_embd, ids[t], xt);
        if (m->family == FA_GPT2) {
            float *pt = tmp + t * E;
            fa_dequant_row(&m->position_embd, pos0 + t, pt);
            for (int64_t i = 0; i < E; i++) xt[i] += pt[i];
        }
    }
}

/* x += y (+ b), rows t0 .. t1 of width n.  x [., n], y [., n], b [n] or NULL. */
static void add_residual(float *x, const float *y, const float *b, int64_t n,
                         int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; t++) {
        float *xt = x + t * n;
        const float *yt = y + t * n;
        if (b) {
            for (int64_t i = 0; i < n; i++) xt[i] += yt[i] + b[i];
        } else {
            for (int64_t i = 0; i < n; i++) xt[i] += yt[i];
        }
    }
}

/* y = norm(x) with LayerNorm (gpt2) or RMSNorm (llama), rows t0 .. t1. */
static void norm_rows(const fa_model *m, const float *x, const float *g, const float *b,
                      float *y, int64_t t0, int64_t t1) {
    const int64_t E = m->n_embd;
    for (int64_t t = t0; t < t1; t++) {
        if (m->family == FA_GPT2)
            fa_layer_norm(x + t * E, g, b, y + t * E, 1, E, m->norm_eps, 0, 1);
        else
            fa_rms_norm(x + t * E, g, y + t * E, 1, E, m->norm_eps, 0, 1);
    }
}

/* row[i] += b[i] for i < n, when b is given. */
static void add_bias_row(float *row, const float *b, int64_t n) {
    if (!b) return;
    for (int64_t i = 0; i < n; i++) row[i] += b[i];
}

/* x[i] += b[i % n] for flat indices i0 .. i1 of x [., n], when b is given. */
static void add_bias_range(float *x, const float *b, int64_t n, int64_t i0, int64_t i1) {
    if (!b) return;
    for (int64_t i = i0; i < i1; i++) x[i] += b[i % n];
}

/* Copy row t of k and v ([n, Ekv] each, head after head) into the layer's
 * caches [n_kv_head][n_ctx][head_dim] at position pos. */
static void store_kv_row(const fa_model *m, const fa_state *s, float *k_cache, float *v_cache,
                         const float *k, const float *v, int64_t pos) {
    const int64_t hd = m->head_dim;
    for (int64_t h = 0; h < m->n_kv_head; h++) {
        size_t at = (size_t)(h * s->n_ctx + pos) * (size_t)hd;
        memcpy(k_cache + at, k + h * hd, sizeof(float) * (size_t)hd);
        memcpy(v_cache + at, v + h * hd, sizeof(float) * (size_t)hd);
    }
}

/* gpt2: split qkv [n, 3E] rows t0 .. t1 into q [n, E] and the caches, adding
 * the fused bias on the way. */
static void split_qkv_rows(const fa_model *m, const fa_layer *L, fa_state *s,
                           float *k_cache, float *v_cache, int64_t pos0,
                           int64_t t0, int64_t t1) {
    const int64_t E = m->n_embd;
    for (int64_t t = t0; t < t1; t++) {
        float *row = s->qkv + t * 3 * E;
        add_bias_row(row, L->attn_qkv_b, 3 * E);
        memcpy(s->q + t * E, row, sizeof(float) * (size_t)E);
        store_kv_row(m, s, k_cache, v_cache, row + E, row + 2 * E, pos0 + t);
    }
}

/* llama: biases (if any), rope on q [n, E] and k [n, Ekv], then k and v into
 * the caches, rows t0 .. t1.  k, v: [n, Ekv] each. */
static void rope_store_rows(const fa_model *m, const fa_layer *L, fa_state *s,
                            float *k, float *v, float *k_cache, float *v_cache,
                            int64_t pos0, int64_t t0, int64_t t1) {
    const int64_t E = m->n_embd, Ekv = m->n_kv_head * m->head_dim;
    const int hd = (int)m->head_dim;
    for (int64_t t = t0; t < t1; t++) {
        float *qt = s->q + t * E, *kt = k + t * Ekv, *vt = v + t * Ekv;
        add_bias_row(qt, L->attn_q_b, E);
        add_bias_row(kt, L->attn_k_b, Ekv);
        add_bias_row(vt, L->attn_v_b, Ekv);
        fa_rope(qt, 1, (int)m->n_head, hd, pos0 + t, m->rope_theta, m->rope_neox, 0, 1);
        fa_rope(kt, 1, (int)m->n_kv_head, hd, pos0 + t, m->rope_theta, m->rope_neox, 0, 1);
        store_kv_row(m, s, k_cache, v_cache, kt, vt, pos0 + t);
    }
}

/* --------------------------------------------------------- the forward */

/* One chunk of n tokens at positions pos0 .. pos0 + n - 1, every layer, run by
 * thread tm->ith of tm->nth.  Writes logits rows if want_logits: all n rows into
 * logits [n, n_vocab], or only the last into logits [n_vocab]. */
static void forward_chunk(const fa_model *m, fa_state *s, const int32_t *ids, int64_t n,
                          int64_t pos0, float *logits, int want_logits, int all_rows,
                          team *tm) {
    const int ith = tm->ith, nth = tm->nth;
    const int64_t E = m->n_embd, Ekv = m->n_kv_head * m->head_dim, F = m->n_ff;
    const int64_t layer_cache = m->n_kv_head * s->n_ctx * m->head_dim;
    const int gpt2 = m->family == FA_GPT2;
    int64_t t0, t1;  /* this thread's token rows */
    share(n, ith, nth, &t0, &t1);
    int64_t f0, f1;  /* this thread's values of an [n, F] activation */
    share(n * F, ith, nth, &f0, &f1);

    /* embeddings, then the first block's attention norm */
    embed_rows(m, ids, pos0, s->x, s->xn, t0, t1);
    norm_rows(m, s->x, m->layers[0].attn_norm_w, m->layers[0].attn_norm_b, s->xn, t0, t1);
    BARRIER

    for (int64_t l = 0; l < m->n_layer; l++) {
        const fa_layer *L = &m->layers[l];
        float *k_cache = s->k_cache + l * layer_cache;
        float *v_cache = s->v_cache + l * layer_cache;

        /* attention: q, k, v; positions; cache; softmax(q k^T / sqrt(hd)) v */
        if (gpt2) {
            fa_matmul_act(m->act, &L->attn_qkv, s->xn, s->qkv, n, ith, nth);   /* -> [n, 3E] */
            BARRIER
            split_qkv_rows(m, L, s, k_cache, v_cache, pos0, t0, t1);
        } else {
            float *k = s->qkv, *v = s->qkv + s->max_chunk * Ekv;
            fa_matmul_act(m->act, &L->attn_q, s->xn, s->q, n, ith, nth);        /* -> [n, E] */
            fa_matmul_act(m->act, &L->attn_k, s->xn, k, n, ith, nth);           /* -> [n, Ekv] */
            fa_matmul_act(m->act, &L->attn_v, s->xn, v, n, ith, nth);           /* -> [n, Ekv] */
            BARRIER
            rope_store_rows(m, L, s, k, v, k_cache, v_cache, pos0, t0, t1);
        }
        BARRIER
        fa_attention(s->q, k_cache, v_cache, s->att, n, pos0, (int)m->n_head,
                     (int)m->n_kv_head, (int)m->head_dim, s->n_ctx, s->att_scratch,
                     ith, nth);                                       /* -> [n, E] */
        BARRIER
        fa_matmul_act(m->act, &L->attn_output, s->att, s->xn, n, ith, nth);     /* -> [n, E] */
        BARRIER

        /* residual, then the MLP's norm */
        add_residual(s->x, s->xn, L->attn_output_b, E, t0, t1);
        norm_rows(m, s->x, L->ffn_norm_w, L->ffn_norm_b, s->xn, t0, t1);
        BARRIER

        /* MLP: gpt2 down(gelu(up h)), llama down(silu(gate h) * up h) */
        fa_matmul_act(m->act, &L->ffn_up, s->xn, s->ffn_a, n, ith, nth);        /* -> [n, F] */
        if (!gpt2) fa_matmul_act(m->act, &L->ffn_gate, s->xn, s->ffn_b, n, ith, nth);
        BARRIER
        add_bias_range(s->ffn_a, L->ffn_up_b, F, f0, f1);
        add_bias_range(s->ffn_b, L->ffn_gate_b, F, f0, f1);
        if (gpt2) {
            fa_gelu(s->ffn_a + f0, f1 - f0, 0, 1);
        } else {
            fa_swiglu(s->ffn_b + f0, s->ffn_a + f0, f1 - f0, 0, 1);
        }
        BARRIER
        float *h = gpt2 ? s->ffn_a : s->ffn_b;
        fa_matmul_act(m->act, &L->ffn_down, h, s->xn, n, ith, nth);             /* -> [n, E] */
        BARRIER

        /* residual, then the next norm: the next block's, or the final one */
        add_residual(s->x, s->xn, L->ffn_down_b, E, t0, t1);
        if (l + 1 < m->n_layer) {
            const fa_layer *N = &m->layers[l + 1];
            norm_rows(m, s->x, N->attn_norm_w, N->attn_norm_b, s->xn, t0, t1);
        } else if (want_logits) {
            norm_rows(m, s->x, m->output_norm_w, m->output_norm_b, s->xn, t0, t1);
        }
        BARRIER
    }

    /* output head */
    if (want_logits) {
        if (all_rows)
            fa_matmul_act(m->act, &m->output, s->xn, logits, n, ith, nth);      /* -> [n, n_vocab] */
        else
            fa_matmul_act(m->act, &m->output, s->xn + (n - 1) * E, logits, 1, ith, nth);
        BARRIER
    }
}

int fa_forward(const fa_model *m, fa_state *s, const int32_t *ids, int64_t n_seq,
               float *logits, int all_logits, int n_threads) {
    /* check everything we are about to trust */
    if (!m || !s || !ids || !logits || n_seq <= 0 || !m->layers || !s->k_cache)
        return FA_ERR_ARG;
    if (s->n_layer != m->n_layer || s->n_kv_head != m->n_kv_head
        || s->head_dim != m->head_dim || s->n_embd != m->n_embd || s->n_ctx > m->n_ctx)
        return FA_ERR_ARG;
    for (int64_t t = 0; t < n_seq; t++)
        if (ids[t] < 0 || ids[t] >= m->n_vocab) return FA_ERR_BAD_ID;
    if (s->n_past < 0 || s->n_past > s->n_ctx || n_seq > s->n_ctx - s->n_past)
        return FA_ERR_OVERFLOW;
    if (n_threads < 1) n_threads = 1;
#ifndef _OPENMP
    n_threads = 1;
#endif

    /* attention scratch: n_ctx floats per thread */
    if (s->att_threads < n_threads) {
        float *scratch = alloc_floats(n_threads, s->n_ctx, 1, 1);
        if (!scratch) return FA_ERR_NOMEM;
        free(s->att_scratch);
        s->att_scratch = scratch;
        s->att_threads = n_threads;
    }

    const int64_t n_past = s->n_past, chunk = s->max_chunk;
    team_barrier barrier;
    atomic_init(&barrier.count, 0);
    atomic_init(&barrier.sense, 0);
#pragma omp parallel num_threads(n_threads)
    {
        team tm = {&barrier, 0, 1, 0};
#ifdef _OPENMP
        tm.ith = omp_get_thread_num();
        tm.nth = omp_get_num_threads();
#endif
        for (int64_t c0 = 0; c0 < n_seq; c0 += chunk) {
            int64_t n = n_seq - c0 < chunk ? n_seq - c0 : chunk;
            int last = c0 + n == n_seq;
            float *out = all_logits ? logits + c0 * m->n_vocab : logits;
            forward_chunk(m, s, ids + c0, n, n_past + c0, out, all_logits || last,
                          all_logits, &tm);
        }
    }
    s->n_past = n_past + n_seq;
    return FA_OK;
}
