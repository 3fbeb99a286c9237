// The quantized matmul kernels for AVX-VNNI: 256-bit vpdpbusd (VEX form; Zen 5, Intel since Alder Lake).
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "qgemm.h"

// Only the kernels below are compiled for this target; the function that hands them out, after
// pop_options, is plain AVX2 code that any CPU of ours can run (it runs on all of them at start-up).
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avxvnni")
#define SERVE_ISA_NS avx_vnni
#define SERVE_W 256
#define SERVE_VNNI 1
#include "qgemm_kernels.inc"
#pragma GCC pop_options

namespace serve_native {
QgemmKernels qgemm_avx_vnni() { return {"avx_vnni", avx_vnni::gemm, avx_vnni::quantize, avx_vnni::MAX_ROWS}; }
}  // namespace serve_native
