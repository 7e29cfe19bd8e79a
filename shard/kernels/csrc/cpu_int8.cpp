// Int8 linear layers for the CPU: weights quantized per output channel (symmetric int8, one fp32
// scale a column), packed once and named by an integer handle (as cpu_linear.cpp does for oneDNN
// weights: a compiled graph calls the op with a constant int), and one op with two matmuls:
//
//  - weight-only (W8): activations keep their precision (or 16 bits of it where multiplied in
//    integers); int8 weights become exact bf16/fp32 values and are multiplied with AVX-512 BF16
//    dot products (bf16 activations) or FMAs (fp32). Up to 4 rows
//    (decoding few sequences: reading the weight is the cost, and int8 reads half of bf16's bytes)
//    the weight is converted in registers as it streams in, by byte-table lookups (AVX512-VBMI);
//    with more rows, on AMX, the rows are rounded to 16-bit integers and multiplied in integers
//    straight from the packed weight (see its section); elsewhere a thread converts a chunk of 64
//    output columns into a small scratch once and runs every row against it, while prefetching
//    its next chunk.
//  - dynamic (W8A8): each activation row is quantized to u8 with its own scale and zero point and
//    the integer matmul runs on AMX tiles (cpu_int8_amx.cpp) or VNNI (vpdpbusd: u8 x s8, 64
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
// without AVX-512, which multiplies in integers, the activations rounded to 16 bits as on AMX:
// see its section); scalar loops over the same layout serve other CPUs, slowly (50-100x
// the time of a float32 matmul) but with the same results up to summation order.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_avx2_tile.h"
#include "cpu_int8_amx.h"
#include "cpu_packed.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#define SLUICE_X86 1
#include <immintrin.h>
#define TARGET_AVX2 __attribute__((target("avx2,fma")))
#define TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define TARGET_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx512vnni")))
#define TARGET_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx512bf16")))
#define TARGET_BF16_VBMI \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx512bf16,avx512vbmi")))
#else
#define SLUICE_X86 0
#endif

namespace {

constexpr int64_t kCols = 16;  // output columns per vector block
constexpr int kMaxNR = 4;      // column blocks per micro-tile: 64 columns
constexpr int kMaxMR = 6;      // rows per micro-tile: 6 x 4 accumulators + 4 weight vectors fit 32 registers
constexpr int kMaxFusedMR = 4;  // rows up to which weight-only converts the weight in registers, without scratch
// How far ahead (bytes) a memory-bound tile (up to 4 rows) prefetches each of its weight streams;
// a stream runs into the next block, which follows in memory, so this stays useful.
constexpr int64_t kPrefetch = 1024;

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// ---------------------------------------------------------------------------------------------
// Packed weights, by handle

struct PackedInt8 {
  at::Tensor packed;    // int8 [Np/16, Kp/4, 16, 4]
  at::Tensor scales;    // float32 [Np], zero past N
  at::Tensor col_sums;  // int32 [Np]: sum_k w[n, k], for the activations' zero point
  int64_t n = 0, k = 0;
  int64_t blocks() const { return packed.size(0); }
  int64_t k4() const { return packed.size(1); }
  const int8_t* block(int64_t b) const { return packed.const_data_ptr<int8_t>() + b * k4() * 64; }
};

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
// What both paths share

// A matmul's output [M, N] (float32 or bfloat16) and its epilogue: * scale[n] (+ bias[n]).
struct Output {
  void* data;
  int64_t n;           // columns (N), also the row stride
  bool bf16;
  const float* scale;  // [Np], the weight's per-column scales
  const float* bias;   // [N], or null
};

// Activation rows quantized to u8: q[m, k] = clamp(round(x[m, k] / scale[m]) + zero_point[m], 0, 255),
// with scale = (max(x, 0) - min(x, 0)) / 255 and zero_point = round(-min(x, 0) / scale).
struct QuantRows {
  const uint8_t* q;  // [M, Kp], zero past K
  int64_t ld;        // Kp
  const float* scale;
  const int32_t* zero_point;  // [M]
};

float row_scale(float lo, float hi) {
  const float s = (hi - lo) / 255.f;
  return s > 0.f ? s : 1.f;  // an all-zero row: any scale
}

// Per-thread scratch, grown as needed and kept (OpenMP threads persist), 64-byte aligned.
template <typename T>
T* scratch(int64_t count) {
  struct alignas(64) Line {
    char bytes[64];
  };
  thread_local std::vector<Line> buffer;
  const size_t lines = static_cast<size_t>((count * static_cast<int64_t>(sizeof(T)) + 63) / 64);
  if (buffer.size() < lines) buffer.resize(lines);
  return reinterpret_cast<T*>(buffer.data());
}

// Column blocks handed to threads in contiguous ranges; a range is walked in chunks of up to
// kMaxNR blocks (64 columns), the unit a chunk's tiles share. Small problems stay on one thread.
template <typename F>
void for_each_chunk(int64_t blocks, int64_t rows, int64_t kp, const F& chunk) {
  const int64_t work_per_block = std::max<int64_t>(1, rows * kp * kCols);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / work_per_block);
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; b += kMaxNR) chunk(b, static_cast<int>(std::min<int64_t>(kMaxNR, end - b)));
  });
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

#if SLUICE_X86
// ---------------------------------------------------------------------------------------------
// AVX-512 helpers

TARGET_AVX512 inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? __mmask16(0xffff) : __mmask16((1u << std::max<int64_t>(left, 0)) - 1);
}

TARGET_AVX512 inline int32_t load_i32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// 16 floats (bf16 or fp32 source, masked lanes read as 0).
TARGET_AVX512 inline __m512 load_f32(const at::BFloat16* p, __mmask16 mask) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
TARGET_AVX512 inline __m512 load_f32(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }

// fp32 -> bf16 rounded to nearest even, NaN kept (as c10::BFloat16 does), without AVX512-BF16.
TARGET_AVX512 inline __m256i to_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(r);
}

// out[m, col:col+16] = v * scale (* row_scale) + bias, the columns past N masked off.
TARGET_AVX512 inline void store16(const Output& o, int64_t m, int64_t col, __m512 v, float row_scale = 1.f) {
  const __mmask16 mask = tail_mask(o.n - col);
  if (!mask) return;  // a padding block
  __m512 s = _mm512_loadu_ps(o.scale + col);
  if (row_scale != 1.f) s = _mm512_mul_ps(s, _mm512_set1_ps(row_scale));
  v = _mm512_mul_ps(v, s);
  if (o.bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, o.bias + col));
  if (o.bf16)
    _mm256_mask_storeu_epi16(static_cast<at::BFloat16*>(o.data) + m * o.n + col, mask, to_bf16(v));
  else
    _mm512_mask_storeu_ps(static_cast<float*>(o.data) + m * o.n + col, mask, v);
}

