// Our CPU kernels for a float32 decode step (AVX2 + FMA), loaded by serve/worker/native.py.
//
// Why they exist: at batch 1 a SmolLM2 step is ~600 small ATen ops of 5-40 us each (an RMSNorm of 576
// floats cost ~40 us through torch.rms_norm's decomposition), plus int8 matmuls that stream weights at
// half the memory bandwidth. Each kernel here replaces a run of those ops with one call:
//   int8_linear     y = (x @ W.T) * scale + b for 1-4 rows, int8 weights and activations
//   decode_attention one query token per request against its cached keys and values, read in place
//                    through req_to_token (no gather into a padded copy)
//   rope_store      RoPE on queries and keys in place, keys and values written to their cache slots
//   rms_norm, add_rms_norm, silu_mul   the elementwise parts of a layer, fused
// Threads come from ATen's pool (at::parallel_for), so they share torch's OpenMP runtime and settings;
// work is handed out in chunks from a shared counter (parallel_chunks).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

namespace {

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

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp(x) for 8 floats: Cephes' range reduction and polynomial, ~1 ulp on the range softmax and SiLU use.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

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

void check_cache(const torch::Tensor& cache) {
  TORCH_CHECK(cache.device().is_cpu() && cache.is_contiguous() && (cache.scalar_type() == torch::kFloat32 || cache.scalar_type() == torch::kHalf),
              "cache must be a contiguous float32 or float16 CPU tensor");
}

void check_f32(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous(), name, " must be a contiguous float32 CPU tensor");
}

// ---- int8 weights, int8 activations --------------------------------------------------------------
// As llama.cpp does on AVX2: each input row is quantized to int8 in blocks of 32 values with a float
// scale per block, so that 32 weight bytes cost one load, one sign flip and one vpmaddubsw (u8 x s8
// pairs into int16: |x| * (w * sign(x)) = x * w, at most 2 * 127 * 127, which cannot saturate).
// Measured here on SmolLM2's weights at one row: 6.9 ms per step against fbgemm's dynamic int8 linear's
// 13.8 (which also pays ~30 us per call before its first multiply). The error is the activations'
// rounding to 8 bits per block of 32; fbgemm rounds them to 7 bits per tensor.
constexpr int64_t QBLOCK = 32;
// Weight rows are streamed one at a time, prefetched this far ahead: measured best of 0-4 KiB here.
constexpr int64_t PREFETCH_BYTES = 2048;

// Rounds 32 floats times `inv` to int8 (round to nearest even, as the rest of the math), in order.
inline __m256i round32(const float* v, __m256 inv) {
  const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v), inv));
  const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + 8), inv));
  const __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + 16), inv));
  const __m256i d = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + 24), inv));
  const __m256i q = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
  return _mm256_permutevar8x32_epi32(q, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));  // undo the packs' lane interleave
}

inline float amax(const float* v, int64_t n) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 m = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(v + i)));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}

struct QuantizedRows {
  std::vector<int8_t> q;  // [M, K]
  std::vector<float> scale;  // [M, K / 32]
};

QuantizedRows quantize_rows(const float* x, int64_t M, int64_t K) {
  QuantizedRows out{std::vector<int8_t>(M * K), std::vector<float>(M * K / QBLOCK)};
  for (int64_t blk = 0; blk < M * K / QBLOCK; ++blk) {
    const float* v = x + blk * QBLOCK;
    const float top = amax(v, QBLOCK);
    out.scale[blk] = top / 127.f;
    const __m256i q = round32(v, _mm256_set1_ps(top > 0.f ? 127.f / top : 0.f));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.q.data() + blk * QBLOCK), q);
  }
  return out;
}

