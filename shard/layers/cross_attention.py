"""Cross-attention of an encoder-decoder model's decoder over its request's encoder output.

The encoder's K/V for a decoder layer are stored once per request, when it is encoded, in the
request's encoder blocks of that layer's KV cache (the same cache tensors as the layer's
self-attention, other blocks of the pool). Every decoder token attends to all of them: to the
paged decode kernels that is one query row per token at the end of a sequence of the encoder's
length, so every kernel backend serves it unchanged.
"""

import torch
from torch import nn

from shard import kernels
from shard.context import get_context


class CrossAttention(nn.Module):
    """This rank's heads of one decoder layer's attention over the encoder output."""

    def __init__(self, scale: float, layer_index: int):
        super().__init__()
        self.scale = scale
        self.layer_index = layer_index  # whose KV cache holds the encoder's K/V

    def store(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """k, v [S, Hkv, D]: a request's encoder K/V, into its encoder blocks' `slots` [S] int64."""
        k_cache, v_cache = get_context().kv_caches[self.layer_index]
        kernels.store_kv(k, v, k_cache, v_cache, slots)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        """q [T, Hq, D] -> [T, Hq * D]."""
        return _cross_attention(q, self.layer_index, self.scale).reshape(q.shape[0], -1)


@torch.library.custom_op("sluice::cross_attention", mutates_args=())
def _cross_attention(q: torch.Tensor, layer_index: int, scale: float) -> torch.Tensor:
    """q [T, Hq, D] -> [T, Hq, D]: each token over its request's encoder K/V (ForwardContext.cross)."""
    ctx = get_context()
    k_cache, v_cache = ctx.kv_caches[layer_index]
    c = ctx.cross
    return kernels.attention_decode(q, k_cache, v_cache, c.context_lens, c.block_tables, scale, c.max_context_len)


@_cross_attention.register_fake
def _(q, layer_index, scale):
    return torch.empty_like(q)
