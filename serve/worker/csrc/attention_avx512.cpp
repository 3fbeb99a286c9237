// Decode attention for one (request, kv head) on AVX-512, for the common case: a float16 or int8 cache
// and 64-value heads (layer_ops.cpp's decode_attention takes this path where the CPU and the level
// allow, and its AVX2 loop elsewhere).
//
// Why a second copy: at 32 streams attention is a fifth of a step, and the AVX2 loop spends most of its
// instructions on what 16 lanes do once: a key row is 4 registers instead of 8 (half the float16
// conversions and FMAs), the group's queries stay in 12 registers instead of being reloaded for every
// key, and the score of each key and head, a horizontal sum, is taken for 16 keys at a time (reduce16,
// ~3 instructions a score against AVX2's 6). The values pass is the same loop at twice the width.
// Scores are summed in another order than the AVX2 loop's: the two levels agree to float32 rounding,
// and a level is chosen per machine, never per batch.
//
// An int8 row (common.h: 64 values and their float32 scale, 68 bytes) is half a float16 row's bytes:
// at 32 streams the cache is read from memory, and 30 layers of 32 streams of 128 tokens take ~5.0 ms
// instead of ~7.0 (both in one process, this Xeon). Its scales are applied to the 16 scores of a block
// at once, and to the softmax weights in the values pass, row by row.

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")

#include "exp_lanes.h"  // after the target: its template is compiled for AVX-512 here

namespace serve_native {
namespace {

constexpr int D = 64;       // values per head
constexpr int KEYS = 16;    // keys whose scores are reduced together
constexpr int MAX_G = 4;    // query heads per kv head handled here (SmolLM2: 3)
// Rows fetched ahead of the one scored, and before the first: 32, and the first 32 fetched at the
// start, against 16 and none, measured 5-10% faster with the cache in memory (both in one process).
constexpr int64_t AHEAD = 32;

inline __m512 load16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline __m512 load16(const int8_t* p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))); }

// Elements per row, and a row's scale: float16 rows hold their values, int8 rows (common.h) add a scale.
template <typename T>
constexpr int64_t ROW = std::is_same_v<T, int8_t> ? D + 4 : D;

template <typename T>
inline float scale_of(const T* row) {
  if constexpr (std::is_same_v<T, int8_t>) {
    float s;
    std::memcpy(&s, row + D, sizeof s);
    return s;
  } else {
    return 1.f;
  }
}

// Every line of a row: 128 bytes of float16, or 68 of int8 that may straddle two lines.
template <typename T>
inline void prefetch_row(const T* p) {
  const char* c = reinterpret_cast<const char*>(p);
  _mm_prefetch(c, _MM_HINT_T0);
  _mm_prefetch(c + ROW<T> * sizeof(T) - 1, _MM_HINT_T0);
}

// (a, b) -> per 128-bit chunk: a's chunks 0,1 + 2,3 in the low half, b's in the high half.
inline __m512 fold_halves(__m512 a, __m512 b) {
  return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(1, 0, 1, 0)), _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
}