// One weight row against M input rows; each weight block is loaded once for all M.
template <int M>
inline void qdot_row(const int8_t* w, const QuantizedRows& xq, int64_t K, float* out) {
  __m256 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t blocks = K / QBLOCK;
  for (int64_t b = 0; b < blocks; ++b) {
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b * QBLOCK));
    _mm_prefetch(reinterpret_cast<const char*>(w + b * QBLOCK) + PREFETCH_BYTES, _MM_HINT_T0);
    for (int m = 0; m < M; ++m) {
      const __m256i xs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq.q.data() + m * K + b * QBLOCK));
      const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(xs, xs), _mm256_sign_epi8(wv, xs)), ones);
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(xq.scale[m * blocks + b]), acc[m]);
    }
  }
  for (int m = 0; m < M; ++m) out[m] = hsum(acc[m]);
}

template <int M>
void qgemv(const int8_t* w, const QuantizedRows& xq, const float* scale, const float* bias, float* y, int64_t N, int64_t K) {
  parallel_chunks(N, 64, [&](int64_t n0, int64_t n1) {
    float acc[M];
    for (int64_t n = n0; n < n1; ++n) {
      qdot_row<M>(w + n * K, xq, K, acc);
      for (int m = 0; m < M; ++m) y[m * N + n] = acc[m] * scale[n] + (bias ? bias[n] : 0.f);
    }
  });
}

// y = (x @ w.T) * scale + bias for 1-4 rows of x; w [N, K] int8 with one float scale per output row,
// K a multiple of 32. More rows go to fbgemm: its GEMM beat ours (58 ms against 47 at 32 rows here).
torch::Tensor int8_linear(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scale, const std::optional<torch::Tensor>& bias) {
  check_f32(x, "x");
  check_f32(scale, "scale");
  TORCH_CHECK(w.scalar_type() == torch::kInt8 && w.is_contiguous() && w.dim() == 2, "w must be a contiguous [N, K] int8 tensor");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(x.dim() == 2 && w.size(1) == K && K % QBLOCK == 0, "int8_linear: shapes [M, K] x [N, K] with K a multiple of 32");
  TORCH_CHECK(M >= 1 && M <= 4, "int8_linear takes 1 to 4 rows (more go to fbgemm)");
  const float* b = nullptr;
  if (bias) {
    check_f32(*bias, "bias");
    b = bias->data_ptr<float>();
  }
  auto y = torch::empty({M, N}, x.options());
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const QuantizedRows xq = quantize_rows(x.data_ptr<float>(), M, K);
  switch (M) {
    case 1: qgemv<1>(wp, xq, sp, b, yp, N, K); break;
    case 2: qgemv<2>(wp, xq, sp, b, yp, N, K); break;
    case 3: qgemv<3>(wp, xq, sp, b, yp, N, K); break;
    default: qgemv<4>(wp, xq, sp, b, yp, N, K); break;
  }
  return y;
}

