// The CPU kernels other translation units call (layouts in shard/kernels/reference.py).
#pragma once

#include <ATen/ATen.h>

namespace sluice {

// query [num_reqs, num_heads, head_dim] -> [num_reqs, num_heads, head_dim]; one token a request.
at::Tensor paged_attention_decode(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale);

// query [num_tokens, num_heads, head_dim] -> same: prompt chunks over their cached prefix.
at::Tensor paged_attention_extend(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& cu_seqlens_q, const at::Tensor& context_lens,
                                  const at::Tensor& block_tables, double scale);

// key/value [num_tokens, num_kv_heads, head_dim] into the caches at slot_mapping [num_tokens] int64.
void store_kv(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache, at::Tensor& v_cache,
              const at::Tensor& slot_mapping);

}  // namespace sluice
