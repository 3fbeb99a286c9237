// The quantized matmul kernels for AVX2 + FMA + F16C, our floor: vpmaddubsw + vpmaddwd dot products.
#include <immintrin.h>

#include "qgemm.h"

#pragma GCC target("avx2,fma,f16c")
#define SERVE_ISA_NS avx2
#define SERVE_W 256
#define SERVE_VNNI 0
#include "qgemm_kernels.inc"

namespace serve_native {
QgemmKernels qgemm_avx2() { return {"avx2", avx2::gemm, avx2::quantize, avx2::MAX_ROWS}; }
}  // namespace serve_native
