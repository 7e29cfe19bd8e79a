"""Paged attention: stores this step's K/V, then attends over the cache."""

import torch
from torch import nn

from shard import kernels
from shard.context import get_context


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        # Set by the runner when it allocates the cache: [num_blocks, block_size, num_kv_heads, head_dim].
        self.k_cache = self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, Hq, D], k and v [T, Hkv, D] -> [T, Hq * D]."""
        ctx = get_context()
        kernels.store_kv(k, v, self.k_cache, self.v_cache, ctx.slot_mapping)
        e, d = ctx.extend, ctx.decode
        if e is None:
            out = self._decode(q, d)
        elif d is None:
            out = self._extend(q, e)
        else:  # mixed step: prompt chunks first, then single tokens
            out = torch.empty_like(q)
            out[: e.num_tokens] = self._extend(q[: e.num_tokens], e)
            out[e.num_tokens :] = self._decode(q[e.num_tokens :], d)
        return out.reshape(q.shape[0], -1)

    def _extend(self, q, e):
        return kernels.attention_extend(
            q, self.k_cache, self.v_cache, e.cu_seqlens_q, e.context_lens, e.block_tables, self.scale
        )

    def _decode(self, q, d):
        return kernels.attention_decode(
            q, self.k_cache, self.v_cache, d.context_lens, d.block_tables, self.scale, d.max_context_len
        )
