// Greedy sampling's argmax over each row of the logits: torch's CPU argmax is a scalar loop (1.1 ms for
// 32 rows of SmolLM2's 49,152 logits here, a tenth of a decode step); this is 8 lanes wide.

#include "common.h"

namespace serve_native {

// The first index of each row's largest value, as torch.argmax gives it (logits are finite).
at::Tensor argmax_rows(const at::Tensor& x) {
  check_f32(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.size(1) > 0, "argmax_rows: x must be [B, V]");
  const int64_t B = x.size(0), V = x.size(1);
  auto out = at::empty({B}, at::TensorOptions().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  parallel_chunks(B, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* v = xp + r * V;
      // Per lane: its largest value and the first index where it occurs (a strict > keeps the first).
      __m256 best = _mm256_set1_ps(-INFINITY);
      __m256i where = _mm256_setzero_si256(), at = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      const __m256i step = _mm256_set1_epi32(8);
      int64_t i = 0;
      for (; i + 8 <= V; i += 8) {
        const __m256 x8 = _mm256_loadu_ps(v + i);
        const __m256 greater = _mm256_cmp_ps(x8, best, _CMP_GT_OQ);
        best = _mm256_blendv_ps(best, x8, greater);
        where = _mm256_blendv_epi8(where, at, _mm256_castps_si256(greater));
        at = _mm256_add_epi32(at, step);
      }
      alignas(32) float bv[8];
      alignas(32) int32_t bi[8];
      _mm256_store_ps(bv, best);
      _mm256_store_si256(reinterpret_cast<__m256i*>(bi), where);
      float top = -INFINITY;
      int64_t index = 0;
      for (int lane = 0; lane < 8 && lane < V; ++lane)
        if (bv[lane] > top || (bv[lane] == top && bi[lane] < index)) top = bv[lane], index = bi[lane];
      for (; i < V; ++i)
        if (v[i] > top) top = v[i], index = i;
      op[r] = index;
    }
  });
  return out;
}

}  // namespace serve_native
