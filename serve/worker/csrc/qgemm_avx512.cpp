// The quantized matmul kernels for AVX-512 with VNNI: 512-bit vpdpbusd, 16 output rows per register.
#include <immintrin.h>

#include "qgemm.h"

#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
#define SERVE_ISA_NS avx512
#define SERVE_W 512
#define SERVE_VNNI 1
#include "qgemm_kernels.inc"

namespace serve_native {
QgemmKernels qgemm_avx512() { return {"avx512", avx512::gemm, avx512::quantize, avx512::MAX_ROWS}; }
}  // namespace serve_native
