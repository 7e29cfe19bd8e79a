// Prefill / extend attention for the CPU over the paged KV cache, read in place, and the KV store.
//
// Layouts as in shard/kernels/reference.py:
//   query         [num_tokens, num_heads, head_dim], last dim contiguous (the step's prompt rows)
//   k/v cache     [num_blocks, block_size, num_kv_heads, head_dim], contiguous
//   cu_seqlens_q  [num_reqs + 1] int32: request r owns query rows cu[r] .. cu[r + 1]
//   context_lens  [num_reqs] int32: cached prefix + this step's tokens
//   block_tables  [num_reqs, max_blocks] int32
// Query row j of a request with q_len rows sits at position context_len - q_len + j and attends
// to positions 0 .. that position (causal over the new tokens, full over the cached prefix).
//
// Flash-attention style, in fp32: a work item is (request, kv head, block of kQBlock query
// tokens), i.e. M = kQBlock * group rows sharing one kv head. It walks the keys in blocks of
// kKBlock positions up to its last row's position: converts the K rows to fp32 transposed
// (K^T [D, kKBlock]) so that scores are broadcast-FMAs with no horizontal sums, keeps a running
// max and sum per row (online softmax), and accumulates P V into fp32 rows. Items are handed out
// dynamically: causal items differ in cost.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <omp.h>
#include <torch/library.h>

#include "cpu_kernels.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

using fVec = at::vec::Vectorized<float>;
constexpr int kLanes = fVec::size();
constexpr int kQBlock = 16;               // query tokens per work item
constexpr int kKBlock = 4 * kLanes;       // key positions per inner block (64 on AVX-512)
constexpr int kKVecs = kKBlock / kLanes;  // vectors per row of a score block

// 0, 1, ..., kLanes - 1, for masking lanes by position
const float* lane_index_data() {
  static const auto data = [] {
    std::array<float, kLanes> a{};
    for (int i = 0; i < kLanes; ++i) a[i] = float(i);
    return a;
  }();
  return data.data();
}

template <typename T>
inline float to_float(T x) {
  return static_cast<float>(x);
}

struct ExtendProblem {
  int64_t num_heads, num_kv_heads, group, head_dim, block_size, max_blocks;
  int64_t q_stride_tok, q_stride_head;
  const int32_t* cu;
  const int32_t* lens;
  const int32_t* tables;
  float scale;
};

