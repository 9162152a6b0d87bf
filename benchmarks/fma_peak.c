/* The fp32 FMA peak of one core: independent chains of fused multiply-adds on GCC/Clang vector
 * types of 32 and 64 bytes (AVX2 and AVX-512 registers on x86-64; what -march=native gives).
 * benchmarks/measure.py compiles it with `cc -O2 -march=native` and reads the best line:
 *     <bytes> <GFLOP per second>
 * Twelve chains hide the FMA latency (4 cycles) on two pipes; the result feeds the next FMA,
 * so the compiler cannot drop the work. */
#include <stdio.h>
#include <time.h>

#define CHAINS 12

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

#define PEAK(NAME, BYTES)                                                                  \
    typedef float NAME __attribute__((vector_size(BYTES)));                                \
    static double peak_##NAME(long iters) {                                                \
        NAME acc[CHAINS], mul, add;                                                        \
        for (int j = 0; j < (int)(BYTES / 4); j++) {                                       \
            mul[j] = 0.999999f;                                                            \
            add[j] = 1e-7f;                                                                \
        }                                                                                  \
        for (int i = 0; i < CHAINS; i++) acc[i] = mul * (float)i;                          \
        double t0 = now();                                                                 \
        for (long k = 0; k < iters; k++) {                                                 \
            _Pragma("GCC unroll 12") for (int i = 0; i < CHAINS; i++) acc[i] =             \
                acc[i] * mul + add;                                                        \
        }                                                                                  \
        double dt = now() - t0;                                                            \
        float sink = 0;                                                                    \
        for (int i = 0; i < CHAINS; i++) sink += acc[i][0];                                \
        if (sink == 12345.f) puts("");                                                     \
        return (double)iters * CHAINS * (BYTES / 4) * 2 / dt / 1e9;                        \
    }

PEAK(v8, 32)
PEAK(v16, 64)

int main(void) {
    double best8 = 0, best16 = 0;
    for (int rep = 0; rep < 3; rep++) {
        double a = peak_v8(40000000), b = peak_v16(20000000);
        if (a > best8) best8 = a;
        if (b > best16) best16 = b;
    }
    printf("32 %.1f\n64 %.1f\n", best8, best16);
    return 0;
}