// One 64-byte weight vector (16 columns x 4 k, int8) as 4 fp32 vectors, f[j] = column values at k+j.
TARGET_AVX512 inline void widen(__m512i v, __m512 f[4]) {
  f[0] = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 24), 24));
  f[1] = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 16), 24));
  f[2] = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 8), 24));
  f[3] = _mm512_cvtepi32_ps(_mm512_srai_epi32(v, 24));
}

// Two exact fp32 integers (|v| <= 128: 8 significant bits, low 16 bits zero) as bf16 pairs: the
// low word of each lane from `lo`, the high word from `hi`, the order vdpbf16ps multiplies pairs in.
TARGET_AVX512 inline __m512i bf16_pairs(__m512 lo, __m512 hi) {
  return _mm512_or_si512(_mm512_srli_epi32(_mm512_castps_si512(lo), 16), _mm512_castps_si512(hi));
}

// The same conversion by table lookup (AVX512-VBMI byte permutes), 6 instructions for 64 weights
// instead of widen + bf16_pairs' 15: what lets weight-only decoding keep up with memory. The low
// and high bytes of bf16(|v|) come from 128-entry tables (two registers each), the sign is or-ed
// into the high byte, and two byte permutes interleave them into the k0k1 and k2k3 pairs.
struct Bf16Tables {
  alignas(64) uint8_t lo[128], hi[128], pick_k01[64], pick_k23[64];
  Bf16Tables() {
    for (int i = 0; i < 128; ++i) {
      const float f = static_cast<float>(i);
      uint32_t bits;
      std::memcpy(&bits, &f, sizeof bits);
      lo[i] = static_cast<uint8_t>(bits >> 16);
      hi[i] = static_cast<uint8_t>(bits >> 24);
    }
    for (int c = 0; c < 16; ++c)
      for (int j = 0; j < 2; ++j) {  // column c's k = j (k01) or 2 + j (k23): low byte, then high byte
        pick_k01[4 * c + 2 * j] = static_cast<uint8_t>(4 * c + j);
        pick_k01[4 * c + 2 * j + 1] = static_cast<uint8_t>(64 + 4 * c + j);
        pick_k23[4 * c + 2 * j] = static_cast<uint8_t>(4 * c + 2 + j);
        pick_k23[4 * c + 2 * j + 1] = static_cast<uint8_t>(64 + 4 * c + 2 + j);
      }
  }
};

const Bf16Tables& bf16_tables() {
  static const Bf16Tables tables;
  return tables;
}

struct Bf16Lut {
  __m512i lo0, lo1, hi0, hi1, pick_k01, pick_k23, sign;
};

TARGET_BF16_VBMI inline Bf16Lut load_lut() {
  const Bf16Tables& t = bf16_tables();
  return {_mm512_load_si512(t.lo),       _mm512_load_si512(t.lo + 64),       _mm512_load_si512(t.hi),
          _mm512_load_si512(t.hi + 64),  _mm512_load_si512(t.pick_k01),      _mm512_load_si512(t.pick_k23),
          _mm512_set1_epi8(static_cast<char>(0x80))};
}

// One 64-byte weight vector (16 columns x 4 k) -> bf16 pairs (k0, k1) and (k2, k3) of each column.
TARGET_BF16_VBMI inline void lut_pairs(const Bf16Lut& t, __m512i v, __m512i& k01, __m512i& k23) {
  const __m512i mag = _mm512_abs_epi8(v);
  const __m512i lo = _mm512_permutex2var_epi8(t.lo0, mag, t.lo1);
  const __m512i hi = _mm512_ternarylogic_epi32(_mm512_permutex2var_epi8(t.hi0, mag, t.hi1), v, t.sign, 0xf8);
  k01 = _mm512_permutex2var_epi8(lo, t.pick_k01, hi);  // 0xf8 above: hi | (v & 0x80)
  k23 = _mm512_permutex2var_epi8(lo, t.pick_k23, hi);
}

// ---------------------------------------------------------------------------------------------
// Weight-only: dequantize a chunk into scratch, then tiles of rows against it

// Chunk of nr blocks -> bf16 [Kp/2][nr][16 columns][2 k] (pairs of k per column, for vdpbf16ps),
// prefetching the same bytes of the chunk at `next` (if not null) into L2 meanwhile.
TARGET_AVX512 void dequant_bf16(const PackedInt8& w, int64_t b0, int nr, uint16_t* out, const int8_t* next) {
  const int64_t k4 = w.k4();
  for (int b = 0; b < nr; ++b) {
    const int8_t* src = w.block(b0 + b);
    for (int64_t i = 0; i < k4; ++i) {
      if (next) _mm_prefetch(reinterpret_cast<const char*>(next + (b * k4 + i) * 64), _MM_HINT_T1);
      __m512 f[4];
      widen(_mm512_loadu_si512(src + i * 64), f);
      _mm512_storeu_si512(out + ((2 * i) * nr + b) * 32, bf16_pairs(f[0], f[1]));
      _mm512_storeu_si512(out + ((2 * i + 1) * nr + b) * 32, bf16_pairs(f[2], f[3]));
    }
  }
}

TARGET_BF16_VBMI void dequant_bf16_lut(const PackedInt8& w, int64_t b0, int nr, uint16_t* out, const int8_t* next) {
  const Bf16Lut lut = load_lut();
  const int64_t k4 = w.k4();
  for (int b = 0; b < nr; ++b) {
    const int8_t* src = w.block(b0 + b);
    for (int64_t i = 0; i < k4; ++i) {
      if (next) _mm_prefetch(reinterpret_cast<const char*>(next + (b * k4 + i) * 64), _MM_HINT_T1);
      __m512i k01, k23;
      lut_pairs(lut, _mm512_loadu_si512(src + i * 64), k01, k23);
      _mm512_storeu_si512(out + ((2 * i) * nr + b) * 32, k01);
      _mm512_storeu_si512(out + ((2 * i + 1) * nr + b) * 32, k23);
    }
  }
}

// Chunk of nr blocks -> fp32 [Kp][nr][16 columns].
TARGET_AVX512 void dequant_f32(const PackedInt8& w, int64_t b0, int nr, float* out) {
  const int64_t k4 = w.k4();
  for (int b = 0; b < nr; ++b) {
    const int8_t* src = w.block(b0 + b);
    for (int64_t i = 0; i < k4; ++i) {
      __m512 f[4];
      widen(_mm512_loadu_si512(src + i * 64), f);
      for (int j = 0; j < 4; ++j) _mm512_storeu_ps(out + ((4 * i + j) * nr + b) * 16, f[j]);
    }
  }
}

