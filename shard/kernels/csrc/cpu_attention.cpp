// Paged decode attention for the CPU, reading the KV cache in place (no gather, no padding).
//
// Built at run time by shard/kernels/cpu_native.py with the flags of the CPU's vector ISA
// (at::vec picks AVX-512, AVX2 or scalar code from CPU_CAPABILITY). Layouts match the torch
// reference (shard/kernels/reference.py):
//   query        [num_reqs, num_heads, head_dim], last dim contiguous
//   k/v cache    [num_blocks, block_size, num_kv_heads, head_dim], contiguous
//   block_tables [num_reqs, max_blocks] int32; context_lens [num_reqs] int32 (>= 1)
//
// A request attends to its positions [first, context_len): first = 0, or with a sliding window W
// max(0, context_len - W), so no block wholly before the window is read (nor its table entry).
// A work item is one request, or one span of those positions when there are fewer requests than
// threads can share (split-KV, merged afterwards by log-sum-exp). An item walks its positions
// through the block table once for K and once for V, each time reading whole cache rows (every
// kv head of a position is contiguous), so the memory access is sequential within a block:
//   1. scores[h][t] = q_h . k_t for every query head h (fp32), the query kept in registers/L1,
//      then soft-capped and given their ALiBi or position bias when the layer has those features;
//   2. per head, the softmax's max and sum over the item's positions;
//   3. acc[h] = sum_t p[h][t] * v_t, in fp32.
// Items are handed out dynamically: rows come sorted by length, so static chunks would give one
// thread all the long ones.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <omp.h>
#include <torch/library.h>

#include "cpu_kernels.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

using fVec = at::vec::Vectorized<float>;
constexpr int kLanes = fVec::size();
// Positions per split-KV span, at least. A single decoding request of 100-300 positions takes
// 0.7-0.8x the time split at 48 rather than 256 (2-core AVX2 EPYC, bf16 and fp32); shorter spans
// save nothing over their merge.
constexpr int64_t kMinSplit = 48;
constexpr int kPrefetchRows = 16;  // how far ahead the K/V rows are prefetched

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

inline void prefetch_row(const void* row, int64_t bytes) {
  const char* p = static_cast<const char*>(row);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off);
}

struct Problem {
  int64_t num_reqs, num_heads, num_kv_heads, group, head_dim, block_size, max_blocks;
  int64_t q_stride_req, q_stride_head;
  const int32_t* tables;
  const int32_t* lens;
  float scale;
  int64_t window;       // sliding window in positions, 0: none
  float softcap;        // > 0: scores soft-capped to +-softcap
  const float* slopes;  // [num_heads] ALiBi slopes, or nullptr
  const float* bias;    // [num_heads, bias_len] bias by distance, or nullptr
  int64_t bias_len;

  // The first position request `req` attends to.
  int64_t first(int64_t req) const { return window > 0 ? std::max<int64_t>(0, lens[req] - window) : 0; }
};

// Soft-cap, then ALiBi and the position bias, on head h's scores s[0 .. n) of positions begin .. begin + n, for the
// query at position q_pos.
inline void apply_features(const Problem& P, int64_t h, float* s, int64_t n, int64_t begin, int64_t q_pos) {
  if (P.softcap > 0.f) {
    const fVec cap(P.softcap), inv(1.f / P.softcap);
    int64_t t = 0;
    for (; t + kLanes <= n; t += kLanes) (cap * (fVec::loadu(s + t) * inv).tanh()).store(s + t);
    for (; t < n; ++t) s[t] = P.softcap * std::tanh(s[t] * (1.f / P.softcap));
  }
  if (P.slopes != nullptr) {
    const float slope = P.slopes[h];
    for (int64_t t = 0; t < n; ++t) s[t] += slope * static_cast<float>(begin + t - q_pos);
  }
  if (P.bias != nullptr) {
    const float* b = P.bias + h * P.bias_len;
    for (int64_t t = 0; t < n; ++t) s[t] += b[std::min(q_pos - begin - t, P.bias_len - 1)];
  }
}

// What one item leaves for the merge: per query head, the max score, the sum of exp(score -
// max) and the unnormalized output.
struct Partial {
  float* acc;  // [num_heads, head_dim]
  float* max;  // [num_heads]
  float* sum;  // [num_heads]
};

