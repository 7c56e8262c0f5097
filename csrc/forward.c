/*
 * The whole-model forward pass, GPT-2 and Llama, over the kernels of
 * fastattn.h.
 *
 * Letters, as everywhere in fastattn:
 *   n   tokens in the current chunk (n_seq of the call, cut in chunks)
 *   E   n_embd     Ekv  n_embd_kv = n_kv_head * head_dim     F  n_ff
 *
 * One call runs every layer inside ONE OpenMP parallel region.  Each thread
 * walks the same list of steps; a step is a kernel doing the thread's share
 * (matmul rows, attention heads) plus the element-wise work on what the
 * thread just produced (residual adds and biases of its rows, the MLP's
 * activation of its rows, bias/rope/cache of its heads when its rows are
 * whole heads), or a step shared out by token rows or (token, head) pairs.
 * A barrier (team_wait below, not OpenMP's) separates a step from the next
 * one that reads what other threads wrote.  Every value is computed by one
 * fixed sequence of operations, whichever thread runs it (a decode's norms
 * run on every thread, each into its own copy, the same arithmetic), so
 * results depend neither on the thread count nor on how a prompt is cut into
 * chunks or calls: prefill + decode == one forward, bit for bit.
 */
#include <math.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __linux__
#include <sys/mman.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#include "fa_internal.h"
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
    atomic_long *taken;  /* claim counters (claim_next), zeroed at every barrier */
} team_barrier;

/* longs between two claim counters: one per 64-byte line */
#define CLAIM_STRIDE 8

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

#define BARRIER team_wait(tm);

/* Most bytes one wait asks for: well inside a core's L2 (1 MiB on the Zen 4
 * this was measured on), so what it fetches is still there when read. */
#ifndef WAIT_PREFETCH_MAX
#define WAIT_PREFETCH_MAX ((size_t)384 * 1024)
#endif

/* team_wait, and while this thread waits, ask for the first bytes of what it
 * reads next (the next product's share of weights, fa_matmul_region) to come
 * into L2, 1 KiB between looks at the barrier.  A decode streams its weights
 * from DRAM, and a thread waiting for its partner would otherwise leave its
 * share of the memory bandwidth unused.  The last thread to arrive asks for
 * nothing, so the wait of the others does not grow.  (__builtin_prefetch
 * with locality 2 is prefetcht1, the L2 hint FA_PREFETCH_STREAM names.) */
static void team_wait_for(team *t, const void *next, size_t bytes) {
    if (t->nth <= 1) return;
    team_barrier *b = t->barrier;
    t->sense = !t->sense;
    if (atomic_fetch_add(&b->count, 1) == t->nth - 1) {
        /* every thread is here, done with the step before: the next step's
         * claims start from nothing taken */
        if (b->taken)
            for (int i = 0; i < t->nth; i++)
                atomic_store_explicit(&b->taken[i * CLAIM_STRIDE], 0, memory_order_relaxed);
        atomic_store(&b->count, 0);
        atomic_store(&b->sense, t->sense);  /* releases every write made before */
        return;
    }
    const char *p = (const char *)next;
    size_t left = !next ? 0 : bytes < WAIT_PREFETCH_MAX ? bytes : WAIT_PREFETCH_MAX;
    for (int spins = 0; atomic_load(&b->sense) != t->sense;) {
        if (left) {
            size_t step = left < 1024 ? left : 1024;
            for (size_t o = 0; o < step; o += 64) __builtin_prefetch(p + o, 0, 2);
            p += step, left -= step;
        } else if (spins++ < SPINS_BEFORE_YIELD) {
            cpu_relax();
        } else {
            sched_yield();
        }
    }
}

static void team_wait(team *t) { team_wait_for(t, NULL, 0); }

/* A barrier whose waiting thread fetches the start of its share of w. */
#define BARRIER_BEFORE(w)                                                     \
    {                                                                         \
        const void *next_;                                                    \
        size_t next_bytes_ = fa_matmul_region(m->act, (w), ith, nth, &next_); \
        team_wait_for(tm, next_, next_bytes_);                                \
    }

/* A barrier whose waiting thread fetches the weights of rows [r0, r1) of w. */
#define BARRIER_BEFORE_ROWS(w, r0, r1)                                               \
    {                                                                             \
        const void *next_;                                                        \
        size_t next_bytes_ = fa_matmul_region_rows(m->act, (w), (r0), (r1), &next_); \
        team_wait_for(tm, next_, next_bytes_);                                    \
    }

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
    if (m->family == FA_LLAMA && m->head_dim % 2) return FA_ERR_ARG;  /* rope pairs */

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

#define HUGE_PAGE ((size_t)2 << 20)

void fa_advise_huge(void *p, size_t n) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    uintptr_t lo = ((uintptr_t)p + HUGE_PAGE - 1) & ~(uintptr_t)(HUGE_PAGE - 1);
    uintptr_t hi = ((uintptr_t)p + n) & ~(uintptr_t)(HUGE_PAGE - 1);
    if (p && hi > lo) madvise((void *)lo, hi - lo, MADV_HUGEPAGE);  /* a hint */
#else
    (void)p, (void)n;
#endif
}

/* The KV cache: a * b * c * d values of es bytes each (4 float32, 2 float16),
 * or NULL if the byte count overflows or malloc fails.  A cache of 2 to
 * HUGE_CACHE_MAX bytes (its own byte count, so a float16 cache qualifies up
 * to twice the positions) is aligned to 2 MiB and put on huge pages
 * (fa_advise_huge).  A decode reads the whole cache at every step; with
 * 4 KiB pages its chunks keep missing the TLB (benchmarks/stream_decode.c
 * attention, one thread from DRAM: 17 -> 21 GB/s).  The cap bounds the cost:
 * a huge page is resident as soon as one position in it is written, so a
 * large cache used for a few positions (a chat session sized to the model's
 * context) would hold memory it does not use; such caches keep small pages. */
