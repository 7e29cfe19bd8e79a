// Greedy sampling's reductions over the vocabulary in one pass per row: the argmax and the
// log-sum-exp (for the chosen token's log-probability), instead of torch's separate argmax,
// amax, subtract, exp, sum and log passes over [rows, vocab] fp32 logits.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

namespace {

using fVec = at::vec::Vectorized<float>;
constexpr int kLanes = fVec::size();

// Online log-sum-exp over one row (-inf entries, masked tokens, add nothing), with the index of
// its first maximum; NaN counts as the maximum, as in torch.argmax.
std::pair<int64_t, float> argmax_lse_row(const float* x, int64_t n) {
  const fVec neg_inf(-INFINITY), one(1.f), zero(0.f);
  fVec vmax(neg_inf), vsum(zero);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const fVec v = fVec::loadu(x + i);
    const fVec new_max = at::vec::maximum(vmax, v);
    const fVec rescale = fVec::blendv((vmax - new_max).exp_u20(), one, vmax == new_max);
    const fVec term = fVec::blendv((v - new_max).exp_u20(), zero, v == neg_inf);
    vsum = vsum * rescale + term;
    vmax = new_max;
  }
  float lanes_max[kLanes], lanes_sum[kLanes];
  vmax.store(lanes_max);
  vsum.store(lanes_sum);
  float max = -INFINITY;
  for (int l = 0; l < kLanes; ++l) max = std::max(max, lanes_max[l]);
  for (; i < n; ++i) max = std::max(max, x[i]);
  float sum = 0.f;
  for (int l = 0; l < kLanes; ++l)
    if (lanes_max[l] > -INFINITY) sum += lanes_sum[l] * std::exp(lanes_max[l] - max);
  for (i = n - n % kLanes; i < n; ++i) sum += std::exp(x[i] - max);
  int64_t index = 0;
  if (std::isnan(max)) {
    while (!std::isnan(x[index])) ++index;
  } else {
    while (x[index] != max) ++index;
  }
  return {index, max + std::log(sum)};
}

std::tuple<at::Tensor, at::Tensor> argmax_logsumexp(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat, "logits must be [rows, vocab] float32");
  const auto x = logits.contiguous();
  const int64_t rows = x.size(0), vocab = x.size(1);
  auto index = at::empty({rows}, x.options().dtype(at::kLong));
  auto lse = at::empty({rows}, x.options());
  const float* src = x.const_data_ptr<float>();
  int64_t* index_ptr = index.data_ptr<int64_t>();
  float* lse_ptr = lse.data_ptr<float>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) std::tie(index_ptr[r], lse_ptr[r]) = argmax_lse_row(src + r * vocab, vocab);
  });
  return {index, lse};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sluice_cpu, m) { m.def("argmax_logsumexp(Tensor logits) -> (Tensor, Tensor)"); }

TORCH_LIBRARY_IMPL(sluice_cpu, CPU, m) { m.impl("argmax_logsumexp", &argmax_logsumexp); }
