// Sampling a token per row at a temperature, after top-k, top-p and min-p (serve/worker/sampler.py's
// steps 6-8), with one uniform number per row.
//
// Why: through torch, 32 rows of SmolLM2's 49,152 logits took 35 ms a step at temperature 1 (a noise
// vector per row from a reseeded generator) and 107 ms with top-p (a full sort per row): more than the
// whole forward. Here a row is one pass of exp, a partial selection of the few tokens top-k/top-p can
// keep, and one pass of a running sum.
//
// A token survives when its rank (by probability) is below top_k and the probability mass of the tokens
// ranked before it is at most top_p (so the most likely one always survives), and its probability is at
// least min_p times the most likely one's. The draw: the first token, in vocabulary order, at which the
// running sum of the survivors' weights passes u times their total. Everything is per row, in a fixed
// order, so a row's token depends only on its logits and u: the same alone or in any batch.

#include "common.h"

namespace serve_native {

namespace {

// Sum of e[0..V) in a fixed order: 8 lanes, then across them (the same for a row whatever the batch).
double sum_row(const float* e, int64_t V) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= V; i += 8) acc = _mm256_add_ps(acc, _mm256_loadu_ps(e + i));
  double total = hsum(acc);
  for (; i < V; ++i) total += e[i];
  return total;
}

// e[i] = exp((x[i] - max) / t) for one row (the most likely token's weight is exactly 1); returns the sum.
double exp_row(const float* x, int64_t V, float t, float* e) {
  __m256 m8 = _mm256_set1_ps(x[0]);
  int64_t i = 0;
  for (; i + 8 <= V; i += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(x + i));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m8);
  float mx = lanes[0];
  for (int l = 1; l < 8; ++l) mx = std::max(mx, lanes[l]);
  for (; i < V; ++i) mx = std::max(mx, x[i]);
  const __m256 mv = _mm256_set1_ps(mx), inv = _mm256_set1_ps(1.f / t);
  for (i = 0; i + 8 <= V; i += 8) _mm256_storeu_ps(e + i, exp8(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), mv), inv)));
  for (; i < V; ++i) e[i] = std::exp((x[i] - mx) / t);
  return sum_row(e, V);
}

// The first index at which the running sum of e passes `target` (blocks of 8 summed first, then the
// block that passes it scanned); the last nonzero one if rounding keeps the sum short of it.
int64_t draw_row(const float* e, int64_t V, double target) {
  double run = 0;
  int64_t i = 0;
  for (; i + 8 <= V; i += 8) {
    const double block = hsum(_mm256_loadu_ps(e + i));
    if (run + block > target) break;
    run += block;
  }
  int64_t last = -1;
  for (; i < V; ++i) {
    if (e[i] <= 0.f) continue;
    last = i;
    run += e[i];
    if (run > target) return i;
  }
  for (i = V - 1; last < 0 && i >= 0; --i)
    if (e[i] > 0.f) last = i;
  return last < 0 ? 0 : last;
}

// Zeroes the weights of the tokens top-k and top-p drop. Only tokens among the most likely can survive,
// so they are found by a threshold that is lowered until the candidates hold the mass top-p needs (and
// number top-k), and only those are sorted.
void truncate_row(float* e, int64_t V, double total, int64_t top_k, double top_p, std::vector<int32_t>& cand) {
  const bool by_k = top_k > 0 && top_k < V, by_p = top_p < 1.0;
  if (!by_k && !by_p) return;
  float threshold = 1e-3f;  // the most likely token has weight 1 (its exponent is 0)
  for (;;) {
    cand.clear();
    double mass = 0;
    for (int64_t i = 0; i < V; ++i)
      if (e[i] >= threshold) cand.push_back(static_cast<int32_t>(i)), mass += e[i];
    // Enough when the cut falls among them: the mass top-p stops at (strictly passed), or top-k tokens.
    if ((by_p && mass > top_p * total) || (by_k && static_cast<int64_t>(cand.size()) >= top_k) || threshold == 0.f) break;
    threshold = threshold > 1e-30f ? threshold * 1e-4f : 0.f;
  }
  // By weight, then by index: a fixed order for ties.
  std::sort(cand.begin(), cand.end(), [&](int32_t a, int32_t b) { return e[a] > e[b] || (e[a] == e[b] && a < b); });
  int64_t keep = static_cast<int64_t>(cand.size());
  if (by_k) keep = std::min(keep, top_k);
  if (by_p) {
    double before = 0;
    for (int64_t r = 0; r < keep; ++r) {
      if (before > top_p * total) {
        keep = r;
        break;
      }
      before += e[cand[r]];
    }
  }
  // Everything not kept goes to zero: the kept ones are a prefix of cand (sorted by weight).
  std::vector<float> kept(keep);
  for (int64_t r = 0; r < keep; ++r) kept[r] = e[cand[r]];
  std::fill(e, e + V, 0.f);
  for (int64_t r = 0; r < keep; ++r) e[cand[r]] = kept[r];
}

}  // namespace