// head_dim == ND * kLanes: a K/V row of one head is ND vectors.
template <typename T, int ND>
void attend_span(const Problem& P, const T* q_ptr, const T* k_ptr, const T* v_ptr, int64_t req, int64_t begin,
                 int64_t end, std::vector<float>& scores, std::vector<fVec>& q, std::vector<fVec>& acc,
                 Partial out) {
  constexpr int64_t D = ND * kLanes;
  const int64_t H = P.num_heads, G = P.group, len = end - begin, row = P.num_kv_heads * D;
  const int32_t* table = P.tables + req * P.max_blocks;
  auto row_of = [&](int64_t t) { return (int64_t(table[t / P.block_size]) * P.block_size + t % P.block_size) * row; };
  scores.resize(H * len);
  q.resize(H * ND);
  acc.resize(H * ND);
  for (int64_t h = 0; h < H; ++h) {
    const T* src = q_ptr + req * P.q_stride_req + h * P.q_stride_head;
    for (int i = 0; i < ND; ++i) q[h * ND + i] = load_as_float<T>(src + i * kLanes) * fVec(P.scale);
  }
  for (int64_t t = begin; t < end; ++t) {
    if (t + kPrefetchRows < end) prefetch_row(k_ptr + row_of(t + kPrefetchRows), row * sizeof(T));
    const T* k_row = k_ptr + row_of(t);
    for (int64_t kv = 0; kv < P.num_kv_heads; ++kv) {
      fVec k[ND];
      for (int i = 0; i < ND; ++i) k[i] = load_as_float<T>(k_row + kv * D + i * kLanes);
      for (int64_t h = kv * G; h < (kv + 1) * G; ++h) {
        const fVec* qh = q.data() + h * ND;
        fVec s = qh[0] * k[0];
        for (int i = 1; i < ND; ++i) s = at::vec::fmadd(qh[i], k[i], s);
        scores[h * len + (t - begin)] = hsum(s);
      }
    }
  }
  const bool features = P.softcap > 0.f || P.slopes != nullptr || P.bias != nullptr;
  for (int64_t h = 0; h < H; ++h) {
    float* s = scores.data() + h * len;
    if (features) apply_features(P, h, s, len, begin, P.lens[req] - 1);
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
    out.max[h] = max;
    out.sum[h] = sum;
  }
  std::fill(acc.begin(), acc.end(), fVec(0.f));
  for (int64_t t = begin; t < end; ++t) {
    if (t + kPrefetchRows < end) prefetch_row(v_ptr + row_of(t + kPrefetchRows), row * sizeof(T));
    const T* v_row = v_ptr + row_of(t);
    for (int64_t kv = 0; kv < P.num_kv_heads; ++kv) {
      fVec v[ND];
      for (int i = 0; i < ND; ++i) v[i] = load_as_float<T>(v_row + kv * D + i * kLanes);
      for (int64_t h = kv * G; h < (kv + 1) * G; ++h) {
        const fVec p(scores[h * len + (t - begin)]);
        fVec* a = acc.data() + h * ND;
        for (int i = 0; i < ND; ++i) a[i] = at::vec::fmadd(p, v[i], a[i]);
      }
    }
  }
  for (int64_t h = 0; h < H; ++h)
    for (int i = 0; i < ND; ++i) acc[h * ND + i].store(out.acc + h * D + i * kLanes);
}

