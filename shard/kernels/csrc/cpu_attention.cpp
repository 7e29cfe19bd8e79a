// Paged decode attention for the CPU, reading the KV cache in place (no gather, no padding).
//
// Built at run time by shard/kernels/cpu_native.py with the flags of the CPU's vector ISA
// (at::vec picks AVX-512, AVX2 or scalar code from CPU_CAPABILITY). Layouts match the torch
// reference (shard/kernels/reference.py):
//   query        [num_reqs, num_heads, head_dim], last dim contiguous
//   k/v cache    [num_blocks, block_size, num_kv_heads, head_dim], contiguous
//   block_tables [num_reqs, max_blocks] int32; context_lens [num_reqs] int32 (>= 1)
// One work item is a (request, kv head) pair: it loads the group of query heads sharing that
// kv head once, streams the request's K rows through the block table to get every score,
// takes the softmax in fp32, then streams the V rows into fp32 accumulators.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace {

using fVec = at::vec::Vectorized<float>;
constexpr int kLanes = fVec::size();
constexpr int kMaxGroup = 16;  // query heads per kv head handled by the vector path

template <typename T>
inline fVec load_as_float(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return fVec::loadu(p);
  } else {
    fVec out;
    at::vec::load_to_float<T>(p, out);
    return out;
  }
}

inline float hsum(const fVec& v) {
  return at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return a + b; }, v);
}

// Softmax of each of the `group` rows of `scores` ([group, len], in place); returns 1 / sum per row.
inline void softmax_rows(float* scores, int64_t group, int64_t len, float* inv_sum) {
  for (int64_t g = 0; g < group; ++g) {
    float* s = scores + g * len;
    float max = -INFINITY;
    for (int64_t t = 0; t < len; ++t) max = std::max(max, s[t]);
    const fVec vmax(max);
    fVec vsum(0.f);
    int64_t t = 0;
    for (; t + kLanes <= len; t += kLanes) {
      fVec e = (fVec::loadu(s + t) - vmax).exp_u20();
      e.store(s + t);
      vsum = vsum + e;
    }
    float sum = hsum(vsum);
    for (; t < len; ++t) {
      s[t] = std::exp(s[t] - max);
      sum += s[t];
    }
    inv_sum[g] = 1.f / sum;
  }
}

// head_dim == ND * kLanes: the query group and one K/V row at a time live in registers.
template <typename T, int ND>
void decode_vectorized(at::Tensor& out, const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const at::Tensor& block_tables, const at::Tensor& context_lens, float scale) {
  constexpr int64_t D = ND * kLanes;
  const int64_t num_reqs = query.size(0), num_heads = query.size(1);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  const int64_t group = num_heads / num_kv_heads, max_blocks = block_tables.size(1);
  const int64_t q_stride_req = query.stride(0), q_stride_head = query.stride(1), row = num_kv_heads * D;
  const T* q_ptr = query.const_data_ptr<T>();
  const T* k_ptr = k_cache.const_data_ptr<T>();
  const T* v_ptr = v_cache.const_data_ptr<T>();
  const int32_t* tables = block_tables.const_data_ptr<int32_t>();
  const int32_t* lens = context_lens.const_data_ptr<int32_t>();
  T* out_ptr = out.data_ptr<T>();

  at::parallel_for(0, num_reqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    fVec q[kMaxGroup][ND], acc[kMaxGroup][ND];
    float inv_sum[kMaxGroup], tail[D];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t req = item / num_kv_heads, kv_head = item % num_kv_heads, len = lens[req];
      const int32_t* table = tables + req * max_blocks;
      scores.resize(group * len);
      for (int64_t g = 0; g < group; ++g) {
        const T* src = q_ptr + req * q_stride_req + (kv_head * group + g) * q_stride_head;
        for (int i = 0; i < ND; ++i) q[g][i] = load_as_float<T>(src + i * kLanes) * fVec(scale);
      }
      for (int64_t t = 0; t < len; ++t) {
        const T* k_row = k_ptr + (int64_t(table[t / block_size]) * block_size + t % block_size) * row + kv_head * D;
        fVec k[ND];
        for (int i = 0; i < ND; ++i) k[i] = load_as_float<T>(k_row + i * kLanes);
        for (int64_t g = 0; g < group; ++g) {
          fVec s = q[g][0] * k[0];
          for (int i = 1; i < ND; ++i) s = at::vec::fmadd(q[g][i], k[i], s);
          scores[g * len + t] = hsum(s);
        }
      }
      softmax_rows(scores.data(), group, len, inv_sum);
      for (int64_t g = 0; g < group; ++g)
        for (int i = 0; i < ND; ++i) acc[g][i] = fVec(0.f);
      for (int64_t t = 0; t < len; ++t) {
        const T* v_row = v_ptr + (int64_t(table[t / block_size]) * block_size + t % block_size) * row + kv_head * D;
        fVec v[ND];
        for (int i = 0; i < ND; ++i) v[i] = load_as_float<T>(v_row + i * kLanes);
        for (int64_t g = 0; g < group; ++g) {
          const fVec p(scores[g * len + t]);
          for (int i = 0; i < ND; ++i) acc[g][i] = at::vec::fmadd(p, v[i], acc[g][i]);
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        T* dst = out_ptr + (req * num_heads + kv_head * group + g) * D;
        for (int i = 0; i < ND; ++i) (acc[g][i] * fVec(inv_sum[g])).store(tail + i * kLanes);
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(tail[d]);
      }
    }
  });
}

