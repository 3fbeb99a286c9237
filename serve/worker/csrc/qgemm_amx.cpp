// The quantized matmul on AMX tiles (Intel since Sapphire Rapids), for 32-value blocks and whole groups
// of 16 activation rows; the other rows and 16-value blocks (Q6_K) go to the AVX-512 VNNI kernel. The
// arithmetic is that kernel's (qgemm.h), so no row's result depends on which path took it.
//
// Per block of 32 along K, one tile product gives the exact int32 sums of 16 activation rows by 16
// output rows: A = the rows' int8 quants (signed), B = the weight tile's quants in the layout we already
// keep (a block's chunk c is row c of a B tile: 4 consecutive quants of each of 16 output rows). W8
// blocks are B tiles as they lie; W4 nibbles are unpacked once per weight tile (low nibbles of chunk c are
// B row c, high nibbles row c + 4). Signed x signed (W8) or signed x unsigned (W4): no offsets to take
// off. The sums are stored and get the AVX-512 kernel's float epilogue, y += (d * da) * isum + m * sa,
// with the 16 rows' sums in registers.
//
// Measured on a 2-vCPU Xeon (Sapphire Rapids class), 32 rows: 1.2-1.3x the VNNI kernel on the layers'
// Q4_1 matrices, 1.8x on the Q8_0 LM head. Not more: the float epilogue (4 vector operations per 16
// outputs and block) stays, and on this core a tile product or store holds up the vector ports while it
// runs, so the tile work and the epilogue add up instead of overlapping (bench/qgemm.py).

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "qgemm.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,amx-tile,amx-int8")

