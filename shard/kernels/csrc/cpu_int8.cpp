// Int8 linear layers for the CPU: weights quantized per output channel (symmetric int8, one fp32
// scale a column), packed once and named by an integer handle (as cpu_linear.cpp does for oneDNN
// weights: a compiled graph calls the op with a constant int), and one op with two matmuls:
//
//  - weight-only (W8): activations keep their precision (or 16 bits of it where multiplied in
//    integers); int8 weights become exact bf16/fp32 values and are multiplied with AVX-512 BF16
//    dot products (bf16 activations) or FMAs (fp32). Up to 4 rows (decoding few sequences:
//    reading the weight is the cost, and int8 reads half of bf16's bytes) the weight is converted
//    in registers as it streams in, by byte-table lookups (AVX512-VBMI); with more rows, on AMX,
//    the rows are rounded to 16-bit integers and multiplied in integers straight from the packed
//    weight; elsewhere a thread converts a chunk of 64 output columns into a small scratch once
//    and runs every row against it, while prefetching its next chunk.
//  - dynamic (W8A8): each activation row is quantized to u8 with its own scale and zero point and
//    the integer matmul runs on AMX tiles (cpu_amx.cpp) or VNNI (vpdpbusd: u8 x s8, 64
//    multiply-adds an instruction, twice the rate of bf16), the zero point corrected with the
//    weight's column sums:
//      out[m, n] = sx[m] * sw[n] * (sum_k q[m, k] w[n, k] - zp[m] * sum_k w[n, k]) + bias[n]
//
// int8_linear(x, handle, out_features, bias, act_quant_min_rows) takes the W8A8 path when x has at
// least act_quant_min_rows rows (0: always; a huge number: never, pure weight-only).
//
// Packed layout, read by both paths: int8 [Np/16][Kp/4][16][4], one 64-byte vector per 16 output
// columns x 4 consecutive k (VNNI order); N and K are zero-padded to multiples of 16 and 4.
//
// The SIMD kernels carry target attributes and are chosen at run time from the CPU's features
// (AMX or AVX-512 VNNI for W8A8; AMX, AVX-512 BF16 or AVX-512F for W8; AVX2 for W8 on CPUs
// without AVX-512, which multiplies in integers, the activations rounded to 16 bits as on AMX);
// scalar loops over the same layout serve other CPUs, slowly (50-100x the time of a float32
// matmul) but with the same results up to summation order.
//
// Files: this one packs weights, picks the kernels and holds the scalar loops; cpu_int8_avx512.cpp
// the AVX-512 kernels (and the AMX paths' quantization and epilogues), cpu_amx.cpp the AMX
// tiles, cpu_int8_avx2.cpp the AVX2 kernels; cpu_int8.h what they share.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_int8.h"
#include "cpu_amx.h"
#include "cpu_packed.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace {

using namespace sluice::int8;

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// ---------------------------------------------------------------------------------------------
// Packed weights, by handle

sluice::PackedRegistry<PackedInt8> registry("int8 weight");

int64_t pack_int8_weight(const at::Tensor& weight, const at::Tensor& scales) {
  TORCH_CHECK(weight.device().is_cpu() && weight.dim() == 2 && weight.scalar_type() == at::kChar,
              "weight must be a CPU int8 [out, in] matrix");
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == weight.size(0) && scales.is_floating_point(),
              "scales must be a float [out] vector");
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK(k > 0, "weight has no inputs");
  // Symmetric int8 (what quantize_per_channel makes): the bf16 kernels look magnitudes up in a
  // 128-entry table, so -128 has no entry.
  TORCH_CHECK(n == 0 || weight.min().item<int8_t>() >= -127, "int8 weights must lie in [-127, 127]");
  const int64_t np = round_up(n, kCols), kp = round_up(k, 4);
  auto padded = at::zeros({np, kp}, weight.options());  // [Np, Kp]
  padded.narrow(0, 0, n).narrow(1, 0, k).copy_(weight);
  auto p = std::make_shared<PackedInt8>();
  p->packed = padded.view({np / kCols, kCols, kp / 4, 4}).permute({0, 2, 1, 3}).contiguous();
  p->col_sums = padded.sum({1}, false, at::kInt);
  p->scales = at::zeros({np}, scales.options().dtype(at::kFloat));
  p->scales.narrow(0, 0, n).copy_(scales);
  p->n = n;
  p->k = k;
  return registry.add(std::move(p));
}