// Any head_dim: plain loops (the tiny test models' odd shapes), same partial results.
template <typename T>
void attend_span_scalar(const Problem& P, const T* q_ptr, const T* k_ptr, const T* v_ptr, int64_t req,
                        int64_t begin, int64_t end, std::vector<float>& scores, Partial out) {
  const int64_t H = P.num_heads, G = P.group, D = P.head_dim, len = end - begin, row = P.num_kv_heads * D;
  const int32_t* table = P.tables + req * P.max_blocks;
  auto row_of = [&](int64_t t) { return (int64_t(table[t / P.block_size]) * P.block_size + t % P.block_size) * row; };
  scores.resize(H * len);
  for (int64_t h = 0; h < H; ++h) {
    const T* q = q_ptr + req * P.q_stride_req + h * P.q_stride_head;
    float* s = scores.data() + h * len;
    for (int64_t t = begin; t < end; ++t) {
      const T* k = k_ptr + row_of(t) + (h / G) * D;
      float dot = 0.f;
      for (int64_t d = 0; d < D; ++d) dot += static_cast<float>(q[d]) * static_cast<float>(k[d]);
      s[t - begin] = dot * P.scale;
    }
    apply_features(P, h, s, len, begin, P.lens[req] - 1);
    float max = -INFINITY, sum = 0.f;
    for (int64_t t = 0; t < len; ++t) max = std::max(max, s[t]);
    float* acc = out.acc + h * D;
    std::fill(acc, acc + D, 0.f);
    for (int64_t t = begin; t < end; ++t) {
      const float p = std::exp(s[t - begin] - max);
      sum += p;
      const T* v = v_ptr + row_of(t) + (h / G) * D;
      for (int64_t d = 0; d < D; ++d) acc[d] += p * static_cast<float>(v[d]);
    }
    out.max[h] = max;
    out.sum[h] = sum;
  }
}

template <typename T, int ND>
void decode(at::Tensor& out, const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
            const Problem& P) {
  const int64_t H = P.num_heads, D = P.head_dim;
  const int threads = at::get_num_threads();
  // Split each request's positions into spans when requests alone cannot keep the threads busy.
  int64_t longest = 0;
  for (int64_t r = 0; r < P.num_reqs; ++r) longest = std::max<int64_t>(longest, P.lens[r] - P.first(r));
  const int64_t want = (2 * threads + P.num_reqs - 1) / P.num_reqs;
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>(want, longest / kMinSplit));
  const int64_t num_items = P.num_reqs * splits;
  std::vector<float> acc(num_items * H * D), max(num_items * H), sum(num_items * H);
  const T* q_ptr = query.const_data_ptr<T>();
  const T* k_ptr = k_cache.const_data_ptr<T>();
  const T* v_ptr = v_cache.const_data_ptr<T>();

#pragma omp parallel num_threads(threads)
  {
    std::vector<float> scores;
    std::vector<fVec> q, a;
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < num_items; ++item) {
      const int64_t req = item / splits, part = item % splits, len = P.lens[req], first = P.first(req);
      const int64_t span = (len - first + splits - 1) / splits;
      const int64_t begin = std::min(len, first + part * span), end = std::min(len, begin + span);
      Partial partial{acc.data() + item * H * D, max.data() + item * H, sum.data() + item * H};
      if (begin == end) {
        std::fill(partial.max, partial.max + H, -INFINITY);
        std::fill(partial.sum, partial.sum + H, 0.f);
        std::fill(partial.acc, partial.acc + H * D, 0.f);
      } else if constexpr (ND > 0) {
        attend_span<T, ND>(P, q_ptr, k_ptr, v_ptr, req, begin, end, scores, q, a, partial);
      } else {
        attend_span_scalar<T>(P, q_ptr, k_ptr, v_ptr, req, begin, end, scores, partial);
      }
    }
  }
  T* out_ptr = out.data_ptr<T>();
  at::parallel_for(0, P.num_reqs * H, 16, [&](int64_t lo, int64_t hi) {
    std::vector<float> o(D);
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t req = i / H, h = i % H;
      float m = -INFINITY;
      for (int64_t s = 0; s < splits; ++s) m = std::max(m, max[(req * splits + s) * H + h]);
      float total = 0.f;
      std::fill(o.begin(), o.end(), 0.f);
      for (int64_t s = 0; s < splits; ++s) {
        const int64_t item = req * splits + s;
        if (sum[item * H + h] == 0.f) continue;
        const float w = std::exp(max[item * H + h] - m);
        total += w * sum[item * H + h];
        const float* a = acc.data() + (item * H + h) * D;
        for (int64_t d = 0; d < D; ++d) o[d] += w * a[d];
      }
      T* dst = out_ptr + (req * H + h) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(o[d] / total);
    }
  });
}

