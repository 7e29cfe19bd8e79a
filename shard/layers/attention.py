"""Paged attention: stores this step's K/V, then attends over the cache.

The work is one opaque op (kernels.paged_attention), so a compiled forward treats it as a single
call: the graph passes q, k and v, and the op finds the step's metadata and this layer's cache in
the step the runner set up, like vLLM's unified attention op.
"""

import math

import torch
from torch import nn

from shard import dist, kernels


class Attention(nn.Module):
    """This rank's heads of one attention layer over the paged KV cache.

    Per-layer features: `sliding_window` (each query sees its last that many positions, Mistral,
    Gemma's local layers), `softcap` (scores capped to +-softcap by tanh, Gemma 2) and
    `alibi_slopes` ([num_heads] float32, this rank's heads' ALiBi slopes, BLOOM)."""

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        layer_index: int,
        sliding_window: int | None = None,
        softcap: float | None = None,
        alibi_slopes: torch.Tensor | None = None,
    ):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.layer_index = layer_index  # which of the step's KV caches is this layer's
        self.sliding_window, self.softcap = sliding_window or 0, softcap or 0.0
        self.alibi_slopes: torch.Tensor | None
        if alibi_slopes is None:
            self.alibi_slopes = None
        else:
            assert alibi_slopes.shape == (num_heads,), alibi_slopes.shape
            self.register_buffer("alibi_slopes", alibi_slopes.float().contiguous(), persistent=False)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position_bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """q [T, Hq, D], k and v [T, Hkv, D] -> [T, Hq * D]. position_bias [Hq, L] float32: added to
        the score of each key by its distance i - j (the last column from L - 1 on), T5's decoder."""
        out = kernels.paged_attention(
            q, k, v, self.layer_index, self.scale, self.sliding_window, self.softcap, self.alibi_slopes, position_bias
        )
        return out.reshape(q.shape[0], -1)


def alibi_slopes(total_heads: int) -> torch.Tensor:
    """This rank's heads' ALiBi slopes ([total_heads / tp] float32), as BLOOM and Falcon compute
    them for `total_heads`: powers of one base for the largest power of two of heads, then every
    other power of the next power of two's base for the rest."""
    closest = 2 ** math.floor(math.log2(total_heads))
    base = torch.full((), 2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != total_heads:
        extra_base = torch.full((), 2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32)
        extra = min(closest, total_heads - closest)
        slopes = torch.cat([slopes, torch.pow(extra_base, torch.arange(1, 1 + 2 * extra, 2, dtype=torch.int32))])
    per_rank = total_heads // dist.tp_size()
    return slopes[dist.tp_rank() * per_rank : (dist.tp_rank() + 1) * per_rank]
