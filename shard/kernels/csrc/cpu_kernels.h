// The CPU kernels other translation units call (layouts in shard/kernels/reference.py).
//
// Per-layer features, as reference.attention_decode: sliding_window > 0 limits a query at position
// i to positions i - sliding_window + 1 .. i (and the blocks wholly before that are never read),
// softcap > 0 soft-caps the scores to softcap * tanh(score / softcap), alibi_slopes ([num_heads]
// float32) then adds slope[h] * (j - i) to the score of key j, and position_bias ([num_heads, L]
// float32, T5's decoder) adds position_bias[h][min(i - j, L - 1)].
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace sluice {

// query [num_reqs, num_heads, head_dim] -> [num_reqs, num_heads, head_dim]; one token a request.
at::Tensor paged_attention_decode(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                                  int64_t sliding_window, double softcap,
                                  const std::optional<at::Tensor>& alibi_slopes,
                                  const std::optional<at::Tensor>& position_bias);

// query [num_tokens, num_heads, head_dim] -> same: prompt chunks over their cached prefix.
at::Tensor paged_attention_extend(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& cu_seqlens_q, const at::Tensor& context_lens,
                                  const at::Tensor& block_tables, double scale, int64_t sliding_window,
                                  double softcap, const std::optional<at::Tensor>& alibi_slopes,
                                  const std::optional<at::Tensor>& position_bias);

// key/value [num_tokens, num_kv_heads, head_dim] into the caches at slot_mapping [num_tokens] int64.
void store_kv(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache, at::Tensor& v_cache,
              const at::Tensor& slot_mapping);

// alibi_slopes checked ([num_heads] float32 on the CPU) and made contiguous; undefined without ALiBi.
at::Tensor contiguous_slopes(const std::optional<at::Tensor>& alibi_slopes, int64_t num_heads);

// position_bias checked ([num_heads, L >= 1] float32 on the CPU) and made contiguous; undefined without.
at::Tensor contiguous_position_bias(const std::optional<at::Tensor>& position_bias, int64_t num_heads);

}  // namespace sluice
