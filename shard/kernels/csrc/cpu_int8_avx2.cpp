// The int8 linears' AVX2 kernels, for CPUs without AVX-512 (see cpu_int8.cpp for the whole).

#include "cpu_int8.h"

#if SLUICE_X86
#include "cpu_avx2_tile.h"

#include <cmath>
#include <cstring>

namespace sluice::int8 {

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
  const float inv = i16_row_inv(m, std::isfinite(p), scale);
  if (std::isnan(*scale)) {
    std::memset(q, 0, kp * sizeof(int16_t));
    return;
  }
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

void w8_avx2(const at::Tensor& x, const PackedInt8& w, const Output& o) {
  const int64_t rows = x.size(0), k = x.size(1), kp = w.k4() * 4;
  int16_t* q = rows_buffer<int16_t>(rows * kp);  // [rows, Kp]
  float* s = rows_buffer<float>(rows);
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / k), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      if (x.scalar_type() == at::kBFloat16)
        quantize_row_i16(x.const_data_ptr<at::BFloat16>() + m * x.stride(0), k, q + m * kp, kp, s + m);
      else
        quantize_row_i16(x.const_data_ptr<float>() + m * x.stride(0), k, q + m * kp, kp, s + m);
    }
  });
  w8_i16_avx2({q, kp, s}, rows, w, o);
}

}  // namespace sluice::int8
#endif  // SLUICE_X86
