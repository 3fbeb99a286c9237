// GGUF weights as they ship, regrouped into tiles (qgemm.h), and the matmul over them: the torch side
// of the quantized kernels. The dispatch table below says which instruction set runs which kernel.

#include "common.h"
#include "qgemm.h"

#include <string>

namespace serve_native {

// ---- dispatch ------------------------------------------------------------------------------------
// Levels as serve/worker/native.py numbers them; each entry is a copy of qgemm_kernels.inc compiled
// for that instruction set. The Python side picks the level from the CPU (serve/isa.py), capped by
// engine.cpu_isa, so a test can run every entry this CPU can execute.
constexpr int64_t LEVELS = 4;

bool qgemm_runs(int64_t level) {
  static const bool avx512 = __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  // AMX also needs the kernel to hand this process the tile registers' state (amx_permitted).
  static const bool runs[LEVELS] = {true, __builtin_cpu_supports("avxvnni") != 0, avx512,
                                    avx512 && __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-int8") && amx_permitted()};
  return level >= 0 && level < LEVELS && runs[level];
}

const QgemmKernels& kernels(int64_t level) {
  static const QgemmKernels table[LEVELS] = {qgemm_avx2(), qgemm_avx_vnni(), qgemm_avx512(), qgemm_amx()};
  TORCH_CHECK(level >= 0 && level < LEVELS, "qlinear: unknown kernel level ", level);
  // A level this CPU lacks would die of an illegal instruction: refuse it with a message instead.
  TORCH_CHECK(qgemm_runs(level), "qlinear: this CPU cannot run the ", table[level].name, " kernels");
  return table[level];
}

std::vector<std::string> qgemm_levels() { return {"avx2", "avx_vnni", "avx512", "amx"}; }

// ---- GGUF blocks -> tiles ------------------------------------------------------------------------
// ggml_type numbers, as in GGUF files.
enum GgmlType : int64_t { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14 };

struct Source {
  int64_t elems, bytes;  // per GGUF block
  WeightFormat format;   // what it becomes (K and N filled in later)
};

Source source_of(int64_t type) {
  switch (type) {
    case Q4_0: return {32, 18, {W4, 32, 1, 0, 0, 0}};  // m = -8d
    case Q4_1: return {32, 20, {W4, 32, 1, 0, 0, 0}};
    case Q5_0: return {32, 22, {W8, 32, 0, 0, 0, 0}};  // 5-bit quants widened to int8, exact
    case Q5_1: return {32, 24, {W8, 32, 1, 0, 0, 0}};
    case Q8_0: return {32, 34, {W8, 32, 0, 0, 0, 0}};
    case Q4_K: return {256, 144, {W4, 32, 1, 1, 0, 0}};  // d * scale and dmin * min: exact in float32
    case Q5_K: return {256, 176, {W8, 32, 1, 1, 0, 0}};
    case Q6_K: return {256, 210, {W8, 16, 0, 1, 0, 0}};  // 16-value blocks, d * scale
    default: TORCH_CHECK(false, "no kernel for GGUF type ", type);
  }
}

inline float half_at(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

// llama.cpp's get_scale_min_k4: the 6-bit scale and min of sub-block j of a Q4_K/Q5_K super-block.
inline void scale_min_k4(int j, const uint8_t* q, int* sc, int* mn) {
  if (j < 4) {
    *sc = q[j] & 63;
    *mn = q[j + 4] & 63;
  } else {
    *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *mn = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// One of our blocks (format.block values) from a GGUF row: integer quants and the d, m that give
// d * q + m. `j` counts our blocks along the row.
void decode_block(int64_t type, const uint8_t* row, int64_t j, int32_t* q, float* d, float* m) {
  switch (type) {
    case Q4_0:
    case Q4_1: {
      const uint8_t* b = row + j * (type == Q4_0 ? 18 : 20);
      *d = half_at(b);
      *m = type == Q4_0 ? -8.f * *d : half_at(b + 2);
      const uint8_t* qs = b + (type == Q4_0 ? 2 : 4);
      for (int i = 0; i < 16; ++i) q[i] = qs[i] & 0xF, q[i + 16] = qs[i] >> 4;
      return;
    }
    case Q5_0:
    case Q5_1: {
      const uint8_t* b = row + j * (type == Q5_0 ? 22 : 24);
      *d = half_at(b);
      const uint8_t* hb = b + (type == Q5_0 ? 2 : 4);
      uint32_t qh;
      std::memcpy(&qh, hb, 4);
      const uint8_t* qs = hb + 4;
      const int offset = type == Q5_0 ? 16 : 0;  // Q5_0 is d * (q - 16); Q5_1 is d * q + m
      *m = type == Q5_0 ? 0.f : half_at(b + 2);
      for (int i = 0; i < 16; ++i) {
        q[i] = ((qs[i] & 0xF) | (((qh >> i) & 1) << 4)) - offset;
        q[i + 16] = ((qs[i] >> 4) | (((qh >> (i + 16)) & 1) << 4)) - offset;
      }
      return;
    }
    case Q8_0: {
      const uint8_t* b = row + j * 34;
      *d = half_at(b);
      *m = 0.f;
      for (int i = 0; i < 32; ++i) q[i] = static_cast<int8_t>(b[2 + i]);
      return;
    }
    case Q4_K:
    case Q5_K: {  // 8 sub-blocks of 32 per super-block
      const bool five = type == Q5_K;
      const uint8_t* b = row + (j / 8) * (five ? 176 : 144);
      const int s = j % 8;
      int sc, mn;
      scale_min_k4(s, b + 4, &sc, &mn);
      *d = half_at(b) * sc;
      *m = -half_at(b + 2) * mn;
      const uint8_t* qs = b + (five ? 48 : 16) + 32 * (s / 2);
      for (int i = 0; i < 32; ++i) {
        q[i] = s % 2 ? qs[i] >> 4 : qs[i] & 0xF;
        if (five) q[i] |= ((b[16 + i] >> s) & 1) << 4;  // qh: bit s of byte i is sub-block s's fifth bit
      }
      return;
    }
    case Q6_K: {  // 16 sub-blocks of 16 per super-block: ql[128], qh[64], scales[16], d
      const uint8_t* b = row + (j / 16) * 210;
      const int s = j % 16, half = s / 8, within = s % 8;  // which 128-value half, and which 16 of it
      const uint8_t* ql = b + 64 * half;
      const uint8_t* qh = b + 128 + 32 * half;
      *d = half_at(b + 208) * static_cast<int8_t>(b[192 + s]);
      *m = 0.f;
      // Within a half, value v = 32 * group + l (l < 32): group 0 and 2 use ql[l] and ql[l] >> 4,
      // groups 1 and 3 ql[l + 32]; qh[l] holds 2 bits of each group.
      const int group = within / 2, l0 = 16 * (within % 2);
      for (int i = 0; i < 16; ++i) {
        const int l = l0 + i;
        const int lo = group % 2 ? ql[l + 32] : ql[l];
        const int nib = group < 2 ? lo & 0xF : lo >> 4;
        q[i] = (nib | (((qh[l] >> (2 * group)) & 3) << 4)) - 32;
      }
      return;
    }
  }
}

inline void put_scale(uint8_t* at, int64_t lane, float v, bool f32) {
  if (f32) {
    std::memcpy(at + 4 * lane, &v, 4);
  } else {
    const uint16_t bits = c10::Half(v).x;
    std::memcpy(at + 2 * lane, &bits, 2);
  }
}

// raw [N, row bytes] of one GGUF tensor with K values per row -> (tiles, format as 6 integers).
std::tuple<at::Tensor, std::vector<int64_t>> repack(const at::Tensor& raw, int64_t type, int64_t K) {
  TORCH_CHECK(raw.scalar_type() == at::kByte && raw.dim() == 2 && raw.is_contiguous(), "repack: raw must be contiguous uint8 [N, bytes]");
  Source src = source_of(type);
  TORCH_CHECK(K % src.elems == 0 && K % QK == 0 && raw.size(1) == K / src.elems * src.bytes, "repack: row length does not match the type");
  WeightFormat f = src.format;
  f.K = K;
  f.N = raw.size(0);
  auto out = at::zeros({f.tiles() * f.tile_bytes()}, raw.options());
  uint8_t* dst = out.data_ptr<uint8_t>();
  const uint8_t* base = raw.data_ptr<uint8_t>();
  const int64_t row_bytes = raw.size(1), ssz = f.f32_scales ? 4 : 2;
  parallel_chunks(f.N, 16, [&](int64_t r0, int64_t r1) {
    int32_t q[32];
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t lane = r % TILE;
      uint8_t* tile = dst + (r / TILE) * f.tile_bytes();
      for (int64_t j = 0; j < f.blocks(); ++j) {
        float d, m;
        decode_block(type, base + r * row_bytes, j, q, &d, &m);
        uint8_t* blk = tile + j * f.block_bytes();
        if (f.kind == W4) {
          for (int i = 0; i < 16; ++i) blk[(i / 4) * 64 + lane * 4 + i % 4] = static_cast<uint8_t>(q[i] | (q[i + 16] << 4));
        } else {
          for (int i = 0; i < f.block; ++i) blk[(i / 4) * 64 + lane * 4 + i % 4] = static_cast<uint8_t>(static_cast<int8_t>(q[i]));
        }
        uint8_t* sc = blk + f.quant_bytes();
        put_scale(sc, lane, d, f.f32_scales);
        if (f.has_min) put_scale(sc + TILE * ssz, lane, m, f.f32_scales);
      }
    }
  });
  return {out, {f.kind, f.block, f.has_min, f.f32_scales, f.K, f.N}};
}

WeightFormat format_of(const std::vector<int64_t>& v, const at::Tensor& w) {
  TORCH_CHECK(v.size() == 6, "format: 6 integers");
  WeightFormat f{static_cast<int32_t>(v[0]), static_cast<int32_t>(v[1]), static_cast<int32_t>(v[2]), static_cast<int32_t>(v[3]), v[4], v[5]};
  TORCH_CHECK((f.kind == W4 && f.block == 32) || (f.kind == W8 && (f.block == 32 || f.block == 16)), "format: unknown kind or block");
  TORCH_CHECK(f.K > 0 && f.K % QK == 0 && f.N > 0, "format: K must be a positive multiple of 32");
  TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous() && w.numel() == f.tiles() * f.tile_bytes(), "weights do not match their format");
  return f;
}

// Rows `ids` of the weight, as float32 (the embedding lookup of a tied GGUF embedding).
at::Tensor dequant_rows(const at::Tensor& w, const std::vector<int64_t>& fmt, const at::Tensor& ids) {
  const WeightFormat f = format_of(fmt, w);
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.dim() == 1, "ids must be int64 [T]");
  const auto idc = ids.contiguous();
  const int64_t T = idc.size(0);
  const int64_t* id = idc.data_ptr<int64_t>();
  auto out = at::empty({T, f.K}, at::TensorOptions().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  const uint8_t* base = w.data_ptr<uint8_t>();
  parallel_chunks(T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      TORCH_CHECK(id[t] >= 0 && id[t] < f.N, "dequant_rows: id out of range");
      const int64_t lane = id[t] % TILE;
      const uint8_t* tile = base + (id[t] / TILE) * f.tile_bytes();
      for (int64_t j = 0; j < f.blocks(); ++j) {
        const uint8_t* blk = tile + j * f.block_bytes();
        const uint8_t* sc = blk + f.quant_bytes();
        const float d = f.f32_scales ? reinterpret_cast<const float*>(sc)[lane] : half_at(sc + 2 * lane);
        const float m = !f.has_min ? 0.f : f.f32_scales ? reinterpret_cast<const float*>(sc + TILE * 4)[lane] : half_at(sc + TILE * 2 + 2 * lane);
        float* row = o + t * f.K + j * f.block;
        for (int i = 0; i < f.block; ++i) {
          int q;
          if (f.kind == W4) {
            const uint8_t byte = blk[((i % 16) / 4) * 64 + lane * 4 + i % 4];
            q = i < 16 ? byte & 0xF : byte >> 4;
          } else {
            q = static_cast<int8_t>(blk[(i / 4) * 64 + lane * 4 + i % 4]);
          }
          row[i] = d * static_cast<float>(q) + m;
        }
      }
    }
  });
  return out;
}

// ---- the matmul -----------------------------------------------------------------------------------
// Activation scratch, reused by every call on this thread (a decode step makes ~150 of them).
struct Scratch {
  std::vector<int8_t> q;
  std::vector<uint8_t> u;
  std::vector<float> d, s;
};

// Scratch beyond this is given back after the call: a long unchunked prompt must not keep its buffers
// for the worker's life (its resident memory would grow for good).
constexpr int64_t KEEP_SCRATCH = 16 << 20;

void trim(Scratch& buf) {
  if (static_cast<int64_t>(buf.q.capacity()) > KEEP_SCRATCH / 2) buf = Scratch();
}

QuantizedActs quantize_into(Scratch& buf, const QgemmKernels& k, const float* x, int64_t ldx, int64_t M, int64_t K) {
  buf.q.resize(M * K);
  buf.u.resize(M * K);
  buf.d.resize(M * K / QK);
  buf.s.resize(M * K / QK);
  parallel_chunks(M, 16, [&](int64_t r0, int64_t r1) { k.quantize(x, ldx, K, buf.q.data(), buf.u.data(), buf.d.data(), buf.s.data(), r0, r1); });
  return {buf.q.data(), buf.u.data(), buf.d.data(), buf.s.data(), M, K};
}

// Rows are taken 64 at a time (their quantized activations stay in L2 while a tile group streams past),
// tiles up to 16 at a time: long enough runs of weights for the prefetchers (measured here: a 290 MB
// matrix streamed at 18.2 GB/s against 16.9 with 4), and at least two tasks per thread, so that a
// preempted thread's share is taken over and many threads all get work.
constexpr int64_t ROW_CHUNK = 64;
constexpr int64_t MAX_TILES_PER_TASK = 16;

void run_gemm(const QgemmKernels& k, const WeightFormat& f, const uint8_t* w, const QuantizedActs& x, const float* bias, float* y) {
  const int64_t M = x.M, tiles = f.tiles();
  const int64_t per_task = std::clamp<int64_t>(tiles / (2 * at::get_num_threads()), 1, MAX_TILES_PER_TASK);
  const int64_t row_chunks = (M + ROW_CHUNK - 1) / ROW_CHUNK, groups = (tiles + per_task - 1) / per_task;
  parallel_chunks(row_chunks * groups, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t rc = i / groups, g = i % groups;
      k.gemm(f, w, x, bias, y, f.N, rc * ROW_CHUNK, std::min(M, (rc + 1) * ROW_CHUNK), g * per_task, std::min(tiles, (g + 1) * per_task));
    }
  });
}

