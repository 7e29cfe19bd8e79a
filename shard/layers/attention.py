"""Paged attention: stores this step's K/V, then attends over the cache.

The work is one custom op, `sluice::attention`, so a compiled forward treats it as an opaque
call: the graph passes q, k and v, and the op reads the step's metadata and this layer's cache
from the forward context (set by the runner), like vLLM's unified attention op.
"""

import torch
from torch import nn

from shard import kernels
from shard.context import get_context


@torch.library.custom_op("sluice::attention", mutates_args=())
def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_index: int, scale: float) -> torch.Tensor:
    """q [T, Hq, D], k and v [T, Hkv, D] -> [T, Hq, D]; writes k and v to the layer's cache first."""
    ctx = get_context()
    k_cache, v_cache = ctx.kv_caches[layer_index]
    kernels.store_kv(k, v, k_cache, v_cache, ctx.slot_mapping)
    e, d = ctx.extend, ctx.decode
    if e is None:
        return _decode(q, k_cache, v_cache, d, scale)
    if d is None:
        return _extend(q, k_cache, v_cache, e, scale)
    out = torch.empty_like(q)  # mixed step: prompt chunks first, then single tokens
    out[: e.num_tokens] = _extend(q[: e.num_tokens], k_cache, v_cache, e, scale)
    out[e.num_tokens :] = _decode(q[e.num_tokens :], k_cache, v_cache, d, scale)
    return out


@paged_attention.register_fake
def _(q, k, v, layer_index, scale):
    return torch.empty_like(q)


def _extend(q, k_cache, v_cache, e, scale):
    return kernels.attention_extend(q, k_cache, v_cache, e.cu_seqlens_q, e.context_lens, e.block_tables, scale)


def _decode(q, k_cache, v_cache, d, scale):
    return kernels.attention_decode(q, k_cache, v_cache, d.context_lens, d.block_tables, scale, d.max_context_len)


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, layer_index: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.layer_index = layer_index  # which of the context's KV caches is this layer's

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, Hq, D], k and v [T, Hkv, D] -> [T, Hq * D]."""
        return paged_attention(q, k, v, self.layer_index, self.scale).reshape(q.shape[0], -1)