// ---- attention for decodes -------------------------------------------------------------------------
// q [B, n_q, d] (already scaled by 1/sqrt(d); rows may be strided, as a slice of qkv); cache [2*n_kv, pool, d], keys then values; the keys of
// request b are at slots req_to_token[rows[b], 0:lens[b]]. One task per (request, kv head): each cached
// key and value row is loaded once for the whole group of query heads that share it.
template <typename T>
void decode_attention_impl(const torch::Tensor& q, const torch::Tensor& cache, const torch::Tensor& req_to_token,
                           const torch::Tensor& rows, const torch::Tensor& lens, const torch::Tensor& out) {
  const int64_t B = q.size(0), n_q = q.size(1), d = q.size(2);
  const int64_t n_kv = cache.size(0) / 2, pool = cache.size(1), max_len = req_to_token.size(1);
  const int64_t g = n_q / n_kv;
  const float* qp = q.data_ptr<float>();
  const int64_t q_stride = q.stride(0);
  const T* cp = cache.data_ptr<T>();
  const int64_t* table = req_to_token.data_ptr<int64_t>();
  const int64_t* row = rows.contiguous().data_ptr<int64_t>();
  const int64_t* len = lens.contiguous().data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  parallel_chunks(B * n_kv, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / n_kv, h = t % n_kv, L = len[b];
      TORCH_CHECK(L >= 1 && L <= max_len, "decode_attention: length out of range");
      const int64_t* slots = table + row[b] * max_len;
      const T* keys = cp + h * pool * d;
      const T* values = cp + (n_kv + h) * pool * d;
      const float* qh = qp + b * q_stride + h * g * d;
      float* oh = op + (b * n_q + h * g) * d;
      scores.resize(g * L);
      for (int64_t l = 0; l < L; ++l) {
        const T* k = keys + slots[l] * d;
        for (int64_t j = 0; j < g; ++j) scores[j * L + l] = dot(qh + j * d, k, d);
      }
      for (int64_t j = 0; j < g; ++j) {
        float* s = scores.data() + j * L;
        float mx = s[0];
        for (int64_t l = 1; l < L; ++l) mx = std::max(mx, s[l]);
        __m256 mv = _mm256_set1_ps(mx), sum8 = _mm256_setzero_ps();
        int64_t l = 0;
        for (; l + 8 <= L; l += 8) {
          __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + l), mv));
          _mm256_storeu_ps(s + l, e);
          sum8 = _mm256_add_ps(sum8, e);
        }
        float sum = hsum(sum8);
        for (; l < L; ++l) sum += (s[l] = std::exp(s[l] - mx));
        const float inv = 1.f / sum;
        for (l = 0; l < L; ++l) s[l] *= inv;
        if (d == 64) {  // the common head size: the output row stays in registers over all L values
          __m256 acc[8];
          for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
          for (l = 0; l < L; ++l) {
            const T* v = values + slots[l] * d;
            const __m256 p = _mm256_set1_ps(s[l]);
            for (int i = 0; i < 8; ++i) acc[i] = _mm256_fmadd_ps(p, load8(v + 8 * i), acc[i]);
          }
          for (int i = 0; i < 8; ++i) _mm256_storeu_ps(oh + j * d + 8 * i, acc[i]);
        } else {
          std::fill(oh + j * d, oh + (j + 1) * d, 0.f);
          for (l = 0; l < L; ++l) axpy(s[l], values + slots[l] * d, oh + j * d, d);
        }
      }
    }
  });
}

torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& cache, const torch::Tensor& req_to_token,
                               const torch::Tensor& rows, const torch::Tensor& lens) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2), "q must be float32 [B, n_q, d], rows contiguous");
  check_cache(cache);
  TORCH_CHECK(req_to_token.scalar_type() == torch::kInt64 && req_to_token.is_contiguous(), "req_to_token must be contiguous int64");
  TORCH_CHECK(rows.scalar_type() == torch::kInt64 && lens.scalar_type() == torch::kInt64, "rows and lens must be int64");
  TORCH_CHECK(cache.size(2) == q.size(2) && q.size(1) % (cache.size(0) / 2) == 0, "decode_attention: head shapes disagree");
  auto out = torch::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  if (cache.scalar_type() == torch::kHalf) decode_attention_impl<at::Half>(q, cache, req_to_token, rows, lens, out);
  else decode_attention_impl<float>(q, cache, req_to_token, rows, lens, out);
  return out;
}

