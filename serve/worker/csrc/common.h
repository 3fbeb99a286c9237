// What our CPU kernels share: SIMD helpers and the thread-pool loop. See layer_ops.cpp for why they exist.

#pragma once

// Only the parts of ATen these files use, not torch/types.h (every ATen operator): a file that includes
// this compiles in ~6 s instead of ~12 here, and a fresh machine's first build pays that six times.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "exp_lanes.h"

namespace serve_native {

// fn(begin, end) over [0, n) in chunks of `grain`, taken from a shared counter by ATen's threads. Five
// processes share two cores here: with at::parallel_for's fixed halves, a thread preempted by the
// scheduler or the api holds up the whole step; with chunks, the other thread takes over its share.
template <typename F>
void parallel_chunks(int64_t n, int64_t grain, const F& fn) {
  if (n <= grain || at::get_num_threads() == 1 || at::in_parallel_region()) {
    fn(0, n);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(grain); i < n; i = next.fetch_add(grain)) fn(i, std::min(n, i + grain));
  });
}

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp(x) for 8 floats: Cephes' range reduction and polynomial, ~1 ulp on the range softmax and SiLU use.
SERVE_FLOAT_LANES(Lanes8, __m256, _mm256, 256, _mm256_round_ps);  // AVX2's 8 floats, for exp_lanes.h

inline __m256 exp8(__m256 x) { return exp_lanes<Lanes8>(x); }

// 8 floats from a float32, float16 or int8 (engine.kv_cache_dtype) array.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline __m256 load8(const int8_t* p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))); }

// ---- the int8 KV cache (engine.kv_cache_dtype: int8) -----------------------------------------------
// A row is one head's d values of one token as int8, then their scale as a float32 (d + 4 bytes): value
// i is row[i] * scale, scale = the row's largest magnitude / 127, as serve/worker/ops.py's torch form
// quantizes it. Attention applies the scales once per key (to its score) and once per value (to its
// weight), never per element.
constexpr int64_t KV_SCALE_BYTES = 4;

// Elements per cache row, of a cache of T holding d-value heads.
template <typename T>
constexpr int64_t kv_row(int64_t d) {
  return std::is_same_v<T, int8_t> ? d + KV_SCALE_BYTES : d;
}

// The scale of a row (1 for float caches, whose rows hold the values themselves).
template <typename T>
inline float kv_scale(const T* row, int64_t d) {
  if constexpr (std::is_same_v<T, int8_t>) {
    float s;
    std::memcpy(&s, row + d, sizeof s);
    return s;
  } else {
    return 1.f;
  }
}

// d floats -> a cache row of int8 values and their scale. Rounds to nearest even, as torch.round.
inline void kv_quantize(const float* x, int64_t d, int8_t* row) {
  __m256 mx = _mm256_setzero_ps();
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) mx = _mm256_max_ps(mx, _mm256_and_ps(_mm256_loadu_ps(x + i), abs_mask));
  float amax = hmax(mx);
  for (; i < d; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float scale = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
  const __m256 iv = _mm256_set1_ps(inv);
  for (i = 0; i + 8 <= d; i += 8) {
    const __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i), iv));  // MXCSR: nearest even
    const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(row + i), _mm_packs_epi16(w, w));
  }
  for (; i < d; ++i) row[i] = static_cast<int8_t>(std::nearbyint(x[i] * inv));
  std::memcpy(row + d, &scale, sizeof scale);
}

template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), load8(b + k), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 8), load8(b + k + 8), s1);
  }
  for (; k + 8 <= n; k += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), load8(b + k), s0);
  float s = hsum(_mm256_add_ps(s0, s1));
  for (; k < n; ++k) s += a[k] * static_cast<float>(b[k]);
  return s;
}

// y += p * x over n values
template <typename T>
inline void axpy(float p, const T* x, float* y, int64_t n) {
  __m256 pv = _mm256_set1_ps(p);
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) _mm256_storeu_ps(y + k, _mm256_fmadd_ps(pv, load8(x + k), _mm256_loadu_ps(y + k)));
  for (; k < n; ++k) y[k] += p * static_cast<float>(x[k]);
}

// A layer's cache [2 * n_kv, pool, row] for heads of d values: row d for float32 and float16, d + 4 for int8.
inline void check_cache(const at::Tensor& cache, int64_t d) {
  const auto t = cache.scalar_type();
  TORCH_CHECK(cache.device().is_cpu() && cache.is_contiguous() && cache.dim() == 3 && (t == at::kFloat || t == at::kHalf || t == at::kChar),
              "cache must be a contiguous float32, float16 or int8 CPU tensor [2 * kv heads, pool, row]");
  TORCH_CHECK(cache.size(2) == (t == at::kChar ? kv_row<int8_t>(d) : d), "cache rows do not match the head size");
}

inline void check_f32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), name, " must be a contiguous float32 CPU tensor");
}

}  // namespace serve_native
