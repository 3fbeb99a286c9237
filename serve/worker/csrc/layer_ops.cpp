// Our CPU kernels for the small operations of a float32 step (AVX2 + FMA + F16C).
//
// Why they exist: at batch 1 a SmolLM2 step is ~600 small ATen ops of 5-40 us each (an RMSNorm of 576
// floats cost ~40 us through torch.rms_norm's decomposition). Each kernel here replaces a run of those
// ops with one call:
//   decode_attention one query token per request against its cached keys and values, read in place
//                    through req_to_token (no gather into a padded copy)
//   rope_store      RoPE on queries and keys in place, keys and values written to their cache slots
//   rms_norm, add_rms_norm, silu_mul   the elementwise parts of a layer, fused
// Threads come from ATen's pool (at::parallel_for), so they share torch's OpenMP runtime and settings;
// work is handed out in chunks from a shared counter (parallel_chunks).

#include "common.h"

#include <type_traits>

namespace serve_native {

// ---- attention for decodes -------------------------------------------------------------------------
// q [B, n_q, d] (already scaled by 1/sqrt(d); rows may be strided, as a slice of qkv); cache [2*n_kv,
// pool, d], keys then values; the keys of request b are at slots req_to_token[rows[b], 0:lens[b]]. One
// task per (request, kv head): each cached key and value row is read once (and widened from float16
// once) for the whole group of query heads that share it.

// A request's rows lie in runs of 16 slots scattered over the pool (serve/scheduler/batch.py), so the
// hardware prefetcher cannot guess the next run; we can, from the slot list. The key pass fetches the
// values too, so that the value pass finds them in cache. Measured on a Zen 4 EPYC, 30 layers of 32
// streams of 128 tokens, float16 cache: 7.8 ms a step fetching 8 keys ahead only, 6.8 with keys and
// values 16 ahead (and 12-13 ms against 15 with no prefetch at all, on an older version).
constexpr int64_t AHEAD = 16;

// Every cache line of a row of n elements (an int8 row of 68 bytes may straddle two).
template <typename T>
inline void prefetch_row(const T* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
  for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(c + o, _MM_HINT_T0);
  _mm_prefetch(c + bytes - 1, _MM_HINT_T0);
}

// out[j] = sum over l of p[j][l] * V[l] for JN query heads, 32 columns at a time: JN * 4 accumulators,
// JN weights and one value register, within AVX2's 16 (a fifth value register spilled an accumulator to
// the stack on every key).
template <int JN, typename T>
inline void weighted_values(const float* p, int64_t L, const int64_t* slots, const T* values, int64_t d, float* out) {
  const int64_t row = kv_row<T>(d);
  for (int64_t c = 0; c < d; c += 32) {
    __m256 acc[JN][4];
    for (int j = 0; j < JN; ++j)
      for (int i = 0; i < 4; ++i) acc[j][i] = _mm256_setzero_ps();
    for (int64_t l = 0; l < L; ++l) {
      const T* v = values + slots[l] * row + c;
      __m256 pj[JN];
      for (int j = 0; j < JN; ++j) pj[j] = _mm256_set1_ps(p[j * L + l]);
      for (int i = 0; i < 4; ++i) {
        const __m256 vi = load8(v + 8 * i);
        for (int j = 0; j < JN; ++j) acc[j][i] = _mm256_fmadd_ps(pj[j], vi, acc[j][i]);
      }
    }
    for (int j = 0; j < JN; ++j)
      for (int i = 0; i < 4; ++i) _mm256_storeu_ps(out + j * d + c + 8 * i, acc[j][i]);
  }
}

bool qgemm_runs(int64_t level);  // qlinear.cpp
// attention_avx512.cpp: one task on AVX-512 (float16 or int8 cache, 64-value heads); false where it does
// not apply.
bool attend_avx512_half(const uint16_t* keys, const uint16_t* values, const int64_t* slots, int64_t L, const float* qh, int64_t g,
                        int64_t d, float* oh, float* scores);
bool attend_avx512_int8(const int8_t* keys, const int8_t* values, const int64_t* slots, int64_t L, const float* qh, int64_t g,
                        int64_t d, float* oh, float* scores);

template <typename T>
void decode_attention_impl(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& req_to_token,
                           const at::Tensor& rows, const at::Tensor& lens, const at::Tensor& out, bool wide) {
  const int64_t B = q.size(0), n_q = q.size(1), d = q.size(2);
  const int64_t n_kv = cache.size(0) / 2, pool = cache.size(1), max_len = req_to_token.size(1), row_n = kv_row<T>(d);
  const int64_t g = n_q / n_kv;
  const float* qp = q.data_ptr<float>();
  const int64_t q_stride = q.stride(0);
  const T* cp = static_cast<const T*>(cache.data_ptr());
  const int64_t* table = req_to_token.data_ptr<int64_t>();
  const auto rows_c = rows.contiguous(), lens_c = lens.contiguous();  // held: their data outlive the loop
  const int64_t* row = rows_c.data_ptr<int64_t>();
  const int64_t* len = lens_c.data_ptr<int64_t>();
  const int64_t table_rows = req_to_token.size(0);
  float* op = out.data_ptr<float>();
  parallel_chunks(B * n_kv, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / n_kv, h = t % n_kv, L = len[b];
      TORCH_CHECK(L >= 1 && L <= max_len && row[b] >= 0 && row[b] < table_rows, "decode_attention: row or length out of range");
      const int64_t* slots = table + row[b] * max_len;
      for (int64_t l = 0; l < L; ++l) TORCH_CHECK(slots[l] >= 0 && slots[l] < pool, "decode_attention: slot out of range");
      const T* keys = cp + h * pool * row_n;
      const T* values = cp + (n_kv + h) * pool * row_n;
      const float* qh = qp + b * q_stride + h * g * d;
      float* oh = op + (b * n_q + h * g) * d;
      scores.resize(g * L);
      if constexpr (std::is_same_v<T, at::Half>) {
        if (wide && attend_avx512_half(reinterpret_cast<const uint16_t*>(keys), reinterpret_cast<const uint16_t*>(values), slots, L, qh, g, d,
                                       oh, scores.data()))
          continue;
      } else if constexpr (std::is_same_v<T, int8_t>) {
        if (wide && attend_avx512_int8(keys, values, slots, L, qh, g, d, oh, scores.data())) continue;
      }
      for (int64_t l = 0; l < L && l < AHEAD; ++l) {  // the rows the loop below does not fetch ahead
        prefetch_row(keys + slots[l] * row_n, row_n);
        prefetch_row(values + slots[l] * row_n, row_n);
      }
      for (int64_t l = 0; l < L; ++l) {
        if (l + AHEAD < L) {
          prefetch_row(keys + slots[l + AHEAD] * row_n, row_n);
          prefetch_row(values + slots[l + AHEAD] * row_n, row_n);
        }
        const T* k = keys + slots[l] * row_n;
        const float ks = kv_scale(k, d);
        if (d == 64) {  // the common head size: the key row widened once into registers
          __m256 kv[8];
          for (int i = 0; i < 8; ++i) kv[i] = load8(k + 8 * i);
          for (int64_t j = 0; j < g; ++j) {
            const float* qj = qh + j * d;
            __m256 a = _mm256_mul_ps(_mm256_loadu_ps(qj), kv[0]);
            for (int i = 1; i < 8; ++i) a = _mm256_fmadd_ps(_mm256_loadu_ps(qj + 8 * i), kv[i], a);
            scores[j * L + l] = hsum(a) * ks;
          }
        } else {
          for (int64_t j = 0; j < g; ++j) scores[j * L + l] = dot(qh + j * d, k, d) * ks;
        }
      }
      for (int64_t j = 0; j < g; ++j) {
        float* s = scores.data() + j * L;
        // The largest score 8 lanes at a time: a scalar max is one dependent chain of L steps.
        __m256 mx8 = _mm256_set1_ps(-INFINITY);
        int64_t l = 0;
        for (; l + 8 <= L; l += 8) mx8 = _mm256_max_ps(mx8, _mm256_loadu_ps(s + l));
        float mx = hmax(mx8);
        for (; l < L; ++l) mx = std::max(mx, s[l]);
        __m256 mv = _mm256_set1_ps(mx), sum8 = _mm256_setzero_ps();
        l = 0;
        for (; l + 8 <= L; l += 8) {
          __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + l), mv));
          _mm256_storeu_ps(s + l, e);
          sum8 = _mm256_add_ps(sum8, e);
        }
        float sum = hsum(sum8);
        for (; l < L; ++l) sum += (s[l] = std::exp(s[l] - mx));
        const float inv = 1.f / sum;
        for (l = 0; l < L; ++l) s[l] *= inv;
        if constexpr (std::is_same_v<T, int8_t>)  // each value row's scale, folded into its weight
          for (l = 0; l < L; ++l) s[l] *= kv_scale(values + slots[l] * row_n, d);
      }
      if (d % 32 == 0) {
        for (int64_t j = 0; j < g; j += 3) {
          const float* p = scores.data() + j * L;
          switch (std::min<int64_t>(3, g - j)) {
            case 1: weighted_values<1>(p, L, slots, values, d, oh + j * d); break;
            case 2: weighted_values<2>(p, L, slots, values, d, oh + j * d); break;
            default: weighted_values<3>(p, L, slots, values, d, oh + j * d); break;
          }
        }
      } else {
        std::fill(oh, oh + g * d, 0.f);
        for (int64_t j = 0; j < g; ++j)
          for (int64_t l = 0; l < L; ++l) axpy(scores[j * L + l], values + slots[l] * row_n, oh + j * d, d);
      }
    }
  });
}

