// The int8 and bfloat16 linears' chunks on Intel AMX: a tile multiply takes a 16 x 64-byte tile of
// activations and a 64-byte-wide tile of weights into 16 x 16 sums, 16,384 u8 x s8 multiply-adds
// (tdpbusd, W8A8) or 8,192 bf16 ones (tdpbf16ps: int8 weight-only, dense bf16) an instruction,
// against AVX-512's 64 or 32. The weights' layouts are already what a weight tile reads, 16 rows of
// 64 bytes (4 int8 k or 2 bf16 k of 16 columns): the packed int8 weight ([Np/16][Kp/4][16][4],
// cpu_int8.cpp) directly, the weight-only path's dequantized chunk ([Kp/2][nr][16][2]) and the dense
// bf16 weight's blocks ([Np/32][Kp/2][32][2], cpu_dense_amx.cpp) with a stride. W8A8 sums are exact
// in int32, as on VNNI; bf16 sums add exact products in fp32, in another order than AVX-512's.
//
// Each call loads its own tile configuration (oneDNN runs its AMX kernels on the same threads
// with other shapes) and releases the tiles after it.

#include "cpu_amx.h"

#include <algorithm>

#if defined(__x86_64__) && defined(__GNUC__) && (__GNUC__ >= 11 || defined(__clang__))
#define SLUICE_AMX 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define TARGET_AMX __attribute__((target("amx-tile,amx-int8,amx-bf16")))
#else
#define SLUICE_AMX 0
#endif

namespace sluice::amx {

#if SLUICE_AMX
namespace {

// ldtilecfg's 64-byte operand (palette 1).
struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3: sums for (row tile, column block) = (0, j), (0, j + 1), (1, j), (1, j + 1); 4-5: the
// two row tiles of activations, with the pass's rows (top: min(mr, 16), bottom: the rest); 6-7:
// two column blocks of weights. Every row is 64 bytes.
TARGET_AMX void configure(int mr) {
  TileConfig config;
  const uint8_t top = static_cast<uint8_t>(std::min(mr, 16)), bottom = static_cast<uint8_t>(mr > 16 ? mr - 16 : 16);
  const uint8_t rows[8] = {top, top, bottom, bottom, top, bottom, 16, 16};
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = rows[t];
    config.colsb[t] = 64;
  }
  _tile_loadconfig(&config);
}

// Where one pass reads: activations x (rows ldx bytes apart) and the weight tiles of column blocks
// j and j + 1 (rows ldw bytes apart, blocks w_block bytes apart), over `steps` steps of 64 bytes of k.
// prefetch: how far ahead (bytes, 0: not at all) each step asks for the weight stream's lines, when
// the weights come from memory rather than from a chunk the caller just wrote.
struct Pass {
  const char* x;
  int64_t ldx;
  const char* w;
  int64_t ldw, w_block, steps;
  int64_t prefetch = 0;
};

template <bool BF16, int MT, bool TWO>
TARGET_AMX void sums(const Pass& p, void* acc, int64_t ld_acc) {
  _tile_zero(0);
  if constexpr (TWO) _tile_zero(1);
  if constexpr (MT == 2) _tile_zero(2);
  if constexpr (MT == 2 && TWO) _tile_zero(3);
  for (int64_t i = 0; i < p.steps; ++i) {
    const char* x = p.x + i * 64;
    const char* w = p.w + i * 16 * p.ldw;
    if (p.prefetch)  // the step's rows of both blocks, interleaved in one stream (dense bf16 blocks)
      for (int64_t line = 0; line < 16 * p.ldw; line += 64) _mm_prefetch(w + p.prefetch + line, _MM_HINT_T0);
    _tile_loadd(4, x, p.ldx);
    _tile_loadd(6, w, p.ldw);
    if constexpr (TWO) _tile_loadd(7, w + p.w_block, p.ldw);
    if constexpr (MT == 2) _tile_loadd(5, x + 16 * p.ldx, p.ldx);
    if constexpr (BF16) {
      _tile_dpbf16ps(0, 4, 6);
      if constexpr (TWO) _tile_dpbf16ps(1, 4, 7);
      if constexpr (MT == 2) _tile_dpbf16ps(2, 5, 6);
      if constexpr (MT == 2 && TWO) _tile_dpbf16ps(3, 5, 7);
    } else {
      _tile_dpbusd(0, 4, 6);
      if constexpr (TWO) _tile_dpbusd(1, 4, 7);
      if constexpr (MT == 2) _tile_dpbusd(2, 5, 6);
      if constexpr (MT == 2 && TWO) _tile_dpbusd(3, 5, 7);
    }
  }
  char* top = static_cast<char*>(acc);
  char* bottom = top + 16 * ld_acc;
  _tile_stored(0, top, ld_acc);
  if constexpr (TWO) _tile_stored(1, top + 64, ld_acc);
  if constexpr (MT == 2) _tile_stored(2, bottom, ld_acc);
  if constexpr (MT == 2 && TWO) _tile_stored(3, bottom + 64, ld_acc);
}

// Every pass of 32 rows over the chunk's nr blocks, two blocks at a time. acc: 4-byte sums.
template <bool BF16>
TARGET_AMX void chunk(Pass p, int64_t rows, int nr, char* acc, const Done& done) {
  const int64_t ld_acc = int64_t{nr} * 64;
  const char* x0 = p.x;
  const char* w0 = p.w;
  int configured = 0;
  for (int64_t m0 = 0; m0 < rows; m0 += kTileRows) {
    const int mr = static_cast<int>(std::min<int64_t>(kTileRows, rows - m0));
    if (mr != configured) configure(configured = mr);
    p.x = x0 + m0 * p.ldx;
    for (int j = 0; j < nr; j += 2) {
      p.w = w0 + j * p.w_block;
      const bool two = j + 1 < nr;
      if (mr > 16)
        two ? sums<BF16, 2, true>(p, acc + j * 64, ld_acc) : sums<BF16, 2, false>(p, acc + j * 64, ld_acc);
      else
        two ? sums<BF16, 1, true>(p, acc + j * 64, ld_acc) : sums<BF16, 1, false>(p, acc + j * 64, ld_acc);
    }
    done(m0, mr);
  }
  _tile_release();
}

// Every pass of 32 rows over each of `blocks` dense bf16 blocks in turn (see bf16_blocks in cpu_amx.h).
TARGET_AMX void dense_blocks(const uint16_t* x, int64_t ldx, int64_t rows, const uint16_t* w, int64_t k_pairs,
                             int64_t blocks, float* acc, const BlockDone& done) {
  const char* x0 = reinterpret_cast<const char*>(x);
  const int64_t block_bytes = k_pairs * 128;
  constexpr int64_t kPrefetch = 4096;  // two k steps of a block ahead: +8-12% at 1-32 rows over none
  Pass p{x0, ldx * 2, nullptr, 128, 64, k_pairs / 16, kPrefetch};
  int configured = 0;
  for (int64_t b = 0; b < blocks; ++b) {
    p.w = reinterpret_cast<const char*>(w) + b * block_bytes;
    for (int64_t m0 = 0; m0 < rows; m0 += kTileRows) {
      const int mr = static_cast<int>(std::min<int64_t>(kTileRows, rows - m0));
      if (mr != configured) configure(configured = mr);
      p.x = x0 + m0 * p.ldx;
      mr > 16 ? sums<true, 2, true>(p, acc, 128) : sums<true, 1, true>(p, acc, 128);
      done(b, m0, mr);
    }
  }
  _tile_release();
}

}  // namespace