void release_int8_weight(int64_t handle) {
  registry.release(handle);
}

// ---------------------------------------------------------------------------------------------
// Which kernels this CPU runs

struct Isa {
  bool avx2 = false, avx512 = false, vnni = false, bf16 = false, vbmi = false, amx = false;
};

// Tests check the kernels of lesser CPUs on any machine: 0 this CPU's, 1 AVX2's at most, 2 the scalar
// loops, 3 this CPU's without AMX.
std::atomic<int> forced_level{0};

Isa detect() {
  Isa isa;
#if SLUICE_X86
  isa.avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  isa.avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  isa.vnni = isa.avx512 && __builtin_cpu_supports("avx512vnni");
  isa.bf16 = isa.avx512 && __builtin_cpu_supports("avx512bf16");
  isa.vbmi = isa.avx512 && __builtin_cpu_supports("avx512vbmi");
  isa.amx = isa.vnni && isa.bf16 && sluice::amx::available();
#endif
  return isa;
}

Isa isa() {
  static const Isa detected = detect();
  switch (forced_level.load()) {
    case 0:
      return detected;
    case 3: {
      Isa no_amx = detected;
      no_amx.amx = false;
      return no_amx;
    }
    case 1: {
      Isa avx2;
      avx2.avx2 = detected.avx2;
      return avx2;
    }
    default:
      return Isa{};
  }
}

std::string int8_kernels() {
  const Isa i = isa();
  if (!i.avx512) return i.avx2 ? "avx2" : "generic";
  return std::string("avx512") + (i.vnni ? "+vnni" : "") + (i.bf16 ? "+bf16" : "") + (i.vbmi ? "+vbmi" : "") +
         (i.amx ? "+amx" : "");
}

// "native" (this CPU's best), "avx512" (the same without AMX), "avx2" (at most AVX2's, where the
// CPU has it) or "generic".
void int8_force_kernels(const std::string& kernels) {
  static const char* const levels[] = {"native", "avx2", "generic", "avx512"};
  for (int level = 0; level < 4; ++level)
    if (kernels == levels[level]) {
      forced_level = level;
      return;
    }
  TORCH_CHECK(false, "no int8 kernels named ", kernels);
}

// ---------------------------------------------------------------------------------------------
// Scalar kernels (CPUs without AVX-512, and the reference the SIMD kernels match)

int8_t packed_at(const PackedInt8& w, int64_t n, int64_t k) {
  return w.block(n / kCols)[(k / 4) * 64 + (n % kCols) * 4 + k % 4];
}

template <typename T>
void quantize_row_generic(const T* x, int64_t k, uint8_t* q, int64_t kp, float* scale, int32_t* zero_point) {
  float lo = 0.f, hi = 0.f;
  for (int64_t i = 0; i < k; ++i) {
    lo = std::min(lo, static_cast<float>(x[i]));
    hi = std::max(hi, static_cast<float>(x[i]));
  }
  const float s = row_scale(lo, hi);
  const int32_t zp = static_cast<int32_t>(std::nearbyint(-lo / s));
  for (int64_t i = 0; i < k; ++i) {
    const int32_t v = static_cast<int32_t>(std::nearbyint(static_cast<float>(x[i]) / s)) + zp;
    q[i] = static_cast<uint8_t>(std::clamp(v, 0, 255));
  }
  std::fill(q + k, q + kp, uint8_t{0});
  *scale = s;
  *zero_point = zp;
}

