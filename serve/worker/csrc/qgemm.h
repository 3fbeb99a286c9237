// The quantized matmul's shared types: the repacked weight layout and the per-ISA kernel table.
// Plain C++ (no torch): qgemm_avx2.cpp, qgemm_avx_vnni.cpp and qgemm_avx512.cpp compile the same kernels
// (qgemm_kernels.inc) for their instruction set, qgemm_amx.cpp does the same arithmetic on AMX tiles,
// and qlinear.cpp picks one at run time.
//
// Weights are GGUF blocks regrouped, not requantized. Each block of 32 (or 16) values along K keeps its
// own integer quants and scales; 16 output rows are interleaved into a "tile" so that one 512-bit load
// holds 4 consecutive quants of each of the 16 rows, the operand shape of vpdpbusd:
//
//   tile t (rows 16t..16t+15), block b:  quants | d[16] | m[16] (when the format has a min)
//     W4 (Q4_0, Q4_1):        4 chunks of 64 bytes; chunk c, row r = the row's GGUF bytes qs[4c..4c+3], whose
//                             low nibbles are elements 4c..4c+3 and high nibbles 16+4c..16+4c+3: GGUF's own order
//     W8 (Q8_0, Q5_0, Q5_1):  8 (or 4, for 16-value blocks) chunks of 64 bytes: 4 int8 quants of each row
//   d, m: fp16 as in GGUF (f32 where a format's scales are products, e.g. Q6_K's d * scale)
//
// A row's value is d * q + m (Q4_0: m = -8d; Q8_0, Q5_0: no m). Activations are quantized per block of
// 32 to int8 with one float scale, as llama.cpp's Q8_1: x ~ da * qa, and sa = da * sum(qa) carries the
// min term. Per block, one integer dot product isum = sum(q * qa) gives
//   y += (d * da) * isum + m * sa
// in that order for every row count, so a row's result does not depend on what else is in the batch.

#pragma once

#include <cstdint>

namespace serve_native {

constexpr int TILE = 16;   // output rows per tile
constexpr int QK = 32;     // activation block

enum Kind : int32_t { W4 = 0, W8 = 1 };

struct WeightFormat {
  int32_t kind;        // W4 or W8
  int32_t block;       // values per block along K: 32, or 16 (W8 only)
  int32_t has_min;     // per-block m follows d
  int32_t f32_scales;  // d (and m) stored as float32 instead of fp16
  int64_t K;           // input features (a multiple of 32)
  int64_t N;           // output features (rows); tiles = ceil(N / 16)

  int64_t blocks() const { return K / block; }
  int64_t quant_bytes() const { return kind == W4 ? TILE * block / 2 : TILE * block; }
  int64_t scale_bytes() const { return TILE * (f32_scales ? 4 : 2) * (has_min ? 2 : 1); }
  int64_t block_bytes() const { return quant_bytes() + scale_bytes(); }
  int64_t tile_bytes() const { return blocks() * block_bytes(); }
  int64_t tiles() const { return (N + TILE - 1) / TILE; }
};

// Activations of M rows, quantized per block of 32: int8 quants (and the same plus 128 as uint8, the
// unsigned operand that W8 needs for vpdpbusd), a scale da and sa = da * sum(qa) per block.
struct QuantizedActs {
  const int8_t* q;      // [M, K]
  const uint8_t* u;     // [M, K], q + 128
  const float* d;       // [M, K / 32]
  const float* s;       // [M, K / 32]
  int64_t M, K;
};

// y[m, n] = sum_k x[m, k] * w[n, k] + bias[n] for the rows m in [m0, m1) and tiles in [t0, t1).
using GemmFn = void (*)(const WeightFormat& f, const uint8_t* w, const QuantizedActs& x, const float* bias, float* y,
                        int64_t ldy, int64_t m0, int64_t m1, int64_t t0, int64_t t1);
// Quantizes rows [r0, r1) of x [M, K] (float32, row stride ldx) into q, u, d and s (as QuantizedActs).
using QuantizeFn = void (*)(const float* x, int64_t ldx, int64_t K, int8_t* q, uint8_t* u, float* d, float* s,
                            int64_t r0, int64_t r1);

struct QgemmKernels {
  const char* name;
  GemmFn gemm;
  QuantizeFn quantize;
  int max_rows;  // rows computed together per pass over a tile (register blocking)
};

// One per compiled instruction set (qgemm_<isa>.cpp).
QgemmKernels qgemm_avx2();
QgemmKernels qgemm_avx_vnni();
QgemmKernels qgemm_avx512();
QgemmKernels qgemm_amx();  // whole groups of 16 rows on tiles, the rest through qgemm_avx512
bool amx_permitted();      // asks Linux for the tile registers' state, once per process

}  // namespace serve_native
