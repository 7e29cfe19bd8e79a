// Prefill / extend attention for the CPU over the paged KV cache, read in place, and the KV store.
//
// Layouts as in shard/kernels/reference.py:
//   query         [num_tokens, num_heads, head_dim], last dim contiguous (the step's prompt rows)
//   k/v cache     [num_blocks, block_size, num_kv_heads, head_dim], contiguous
//   cu_seqlens_q  [num_reqs + 1] int32: request r owns query rows cu[r] .. cu[r + 1]
//   context_lens  [num_reqs] int32: cached prefix + this step's tokens
//   block_tables  [num_reqs, max_blocks] int32
// Query row j of a request with q_len rows sits at position context_len - q_len + j and attends
// to positions 0 .. that position (causal over the new tokens, full over the cached prefix); with
// a sliding window W only to its last W positions. Scores may be soft-capped and given ALiBi or
// position biases (cpu_kernels.h).
//
// Flash-attention style, in fp32: a work item is (request, kv head, block of kQBlock query
// tokens), i.e. M = kQBlock * group rows sharing one kv head, padded to whole vectors. It walks
// the keys in blocks of kKBlock positions, from its first row's first visible position (0, or the
// start of that row's window: blocks wholly before it are never read) up to its last row's
// position, with online softmax.
// Everything is laid out transposed, rows in vector lanes: Q^T [D, M], scores S^T [keys, M] and
// the output O^T [D, M]. Then Q K^T and P V are broadcast-FMAs of one K or V element against
// row vectors (K and V rows are only converted to fp32, never transposed), and the running max,
// sum and rescale of every row are vector ops down the key axis. Items are handed out
// dynamically: causal items differ in cost.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <omp.h>
#include <torch/library.h>

#include "cpu_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

using fVec = at::vec::Vectorized<float>;
constexpr int kLanes = fVec::size();
constexpr int kQBlock = 16;  // query tokens per work item
constexpr int kKBlock = 64;  // key positions per inner block
constexpr int kTile = 4;     // keys (Q K^T) or head dims (P V) per register tile, times up to 4 row vectors
static_assert(kKBlock >= kQBlock, "an item's first key block must show every row one of its keys");

struct ExtendProblem {
  int64_t num_heads, num_kv_heads, group, head_dim, block_size, max_blocks;
  int64_t q_stride_tok, q_stride_head;
  const int32_t* cu;
  const int32_t* lens;
  const int32_t* tables;
  float scale;
  int64_t window;       // sliding window in positions, 0: none
  float softcap;        // > 0: scores soft-capped to +-softcap
  const float* slopes;  // [num_heads] ALiBi slopes, or nullptr
  const float* bias;    // [num_heads, bias_len] bias by distance, or nullptr
  int64_t bias_len;
};

// S^T[t0 + i, rows] = sum_d K[t0 + i, d] * Q^T[d, rows] for kTile keys and W row vectors from rv0.
template <int W>
inline void scores_tile(const float* K, int64_t Dp, int64_t D, const float* QT, int64_t Mp, float* ST, int64_t t0,
                        int64_t rv0) {
  fVec acc[kTile][W];
  for (int i = 0; i < kTile; ++i)
    for (int j = 0; j < W; ++j) acc[i][j] = fVec(0.f);
  for (int64_t d = 0; d < D; ++d) {
    fVec q[W];
    for (int j = 0; j < W; ++j) q[j] = fVec::loadu(QT + d * Mp + (rv0 + j) * kLanes);
    for (int i = 0; i < kTile; ++i) {
      const fVec k(K[(t0 + i) * Dp + d]);
      for (int j = 0; j < W; ++j) acc[i][j] = at::vec::fmadd(k, q[j], acc[i][j]);
    }
  }
  for (int i = 0; i < kTile; ++i)
    for (int j = 0; j < W; ++j) acc[i][j].store(ST + (t0 + i) * Mp + (rv0 + j) * kLanes);
}

