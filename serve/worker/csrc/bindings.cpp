// The Python module of our CPU kernels (serve/worker/native.py builds and loads it).

#include <torch/csrc/utils/pybind.h>  // pybind11 with torch.Tensor conversions
#include "common.h"

#include <string>

namespace serve_native {
// layer_ops.cpp
torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& cache, const torch::Tensor& req_to_token,
                               const torch::Tensor& rows, const torch::Tensor& lens);
void rope_store(const torch::Tensor& qkv, const torch::Tensor& rope, const torch::Tensor& cache, const torch::Tensor& slots, int64_t n_q,
                double q_scale);
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps);
torch::Tensor add_rms_norm(const torch::Tensor& h, const torch::Tensor& delta, const torch::Tensor& w, double eps);
torch::Tensor silu_mul(const torch::Tensor& gate_up);
// qlinear.cpp
std::vector<std::string> qgemm_levels();
bool qgemm_runs(int64_t level);
std::tuple<torch::Tensor, std::vector<int64_t>> repack(const torch::Tensor& raw, int64_t type, int64_t K);
torch::Tensor qlinear(const torch::Tensor& x, const torch::Tensor& w, const std::vector<int64_t>& fmt, const std::optional<torch::Tensor>& bias,
                      int64_t level);
torch::Tensor dequant_rows(const torch::Tensor& w, const std::vector<int64_t>& fmt, const torch::Tensor& ids);
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> quantize_acts(const torch::Tensor& x, int64_t level);
// argmax.cpp
torch::Tensor argmax_rows(const torch::Tensor& x);
// sample.cpp
torch::Tensor sample_rows(const torch::Tensor& x, const torch::Tensor& temperature, const torch::Tensor& top_k, const torch::Tensor& top_p,
                          const torch::Tensor& min_p, const torch::Tensor& u);
void apply_bitmask(const torch::Tensor& x, const torch::Tensor& rows, const torch::Tensor& masks);
// decode_layers.cpp
void bind_decode_layers(py::module_& m);
}  // namespace serve_native

using namespace serve_native;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "one query per request over its cached keys and values");
  m.def("rope_store", &rope_store, "RoPE on q and k in place (q times q_scale), k and v written to the cache",
        py::arg("qkv"), py::arg("rope"), py::arg("cache"), py::arg("slots"), py::arg("n_q"), py::arg("q_scale") = 1.0);
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dimension");
  m.def("add_rms_norm", &add_rms_norm, "h += delta, then RMSNorm(h)");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of a fused [T, 2F] projection");
  m.def("qgemm_levels", &qgemm_levels, "the instruction-set levels the quantized matmul is compiled for, by number");
  m.def("qgemm_runs", &qgemm_runs, "whether this CPU (and OS) can run a level of the quantized matmul");
  m.def("repack", &repack, "GGUF blocks [N, bytes] of one type -> (tiles, format)");
  m.def("qlinear", &qlinear, "y = x @ W.T + bias over repacked GGUF tiles, activations quantized per block of 32");
  m.def("dequant_rows", &dequant_rows, "rows of a repacked weight as float32");
  m.def("quantize_acts", &quantize_acts, "the activation quantization of qlinear: (q, d, s)");
  m.def("argmax_rows", &argmax_rows, "the first index of each row's largest value");
  m.def("sample_rows", &sample_rows, "a token per row at a temperature after top-k, top-p and min-p, drawn with one uniform number");
  m.def("apply_bitmask", &apply_bitmask, "-inf where a row's token bitmask (structured outputs) has a 0");
  bind_decode_layers(m);
}