// A tile working on scratch streams the thread's next chunk (the packed bytes that follow, same
// size) into L2 meanwhile, `bytes` an iteration: otherwise each chunk's dequantization would wait
// on memory with nothing to overlap it.
TARGET_AVX512 inline void prefetch_span(const int8_t* p, int bytes) {
  for (int b = 0; b < bytes; b += 64) _mm_prefetch(reinterpret_cast<const char*>(p + b), _MM_HINT_T1);
}

// The tiles below only accumulate, and store their MR x NR accumulator vectors to `acc`
// ([MR][NR][16]) for an epilogue: with the scaling and stores inside, GCC kept a copy of every
// accumulator on the stack, one store per multiply-add (half the speed).

// Rows x the chunk's NR blocks, bf16 activations: x [MR rows, ldx] with Kp readable k (the caller
// pads K to a multiple of 4), w the chunk from dequant_bf16(_lut).
template <int MR, int NR>
TARGET_BF16 void w8_bf16_tile(const at::BFloat16* x, int64_t ldx, const uint16_t* w, int64_t k_pairs,
                              const int8_t* next, float* acc_out) {
  __m512 acc[MR][NR];
#pragma GCC unroll 6
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) acc[m][j] = _mm512_setzero_ps();
  for (int64_t p = 0; p < k_pairs; ++p) {
    if (next) prefetch_span(next + p * NR * 32, NR * 32);
    __m512bh wv[NR];
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) wv[j] = (__m512bh)_mm512_loadu_si512(w + (p * NR + j) * 32);
#pragma GCC unroll 6
    for (int m = 0; m < MR; ++m) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(load_i32(x + m * ldx + 2 * p));
#pragma GCC unroll 4
      for (int j = 0; j < NR; ++j) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], xb, wv[j]);
    }
  }
#pragma GCC unroll 6
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) _mm512_storeu_ps(acc_out + (m * NR + j) * 16, acc[m][j]);
}

// Few rows (one tile): the weight converted in registers as it streams in, no scratch. x [MR rows,
// ldx] with Kp readable k (the caller pads K to a multiple of 4), w the first of NR packed blocks.
// With one or two rows the k01 and k23 products go to separate accumulators, so that the
// multiply-adds do not wait on each other (latency, not throughput, would bound them).
template <int MR, int NR>
TARGET_BF16_VBMI void w8_bf16_fused_tile(const at::BFloat16* x, int64_t ldx, const int8_t* w, int64_t k4,
                                         float* acc_out) {
  constexpr int S = MR <= 2 ? 2 : 1;
  const Bf16Lut lut = load_lut();
  __m512 acc[S][MR][NR];
#pragma GCC unroll 2
  for (int h = 0; h < S; ++h)
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
      for (int j = 0; j < NR; ++j) acc[h][m][j] = _mm512_setzero_ps();
  for (int64_t i = 0; i < k4; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) {
      const int8_t* wv = w + (j * k4 + i) * 64;
      if constexpr (MR <= 4) _mm_prefetch(reinterpret_cast<const char*>(wv + kPrefetch), _MM_HINT_T0);
      __m512i k01, k23;
      lut_pairs(lut, _mm512_loadu_si512(wv), k01, k23);
#pragma GCC unroll 4
      for (int m = 0; m < MR; ++m) {
        const at::BFloat16* xm = x + m * ldx + 4 * i;
        acc[0][m][j] = _mm512_dpbf16_ps(acc[0][m][j], (__m512bh)_mm512_set1_epi32(load_i32(xm)), (__m512bh)k01);
        acc[S - 1][m][j] =
            _mm512_dpbf16_ps(acc[S - 1][m][j], (__m512bh)_mm512_set1_epi32(load_i32(xm + 2)), (__m512bh)k23);
      }
    }
  }
#pragma GCC unroll 4
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j)
      _mm512_storeu_ps(acc_out + (m * NR + j) * 16, S == 2 ? _mm512_add_ps(acc[0][m][j], acc[S - 1][m][j]) : acc[0][m][j]);
}

// The same with fp32 activations and FMAs, w the chunk from dequant_f32.
template <int MR, int NR>
TARGET_AVX512 void w8_f32_tile(const float* x, int64_t ldx, const float* w, int64_t k, const int8_t* next,
                               float* acc_out) {
  __m512 acc[MR][NR];
#pragma GCC unroll 6
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) acc[m][j] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < k; ++kk) {
    if (next) prefetch_span(next + kk * NR * 16, NR * 16);
    __m512 wv[NR];
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) wv[j] = _mm512_loadu_ps(w + (kk * NR + j) * 16);
#pragma GCC unroll 6
    for (int m = 0; m < MR; ++m) {
      const __m512 xb = _mm512_set1_ps(x[m * ldx + kk]);
#pragma GCC unroll 4
      for (int j = 0; j < NR; ++j) acc[m][j] = _mm512_fmadd_ps(xb, wv[j], acc[m][j]);
    }
  }
#pragma GCC unroll 6
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) _mm512_storeu_ps(acc_out + (m * NR + j) * 16, acc[m][j]);
}

// Weight-only epilogue: out[m0 + m, col0 + 16 j + c] = acc[m][j][c] * scale (+ bias).
TARGET_AVX512 void finish_w8(const float* acc, int mr, int nr, const Output& o, int64_t m0, int64_t col0) {
  for (int m = 0; m < mr; ++m)
    for (int j = 0; j < nr; ++j) store16(o, m0 + m, col0 + j * kCols, _mm512_loadu_ps(acc + (m * nr + j) * 16));
}

// ---------------------------------------------------------------------------------------------
// W8A8: quantize rows, then u8 x s8 tiles straight from the packed weight