// level: the quantized matmul's (serve/worker/native.py); from 2 (AVX-512) on, a float16 or int8 cache
// with 64-value heads takes attention_avx512.cpp.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& req_to_token,
                            const at::Tensor& rows, const at::Tensor& lens, int64_t level) {
  TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == at::kFloat && q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2),
              "q must be a float32 CPU tensor [B, n_q, d], rows contiguous");
  TORCH_CHECK(rows.numel() == q.size(0) && lens.numel() == q.size(0), "decode_attention: one row and one length per query");
  check_cache(cache, q.size(2));
  TORCH_CHECK(req_to_token.scalar_type() == at::kLong && req_to_token.is_contiguous(), "req_to_token must be contiguous int64");
  TORCH_CHECK(rows.scalar_type() == at::kLong && lens.scalar_type() == at::kLong, "rows and lens must be int64");
  TORCH_CHECK(q.size(1) % (cache.size(0) / 2) == 0, "decode_attention: head shapes disagree");
  auto out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  const bool wide = level >= 2 && qgemm_runs(2);
  if (cache.scalar_type() == at::kHalf) decode_attention_impl<at::Half>(q, cache, req_to_token, rows, lens, out, wide);
  else if (cache.scalar_type() == at::kChar) decode_attention_impl<int8_t>(q, cache, req_to_token, rows, lens, out, wide);
  else decode_attention_impl<float>(q, cache, req_to_token, rows, lens, out, wide);
  return out;
}

