// The step's attention metadata and KV caches, held in C++, and the attention op the compiled
// forward calls: sluice_cpu::attention(q, k, v, layer, scale, sliding_window, softcap, alibi_slopes,
// position_bias)
// stores the layer's K/V, then runs the extend kernel on the prompt-chunk rows and the decode
// kernel on the single-token rows (with the layer's features, cpu_kernels.h), without a Python
// frame. The runner sets them before each forward (set_step) from shard/context.py's
// ForwardContext.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "cpu_kernels.h"

namespace {

struct StepContext {
  std::vector<at::Tensor> k_caches, v_caches;
  at::Tensor slot_mapping;
  int64_t extend_tokens = 0;  // query rows [0, extend_tokens) are prompt chunks, the rest decode
  std::optional<at::Tensor> cu_seqlens_q, extend_context_lens, extend_block_tables;
  std::optional<at::Tensor> decode_context_lens, decode_block_tables;
};

StepContext& context() {
  static StepContext ctx;
  return ctx;
}

void set_step(const std::vector<at::Tensor>& k_caches, const std::vector<at::Tensor>& v_caches,
              const at::Tensor& slot_mapping, int64_t extend_tokens, const std::optional<at::Tensor>& cu_seqlens_q,
              const std::optional<at::Tensor>& extend_context_lens,
              const std::optional<at::Tensor>& extend_block_tables,
              const std::optional<at::Tensor>& decode_context_lens,
              const std::optional<at::Tensor>& decode_block_tables) {
  TORCH_CHECK(k_caches.size() == v_caches.size(), "one K and one V cache per layer");
  auto& c = context();
  c.k_caches = k_caches;
  c.v_caches = v_caches;
  c.slot_mapping = slot_mapping;
  c.extend_tokens = extend_tokens;
  c.cu_seqlens_q = cu_seqlens_q;
  c.extend_context_lens = extend_context_lens;
  c.extend_block_tables = extend_block_tables;
  c.decode_context_lens = decode_context_lens;
  c.decode_block_tables = decode_block_tables;
}

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t layer, double scale,
                     int64_t sliding_window, double softcap, const std::optional<at::Tensor>& alibi_slopes,
                     const std::optional<at::Tensor>& position_bias) {
  auto& c = context();
  TORCH_CHECK(layer >= 0 && layer < static_cast<int64_t>(c.k_caches.size()), "no KV cache for layer ", layer);
  at::Tensor& k_cache = c.k_caches[layer];
  at::Tensor& v_cache = c.v_caches[layer];
  sluice::store_kv(k, v, k_cache, v_cache, c.slot_mapping);
  const int64_t e = c.extend_tokens;
  const bool has_decode = c.decode_context_lens.has_value();
  if (e == 0)
    return sluice::paged_attention_decode(q, k_cache, v_cache, *c.decode_block_tables, *c.decode_context_lens, scale,
                                          sliding_window, softcap, alibi_slopes, position_bias);
  auto extend =
      sluice::paged_attention_extend(q.narrow(0, 0, e), k_cache, v_cache, *c.cu_seqlens_q, *c.extend_context_lens,
                                     *c.extend_block_tables, scale, sliding_window, softcap, alibi_slopes, position_bias);
  if (!has_decode) return extend;
  auto out = at::empty(q.sizes(), q.options());
  out.narrow(0, 0, e).copy_(extend);
  out.narrow(0, e, q.size(0) - e)
      .copy_(sluice::paged_attention_decode(q.narrow(0, e, q.size(0) - e), k_cache, v_cache, *c.decode_block_tables,
                                            *c.decode_context_lens, scale, sliding_window, softcap, alibi_slopes,
                                            position_bias));
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sluice_cpu, m) {
  m.def(
      "set_step(Tensor[] k_caches, Tensor[] v_caches, Tensor slot_mapping, int extend_tokens, Tensor? cu_seqlens_q, "
      "Tensor? extend_context_lens, Tensor? extend_block_tables, Tensor? decode_context_lens, "
      "Tensor? decode_block_tables) -> ()",
      &set_step);
  m.def(
      "attention(Tensor q, Tensor k, Tensor v, int layer, float scale, int sliding_window, float softcap, "
      "Tensor? alibi_slopes, Tensor? position_bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(sluice_cpu, CPU, m) { m.impl("attention", &attention); }
