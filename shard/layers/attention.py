"""Paged attention: stores this step's K/V, then attends over the cache.

The work is one opaque op (kernels.paged_attention), so a compiled forward treats it as a single
call: the graph passes q, k and v, and the op finds the step's metadata and this layer's cache in
the step the runner set up, like vLLM's unified attention op.
"""

import torch
from torch import nn

from shard import kernels


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, layer_index: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.layer_index = layer_index  # which of the step's KV caches is this layer's

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, Hq, D], k and v [T, Hkv, D] -> [T, Hq * D]."""
        return kernels.paged_attention(q, k, v, self.layer_index, self.scale).reshape(q.shape[0], -1)
