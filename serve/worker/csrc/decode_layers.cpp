// All layers of a step in one call, for a model whose matmuls are quantized blocks (a GGUF, or int8), on
// one rank, when every new token is one query of our attention kernel (serve/worker/model.py).
//
// Why: at batch 1 a SmolLM2 layer is ~10 kernel calls, and from Python each costs ~3-5 us of argument
// parsing, tensor allocation and dispatch on top of its work: ~1.2 ms a step, as much as a third of the
// weights' streaming time. Here the same kernels run in the same order on the same data, so the
// results are the per-call path's bit for bit; only the Python between them is gone.

#include <torch/csrc/utils/pybind.h>  // pybind11 with torch.Tensor conversions
#include "common.h"

namespace serve_native {

torch::Tensor qlinear(const torch::Tensor& x, const torch::Tensor& w, const std::vector<int64_t>& fmt, const std::optional<torch::Tensor>& bias,
                      int64_t level);
torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& cache, const torch::Tensor& req_to_token,
                               const torch::Tensor& rows, const torch::Tensor& lens);
void rope_store(const torch::Tensor& qkv, const torch::Tensor& rope, const torch::Tensor& cache, const torch::Tensor& slots, int64_t n_q,
                double q_scale);
torch::Tensor add_rms_norm(const torch::Tensor& h, const torch::Tensor& delta, const torch::Tensor& w, double eps);
torch::Tensor silu_mul(const torch::Tensor& gate_up);

struct QuantMatrix {
  torch::Tensor packed;
  std::vector<int64_t> format;
  std::optional<torch::Tensor> bias;

  torch::Tensor operator()(const torch::Tensor& x, int64_t level) const { return qlinear(x, packed, format, bias, level); }
};

struct DecodeLayer {
  QuantMatrix qkv, o, gate_up, down;
  torch::Tensor post_norm, next_norm;  // next_norm: the next layer's input norm, or the final norm
  double q_scale;
};

class DecodeLayers {
 public:
  DecodeLayers(int64_t n_q, int64_t n_kv, int64_t head_dim, double eps, int64_t level)
      : n_q_(n_q), n_kv_(n_kv), d_(head_dim), eps_(eps), level_(level) {}

  void add(const torch::Tensor& qkv, const std::vector<int64_t>& qkv_f, const std::optional<torch::Tensor>& qkv_b,
           const torch::Tensor& o, const std::vector<int64_t>& o_f, const std::optional<torch::Tensor>& o_b,
           const torch::Tensor& gu, const std::vector<int64_t>& gu_f, const std::optional<torch::Tensor>& gu_b,
           const torch::Tensor& down, const std::vector<int64_t>& down_f, const std::optional<torch::Tensor>& down_b,
           const torch::Tensor& post_norm, const torch::Tensor& next_norm, double q_scale) {
    layers_.push_back({{qkv, qkv_f, qkv_b}, {o, o_f, o_b}, {gu, gu_f, gu_b}, {down, down_f, down_b}, post_norm, next_norm, q_scale});
  }

  // h [T, hidden] the residual stream (updated in place), x = the first layer's input norm of it;
  // returns the final norm of the last layer's output. rope, slots: the new tokens'; table, rows, lens:
  // each token's query over its sequence, as decode_attention takes them.
  torch::Tensor run(const torch::Tensor& h, torch::Tensor x, const std::vector<torch::Tensor>& caches, const torch::Tensor& rope,
                    const torch::Tensor& slots, const torch::Tensor& table, const torch::Tensor& rows, const torch::Tensor& lens) const {
    TORCH_CHECK(caches.size() == layers_.size(), "run: one cache per layer");
    const int64_t T = h.size(0);
    for (size_t i = 0; i < layers_.size(); ++i) {
      const DecodeLayer& L = layers_[i];
      torch::Tensor qkv = L.qkv(x, level_).view({T, n_q_ + 2 * n_kv_, d_});
      rope_store(qkv, rope, caches[i], slots, n_q_, L.q_scale);
      torch::Tensor attn = decode_attention(qkv.narrow(1, 0, n_q_), caches[i], table, rows, lens).view({T, n_q_ * d_});
      x = add_rms_norm(h, L.o(attn, level_), L.post_norm, eps_);
      x = add_rms_norm(h, L.down(silu_mul(L.gate_up(x, level_)), level_), L.next_norm, eps_);
    }
    return x;
  }

 private:
  int64_t n_q_, n_kv_, d_;
  double eps_;
  int64_t level_;
  std::vector<DecodeLayer> layers_;
};

void bind_decode_layers(py::module_& m) {
  py::class_<DecodeLayers>(m, "DecodeLayers", "every layer of a step in one call, over quantized matmuls")
      .def(py::init<int64_t, int64_t, int64_t, double, int64_t>())
      .def("add", &DecodeLayers::add)
      .def("run", &DecodeLayers::run, py::call_guard<py::gil_scoped_release>());
}

}  // namespace serve_native
