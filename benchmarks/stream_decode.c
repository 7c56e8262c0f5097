/*
 * The two streams of a decode step, timed without Python in the loop:
 *
 *   gemv       the 7 matrices of each of SmolLM2's 30 layers (random bytes
 *              with sane scales, packed as a model packs them) times one
 *              token, in one OpenMP region with a barrier after each product
 *              as the decode step has: about 66 MB of Q4_1, twice the L3 here,
 *              so every pass reads the weights from DRAM.  layers 0: the
 *              output head alone (49152 x 576).
 *   attention  one query's attention over a float32 KV cache of SmolLM2's
 *              shape (30 layers, 9 query heads over 3 KV heads of 64), the
 *              decode's chunked split with a barrier after each layer.
 *
 *   gcc -O3 -fopenmp -Icsrc benchmarks/stream_decode.c $(ls csrc/[a-z]*.c) -lm \
 *       -o /tmp/stream_decode
 *   /tmp/stream_decode gemv [type [threads [layers [q8]]]]  type 3 = Q4_1, 8 = Q8_0;
 *                                                        q8 1: the q8 activation mode
 *   /tmp/stream_decode attention [threads [n_ctx]]
 *
 * Prints the best of 30 passes.  Compare GB/s with benchmarks/peers.py
 * --bandwidth measured in the same minute: the host's bandwidth drifts.
 */
#include <errno.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "fastattn.h"
#include "model.h"

/* n bytes on 2 MiB pages where the system gives them, as a model's packed
 * weights and KV cache are (fa_advise_huge) */