// x [B, V] float32 logits (penalties and biases applied); per row its temperature (> 0), top_k (0: off),
// top_p, min_p and a uniform number u in [0, 1). Returns the sampled token of each row.
at::Tensor sample_rows(const at::Tensor& x, const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p,
                       const at::Tensor& min_p, const at::Tensor& u) {
  check_f32(x, "x");
  TORCH_CHECK(x.dim() == 2, "sample_rows: x must be [B, V]");
  const int64_t B = x.size(0), V = x.size(1);
  for (const auto* t : {&temperature, &top_p, &min_p})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->numel() == B && t->is_contiguous(), "sample_rows: one float32 per row");
  TORCH_CHECK(top_k.scalar_type() == at::kLong && top_k.numel() == B, "sample_rows: top_k, one int64 per row");
  TORCH_CHECK(u.scalar_type() == at::kDouble && u.numel() == B, "sample_rows: u, one float64 per row");
  auto out = at::empty({B}, at::TensorOptions().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  const float *tp = temperature.data_ptr<float>(), *pp = top_p.data_ptr<float>(), *mp = min_p.data_ptr<float>();
  const auto kc = top_k.contiguous(), uc = u.contiguous();
  const int64_t* kp = kc.data_ptr<int64_t>();
  const double* up = uc.data_ptr<double>();
  int64_t* op = out.data_ptr<int64_t>();
  parallel_chunks(B, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> e(V);
    std::vector<int32_t> cand;
    for (int64_t r = r0; r < r1; ++r) {
      const double total = exp_row(xp + r * V, V, std::max(tp[r], 1e-5f), e.data());
      truncate_row(e.data(), V, total, kp[r], pp[r], cand);
      if (mp[r] > 0) {  // the most likely token's weight is 1, so min_p * 1 is the cut
        const __m256 cut = _mm256_set1_ps(mp[r]);
        int64_t i = 0;
        for (; i + 8 <= V; i += 8) {
          const __m256 v = _mm256_loadu_ps(e.data() + i);
          _mm256_storeu_ps(e.data() + i, _mm256_and_ps(v, _mm256_cmp_ps(v, cut, _CMP_GE_OQ)));
        }
        for (; i < V; ++i)
          if (e[i] < mp[r]) e[i] = 0.f;
      }
      op[r] = draw_row(e.data(), V, up[r] * sum_row(e.data(), V));
    }
  });
  return out;
}

// Structured outputs: x[rows[r], j] = -inf wherever bit j of masks[r] is 0 (llguidance's bitmask: one
// bit per token, little-endian). Eight tokens per mask byte, eight lanes per vector.
void apply_bitmask(const at::Tensor& x, const at::Tensor& rows, const at::Tensor& masks) {
  check_f32(x, "x");
  TORCH_CHECK(x.dim() == 2 && rows.scalar_type() == at::kLong && rows.dim() == 1, "apply_bitmask: x [B, V], rows int64 [R]");
  TORCH_CHECK(masks.scalar_type() == at::kByte && masks.dim() == 2 && masks.size(0) == rows.size(0) && masks.is_contiguous(),
              "apply_bitmask: masks uint8 [R, bytes]");
  const int64_t B = x.size(0), V = x.size(1), R = rows.size(0), W = masks.size(1);
  TORCH_CHECK(W * 8 >= V, "apply_bitmask: a mask has fewer bits than the vocabulary");
  const auto rc = rows.contiguous();
  const int64_t* rp = rc.data_ptr<int64_t>();
  const uint8_t* mp = masks.data_ptr<uint8_t>();
  float* xp = x.data_ptr<float>();
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256 ninf = _mm256_set1_ps(-INFINITY);
  for (int64_t r = 0; r < R; ++r) {
    TORCH_CHECK(rp[r] >= 0 && rp[r] < B, "apply_bitmask: row out of range");
    float* row = xp + rp[r] * V;
    const uint8_t* m = mp + r * W;
    int64_t j = 0;
    for (; j + 8 <= V; j += 8) {
      const __m256i allowed = _mm256_and_si256(_mm256_set1_epi32(m[j >> 3]), bit);
      const __m256 off = _mm256_castsi256_ps(_mm256_cmpeq_epi32(allowed, _mm256_setzero_si256()));
      _mm256_storeu_ps(row + j, _mm256_blendv_ps(_mm256_loadu_ps(row + j), ninf, off));
    }
    for (; j < V; ++j)
      if (!((m[j >> 3] >> (j & 7)) & 1)) row[j] = -INFINITY;
  }
}

}  // namespace serve_native