template <typename T>
void extend_item(const ExtendProblem& P, const T* q_ptr, const T* k_ptr, const T* v_ptr, T* out_ptr, int64_t req,
                 int64_t kv_head, int64_t q_begin, int64_t q_end, std::vector<float>& buf) {
  const int64_t D = P.head_dim, G = P.group, row = P.num_kv_heads * D;
  const int64_t q_len_req = P.cu[req + 1] - P.cu[req], ctx = P.lens[req];
  const int64_t first_pos = ctx - q_len_req;  // position of the request's first query row
  const int64_t nq = q_end - q_begin, M = nq * G;
  const int32_t* table = P.tables + req * P.max_blocks;
  // scratch: Q [M, D], O [M, D], KT [D, kKBlock], V [kKBlock, D], S [M, kKBlock], m [M], l [M]
  buf.resize(2 * M * D + 2 * D * kKBlock + M * kKBlock + 2 * M);
  float* Q = buf.data();
  float* O = Q + M * D;
  float* KT = O + M * D;
  float* V = KT + D * kKBlock;
  float* S = V + kKBlock * D;
  float* m = S + M * kKBlock;
  float* l = m + M;
  // Row r = token (r / G), head kv_head * G + r % G.
  for (int64_t r = 0; r < M; ++r) {
    const T* src = q_ptr + (P.cu[req] + q_begin + r / G) * P.q_stride_tok + (kv_head * G + r % G) * P.q_stride_head;
    for (int64_t d = 0; d < D; ++d) Q[r * D + d] = to_float(src[d]) * P.scale;
    m[r] = -INFINITY;
    l[r] = 0.f;
  }
  std::fill(O, O + M * D, 0.f);
  const int64_t last_pos = first_pos + q_end - 1;  // the item's keys end here
  for (int64_t k0 = 0; k0 <= last_pos; k0 += kKBlock) {
    const int64_t nk = std::min<int64_t>(kKBlock, last_pos + 1 - k0);
    // K^T and V of positions k0 .. k0 + nk, padded with zeros to kKBlock
    for (int64_t t = 0; t < kKBlock; ++t) {
      if (t < nk) {
        const int64_t p = k0 + t;
        const int64_t slot = (int64_t(table[p / P.block_size]) * P.block_size + p % P.block_size) * row + kv_head * D;
        const T* kr = k_ptr + slot;
        const T* vr = v_ptr + slot;
        for (int64_t d = 0; d < D; ++d) {
          KT[d * kKBlock + t] = to_float(kr[d]);
          V[t * D + d] = to_float(vr[d]);
        }
      } else {
        for (int64_t d = 0; d < D; ++d) {
          KT[d * kKBlock + t] = 0.f;
          V[t * D + d] = 0.f;
        }
      }
    }
    // S = Q K^T, four rows at a time
    int64_t r = 0;
    for (; r + 4 <= M; r += 4) {
      fVec acc[4][kKVecs];
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < kKVecs; ++j) acc[i][j] = fVec(0.f);
      for (int64_t d = 0; d < D; ++d) {
        fVec kt[kKVecs];
        for (int j = 0; j < kKVecs; ++j) kt[j] = fVec::loadu(KT + d * kKBlock + j * kLanes);
        for (int i = 0; i < 4; ++i) {
          const fVec qv(Q[(r + i) * D + d]);
          for (int j = 0; j < kKVecs; ++j) acc[i][j] = at::vec::fmadd(qv, kt[j], acc[i][j]);
        }
      }
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < kKVecs; ++j) acc[i][j].store(S + (r + i) * kKBlock + j * kLanes);
    }
    for (; r < M; ++r) {
      fVec acc[kKVecs];
      for (int j = 0; j < kKVecs; ++j) acc[j] = fVec(0.f);
      for (int64_t d = 0; d < D; ++d) {
        const fVec qv(Q[r * D + d]);
        for (int j = 0; j < kKVecs; ++j) acc[j] = at::vec::fmadd(qv, fVec::loadu(KT + d * kKBlock + j * kLanes), acc[j]);
      }
      for (int j = 0; j < kKVecs; ++j) acc[j].store(S + r * kKBlock + j * kLanes);
    }
    // mask (past each row's position, and the padding), online softmax; vectorized, 4 x 16 keys a row
    for (r = 0; r < M; ++r) {
      float* s = S + r * kKBlock;
      const int64_t pos = first_pos + q_begin + r / G;
      const int64_t visible = std::min<int64_t>(nk, pos - k0 + 1);
      if (visible <= 0) {  // an earlier row of the item: this block is past it
        std::fill(s, s + kKBlock, 0.f);
        continue;
      }
      fVec sv[kKVecs];
      fVec vmax(-INFINITY);
      for (int j = 0; j < kKVecs; ++j) {
        const auto keep = fVec::loadu(lane_index_data()) + fVec(float(j * kLanes)) < fVec(float(visible));
        sv[j] = fVec::blendv(fVec(-INFINITY), fVec::loadu(s + j * kLanes), keep);
        vmax = at::vec::maximum(vmax, sv[j]);
      }
      const float block_max = at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return at::vec::maximum(a, b); }, vmax);
      const float new_max = std::max(m[r], block_max);
      const float rescale = std::exp(m[r] - new_max);  // 0 on the first block (m = -inf)
      fVec vsum(0.f);
      for (int j = 0; j < kKVecs; ++j) {
        const auto keep = fVec::loadu(lane_index_data()) + fVec(float(j * kLanes)) < fVec(float(visible));
        const fVec p = fVec::blendv(fVec(0.f), (sv[j] - fVec(new_max)).exp_u20(), keep);
        p.store(s + j * kLanes);
        vsum = vsum + p;
      }
      l[r] = l[r] * rescale + at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return a + b; }, vsum);
      m[r] = new_max;
      if (rescale != 1.f) {
        for (int64_t d = 0; d < D; ++d) O[r * D + d] *= rescale;
      }
    }
    // O += P V, four rows at a time over D in vectors (D a multiple of kLanes) or scalars
    if (D % kLanes == 0) {
      const int64_t nd = D / kLanes;
      for (r = 0; r < M; ++r) {
        float* o = O + r * D;
        const float* p = S + r * kKBlock;
        for (int64_t dv = 0; dv < nd; dv += 4) {
          const int64_t w = std::min<int64_t>(4, nd - dv);
          fVec acc[4];
          for (int j = 0; j < w; ++j) acc[j] = fVec::loadu(o + (dv + j) * kLanes);
          for (int64_t t = 0; t < nk; ++t) {
            const fVec pv(p[t]);
            for (int j = 0; j < w; ++j) acc[j] = at::vec::fmadd(pv, fVec::loadu(V + t * D + (dv + j) * kLanes), acc[j]);
          }
          for (int j = 0; j < w; ++j) acc[j].store(o + (dv + j) * kLanes);
        }
      }
    } else {
      for (r = 0; r < M; ++r)
        for (int64_t t = 0; t < nk; ++t) {
          const float p = S[r * kKBlock + t];
          for (int64_t d = 0; d < D; ++d) O[r * D + d] += p * V[t * D + d];
        }
    }
  }
  for (int64_t r = 0; r < M; ++r) {
    T* dst = out_ptr + (P.cu[req] + q_begin + r / G) * P.num_heads * D + (kv_head * G + r % G) * D;
    const float inv = 1.f / l[r];
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(O[r * D + d] * inv);
  }
}

