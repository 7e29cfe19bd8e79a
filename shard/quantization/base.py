"""How a linear layer holds its weights and multiplies by them: one `LinearMethod` per scheme.

A method registers the parameters the checkpoint fills (`create_weights`), turns them into the
form its kernels read once every rank has loaded its slice (`process_after_loading`), and computes
the layer (`apply`). Each parameter says which of its dimensions run along the layer's outputs and
inputs (`ParamDims`), and whether values are packed along one of them, so that the layers in
shard/layers/linear.py slice any scheme's tensors for tensor parallelism the same way.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from shard.kernels import cpu_gemm


@dataclass(frozen=True, slots=True)
class ParamDims:
    """Where a parameter's dimensions sit relative to the layer's [out, in] weight.

    output_dim / input_dim: its dimension along the output features / the input features (None:
    not split along them: replicated); pack_dim with pack_factor: values packed pack_factor to an
    element along that dimension (int4 in int32: 8); per_shard: one value per projection of a
    merged layer (q, k, v; gate, up), e.g. a per-tensor scale, indexed by the projection."""

    output_dim: int | None = None
    input_dim: int | None = None
    pack_dim: int | None = None
    pack_factor: int = 1
    per_shard: bool = False

    def factor(self, dim: int) -> int:
        """Features per element along `dim`: pack_factor if values are packed along it, else 1."""
        return self.pack_factor if dim == self.pack_dim else 1


def add_param(layer: nn.Module, name: str, tensor: torch.Tensor, dims: ParamDims) -> nn.Parameter:
    """Register `tensor` on `layer` as a frozen parameter that carries its `dims`."""
    param = nn.Parameter(tensor, requires_grad=False)
    param.dims = dims
    layer.register_parameter(name, param)
    return param


@dataclass(frozen=True, slots=True)
class LayerShape:
    """A linear layer's sizes on this rank. `output_sizes`: one per merged projection (a single
    linear has one); `input_size_full`: the input features before any row-parallel split."""

    input_size: int
    output_sizes: tuple[int, ...]
    input_size_full: int
    dtype: torch.dtype  # the model's compute dtype

    @property
    def output_size(self) -> int:
        return sum(self.output_sizes)

    @property
    def input_is_split(self) -> bool:
        return self.input_size != self.input_size_full


class LinearMethod(ABC):
    """A quantization scheme's linear layer (see UnquantizedLinearMethod)."""

    name = "none"

    @abstractmethod
    def create_weights(self, layer: nn.Module, shape: LayerShape) -> None:
        """Register on `layer` the parameters this rank loads, sized for it (add_param)."""

    @abstractmethod
    def process_after_loading(self, layer: nn.Module) -> None:
        """Turn the loaded parameters into what `apply` reads (quantize, repack, dequantize...)."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [..., in] -> [..., out]."""

    def weight_bytes(self, layer: nn.Module) -> int:
        """Bytes the layer's weights take once processed (for /info and the startup log)."""
        return sum(p.numel() * p.element_size() for p in layer.parameters(recurse=False))


class UnquantizedLinearMethod(LinearMethod):
    """A dense weight [out, in] in the model's dtype; on CPU packed after loading by the `cpu_gemm`
    kernels (oneDNN or our AVX2 ones: 2-3.5x MKL's speed on AMD processors; `aten`: none)."""

    def __init__(self, cpu_gemm: str = "auto"):
        self.cpu_gemm = cpu_gemm

    def create_weights(self, layer: nn.Module, shape: LayerShape) -> None:
        weight = torch.empty(shape.output_size, shape.input_size, dtype=shape.dtype)
        add_param(layer, "weight", weight, ParamDims(output_dim=0, input_dim=1))

    def process_after_loading(self, layer: nn.Module) -> None:
        layer.packed_weight = None
        if cpu_gemm.available(layer.weight, self.cpu_gemm):
            layer.packed_weight = cpu_gemm.PackedWeight(layer.weight.data, self.cpu_gemm)
            layer.weight_nbytes = layer.weight.numel() * layer.weight.element_size()
            del layer.weight  # the packed copy replaces it: no second copy of the weights in memory

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if getattr(layer, "packed_weight", None) is not None:
            return cpu_gemm.linear(x, layer.packed_weight, bias)
        return nn.functional.linear(x, layer.weight, bias)

    def weight_bytes(self, layer: nn.Module) -> int:
        return getattr(layer, "weight_nbytes", 0) + super().weight_bytes(layer)


class QuantizationError(ValueError):
    """The scheme cannot be served here (device, checkpoint or flags); the message says why."""


@dataclass(frozen=True, slots=True)
class Target:
    """What a scheme is resolved for: the device, the compute dtype and the CPU linears' kernels
    (shard.kernels.cpu_gemm.KERNELS)."""

    device: torch.device
    dtype: torch.dtype
    cpu_gemm: str = "auto"


@dataclass(frozen=True, slots=True)
class Quantization:
    """The resolved scheme: `linear` builds the decoder's linear layers, `head` the LM head
    (pre-quantized checkpoints keep a dense head, as their tools leave it)."""

    name: str | None  # None: full precision
    linear: LinearMethod
    head: LinearMethod
    pre_quantized: bool = False

    def linear_method(self) -> LinearMethod:
        return self.linear

    def head_method(self) -> LinearMethod:
        return self.head

    def describe(self) -> str:
        if self.name is None:
            return "none"
        return f"{self.name} ({'pre-quantized checkpoint' if self.pre_quantized else 'quantized at load'})"