template <typename T>
void decode_dispatch(at::Tensor& out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const Problem& P) {
  if (P.head_dim % kLanes == 0) {
    switch (P.head_dim / kLanes) {
      case 1: return decode<T, 1>(out, q, k, v, P);
      case 2: return decode<T, 2>(out, q, k, v, P);
      case 4: return decode<T, 4>(out, q, k, v, P);
      case 6: return decode<T, 6>(out, q, k, v, P);
      case 8: return decode<T, 8>(out, q, k, v, P);
      case 16: return decode<T, 16>(out, q, k, v, P);
      default: break;
    }
  }
  decode<T, 0>(out, q, k, v, P);
}

}  // namespace

namespace sluice {

at::Tensor contiguous_slopes(const std::optional<at::Tensor>& alibi_slopes, int64_t num_heads) {
  if (!alibi_slopes.has_value()) return at::Tensor();
  const at::Tensor& s = *alibi_slopes;
  TORCH_CHECK(s.scalar_type() == at::kFloat && s.dim() == 1 && s.size(0) == num_heads && s.device().is_cpu(),
              "alibi_slopes must be a float32 CPU tensor of one slope per query head");
  return s.contiguous();
}

at::Tensor contiguous_position_bias(const std::optional<at::Tensor>& position_bias, int64_t num_heads) {
  if (!position_bias.has_value()) return at::Tensor();
  const at::Tensor& b = *position_bias;
  TORCH_CHECK(b.scalar_type() == at::kFloat && b.dim() == 2 && b.size(0) == num_heads && b.size(1) >= 1 &&
                  b.device().is_cpu(),
              "position_bias must be a float32 CPU tensor [num_heads, max_distance + 1]");
  return b.contiguous();
}

at::Tensor paged_attention_decode(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                                  int64_t sliding_window, double softcap,
                                  const std::optional<at::Tensor>& alibi_slopes,
                                  const std::optional<at::Tensor>& position_bias) {
  TORCH_CHECK(query.dim() == 3 && query.stride(2) == 1, "query must be [num_reqs, num_heads, head_dim]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "the KV cache must be contiguous");
  TORCH_CHECK(k_cache.scalar_type() == query.scalar_type() && v_cache.scalar_type() == query.scalar_type(),
              "query and KV cache dtypes differ");
  TORCH_CHECK(k_cache.size(3) == query.size(2) && query.size(1) % k_cache.size(2) == 0, "head shapes do not match");
  TORCH_CHECK(sliding_window >= 0, "sliding_window must be >= 0 (0: none)");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt,
              "block_tables and context_lens must be int32");
  auto out = at::empty(query.sizes(), query.options());
  if (query.size(0) == 0) return out;
  const auto tables = block_tables.contiguous();
  const auto lens = context_lens.contiguous();
  const auto slopes = contiguous_slopes(alibi_slopes, query.size(1));
  const auto bias = contiguous_position_bias(position_bias, query.size(1));
  const Problem P{query.size(0),  query.size(1),   k_cache.size(2),
                  query.size(1) / k_cache.size(2), query.size(2),
                  k_cache.size(1), tables.size(1), query.stride(0),
                  query.stride(1), tables.const_data_ptr<int32_t>(),
                  lens.const_data_ptr<int32_t>(),  static_cast<float>(scale),
                  sliding_window,                  static_cast<float>(softcap),
                  slopes.defined() ? slopes.const_data_ptr<float>() : nullptr,
                  bias.defined() ? bias.const_data_ptr<float>() : nullptr,
                  bias.defined() ? bias.size(1) : 0};
  switch (query.scalar_type()) {
    case at::kFloat: decode_dispatch<float>(out, query, k_cache, v_cache, P); break;
    case at::kBFloat16: decode_dispatch<c10::BFloat16>(out, query, k_cache, v_cache, P); break;
    case at::kHalf: decode_dispatch<c10::Half>(out, query, k_cache, v_cache, P); break;
    default: TORCH_CHECK(false, "unsupported dtype ", query.scalar_type());
  }
  return out;
}

}  // namespace sluice

TORCH_LIBRARY(sluice_cpu, m) {
  m.def(
      "paged_attention_decode(Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor context_lens, float scale, int sliding_window=0, float softcap=0.0, Tensor? alibi_slopes=None, "
      "Tensor? position_bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(sluice_cpu, CPU, m) { m.impl("paged_attention_decode", &sluice::paged_attention_decode); }