// O^T[d0 + i, rows] = O^T[d0 + i, rows] * rescale[rows] + sum_t V[t, d0 + i] * P^T[t, rows].
template <int W>
inline void values_tile(const float* V, int64_t Dp, const float* PT, int64_t Mp, int64_t nk, const float* rescale,
                        float* OT, int64_t d0, int64_t rv0) {
  fVec acc[kTile][W];
  for (int j = 0; j < W; ++j) {
    const fVec r = fVec::loadu(rescale + (rv0 + j) * kLanes);
    for (int i = 0; i < kTile; ++i) acc[i][j] = fVec::loadu(OT + (d0 + i) * Mp + (rv0 + j) * kLanes) * r;
  }
  for (int64_t t = 0; t < nk; ++t) {
    fVec p[W];
    for (int j = 0; j < W; ++j) p[j] = fVec::loadu(PT + t * Mp + (rv0 + j) * kLanes);
    for (int i = 0; i < kTile; ++i) {
      const fVec v(V[t * Dp + d0 + i]);
      for (int j = 0; j < W; ++j) acc[i][j] = at::vec::fmadd(v, p[j], acc[i][j]);
    }
  }
  for (int i = 0; i < kTile; ++i)
    for (int j = 0; j < W; ++j) acc[i][j].store(OT + (d0 + i) * Mp + (rv0 + j) * kLanes);
}

// Convert `n` elements to fp32.
template <typename T>
inline void to_float(const T* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, src, n * sizeof(float));
  } else {
    at::vec::convert(src, dst, n);
  }
}

