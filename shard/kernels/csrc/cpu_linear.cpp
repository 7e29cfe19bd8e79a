// Linear layers with oneDNN-packed weights, named by an integer handle.
//
// A packed weight is an opaque oneDNN tensor, which a compiled graph cannot take as an input, so
// the graph calls packed_linear(x, handle, ...) and the weight stays here. The matmul is
// PyTorch's own mkldnn::_linear_pointwise (what Inductor emits for frozen CPU linears); being a
// C++ op, a compiled forward reaches it without going through Python.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

#include <deque>
#include <mutex>
#include <optional>
#include <string>

namespace {

std::mutex registry_mutex;
std::deque<at::Tensor> registry;  // handle -> packed weight; released slots hold undefined tensors

c10::OperatorHandle op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

int64_t pack_linear_weight(const at::Tensor& weight) {
  static const auto reorder = op("mkldnn::_reorder_linear_weight");
  torch::jit::Stack stack{weight.contiguous(), c10::IValue()};
  reorder.callBoxed(&stack);
  std::lock_guard<std::mutex> lock(registry_mutex);
  registry.push_back(stack[0].toTensor());
  return static_cast<int64_t>(registry.size()) - 1;
}

void release_linear_weight(int64_t handle) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  TORCH_CHECK(handle >= 0 && handle < static_cast<int64_t>(registry.size()), "no packed weight ", handle);
  registry[handle] = at::Tensor();
}

at::Tensor packed_linear(const at::Tensor& x, int64_t handle, int64_t out_features,
                         const std::optional<at::Tensor>& bias) {
  static const auto linear = op("mkldnn::_linear_pointwise");
  at::Tensor weight;
  {
    std::lock_guard<std::mutex> lock(registry_mutex);
    TORCH_CHECK(handle >= 0 && handle < static_cast<int64_t>(registry.size()), "no packed weight ", handle);
    weight = registry[handle];
  }
  TORCH_CHECK(weight.defined(), "packed weight ", handle, " was released");
  torch::jit::Stack stack{x, weight, bias, std::string("none"), c10::List<std::optional<at::Scalar>>(),
                          std::optional<std::string>("")};
  linear.callBoxed(&stack);
  return stack[0].toTensor();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sluice_cpu, m) {
  m.def("pack_linear_weight(Tensor weight) -> int", &pack_linear_weight);
  m.def("release_linear_weight(int handle) -> ()", &release_linear_weight);
  m.def("packed_linear(Tensor x, int handle, int out_features, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(sluice_cpu, CPU, m) { m.impl("packed_linear", &packed_linear); }