// Any head_dim and group size: plain loops (the tiny test models' odd shapes).
template <typename T>
void decode_scalar(at::Tensor& out, const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& block_tables, const at::Tensor& context_lens, float scale) {
  const int64_t num_reqs = query.size(0), num_heads = query.size(1), D = query.size(2);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  const int64_t group = num_heads / num_kv_heads, max_blocks = block_tables.size(1), row = num_kv_heads * D;
  const T* q_ptr = query.const_data_ptr<T>();
  const T* k_ptr = k_cache.const_data_ptr<T>();
  const T* v_ptr = v_cache.const_data_ptr<T>();
  const int32_t* tables = block_tables.const_data_ptr<int32_t>();
  const int32_t* lens = context_lens.const_data_ptr<int32_t>();
  T* out_ptr = out.data_ptr<T>();

  at::parallel_for(0, num_reqs * num_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, acc(D);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t req = item / num_heads, head = item % num_heads, kv_head = head / group, len = lens[req];
      const int32_t* table = tables + req * max_blocks;
      const T* q = q_ptr + req * query.stride(0) + head * query.stride(1);
      scores.resize(len);
      for (int64_t t = 0; t < len; ++t) {
        const T* k = k_ptr + (int64_t(table[t / block_size]) * block_size + t % block_size) * row + kv_head * D;
        float s = 0.f;
        for (int64_t d = 0; d < D; ++d) s += static_cast<float>(q[d]) * static_cast<float>(k[d]);
        scores[t] = s * scale;
      }
      float inv_sum;
      softmax_rows(scores.data(), 1, len, &inv_sum);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < len; ++t) {
        const T* v = v_ptr + (int64_t(table[t / block_size]) * block_size + t % block_size) * row + kv_head * D;
        for (int64_t d = 0; d < D; ++d) acc[d] += scores[t] * static_cast<float>(v[d]);
      }
      T* dst = out_ptr + (req * num_heads + head) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(acc[d] * inv_sum);
    }
  });
}

template <typename T>
void decode_dispatch(at::Tensor& out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& tables, const at::Tensor& lens, float scale) {
  const int64_t D = q.size(2), group = q.size(1) / k.size(2);
  if (group <= kMaxGroup && D % kLanes == 0) {
    switch (D / kLanes) {
      case 1: return decode_vectorized<T, 1>(out, q, k, v, tables, lens, scale);
      case 2: return decode_vectorized<T, 2>(out, q, k, v, tables, lens, scale);
      case 4: return decode_vectorized<T, 4>(out, q, k, v, tables, lens, scale);
      case 6: return decode_vectorized<T, 6>(out, q, k, v, tables, lens, scale);
      case 8: return decode_vectorized<T, 8>(out, q, k, v, tables, lens, scale);
      case 16: return decode_vectorized<T, 16>(out, q, k, v, tables, lens, scale);
      default: break;
    }
  }
  decode_scalar<T>(out, q, k, v, tables, lens, scale);
}

at::Tensor paged_attention_decode(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale) {
  TORCH_CHECK(query.dim() == 3 && query.stride(2) == 1, "query must be [num_reqs, num_heads, head_dim]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "the KV cache must be contiguous");
  TORCH_CHECK(k_cache.scalar_type() == query.scalar_type() && v_cache.scalar_type() == query.scalar_type(),
              "query and KV cache dtypes differ");
  TORCH_CHECK(k_cache.size(3) == query.size(2) && query.size(1) % k_cache.size(2) == 0, "head shapes do not match");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt,
              "block_tables and context_lens must be int32");
  const auto tables = block_tables.contiguous();
  const auto lens = context_lens.contiguous();
  auto out = at::empty(query.sizes(), query.options());
  const float s = static_cast<float>(scale);
  switch (query.scalar_type()) {
    case at::kFloat: decode_dispatch<float>(out, query, k_cache, v_cache, tables, lens, s); break;
    case at::kBFloat16: decode_dispatch<c10::BFloat16>(out, query, k_cache, v_cache, tables, lens, s); break;
    case at::kHalf: decode_dispatch<c10::Half>(out, query, k_cache, v_cache, tables, lens, s); break;
    default: TORCH_CHECK(false, "unsupported dtype ", query.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(sluice_cpu, m) {
  m.def(
      "paged_attention_decode(Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor context_lens, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(sluice_cpu, CPU, m) { m.impl("paged_attention_decode", &paged_attention_decode); }
