// What the packed-weight kernels (cpu_int8.cpp, cpu_dense_avx2.cpp) share: the registry that names
// a packed weight by an integer handle (a compiled graph calls an op with a constant int, as it
// cannot take an opaque object), and how rows are cut into register tiles.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

namespace sluice {

template <typename T>
class PackedRegistry {
 public:
  explicit PackedRegistry(const char* what) : what_(what) {}

  int64_t add(std::shared_ptr<const T> packed) {
    std::lock_guard<std::mutex> lock(mutex_);
    slots_.push_back(std::move(packed));
    return static_cast<int64_t>(slots_.size()) - 1;
  }

  void release(int64_t handle) {
    std::lock_guard<std::mutex> lock(mutex_);
    check(handle);
    slots_[handle] = nullptr;
  }

  std::shared_ptr<const T> get(int64_t handle) {
    std::lock_guard<std::mutex> lock(mutex_);
    check(handle);
    TORCH_CHECK(slots_[handle], what_, " ", handle, " was released");
    return slots_[handle];
  }

 private:
  void check(int64_t handle) const {
    TORCH_CHECK(handle >= 0 && handle < static_cast<int64_t>(slots_.size()), "no ", what_, " ", handle);
  }

  const char* what_;
  std::mutex mutex_;
  std::deque<std::shared_ptr<const T>> slots_;  // released slots hold nullptr
};

// A linear's output shape: x's [..., K] with its last dimension n.
inline std::vector<int64_t> linear_out_shape(const at::Tensor& x, int64_t n) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  return shape;
}

// A linear's bias [n] as contiguous float32, or an undefined tensor without one.
inline at::Tensor float_bias(const std::optional<at::Tensor>& bias, int64_t n) {
  if (!bias.has_value() || !bias->defined()) return at::Tensor();
  TORCH_CHECK(bias->numel() == n, "bias must have ", n, " elements");
  return bias->to(at::kFloat).contiguous();
}

// Rows in as few tiles of at most MaxMR as possible, of near-equal heights (8 rows with MaxMR 6:
// 4 + 4, not 6 + 2: a short tile reloads the weights for few multiply-adds). tile(m0, mr).
template <int MaxMR, typename F>
void for_each_tile(int64_t rows, const F& tile) {
  const int64_t tiles = (rows + MaxMR - 1) / MaxMR, base = rows / tiles, taller = rows % tiles;
  for (int64_t t = 0, m0 = 0; t < tiles; ++t) {
    const int mr = static_cast<int>(base + (t < taller));
    tile(m0, mr);
    m0 += mr;
  }
}

}  // namespace sluice
