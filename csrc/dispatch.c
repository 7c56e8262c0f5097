/*
 * Storage sizes and SIMD dispatch.
 *
 * The level is chosen once, at first use, from CPUID and capped by the
 * environment variable FASTATTN_SIMD; fa_set_simd_level changes it later (for
 * tests and benchmarks).  Each level's kernels live in the same files as the
 * generic ones, compiled for their target with function attributes, so the
 * build needs no -march flag and one binary runs on any x86-64.
 */
#include <stdlib.h>
#include <string.h>

#include "fa_internal.h"

/* ------------------------------------------------------------ row sizes */

/* Widest row accepted: far beyond any model, small enough that no size
 * computed from it (rows * row bytes included) can overflow. */
#define FA_MAX_N_IN ((int64_t)1 << 32)

size_t fa_row_bytes(int type, int64_t n_in) {
    if (n_in <= 0 || n_in > FA_MAX_N_IN) return 0;
    switch (type) {
    case FA_F32: return (size_t)n_in * 4;
    case FA_F16:
    case FA_BF16: return (size_t)n_in * 2;
    case FA_Q8_0: return n_in % FA_QK ? 0 : (size_t)(n_in / FA_QK) * FA_Q8_0_BYTES;
    case FA_Q4_0: return n_in % FA_QK ? 0 : (size_t)(n_in / FA_QK) * FA_Q4_0_BYTES;
    case FA_Q4_1: return n_in % FA_QK ? 0 : (size_t)(n_in / FA_QK) * FA_Q4_1_BYTES;
    default: return 0;
    }
}

/* ------------------------------------------------------- fork guard */

/* libgomp keeps the threads of a team in a pool.  A child made by fork()
 * after a team has run inherits the pool's bookkeeping but none of its
 * threads, and its first region with more than one thread waits for them
 * forever.  So a process that ran a team records it (team_started), a
 * forked child of it is marked (fa_team_lose, called from the Python
 * layer's after-fork hook, fastattn/_fork.py), and from then on every region
 * runs on the child's one thread: the same numbers (no result depends on the
 * thread count), slower.  Each compiled module keeps its own copy of these
 * flags; the hook marks them all. */
static int team_started;
static int team_lost;

int fa_team_threads(int n_threads) {
    if (n_threads <= 1) return 1;
    if (__atomic_load_n(&team_lost, __ATOMIC_RELAXED)) return 1;
    __atomic_store_n(&team_started, 1, __ATOMIC_RELAXED);
    return n_threads;
}

int fa_team_started(void) { return __atomic_load_n(&team_started, __ATOMIC_RELAXED); }

void fa_team_lose(void) { __atomic_store_n(&team_lost, 1, __ATOMIC_RELAXED); }

/* ------------------------------------------------------- half table */

float fa_f16_table[65536];

__attribute__((constructor)) static void fill_f16_table(void) {
    for (uint32_t h = 0; h < 65536; h++) fa_f16_table[h] = fa_f16_to_f32((uint16_t)h);
}

/* ------------------------------------------------------------- dispatch */

static int level_in_use = -1;  /* -1: not chosen yet */

/* The best level this CPU runs. */
static int cpu_level(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma")
        && __builtin_cpu_supports("f16c"))
        return FA_SIMD_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
        && __builtin_cpu_supports("f16c"))
        return FA_SIMD_AVX2;
#endif
    return FA_SIMD_GENERIC;
}

/* The cap FASTATTN_SIMD asks for; an unknown value caps nothing. */
static int env_cap(void) {
    const char *s = getenv("FASTATTN_SIMD");
    if (!s || !*s) return FA_SIMD_AVX512;
    if (!strcmp(s, "generic")) return FA_SIMD_GENERIC;
    if (!strcmp(s, "avx2")) return FA_SIMD_AVX2;
    return FA_SIMD_AVX512;
}

int fa_simd_level(void) {
    int level = __atomic_load_n(&level_in_use, __ATOMIC_ACQUIRE);
    if (level < 0) {
        /* two threads racing here compute the same value */
        level = cpu_level();
        int cap = env_cap();
        if (cap < level) level = cap;
        __atomic_store_n(&level_in_use, level, __ATOMIC_RELEASE);
    }
    return level;
}

/* For tests and benchmarks: a kernel running on another thread meanwhile
 * may finish at the old level. */
int fa_set_simd_level(int level) {
    int best = cpu_level();
    if (level < FA_SIMD_GENERIC) level = FA_SIMD_GENERIC;
    if (level > best) level = best;
    __atomic_store_n(&level_in_use, level, __ATOMIC_RELEASE);
    return level;
}

const char *fa_simd_name(int level) {
    switch (level) {
    case FA_SIMD_GENERIC: return "generic";
    case FA_SIMD_AVX2: return "avx2";
    case FA_SIMD_AVX512: return "avx512";
    default: return "unknown";
    }
}

const fa_kernels *fa_kernels_current(void) {
    switch (fa_simd_level()) {
    case FA_SIMD_AVX512: return &fa_kernels_avx512;
    case FA_SIMD_AVX2: return &fa_kernels_avx2;
    default: return &fa_kernels_generic;
    }
}

fa_dot_fn fa_dot_for(const fa_kernels *k, int type) {
    switch (type) {
    case FA_F32: return k->dot_f32;
    case FA_F16: return k->dot_f16;
    case FA_BF16: return k->dot_bf16;
    case FA_Q8_0: return k->dot_q8_0;
    case FA_Q4_0: return k->dot_q4_0;
    case FA_Q4_1: return k->dot_q4_1;
    default: return NULL;
    }
}
