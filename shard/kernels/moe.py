"""The one import point for mixture-of-experts kernels: `fused_experts`, chosen by the device.

- CUDA: the Triton kernels of triton_moe (tokens sorted and block-aligned per expert, two grouped
  GEMM kernels; graph-safe, as decode runs under CUDA graphs);
- elsewhere (CPU): `grouped_experts`, grouped torch GEMMs, which is also the oracle the Triton
  kernels are tested against.

`fused_experts` is one opaque op (`sluice::fused_experts`), so the compiled CPU forward calls it as
a unit: its shapes inside depend on the routing, which a traced graph cannot follow.
"""

import torch
from torch.nn import functional as F


def grouped_experts(
    x: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2 * I, H]: each expert's gate rows, then its up rows
    w2: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, top_k] float32
    topk_ids: torch.Tensor,  # [T, top_k] int
) -> torch.Tensor:  # [T, H] in x's dtype
    """sum_j topk_weights[t, j] * w2[e] @ (silu(gate_e x_t) * up_e x_t), e = topk_ids[t, j].

    The T * top_k (token, expert) assignments are sorted by expert; each expert with assignments runs
    its two GEMMs once over all its tokens; the outputs, scaled by their routing weights in fp32, are
    added back to their tokens (index_add in a fixed order: deterministic)."""
    T, top_k = topk_ids.shape
    flat = topk_ids.reshape(-1)
    order = flat.argsort(stable=True)  # [T * top_k] assignments grouped by expert
    rows = order // top_k  # [T * top_k] token of each sorted assignment
    xs = x[rows]  # [T * top_k, H]
    ys = torch.empty_like(xs)
    start = 0
    for expert, count in enumerate(torch.bincount(flat, minlength=w13.shape[0]).tolist()):
        if count:
            gate, up = F.linear(xs[start : start + count], w13[expert]).chunk(2, dim=-1)
            ys[start : start + count] = F.linear(F.silu(gate) * up, w2[expert])
            start += count
    weighted = ys.float() * topk_weights.reshape(-1)[order, None].float()
    return torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device).index_add_(0, rows, weighted).to(x.dtype)


@torch.library.custom_op("sluice::fused_experts", mutates_args=())
def fused_experts(
    x: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2 * I, H]
    w2: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, top_k] float32
    topk_ids: torch.Tensor,  # [T, top_k] int
) -> torch.Tensor:  # [T, H] in x's dtype
    """The experts' SwiGLU MLPs for each token's top_k experts, weighted and summed (grouped_experts)."""
    if x.is_cuda:
        from shard.kernels import triton_moe

        return triton_moe.fused_experts(x, w13, w2, topk_weights, topk_ids)
    return grouped_experts(x, w13, w2, topk_weights, topk_ids)


@fused_experts.register_fake
def _(x, w13, w2, topk_weights, topk_ids):
    return torch.empty_like(x)
