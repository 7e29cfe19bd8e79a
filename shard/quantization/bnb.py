"""`--quantize bitsandbytes` (LLM.int8 with outlier decomposition), `bitsandbytes-nf4` and
`bitsandbytes-fp4`, quantized at load through the bitsandbytes library itself.

bitsandbytes 0.50 runs these on CUDA and, through its torch reference kernels, on CPU (checked
on this project's CPU machine: results within 1% of the dense matmul for LLM.int8, ~10% max
error for 4-bit, as its formats give). Its CPU 4-bit path is slow (a 1536x576 layer at 4 rows:
~24 ms against 0.1 ms for oneDNN bf16): `int8` is this project's fast CPU scheme, and the
startup log says so.
"""

import logging

import torch
from torch import nn

from shard.quantization.base import (
    LayerShape,
    LinearMethod,
    Quantization,
    QuantizationError,
    Target,
    UnquantizedLinearMethod,
)

log = logging.getLogger(__name__)

_DEVICES = ("cuda", "cpu")  # where bitsandbytes' current release serves these formats
LLM_INT8_THRESHOLD = 6.0  # outlier features above this magnitude stay in 16 bits (TGI and transformers' default)


class BitsAndBytesLinearMethod(LinearMethod):
    """Hands the loaded dense weight to a bitsandbytes layer (Linear8bitLt or Linear4bit), which
    quantizes it when moved to the device and computes the layer."""

    def __init__(self, quant_type: str, device: torch.device):
        self.quant_type = quant_type  # "int8", "nf4" or "fp4"
        self.device = device
        self.name = "bitsandbytes" if quant_type == "int8" else f"bitsandbytes-{quant_type}"

    def create_weights(self, layer: nn.Module, shape: LayerShape) -> None:
        UnquantizedLinearMethod.create_weights(self, layer, shape)

    def process_after_loading(self, layer: nn.Module) -> None:
        import bitsandbytes as bnb

        weight = layer.weight.data
        out_features, in_features = weight.shape
        if self.quant_type == "int8":
            module = bnb.nn.Linear8bitLt(
                in_features, out_features, bias=False, has_fp16_weights=False, threshold=LLM_INT8_THRESHOLD
            )
            module.weight = bnb.nn.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False)
        else:
            module = bnb.nn.Linear4bit(
                in_features, out_features, bias=False, compute_dtype=weight.dtype, quant_type=self.quant_type
            )
            module.weight = bnb.nn.Params4bit(weight.cpu(), requires_grad=False, quant_type=self.quant_type)
        del layer.weight
        layer.bnb = module.to(self.device)  # quantizes here

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = layer.bnb(x)
        return out if bias is None else out + bias

    def weight_bytes(self, layer: nn.Module) -> int:
        w = layer.bnb.weight
        state = getattr(w, "quant_state", None)
        extra = 0
        if state is not None:  # 4-bit: per-block absmax (itself quantized) and the code book
            extra = sum(t.numel() * t.element_size() for t in (state.absmax, state.code) if t is not None)
        elif getattr(layer.bnb.state, "SCB", None) is not None:  # LLM.int8: a scale per row
            extra = layer.bnb.state.SCB.numel() * layer.bnb.state.SCB.element_size()
        return w.numel() * w.element_size() + extra + super().weight_bytes(layer)


def _build(quant_type: str, target: Target) -> Quantization:
    scheme = "bitsandbytes" if quant_type == "int8" else f"bitsandbytes-{quant_type}"
    if target.device.type not in _DEVICES:
        raise QuantizationError(f"--quantize {scheme}: bitsandbytes serves it on {' and '.join(_DEVICES)} only")
    try:
        import bitsandbytes
    except ImportError as e:
        raise QuantizationError(f"--quantize {scheme} needs the bitsandbytes package: {e}") from None
    if target.device.type == "cpu":
        log.warning(
            "%s on CPU runs through bitsandbytes %s's reference kernels, which are slow; --quantize int8 is "
            "the fast CPU scheme",
            scheme,
            bitsandbytes.__version__,
        )
    method = BitsAndBytesLinearMethod(quant_type, target.device)
    return Quantization(scheme, method, UnquantizedLinearMethod(target.cpu_gemm))


def llm_int8(target: Target) -> Quantization:
    return _build("int8", target)


def nf4(target: Target) -> Quantization:
    return _build("nf4", target)


def fp4(target: Target) -> Quantization:
    return _build("fp4", target)
