// Dense bfloat16 linear layers on Intel AMX tiles (cpu_amx.cpp), in place of oneDNN's.
//
// A decode step multiplies a few rows by every weight, so its linears run at the speed the weights
// stream from memory, and oneDNN pays 15-35 us of setup per call on top (primitive lookup, memory
// descriptors, allocations), on one thread while the other waits. These kernels keep each weight
// once, in blocks of 32 output columns stored as the tiles read them, and multiply every row of a
// block while it streams past, prefetched ahead. SmolLM2-135M's 120 decoder linears on a 2-core
// Xeon with AMX (all 30 layers' weights, 212 MB, in turn; median of 15 rounds): 0.61x oneDNN's
// time at 1 row, 0.66x at 8, 0.63-0.68x at 32, 0.72x at 64, 0.86x at 128-256.
//
// Past kMaxTileRows rows (a prefill) the work is arithmetic, where oneDNN's blocking keeps the tiles
// fed better (these kernels took 1.6x its time at 3,200 rows): the call unpacks the weight to [N, K]
// and hands it to oneDNN's matmul, 1.06x the time of a weight oneDNN packed itself, plus the unpacking.
//
// Layout: [Np/32][Kp/2][32][2] bf16 (K pairs of 32 columns), N and K zero-padded to multiples of 32.
// Rows and result are bfloat16, the result rounded to nearest even from float32 sums.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

#include "cpu_amx.h"
#include "cpu_packed.h"

#include <algorithm>
#include <memory>
#include <optional>
#include <string>

#if defined(__x86_64__) && defined(__GNUC__)
#define SLUICE_X86 1
#include <immintrin.h>
#define TARGET_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#else
#define SLUICE_X86 0
#endif

namespace {

constexpr int64_t kBlockCols = 32;  // output columns per block: two 16-column tiles
constexpr int64_t kMaxTileRows = 256;  // rows the tiles take (kept in L2 while the blocks pass); more go to oneDNN

struct PackedAmx {
  at::Tensor blocks;  // int16 (bf16 bits) [Np/32, Kp/2, 32, 2]
  int64_t n = 0, k = 0, kp = 0;
  int64_t count() const { return blocks.size(0); }
};

sluice::PackedRegistry<PackedAmx> registry("AMX dense weight");

bool dense_amx_available() { return sluice::amx::available(); }

int64_t pack_dense_amx(const at::Tensor& weight) {
  TORCH_CHECK(dense_amx_available(), "the AMX dense kernels need a CPU with AMX-BF16 (and a kernel that allows it)");
  TORCH_CHECK(weight.device().is_cpu() && weight.dim() == 2 && weight.scalar_type() == at::kBFloat16,
              "weight must be a CPU bfloat16 [out, in] matrix");
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK(k > 0, "weight has no inputs");
  const int64_t np = (n + kBlockCols - 1) / kBlockCols * kBlockCols, kp = (k + 31) / 32 * 32;
  auto padded = at::zeros({np, kp}, weight.options());  // [Np, Kp]
  padded.narrow(0, 0, n).narrow(1, 0, k).copy_(weight);
  auto p = std::make_shared<PackedAmx>();
  p->blocks = padded.view({np / kBlockCols, kBlockCols, kp / 2, 2}).permute({0, 2, 1, 3}).contiguous().view(at::kShort);
  p->n = n;
  p->k = k;
  p->kp = kp;
  return registry.add(std::move(p));
}

void release_dense_amx(int64_t handle) { registry.release(handle); }

// x [M, K] @ w^T (+ bias) by oneDNN's matmul on the weight unpacked to [N, K]: bf16 [M, N].
at::Tensor onednn_linear(const at::Tensor& x, const PackedAmx& w, const std::optional<at::Tensor>& bias) {
  static const auto linear =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  at::Tensor plain = w.blocks.view(at::kBFloat16).permute({0, 2, 1, 3}).reshape({-1, w.kp}).narrow(0, 0, w.n);
  if (w.kp != w.k) plain = plain.narrow(1, 0, w.k).contiguous();  // [N, K]
  torch::jit::Stack stack{x, plain, bias, std::string("none"), c10::List<std::optional<at::Scalar>>(),
                          std::optional<std::string>("")};
  linear.callBoxed(&stack);
  return stack[0].toTensor();
}

#if SLUICE_X86
// out[m0 + m, col0 + c] = acc[m][c] (+ bias[col0 + c]) for c < min(32, n - col0).
TARGET_BF16 void finish(const float* acc, int mr, at::BFloat16* out, int64_t n, const float* bias, int64_t m0, int64_t col0) {
  for (int half = 0; half < 2; ++half) {
    const int64_t c0 = col0 + half * 16, cols = std::min<int64_t>(16, n - c0);
    if (cols <= 0) return;
    const __mmask16 mask = static_cast<__mmask16>((1u << cols) - 1);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + c0) : _mm512_setzero_ps();
    for (int m = 0; m < mr; ++m) {
      const __m512 v = _mm512_add_ps(_mm512_loadu_ps(acc + m * kBlockCols + half * 16), b);
      _mm256_mask_storeu_epi16(out + (m0 + m) * n + c0, mask, (__m256i)_mm512_cvtneps_pbh(v));
    }
  }
}