template <typename T>
TARGET_AVX512 void quantize_row(const T* x, int64_t k, uint8_t* q, int64_t kp, float* scale, int32_t* zero_point) {
  __m512 lo = _mm512_setzero_ps(), hi = _mm512_setzero_ps();  // masked-off lanes load 0: no effect
  for (int64_t i = 0; i < k; i += 16) {
    const __m512 v = load_f32(x + i, tail_mask(k - i));
    lo = _mm512_min_ps(lo, v);
    hi = _mm512_max_ps(hi, v);
  }
  const float lowest = _mm512_reduce_min_ps(lo);
  const float s = row_scale(lowest, _mm512_reduce_max_ps(hi));
  const int32_t zp = static_cast<int32_t>(std::nearbyint(-lowest / s));
  const __m512 vs = _mm512_set1_ps(s);
  const __m512i vzp = _mm512_set1_epi32(zp), zero = _mm512_setzero_si512();
  for (int64_t i = 0; i < kp; i += 16) {
    const __mmask16 mask = tail_mask(k - i);
    // Division, not a multiply by 1/s, and round-to-nearest-even: bit-identical to the reference.
    __m512i r = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_div_ps(load_f32(x + i, mask), vs)), vzp);
    r = _mm512_maskz_max_epi32(mask, r, zero);  // padding past K: 0
    _mm_mask_storeu_epi8(q + i, tail_mask(kp - i), _mm512_cvtusepi32_epi8(r));  // saturates at 255
  }
  *scale = s;
  *zero_point = zp;
}

// Rows x NR blocks from the packed weight (the blocks follow each other, k4 * 64 bytes apart):
// int32 sums of q[m, k] * w[n, k], stored to acc_out [MR][NR][16].
template <int MR, int NR>
TARGET_VNNI void w8a8_tile(const uint8_t* x, int64_t ldx, const int8_t* w, int64_t k4, int32_t* acc_out) {
  __m512i acc[MR][NR];
#pragma GCC unroll 6
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) acc[m][j] = _mm512_setzero_si512();
  for (int64_t i = 0; i < k4; ++i) {
    __m512i wv[NR];
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) {
      if constexpr (MR <= 4) _mm_prefetch(reinterpret_cast<const char*>(w + (j * k4 + i) * 64 + kPrefetch), _MM_HINT_T0);
      wv[j] = _mm512_loadu_si512(w + (j * k4 + i) * 64);
    }
#pragma GCC unroll 6
    for (int m = 0; m < MR; ++m) {
      const __m512i xb = _mm512_set1_epi32(load_i32(x + m * ldx + 4 * i));
#pragma GCC unroll 4
      for (int j = 0; j < NR; ++j) acc[m][j] = _mm512_dpbusd_epi32(acc[m][j], xb, wv[j]);
    }
  }
#pragma GCC unroll 6
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) _mm512_storeu_si512(acc_out + (m * NR + j) * 16, acc[m][j]);
}

