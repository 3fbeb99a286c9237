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

// 8 floats from a float32 or a float16 (engine.kv_cache_dtype) array.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

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

inline void check_cache(const at::Tensor& cache) {
  TORCH_CHECK(cache.device().is_cpu() && cache.is_contiguous() && (cache.scalar_type() == at::kFloat || cache.scalar_type() == at::kHalf),
              "cache must be a contiguous float32 or float16 CPU tensor");
}

inline void check_f32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), name, " must be a contiguous float32 CPU tensor");
}

}  // namespace serve_native