// x [rows, kp] bf16 (contiguous, zero past K; rows <= kMaxTileRows) -> out [rows, N] bf16.
void matmul(const at::BFloat16* x, int64_t rows, const PackedAmx& w, at::BFloat16* out, const float* bias) {
  const auto* xs = reinterpret_cast<const uint16_t*>(x);
  const auto* blocks = reinterpret_cast<const uint16_t*>(w.blocks.const_data_ptr<int16_t>());
  const int64_t k_pairs = w.kp / 2, block_size = k_pairs * 2 * kBlockCols;
  // A thread takes a contiguous range of blocks: one stream of weights each.
  at::parallel_for(0, w.count(), 1, [&](int64_t begin, int64_t end) {
    alignas(64) float acc[sluice::amx::kTileRows * kBlockCols];
    sluice::amx::bf16_blocks(xs, w.kp, rows, blocks + begin * block_size, k_pairs, end - begin, acc,
                             [&](int64_t b, int64_t m0, int mr) {
                               finish(acc, mr, out, w.n, bias, m0, (begin + b) * kBlockCols);
                             });
  });
}
#endif  // SLUICE_X86

at::Tensor dense_amx_linear(const at::Tensor& x, int64_t handle, int64_t out_features,
                            const std::optional<at::Tensor>& bias) {
  const auto w = registry.get(handle);
  TORCH_CHECK(out_features == w->n, "AMX dense weight ", handle, " has ", w->n, " outputs, not ", out_features);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == w->k, "x [..., ", w->k, "] expected, got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "x must be bfloat16");
  const auto out_shape = sluice::linear_out_shape(x, w->n);
  const at::Tensor b = sluice::float_bias(bias, w->n);
  at::Tensor xb = x.reshape({-1, w->k});  // [M, K]
  if (xb.size(0) > kMaxTileRows) {
    return onednn_linear(xb.contiguous(), *w, bias).view(out_shape);
  }
  if (w->kp != w->k) xb = at::constant_pad_nd(xb, {0, w->kp - w->k});
  xb = xb.contiguous();  // [M, Kp]
  const int64_t rows = xb.size(0);
  auto out = at::empty({rows, w->n}, x.options());  // [M, N]
  if (rows == 0 || w->n == 0) return out.view(out_shape);
#if SLUICE_X86
  const float* bp = b.defined() ? b.const_data_ptr<float>() : nullptr;
  const auto* xp = xb.const_data_ptr<at::BFloat16>();
  matmul(xp, rows, *w, out.data_ptr<at::BFloat16>(), bp);
#else
  TORCH_CHECK(false, "the AMX dense kernels need an x86-64 CPU");
#endif
  return out.view(out_shape);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sluice_cpu, m) {
  m.def("dense_amx_available() -> bool", &dense_amx_available);
  m.def("pack_dense_amx(Tensor weight) -> int", &pack_dense_amx);
  m.def("release_dense_amx(int handle) -> ()", &release_dense_amx);
  m.def("dense_amx_linear(Tensor x, int handle, int out_features, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(sluice_cpu, CPU, m) { m.impl("dense_amx_linear", &dense_amx_linear); }