bool available() {
  static const bool ok = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool bf16 = (d >> 22) & 1, tile = (d >> 24) & 1, int8 = (d >> 25) & 1;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;  // arch_prctl(ARCH_REQ_XCOMP_PERM, ...)
    return bf16 && tile && int8 && syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

void w8a8_chunk(const uint8_t* x, int64_t ldx, int64_t rows, const int8_t* w, int64_t k4, int nr, int32_t* acc,
                const Done& done) {
  const Pass p{reinterpret_cast<const char*>(x), ldx, reinterpret_cast<const char*>(w), 64, k4 * 64, k4 / 16};
  chunk<false>(p, rows, nr, reinterpret_cast<char*>(acc), done);
}

void w8_bf16_chunk(const uint16_t* x, int64_t ldx, int64_t rows, const uint16_t* w, int64_t k_pairs, int nr,
                   float* acc, const Done& done) {
  const Pass p{reinterpret_cast<const char*>(x), ldx * 2, reinterpret_cast<const char*>(w), nr * 64, 64,
               k_pairs / 16};
  chunk<true>(p, rows, nr, reinterpret_cast<char*>(acc), done);
}

void bf16_blocks(const uint16_t* x, int64_t ldx, int64_t rows, const uint16_t* w, int64_t k_pairs, int64_t blocks,
                 float* acc, const BlockDone& done) {
  dense_blocks(x, ldx, rows, w, k_pairs, blocks, acc, done);
}

#else

bool available() { return false; }

void bf16_blocks(const uint16_t*, int64_t, int64_t, const uint16_t*, int64_t, int64_t, float*, const BlockDone&) {}

void w8a8_chunk(const uint8_t*, int64_t, int64_t, const int8_t*, int64_t, int, int32_t*, const Done&) {}

void w8_bf16_chunk(const uint16_t*, int64_t, int64_t, const uint16_t*, int64_t, int, float*, const Done&) {}

#endif  // SLUICE_AMX

}  // namespace sluice::amx
