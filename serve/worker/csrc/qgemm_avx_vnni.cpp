// The quantized matmul kernels for AVX-VNNI: 256-bit vpdpbusd (VEX form; Zen 5, Intel since Alder Lake).
#include <immintrin.h>

#include "qgemm.h"

#pragma GCC target("avx2,fma,f16c,avxvnni")
#define SERVE_ISA_NS avx_vnni
#define SERVE_W 256
#define SERVE_VNNI 1
#include "qgemm_kernels.inc"

namespace serve_native {
QgemmKernels qgemm_avx_vnni() { return {"avx_vnni", avx_vnni::gemm, avx_vnni::quantize, avx_vnni::MAX_ROWS}; }
}  // namespace serve_native
