"""A sparse mixture-of-experts feed-forward block (Mixtral, Qwen2-MoE, Qwen3-MoE), tensor-parallel.

Every rank holds a slice of EVERY expert: its share of each expert's intermediate features (rows of
gate and up, columns of down), as a dense MLP is split. A rank computes all of a step's
(token, expert) pairs over its slice and one all-reduce sums the partial outputs, exactly where the
dense MLP has its all-reduce. Why not expert parallelism (whole experts per rank): a decode step
routes a few tokens to a few experts, so with whole experts per rank most ranks would idle while the
ranks owning the chosen experts work (and a popular expert overloads its rank); EP also needs an
all-to-all to send tokens to their experts and back instead of the one all-reduce the tensor-parallel
group already does. Splitting the intermediate dim keeps every rank's work equal whatever the
routing. Its cost is thinner per-rank GEMMs (I / tp columns), which matters only at expert counts
and TP degrees beyond one node, where EP wins.

The experts' weights are stacked: w13 [E, 2 * I / tp, H] (each expert's gate rows, then its up rows)
and w2 [E, H, I / tp]; checkpoints store one tensor per expert and projection, which
`expert_checkpoint_mapping` routes to their slots. The experts' math is shard.kernels.moe.
"""

import torch
from torch import nn

from shard import dist
from shard.kernels import moe
from shard.layers.activation import SiluAndMul
from shard.layers.linear import MergedColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from shard.quantization import Quantization, QuantizationError


def expert_checkpoint_mapping(
    num_experts: int, checkpoint_block: str, block: str, names: tuple[str, str, str]
) -> dict[str, tuple[str, tuple[int, int]]]:
    """packed_modules_mapping entries (see shard.loader) for per-expert checkpoint tensors:
    `{checkpoint_block}.experts.{e}.{gate|up|down}` -> `{block}.w13` / `{block}.w2`, shard id
    (expert, part): gate is part 0 and up part 1 of w13, down part 0 of w2. They must precede the
    dense `gate_proj`/`up_proj` entries, which would also match an expert's name."""
    gate, up, down = names
    mapping = {}
    for e in range(num_experts):
        prefix = f"{checkpoint_block}.experts.{e}"
        mapping[f"{prefix}.{gate}"] = (f"{block}.w13", (e, 0))
        mapping[f"{prefix}.{up}"] = (f"{block}.w13", (e, 1))
        mapping[f"{prefix}.{down}"] = (f"{block}.w2", (e, 0))
    return mapping


class StackedExpertWeight(nn.Module):
    """One projection of every expert, stacked: weight [E, parts * size, in] or [E, out, size], where
    `size` is this rank's share of the intermediate features and `split_dim` (0: rows, 1: columns of
    a checkpoint's per-expert [out, in] tensor) says which side they are on."""

    def __init__(self, num_experts: int, shape: tuple[int, int], split_dim: int, size: int):
        super().__init__()
        self.split_dim, self.size = split_dim, size
        self.weight = nn.Parameter(torch.empty(num_experts, *shape), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded, shard_id: tuple[int, int]) -> None:
        """Copy this rank's slice of expert `shard_id[0]`'s tensor (a safetensors slice) into part
        `shard_id[1]` of its stacked weight."""
        expert, part = shard_id
        start, end = dist.tp_rank() * self.size, (dist.tp_rank() + 1) * self.size
        mine = loaded[start:end] if self.split_dim == 0 else loaded[:, start:end]
        slot = param.data[expert].narrow(self.split_dim, part * self.size, self.size)
        if mine.shape != slot.shape:
            raise ValueError(f"expert tensor slice of shape {tuple(mine.shape)} for a slot of {tuple(slot.shape)}")
        slot.copy_(mine)


class _PartialRowParallelLinear(RowParallelLinear):
    """Row-parallel without its all-reduce: the block sums the shared and routed experts' partial
    outputs in one all-reduce."""

    forward = ReplicatedLinear.forward


class SharedExpert(nn.Module):
    """Qwen2-MoE's dense expert that every token goes through; its output is this rank's partial sum."""

    def __init__(self, hidden_size: int, intermediate_size: int, quant: Quantization):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, [intermediate_size] * 2, False, quant.linear_method()
        )
        self.down_proj = _PartialRowParallelLinear(intermediate_size, hidden_size, False, quant.linear_method())
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (weights [T, top_k] float32, expert ids [T, top_k]): the softmax over
    all experts (fp32), its top_k, rescaled to sum to 1 if `renormalize`."""
    weights, ids = torch.softmax(router_logits.float(), dim=-1).topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class FusedMoE(nn.Module):
    """Router, top-k routing, the experts' SwiGLU MLPs (stacked, sharded over ranks, computed by
    shard.kernels.moe.fused_experts) and an optional shared expert with a sigmoid gate (Qwen2-MoE):
    hidden [T, H] -> [T, H], summed over ranks.

    Parameters: gate.weight [E, H] (router), w13.weight, w2.weight (module docstring),
    shared_expert.*, shared_expert_gate.weight [1, H].

    The expert weights are served in the model's dtype only: any quantization is refused here, at
    startup, rather than serving them unquantized under a quantized name."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        renormalize: bool,
        quant: Quantization,
        shared_expert_intermediate_size: int = 0,
    ):
        super().__init__()
        if quant.name is not None:
            raise QuantizationError(
                f"quantization {quant.describe()} is not supported for mixture-of-experts models: their expert "
                "weights are served unquantized only; "
                + ("serve a full-precision checkpoint" if quant.pre_quantized else "drop --quantize")
            )
        tp = dist.tp_size()
        if intermediate_size % tp:
            raise ValueError(
                f"the experts' intermediate size ({intermediate_size}) is not divisible by the number of shards ({tp})"
            )
        size = intermediate_size // tp
        self.top_k, self.renormalize = top_k, renormalize
        self.gate = ReplicatedLinear(hidden_size, num_experts, False, quant.linear_method())
        self.w13 = StackedExpertWeight(num_experts, (2 * size, hidden_size), split_dim=0, size=size)
        self.w2 = StackedExpertWeight(num_experts, (hidden_size, size), split_dim=1, size=size)
        self.shared_expert = None
        if shared_expert_intermediate_size:
            self.shared_expert = SharedExpert(hidden_size, shared_expert_intermediate_size, quant)
            self.shared_expert_gate = ReplicatedLinear(hidden_size, 1, False, quant.linear_method())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> [T, H]."""
        weights, ids = select_experts(self.gate(x), self.top_k, self.renormalize)
        out = moe.fused_experts(x, self.w13.weight, self.w2.weight, weights, ids)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return dist.all_reduce(out)
