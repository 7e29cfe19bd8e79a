// The int8 linears' AVX-512 kernels (see cpu_int8.cpp for the whole): weight-only by AVX512-BF16
// dot products or FMAs against the weight converted in registers or in a scratch chunk, W8A8 by
// VNNI, and the AMX paths' quantization and epilogues around cpu_amx.cpp's tiles. Each
// kernel carries its target attributes; cpu_int8.cpp calls them on CPUs that have the features.

#include "cpu_int8.h"

#if SLUICE_X86
#include "cpu_amx.h"
#include "cpu_packed.h"

#include <cmath>
#include <cstring>

namespace sluice::int8 {

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
// Weight-only with more than kMaxFusedMR rows on AMX: in integers, as on AVX2 (cpu_int8_avx2.cpp).
// Each row is rounded to 16-bit integers with its own scale, q = rne(x * inv), inv = 32767 /
// max_k |x|, s = 1 / inv, and split into bytes, q = 256 hi + lo (lo = q & 255, unsigned; hi =
// q >> 8, signed, stored as hi + 128), and both byte planes pass through the u8 x s8 tiles with
// the packed weight as W8A8's one plane does, the hi plane's offset taken out with the weight's
// column sums:
//   out[m, n] = s[m] * scale[n] * (256 * (sum_k (hi + 128) w - 128 * sum_k w) + sum_k lo w) (+ bias)
// The int32 sums are exact (up to 255 * 127 * Kp < 2^31: kMaxI16Kp) and add up in one fp32
// rounding. The weight streams once with no conversion: at 32 rows the bundled model's LM head
// takes 1.3 ms against 2.3 for the bf16 tiles on its dequantized chunks (2-core AMX Xeon), its
// activations off by at most 2^-16 of their row's largest magnitude instead of exact.

// One row's planes (lo, hi: Kp bytes each) and its s (NaN for a row with a NaN or infinity, 0 for
// an all-zero one).

template <typename T>
TARGET_AVX512 void split_row_i16(const T* x, int64_t k, uint8_t* lo, uint8_t* hi, int64_t kp, float* scale) {
  __m512 amax = _mm512_setzero_ps(), poison = _mm512_setzero_ps();  // poison: NaN once a NaN or inf is seen
  for (int64_t i = 0; i < k; i += 16) {
    const __m512 v = load_f32(x + i, tail_mask(k - i));
    amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
    poison = _mm512_add_ps(poison, _mm512_mul_ps(v, _mm512_setzero_ps()));
  }
  const float inv = i16_row_inv(_mm512_reduce_max_ps(amax), std::isfinite(_mm512_reduce_add_ps(poison)), scale);
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
  uint8_t* q = rows_buffer<uint8_t>(2 * rows * kp);
  float* s = rows_buffer<float>(rows);
  // [2 * rows, Kp]: each group of 16 rows (the last may be shorter) is its rows' lo planes, then
  // their hi planes, so that a pass of 32 tile rows holds both planes of each of its rows.
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

template void quantize_row(const at::BFloat16*, int64_t, uint8_t*, int64_t, float*, int32_t*);
template void quantize_row(const float*, int64_t, uint8_t*, int64_t, float*, int32_t*);
template void w8_i16_amx(const at::BFloat16*, int64_t, int64_t, const PackedInt8&, const Output&);
template void w8_i16_amx(const float*, int64_t, int64_t, const PackedInt8&, const Output&);

}  // namespace sluice::int8
#endif  // SLUICE_X86