// W8A8 epilogue: (acc - zp[m] * col_sums[n]) * sx[m] * sw[n] (+ bias), the zero point's share
// taken out exactly in int32.
TARGET_AVX512 void finish_w8a8(const int32_t* acc, int mr, int nr, const QuantRows& a, const int32_t* col_sums,
                               const Output& o, int64_t m0, int64_t col0) {
  for (int m = 0; m < mr; ++m) {
    const __m512i zp = _mm512_set1_epi32(a.zero_point[m0 + m]);
    for (int j = 0; j < nr; ++j) {
      const __m512i sums = _mm512_loadu_si512(col_sums + col0 + j * kCols);
      const __m512i v = _mm512_sub_epi32(_mm512_loadu_si512(acc + (m * nr + j) * 16), _mm512_mullo_epi32(zp, sums));
      store16(o, m0 + m, col0 + j * kCols, _mm512_cvtepi32_ps(v), a.scale[m0 + m]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Tile dispatch: a table of the MR x NR instantiations, indexed by the rows and blocks left.

#define SLUICE_TILE_ROW(fn, mr) {&fn<mr, 1>, &fn<mr, 2>, &fn<mr, 3>, &fn<mr, 4>}
#define SLUICE_TILE_TABLE(fn)                                                                          \
  {SLUICE_TILE_ROW(fn, 1), SLUICE_TILE_ROW(fn, 2), SLUICE_TILE_ROW(fn, 3), SLUICE_TILE_ROW(fn, 4), \
   SLUICE_TILE_ROW(fn, 5), SLUICE_TILE_ROW(fn, 6)}

// The nr blocks after chunk [b0, b0 + nr), to prefetch, if the weight has them.
const int8_t* next_chunk(const PackedInt8& w, int64_t b0, int nr) {
  return b0 + 2 * nr <= w.blocks() ? w.block(b0 + nr) : nullptr;
}

// x [rows, ldx] bf16 with Kp readable k (zero past K).
// More than kMaxFusedMR rows: on AMX (k4 * 4 a multiple of 32), each dequantized chunk against 32
// rows a pass of the tiles.
void w8_bf16(const at::BFloat16* x, int64_t ldx, int64_t rows, const PackedInt8& w, const Output& o, bool vbmi,
             bool amx) {
  const int64_t k4 = w.k4();
  if (vbmi && rows <= kMaxFusedMR) {
    using Fused = void (*)(const at::BFloat16*, int64_t, const int8_t*, int64_t, float*);
    static constexpr Fused fused[kMaxFusedMR][kMaxNR] = {SLUICE_TILE_ROW(w8_bf16_fused_tile, 1),
                                                         SLUICE_TILE_ROW(w8_bf16_fused_tile, 2),
                                                         SLUICE_TILE_ROW(w8_bf16_fused_tile, 3),
                                                         SLUICE_TILE_ROW(w8_bf16_fused_tile, 4)};
    return for_each_chunk(w.blocks(), rows, k4 * 4, [&](int64_t b0, int nr) {
      alignas(64) float acc[kMaxFusedMR * kMaxNR * kCols];
      fused[rows - 1][nr - 1](x, ldx, w.block(b0), k4, acc);
      finish_w8(acc, static_cast<int>(rows), nr, o, 0, b0 * kCols);
    });
  }
  const int64_t k_pairs = k4 * 2;
  if (amx && k_pairs % 16 == 0) {
    return for_each_chunk(w.blocks(), rows, k4 * 4, [&](int64_t b0, int nr) {
      uint16_t* chunk = scratch<uint16_t>(k4 * 4 * nr * kCols);
      const int8_t* next = next_chunk(w, b0, nr);
      vbmi ? dequant_bf16_lut(w, b0, nr, chunk, next) : dequant_bf16(w, b0, nr, chunk, next);
      alignas(64) float acc[sluice::amx::kTileRows * kMaxNR * kCols];
      const auto* xu = reinterpret_cast<const uint16_t*>(x);
      sluice::amx::w8_bf16_chunk(xu, ldx, rows, chunk, k_pairs, nr, acc,
                                 [&](int64_t m0, int mr) { finish_w8(acc, mr, nr, o, m0, b0 * kCols); });
    });
  }
  using Tile = void (*)(const at::BFloat16*, int64_t, const uint16_t*, int64_t, const int8_t*, float*);
  static constexpr Tile tiles[kMaxMR][kMaxNR] = SLUICE_TILE_TABLE(w8_bf16_tile);
  for_each_chunk(w.blocks(), rows, k4 * 4, [&](int64_t b0, int nr) {
    uint16_t* chunk = scratch<uint16_t>(k4 * 4 * nr * kCols);
    vbmi ? dequant_bf16_lut(w, b0, nr, chunk, nullptr) : dequant_bf16(w, b0, nr, chunk, nullptr);
    alignas(64) float acc[kMaxMR * kMaxNR * kCols];
    sluice::for_each_tile<kMaxMR>(rows, [&](int64_t m0, int mr) {
      tiles[mr - 1][nr - 1](x + m0 * ldx, ldx, chunk, k_pairs, m0 == 0 ? next_chunk(w, b0, nr) : nullptr, acc);
      finish_w8(acc, mr, nr, o, m0, b0 * kCols);
    });
  });
}

void w8_f32(const float* x, int64_t ldx, int64_t rows, const PackedInt8& w, const Output& o) {
  using Tile = void (*)(const float*, int64_t, const float*, int64_t, const int8_t*, float*);
  static constexpr Tile tiles[kMaxMR][kMaxNR] = SLUICE_TILE_TABLE(w8_f32_tile);
  for_each_chunk(w.blocks(), rows, w.k4() * 4, [&](int64_t b0, int nr) {
    float* chunk = scratch<float>(w.k4() * 4 * nr * kCols);
    dequant_f32(w, b0, nr, chunk);
    alignas(64) float acc[kMaxMR * kMaxNR * kCols];
    sluice::for_each_tile<kMaxMR>(rows, [&](int64_t m0, int mr) {
      tiles[mr - 1][nr - 1](x + m0 * ldx, ldx, chunk, w.k, m0 == 0 ? next_chunk(w, b0, nr) : nullptr, acc);
      finish_w8(acc, mr, nr, o, m0, b0 * kCols);
    });
  });
}

void w8a8_vnni(const QuantRows& a, int64_t rows, const PackedInt8& w, const Output& o) {
  using Tile = void (*)(const uint8_t*, int64_t, const int8_t*, int64_t, int32_t*);
  static constexpr Tile tiles[kMaxMR][kMaxNR] = SLUICE_TILE_TABLE(w8a8_tile);
  const int32_t* col_sums = w.col_sums.const_data_ptr<int32_t>();
  const int64_t k4 = w.k4();
  for_each_chunk(w.blocks(), rows, k4 * 4, [&](int64_t b0, int nr) {
    alignas(64) int32_t acc[kMaxMR * kMaxNR * kCols];
    sluice::for_each_tile<kMaxMR>(rows, [&](int64_t m0, int mr) {
      tiles[mr - 1][nr - 1](a.q + m0 * a.ld, a.ld, w.block(b0), k4, acc);
      finish_w8a8(acc, mr, nr, a, col_sums, o, m0, b0 * kCols);
    });
  });
}

// The same on AMX, 32 rows a pass.
void w8a8_amx(const QuantRows& a, int64_t rows, const PackedInt8& w, const Output& o) {
  const int32_t* col_sums = w.col_sums.const_data_ptr<int32_t>();
  for_each_chunk(w.blocks(), rows, w.k4() * 4, [&](int64_t b0, int nr) {
    alignas(64) int32_t acc[sluice::amx::kTileRows * kMaxNR * kCols];
    sluice::amx::w8a8_chunk(a.q, a.ld, rows, w.block(b0), w.k4(), nr, acc, [&](int64_t m0, int mr) {
      finish_w8a8(acc, mr, nr, a, col_sums, o, m0, b0 * kCols);
    });
  });
}

// ---------------------------------------------------------------------------------------------
// Weight-only with more than kMaxFusedMR rows on AMX: in integers, as on AVX2 (below). Each row is
// rounded to 16-bit integers with its own scale, q = rne(x * inv), inv = 32767 / max_k |x|, s =
// 1 / inv, and split into bytes, q = 256 hi + lo (lo = q & 255, unsigned; hi = q >> 8, signed,
// stored as hi + 128), and both byte planes pass through the u8 x s8 tiles with the packed weight
// as W8A8's one plane does, the hi plane's offset taken out with the weight's column sums:
//   out[m, n] = s[m] * scale[n] * (256 * (sum_k (hi + 128) w - 128 * sum_k w) + sum_k lo w) (+ bias)
// The int32 sums are exact (up to 255 * 127 * Kp < 2^31: kMaxI16Kp) and add up in one fp32 rounding.
// The weight streams once with no conversion: at 32 rows the bundled model's LM head takes 1.4 ms
// against 2.3 for the bf16 tiles on its dequantized chunks (2-core AMX Xeon), its activations off
// by at most 2^-16 of their row's largest magnitude instead of exact.
constexpr int64_t kMaxI16Kp = (int64_t{1} << 31) / (255 * 127);

// Activation rows as byte planes for the tiles: each group of 16 rows (the last may be shorter) is
// its rows' lo planes, then their hi planes, so that a pass of 32 tile rows holds both for each row.
struct I16Planes {
  const uint8_t* q;    // [2 * M, Kp]
  int64_t ld;          // Kp
  const float* scale;  // [M]: s (NaN for a row with a NaN or infinity, 0 for an all-zero one)
};

template <typename T>
TARGET_AVX512 void split_row_i16(const T* x, int64_t k, uint8_t* lo, uint8_t* hi, int64_t kp, float* scale) {
  __m512 amax = _mm512_setzero_ps(), poison = _mm512_setzero_ps();  // poison: NaN once a NaN or inf is seen
  for (int64_t i = 0; i < k; i += 16) {
    const __m512 v = load_f32(x + i, tail_mask(k - i));
    amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
    poison = _mm512_add_ps(poison, _mm512_mul_ps(v, _mm512_setzero_ps()));
  }
  const float m = _mm512_reduce_max_ps(amax);
  float inv = 32767.f / m;
  if (!(inv < std::numeric_limits<float>::infinity())) inv = 0.f;  // all zero (or subnormal): q = 0
  *scale = inv > 0.f ? 1.f / inv : 0.f;
  if (!std::isfinite(_mm512_reduce_add_ps(poison))) *scale = std::numeric_limits<float>::quiet_NaN(), inv = 0.f;
  const __m512 vinv = _mm512_set1_ps(inv);
  const __m512i low_byte = _mm512_set1_epi32(255), offset = _mm512_set1_epi32(128);
  for (int64_t i = 0; i < kp; i += 16) {
    const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(load_f32(x + i, tail_mask(k - i)), vinv));  // 0 past K
    const __mmask16 mask = tail_mask(kp - i);
    _mm_mask_storeu_epi8(lo + i, mask, _mm512_cvtepi32_epi8(_mm512_and_si512(q, low_byte)));
    _mm_mask_storeu_epi8(hi + i, mask, _mm512_cvtepi32_epi8(_mm512_add_epi32(_mm512_srai_epi32(q, 8), offset)));
  }
}

// Epilogue of a pass over r rows: acc [2r][nr][16], the r rows' lo sums, then their hi sums.
TARGET_AVX512 void finish_i16_planes(const int32_t* acc, int r, int nr, const float* s, const int32_t* col_sums,
                                     const Output& o, int64_t m0, int64_t col0) {
  for (int m = 0; m < r; ++m)
    for (int j = 0; j < nr; ++j) {
      const __m512i offset = _mm512_slli_epi32(_mm512_loadu_si512(col_sums + col0 + j * kCols), 7);
      const __m512i hi = _mm512_sub_epi32(_mm512_loadu_si512(acc + ((r + m) * nr + j) * 16), offset);
      const __m512i lo = _mm512_loadu_si512(acc + (m * nr + j) * 16);
      const __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), _mm512_set1_ps(256.f), _mm512_cvtepi32_ps(lo));
      store16(o, m0 + m, col0 + j * kCols, v, s[m0 + m]);
    }
}

template <typename T>
void w8_i16_amx(const T* x, int64_t ldx, int64_t rows, const PackedInt8& w, const Output& o) {
  const int64_t k = w.k, kp = w.k4() * 4;
  // This thread's buffers, kept between calls (the worker threads get the pointers).
  thread_local std::vector<uint8_t> q_buffer;
  thread_local std::vector<float> s_buffer;
  if (q_buffer.size() < static_cast<size_t>(2 * rows * kp)) q_buffer.resize(2 * rows * kp);
  if (s_buffer.size() < static_cast<size_t>(rows)) s_buffer.resize(rows);
  uint8_t* q = q_buffer.data();
  float* s = s_buffer.data();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / k), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const int64_t group = m / 16, r = std::min<int64_t>(16, rows - group * 16);
      uint8_t* lo = q + (group * 32 + m % 16) * kp;
      split_row_i16(x + m * ldx, k, lo, lo + r * kp, kp, s + m);
    }
  });
  const int32_t* col_sums = w.col_sums.const_data_ptr<int32_t>();
  for_each_chunk(w.blocks(), rows, kp, [&](int64_t b0, int nr) {
    alignas(64) int32_t acc[sluice::amx::kTileRows * kMaxNR * kCols];
    sluice::amx::w8a8_chunk(q, kp, 2 * rows, w.block(b0), w.k4(), nr, acc, [&](int64_t m0, int mr) {
      finish_i16_planes(acc, mr / 2, nr, s, col_sums, o, m0 / 2, b0 * kCols);
    });
  });
}