// y = x @ W.T + bias; x float32 [M, K] with contiguous rows, W tiles of `fmt`.
at::Tensor qlinear(const at::Tensor& x, const at::Tensor& w, const std::vector<int64_t>& fmt, const std::optional<at::Tensor>& bias,
                   int64_t level) {
  const WeightFormat f = format_of(fmt, w);
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.stride(1) == 1 && x.size(1) == f.K,
              "qlinear: x must be float32 [M, ", f.K, "] with contiguous rows");
  const float* b = nullptr;
  if (bias) {
    check_f32(*bias, "bias");
    TORCH_CHECK(bias->numel() == f.N, "qlinear: bias must have N values");
    b = bias->data_ptr<float>();
  }
  const int64_t M = x.size(0);
  auto y = at::empty({M, f.N}, x.options());
  if (M == 0) return y;  // a step that samples nothing
  const QgemmKernels& k = kernels(level);
  thread_local Scratch scratch;
  const QuantizedActs acts = quantize_into(scratch, k, x.data_ptr<float>(), x.stride(0), M, f.K);
  run_gemm(k, f, w.data_ptr<uint8_t>(), acts, b, y.data_ptr<float>());
  trim(scratch);
  return y;
}

// For the tests: the activation quantization as the matmul sees it, (q [M, K] int8, d, s [M, K/32]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_acts(const at::Tensor& x, int64_t level) {
  check_f32(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.size(1) % QK == 0, "quantize_acts: x [M, K] with K a multiple of 32");
  const int64_t M = x.size(0), K = x.size(1);
  auto q = at::empty({M, K}, at::TensorOptions().dtype(at::kChar));
  auto u = at::empty({M, K}, at::TensorOptions().dtype(at::kByte));
  auto d = at::empty({M, K / QK}, x.options()), s = at::empty({M, K / QK}, x.options());
  kernels(level).quantize(x.data_ptr<float>(), K, K, q.data_ptr<int8_t>(), u.data_ptr<uint8_t>(), d.data_ptr<float>(), s.data_ptr<float>(), 0, M);
  return {q, d, s};
}

}  // namespace serve_native