// ---- RoPE and the cache write ----------------------------------------------------------------------
// qkv [T, n_q + 2*n_kv, d] in pair layout (see model.pair_layout); rope [T, d/2, 2] cos and sin of each
// token's position. Rotates the query and key heads in place (the queries also times q_scale: the
// attention scale, where quantized weights could not take it), then copies keys and values to their
// slots (rounded to float16, or quantized to int8 rows, when the cache is: engine.kv_cache_dtype).
void rope_store(const at::Tensor& qkv, const at::Tensor& rope, const at::Tensor& cache, const at::Tensor& slots, int64_t n_q,
                double q_scale) {
  check_f32(qkv, "qkv");
  check_f32(rope, "rope");
  TORCH_CHECK(slots.scalar_type() == at::kLong, "slots must be int64");
  const int64_t T = qkv.size(0), heads = qkv.size(1), d = qkv.size(2), n_kv = (heads - n_q) / 2, pool = cache.size(1);
  check_cache(cache, d);
  TORCH_CHECK(cache.size(0) == 2 * n_kv && rope.size(0) == T && rope.numel() == T * d && slots.numel() == T, "rope_store: shapes disagree");
  float* x = qkv.data_ptr<float>();
  const float* cs = rope.data_ptr<float>();
  const bool half = cache.scalar_type() == at::kHalf, int8 = cache.scalar_type() == at::kChar;
  float* cf = half || int8 ? nullptr : cache.data_ptr<float>();
  at::Half* ch = half ? cache.data_ptr<at::Half>() : nullptr;
  int8_t* c8 = int8 ? static_cast<int8_t*>(cache.data_ptr()) : nullptr;
  auto slot_t = slots.contiguous();
  const int64_t* slot = slot_t.data_ptr<int64_t>();
  parallel_chunks(T, 64, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      TORCH_CHECK(slot[t] >= 0 && slot[t] < pool, "rope_store: slot out of range");
      const float* c = cs + t * d;
      for (int64_t h = 0; h < n_q + n_kv; ++h) {
        float* p = x + (t * heads + h) * d;
        const float sc = h < n_q ? static_cast<float>(q_scale) : 1.f;
        int64_t i = 0;
        // Four pairs at a time: (a, b) * (cos, sin) = (a cos - b sin, a sin + b cos), as a complex multiply.
        const __m256 scale = _mm256_set1_ps(sc);
        for (; i + 8 <= d; i += 8) {
          const __m256 ab = _mm256_loadu_ps(p + i), cossin = _mm256_loadu_ps(c + i);
          const __m256 ba = _mm256_permute_ps(ab, 0xB1);
          const __m256 r = _mm256_fmaddsub_ps(ab, _mm256_moveldup_ps(cossin), _mm256_mul_ps(ba, _mm256_movehdup_ps(cossin)));
          _mm256_storeu_ps(p + i, _mm256_mul_ps(r, scale));
        }
        for (; i < d; i += 2) {
          const float a = p[i], b = p[i + 1], co = c[i], si = c[i + 1];
          p[i] = (a * co - b * si) * sc;
          p[i + 1] = (a * si + b * co) * sc;
        }
      }
      for (int64_t h = 0; h < 2 * n_kv; ++h) {
        const float* src = x + (t * heads + n_q + h) * d;
        if (int8) {
          kv_quantize(src, d, c8 + (h * pool + slot[t]) * kv_row<int8_t>(d));
          continue;
        }
        const int64_t at = (h * pool + slot[t]) * d;
        if (!half) {
          std::copy_n(src, d, cf + at);
          continue;
        }
        int64_t i = 0;
        for (; i + 8 <= d; i += 8)
          _mm_storeu_si128(reinterpret_cast<__m128i*>(ch + at + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
        for (; i < d; ++i) ch[at + i] = at::Half(src[i]);
      }
    }
  });
}

