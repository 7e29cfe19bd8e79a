// The int8 and bfloat16 linears' chunks on Intel AMX (cpu_amx.cpp), for cpu_int8.cpp's chunk loops
// and cpu_dense_amx.cpp.
#pragma once

#include <cstdint>
#include <functional>

namespace sluice::amx {

// Rows a pass of the tiles multiplies: two 16-row tiles.
constexpr int kTileRows = 32;

// Whether this CPU has AMX-TILE, AMX-INT8 and AMX-BF16 and Linux let the process use the tile
// registers (asked once, for the whole process).
bool available();

// Called after each pass over up to 32 rows m0 .. m0 + mr: acc [mr][nr][16] holds their sums.
using Done = std::function<void(int64_t m0, int mr)>;

// u8 x s8 (W8A8, and weight-only's 16-bit rows as byte planes): acc int32 <- sum_k x[m, k] * w[n, k]
// for the rows of x (u8, ldx bytes apart) and the nr (1..4) column blocks of 16 at w, which follow
// each other k4 * 64 bytes apart in the packed layout [k4][16][4]. k4 * 4 must be a multiple of 64.
void w8a8_chunk(const uint8_t* x, int64_t ldx, int64_t rows, const int8_t* w, int64_t k4, int nr, int32_t* acc,
                const Done& done);

// Weight-only: acc float <- sum_k x[m, k] * w[n, k] for bf16 rows x (ldx elements apart) and a chunk
// of nr blocks dequantized to bf16 pairs [k_pairs][nr][16][2]. k_pairs * 2 must be a multiple of 32.
void w8_bf16_chunk(const uint16_t* x, int64_t ldx, int64_t rows, const uint16_t* w, int64_t k_pairs, int nr,
                   float* acc, const Done& done);

// Called after each pass over up to 32 rows m0 .. m0 + mr of column block b: acc [mr][32] holds their sums.
using BlockDone = std::function<void(int64_t b, int64_t m0, int mr)>;

// Dense bf16: acc float <- sum_k x[m, k] * w[n, k] for bf16 rows x (ldx elements apart) and `blocks`
// consecutive blocks of 32 columns, each stored as pairs [k_pairs][32][2] (k_pairs * 128 bytes);
// k_pairs * 2 must be a multiple of 32. Each block takes every row in passes of 32, so a block is read
// from memory once (prefetched ahead) while the rows, which the caller keeps few enough for L2, are
// read once per block.
void bf16_blocks(const uint16_t* x, int64_t ldx, int64_t rows, const uint16_t* w, int64_t k_pairs, int64_t blocks,
                 float* acc, const BlockDone& done);

}  // namespace sluice::amx