// Lane i of the result: the sum of the 16 lanes of v[i].
inline __m512 reduce16(const __m512* v) {
  __m512 r[8], s[4];
  for (int i = 0; i < 8; ++i) r[i] = fold_halves(v[2 * i], v[2 * i + 1]);  // chunks: v0 v0 v1 v1
  for (int i = 0; i < 4; ++i)  // chunks: 4 vectors, one chunk of 4 partial sums each
    s[i] = _mm512_add_ps(_mm512_shuffle_f32x4(r[2 * i], r[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(r[2 * i], r[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  __m512 t[2];
  for (int i = 0; i < 2; ++i)  // within each chunk: pairs of partial sums of two vectors
    t[i] = _mm512_add_ps(_mm512_shuffle_ps(s[2 * i], s[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(s[2 * i], s[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 u = _mm512_add_ps(_mm512_shuffle_ps(t[0], t[1], _MM_SHUFFLE(2, 0, 2, 0)), _mm512_shuffle_ps(t[0], t[1], _MM_SHUFFLE(3, 1, 3, 1)));
  // Lane 4c + k of u holds vector 4k + c.
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, u);
}

SERVE_FLOAT_LANES(Lanes16, __m512, _mm512, 512, _mm512_roundscale_ps);  // AVX-512's 16 floats

inline __m512 exp16(__m512 x) { return exp_lanes<Lanes16>(x); }  // common.h's exp8 at 16 lanes

template <int G, typename T>
void attend(const T* keys, const T* values, const int64_t* slots, int64_t L, const float* qh, float* oh, float* scores) {
  constexpr bool scaled = std::is_same_v<T, int8_t>;
  __m512 q[G][4];
  for (int j = 0; j < G; ++j)
    for (int i = 0; i < 4; ++i) q[j][i] = _mm512_loadu_ps(qh + j * D + 16 * i);
  for (int64_t l = 0; l < L && l < AHEAD; ++l) {
    prefetch_row(keys + slots[l] * ROW<T>);
    prefetch_row(values + slots[l] * ROW<T>);
  }
  // Scores, 16 keys at a time (the last block padded with zero scores, overwritten by nothing: only
  // [0, L) is read below).
  for (int64_t l0 = 0; l0 < L; l0 += KEYS) {
    __m512 part[G][KEYS];
    alignas(64) float key_scale[KEYS];
    for (int l = 0; l < KEYS; ++l) {
      const int64_t at = l0 + l;
      if (at >= L) {
        for (int j = 0; j < G; ++j) part[j][l] = _mm512_setzero_ps();
        if constexpr (scaled) key_scale[l] = 0.f;
        continue;
      }
      if (at + AHEAD < L) {
        prefetch_row(keys + slots[at + AHEAD] * ROW<T>);
        prefetch_row(values + slots[at + AHEAD] * ROW<T>);
      }
      const T* k = keys + slots[at] * ROW<T>;
      if constexpr (scaled) key_scale[l] = scale_of(k);
      const __m512 k0 = load16(k), k1 = load16(k + 16), k2 = load16(k + 32), k3 = load16(k + 48);
      for (int j = 0; j < G; ++j)
        part[j][l] = _mm512_fmadd_ps(q[j][3], k3, _mm512_fmadd_ps(q[j][2], k2, _mm512_fmadd_ps(q[j][1], k1, _mm512_mul_ps(q[j][0], k0))));
    }
    for (int j = 0; j < G; ++j) {
      __m512 s = reduce16(part[j]);
      if constexpr (scaled) s = _mm512_mul_ps(s, _mm512_load_ps(key_scale));
      const int64_t n = L - l0 < KEYS ? L - l0 : KEYS;
      _mm512_mask_storeu_ps(scores + j * L + l0, static_cast<__mmask16>((1u << n) - 1), s);
    }
  }
  // Softmax per query head.
  for (int j = 0; j < G; ++j) {
    float* s = scores + j * L;
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int64_t l = 0; l < L; l += 16) {
      const __mmask16 m = L - l >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (L - l)) - 1);
      mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), m, s + l));
    }
    const __m512 mv = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t l = 0; l < L; l += 16) {
      const __mmask16 m = L - l >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (L - l)) - 1);
      const __m512 e = _mm512_maskz_mov_ps(m, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + l), mv)));
      _mm512_mask_storeu_ps(s + l, m, e);
      sum = _mm512_add_ps(sum, e);
    }
    const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum));
    for (int64_t l = 0; l < L; l += 16) {
      const __mmask16 m = L - l >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (L - l)) - 1);
      _mm512_mask_storeu_ps(s + l, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, s + l), inv));
    }
  }
  // Values: out[j] = sum over l of p[j][l] * V[l], each value row's scale folded into its weights
  // here, where the row is read anyway (a pass of its own over the scales cost ~8% of this function).
  __m512 acc[G][4];
  for (int j = 0; j < G; ++j)
    for (int i = 0; i < 4; ++i) acc[j][i] = _mm512_setzero_ps();
  for (int64_t l = 0; l < L; ++l) {
    const T* v = values + slots[l] * ROW<T>;
    const __m512 v0 = load16(v), v1 = load16(v + 16), v2 = load16(v + 32), v3 = load16(v + 48);
    const float vs = scale_of(v);
    for (int j = 0; j < G; ++j) {
      const __m512 p = _mm512_set1_ps(scaled ? scores[j * L + l] * vs : scores[j * L + l]);
      acc[j][0] = _mm512_fmadd_ps(p, v0, acc[j][0]);
      acc[j][1] = _mm512_fmadd_ps(p, v1, acc[j][1]);
      acc[j][2] = _mm512_fmadd_ps(p, v2, acc[j][2]);
      acc[j][3] = _mm512_fmadd_ps(p, v3, acc[j][3]);
    }
  }
  for (int j = 0; j < G; ++j)
    for (int i = 0; i < 4; ++i) _mm512_storeu_ps(oh + j * D + 16 * i, acc[j][i]);
}

}  // namespace

template <typename T>
bool attend_group(const T* keys, const T* values, const int64_t* slots, int64_t L, const float* qh, int64_t g, int64_t d, float* oh,
                  float* scores) {
  if (d != D || g < 1 || g > MAX_G) return false;
  switch (g) {
    case 1: attend<1>(keys, values, slots, L, qh, oh, scores); break;
    case 2: attend<2>(keys, values, slots, L, qh, oh, scores); break;
    case 3: attend<3>(keys, values, slots, L, qh, oh, scores); break;
    default: attend<4>(keys, values, slots, L, qh, oh, scores); break;
  }
  return true;
}

// One (request, kv head): g query heads at qh (rows of 64), their keys and values the cache rows at
// keys/values + slot * row (64 float16, or an int8 row of 68 bytes), scores scratch of g * L floats;
// writes g rows of 64 at oh. False where this path does not apply (another head size or group), and
// the caller runs its own loop.
bool attend_avx512_half(const uint16_t* keys, const uint16_t* values, const int64_t* slots, int64_t L, const float* qh, int64_t g,
                        int64_t d, float* oh, float* scores) {
  return attend_group(keys, values, slots, L, qh, g, d, oh, scores);
}

bool attend_avx512_int8(const int8_t* keys, const int8_t* values, const int64_t* slots, int64_t L, const float* qh, int64_t g,
                        int64_t d, float* oh, float* scores) {
  return attend_group(keys, values, slots, L, qh, g, d, oh, scores);
}

}  // namespace serve_native
#pragma GCC pop_options
