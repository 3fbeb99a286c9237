// The quantized matmul kernels for AVX-512 with VNNI: 512-bit vpdpbusd, 16 output rows per register.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "qgemm.h"

// Only the kernels below are compiled for this target; the function that hands them out, after
// pop_options, is plain AVX2 code that any CPU of ours can run (it runs on all of them at start-up).
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
#define SERVE_ISA_NS avx512
#define SERVE_W 512
#define SERVE_VNNI 1
#include "qgemm_kernels.inc"
#pragma GCC pop_options

namespace serve_native {
QgemmKernels qgemm_avx512() { return {"avx512", avx512::gemm, avx512::quantize, avx512::MAX_ROWS}; }
}  // namespace serve_native
