/*
 * The whole-model forward pass: a read-only model (weights and config) and a
 * generation state (KV cache, scratch) per sequence.  One call to fa_forward
 * runs every layer for n_seq new tokens inside one OpenMP parallel region.
 *
 * Shapes use the project's notation:
 *   [n_seq, n_embd]                    activations of the tokens in flight
 *   [n_out, n_in]                      weights as stored
 *   [n_layer][n_kv_head][n_ctx][head_dim]  the KV cache of one state
 *
 * The model holds pointers only; whoever builds it (fastattn/_engine.pyx)
 * keeps the memory they point into alive.  A model is never written after it
 * is built, so several states may run on it at once from different threads.
 */
#ifndef FASTATTN_MODEL_H
#define FASTATTN_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "fastattn.h"

enum fa_family { FA_GPT2 = 0, FA_LLAMA = 1 };

/* fa_forward's return codes. */
enum fa_status {
    FA_OK = 0,
    FA_ERR_ARG = -1,       /* a NULL pointer, n_seq <= 0, mismatched state */
    FA_ERR_BAD_ID = -2,    /* a token id outside [0, n_vocab) */
    FA_ERR_OVERFLOW = -3,  /* n_past + n_seq > n_ctx of the state */
    FA_ERR_NOMEM = -4,     /* an allocation failed */
};

/* One block's weights.  Float vectors are [n] float32; a bias left NULL is
 * absent (llama has none unless the checkpoint brings them). */
typedef struct {
    const float *attn_norm_w, *attn_norm_b;   /* [n_embd]; _b gpt2 only */
    const float *ffn_norm_w, *ffn_norm_b;

    fa_weight attn_qkv;                       /* gpt2:  [3*n_embd, n_embd] */
    const float *attn_qkv_b;                  /*        [3*n_embd] */
    fa_weight attn_q, attn_k, attn_v;         /* llama: [n_embd | n_embd_kv, n_embd] */
    const float *attn_q_b, *attn_k_b, *attn_v_b;
    fa_weight attn_output;                    /* [n_embd, n_embd] */
    const float *attn_output_b;

    fa_weight ffn_gate;                       /* llama: [n_ff, n_embd] */
    const float *ffn_gate_b;
    fa_weight ffn_up;                         /* [n_ff, n_embd] */
    const float *ffn_up_b;
    fa_weight ffn_down;                       /* [n_embd, n_ff] */
    const float *ffn_down_b;
} fa_layer;

typedef struct {
    int family;                /* enum fa_family */
    int64_t n_vocab, n_ctx, n_embd, n_layer, n_head, n_kv_head, head_dim, n_ff;
    float norm_eps, rope_theta;
    int rope_neox;             /* llama: 1 rotates halves (HF), 0 adjacent pairs (GGUF) */

    fa_weight token_embd;      /* [n_vocab, n_embd] */
    fa_weight position_embd;   /* gpt2: [n_ctx, n_embd] */
    fa_weight output;          /* [n_vocab, n_embd]; a copy of token_embd when tied */
    const float *output_norm_w, *output_norm_b;
    fa_layer *layers;          /* [n_layer] */
    int act;                   /* enum fa_act: FA_ACT_F32 (exact, default) or FA_ACT_Q8 */
} fa_model;

typedef struct {
    /* what the state was built for, checked against the model at each call */
    int64_t n_layer, n_kv_head, head_dim, n_embd;

    int64_t n_ctx;             /* positions the cache holds */
    int64_t n_past;            /* positions filled */
    int64_t max_chunk;         /* tokens per pass through the layers */
    int kv_type;               /* the cache's values: FA_F32 (exact, default) or FA_F16 */
    void *k_cache, *v_cache;   /* [n_layer][n_kv_head][n_ctx][head_dim] of kv_type */

    /* scratch, [max_chunk, width] each */
    float *x;                  /* residual stream [., n_embd] */
    float *xn;                 /* normed input / block output [., n_embd] */
    float *q;                  /* [., n_embd] */
    float *qkv;                /* gpt2: [., 3*n_embd]; llama: k and v [., 2*n_embd_kv] */
    float *att;                /* attention output [., n_embd] */
    float *ffn_a, *ffn_b;      /* [., n_ff] */
    float *att_scratch;        /* [att_threads, n_ctx] */
    int att_threads;
    float *xn_own;             /* per thread: [own_rows, n_embd] normed rows, the same
                                  of attention output, FA_ATT_PART(head_dim) merge
                                  scratch; the copies of a chunk of few tokens */
    float *att_part;           /* [own_rows][n_head][chunks of n_ctx][FA_ATT_PART]:
                                  a decode's attention partial states */
    int64_t n_head;
    int64_t own_rows;          /* rows each copy holds: min(max_chunk, FA_OWN_ROWS) */
    float *rope_cs;            /* llama: [max_chunk, head_dim / 2, 2] cos and sin of
                                  each position in the chunk */
    void *xq;                  /* the normed rows quantized for the q8 products
                                  (fa_q8_rows_bytes(max_chunk, n_embd)), or NULL */
    void *xq_ff;               /* the MLP activation quantized for the down product
                                  (fa_q8_rows_bytes(max_chunk, n_ff)), or NULL */
    void *claims;              /* [att_threads] counters, one per 64 bytes: the rows
                                  taken so far of each thread's share of a decode
                                  product (forward.c, claim_next) */
    void *prep_own;            /* per thread, prep_bytes each: a decode product's
                                  input prepared once (fa_matmul_prepare) */
    size_t prep_bytes;
} fa_state;