template <typename T>
void store_generic(const Output& o, int64_t m, int64_t n, float v) {
  T* out = static_cast<T*>(o.data);
  out[m * o.n + n] = static_cast<T>(v + (o.bias ? o.bias[n] : 0.f));
}

template <typename T>
void w8_generic(const T* x, int64_t ldx, int64_t m_rows, const PackedInt8& w, const Output& o) {
  at::parallel_for(0, w.n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      for (int64_t m = 0; m < m_rows; ++m) {
        float acc = 0.f;
        for (int64_t k = 0; k < w.k; ++k) acc += static_cast<float>(x[m * ldx + k]) * packed_at(w, n, k);
        const float v = acc * o.scale[n];
        o.bf16 ? store_generic<at::BFloat16>(o, m, n, v) : store_generic<float>(o, m, n, v);
      }
  });
}

void w8a8_generic(const QuantRows& a, int64_t m_rows, const PackedInt8& w, const Output& o) {
  const int32_t* col_sums = w.col_sums.const_data_ptr<int32_t>();
  at::parallel_for(0, w.n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      for (int64_t m = 0; m < m_rows; ++m) {
        int32_t acc = 0;
        for (int64_t k = 0; k < w.k; ++k) acc += int32_t{a.q[m * a.ld + k]} * packed_at(w, n, k);
        acc -= a.zero_point[m] * col_sums[n];
        const float v = static_cast<float>(acc) * (a.scale[m] * o.scale[n]);
        o.bf16 ? store_generic<at::BFloat16>(o, m, n, v) : store_generic<float>(o, m, n, v);
      }
  });
}


// ---------------------------------------------------------------------------------------------
// The op

// x [M, K] (rows contiguous) -> u8 rows [M, Kp] with their scales and zero points.
struct QuantBuffers {
  at::Tensor q, scale, zero_point;
};

template <typename T>
void quantize_rows_into(const T* x, int64_t ldx, int64_t rows, int64_t k, int64_t kp, bool simd, QuantBuffers& b) {
  uint8_t* q = b.q.data_ptr<uint8_t>();
  float* scale = b.scale.data_ptr<float>();
  int32_t* zp = b.zero_point.data_ptr<int32_t>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / k), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
#if SLUICE_X86
      if (simd) {
        quantize_row(x + m * ldx, k, q + m * kp, kp, scale + m, zp + m);
        continue;
      }
#endif
      quantize_row_generic(x + m * ldx, k, q + m * kp, kp, scale + m, zp + m);
    }
  });
}

QuantBuffers quantize_rows(const at::Tensor& x, int64_t kp, bool simd) {
  const int64_t rows = x.size(0), k = x.size(1);
  QuantBuffers b{at::empty({rows, kp}, x.options().dtype(at::kByte)), at::empty({rows}, x.options().dtype(at::kFloat)),
                 at::empty({rows}, x.options().dtype(at::kInt))};
  if (x.scalar_type() == at::kBFloat16)
    quantize_rows_into(x.const_data_ptr<at::BFloat16>(), x.stride(0), rows, k, kp, simd, b);
  else
    quantize_rows_into(x.const_data_ptr<float>(), x.stride(0), rows, k, kp, simd, b);
  return b;
}

void w8a8(const at::Tensor& x, const PackedInt8& w, const Output& o) {
  const Isa cpu = isa();
  const int64_t rows = x.size(0), kp = w.k4() * 4;
  const bool amx = cpu.amx && kp % 64 == 0;  // AMX tiles take 64 k at a time
  const QuantBuffers qb = quantize_rows(x, kp, cpu.avx512);
  const QuantRows a{qb.q.const_data_ptr<uint8_t>(), kp, qb.scale.const_data_ptr<float>(),
                    qb.zero_point.const_data_ptr<int32_t>()};
#if SLUICE_X86
  if (amx) return w8a8_amx(a, rows, w, o);
  if (cpu.vnni) return w8a8_vnni(a, rows, w, o);
#endif
  w8a8_generic(a, rows, w, o);
}

