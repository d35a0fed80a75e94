/* Reference point for the Q4_0 GEMV of flashlm/kernels/simd.py, in C with AVX-512
 * intrinsics: how fast does the same instruction sequence run when gcc compiles it?
 *
 *   gcc -O3 -march=native -o /tmp/q4_0_gemv perf/ref/q4_0_gemv.c && /tmp/q4_0_gemv
 *
 * Needs AVX-512F/BW (Zen 4, Ice Lake or later). 512x896 Q4_0 (fits in L2), one thread,
 * best of 200 passes, G weights/s. Variants:
 *   same-as-flashlm  nibbles -> vpermps table, f16 scale -> vpbroadcastw + vcvtph2ps
 *   float-scales     the same with the block scales already float32 in memory, each one
 *                    an embedded-broadcast operand of the scaling FMA (an upper bound:
 *                    the GGUF block keeps its scale as f16 next to the quants)
 * Measured on the 2-core Zen 4 VM flashlm is developed on (3.6 GHz): 17.8-19.3 and
 * 22.5-24.5; flashlm's own kernel: 18.8 (perf/bench_simd_variants.py, same shape).
 * Written for flashlm; not part of the package or its tests. */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

enum { ROWS = 512, COLS = 896, NB = COLS / 32 };
typedef struct { uint16_t d; uint8_t qs[16]; } __attribute__((packed)) block_q4_0;

static const float TABLE[16] = {-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7};

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* d * (q - 8) . x of block b, as a 16-lane partial sum */
static inline __m512 block_dot(const block_q4_0 *w, const float *x, const float *fscale, int b, __m512 tab) {
    __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)w[b].qs));
    __m512 t = _mm512_mul_ps(_mm512_permutexvar_ps(q, tab), _mm512_loadu_ps(x + 32 * b));
    t = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), tab), _mm512_loadu_ps(x + 32 * b + 16), t);
    return _mm512_mul_ps(t, fscale ? _mm512_set1_ps(fscale[b]) : _mm512_cvtph_ps(_mm256_set1_epi16((short)w[b].d)));
}

/* one row: two accumulators (blocks alternate), one reduction per row; NB is even */
static float row_dot(const block_q4_0 *w, const float *x, const float *fscale) {
    const __m512 tab = _mm512_loadu_ps(TABLE);
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (int b = 0; b < NB; b += 2) {
        a0 = _mm512_add_ps(a0, block_dot(w, x, fscale, b, tab));
        a1 = _mm512_add_ps(a1, block_dot(w, x, fscale, b + 1, tab));
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

int main(void) {
    block_q4_0 *w = malloc(sizeof(block_q4_0) * ROWS * NB);
    float *x = aligned_alloc(64, sizeof(float) * COLS), *out = malloc(sizeof(float) * ROWS);
    float *fs = malloc(sizeof(float) * ROWS * NB);
    srand(1);
    for (int i = 0; i < ROWS * NB; i++) {
        w[i].d = 0x2000 + (rand() & 0x3ff); /* positive halves around 2^-7 */
        for (int j = 0; j < 16; j++) w[i].qs[j] = (uint8_t)rand();
        fs[i] = _cvtsh_ss(w[i].d);
    }
    for (int i = 0; i < COLS; i++) x[i] = rand() / (float)RAND_MAX - 0.5f;
    const char *names[2] = {"same-as-flashlm", "float-scales"};
    for (int v = 0; v < 2; v++) {
        double best = 1e9;
        for (int rep = 0; rep < 200; rep++) {
            double t0 = now();
            for (int r = 0; r < ROWS; r++) out[r] = row_dot(w + r * NB, x, v ? fs + r * NB : NULL);
            double t = now() - t0;
            if (t < best) best = t;
        }
        printf("%-16s %6.2f G weights/s  (out[0] = %.6f)\n", names[v], ROWS * (double)COLS / best / 1e9, out[0]);
    }
    return 0;
}
