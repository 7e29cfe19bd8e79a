// Dense linear layers (float32 or bfloat16 weights, float32 math) for CPUs with AVX2 but no AVX-512.
//
// oneDNN serves such CPUs less well where the server spends its time: a decode step multiplies a
// few rows by every weight, and on a 2-core AVX2 EPYC the model's 120 decoder linears took
// oneDNN 1.5x these kernels' time with 1-2 rows, 1.4-1.8x with 4-32 and 1.1x with 64-256
// (float32, interleaved in one process); it refuses bfloat16 weights outright (it needs AVX-512
// or AVX-NE-CONVERT for them), which leaves ATen's emulated bf16 matmul.
//
// These kernels keep each weight once, in panels of 16 output columns, and multiply up to 6 rows
// at a time against a panel with 8-wide FMAs, bfloat16 weights widened to float32 in registers as
// they stream in (a 16-bit shift: exact). The panels of a layer are contiguous, so a thread's share
// of the weight is one sequential stream, which a decode batch takes a block at a time while
// prefetching the next.
//
// Layout: [Np/16][K][16] (float32, or bfloat16 as uint16), N zero-padded to a multiple of 16.
// Activations are float32 or bfloat16 rows; the result has the activations' dtype, accumulated in
// float32 (bfloat16 outputs rounded to nearest even).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_avx2_tile.h"
#include "cpu_packed.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <optional>

#if defined(__x86_64__) && defined(__GNUC__)
#define SLUICE_X86 1
#else
#define SLUICE_X86 0
#endif

namespace {

#if SLUICE_X86
using sluice::avx2::kCols;
using sluice::avx2::for_each_tile_prefetching;
using sluice::avx2::tile;
using sluice::avx2::tile_for;
#else
constexpr int64_t kCols = 16;
#endif

constexpr int64_t kRowChunk = 48;  // rows whose activations stay cache-resident while a thread's panels stream past
constexpr int64_t kBlockK = 96;    // k rows of a panel that a decode batch's tiles take in turn

struct PackedDense {
  at::Tensor panels;  // float32 or uint16 (bf16 bits) [Np/16, K, 16]
  int64_t n = 0, k = 0;
  bool bf16 = false;
  int64_t blocks() const { return panels.size(0); }
};

sluice::PackedRegistry<PackedDense> registry("dense weight");

bool cpu_supported() {
#if SLUICE_X86
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

bool dense_avx2_available() { return cpu_supported(); }

int64_t pack_dense_avx2(const at::Tensor& weight) {
  TORCH_CHECK(cpu_supported(), "the AVX2 dense kernels need a CPU with AVX2 and FMA");
  TORCH_CHECK(weight.device().is_cpu() && weight.dim() == 2 &&
                  (weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16),
              "weight must be a CPU float32 or bfloat16 [out, in] matrix");
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK(k > 0, "weight has no inputs");
  const int64_t np = (n + kCols - 1) / kCols * kCols;
  auto padded = at::zeros({np, k}, weight.options());  // [Np, K]
  padded.narrow(0, 0, n).copy_(weight);
  auto p = std::make_shared<PackedDense>();
  p->panels = padded.view({np / kCols, kCols, k}).transpose(1, 2).contiguous();  // [Np/16, K, 16]
  if (weight.scalar_type() == at::kBFloat16) p->panels = p->panels.view(at::kShort);
  p->n = n;
  p->k = k;
  p->bf16 = weight.scalar_type() == at::kBFloat16;
  return registry.add(std::move(p));
}

void release_dense_avx2(int64_t handle) {
  registry.release(handle);
}

#if SLUICE_X86
// out[m0 + m, col0 + c] = acc [mr][ld] (+ bias) for c < 16, the columns past N dropped.
template <typename T>
void finish(const float* acc, int64_t ld, int mr, T* out, int64_t n, const float* bias, int64_t m0, int64_t col0) {
  const int64_t cols = std::min<int64_t>(kCols, n - col0);
  for (int m = 0; m < mr; ++m) {
    T* row = out + (m0 + m) * n + col0;
    const float* a = acc + m * ld;
    for (int64_t c = 0; c < cols; ++c) row[c] = static_cast<T>(a[c] + (bias ? bias[col0 + c] : 0.f));
  }
}

// One or two rows x NP panels at a time (tile's wide form), the last few panels one by one.
template <int MR, int NP, typename W, typename T>
void few_rows(const float* x, int64_t k, const PackedDense& w, const W* panels, int64_t begin, int64_t end, T* out,
              const float* bias) {
  alignas(32) float acc[MR * NP * kCols];
  const int64_t panel_size = k * kCols;
  int64_t b = begin;
  for (; b + NP <= end; b += NP) {
    tile<MR, NP, W>(x, k, panels + b * panel_size, panel_size, 0, k, acc, false);
    for (int p = 0; p < NP; ++p) finish(acc + p * kCols, NP * kCols, MR, out, w.n, bias, 0, (b + p) * kCols);
  }
  for (; b < end; ++b) {
    tile<MR, 1, W>(x, k, panels + b * panel_size, panel_size, 0, k, acc, false);
    finish(acc, kCols, MR, out, w.n, bias, 0, b * kCols);
  }
}

// x [rows, K] float32 (contiguous) -> out [rows, N] of type T.
template <typename W, typename T>
void matmul(const float* x, int64_t rows, const PackedDense& w, const W* panels, T* out, const float* bias) {
  const int64_t k = w.k, panel_size = k * kCols;
  // A thread takes a contiguous range of panels; small layers stay on one thread.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, k * kCols));
  at::parallel_for(0, w.blocks(), grain, [&](int64_t begin, int64_t end) {
    if (rows == 1) return few_rows<1, 4>(x, k, w, panels, begin, end, out, bias);
    if (rows == 2) return few_rows<2, 2>(x, k, w, panels, begin, end, out, bias);
    // Up to kRowChunk rows (a decode batch) take each panel kBlockK k rows at a time, every tile in
    // turn, while the tiles prefetch the stream's next block between them: the weights come from
    // memory once, at an even pace, while the FMAs run (taking whole panels tile after tile left
    // the memory idle while the first tile's loads waited on it: 0.7-0.85x the time at 8-32 rows).
    // More rows (prefill) re-read each panel from L2 for every tile anyway and take it whole.
    const bool blocked = rows <= kRowChunk;
    const int64_t block = blocked ? kBlockK : k;
    const int64_t lines = blocked ? block * kCols * int64_t(sizeof(W)) / 64 : 0;  // cache lines of a block
    alignas(32) float acc[kRowChunk * kCols];  // [chunk rows][16]
    for (int64_t r0 = 0; r0 < rows; r0 += kRowChunk) {
      const int64_t chunk = std::min(kRowChunk, rows - r0);
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t k0 = 0; k0 < k; k0 += block) {
          const int64_t k1 = std::min(k, k0 + block);
          // The block after this one in the thread's stream (the next panel's first, past the last).
          const char* ahead = reinterpret_cast<const char*>(panels + b * panel_size + (k0 + block) * kCols);
          for_each_tile_prefetching(chunk, ahead, lines, [&](int64_t m0, int mr, const char* pf, int64_t pf_lines) {
            tile_for<W>(mr)(x + (r0 + m0) * k, k, panels + b * panel_size, panel_size, k0, k1, acc + m0 * kCols,
                            k0 > 0, pf, pf_lines);
          });
        }
        finish(acc, kCols, static_cast<int>(chunk), out, w.n, bias, r0, b * kCols);
      }
    }
  });
}
#endif  // SLUICE_X86