// ---- RoPE and the cache write ----------------------------------------------------------------------
// qkv [T, n_q + 2*n_kv, d] in pair layout (see model.pair_layout); rope [T, d/2, 2] cos and sin of each
// token's position. Rotates the query and key heads in place, then copies keys and values to their slots
// (rounded to float16 when the cache is: engine.kv_cache_dtype).
void rope_store(const torch::Tensor& qkv, const torch::Tensor& rope, const torch::Tensor& cache, const torch::Tensor& slots, int64_t n_q) {
  check_f32(qkv, "qkv");
  check_f32(rope, "rope");
  check_cache(cache);
  TORCH_CHECK(slots.scalar_type() == torch::kInt64, "slots must be int64");
  const int64_t T = qkv.size(0), heads = qkv.size(1), d = qkv.size(2), n_kv = (heads - n_q) / 2, pool = cache.size(1);
  TORCH_CHECK(cache.size(0) == 2 * n_kv && cache.size(2) == d && rope.size(0) == T && rope.numel() == T * d, "rope_store: shapes disagree");
  float* x = qkv.data_ptr<float>();
  const float* cs = rope.data_ptr<float>();
  const bool half = cache.scalar_type() == torch::kHalf;
  float* cf = half ? nullptr : cache.data_ptr<float>();
  at::Half* ch = half ? cache.data_ptr<at::Half>() : nullptr;
  auto slot_t = slots.contiguous();
  const int64_t* slot = slot_t.data_ptr<int64_t>();
  parallel_chunks(T, 64, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      TORCH_CHECK(slot[t] >= 0 && slot[t] < pool, "rope_store: slot out of range");
      const float* c = cs + t * d;
      for (int64_t h = 0; h < n_q + n_kv; ++h) {
        float* p = x + (t * heads + h) * d;
        for (int64_t i = 0; i < d / 2; ++i) {
          const float a = p[2 * i], b = p[2 * i + 1], co = c[2 * i], si = c[2 * i + 1];
          p[2 * i] = a * co - b * si;
          p[2 * i + 1] = a * si + b * co;
        }
      }
      for (int64_t h = 0; h < 2 * n_kv; ++h) {
        const float* src = x + (t * heads + n_q + h) * d;
        const int64_t at = (h * pool + slot[t]) * d;
        if (half) std::transform(src, src + d, ch + at, [](float v) { return at::Half(v); });
        else std::copy_n(src, d, cf + at);
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

// RMSNorm over the last dimension of x (any leading shape); out may be x.
void rms_norm_out(const torch::Tensor& x, const torch::Tensor& w, double eps, const torch::Tensor& out) {
  check_f32(x, "x");
  check_f32(w, "weight");
  check_f32(out, "out");
  const int64_t n = w.numel(), rows = x.numel() / n;
  TORCH_CHECK(x.size(-1) == n && out.numel() == x.numel(), "rms_norm: shapes disagree");
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  parallel_chunks(rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) rms_row(xp + r * n, wp, op + r * n, n, static_cast<float>(eps));
  });
}

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  auto out = torch::empty_like(x);
  rms_norm_out(x, w, eps, out);
  return out;
}

// h += delta (the residual add), then returns RMSNorm(h).
torch::Tensor add_rms_norm(const torch::Tensor& h, const torch::Tensor& delta, const torch::Tensor& w, double eps) {
  check_f32(h, "h");
  check_f32(delta, "delta");
  TORCH_CHECK(h.sizes() == delta.sizes(), "add_rms_norm: shapes disagree");
  const int64_t n = w.numel(), rows = h.numel() / n;
  auto out = torch::empty_like(h);
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
torch::Tensor silu_mul(const torch::Tensor& gate_up) {
  check_f32(gate_up, "gate_up");
  const int64_t T = gate_up.size(0), F = gate_up.size(1) / 2;
  auto out = torch::empty({T, F}, gate_up.options());
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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_linear", &int8_linear, "y = (x @ w.T) * scale + bias; int8 w [N, K], float32 x [1-4, K]");
  m.def("decode_attention", &decode_attention, "one query per request over its cached keys and values");
  m.def("rope_store", &rope_store, "RoPE on q and k in place, k and v written to the cache");
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dimension");
  m.def("rms_norm_out", &rms_norm_out, "RMSNorm over the last dimension into out (may be x)");
  m.def("add_rms_norm", &add_rms_norm, "h += delta, then RMSNorm(h)");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of a fused [T, 2F] projection");
}
