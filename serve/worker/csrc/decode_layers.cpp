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

at::Tensor qlinear(const at::Tensor& x, const at::Tensor& w, const std::vector<int64_t>& fmt, const std::optional<at::Tensor>& bias,
                   int64_t level);
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& req_to_token,
                            const at::Tensor& rows, const at::Tensor& lens, int64_t level);
void rope_store(const at::Tensor& qkv, const at::Tensor& rope, const at::Tensor& cache, const at::Tensor& slots, int64_t n_q,
                double q_scale);
at::Tensor add_rms_norm(const at::Tensor& h, const at::Tensor& delta, const at::Tensor& w, double eps);
at::Tensor silu_mul(const at::Tensor& gate_up);

struct QuantMatrix {
  at::Tensor packed;
  std::vector<int64_t> format;
  std::optional<at::Tensor> bias;

  at::Tensor operator()(const at::Tensor& x, int64_t level) const { return qlinear(x, packed, format, bias, level); }
};

struct DecodeLayer {
  QuantMatrix qkv, o, gate_up, down;
  at::Tensor post_norm, next_norm;  // next_norm: the next layer's input norm, or the final norm
  double q_scale;
};

class DecodeLayers {
 public:
  DecodeLayers(int64_t n_q, int64_t n_kv, int64_t head_dim, double eps, int64_t level)
      : n_q_(n_q), n_kv_(n_kv), d_(head_dim), eps_(eps), level_(level) {}

  void add(const at::Tensor& qkv, const std::vector<int64_t>& qkv_f, const std::optional<at::Tensor>& qkv_b,
           const at::Tensor& o, const std::vector<int64_t>& o_f, const std::optional<at::Tensor>& o_b,
           const at::Tensor& gu, const std::vector<int64_t>& gu_f, const std::optional<at::Tensor>& gu_b,
           const at::Tensor& down, const std::vector<int64_t>& down_f, const std::optional<at::Tensor>& down_b,
           const at::Tensor& post_norm, const at::Tensor& next_norm, double q_scale) {
    layers_.push_back({{qkv, qkv_f, qkv_b}, {o, o_f, o_b}, {gu, gu_f, gu_b}, {down, down_f, down_b}, post_norm, next_norm, q_scale});
  }

  // h [T, hidden] the residual stream (updated in place), x = the first layer's input norm of it;
  // returns the final norm of the last layer's output. rope, slots: the new tokens'; table, rows, lens:
  // each token's query over its sequence, as decode_attention takes them.
  at::Tensor run(const at::Tensor& h, at::Tensor x, const std::vector<at::Tensor>& caches, const at::Tensor& rope,
                 const at::Tensor& slots, const at::Tensor& table, const at::Tensor& rows, const at::Tensor& lens) const {
    TORCH_CHECK(caches.size() == layers_.size(), "run: one cache per layer");
    const int64_t T = h.size(0);
    for (size_t i = 0; i < layers_.size(); ++i) {
      const DecodeLayer& L = layers_[i];
      at::Tensor qkv = L.qkv(x, level_).view({T, n_q_ + 2 * n_kv_, d_});
      rope_store(qkv, rope, caches[i], slots, n_q_, L.q_scale);
      at::Tensor attn = decode_attention(qkv.narrow(1, 0, n_q_), caches[i], table, rows, lens, level_).view({T, n_q_ * d_});
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