template <typename T>
void extend_item(const ExtendProblem& P, const T* q_ptr, const T* k_ptr, const T* v_ptr, T* out_ptr, int64_t req,
                 int64_t kv_head, int64_t q_begin, int64_t q_end, std::vector<float>& buf) {
  const int64_t D = P.head_dim, G = P.group, row = P.num_kv_heads * D;
  const int64_t Dp = (D + kTile - 1) / kTile * kTile;  // head dims padded to whole tiles
  const int64_t q_len_req = P.cu[req + 1] - P.cu[req], ctx = P.lens[req];
  const int64_t first_pos = ctx - q_len_req;  // position of the request's first query row
  const int64_t M = (q_end - q_begin) * G;
  const int64_t MV = (M + kLanes - 1) / kLanes, Mp = MV * kLanes;  // rows padded to whole vectors
  const int32_t* table = P.tables + req * P.max_blocks;
  // scratch: QT [Dp, Mp], OT [Dp, Mp], ST [kKBlock, Mp], K and V [kKBlock, Dp],
  // pos, first, slope, m, l, rescale [Mp], BT [kKBlock, Mp] (with a position bias)
  const int64_t bias_floats = P.bias != nullptr ? kKBlock * Mp : 0;
  buf.assign(2 * Dp * Mp + kKBlock * Mp + 2 * kKBlock * Dp + 6 * Mp + bias_floats, 0.f);
  float* QT = buf.data();
  float* OT = QT + Dp * Mp;
  float* ST = OT + Dp * Mp;
  float* K = ST + kKBlock * Mp;
  float* V = K + kKBlock * Dp;
  float* pos = V + kKBlock * Dp;  // each row's position: it sees keys first[r] .. pos[r]
  float* first = pos + Mp;
  float* slope = first + Mp;  // each row's head's ALiBi slope (0 without ALiBi)
  float* m = slope + Mp;
  float* l = m + Mp;
  float* rescale = l + Mp;
  float* BT = rescale + Mp;  // the position bias of each key (of the block) for each row
  // Row r = token (r / G), head kv_head * G + r % G. Padding rows have zero queries and the last
  // row's position and head, so they stay finite; they are never written out.
  for (int64_t r = 0; r < Mp; ++r) {
    const int64_t real = std::min(r, M - 1), p = first_pos + q_begin + real / G;
    pos[r] = float(p);
    first[r] = float(P.window > 0 ? std::max<int64_t>(0, p - P.window + 1) : 0);
    slope[r] = P.slopes != nullptr ? P.slopes[kv_head * G + real % G] : 0.f;
    m[r] = -INFINITY;
  }
  for (int64_t r = 0; r < M; ++r) {
    const T* src = q_ptr + (P.cu[req] + q_begin + r / G) * P.q_stride_tok + (kv_head * G + r % G) * P.q_stride_head;
    for (int64_t d = 0; d < D; ++d) QT[d * Mp + r] = static_cast<float>(src[d]) * P.scale;
  }
  // The item's keys: from its first row's first (the start of that row's window) to its last row.
  const int64_t last_pos = first_pos + q_end - 1;
  const int64_t first_key = P.window > 0 ? std::max<int64_t>(0, first_pos + q_begin - P.window + 1) : 0;
  const bool softcap = P.softcap > 0.f, alibi = P.slopes != nullptr, bias = P.bias != nullptr;
  const fVec cap(P.softcap), inv_cap(softcap ? 1.f / P.softcap : 0.f);
  for (int64_t k0 = first_key; k0 <= last_pos; k0 += kKBlock) {
    const int64_t nk = std::min<int64_t>(kKBlock, last_pos + 1 - k0);
    const int64_t nk_tiles = (nk + kTile - 1) / kTile * kTile;
    for (int64_t t = 0; t < nk; ++t) {  // K and V rows of positions k0 .. k0 + nk in fp32
      const int64_t p = k0 + t;
      const int64_t slot = (int64_t(table[p / P.block_size]) * P.block_size + p % P.block_size) * row + kv_head * D;
      to_float(k_ptr + slot, K + t * Dp, D);
      to_float(v_ptr + slot, V + t * Dp, D);
    }
    std::fill(K + nk * Dp, K + nk_tiles * Dp, 0.f);
    for (int64_t t0 = 0; t0 < nk_tiles; t0 += kTile) {
      for (int64_t rv0 = 0; rv0 < MV; rv0 += 4) {
        switch (std::min<int64_t>(4, MV - rv0)) {
          case 1: scores_tile<1>(K, Dp, D, QT, Mp, ST, t0, rv0); break;
          case 2: scores_tile<2>(K, Dp, D, QT, Mp, ST, t0, rv0); break;
          case 3: scores_tile<3>(K, Dp, D, QT, Mp, ST, t0, rv0); break;
          default: scores_tile<4>(K, Dp, D, QT, Mp, ST, t0, rv0); break;
        }
      }
    }
    if (bias) {  // each row's bias by distance to each key (clamped: masked keys read a real entry)
      for (int64_t r = 0; r < Mp; ++r) {
        const int64_t real = std::min(r, M - 1), p = static_cast<int64_t>(pos[r]);
        const float* b = P.bias + (kv_head * G + real % G) * P.bias_len;
        for (int64_t t = 0; t < nk; ++t)
          BT[t * Mp + r] = b[std::clamp<int64_t>(p - k0 - t, 0, P.bias_len - 1)];
      }
    }
    // soft-cap, ALiBi and position bias, mask keys outside each row's first .. pos, online softmax down keys
    for (int64_t rv = 0; rv < MV; ++rv) {
      const fVec row_pos = fVec::loadu(pos + rv * kLanes), row_first = fVec::loadu(first + rv * kLanes);
      const fVec row_slope = fVec::loadu(slope + rv * kLanes);
      fVec block_max(-INFINITY);
      for (int64_t t = 0; t < nk; ++t) {
        const fVec key(float(k0 + t));
        float* st = ST + t * Mp + rv * kLanes;
        fVec s = fVec::loadu(st);
        if (softcap) s = cap * (s * inv_cap).tanh();
        if (alibi) s = at::vec::fmadd(row_slope, key - row_pos, s);
        if (bias) s = s + fVec::loadu(BT + t * Mp + rv * kLanes);
        if (softcap || alibi || bias) s.store(st);
        const auto keep = (key <= row_pos) & (key >= row_first);
        block_max = at::vec::maximum(block_max, fVec::blendv(fVec(-INFINITY), s, keep));
      }
      // The first block starts at the first row's first key and spans kKBlock >= kQBlock keys, so
      // it shows every row one of its keys: new_max is finite.
      const fVec old_max = fVec::loadu(m + rv * kLanes);
      const fVec new_max = at::vec::maximum(old_max, block_max);
      const fVec factor = (old_max - new_max).exp();  // 0 on the first block (old max -inf)
      fVec sum(0.f);
      for (int64_t t = 0; t < nk; ++t) {
        const fVec key(float(k0 + t));
        const auto keep = (key <= row_pos) & (key >= row_first);
        float* s = ST + t * Mp + rv * kLanes;
        const fVec p = fVec::blendv(fVec(0.f), (fVec::loadu(s) - new_max).exp_u20(), keep);
        p.store(s);
        sum = sum + p;
      }
      (fVec::loadu(l + rv * kLanes) * factor + sum).store(l + rv * kLanes);
      new_max.store(m + rv * kLanes);
      factor.store(rescale + rv * kLanes);
    }
    for (int64_t d0 = 0; d0 < Dp; d0 += kTile) {
      for (int64_t rv0 = 0; rv0 < MV; rv0 += 4) {
        switch (std::min<int64_t>(4, MV - rv0)) {
          case 1: values_tile<1>(V, Dp, ST, Mp, nk, rescale, OT, d0, rv0); break;
          case 2: values_tile<2>(V, Dp, ST, Mp, nk, rescale, OT, d0, rv0); break;
          case 3: values_tile<3>(V, Dp, ST, Mp, nk, rescale, OT, d0, rv0); break;
          default: values_tile<4>(V, Dp, ST, Mp, nk, rescale, OT, d0, rv0); break;
        }
      }
    }
  }
  for (int64_t r = 0; r < M; ++r) {
    T* dst = out_ptr + (P.cu[req] + q_begin + r / G) * P.num_heads * D + (kv_head * G + r % G) * D;
    const float inv = 1.f / l[r];
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(OT[d * Mp + r] * inv);
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
                                  const at::Tensor& block_tables, double scale, int64_t sliding_window,
                                  double softcap, const std::optional<at::Tensor>& alibi_slopes,
                                  const std::optional<at::Tensor>& position_bias) {
  TORCH_CHECK(query.dim() == 3 && query.stride(2) == 1, "query must be [num_tokens, num_heads, head_dim]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "the KV cache must be contiguous");
  TORCH_CHECK(k_cache.scalar_type() == query.scalar_type() && v_cache.scalar_type() == query.scalar_type(),
              "query and KV cache dtypes differ");
  TORCH_CHECK(k_cache.size(3) == query.size(2) && query.size(1) % k_cache.size(2) == 0, "head shapes do not match");
  TORCH_CHECK(sliding_window >= 0, "sliding_window must be >= 0 (0: none)");
  TORCH_CHECK(cu_seqlens_q.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt &&
                  block_tables.scalar_type() == at::kInt,
              "cu_seqlens_q, context_lens and block_tables must be int32");
  auto out = at::empty(query.sizes(), query.options());
  const int64_t num_reqs = context_lens.size(0);
  if (query.size(0) == 0 || num_reqs == 0) return out;
  const auto cu = cu_seqlens_q.contiguous();
  const auto lens = context_lens.contiguous();
  const auto tables = block_tables.contiguous();
  const auto slopes = contiguous_slopes(alibi_slopes, query.size(1));
  const auto bias = contiguous_position_bias(position_bias, query.size(1));
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
                        static_cast<float>(scale),
                        sliding_window,
                        static_cast<float>(softcap),
                        slopes.defined() ? slopes.const_data_ptr<float>() : nullptr,
                        bias.defined() ? bias.const_data_ptr<float>() : nullptr,
                        bias.defined() ? bias.size(1) : 0};
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
      "Tensor context_lens, Tensor block_tables, float scale, int sliding_window=0, float softcap=0.0, "
      "Tensor? alibi_slopes=None, Tensor? position_bias=None) -> Tensor");
  m.def("store_kv(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()");
}

TORCH_LIBRARY_IMPL(sluice_cpu, CPU, m) {
  m.impl("paged_attention_extend", &sluice::paged_attention_extend);
  m.impl("store_kv", &sluice::store_kv);
}