// ---------------------------------------------------------------------------------------------
// AVX2 (CPUs without AVX-512): weight-only, multiplied in integers. Without VNNI the fastest
// multiply-add AVX2 has is vpmaddwd (16-bit pairs summed into int32: 16 products an instruction
// against an fp32 FMA's 8; 78 against 50 GMAC/s on one Zen 3 core), so each activation row is
// rounded to 16-bit integers with its own scale and the int8 weights are widened to 16 bits in
// registers:
//   out[m, n] = s[m] * scale[n] * sum_k q[m, k] w[n, k] (+ bias[n]),
//   q[m, k] = rne(x[m, k] * inv[m]), inv[m] = 32767 / max_k |x[m, k]|, s[m] = 1 / inv[m]
// (x off by at most 2^-16 of its row's largest magnitude: finer than bf16's own rounding for every
// value within 128x of that largest one). The int32 sums are exact; they are taken kBlockK4 * 4 k
// at a time (|sum| <= 96 * 32767 * 127 < 2^31) and added up in fp32 in k order, on every path, so
// a row's result does not depend on the rows batched with it. A row with a NaN or infinity gets
// NaN (s = NaN).
//   - up to kMaxFusedMR rows (decoding few sequences: reading the weight is the cost) the packed
//     bytes are widened in registers as they stream in;
//   - more rows: each block of 16 columns is widened kBlockK4 * 4 k at a time into a small panel
//     that every tile of rows takes in turn, while the tiles prefetch the next packed bytes (the
//     dense kernels' way: the memory busy while the multiply-adds run).
constexpr int64_t kBlockK4 = 24;  // 96 k
static_assert(kBlockK4 * 4 * int64_t{32767} * 127 < (int64_t{1} << 31), "a k block's int32 sums overflow");

// Activation rows as 16-bit integers [M, Kp] (zero past K), each group of 4 k stored as k0, k2,
// k1, k3: a 32-bit broadcast of a group's first pair multiplies the widened weights' (k0, k2)
// lanes, of its second pair their (k1, k3) lanes (widen(), below).
struct I16Rows {
  const int16_t* q;
  int64_t ld;          // Kp
  const float* scale;  // [M]: s
};

TARGET_AVX2 inline __m256 load8_f32(const float* p) { return _mm256_loadu_ps(p); }
TARGET_AVX2 inline __m256 load8_f32(const at::BFloat16* p) {
  return sluice::avx2::load8(reinterpret_cast<const uint16_t*>(p));  // bf16 -> fp32 is exact
}

template <typename T>
TARGET_AVX2 void quantize_row_i16(const T* x, int64_t k, int16_t* q, int64_t kp, float* scale) {
  __m256 amax = _mm256_setzero_ps(), poison = _mm256_setzero_ps();  // poison: NaN once a NaN or inf is seen
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    const __m256 v = load8_f32(x + i);
    amax = _mm256_max_ps(amax, _mm256_and_ps(v, abs_mask));
    poison = _mm256_add_ps(poison, _mm256_mul_ps(v, _mm256_setzero_ps()));
  }
  alignas(32) float lanes[8], bad[8];
  _mm256_store_ps(lanes, amax);
  _mm256_store_ps(bad, poison);
  float m = 0.f, p = 0.f;
  for (int j = 0; j < 8; ++j) m = std::max(m, lanes[j]), p += bad[j];
  for (; i < k; ++i) m = std::max(m, std::fabs(static_cast<float>(x[i]))), p += static_cast<float>(x[i]) * 0.f;
  if (!std::isfinite(p)) {
    std::memset(q, 0, kp * sizeof(int16_t));
    *scale = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  float inv = 32767.f / m;
  if (!(inv < std::numeric_limits<float>::infinity())) inv = 0.f;  // all zero (or subnormal): q = 0
  *scale = inv > 0.f ? 1.f / inv : 0.f;
  static constexpr int kSlot[4] = {0, 2, 1, 3};  // where k0..k3 of a group go
  const __m256 vinv = _mm256_set1_ps(inv);
  const __m256i order = _mm256_setr_epi32(0, 2, 1, 3, 4, 6, 5, 7);
  for (i = 0; i + 8 <= k; i += 8) {
    const __m256i r = _mm256_permutevar8x32_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(load8_f32(x + i), vinv)), order);
    // packs works within 128-bit lanes: the 8 values end up in 64-bit chunks 0 and 2.
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm256_castsi256_si128(packed));
  }
  for (; i < kp; ++i) {
    const int32_t r = i < k ? _mm_cvtss_si32(_mm_set_ss(static_cast<float>(x[i]) * inv)) : 0;
    q[i / 4 * 4 + kSlot[i % 4]] = static_cast<int16_t>(r);
  }
}