template <typename T>
void extend(at::Tensor& out, const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
            const ExtendProblem& P, int64_t num_reqs) {
  // work items: (request, kv head, query block)
  std::vector<int64_t> item_req, item_block;
  for (int64_t r = 0; r < num_reqs; ++r) {
    const int64_t q_len = P.cu[r + 1] - P.cu[r];
    for (int64_t b = 0; b * kQBlock < q_len; ++b) {
      item_req.push_back(r);
      item_block.push_back(b);
    }
  }
  const int64_t num_items = static_cast<int64_t>(item_req.size()) * P.num_kv_heads;
  const T* q_ptr = query.const_data_ptr<T>();
  const T* k_ptr = k_cache.const_data_ptr<T>();
  const T* v_ptr = v_cache.const_data_ptr<T>();
  T* out_ptr = out.data_ptr<T>();
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<float> buf;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = num_items - 1; i >= 0; --i) {  // the last query blocks (the longest) first
      const int64_t it = i / P.num_kv_heads, kv_head = i % P.num_kv_heads;
      const int64_t req = item_req[it], q_len = P.cu[req + 1] - P.cu[req];
      const int64_t q_begin = item_block[it] * kQBlock, q_end = std::min<int64_t>(q_len, q_begin + kQBlock);
      extend_item<T>(P, q_ptr, k_ptr, v_ptr, out_ptr, req, kv_head, q_begin, q_end, buf);
    }
  }
}

}  // namespace

