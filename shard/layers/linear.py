"""Linear layers that shard their weights over tensor-parallel ranks, in any quantization scheme.

A layer's parameters come from its `LinearMethod` (shard/quantization): a dense weight by
default, or packed integers with scales and zero points. Each parameter says which of its
dimensions run along the outputs and the inputs (`ParamDims`), so one `weight_loader(param,
loaded, shard_id=None)` per layer kind copies only this rank's slice of any of them; `loaded` is
a safetensors slice, so a rank reads only the bytes it keeps. After loading, the runner calls
`process_weights_after_loading()`, where the method repacks (oneDNN on CPU, int8, ...).
"""

import torch
from torch import nn

from shard import dist
from shard.quantization.base import LayerShape, LinearMethod, ParamDims, UnquantizedLinearMethod, add_param


def _divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what} ({n}) is not divisible by the number of shards ({d})")
    return n // d


def _narrow(loaded, dim: int, start: int, size: int) -> torch.Tensor:
    """Read [start, start+size) along `dim` of a tensor or safetensors slice."""
    index = [slice(None)] * len(loaded.get_shape() if hasattr(loaded, "get_shape") else loaded.shape)
    index[dim] = slice(start, start + size)
    return loaded[tuple(index)]


def _copy(param: nn.Parameter, loaded) -> None:
    tensor = loaded[...]  # [...], not [:]: a safetensors slice of a 0-dim tensor (a per-tensor scale) refuses [:]
    if tensor.shape != param.shape and tensor.numel() == param.numel():  # a scalar stored as [1], or [n] as [n, 1]
        tensor = tensor.reshape(param.shape)
    if tensor.shape != param.shape:
        raise ValueError(f"checkpoint tensor of shape {tuple(tensor.shape)} for a parameter of {tuple(param.shape)}")
    param.data.copy_(tensor)


class ReplicatedLinear(nn.Module):
    """Every rank holds the whole layer."""

    def __init__(
        self,
        in_features: int,
        out_features: int | list[int],
        bias: bool = False,
        quant: LinearMethod | None = None,
        in_features_full: int | None = None,
    ):
        super().__init__()
        sizes = tuple(out_features) if isinstance(out_features, list) else (out_features,)
        self.shape = shape = LayerShape(in_features, sizes, in_features_full or in_features, torch.get_default_dtype())
        self.quant_method = quant or UnquantizedLinearMethod()
        self.quant_method.create_weights(self, shape)
        if bias:
            add_param(self, "bias", torch.empty(shape.output_size), ParamDims(output_dim=0))
        else:
            self.bias = None
        for param in self.parameters(recurse=False):
            param.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        _copy(param, loaded)

    def process_weights_after_loading(self) -> None:
        self.quant_method.process_after_loading(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)


class ColumnParallelLinear(ReplicatedLinear):
    """Output features split over ranks; no communication. Subclasses merge several projections
    of one input (their `_shard_range` says where each lands)."""

    def __init__(self, in_features: int, out_features: int | list[int], bias: bool = False, quant=None):
        tp = dist.tp_size()
        sizes = out_features if isinstance(out_features, list) else [out_features]
        super().__init__(in_features, [_divide(s, tp, "output features") for s in sizes], bias, quant)

    def _shard_range(self, shard_id) -> tuple[int, int, int]:
        """(index of the projection, its first output feature in this layer, its features per rank)."""
        return 0, 0, self.shape.output_size

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        dims: ParamDims = param.dims
        index, offset, size = self._shard_range(shard_id)
        if dims.per_shard:
            param.data[index].copy_(loaded[...].reshape(()))
            return
        d = dims.output_dim
        if d is None:  # not split along the outputs (e.g. act-order g_idx): the same for every projection
            _copy(param, loaded)
            return
        f = dims.factor(d)
        offset, size = offset // f, size // f
        param.data.narrow(d, offset, size).copy_(_narrow(loaded, d, dist.tp_rank() * size, size))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input in one matmul (gate and up)."""

    def __init__(self, in_features: int, out_features: list[int], bias: bool = False, quant=None):
        super().__init__(in_features, out_features, bias, quant)

    def _shard_range(self, shard_id: int) -> tuple[int, int, int]:
        sizes = self.shape.output_sizes
        return shard_id, sum(sizes[:shard_id]), sizes[shard_id]


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections; each rank keeps its query heads and their KV heads."""

    def __init__(
        self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False, quant=None
    ):
        tp = dist.tp_size()
        self.num_heads = _divide(num_heads, tp, "attention heads")
        self.num_kv_heads = _divide(num_kv_heads, tp, "key/value heads")
        self.head_dim = head_dim
        q, kv = num_heads * head_dim, num_kv_heads * head_dim
        super().__init__(hidden_size, [q, kv, kv], bias, quant)

    def _shard_range(self, shard_id: str) -> tuple[int, int, int]:
        index = "qkv".index(shard_id)
        sizes = self.shape.output_sizes
        return index, sum(sizes[:index]), sizes[index]


class RowParallelLinear(ReplicatedLinear):
    """Input features split over ranks; partial outputs are summed with an all-reduce."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, quant=None):
        in_per_rank = _divide(in_features, dist.tp_size(), "input features")
        super().__init__(in_per_rank, out_features, bias, quant, in_features_full=in_features)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        if param is self.bias:  # added once, on rank 0
            param.data.copy_(loaded[:] if dist.tp_rank() == 0 else torch.zeros_like(param))
            return
        d = param.dims.input_dim
        if d is None:  # replicated along the inputs (per-channel scales, act-order groups)
            _copy(param, loaded)
            return
        size = param.shape[d]
        param.data.copy_(_narrow(loaded, d, dist.tp_rank() * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dist.all_reduce(super().forward(x))