// One 32-byte half of a packed group (8 columns x 4 k, a column's k0..k3 in each int32 lane) as
// 16-bit lanes: even = (k0, k2) and odd = (k1, k3) of each column, sign-extended.
TARGET_AVX2 inline void widen(__m256i v, __m256i& even, __m256i& odd) {
  even = _mm256_srai_epi16(_mm256_slli_epi16(v, 8), 8);
  odd = _mm256_srai_epi16(v, 8);
}

TARGET_AVX2 inline __m256i pair_at(const int16_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return _mm256_set1_epi32(v);
}

// acc_io [16] (+)= the int32 sums as fp32.
TARGET_AVX2 inline void add_sums(float* acc_io, __m256i s0, __m256i s1, bool resume) {
  __m256 f0 = _mm256_cvtepi32_ps(s0), f1 = _mm256_cvtepi32_ps(s1);
  if (resume) {
    f0 = _mm256_add_ps(_mm256_loadu_ps(acc_io), f0);
    f1 = _mm256_add_ps(_mm256_loadu_ps(acc_io + 8), f1);
  }
  _mm256_storeu_ps(acc_io, f0);
  _mm256_storeu_ps(acc_io + 8, f1);
}

// Up to kMaxFusedMR rows against NB consecutive blocks of the packed weight (w: the first's first
// group), widened in registers as they stream in: acc_out [NB][MR][16], the fp32 sum of each k
// block's int32 sums. One or two rows take 4 or 2 blocks at a time: 4 streams from memory in flight
// rather than one.
template <int MR, int NB>
TARGET_AVX2 void w8_i16_fused_tile_avx2(const int16_t* q, int64_t ldq, const int8_t* w, int64_t k4, float* acc_out) {
  for (int64_t i0 = 0; i0 < k4; i0 += kBlockK4) {
    const int64_t i1 = std::min(k4, i0 + kBlockK4);
    __m256i acc[NB][MR][2];
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b)
#pragma GCC unroll 4
      for (int m = 0; m < MR; ++m) acc[b][m][0] = acc[b][m][1] = _mm256_setzero_si256();
    for (int64_t i = i0; i < i1; ++i) {
#pragma GCC unroll 4
      for (int b = 0; b < NB; ++b) {
        const int8_t* g = w + (b * k4 + i) * 64;
        _mm_prefetch(reinterpret_cast<const char*>(g + kPrefetch), _MM_HINT_T0);
        __m256i e0, o0, e1, o1;
        widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(g)), e0, o0);
        widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(g + 32)), e1, o1);
#pragma GCC unroll 4
        for (int m = 0; m < MR; ++m) {
          const __m256i xe = pair_at(q + m * ldq + 4 * i), xo = pair_at(q + m * ldq + 4 * i + 2);
          acc[b][m][0] = _mm256_add_epi32(acc[b][m][0], _mm256_madd_epi16(e0, xe));
          acc[b][m][1] = _mm256_add_epi32(acc[b][m][1], _mm256_madd_epi16(e1, xe));
          acc[b][m][0] = _mm256_add_epi32(acc[b][m][0], _mm256_madd_epi16(o0, xo));
          acc[b][m][1] = _mm256_add_epi32(acc[b][m][1], _mm256_madd_epi16(o1, xo));
        }
      }
    }
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b)
#pragma GCC unroll 4
      for (int m = 0; m < MR; ++m)
        add_sums(acc_out + (b * MR + m) * kCols, acc[b][m][0], acc[b][m][1], i0 > 0);
  }
}

// n4 groups of one block's packed bytes (src: the first) -> panel [n4][4][16] int16: per group
// the even lanes of columns 0-7 and 8-15, then the odd lanes of both.
TARGET_AVX2 void widen_panel_avx2(const int8_t* src, int64_t n4, int16_t* panel) {
  for (int64_t i = 0; i < n4; ++i) {
    __m256i e0, o0, e1, o1;
    widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i * 64)), e0, o0);
    widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i * 64 + 32)), e1, o1);
    __m256i* dst = reinterpret_cast<__m256i*>(panel + i * 64);
    _mm256_store_si256(dst, e0);
    _mm256_store_si256(dst + 1, e1);
    _mm256_store_si256(dst + 2, o0);
    _mm256_store_si256(dst + 3, o1);
  }
}

// MR rows (q: their groups of this k block) against a widened panel of n4 groups: acc_io [MR][16]
// (+)= the block's sums. The first pf_lines groups each prefetch one cache line from pf on.
template <int MR>
TARGET_AVX2 void w8_i16_tile_avx2(const int16_t* q, int64_t ldq, const int16_t* panel, int64_t n4, float* acc_io,
                                  bool resume, const char* pf, int64_t pf_lines) {
  __m256i acc[MR][2];
#pragma GCC unroll 6
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
#pragma GCC unroll 2
  for (int64_t i = 0; i < n4; ++i) {
    if (i < pf_lines) _mm_prefetch(pf + i * 64, _MM_HINT_T0);
    const __m256i* p = reinterpret_cast<const __m256i*>(panel + i * 64);
#pragma GCC unroll 6
    for (int m = 0; m < MR; ++m) {
      const __m256i xe = pair_at(q + m * ldq + 4 * i), xo = pair_at(q + m * ldq + 4 * i + 2);
      acc[m][0] = _mm256_add_epi32(acc[m][0], _mm256_madd_epi16(_mm256_load_si256(p), xe));
      acc[m][1] = _mm256_add_epi32(acc[m][1], _mm256_madd_epi16(_mm256_load_si256(p + 1), xe));
      acc[m][0] = _mm256_add_epi32(acc[m][0], _mm256_madd_epi16(_mm256_load_si256(p + 2), xo));
      acc[m][1] = _mm256_add_epi32(acc[m][1], _mm256_madd_epi16(_mm256_load_si256(p + 3), xo));
    }
  }
#pragma GCC unroll 6
  for (int m = 0; m < MR; ++m) add_sums(acc_io + m * kCols, acc[m][0], acc[m][1], resume);
}