static void *big_alloc(size_t n) {
    const size_t huge = (size_t)2 << 20;
    size_t whole = (n + huge - 1) / huge * huge;
    void *p = aligned_alloc(huge, whole);
    if (p) fa_advise_huge(p, whole);
    return p;
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

/* argv[i] as an integer in [lo, hi], def if absent; -1 (never a valid
 * value here) if it is not one */
static long long arg(int argc, char **argv, int i, long long def, long long lo,
                     long long hi) {
    if (argc <= i) return def;
    char *end;
    errno = 0;
    long long v = strtoll(argv[i], &end, 10);
    return errno || end == argv[i] || *end || v < lo || v > hi ? -1 : v;
}

static int out_of_memory(void) {
    fprintf(stderr, "stream_decode: out of memory\n");
    return 1;
}

/* Bytes of the copy the products read: the panel copy (exact activations)
 * or the q8 kernels' copy. */
static size_t pack_bytes(const fa_weight *w, int q8) {
    return q8 ? fa_q8_packed_bytes(w) : fa_packed_bytes(w);
}

static int gemv(int argc, char **argv) {
    int type = (int)arg(argc, argv, 1, FA_Q4_1, 0, 64);
    int nth = (int)arg(argc, argv, 2, 2, 1, 256);
    int nl = (int)arg(argc, argv, 3, 30, 0, 1000);
    int q8 = (int)arg(argc, argv, 4, 0, 0, 1);
    if ((type != FA_Q4_1 && type != FA_Q8_0) || nth < 1 || nl < 0) {
        fprintf(stderr, "usage: stream_decode gemv [3|8 [threads [layers [q8]]]]\n");
        return 2;
    }
    int64_t shapes[7][2] = {{576, 576},  {192, 576},  {192, 576}, {576, 576},
                            {1536, 576}, {1536, 576}, {576, 1536}};
    int nw = 7 * nl;
    if (nl == 0) {
        shapes[0][0] = 49152;
        nw = 1;
    }
    fa_weight *ws = calloc((size_t)nw, sizeof *ws);
    if (!ws) return out_of_memory();
    size_t bytes = 0, arena_bytes = 0;
    double macs = 0;
    const size_t bb = type == FA_Q4_1 ? 20 : 34;
    srand(1);
    for (int i = 0; i < nw; i++) {  /* the weights and their sizes, then one arena */
        int64_t n_out = shapes[i % 7][0], n_in = shapes[i % 7][1];
        size_t rb = fa_row_bytes(type, n_in);
        uint8_t *d = malloc(rb * n_out);
        if (!d) return out_of_memory();
        for (size_t j = 0; j < rb * n_out; j++) d[j] = (uint8_t)rand();
        for (size_t j = 0; j < rb * n_out; j += bb) {  /* scales 0.0016, min -0.0016 */
            d[j] = 0x1f, d[j + 1] = 0x16;
            if (type == FA_Q4_1) d[j + 2] = 0x1f, d[j + 3] = 0x96;
        }
        ws[i] = (fa_weight){.data = d, .type = type, .n_out = n_out, .n_in = n_in,
                            .row_bytes = rb};
        arena_bytes += (pack_bytes(&ws[i], q8) + 63) / 64 * 64;
        bytes += rb * n_out;
        macs += (double)n_out * n_in;
    }
    uint8_t *arena = big_alloc(arena_bytes);
    if (!arena) return out_of_memory();
    for (size_t i = 0, at = 0; i < (size_t)nw; i++) {
        size_t pbytes = pack_bytes(&ws[i], q8);
        if (pbytes == 0 || at + pbytes > arena_bytes
            || (q8 ? fa_q8_pack_weight(&ws[i], arena + at, pbytes)
                   : fa_pack_weight(&ws[i], arena + at, pbytes)) != 0) {
            fprintf(stderr, "packing failed\n");
            return 1;
        }
        if (q8)
            ws[i].packed_q8 = arena + at;
        else
            ws[i].packed = arena + at;
        at += (pbytes + 63) / 64 * 64;
    }
    static float x[1536], y[49152];
    for (int i = 0; i < 1536; i++) x[i] = (float)rand() / RAND_MAX - 0.5f;
    double best = 1e9;
    for (int rep = 0; rep < 30; rep++) {
        double t0 = now();
#pragma omp parallel num_threads(nth)
        {
            int ith = omp_get_thread_num();
            for (int i = 0; i < nw; i++) {
                fa_matmul_act(q8 ? FA_ACT_Q8 : FA_ACT_F32, &ws[i], x, y, 1, ith, nth);
#pragma omp barrier
            }
        }
        double t = now() - t0;
        if (t < best) best = t;
    }
    printf("%s%s, %d thread(s), %s: %.3f ms, %.1f GB/s, %.1f GMAC/s per thread\n",
           type == FA_Q4_1 ? "Q4_1" : "Q8_0", q8 ? " (q8 activations)" : "", nth,
           nl ? "layers" : "head",
           best * 1e3, bytes / best / 1e9, macs / best / 1e9 / nth);
    for (int i = 0; i < nw; i++) free((void *)ws[i].data);
    free(arena);
    free(ws);
    return 0;
}

static int attention(int argc, char **argv) {
    int nth = (int)arg(argc, argv, 1, 2, 1, 256);
    int64_t n_ctx = arg(argc, argv, 2, 2048, 1, 1 << 20);
    if (nth < 1 || n_ctx < 1) {
        fprintf(stderr, "usage: stream_decode attention [threads [n_ctx]]\n");
        return 2;
    }
    const int n_layer = 30, n_head = 9, n_kv = 3, hd = 64;
    const size_t layer = (size_t)n_kv * n_ctx * hd;
    const int64_t chunks = (n_ctx + FA_ATT_CHUNK - 1) / FA_ATT_CHUNK;
    float *k = big_alloc(layer * n_layer * sizeof(float));
    float *v = big_alloc(layer * n_layer * sizeof(float));
    float *part = malloc((size_t)n_head * chunks * FA_ATT_PART(hd) * sizeof(float));
    float q[9 * 64];
    if (!k || !v || !part) return out_of_memory();
    srand(1);
    for (size_t i = 0; i < layer * n_layer; i++) {
        k[i] = (float)rand() / RAND_MAX - 0.5f;
        v[i] = (float)rand() / RAND_MAX - 0.5f;
    }
    for (int i = 0; i < n_head * hd; i++) q[i] = (float)rand() / RAND_MAX - 0.5f;
    double best = 1e9;
    for (int rep = 0; rep < 30; rep++) {
        double t0 = now();
#pragma omp parallel num_threads(nth)
        {
            int ith = omp_get_thread_num();
            for (int l = 0; l < n_layer; l++) {
                fa_attention_chunks(q, k + l * layer, v + l * layer, part, 1, n_ctx - 1,
                                    n_head, n_kv, hd, n_ctx, ith, nth);
#pragma omp barrier
            }
        }
        double t = now() - t0;
        if (t < best) best = t;
    }
    printf("attention, %d thread(s), n_ctx %lld: %.3f ms, %.1f GB/s\n", nth,
           (long long)n_ctx, best * 1e3, 2.0 * layer * n_layer * sizeof(float) / best / 1e9);
    free(k);
    free(v);
    free(part);
    return 0;
}

int main(int argc, char **argv) {
    if (argc > 1 && !strcmp(argv[1], "gemv")) return gemv(argc - 1, argv + 1);
    if (argc > 1 && !strcmp(argv[1], "attention")) return attention(argc - 1, argv + 1);
    fprintf(stderr, "usage: stream_decode gemv|attention [...]\n");
    return 2;
}