#define HUGE_CACHE_MAX ((size_t)32 << 20)
static void *alloc_cache(size_t es, int64_t a, int64_t b, int64_t c, int64_t d) {
    size_t n = es;
    int64_t dims[4] = {a, b, c, d};
    for (int i = 0; i < 4; i++) {
        if (dims[i] <= 0 || __builtin_mul_overflow(n, (size_t)dims[i], &n)) return NULL;
    }
    if (n >= HUGE_PAGE && n <= HUGE_CACHE_MAX) {
        size_t whole = (n + HUGE_PAGE - 1) / HUGE_PAGE * HUGE_PAGE;
        void *p = aligned_alloc(HUGE_PAGE, whole);
        if (p) {
            fa_advise_huge(p, whole);
            return p;
        }
    }
    return malloc(n);
}

int fa_state_init(fa_state *s, const fa_model *m, int64_t n_ctx, int64_t max_chunk) {
    return fa_state_init_kv(s, m, n_ctx, max_chunk, FA_F32);
}

/* Bytes of one cache value, 0 for a type the cache cannot hold. */
static size_t kv_bytes(int kv_type) {
    return kv_type == FA_F32 ? sizeof(float) : kv_type == FA_F16 ? sizeof(uint16_t) : 0;
}

int fa_state_init_kv(fa_state *s, const fa_model *m, int64_t n_ctx, int64_t max_chunk,
                     int kv_type) {
    if (!s) return FA_ERR_ARG;
    memset(s, 0, sizeof(*s));
    if (fa_model_check(m) != FA_OK || n_ctx <= 0 || n_ctx > m->n_ctx || max_chunk <= 0
        || kv_bytes(kv_type) == 0)
        return FA_ERR_ARG;

    const int64_t E = m->n_embd, Ekv = m->n_kv_head * m->head_dim, F = m->n_ff;
    const int64_t chunk = max_chunk < n_ctx ? max_chunk : n_ctx;
    s->n_layer = m->n_layer;
    s->n_kv_head = m->n_kv_head;
    s->head_dim = m->head_dim;
    s->n_embd = E;
    s->n_ctx = n_ctx;
    s->max_chunk = chunk;
    s->kv_type = kv_type;

    /* the cache: [n_layer][n_kv_head][n_ctx][head_dim] each for K and V */
    const size_t es = kv_bytes(kv_type);
    s->k_cache = alloc_cache(es, m->n_layer, m->n_kv_head, n_ctx, m->head_dim);
    s->v_cache = alloc_cache(es, m->n_layer, m->n_kv_head, n_ctx, m->head_dim);

    /* scratch for one chunk of tokens */
    s->x = alloc_floats(chunk, E, 1, 1);
    s->xn = alloc_floats(chunk, E, 1, 1);
    s->q = alloc_floats(chunk, E, 1, 1);
    s->qkv = alloc_floats(chunk, m->family == FA_GPT2 ? 3 * E : 2 * Ekv, 1, 1);
    s->att = alloc_floats(chunk, E, 1, 1);
    s->ffn_a = alloc_floats(chunk, F, 1, 1);
    s->ffn_b = alloc_floats(chunk, F, 1, 1);
    s->own_rows = chunk < FA_OWN_ROWS ? chunk : FA_OWN_ROWS;
    s->n_head = m->n_head;
    s->att_part = alloc_floats(s->own_rows * m->n_head,
                               (n_ctx + FA_ATT_CHUNK - 1) / FA_ATT_CHUNK,
                               FA_ATT_PART(m->head_dim), 1);
    if (m->family == FA_LLAMA) {
        s->rope_cs = alloc_floats(chunk, m->head_dim, 1, 1);
    }
    const size_t xq_bytes = fa_q8_rows_bytes(chunk, E);  /* 0 if E is not whole blocks */
    if (xq_bytes) s->xq = malloc(xq_bytes);
    const size_t xq_ff_bytes = fa_q8_rows_bytes(chunk, F);
    if (xq_ff_bytes) s->xq_ff = malloc(xq_ff_bytes);
    if (!s->k_cache || !s->v_cache || !s->x || !s->xn || !s->q || !s->qkv || !s->att
        || !s->ffn_a || !s->ffn_b || !s->att_part || (m->family == FA_LLAMA && !s->rope_cs)
        || (xq_bytes && !s->xq) || (xq_ff_bytes && !s->xq_ff)) {
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
    free(s->xn_own);
    free(s->att_part);
    free(s->rope_cs);
    free(s->xq);
    free(s->xq_ff);
    free(s->claims);
    free(s->prep_own);
    memset(s, 0, sizeof(*s));
}

/* ------------------------------------------------------ row-local steps */

/* Known shortcoming: the embedding lookup and the rope angles still split by
 * token rows, so while decoding one token they run on thread 0 while the
 * others wait at the barrier after them; that is once per call, not per
 * layer.  The per-layer row-local steps are gone from a decode: its norms run
 * on every thread (a few microseconds of repeated work, cheaper than a
 * barrier), residual adds and the activation are fused into the products,
 * and the head step (biases, rope, cache writes) is either fused or shared
 * out by (token, head) pairs. */

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

/* fa_matmul_act(m->act, w, xn, ...) on normed rows, from their quantized
 * copy xq when the caller made one (a q8 prefill): the same bits. */
static void product_xn(const fa_model *m, const fa_weight *w, const float *xn, const void *xq,
                       float *y, int64_t n, int ith, int nth) {
    if (xq)
        fa_matmul_q8_rows(w, xq, xn, y, n, ith, nth);
    else
        fa_matmul_act(m->act, w, xn, y, n, ith, nth);
}

/* Cos and sin of every rotation angle of positions pos0 + t0 .. pos0 + t1 - 1:
 * cs [n, head_dim / 2, 2].  The same arithmetic as fa_rope (ops.c), so a
 * rotation by this table gives fa_rope's numbers; computed once per chunk
 * instead of once per layer for q and again for k. */
static void rope_table_rows(const fa_model *m, float *cs, int64_t pos0, int64_t t0,
                            int64_t t1) {
    const int hd = (int)m->head_dim, half = hd / 2;
    for (int64_t t = t0; t < t1; t++) {
        double pos = (double)(pos0 + t);
        float *ct = cs + t * hd;
        for (int i = 0; i < half; i++) {
            double angle = pos * pow((double)m->rope_theta, -2.0 * i / hd);
            ct[2 * i] = (float)cos(angle);
            ct[2 * i + 1] = (float)sin(angle);
        }
    }
}

/* Rotate one head x [head_dim] by the angles ct [head_dim / 2, 2]. */
static void rope_head(float *x, const float *ct, int hd, int neox) {
    const int half = hd / 2;
    for (int i = 0; i < half; i++) {
        float c = ct[2 * i], sn = ct[2 * i + 1];
        int a = neox ? i : 2 * i;
        int b = neox ? i + half : 2 * i + 1;
        float x0 = x[a], x1 = x[b];
        x[a] = x0 * c - x1 * sn;
        x[b] = x0 * sn + x1 * c;
    }
}

/* x[i] += b[i] for i < n, when b is given. */
static void add_bias(float *x, const float *b, int64_t n) {
    if (!b) return;
    for (int64_t i = 0; i < n; i++) x[i] += b[i];
}

/* ------------------------------------------------------- head-local steps
 *
 * Between the q/k/v products and attention, each head of each token needs
 * its bias, rope (llama) and, for k and v, its place in the cache.  These are
 * done per (token, head): by the thread that computed the head's rows, right
 * after its product, when every thread's rows fall on head boundaries; else
 * after a barrier, with the (token, head) pairs shared out evenly, so that a
 * decode of one token keeps every thread busy. */

/* Where the q, k and v heads of token t are.  gpt2: one qkv row [3E] with
 * q, k, v one after the other; llama: q [n, E], k and v [n, Ekv]. */
typedef struct {
    float *q, *k, *v;         /* the products */
    int64_t ldq, ldk, ldv;    /* their row strides */
    void *k_cache, *v_cache;  /* this layer's, of s->kv_type */
    const float *bq, *bk, *bv;
    int64_t pos0;
} head_io;

static void q_head(const fa_model *m, fa_state *s, const head_io *io, int64_t t, int64_t h) {
    const int64_t hd = m->head_dim;
    float *qh = io->q + t * io->ldq + h * hd;
    if (io->bq) add_bias(qh, io->bq + h * hd, hd);
    if (m->family == FA_LLAMA)
        rope_head(qh, s->rope_cs + t * hd, (int)hd, m->rope_neox);
    if (qh != s->q + t * m->n_embd + h * hd)  /* gpt2: out of the qkv row */
        memcpy(s->q + t * m->n_embd + h * hd, qh, sizeof(float) * (size_t)hd);
}

/* Head h of token t into its cache row: copied (float32), or rounded to
 * halves (float16) by the level's F16C converter, whose bits the generic
 * converter matches.
 *
 * Known shortcoming: a float16 cache holds magnitudes up to 65504 only; a
 * key or value beyond that is stored as inf and its head's attention output
 * turns NaN, with no error.  Nothing checks or clamps (llama.cpp's f16 cache
 * does neither); the keys and values of the models tried stay far below. */
static void cache_row(const fa_state *s, void *cache, const float *x, int64_t t, int64_t h,
                      int64_t pos0, int64_t hd) {
    const size_t at = (size_t)(h * s->n_ctx + pos0 + t) * (size_t)hd;
    if (s->kv_type == FA_F16)
        fa_kernels_current()->to_f16((uint16_t *)cache + at, x, hd);
    else
        memcpy((float *)cache + at, x, sizeof(float) * (size_t)hd);
}

static void k_head(const fa_model *m, fa_state *s, const head_io *io, int64_t t, int64_t h) {
    const int64_t hd = m->head_dim;
    float *kh = io->k + t * io->ldk + h * hd;
    if (io->bk) add_bias(kh, io->bk + h * hd, hd);
    if (m->family == FA_LLAMA)
        rope_head(kh, s->rope_cs + t * hd, (int)hd, m->rope_neox);
    cache_row(s, io->k_cache, kh, t, h, io->pos0, hd);
}

static void v_head(const fa_model *m, fa_state *s, const head_io *io, int64_t t, int64_t h) {
    const int64_t hd = m->head_dim;
    float *vh = io->v + t * io->ldv + h * hd;
    if (io->bv) add_bias(vh, io->bv + h * hd, hd);
    cache_row(s, io->v_cache, vh, t, h, io->pos0, hd);
}

/* Thread ith's even share of the n * (n_head + n_kv_head) (token, head)
 * units; a kv unit does the k head and the v head. */
static void heads_shared(const fa_model *m, fa_state *s, const head_io *io, int64_t n,
                         int ith, int nth) {
    const int64_t per_token = m->n_head + m->n_kv_head;
    int64_t u0, u1;
    share(n * per_token, ith, nth, &u0, &u1);
    for (int64_t u = u0; u < u1; u++) {
        int64_t t = u / per_token, j = u % per_token;
        if (j < m->n_head) {
            q_head(m, s, io, t, j);
        } else {
            k_head(m, s, io, t, j - m->n_head);
            v_head(m, s, io, t, j - m->n_head);
        }
    }
}

/* The rows [r0, r1) of a product that thread ith writes, in whole heads:
 * *h0, *h1 heads, or 0 if the rows do not fall on head boundaries. */
static int share_heads(const fa_model *m, const fa_weight *w, int ith, int nth,
                       int64_t *h0, int64_t *h1) {
    int64_t r0, r1;
    fa_matmul_share(m->act, w, ith, nth, &r0, &r1);
    if (r0 < 0 || r1 < r0 || r1 > w->n_out || r0 % m->head_dim || r1 % m->head_dim)
        return 0;
    *h0 = r0 / m->head_dim;
    *h1 = r1 / m->head_dim;
    return 1;
}

/* Do all the threads' shares of the q/k/v products fall on head boundaries?
 * Every thread asks about every thread, so all take the same path. */
static int heads_fusable(const fa_model *m, const fa_layer *L, int nth) {
    int64_t h0, h1;
    for (int i = 0; i < nth; i++) {
        if (m->family == FA_GPT2) {
            if (!share_heads(m, &L->attn_qkv, i, nth, &h0, &h1)) return 0;
        } else if (!share_heads(m, &L->attn_q, i, nth, &h0, &h1)
                   || !share_heads(m, &L->attn_k, i, nth, &h0, &h1)
                   || !share_heads(m, &L->attn_v, i, nth, &h0, &h1)) {
            return 0;
        }
    }
    return 1;
}

/* The heads of thread ith's own product rows, every token (heads_fusable). */
static void heads_own(const fa_model *m, const fa_layer *L, fa_state *s, const head_io *io,
                      int64_t n, int ith, int nth) {
    int64_t h0 = 0, h1 = 0;  /* heads_fusable said every share_heads succeeds */
    if (m->family == FA_GPT2) {
        /* qkv heads: n_head of q, then n_head of k, then n_head of v */
        share_heads(m, &L->attn_qkv, ith, nth, &h0, &h1);
        const int64_t nh = m->n_head;
        for (int64_t t = 0; t < n; t++)
            for (int64_t h = h0; h < h1; h++) {
                if (h < nh) q_head(m, s, io, t, h);
                else if (h < 2 * nh) k_head(m, s, io, t, h - nh);
                else v_head(m, s, io, t, h - 2 * nh);
            }
        return;
    }
    share_heads(m, &L->attn_q, ith, nth, &h0, &h1);
    for (int64_t t = 0; t < n; t++)
        for (int64_t h = h0; h < h1; h++) q_head(m, s, io, t, h);
    share_heads(m, &L->attn_k, ith, nth, &h0, &h1);
    for (int64_t t = 0; t < n; t++)
        for (int64_t h = h0; h < h1; h++) k_head(m, s, io, t, h);
    share_heads(m, &L->attn_v, ith, nth, &h0, &h1);
    for (int64_t t = 0; t < n; t++)
        for (int64_t h = h0; h < h1; h++) v_head(m, s, io, t, h);
}

/* --------------------------------------------- steps fused into products */

/* x[t, r] += y[t, r] (+ b[r]) for the rows [r0, r1) thread ith wrote of the
 * product y [n, E] by w, every token t: the residual add, done by the thread
 * that produced the values, needs no barrier of its own. */
static void residual_rows(const fa_model *m, float *x, const float *y, const float *b,
                          int64_t n, int64_t r0, int64_t r1) {
    const int64_t E = m->n_embd;
    for (int64_t t = 0; t < n; t++) {
        float *xt = x + t * E;
        const float *yt = y + t * E;
        if (b) {
            for (int64_t i = r0; i < r1; i++) xt[i] += yt[i] + b[i];
        } else {
            for (int64_t i = r0; i < r1; i++) xt[i] += yt[i];
        }
    }
}

static void residual_own(const fa_model *m, const fa_weight *w, float *x, const float *y,
                         const float *b, int64_t n, int ith, int nth) {
    int64_t r0, r1;
    fa_matmul_share(m->act, w, ith, nth, &r0, &r1);
    if (r0 < 0 || r1 > m->n_embd || r1 <= r0) return;  /* n_out == E: checked with the model */
    residual_rows(m, x, y, b, n, r0, r1);
}

/* Do up and gate give every thread the same rows?  (Same n_out, but their
 * layouts may differ; then the activation waits for a barrier.) */
static int mlp_fusable(const fa_model *m, const fa_layer *L, int nth) {
    if (m->family == FA_GPT2) return 1;
    for (int i = 0; i < nth; i++) {
        int64_t a0, a1, b0, b1;
        fa_matmul_share(m->act, &L->ffn_up, i, nth, &a0, &a1);
        fa_matmul_share(m->act, &L->ffn_gate, i, nth, &b0, &b1);
        if (a0 != b0 || a1 != b1) return 0;
    }
    return 1;
}

/* Biases, then gelu (gpt2) or swiglu (llama) of the values [r0, r1) of each
 * token's row of ffn_a (up) and ffn_b (gate), F wide. */
static void mlp_act_cols(const fa_model *m, const fa_layer *L, fa_state *s, int64_t n,
                         int64_t r0, int64_t r1) {
    const int64_t F = m->n_ff;
    for (int64_t t = 0; t < n; t++) {
        float *a = s->ffn_a + t * F, *g = s->ffn_b + t * F;
        if (L->ffn_up_b) add_bias(a + r0, L->ffn_up_b + r0, r1 - r0);
        if (m->family == FA_GPT2) {
            fa_gelu(a + r0, r1 - r0, 0, 1);
        } else {
            if (L->ffn_gate_b) add_bias(g + r0, L->ffn_gate_b + r0, r1 - r0);
            fa_swiglu(g + r0, a + r0, r1 - r0, 0, 1);
        }
    }
}

/* The same over the flat values [i0, i1) of ffn_a / ffn_b [n, F]. */
static void mlp_act_flat(const fa_model *m, const fa_layer *L, fa_state *s, int64_t i0,
                         int64_t i1) {
    const int64_t F = m->n_ff;
    if (L->ffn_up_b)
        for (int64_t i = i0; i < i1; i++) s->ffn_a[i] += L->ffn_up_b[i % F];
    if (m->family == FA_GPT2) {
        fa_gelu(s->ffn_a + i0, i1 - i0, 0, 1);
    } else {
        if (L->ffn_gate_b)
            for (int64_t i = i0; i < i1; i++) s->ffn_b[i] += L->ffn_gate_b[i % F];
        fa_swiglu(s->ffn_b + i0, s->ffn_a + i0, i1 - i0, 0, 1);
    }
}

/* ------------------------------------------------ a decode's claimed steps
 *
 * A decode's products are short, and with fixed shares the two threads of a
 * SmolLM2 decode reached the barrier after each 1.2-2.2 us apart on average
 * (a build that timed its waits): about 6% of the threads' time went to
 * waiting, and on a shared machine a thread that loses its core for a
 * moment holds up the other for as long.  So a decode (a chunk of at most
 * FA_OWN_ROWS tokens, more than one thread) hands out its products' rows
 * while they run: the rows are cut into units (below, or a head for q, k
 * and v), each thread has its even share of the units,
 * and it takes chunks of its own share, then of the others' shares, until
 * none is left; the work fused into a product (residual add, activation,
 * head steps) is done chunk by chunk by the thread that computed it.  Which
 * thread computes a row changes no number (each y element is one fixed
 * sequence of operations), so results stay bit-identical to the fixed
 * shares'.  Each thread prepares the product's input once (fa_matmul_prepare)
 * for all the chunks it takes.  A unit is as many rows as the level's decode
 * kernel runs side by side (fa_matmul_unit_rows: 64 for the AVX-512 float
 * path); 16-row units there ran 1.5% slower than fixed shares.  Measured on
 * SmolLM2, 2 threads, median of 12 interleaved pairs against fixed shares:
 * exact +1.4% and +2.9%, q8 +2.2%, q8 with the f16 cache +5.4%. */

/* Where a thread is in taking chunks: the k-th share it drains (its own,
 * then the next thread's, ...). */
typedef struct {
    int k;
} claim_iter;

/* A third of what is left of a share per chunk: big chunks while much is
 * left, single units at the end, where the threads even out. */
#define CLAIM_PART 3

/* The next chunk [*a, *b) of the n units for thread tm->ith, and in *end the
 * end of the share it comes from; 0 once every share is used up.  The
 * counters are zeroed at the barrier before the step (team_wait_for). */
static int claim_next(const team *tm, int64_t n, claim_iter *it, int64_t *a, int64_t *b,
                      int64_t *end) {
    for (; it->k < tm->nth; it->k++) {
        const int v = (tm->ith + it->k) % tm->nth;
        int64_t u0, u1;
        share(n, v, tm->nth, &u0, &u1);
        atomic_long *taken = &tm->barrier->taken[v * CLAIM_STRIDE];
        long cur = atomic_load_explicit(taken, memory_order_relaxed);
        while (u0 + cur < u1) {
            int64_t size = (u1 - u0 - cur + CLAIM_PART - 1) / CLAIM_PART;
            if (atomic_compare_exchange_weak_explicit(taken, &cur, cur + (long)size,
                                                      memory_order_relaxed,
                                                      memory_order_relaxed)) {
                *a = u0 + cur;
                *b = *a + size;
                *end = u1;
                return 1;
            }
        }
    }
    return 0;
}

/* A product's rows in units of `unit` rows (fa_matmul_unit_rows): how many
 * units n_out rows make, and the first row of unit u. */
static int64_t row_units(int64_t n_out, int64_t unit) { return (n_out + unit - 1) / unit; }
static int64_t unit_row(int64_t u, int64_t unit, int64_t n_out) {
    return unit * u < n_out ? unit * u : n_out;
}

/* y = p's x times w, by claimed chunks of rows; then the residual add
 * x += y (+ b) of those rows when x is given (the out and down products). */
static void product_claimed(const fa_model *m, const fa_prepared *p, const fa_weight *w,
                            float *y, float *x, const float *b, const team *tm) {
    const int64_t n_out = w->n_out, unit = fa_matmul_unit_rows(m->act, w);
    claim_iter it = {0};
    int64_t a, e, end;
    while (claim_next(tm, row_units(n_out, unit), &it, &a, &e, &end)) {
        const int64_t r0 = unit_row(a, unit, n_out), r1 = unit_row(e, unit, n_out);
        fa_matmul_range(p, w, y, r0, r1, unit_row(end, unit, n_out));
        if (x) residual_rows(m, x, y, b, p->n_seq, r0, r1);
    }
}

/* y = in [n, w->n_in] times w, then the residual add s->x += y (+ b): by
 * claimed chunks (a decode on several threads, its input prepared into
 * prep_buf), else by fixed shares, from in's quantized copy inq when the
 * caller made one (product_xn). */
static void product_residual(const fa_model *m, fa_state *s, const fa_weight *w,
                             const float *b, const float *in, const void *inq, float *y,
                             int64_t n, int claimed, void *prep_buf, const team *tm) {
    if (claimed) {
        fa_prepared prep;
        fa_matmul_prepare(&prep, m->act, in, n, w->n_in, prep_buf);
        product_claimed(m, &prep, w, y, s->x, b, tm);
        return;
    }
    product_xn(m, w, in, inq, y, n, tm->ith, tm->nth);
    residual_own(m, w, s->x, y, b, n, tm->ith, tm->nth);
}

/* The MLP's up (and gate) products and activation, by claimed chunks of
 * the n_ff rows (columns of the activation). */
static void mlp_claimed(const fa_model *m, const fa_layer *L, fa_state *s,
                        const fa_prepared *p, const team *tm) {
    const int64_t F = m->n_ff, unit = fa_matmul_unit_rows(m->act, &L->ffn_up);
    claim_iter it = {0};
    int64_t a, e, end;
    while (claim_next(tm, row_units(F, unit), &it, &a, &e, &end)) {
        const int64_t r0 = unit_row(a, unit, F), r1 = unit_row(e, unit, F);
        const int64_t pf = unit_row(end, unit, F);
        fa_matmul_range(p, &L->ffn_up, s->ffn_a, r0, r1, pf);
        if (m->family == FA_LLAMA) fa_matmul_range(p, &L->ffn_gate, s->ffn_b, r0, r1, pf);
        mlp_act_cols(m, L, s, p->n_seq, r0, r1);
    }
}

/* The q/k/v heads as units: llama n_head q heads, then n_kv_head k heads,
 * then as many v heads; gpt2 the 3 n_head heads of the fused product. */
static int64_t qkv_units(const fa_model *m) {
    return m->family == FA_GPT2 ? 3 * m->n_head : m->n_head + 2 * m->n_kv_head;
}

/* The product unit u belongs to, its output, and its first and end units. */
static const fa_weight *qkv_unit(const fa_model *m, const fa_layer *L, const head_io *io,
                                 int64_t u, float **y, int64_t *first, int64_t *last) {
    const int64_t nh = m->n_head, nkv = m->n_kv_head;
    if (m->family == FA_GPT2) {
        *y = io->q, *first = 0, *last = 3 * nh;  /* io->q is the fused qkv row */
        return &L->attn_qkv;
    }
    if (u < nh) {
        *y = io->q, *first = 0, *last = nh;
        return &L->attn_q;
    }
    if (u < nh + nkv) {
        *y = io->k, *first = nh, *last = nh + nkv;
        return &L->attn_k;
    }
    *y = io->v, *first = nh + nkv, *last = nh + 2 * nkv;
    return &L->attn_v;
}

/* The head step of unit u (bias, rope, cache) for every token. */
static void qkv_unit_heads(const fa_model *m, fa_state *s, const head_io *io, int64_t u,
                           int64_t n) {
    const int64_t nh = m->n_head, nkv = m->n_kv_head;
    const int64_t nq = nh, nk = m->family == FA_GPT2 ? nh : nkv;
    for (int64_t t = 0; t < n; t++) {
        if (u < nq) q_head(m, s, io, t, u);
        else if (u < nq + nk) k_head(m, s, io, t, u - nq);
        else v_head(m, s, io, t, u - nq - nk);
    }
}

/* q, k and v and their head steps, by claimed chunks of whole heads
 * (head_dim a multiple of 16, so heads are whole units of the products). */
static void qkv_claimed(const fa_model *m, const fa_layer *L, fa_state *s, const head_io *io,
                        const fa_prepared *p, const team *tm) {
    const int64_t hd = m->head_dim;
    claim_iter it = {0};
    int64_t a, e, end;
    while (claim_next(tm, qkv_units(m), &it, &a, &e, &end)) {
        for (int64_t u = a; u < e;) {
            float *y;
            int64_t first, last;
            const fa_weight *w = qkv_unit(m, L, io, u, &y, &first, &last);
            const int64_t v = e < last ? e : last, pf = end < last ? end : last;
            fa_matmul_range(p, w, y, (u - first) * hd, (v - first) * hd, (pf - first) * hd);
            for (; u < v; u++) qkv_unit_heads(m, s, io, u, p->n_seq);
        }
    }
}

/* The weight bytes of thread ith's first q/k/v heads (for BARRIER_BEFORE). */
static size_t qkv_region(const fa_model *m, const fa_layer *L, int ith, int nth,
                         const void **start) {
    int64_t u0, u1, first, last;
    float *y;
    head_io io = {0};
    share(qkv_units(m), ith, nth, &u0, &u1);
    *start = NULL;
    if (u0 >= u1) return 0;
    const fa_weight *w = qkv_unit(m, L, &io, u0, &y, &first, &last);
    const int64_t v = u1 < last ? u1 : last;
    return fa_matmul_region_rows(m->act, w, (u0 - first) * m->head_dim,
                                 (v - first) * m->head_dim, start);
}

/* Where a q8 prefill quantizes layer L's MLP activation for the down
 * product, each thread the blocks of the columns it computed, right after
 * computing them (fa_q8_quantize_cols), before the barrier that comes anyway;
 * NULL when the activation is not fused (mlp_fusable) or a thread's columns
 * are not whole blocks, and then the down product quantizes its input on
 * every thread.  SmolLM2 q8 prefill +1.3 % (8 of 10 interleaved pairs). */
static void *mlp_quantized(const fa_model *m, const fa_layer *L, const fa_state *s, int nth) {
    if (m->act != FA_ACT_Q8 || !s->xq_ff || !mlp_fusable(m, L, nth)) return NULL;
    for (int i = 0; i < nth; i++) {
        int64_t a0, a1;
        fa_matmul_share(m->act, &L->ffn_up, i, nth, &a0, &a1);
        if (a0 % FA_QK || (a1 % FA_QK && a1 != m->n_ff)) return NULL;
    }
    return s->xq_ff;
}

/* --------------------------------------------------------- the forward */

/* Floats of one thread's own copies: normed rows, attention rows, merge scratch. */
static int64_t own_floats(const fa_state *s) {
    return 2 * s->own_rows * s->n_embd + FA_ATT_PART(s->head_dim);
}

/* One chunk of n tokens at positions pos0 .. pos0 + n - 1, every layer, run by
 * thread tm->ith of tm->nth.  Writes logits rows if want_logits: all n rows into
 * logits [n, n_vocab], or only the last into logits [n_vocab].
 *
 * Barriers per layer: 5 for a decode (at most FA_OWN_ROWS tokens) on more
 * than one thread, whose products hand out their rows as they run (claimed
 * steps, above; q, k and v by whole heads when head_dim is a multiple of 16,
 * else by fixed shares as a longer chunk does, and 1 more).  A longer chunk:
 * 5 when its q/k/v shares fall on head boundaries, 6 when they do not
 * (SmolLM2 on 2 threads: 288 of q's 576 rows each, 4.5 heads), one more if
 * up and gate give a thread different rows, and 2 more for its norms.
 *   q/k/v products | (heads shared out) | attention | out product + residual |
 *   norm, up/gate products + activation | down product + residual | norm
 * A decode's norms run on every thread over every row, each into its own
 * copy (xn_own), so no barrier follows them; a longer chunk shares the rows
 * of its norms and waits, since redoing them on every thread would cost more
 * than the barrier.  A decode's attention is split over (KV head, chunk of
 * 64 keys) units, which keeps the threads even whatever the head count (9
 * heads on 2 threads were 4 against 5) and reads each key once; after the
 * barrier every thread merges every head's chunk states into its own copy of
 * the attention rows, which its out product then reads.  A longer chunk
 * splits attention by (KV head, query) and merges as it goes, with the same
 * operations (csrc/ops.c), so a prefill and a decode agree bit for bit. */
static void forward_chunk(const fa_model *m, fa_state *s, const int32_t *ids, int64_t n,
                          int64_t pos0, float *logits, int want_logits, int all_rows,
                          int more, team *tm) {
    const int ith = tm->ith, nth = tm->nth;
    const int64_t E = m->n_embd, Ekv = m->n_kv_head * m->head_dim, F = m->n_ff;
    const int64_t layer_cache = m->n_kv_head * s->n_ctx * m->head_dim;
    const size_t kv_es = kv_bytes(s->kv_type);
    const int gpt2 = m->family == FA_GPT2;
    int64_t t0, t1;  /* this thread's token rows */
    share(n, ith, nth, &t0, &t1);
    int64_t f0, f1;  /* this thread's values of an [n, F] activation */
    share(n * F, ith, nth, &f0, &f1);

    /* normed rows: every thread's own copy of all n rows (nr0 = 0, nr1 = n), or
     * one shared array with this thread's rows (nr0 = t0, nr1 = t1) */
    const int own = n <= s->own_rows;
    float *mine = s->xn_own + ith * own_floats(s);
    float *xn = own ? mine : s->xn;
    float *att = own ? mine + s->own_rows * E : s->att;  /* attention rows, all n */
    const int64_t nr0 = own ? 0 : t0, nr1 = own ? n : t1;
    float *y = s->xn;  /* the out and down products, before their residual adds */
    /* a longer chunk in q8 mode quantizes each shared normed input once, each
     * thread its own rows, for the products that read it (q, k, v; up, gate)
     * instead of every thread quantizing all rows for each of them; a decode
     * (own rows) lets each product quantize its one row */
    void *xq = !own && m->act == FA_ACT_Q8 ? s->xq : NULL;

#define QUANTIZE_XN                                        \
    if (xq) fa_q8_quantize_rows(xn, E, n, nr0, nr1, xq);
    /* a decode on more than one thread hands out its products' rows as they
     * run (claim_next); q, k and v by whole heads when heads are whole units */
    const int claimed = own && nth > 1 && s->claims;
    const int qkv_by_heads = claimed && m->head_dim % 16 == 0;
    void *prep_buf = claimed && s->prep_own ? (char *)s->prep_own + (size_t)ith * s->prep_bytes
                                            : NULL;
    fa_prepared prep;
/* the barrier before a product, its waiting thread fetching the weights of
 * the rows it computes first */
#define BARRIER_BEFORE_PRODUCT(w)                                                \
    if (claimed) {                                                               \
        const int64_t unit_ = fa_matmul_unit_rows(m->act, (w)), n_ = (w)->n_out;  \
        int64_t u0_, u1_;                                                        \
        share(row_units(n_, unit_), ith, nth, &u0_, &u1_);                       \
        BARRIER_BEFORE_ROWS((w), unit_row(u0_, unit_, n_), unit_row(u1_, unit_, n_)) \
    } else                                                                       \
        BARRIER_BEFORE(w)

    /* embeddings and rope angles, then the first block's attention norm */
    embed_rows(m, ids, pos0, s->x, s->att, t0, t1);
    if (!gpt2) rope_table_rows(m, s->rope_cs, pos0, t0, t1);
    BARRIER
    norm_rows(m, s->x, m->layers[0].attn_norm_w, m->layers[0].attn_norm_b, xn, nr0, nr1);
    QUANTIZE_XN
    if (!own) BARRIER

    for (int64_t l = 0; l < m->n_layer; l++) {
        const fa_layer *L = &m->layers[l];
        void *xq_ff = !own ? mlp_quantized(m, L, s, nth) : NULL;
        head_io io;
        io.k_cache = (char *)s->k_cache + (size_t)(l * layer_cache) * kv_es;
        io.v_cache = (char *)s->v_cache + (size_t)(l * layer_cache) * kv_es;
        io.pos0 = pos0;

        /* attention: q, k, v; biases, positions, cache; softmax(q k^T / sqrt(hd)) v */
        if (gpt2) {
            io.q = s->qkv, io.k = s->qkv + E, io.v = s->qkv + 2 * E;
            io.ldq = io.ldk = io.ldv = 3 * E;
            io.bq = L->attn_qkv_b;
            io.bk = L->attn_qkv_b ? L->attn_qkv_b + E : NULL;
            io.bv = L->attn_qkv_b ? L->attn_qkv_b + 2 * E : NULL;
        } else {
            io.q = s->q, io.k = s->qkv, io.v = s->qkv + s->max_chunk * Ekv;
            io.ldq = E, io.ldk = io.ldv = Ekv;
            io.bq = L->attn_q_b, io.bk = L->attn_k_b, io.bv = L->attn_v_b;
        }
        if (qkv_by_heads) {
            fa_matmul_prepare(&prep, m->act, xn, n, E, prep_buf);
            qkv_claimed(m, L, s, &io, &prep, tm);
        } else {
            if (gpt2) {
                product_xn(m, &L->attn_qkv, xn, xq, s->qkv, n, ith, nth);      /* -> [n, 3E] */
            } else {
                product_xn(m, &L->attn_q, xn, xq, io.q, n, ith, nth);          /* -> [n, E] */
                product_xn(m, &L->attn_k, xn, xq, io.k, n, ith, nth);          /* -> [n, Ekv] */
                product_xn(m, &L->attn_v, xn, xq, io.v, n, ith, nth);          /* -> [n, Ekv] */
            }
            if (heads_fusable(m, L, nth)) {
                heads_own(m, L, s, &io, n, ith, nth);
            } else {
                BARRIER
                heads_shared(m, s, &io, n, ith, nth);
            }
        }
        BARRIER
        if (own) {
            /* (query, KV head, key chunk) units, even over the threads; then
             * every thread merges every head into its own copy */
            fa_attention_chunks_kv(s->q, io.k_cache, io.v_cache, s->kv_type, s->att_part, n,
                                   pos0, (int)m->n_head, (int)m->n_kv_head,
                                   (int)m->head_dim, s->n_ctx, ith, nth);
            BARRIER_BEFORE_PRODUCT(&L->attn_output)
            fa_attention_merge(s->att_part, att, n, pos0, (int)m->n_head, (int)m->head_dim,
                               s->n_ctx, 0, (int)m->n_head, att + s->own_rows * E);
        } else {
            fa_attention_kv(s->q, io.k_cache, io.v_cache, s->kv_type, att, n, pos0,
                            (int)m->n_head, (int)m->n_kv_head, (int)m->head_dim, s->n_ctx,
                            ith, nth);                                /* -> [n, E] */
            BARRIER_BEFORE(&L->attn_output)
        }
        product_residual(m, s, &L->attn_output, L->attn_output_b, att, NULL, y, n, claimed,
                         prep_buf, tm);                                          /* -> [n, E] */
        BARRIER_BEFORE_PRODUCT(&L->ffn_up)

        /* the MLP's norm; gpt2 down(gelu(up h)), llama down(silu(gate h) * up h) */
        const float *down_in = gpt2 ? s->ffn_a : s->ffn_b;  /* the activation */
        norm_rows(m, s->x, L->ffn_norm_w, L->ffn_norm_b, xn, nr0, nr1);
        QUANTIZE_XN
        if (!own) BARRIER
        if (claimed) {
            fa_matmul_prepare(&prep, m->act, xn, n, E, prep_buf);
            mlp_claimed(m, L, s, &prep, tm);                                     /* -> [n, F] */
        } else {
            product_xn(m, &L->ffn_up, xn, xq, s->ffn_a, n, ith, nth);           /* -> [n, F] */
            if (!gpt2) product_xn(m, &L->ffn_gate, xn, xq, s->ffn_b, n, ith, nth);
            if (mlp_fusable(m, L, nth)) {
                int64_t r0, r1;
                fa_matmul_share(m->act, &L->ffn_up, ith, nth, &r0, &r1);
                if (r0 >= 0 && r1 <= F && r0 < r1) {
                    mlp_act_cols(m, L, s, n, r0, r1);
                    if (xq_ff)
                        fa_q8_quantize_cols(down_in, F, n, r0 / FA_QK,
                                            (r1 + FA_QK - 1) / FA_QK, xq_ff);
                }
            } else {
                BARRIER
                mlp_act_flat(m, L, s, f0, f1);
            }
        }
        BARRIER_BEFORE_PRODUCT(&L->ffn_down)
        product_residual(m, s, &L->ffn_down, L->ffn_down_b, down_in, xq_ff, y, n, claimed,
                         prep_buf, tm);                                          /* -> [n, E] */
        if (l + 1 < m->n_layer && qkv_by_heads) {
            const void *next;
            size_t bytes = qkv_region(m, &m->layers[l + 1], ith, nth, &next);
            team_wait_for(tm, next, bytes);
        } else if (l + 1 < m->n_layer) {
            BARRIER_BEFORE(gpt2 ? &m->layers[l + 1].attn_qkv : &m->layers[l + 1].attn_q)
        } else if (want_logits) {
            BARRIER_BEFORE_PRODUCT(&m->output)
        } else {
            BARRIER
        }

        /* the next norm: the next block's, or the final one */
        if (l + 1 < m->n_layer) {
            const fa_layer *N = &m->layers[l + 1];
            norm_rows(m, s->x, N->attn_norm_w, N->attn_norm_b, xn, nr0, nr1);
            QUANTIZE_XN
            if (!own) BARRIER
        } else if (want_logits) {
            norm_rows(m, s->x, m->output_norm_w, m->output_norm_b, xn, nr0, nr1);
            if (!own) BARRIER
        }
    }

    /* output head */
    if (want_logits) {
        const float *xh = all_rows ? xn : xn + (n - 1) * E;
        const int64_t nh = all_rows ? n : 1;
        if (claimed) {
            fa_matmul_prepare(&prep, m->act, xh, nh, E, prep_buf);
            product_claimed(m, &prep, &m->output, logits, NULL, NULL, tm);
        } else {
            fa_matmul_act(m->act, &m->output, xh, logits, nh, ith, nth);  /* -> [nh, n_vocab] */
        }
    }
    /* a next chunk would write x, xn and the scratch others may still read;
     * after the last one, the end of the parallel region waits */
    if (more) BARRIER
#undef QUANTIZE_XN
#undef BARRIER_BEFORE_PRODUCT
}

int fa_forward(const fa_model *m, fa_state *s, const int32_t *ids, int64_t n_seq,
               float *logits, int all_logits, int n_threads) {
    /* check everything we are about to trust */
    if (!m || !s || !ids || !logits || n_seq <= 0 || !m->layers || !s->k_cache
        || kv_bytes(s->kv_type) == 0)
        return FA_ERR_ARG;
    if (s->n_layer != m->n_layer || s->n_kv_head != m->n_kv_head
        || s->head_dim != m->head_dim || s->n_embd != m->n_embd || s->n_ctx > m->n_ctx
        || s->n_head != m->n_head)
        return FA_ERR_ARG;
    if (m->family == FA_LLAMA && !s->rope_cs) return FA_ERR_ARG;  /* a gpt2 state */
    for (int64_t t = 0; t < n_seq; t++)
        if (ids[t] < 0 || ids[t] >= m->n_vocab) return FA_ERR_BAD_ID;
    if (s->n_past < 0 || s->n_past > s->n_ctx || n_seq > s->n_ctx - s->n_past)
        return FA_ERR_OVERFLOW;
    n_threads = fa_team_threads(n_threads);
#ifdef _OPENMP
    /* the region may get fewer threads than asked; every per-thread array
     * below is sized for n_threads, which bounds it */
#else
    n_threads = 1;
#endif

    /* per-thread scratch: n_ctx floats of attention, own_rows normed rows;
     * grown when a call brings more threads, never per token */
    if (s->att_threads < n_threads) {
        float *scratch = alloc_floats(n_threads, s->n_ctx, 1, 1);
        float *own = alloc_floats(n_threads, own_floats(s), 1, 1);
        /* a decode's claim counters, one line each, and each thread's
         * prepared inputs (rounded up to whole lines) */
        const size_t prep_e = fa_prepare_bytes(s->own_rows, s->n_embd);
        const size_t prep_f = fa_prepare_bytes(s->own_rows, m->n_ff);
        const size_t prep = ((prep_e > prep_f ? prep_e : prep_f) + 63) / 64 * 64;
        void *claims = aligned_alloc(64, (size_t)n_threads * 64);
        void *prep_own = prep ? aligned_alloc(64, (size_t)n_threads * prep) : NULL;
        if (!scratch || !own || !claims || (prep && !prep_own)) {
            free(scratch);
            free(own);
            free(claims);
            free(prep_own);
            return FA_ERR_NOMEM;
        }
        free(s->att_scratch);
        free(s->xn_own);
        free(s->claims);
        free(s->prep_own);
        s->att_scratch = scratch;
        s->xn_own = own;
        s->claims = claims;
        s->prep_own = prep_own;
        s->prep_bytes = prep;
        s->att_threads = n_threads;
    }

    const int64_t n_past = s->n_past, chunk = s->max_chunk;
    team_barrier barrier;
    atomic_init(&barrier.count, 0);
    atomic_init(&barrier.sense, 0);
    barrier.taken = (atomic_long *)s->claims;
    for (int i = 0; i < n_threads; i++) atomic_init(&barrier.taken[i * CLAIM_STRIDE], 0);
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
                          all_logits, !last, &tm);
        }
    }
    s->n_past = n_past + n_seq;
    return FA_OK;
}
