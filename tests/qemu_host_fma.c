/* fma() and fmaf() for QEMU's own process, preloaded into qemu-x86_64 (never into the program it
 * emulates) by tests/test_stages_frameworks.py.
 *
 * QEMU computes the emulated CPU's floating point in software and, for a fused multiply-add, calls
 * the host's fma() (float64) or fmaf() (float32) once per vector lane: 85% of an emulated float64
 * gemm's time under perf, almost all on libm's one vfmadd instruction. Evidently QEMU's translated
 * code calls them with the upper halves of the host's YMM registers in use, and on the Intel Xeon
 * this project was measured on every switch between SSE and AVX code in that state is slow: a C loop
 * calling libm's fma() from SSE code took 280 ns per call in that state, 3.7 ns without. VZEROUPPER
 * first clears it (the upper halves are not preserved across calls in the x86-64 ABI, so any
 * function may), and the emulated gemm ran 5.5 times as fast. The result is libm's: a fused
 * multiply-add is rounded once, in the current rounding mode, by the instruction as by libm.
 * Built only where the host has AVX and FMA.
 */
#include <immintrin.h>

__attribute__((target("avx,fma"))) double fma(double x, double y, double z)
{
    _mm256_zeroupper();
    return __builtin_fma(x, y, z);
}

__attribute__((target("avx,fma"))) float fmaf(float x, float y, float z)
{
    _mm256_zeroupper();
    return __builtin_fmaf(x, y, z);
}