namespace sluice {

at::Tensor paged_attention_extend(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& cu_seqlens_q, const at::Tensor& context_lens,
                                  const at::Tensor& block_tables, double scale) {
  TORCH_CHECK(query.dim() == 3 && query.stride(2) == 1, "query must be [num_tokens, num_heads, head_dim]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "the KV cache must be contiguous");
  TORCH_CHECK(k_cache.scalar_type() == query.scalar_type() && v_cache.scalar_type() == query.scalar_type(),
              "query and KV cache dtypes differ");
  TORCH_CHECK(k_cache.size(3) == query.size(2) && query.size(1) % k_cache.size(2) == 0, "head shapes do not match");
  TORCH_CHECK(cu_seqlens_q.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt &&
                  block_tables.scalar_type() == at::kInt,
              "cu_seqlens_q, context_lens and block_tables must be int32");
  auto out = at::empty(query.sizes(), query.options());
  const int64_t num_reqs = context_lens.size(0);
  if (query.size(0) == 0 || num_reqs == 0) return out;
  const auto cu = cu_seqlens_q.contiguous();
  const auto lens = context_lens.contiguous();
  const auto tables = block_tables.contiguous();
  const ExtendProblem P{query.size(1),
                        k_cache.size(2),
                        query.size(1) / k_cache.size(2),
                        query.size(2),
                        k_cache.size(1),
                        tables.size(1),
                        query.stride(0),
                        query.stride(1),
                        cu.const_data_ptr<int32_t>(),
                        lens.const_data_ptr<int32_t>(),
                        tables.const_data_ptr<int32_t>(),
                        static_cast<float>(scale)};
  switch (query.scalar_type()) {
    case at::kFloat: extend<float>(out, query, k_cache, v_cache, P, num_reqs); break;
    case at::kBFloat16: extend<c10::BFloat16>(out, query, k_cache, v_cache, P, num_reqs); break;
    case at::kHalf: extend<c10::Half>(out, query, k_cache, v_cache, P, num_reqs); break;
    default: TORCH_CHECK(false, "unsupported dtype ", query.scalar_type());
  }
  return out;
}

// Each token's K and V rows into its slot (slot < 0: padding, skipped).
void store_kv(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache, at::Tensor& v_cache,
              const at::Tensor& slot_mapping) {
  TORCH_CHECK(key.dim() == 3 && key.stride(2) == 1 && value.stride(2) == 1, "key/value must be [tokens, heads, dim]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "the KV cache must be contiguous");
  TORCH_CHECK(key.scalar_type() == k_cache.scalar_type() && value.scalar_type() == v_cache.scalar_type(),
              "key/value and KV cache dtypes differ");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong, "slot_mapping must be int64");
  const auto slots = slot_mapping.contiguous();
  const int64_t num_tokens = key.size(0), heads = key.size(1), dim = key.size(2);
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  const int64_t bytes = dim * key.element_size(), row_bytes = heads * bytes;
  const char* k_src = static_cast<const char*>(key.const_data_ptr());
  const char* v_src = static_cast<const char*>(value.const_data_ptr());
  char* k_dst = static_cast<char*>(k_cache.data_ptr());
  char* v_dst = static_cast<char*>(v_cache.data_ptr());
  const int64_t* slot = slots.const_data_ptr<int64_t>();
  const int64_t ks0 = key.stride(0) * key.element_size(), ks1 = key.stride(1) * key.element_size();
  const int64_t vs0 = value.stride(0) * value.element_size(), vs1 = value.stride(1) * value.element_size();
  for (int64_t t = 0; t < num_tokens; ++t) TORCH_CHECK(slot[t] < num_slots, "slot ", slot[t], " is outside the cache");
  at::parallel_for(0, num_tokens, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t s = slot[t];
      if (s < 0) continue;
      for (int64_t h = 0; h < heads; ++h) {
        std::memcpy(k_dst + s * row_bytes + h * bytes, k_src + t * ks0 + h * ks1, bytes);
        std::memcpy(v_dst + s * row_bytes + h * bytes, v_src + t * vs0 + h * vs1, bytes);
      }
    }
  });
}

}  // namespace sluice

TORCH_LIBRARY_FRAGMENT(sluice_cpu, m) {
  m.def(
      "paged_attention_extend(Tensor query, Tensor k_cache, Tensor v_cache, Tensor cu_seqlens_q, "
      "Tensor context_lens, Tensor block_tables, float scale) -> Tensor");
  m.def("store_kv(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()");
}

TORCH_LIBRARY_IMPL(sluice_cpu, CPU, m) {
  m.impl("paged_attention_extend", &sluice::paged_attention_extend);
  m.impl("store_kv", &sluice::store_kv);
}