at::Tensor dense_avx2_linear(const at::Tensor& x, int64_t handle, int64_t out_features,
                             const std::optional<at::Tensor>& bias) {
  const auto w = registry.get(handle);
  TORCH_CHECK(out_features == w->n, "dense weight ", handle, " has ", w->n, " outputs, not ", out_features);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == w->k, "x [..., ", w->k, "] expected, got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  const at::Tensor xf = x.reshape({-1, w->k}).to(at::kFloat).contiguous();  // [M, K]; bf16 -> fp32 is exact
  const int64_t rows = xf.size(0);
  const auto out_shape = sluice::linear_out_shape(x, w->n);
  auto out = at::empty({rows, w->n}, x.options());  // [M, N]
  if (rows == 0 || w->n == 0) return out.view(out_shape);
  const at::Tensor b = sluice::float_bias(bias, w->n);
#if SLUICE_X86
  const float* bp = b.defined() ? b.const_data_ptr<float>() : nullptr;
  const float* xp = xf.const_data_ptr<float>();
  const bool bf16_out = x.scalar_type() == at::kBFloat16;
  if (w->bf16) {
    const auto* panels = reinterpret_cast<const uint16_t*>(w->panels.const_data_ptr<int16_t>());
    bf16_out ? matmul(xp, rows, *w, panels, out.data_ptr<at::BFloat16>(), bp)
             : matmul(xp, rows, *w, panels, out.data_ptr<float>(), bp);
  } else {
    const float* panels = w->panels.const_data_ptr<float>();
    bf16_out ? matmul(xp, rows, *w, panels, out.data_ptr<at::BFloat16>(), bp)
             : matmul(xp, rows, *w, panels, out.data_ptr<float>(), bp);
  }
#else
  TORCH_CHECK(false, "the AVX2 dense kernels need an x86-64 CPU");
#endif
  return out.view(out_shape);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sluice_cpu, m) {
  m.def("dense_avx2_available() -> bool", &dense_avx2_available);
  m.def("pack_dense_avx2(Tensor weight) -> int", &pack_dense_avx2);
  m.def("release_dense_avx2(int handle) -> ()", &release_dense_avx2);
  m.def("dense_avx2_linear(Tensor x, int handle, int out_features, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(sluice_cpu, CPU, m) { m.impl("dense_avx2_linear", &dense_avx2_linear); }
