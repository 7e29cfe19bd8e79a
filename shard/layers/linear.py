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

    def _shard_rank(self, shard_id) -> int:
        """Whose slice of the projection this rank holds: its own, unless replicated (QKVParallelLinear's KV)."""
        return dist.tp_rank()

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
        param.data.narrow(d, offset, size).copy_(_narrow(loaded, d, self._shard_rank(shard_id) * size, size))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input in one matmul (gate and up)."""

    def __init__(self, in_features: int, out_features: list[int], bias: bool = False, quant=None):
        super().__init__(in_features, out_features, bias, quant)

    def _shard_range(self, shard_id: int) -> tuple[int, int, int]:
        sizes = self.shape.output_sizes
        return shard_id, sum(sizes[:shard_id]), sizes[shard_id]


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections; each rank keeps its query heads and their KV heads. With fewer KV
    heads than ranks (multi-query attention), each rank keeps the one KV head its query heads
    read: `kv_replicas` ranks hold each (as vLLM does)."""

    def __init__(
        self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False, quant=None
    ):
        tp = dist.tp_size()
        self.num_heads = _divide(num_heads, tp, "attention heads")
        self.kv_replicas = tp // num_kv_heads if num_kv_heads < tp and tp % num_kv_heads == 0 else 1
        self.num_kv_heads = _divide(num_kv_heads * self.kv_replicas, tp, "key/value heads")
        self.head_dim = head_dim
        q, kv = num_heads * head_dim, num_kv_heads * self.kv_replicas * head_dim
        super().__init__(hidden_size, [q, kv, kv], bias, quant)

    def _shard_range(self, shard_id: str) -> tuple[int, int, int]:
        index = "qkv".index(shard_id)
        sizes = self.shape.output_sizes
        return index, sum(sizes[:index]), sizes[index]

    def _shard_rank(self, shard_id: str) -> int:
        return dist.tp_rank() if shard_id == "q" else dist.tp_rank() // self.kv_replicas


class FusedQKVParallelLinear(QKVParallelLinear):
    """QKVParallelLinear loaded from one fused checkpoint tensor whose output features hold the
    heads in `layout`:
    - "qkv": every q head, then every k head, then every v head (GPTBigCode's multi-query c_attn,
      Falcon's multi-query models);
    - "per_head": head 0's q, k and v, then head 1's, ... (GPT-NeoX, BLOOM, Falcon's first models,
      GPTBigCode without multi-query);
    - "grouped": per KV head, its query heads, then its k and v (Falcon's new decoder architecture).
    Each rank reads only its heads' features, consecutive heads in one read, into the q|k|v order
    of QKVParallelLinear. Any quantization scheme: the slices run along each parameter's output
    dimension (`ParamDims`)."""

    LAYOUTS = ("qkv", "per_head", "grouped")

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        layout: str,
        bias: bool = False,
        quant=None,
    ):
        if layout not in self.LAYOUTS:
            raise ValueError(f"unknown fused q/k/v layout {layout!r}; known: {', '.join(self.LAYOUTS)}")
        if layout == "per_head" and num_kv_heads != num_heads:
            raise ValueError(f"a per-head fused q/k/v needs as many KV heads as heads, not {num_kv_heads}/{num_heads}")
        super().__init__(hidden_size, head_dim, num_heads, num_kv_heads, bias, quant)
        self.layout, self.total_heads, self.total_kv_heads = layout, num_heads, num_kv_heads

    def _checkpoint_heads(self) -> list[int]:
        """Where this rank's q heads, then its k and its v heads sit in the checkpoint tensor,
        counted in heads along its output features."""
        hq, hkv, rank = self.total_heads, self.total_kv_heads, dist.tp_rank()
        q = range(rank * self.num_heads, (rank + 1) * self.num_heads)
        kv_first = rank // self.kv_replicas * self.num_kv_heads
        kv = range(kv_first, kv_first + self.num_kv_heads)
        if self.layout == "qkv":
            return [*q, *(hq + h for h in kv), *(hq + hkv + h for h in kv)]
        if self.layout == "per_head":
            return [3 * h for h in q] + [3 * h + 1 for h in kv] + [3 * h + 2 for h in kv]
        group = hq // hkv  # query heads per KV head; each group takes group + 2 heads' features
        return (
            [h // group * (group + 2) + h % group for h in q]
            + [h * (group + 2) + group for h in kv]
            + [h * (group + 2) + group + 1 for h in kv]
        )

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        d = param.dims.output_dim
        if d is None:  # not split along the outputs (act-order g_idx)
            _copy(param, loaded)
            return
        per_head = self.head_dim // param.dims.factor(d)  # elements per head along d
        runs: list[list[int]] = []  # [first head, number of heads] of consecutive heads
        for h in self._checkpoint_heads():
            if runs and sum(runs[-1]) == h:
                runs[-1][1] += 1
            else:
                runs.append([h, 1])
        parts = [_narrow(loaded, d, first * per_head, n * per_head) for first, n in runs]
        _copy(param, torch.cat(parts, dim=d))


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