// out[m0 + m, col0 + c] = acc [mr][16] * scale * s[m] (+ bias), the columns past N dropped; loops
// without branches inside, which the compiler vectorizes.
template <typename T>
void finish_w8_i16(const float* acc, int64_t mr, const I16Rows& a, const Output& o, int64_t m0, int64_t col0) {
  const int64_t cols = std::min<int64_t>(kCols, o.n - col0);
  const float* scale = o.scale + col0;
  for (int64_t m = 0; m < mr; ++m) {
    T* row = static_cast<T*>(o.data) + (m0 + m) * o.n + col0;
    const float* sums = acc + m * kCols;
    const float s = a.scale[m0 + m];
    if (o.bias) {
      const float* bias = o.bias + col0;
      for (int64_t c = 0; c < cols; ++c) row[c] = static_cast<T>(sums[c] * scale[c] * s + bias[c]);
    } else {
      for (int64_t c = 0; c < cols; ++c) row[c] = static_cast<T>(sums[c] * scale[c] * s);
    }
  }
}

void finish_w8_i16(const float* acc, int64_t mr, const I16Rows& a, const Output& o, int64_t m0, int64_t col0) {
  o.bf16 ? finish_w8_i16<at::BFloat16>(acc, mr, a, o, m0, col0) : finish_w8_i16<float>(acc, mr, a, o, m0, col0);
}

void w8_i16_avx2(const I16Rows& a, int64_t rows, const PackedInt8& w, const Output& o) {
  const int64_t k4 = w.k4();
  if (rows <= kMaxFusedMR) {
    using Fused = void (*)(const int16_t*, int64_t, const int8_t*, int64_t, float*);
    // [rows - 1]: the tile of as many blocks at a time as it takes, then the one-block tile.
    static constexpr Fused wide[kMaxFusedMR] = {&w8_i16_fused_tile_avx2<1, 4>, &w8_i16_fused_tile_avx2<2, 2>,
                                                &w8_i16_fused_tile_avx2<3, 1>, &w8_i16_fused_tile_avx2<4, 1>};
    static constexpr Fused one[kMaxFusedMR] = {&w8_i16_fused_tile_avx2<1, 1>, &w8_i16_fused_tile_avx2<2, 1>,
                                               &w8_i16_fused_tile_avx2<3, 1>, &w8_i16_fused_tile_avx2<4, 1>};
    const int width = rows == 1 ? 4 : rows == 2 ? 2 : 1;
    return for_each_chunk(w.blocks(), rows, k4 * 4, [&](int64_t b0, int nr) {
      alignas(32) float acc[kMaxNR * kMaxFusedMR * kCols];  // [blocks][rows][16]
      const int together = nr % width == 0 ? width : 1;
      for (int b = 0; b < nr; b += together)
        (together > 1 ? wide : one)[rows - 1](a.q, a.ld, w.block(b0 + b), k4, acc + b * rows * kCols);
      for (int b = 0; b < nr; ++b) finish_w8_i16(acc + b * rows * kCols, rows, a, o, 0, (b0 + b) * kCols);
    });
  }
  using Tile = void (*)(const int16_t*, int64_t, const int16_t*, int64_t, float*, bool, const char*, int64_t);
  static constexpr Tile tiles[kMaxMR] = {&w8_i16_tile_avx2<1>, &w8_i16_tile_avx2<2>, &w8_i16_tile_avx2<3>,
                                         &w8_i16_tile_avx2<4>, &w8_i16_tile_avx2<5>, &w8_i16_tile_avx2<6>};
  for_each_chunk(w.blocks(), rows, k4 * 4, [&](int64_t b0, int nr) {
    float* acc = scratch<float>(rows * kCols);  // [rows][16]
    alignas(64) int16_t panel[kBlockK4 * 64];
    for (int b = 0; b < nr; ++b) {
      const int8_t* src = w.block(b0 + b);
      for (int64_t i0 = 0; i0 < k4; i0 += kBlockK4) {
        const int64_t n4 = std::min(kBlockK4, k4 - i0);
        widen_panel_avx2(src + i0 * 64, n4, panel);
        // The packed bytes of the next k block (the next column block's first, past the last).
        const char* ahead = reinterpret_cast<const char*>(src + (i0 + kBlockK4) * 64);
        sluice::avx2::for_each_tile_prefetching(
            rows, ahead, kBlockK4, [&](int64_t m0, int mr, const char* pf, int64_t pf_lines) {
              tiles[mr - 1](a.q + m0 * a.ld + 4 * i0, a.ld, panel, n4, acc + m0 * kCols, i0 > 0, pf, pf_lines);
            });
      }
      finish_w8_i16(acc, rows, a, o, 0, (b0 + b) * kCols);
    }
  });
}
#endif  // SLUICE_X86

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
  if (cpu.avx2) {
    // This thread's buffers, kept between calls: [rows, Kp] and [rows]. (A lambda that named a
    // thread_local would reach each thread's own: the threads get the pointers.)
    thread_local std::vector<int16_t> q_buffer;
    thread_local std::vector<float> s_buffer;
    if (q_buffer.size() < static_cast<size_t>(rows * kp)) q_buffer.resize(rows * kp);
    if (s_buffer.size() < static_cast<size_t>(rows)) s_buffer.resize(rows);
    int16_t* q = q_buffer.data();
    float* s = s_buffer.data();
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / k), [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        if (x.scalar_type() == at::kBFloat16)
          quantize_row_i16(x.const_data_ptr<at::BFloat16>() + m * x.stride(0), k, q + m * kp, kp, s + m);
        else
          quantize_row_i16(x.const_data_ptr<float>() + m * x.stride(0), k, q + m * kp, kp, s + m);
      }
    });
    return w8_i16_avx2({q, kp, s}, rows, w, o);
  }
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
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = w->n;
  auto out = at::empty({rows, w->n}, x.options());  // [M, N]
  if (rows == 0 || w->n == 0) return out.view(out_shape);
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == w->n, "bias must have ", w->n, " elements");
    b = bias->to(at::kFloat).contiguous();
  }
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
