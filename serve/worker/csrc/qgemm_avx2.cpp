// The quantized matmul kernels for AVX2 + FMA + F16C, our floor: vpmaddubsw + vpmaddwd dot products.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "qgemm.h"

// Only the kernels below are compiled for this target; the function that hands them out, after
// pop_options, is plain AVX2 code that any CPU of ours can run (it runs on all of them at start-up).
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define SERVE_ISA_NS avx2
#define SERVE_W 256
#define SERVE_VNNI 0
#include "qgemm_kernels.inc"
#pragma GCC pop_options

namespace serve_native {
QgemmKernels qgemm_avx2() { return {"avx2", avx2::gemm, avx2::quantize, avx2::MAX_ROWS}; }
}  // namespace serve_native