namespace serve_native {
namespace amx {

constexpr int ROWS = 16;  // activation rows per tile product

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles: 0, 1 = A (even, odd blocks); 2, 3 = B; 4, 5 = C.
static void configure() {
  TileConfig cfg;
  for (int t = 0; t < 2; ++t) {
    cfg.rows[t] = ROWS, cfg.colsb[t] = QK;          // A: 16 rows x 32 int8
    cfg.rows[2 + t] = QK / 4, cfg.colsb[2 + t] = 64;  // B: 8 rows x (16 outputs x 4 quants)
    cfg.rows[4 + t] = ROWS, cfg.colsb[4 + t] = 64;    // C: 16 x 16 int32
  }
  _tile_loadconfig(&cfg);
}

static inline __m512 load_scales(const uint8_t* p, bool f32) {
  return f32 ? _mm512_loadu_ps(p) : _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// Block b's tile product for 16 rows from `ab` (row stride K), stored as 16 x 16 int32 at `c`. Tiles
// alternate with the block's parity: the next block's product is issued before this one's sums are read.
#define SERVE_PRODUCT(C, A, B)      \
  do {                              \
    _tile_zero(C);                  \
    _tile_loadd(A, ab, K);          \
    _tile_loadd(B, wb, 64);         \
    if (W4) _tile_dpbsud(C, A, B);  \
    else _tile_dpbssd(C, A, B);     \
    _tile_stored(C, c, 64);         \
  } while (0)

template <bool W4>
static inline void product(int64_t b, const int8_t* a, int64_t K, const uint8_t* bt, int64_t b_stride, int32_t* c) {
  const int8_t* ab = a + b * QK;
  const uint8_t* wb = bt + b * b_stride;
  if (b % 2 == 0) SERVE_PRODUCT(4, 0, 2);
  else SERVE_PRODUCT(5, 1, 3);
}

static inline __attribute__((always_inline)) void store_rows(const __m512* acc, const float* bias, float* y, int64_t ldy, int64_t n0, int64_t valid) {
  if (valid == TILE) {
    const __m512 bv = bias ? _mm512_loadu_ps(bias + n0) : _mm512_setzero_ps();
#pragma GCC unroll 16
    for (int m = 0; m < ROWS; ++m) _mm512_storeu_ps(y + m * ldy + n0, bias ? _mm512_add_ps(acc[m], bv) : acc[m]);
    return;
  }
  const __mmask16 keep = static_cast<__mmask16>((1u << valid) - 1);
  const __m512 bv = bias ? _mm512_maskz_loadu_ps(keep, bias + n0) : _mm512_setzero_ps();
#pragma GCC unroll 16
  for (int m = 0; m < ROWS; ++m) _mm512_mask_storeu_ps(y + m * ldy + n0, keep, bias ? _mm512_add_ps(acc[m], bv) : acc[m]);
}

// Rows [m0, m0 + 16) of one weight tile, all of K. Bytes [ahead, ahead_end) (or none) of the next
// weight tile are fetched into the cache meanwhile, spread over the blocks: the tiles' loads and the
// unpacking would stall on memory.
template <bool W4>
static void tile_rows(const WeightFormat& f, const uint8_t* tile, const uint8_t* bt, int64_t b_stride, const QuantizedActs& x, const float* dT,
                      const float* sT, int64_t m0, const float* bias, float* y, int64_t ldy, int64_t n0, int64_t valid,
                      const uint8_t* ahead, const uint8_t* ahead_end) {
  const int64_t nb = f.blocks(), bb = f.block_bytes(), K = f.K, ssz = f.f32_scales ? 4 : 2;
  const bool has_min = f.has_min;
  const int64_t ahead_step = ((ahead_end - ahead + nb - 1) / nb + 63) / 64 * 64;  // bytes fetched per block
  __m512 acc[ROWS];
#pragma GCC unroll 16
  for (int m = 0; m < ROWS; ++m) acc[m] = _mm512_setzero_ps();
  alignas(64) int32_t sums[2][ROWS * 16];
  const int8_t* a = x.q + m0 * K;
  product<W4>(0, a, K, bt, b_stride, sums[0]);
  for (int64_t b = 0; b < nb; ++b) {
    if (b + 1 < nb) product<W4>(b + 1, a, K, bt, b_stride, sums[(b + 1) % 2]);
    const int32_t* c = sums[b % 2];
    for (const uint8_t* p = ahead + b * ahead_step; p < ahead + (b + 1) * ahead_step && p < ahead_end; p += 64)
      _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
    const uint8_t* sc = tile + b * bb + f.quant_bytes();
    const __m512 d = load_scales(sc, f.f32_scales);
    const float* da = dT + b * ROWS;
    const float* sa = sT + b * ROWS;
    // The AVX-512 kernel's epilogue (qgemm_kernels.inc: accumulate), operation for operation.
    if (has_min) {
      const __m512 mn = load_scales(sc + TILE * ssz, f.f32_scales);
#pragma GCC unroll 16
      for (int m = 0; m < ROWS; ++m) {
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(c + m * 16)), _mm512_mul_ps(d, _mm512_set1_ps(da[m])), acc[m]);
        acc[m] = _mm512_fmadd_ps(mn, _mm512_set1_ps(sa[m]), acc[m]);
      }
    } else {
#pragma GCC unroll 16
      for (int m = 0; m < ROWS; ++m)
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(c + m * 16)), _mm512_mul_ps(d, _mm512_set1_ps(da[m])), acc[m]);
    }
  }
  store_rows(acc, bias, y + m0 * ldy, ldy, n0, valid);
}

// A W4 weight tile's B operands, one per block: 512 bytes of unsigned quants.
static void unpack_w4(const WeightFormat& f, const uint8_t* tile, uint8_t* out) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  for (int64_t b = 0; b < f.blocks(); ++b) {
    const uint8_t* blk = tile + b * f.block_bytes();
    for (int ch = 0; ch < 4; ++ch) {
      const __m512i raw = _mm512_loadu_si512(blk + ch * 64);
      _mm512_store_si512(out + b * 512 + ch * 64, _mm512_and_si512(raw, low4));
      _mm512_store_si512(out + b * 512 + (ch + 4) * 64, _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4));
    }
  }
}

