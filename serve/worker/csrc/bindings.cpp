// The Python module of our CPU kernels (serve/worker/native.py builds and loads it).

#include <torch/csrc/utils/pybind.h>  // pybind11 with torch.Tensor conversions
#include "common.h"

#include <string>

namespace serve_native {
// layer_ops.cpp
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& req_to_token,
                            const at::Tensor& rows, const at::Tensor& lens, int64_t level);
void rope_store(const at::Tensor& qkv, const at::Tensor& rope, const at::Tensor& cache, const at::Tensor& slots, int64_t n_q,
                double q_scale);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps);
at::Tensor add_rms_norm(const at::Tensor& h, const at::Tensor& delta, const at::Tensor& w, double eps);
at::Tensor silu_mul(const at::Tensor& gate_up);
// qlinear.cpp
std::vector<std::string> qgemm_levels();
bool qgemm_runs(int64_t level);
std::tuple<at::Tensor, std::vector<int64_t>> repack(const at::Tensor& raw, int64_t type, int64_t K);
at::Tensor qlinear(const at::Tensor& x, const at::Tensor& w, const std::vector<int64_t>& fmt, const std::optional<at::Tensor>& bias,
                   int64_t level);
at::Tensor dequant_rows(const at::Tensor& w, const std::vector<int64_t>& fmt, const at::Tensor& ids);
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_acts(const at::Tensor& x, int64_t level);
// argmax.cpp
at::Tensor argmax_rows(const at::Tensor& x);
// sample.cpp
at::Tensor sample_rows(const at::Tensor& x, const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p,
                       const at::Tensor& min_p, const at::Tensor& u);
void apply_bitmask(const at::Tensor& x, const at::Tensor& rows, const at::Tensor& masks);
// decode_layers.cpp
void bind_decode_layers(py::module_& m);
}  // namespace serve_native

using namespace serve_native;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "one query per request over its cached keys and values (AVX-512 from level 2 on)",
        py::arg("q"), py::arg("cache"), py::arg("req_to_token"), py::arg("rows"), py::arg("lens"), py::arg("level") = 0);
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
