// int8 weight matmuls for 1-4 rows: a decode step of a few streams (serve/worker/linear.py Int8Linear).

#include "common.h"

namespace serve_native {

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
  TORCH_CHECK(M <= 4, "int8_linear takes 1 to 4 rows (more go to fbgemm)");
  const float* b = nullptr;
  if (bias) {
    check_f32(*bias, "bias");
    b = bias->data_ptr<float>();
  }
  auto y = torch::empty({M, N}, x.options());
  if (M == 0) return y;
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

}  // namespace serve_native
