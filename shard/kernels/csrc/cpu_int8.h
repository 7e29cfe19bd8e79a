// What the int8 linears' files share (see cpu_int8.cpp for the whole): the packed weight, the
// output and its epilogue's operands, W8A8's quantized activation rows, per-thread scratch and how
// column blocks are shared out among threads; and the SIMD kernels' entry points, which
// cpu_int8.cpp calls by the CPU's features.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <limits>
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

namespace sluice::int8 {

constexpr int64_t kCols = 16;  // output columns per vector block
constexpr int kMaxNR = 4;      // column blocks per micro-tile: 64 columns
constexpr int kMaxMR = 6;      // rows per micro-tile: 6 x 4 accumulators + 4 weight vectors fit 32 registers
constexpr int kMaxFusedMR = 4;  // rows up to which weight-only converts the weight in registers, without scratch
// How far ahead (bytes) a memory-bound tile (up to 4 rows) prefetches each of its weight streams;
// a stream runs into the next block, which follows in memory, so this stays useful.
constexpr int64_t kPrefetch = 1024;

// A weight packed by pack_int8_weight (cpu_int8.cpp).
struct PackedInt8 {
  at::Tensor packed;    // int8 [Np/16, Kp/4, 16, 4]
  at::Tensor scales;    // float32 [Np], zero past N
  at::Tensor col_sums;  // int32 [Np]: sum_k w[n, k], for the activations' zero point
  int64_t n = 0, k = 0;
  int64_t blocks() const { return packed.size(0); }
  int64_t k4() const { return packed.size(1); }
  const int8_t* block(int64_t b) const { return packed.const_data_ptr<int8_t>() + b * k4() * 64; }
};

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

inline float row_scale(float lo, float hi) {
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

// The calling thread's buffer of `count` T for an op's prepared activation rows, kept between
// calls; the chunk loops' threads read it through the pointer. Not scratch(): those threads, the
// calling one among them, use their scratch meanwhile.
template <typename T>
T* rows_buffer(int64_t count) {
  thread_local std::vector<T> buffer;
  if (buffer.size() < static_cast<size_t>(count)) buffer.resize(count);
  return buffer.data();
}

// Weight-only rows multiplied in integers (AVX2, AMX) are rounded to 16 bits: q = rne(x * inv),
// inv = 32767 / max|x|. Returns inv (0 for an all-zero or subnormal row, so q = 0) and sets *scale
// = 1 / inv (0 there; NaN for a row with a NaN or infinity, which has no scale).
inline float i16_row_inv(float amax, bool finite, float* scale) {
  if (!finite) {
    *scale = std::numeric_limits<float>::quiet_NaN();
    return 0.f;
  }
  float inv = 32767.f / amax;
  if (!(inv < std::numeric_limits<float>::infinity())) inv = 0.f;
  *scale = inv > 0.f ? 1.f / inv : 0.f;
  return inv;
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

#if SLUICE_X86
// cpu_int8_avx512.cpp (CPUs with AVX-512F/BW/VL/DQ). x: [rows, ldx] activations.

// Weight-only, bf16 rows (Kp readable k, zero past K), by AVX512-BF16 dot products: VBMI converts
// the weight by table lookups, AMX multiplies more than kMaxFusedMR rows on tiles.
void w8_bf16(const at::BFloat16* x, int64_t ldx, int64_t rows, const PackedInt8& w, const Output& o, bool vbmi,
             bool amx);
// Weight-only, fp32 rows, by FMAs.
void w8_f32(const float* x, int64_t ldx, int64_t rows, const PackedInt8& w, const Output& o);
// Weight-only on AMX in integers, rows rounded to 16 bits; for Kp % 64 == 0 and Kp <= kMaxI16Kp.
constexpr int64_t kMaxI16Kp = (int64_t{1} << 31) / (255 * 127);
template <typename T>
void w8_i16_amx(const T* x, int64_t ldx, int64_t rows, const PackedInt8& w, const Output& o);
// W8A8: one activation row quantized to u8 (QuantRows), then the integer matmul on VNNI or AMX.
template <typename T>
TARGET_AVX512 void quantize_row(const T* x, int64_t k, uint8_t* q, int64_t kp, float* scale, int32_t* zero_point);
void w8a8_vnni(const QuantRows& a, int64_t rows, const PackedInt8& w, const Output& o);
void w8a8_amx(const QuantRows& a, int64_t rows, const PackedInt8& w, const Output& o);

// cpu_int8_avx2.cpp (CPUs with AVX2 and FMA): weight-only, x [M, K] rows rounded to 16 bits.
void w8_avx2(const at::Tensor& x, const PackedInt8& w, const Output& o);
#endif

}  // namespace sluice::int8