// ---- elementwise -----------------------------------------------------------------------------------
inline void rms_row(const float* x, const float* w, float* out, int64_t n, float eps) {
  const float r = 1.f / std::sqrt(dot(x, x, n) / n + eps);
  int64_t k = 0;
  const __m256 rv = _mm256_set1_ps(r);
  for (; k + 8 <= n; k += 8) _mm256_storeu_ps(out + k, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + k), rv), _mm256_loadu_ps(w + k)));
  for (; k < n; ++k) out[k] = x[k] * r * w[k];
}

// RMSNorm over the last dimension of x (any leading shape).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_f32(x, "x");
  check_f32(w, "weight");
  const int64_t n = w.numel(), rows = x.numel() / n;
  TORCH_CHECK(x.size(-1) == n, "rms_norm: shapes disagree");
  auto out = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  parallel_chunks(rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) rms_row(xp + r * n, wp, op + r * n, n, static_cast<float>(eps));
  });
  return out;
}

// h += delta (the residual add), then returns RMSNorm(h).
at::Tensor add_rms_norm(const at::Tensor& h, const at::Tensor& delta, const at::Tensor& w, double eps) {
  check_f32(h, "h");
  check_f32(delta, "delta");
  check_f32(w, "weight");
  TORCH_CHECK(h.sizes() == delta.sizes() && h.size(-1) == w.numel(), "add_rms_norm: shapes disagree");
  const int64_t n = w.numel(), rows = h.numel() / n;
  auto out = at::empty_like(h);
  float* hp = h.data_ptr<float>();
  const float* dp = delta.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  parallel_chunks(rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* x = hp + r * n;
      const float* dx = dp + r * n;
      for (int64_t k = 0; k < n; ++k) x[k] += dx[k];
      rms_row(x, wp, op + r * n, n, static_cast<float>(eps));
    }
  });
  return out;
}

// gate_up [T, 2F] -> silu(gate) * up [T, F]
at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_f32(gate_up, "gate_up");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "silu_mul: gate_up must be [T, 2F]");
  const int64_t T = gate_up.size(0), F = gate_up.size(1) / 2;
  auto out = at::empty({T, F}, gate_up.options());
  const float* gp = gate_up.data_ptr<float>();
  float* op = out.data_ptr<float>();
  parallel_chunks(T, 8, [&](int64_t t0, int64_t t1) {
    const __m256 one = _mm256_set1_ps(1.f), zero = _mm256_setzero_ps();
    for (int64_t t = t0; t < t1; ++t) {
      const float* g = gp + t * 2 * F;
      const float* u = g + F;
      float* o = op + t * F;
      int64_t k = 0;
      for (; k + 8 <= F; k += 8) {
        __m256 gv = _mm256_loadu_ps(g + k);
        __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(zero, gv))));
        _mm256_storeu_ps(o + k, _mm256_mul_ps(_mm256_mul_ps(gv, sig), _mm256_loadu_ps(u + k)));
      }
      for (; k < F; ++k) o[k] = g[k] / (1.f + std::exp(-g[k])) * u[k];
    }
  });
  return out;
}

}  // namespace serve_native
