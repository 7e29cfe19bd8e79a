// Greedy sampling's reductions over the vocabulary in one call: the argmax and the log-sum-exp
// (for the chosen token's log-probability), instead of torch's separate argmax, amax, subtract,
// exp, sum and log passes over [rows, vocab] fp32 logits.

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

// One row's argmax (its first maximum; NaN counts as the maximum, as in torch.argmax) and
// log-sum-exp (-inf entries, masked tokens, add nothing), in two passes over the row, the second
// from cache: the max, then the sum of exp(x - max). One exp per element, against two for an
// online log-sum-exp that rescales its running sum at every new maximum.
std::pair<int64_t, float> argmax_lse_row(const float* x, int64_t n) {
  const fVec neg_inf(-INFINITY), zero(0.f);
  fVec vmax(neg_inf);  // at::vec::maximum propagates NaN
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) vmax = at::vec::maximum(vmax, fVec::loadu(x + i));
  float lanes[kLanes];
  vmax.store(lanes);
  const auto fold = [](float a, float b) { return std::isnan(a) || std::isnan(b) ? NAN : std::max(a, b); };
  float max = -INFINITY;
  for (int l = 0; l < kLanes; ++l) max = fold(max, lanes[l]);
  for (; i < n; ++i) max = fold(max, x[i]);
  int64_t index = 0;
  if (std::isnan(max)) {
    while (!std::isnan(x[index])) ++index;
    return {index, max};
  }
  // The first lane equal to the max: zero_mask() marks the lanes where x != max.
  const fVec target(max);
  for (; index + kLanes <= n; index += kLanes) {
    const int unequal = (fVec::loadu(x + index) == target).zero_mask();
    if (unequal != (1 << kLanes) - 1) {
      index += __builtin_ctz(~unequal);
      break;
    }
  }
  while (x[index] != max) ++index;
  if (std::isinf(max)) return {index, max};  // every entry masked (-inf), or an infinite logit (+inf)
  fVec vsum(zero);
  for (i = 0; i + kLanes <= n; i += kLanes) {
    const fVec v = fVec::loadu(x + i);
    vsum = vsum + fVec::blendv((v - target).exp_u20(), zero, v == neg_inf);
  }
  vsum.store(lanes);
  float sum = 0.f;
  for (int l = 0; l < kLanes; ++l) sum += lanes[l];
  for (; i < n; ++i) sum += std::exp(x[i] - max);
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