/* Chunks of at most this many tokens (decode) have every thread norm every
 * row into its own copy instead of sharing the rows and waiting at a barrier
 * (see forward.c). */
#define FA_OWN_ROWS 4

/* ------------------------------------------- attention split over keys
 * (csrc/ops.c).  Keys come in chunks of FA_ATT_CHUNK from position 0; each
 * chunk gives every query head a partial state of FA_ATT_PART(head_dim)
 * floats: o [head_dim] = sum_t exp(s_t - m) v_t, m = max_t s_t, l = sum_t
 * exp(s_t - m).  fa_attention merges them in chunk order inside one thread;
 * a decode spreads the (KV head, chunk) units over the threads instead
 * (balanced whatever the head count) and merges afterwards, with the same
 * operations, so both give the same bits.
 *   part  [n_seq][n_head][ceil(n_ctx / FA_ATT_CHUNK)][FA_ATT_PART(head_dim)] */
#define FA_ATT_CHUNK 64
#define FA_ATT_PART(head_dim) ((head_dim) + 2)
#define FA_ATT_STACK_DIM 256  /* widest head whose group of 8 the stack holds */

void fa_attention_chunks(const float *q, const float *k, const float *v, float *part,
                         int64_t n_seq, int64_t pos0, int n_head, int n_kv_head,
                         int head_dim, int64_t n_ctx, int ith, int nth);
/* fa_attention and fa_attention_chunks over a cache of kv_type: FA_F32
 * (k, v float) or FA_F16 (k, v IEEE half, each widened to float32 as it is
 * loaded, then the float32 arithmetic: the numbers of the float32 call over
 * the widened cache).  fa_attention(...) is fa_attention_kv(..., FA_F32, ...)
 * (it takes no scratch), and the same for the chunks. */
void fa_attention_kv(const float *q, const void *k, const void *v, int kv_type, float *out,
                     int64_t n_seq, int64_t pos0, int n_head, int n_kv_head, int head_dim,
                     int64_t n_ctx, int ith, int nth);
void fa_attention_chunks_kv(const float *q, const void *k, const void *v, int kv_type,
                            float *part, int64_t n_seq, int64_t pos0, int n_head,
                            int n_kv_head, int head_dim, int64_t n_ctx, int ith, int nth);
void fa_attention_merge(const float *part, float *out, int64_t n_seq, int64_t pos0,
                        int n_head, int head_dim, int64_t n_ctx, int h0, int h1,
                        float *acc);

/* Check the model's sizes and pointers; FA_OK or FA_ERR_ARG. */
int fa_model_check(const fa_model *m);

/* Allocate a state for up to n_ctx positions (n_ctx <= m->n_ctx) that runs
 * prompts in chunks of at most max_chunk tokens, its KV cache float32.
 * Returns FA_OK, FA_ERR_ARG or FA_ERR_NOMEM; on failure nothing stays
 * allocated. */
int fa_state_init(fa_state *s, const fa_model *m, int64_t n_ctx, int64_t max_chunk);

/* The same with a KV cache of kv_type: FA_F32 (fa_state_init) or FA_F16, an
 * opt-in cache of half the bytes.  FA_F16 is not exact: each key and value is
 * rounded to the nearest half (ties to even; about 3 significant digits, range
 * +-65504) as it is written; attention then reads it widened to float32 and
 * does the float32 cache's arithmetic, so every promise of the forward pass
 * (prefill + decode == one forward, any thread count or chunking) holds for
 * it too.  Another kv_type is FA_ERR_ARG. */
int fa_state_init_kv(fa_state *s, const fa_model *m, int64_t n_ctx, int64_t max_chunk,
                     int kv_type);
void fa_state_free(fa_state *s);

/* Run ids[0 .. n_seq) at positions n_past .. n_past + n_seq - 1, append their
 * keys and values to the cache and advance n_past.
 *   logits  [n_vocab] for the last position, or [n_seq, n_vocab] if all_logits
 * On error nothing is written and n_past is unchanged. */
int fa_forward(const fa_model *m, fa_state *s, const int32_t *ids, int64_t n_seq,
               float *logits, int all_logits, int n_threads);

#endif
