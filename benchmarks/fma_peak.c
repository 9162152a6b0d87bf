/* The fp32 FMA peak of one core: twelve independent chains of fused multiply-adds on GCC/Clang
 * vector types of 32 and 64 bytes (AVX2 and AVX-512 registers on x86-64; what -march=native
 * gives). benchmarks/measure.py builds it with `cc -O2 -march=native -ffp-contract=fast` and
 * reads its lines:
 *     fma <1 if the target has fused multiply-add, else 0>
 *     <vector bytes> <GFLOP per second>
 * Twelve chains hide the FMA latency (4 cycles) on two pipes. They are twelve named variables,
 * not an array, so that they stay in registers without relying on an unroll pragma; each result
 * feeds the next FMA, so the compiler cannot drop the work. */
#include <stdio.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

#define STEP(a) a = a * mul + add;

#define PEAK(NAME, BYTES)                                                                  \
    typedef float NAME __attribute__((vector_size(BYTES)));                                \
    static double peak_##NAME(long iters) {                                                \
        NAME mul, add, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11;                   \
        for (int j = 0; j < (int)(BYTES / 4); j++) {                                       \
            mul[j] = 0.999999f;                                                            \
            add[j] = 1e-7f;                                                                \
        }                                                                                  \
        a0 = mul * 0.f; a1 = mul * 1.f; a2 = mul * 2.f; a3 = mul * 3.f;                    \
        a4 = mul * 4.f; a5 = mul * 5.f; a6 = mul * 6.f; a7 = mul * 7.f;                    \
        a8 = mul * 8.f; a9 = mul * 9.f; a10 = mul * 10.f; a11 = mul * 11.f;                \
        double t0 = now();                                                                 \
        for (long k = 0; k < iters; k++) {                                                 \
            STEP(a0) STEP(a1) STEP(a2) STEP(a3) STEP(a4) STEP(a5)                          \
            STEP(a6) STEP(a7) STEP(a8) STEP(a9) STEP(a10) STEP(a11)                        \
        }                                                                                  \
        double dt = now() - t0;                                                            \
        NAME sum = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11;            \
        if (sum[0] == 12345.f) puts("");                                                   \
        return (double)iters * 12 * (BYTES / 4) * 2 / dt / 1e9;                            \
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
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA) || defined(__FP_FAST_FMAF)
    puts("fma 1");
#else
    puts("fma 0");
#endif
    printf("32 %.1f\n64 %.1f\n", best8, best16);
    return 0;
}
