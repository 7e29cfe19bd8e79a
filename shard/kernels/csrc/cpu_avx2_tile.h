// The AVX2 FMA micro-kernel that the dense (cpu_dense_avx2.cpp) and int8 (cpu_int8.cpp) linears
// share: rows of float32 activations against panels of 16 output columns, [K][16] each, of float32
// or bfloat16 (uint16 bits) weights; and the share-out of a stream's prefetch among a batch's
// tiles, which the int8 kernels' integer tiles (cpu_int8.cpp) use too.
#pragma once

#include <cstdint>

#include "cpu_packed.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

namespace sluice::avx2 {

constexpr int64_t kCols = 16;  // output columns per panel: two 8-float vectors
constexpr int kMaxMR = 6;      // rows per tile: 6 x 2 accumulators + 2 weight vectors + a broadcast = 15 registers

#define SLUICE_AVX2 __attribute__((target("avx2,fma")))

// 8 weights of a panel row as float32.
SLUICE_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
SLUICE_AVX2 inline __m256 load8(const uint16_t* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

// A tile of MR activation rows (float32, ldx apart; bf16 rows are widened into a float32 copy
// first) x NP consecutive panels (panel_size apart), over k rows [k0, k1): acc_io [MR][NP * 16],
// started from zero or, with `resume`, from the sums of the k rows before k0. Every output sums
// its products in k order, one FMA chain each (a chain resumed from memory is the same chain),
// whatever the tile: a row's result does not depend on the rows batched with it. One or two rows
// take 4 or 2 panels at a time, so that 8 chains keep the FMA units busy between dependent FMAs.
// The first pf_lines k steps each prefetch one cache line from pf on.
template <int MR, int NP, typename W>
SLUICE_AVX2 void tile(const float* x, int64_t ldx, const W* panel, int64_t panel_size, int64_t k0, int64_t k1,
                      float* acc_io, bool resume, const char* pf = nullptr, int64_t pf_lines = 0) {
  __m256 acc[MR][NP][2];
#pragma GCC unroll 6
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) {
      if (resume) {
        acc[m][p][0] = _mm256_loadu_ps(acc_io + (m * NP + p) * kCols);
        acc[m][p][1] = _mm256_loadu_ps(acc_io + (m * NP + p) * kCols + 8);
      } else {
        acc[m][p][0] = acc[m][p][1] = _mm256_setzero_ps();
      }
    }
#pragma GCC unroll 2
  for (int64_t kk = k0; kk < k1; ++kk) {
    if (kk - k0 < pf_lines) _mm_prefetch(pf + (kk - k0) * 64, _MM_HINT_T0);
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) {
      const W* w = panel + p * panel_size + kk * kCols;
      const __m256 w0 = load8(w), w1 = load8(w + 8);
#pragma GCC unroll 6
      for (int m = 0; m < MR; ++m) {
        const __m256 xb = _mm256_broadcast_ss(x + m * ldx + kk);
        acc[m][p][0] = _mm256_fmadd_ps(xb, w0, acc[m][p][0]);
        acc[m][p][1] = _mm256_fmadd_ps(xb, w1, acc[m][p][1]);
      }
    }
  }
#pragma GCC unroll 6
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) {
      _mm256_storeu_ps(acc_io + (m * NP + p) * kCols, acc[m][p][0]);
      _mm256_storeu_ps(acc_io + (m * NP + p) * kCols + 8, acc[m][p][1]);
    }
}

template <typename W>
using TileFn = void (*)(const float*, int64_t, const W*, int64_t, int64_t, int64_t, float*, bool, const char*, int64_t);

// The one-panel tile of mr (1 .. kMaxMR) rows.
template <typename W>
TileFn<W> tile_for(int mr) {
  static constexpr TileFn<W> tiles[kMaxMR] = {&tile<1, 1, W>, &tile<2, 1, W>, &tile<3, 1, W>,
                                               &tile<4, 1, W>, &tile<5, 1, W>, &tile<6, 1, W>};
  return tiles[mr - 1];
}

// `rows` cut into tiles (sluice::for_each_tile) that share out, in order, the prefetch of `lines`
// cache lines from `ahead` (the stream's next block): tile(m0, mr, pf, pf_lines).
template <typename F>
void for_each_tile_prefetching(int64_t rows, const char* ahead, int64_t lines, const F& tile) {
  const int64_t tiles = (rows + kMaxMR - 1) / kMaxMR;
  int64_t t = 0;
  sluice::for_each_tile<kMaxMR>(rows, [&](int64_t m0, int mr) {
    const int64_t l0 = t * lines / tiles, l1 = (t + 1) * lines / tiles;
    ++t;
    tile(m0, mr, ahead + l0 * 64, l1 - l0);
  });
}

#undef SLUICE_AVX2

}  // namespace sluice::avx2
#endif
