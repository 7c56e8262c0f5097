/*
 * Decode-shaped weight streaming, without Python in the loop: the 7 matrices
 * of each of SmolLM2's 30 layers (random bytes with sane scales, packed as a
 * model packs them) multiplied by one token inside one OpenMP region, with a
 * barrier after each product as the decode step has.  About 66 MB of Q4_1,
 * twice the L3 here, so every pass reads the weights from DRAM; prints the
 * best pass of 30 in ms, GB/s and GMAC/s per thread.
 *
 *   gcc -O2 -fopenmp -Icsrc benchmarks/stream_gemv.c $(ls csrc/[a-z]*.c) -lm \
 *       -o /tmp/stream_gemv
 *   /tmp/stream_gemv [type [threads [layers]]]     type 3 = Q4_1, 8 = Q8_0
 *
 * layers 0 runs the output head alone (49152 x 576).  Compare the number
 * with benchmarks/peers.py --bandwidth, measured in the same minute.
 */
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "fastattn.h"

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

int main(int argc, char **argv) {
    int type = argc > 1 ? atoi(argv[1]) : FA_Q4_1;
    int nth = argc > 2 ? atoi(argv[2]) : 2;
    int nl = argc > 3 ? atoi(argv[3]) : 30;
    if ((type != FA_Q4_1 && type != FA_Q8_0) || nth < 1 || nl < 0) {
        fprintf(stderr, "usage: %s [3|8 [threads [layers]]]\n", argv[0]);
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
    if (!ws) return 1;
    size_t bytes = 0;
    double macs = 0;
    const size_t bb = type == FA_Q4_1 ? 20 : 34;
    srand(1);
    for (int i = 0; i < nw; i++) {
        int64_t n_out = shapes[i % 7][0], n_in = shapes[i % 7][1];
        size_t rb = fa_row_bytes(type, n_in);
        uint8_t *d = malloc(rb * n_out);
        if (!d) return 1;
        for (size_t j = 0; j < rb * n_out; j++) d[j] = (uint8_t)rand();
        for (size_t j = 0; j < rb * n_out; j += bb) {  /* scales 0.0016, min -0.0016 */
            d[j] = 0x1f, d[j + 1] = 0x16;
            if (type == FA_Q4_1) d[j + 2] = 0x1f, d[j + 3] = 0x96;
        }
        ws[i] = (fa_weight){.data = d, .type = type, .n_out = n_out, .n_in = n_in,
                            .row_bytes = rb};
        size_t pbytes = fa_packed_bytes(&ws[i]);
        void *p = aligned_alloc(64, (pbytes + 63) / 64 * 64);
        if (!p || fa_pack_weight(&ws[i], p, pbytes) != 0) {
            fprintf(stderr, "packing failed\n");
            return 1;
        }
        ws[i].packed = p;
        bytes += rb * n_out;
        macs += (double)n_out * n_in;
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
                fa_matmul(&ws[i], x, y, 1, ith, nth);
#pragma omp barrier
            }
        }
        double t = now() - t0;
        if (t < best) best = t;
    }
    printf("%s, %d thread(s), %s: %.3f ms, %.1f GB/s, %.1f GMAC/s per thread\n",
           type == FA_Q4_1 ? "Q4_1" : "Q8_0", nth, nl ? "layers" : "head",
           best * 1e3, bytes / best / 1e9, macs / best / 1e9 / nth);
    for (int i = 0; i < nw; i++) {
        free((void *)ws[i].data);
        free((void *)ws[i].packed);
    }
    free(ws);
    return 0;
}
