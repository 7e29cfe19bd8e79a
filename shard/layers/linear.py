"""Linear layers that shard their weight over tensor-parallel ranks.

Each parameter carries a `weight_loader(param, loaded, shard_id=None)` that copies only this
rank's slice; `loaded` is a safetensors slice, so a rank reads only the bytes it keeps. On CPU
the runner then calls `pack_for_cpu()`, which replaces the weight by a oneDNN-packed copy.
"""

import torch
from torch import nn

from shard import dist
from shard.kernels import cpu_gemm


def _divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what} ({n}) is not divisible by the number of shards ({d})")
    return n // d


def _narrow(loaded, dim: int, start: int, size: int) -> torch.Tensor:
    """Read rows/columns [start, start+size) along `dim` of a tensor or safetensors slice."""
    index = [slice(None)] * len(loaded.get_shape() if hasattr(loaded, "get_shape") else loaded.shape)
    index[dim] = slice(start, start + size)
    return loaded[tuple(index)]


class ReplicatedLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        self.packed_weight: cpu_gemm.PackedWeight | None = None

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        param.data.copy_(loaded[:])

    def pack_for_cpu(self) -> bool:
        """Swap the loaded weight for its oneDNN-packed form (see cpu_gemm); False if unsupported."""
        if not cpu_gemm.available(self.weight):
            return False
        self.packed_weight = cpu_gemm.PackedWeight(self.weight.data)
        del self.weight  # the packed copy replaces it: no second copy of the weights in memory
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed_weight is not None:
            return cpu_gemm.linear(x, self.packed_weight, self.bias)
        return nn.functional.linear(x, self.weight, self.bias)


class ColumnParallelLinear(ReplicatedLinear):
    """Output features split over ranks; no communication."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, _divide(out_features, dist.tp_size(), "output features"), bias)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        size = param.shape[0]
        param.data.copy_(_narrow(loaded, 0, dist.tp_rank() * size, size))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input in one matmul (gate and up)."""

    def __init__(self, in_features: int, out_features: list[int], bias: bool = False):
        self.output_sizes = out_features
        super().__init__(in_features, sum(out_features), bias)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id: int) -> None:
        tp = dist.tp_size()
        size = self.output_sizes[shard_id] // tp
        offset = sum(self.output_sizes[:shard_id]) // tp
        param.data[offset : offset + size].copy_(_narrow(loaded, 0, dist.tp_rank() * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections; each rank keeps its query heads and their KV heads."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False):
        tp = dist.tp_size()
        self.num_heads = _divide(num_heads, tp, "attention heads")
        self.num_kv_heads = _divide(num_kv_heads, tp, "key/value heads")
        self.head_dim = head_dim
        super().__init__(hidden_size, (num_heads + 2 * num_kv_heads) * head_dim, bias)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id: str) -> None:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        offset, size = {"q": (0, q_size), "k": (q_size, kv_size), "v": (q_size + kv_size, kv_size)}[shard_id]
        param.data[offset : offset + size].copy_(_narrow(loaded, 0, dist.tp_rank() * size, size))


class RowParallelLinear(ReplicatedLinear):
    """Input features split over ranks; partial outputs are summed with an all-reduce."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(_divide(in_features, dist.tp_size(), "input features"), out_features, bias)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        if param.dim() == 1:  # bias: added once, on rank 0
            param.data.copy_(loaded[:] if dist.tp_rank() == 0 else torch.zeros_like(param))
            return
        size = param.shape[1]
        param.data.copy_(_narrow(loaded, 1, dist.tp_rank() * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dist.all_reduce(super().forward(x))