void w8(const at::Tensor& x, const PackedInt8& w, const Output& o) {
  const Isa cpu = isa();
  const int64_t rows = x.size(0), k = x.size(1);
#if SLUICE_X86
  const int64_t kp = w.k4() * 4;
  if (cpu.amx && rows > kMaxFusedMR && kp % 64 == 0 && kp <= kMaxI16Kp) {
    if (x.scalar_type() == at::kBFloat16) return w8_i16_amx(x.const_data_ptr<at::BFloat16>(), x.stride(0), rows, w, o);
    return w8_i16_amx(x.const_data_ptr<float>(), x.stride(0), rows, w, o);
  }
  if (cpu.bf16 && x.scalar_type() == at::kBFloat16) {
    // The kernels read k in groups of 4 (the packing's): K % 4 != 0 gets zero columns, so that
    // nothing past a row (NaN, say, where the weight's padding is 0) is read.
    const at::Tensor xe = k < kp ? at::constant_pad_nd(x, {0, kp - k}) : x;
    return w8_bf16(xe.const_data_ptr<at::BFloat16>(), xe.stride(0), rows, w, o, cpu.vbmi, cpu.amx);
  }
  if (cpu.avx512) {
    const at::Tensor xf = x.to(at::kFloat);  // bf16 -> fp32 is exact
    return w8_f32(xf.const_data_ptr<float>(), xf.stride(0), rows, w, o);
  }
  if (cpu.avx2) return w8_avx2(x, w, o);
#endif
  if (x.scalar_type() == at::kBFloat16) return w8_generic(x.const_data_ptr<at::BFloat16>(), x.stride(0), rows, w, o);
  w8_generic(x.const_data_ptr<float>(), x.stride(0), rows, w, o);
}

at::Tensor int8_linear(const at::Tensor& x, int64_t handle, int64_t out_features,
                       const std::optional<at::Tensor>& bias, int64_t act_quant_min_rows) {
  const auto w = registry.get(handle);
  TORCH_CHECK(out_features == w->n, "int8 weight ", handle, " has ", w->n, " outputs, not ", out_features);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == w->k, "x [..., ", w->k, "] expected, got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  auto x2 = x.reshape({-1, w->k});  // [M, K]
  if (x2.stride(-1) != 1 || (x2.size(0) > 1 && x2.stride(0) < w->k)) x2 = x2.contiguous();
  const int64_t rows = x2.size(0);
  const auto out_shape = sluice::linear_out_shape(x, w->n);
  auto out = at::empty({rows, w->n}, x.options());  // [M, N]
  if (rows == 0 || w->n == 0) return out.view(out_shape);
  const at::Tensor b = sluice::float_bias(bias, w->n);
  const Output o{out.data_ptr(), w->n, x.scalar_type() == at::kBFloat16, w->scales.const_data_ptr<float>(),
                 b.defined() ? b.const_data_ptr<float>() : nullptr};
  if (rows >= act_quant_min_rows)
    w8a8(x2, *w, o);
  else
    w8(x2, *w, o);
  return out.view(out_shape);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sluice_cpu, m) {
  m.def("pack_int8_weight(Tensor weight, Tensor scales) -> int", &pack_int8_weight);
  m.def("release_int8_weight(int handle) -> ()", &release_int8_weight);
  m.def("int8_kernels() -> str", &int8_kernels);
  m.def("int8_force_kernels(str kernels) -> ()", &int8_force_kernels);
  m.def("int8_linear(Tensor x, int handle, int out_features, Tensor? bias, int act_quant_min_rows) -> Tensor");
}

TORCH_LIBRARY_IMPL(sluice_cpu, CPU, m) { m.impl("int8_linear", &int8_linear); }