// Whole groups of 16 rows of [m0, m1).
static void gemm_groups(const WeightFormat& f, const uint8_t* w, const QuantizedActs& x, const float* bias, float* y, int64_t ldy,
                        int64_t m0, int64_t m1, int64_t t0, int64_t t1) {
  configure();
  thread_local uint8_t* unpacked = nullptr;
  thread_local int64_t unpacked_size = 0;
  const bool w4 = f.kind == W4;
  if (w4 && f.blocks() * 512 > unpacked_size) {
    free(unpacked);
    unpacked_size = f.blocks() * 512;
    unpacked = static_cast<uint8_t*>(aligned_alloc(64, unpacked_size));
  }
  // The activation scales of each block, 16 rows side by side: dT[g][b][r] = d of row m0 + 16g + r.
  const int64_t nb = f.blocks(), groups = (m1 - m0 + ROWS - 1) / ROWS;
  thread_local float* scales = nullptr;
  thread_local int64_t scales_size = 0;
  if (2 * groups * nb * ROWS > scales_size) {
    free(scales);
    scales_size = 2 * groups * nb * ROWS;
    scales = static_cast<float*>(aligned_alloc(64, scales_size * sizeof(float)));
  }
  float* dT = scales;
  float* sT = scales + groups * nb * ROWS;
  for (int64_t m = m0; m < m1; ++m) {
    const int64_t g = (m - m0) / ROWS, r = (m - m0) % ROWS;
    for (int64_t b = 0; b < nb; ++b) {
      dT[(g * nb + b) * ROWS + r] = x.d[m * nb + b];
      sT[(g * nb + b) * ROWS + r] = x.s[m * nb + b];
    }
  }
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* tile = w + t * f.tile_bytes();
    if (w4) unpack_w4(f, tile, unpacked);
    const int64_t n0 = t * TILE, valid = f.N - n0 < TILE ? f.N - n0 : TILE;
    for (int64_t m = m0; m < m1; m += ROWS) {
      const int64_t g = (m - m0) / ROWS;
      const float* gd = dT + g * nb * ROWS;
      const float* gs = sT + g * nb * ROWS;
      // Each group of rows fetches its share of the next tile (measured with two threads streaming a
      // matrix from memory at 32 rows: 18% less time on the Q8_0 head, 7% on Q4_1, against all of it
      // during the first group).
      const int64_t tb = t + 1 < f.tiles() ? f.tile_bytes() : 0;
      const uint8_t* ahead = tile + f.tile_bytes() + tb * g / groups;
      const uint8_t* ahead_end = tile + f.tile_bytes() + tb * (g + 1) / groups;
      if (w4) tile_rows<true>(f, tile, unpacked, 512, x, gd, gs, m, bias, y, ldy, n0, valid, ahead, ahead_end);
      else tile_rows<false>(f, tile, tile, f.block_bytes(), x, gd, gs, m, bias, y, ldy, n0, valid, ahead, ahead_end);
    }
  }
  _tile_release();
}

static void gemm(const WeightFormat& f, const uint8_t* w, const QuantizedActs& x, const float* bias, float* y, int64_t ldy, int64_t m0,
                 int64_t m1, int64_t t0, int64_t t1) {
  const int64_t whole = f.block == QK ? (m1 - m0) / ROWS * ROWS : 0;
  if (whole > 0) gemm_groups(f, w, x, bias, y, ldy, m0, m0 + whole, t0, t1);
  if (m0 + whole < m1) qgemm_avx512().gemm(f, w, x, bias, y, ldy, m0 + whole, m1, t0, t1);
}

}  // namespace amx
}  // namespace serve_native
#pragma GCC pop_options

namespace serve_native {

// Linux hands out the AMX register state only on request, once per process.
bool amx_permitted() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
  return ok;
}

QgemmKernels qgemm_amx() {
  const QgemmKernels vnni = qgemm_avx512();
  return {"amx", amx::gemm, vnni.quantize, 16};
}

}  // namespace serve_native
