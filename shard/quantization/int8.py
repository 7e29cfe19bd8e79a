"""`--quantize int8` (weight-only) and `--quantize int8-dynamic` (W8A8), quantized at load.

Both keep each linear weight as int8 with one symmetric scale per output channel (max |w| / 127),
computed from the checkpoint's full-precision weight once this rank has loaded its slice. `int8`
multiplies activations in the model's dtype by those weights (on CPU, for batches under
CPU_ACT_QUANT_MIN_ROWS rows); `int8-dynamic` also quantizes each activation row to 8 bits on the fly
and multiplies integers (VNNI on CPU, `torch._int_mm` on GPU). The LM head is quantized weight-only
in both: logits keep the activations' precision.
"""

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

# From this many activation rows up, `int8` on CPU multiplies in integers too (activations
# quantized per row to 8 bits, VNNI): at 8+ rows a step is compute bound, and weight-only int8 would
# multiply no faster than bf16 (measured per op: 0.8x bf16's time at 32 rows weight-only, 0.6x with
# integer compute), as Intel's IPEX does with lowp_mode=INT8. Below, decode reads half the bytes of
# bf16 and multiplies exactly. Perplexity on the bundled model: 1.002x unquantized weight-only, 1.013x
# with integer compute (tests/shard/test_perplexity.py). Only on CPUs with AVX-512 VNNI.
CPU_ACT_QUANT_MIN_ROWS = 8


class Int8LinearMethod(LinearMethod):
    """Per-channel int8 weights; `dynamic`: int8 activations too (W8A8)."""

    def __init__(self, device: torch.device, dynamic: bool, act_quant_min_rows: int | None = None):
        """`act_quant_min_rows` (CPU, weight-only): quantize the activations of batches of at least
        this many rows (None: never)."""
        self.device = device
        self.dynamic = dynamic
        self.act_quant_min_rows = act_quant_min_rows
        self.name = "int8-dynamic" if dynamic else "int8"

    def create_weights(self, layer: nn.Module, shape: LayerShape) -> None:
        # the checkpoint's dense weight, quantized after loading
        UnquantizedLinearMethod.create_weights(self, layer, shape)

    def process_after_loading(self, layer: nn.Module) -> None:
        from shard.kernels import cpu_int8

        w_int8, scales = cpu_int8.quantize_per_channel(layer.weight.data)
        del layer.weight
        if self.device.type == "cpu":
            layer.int8_weight = cpu_int8.Int8Weight(w_int8, scales)
        else:
            layer.register_buffer("w_int8", w_int8)
            layer.register_buffer("w_scales", scales)
        layer.weight_nbytes = w_int8.numel() + scales.numel() * scales.element_size()

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.device.type == "cpu":
            from shard.kernels import cpu_int8

            if self.dynamic:
                return cpu_int8.linear_w8a8(x, layer.int8_weight, bias)
            rows = cpu_int8.NEVER if self.act_quant_min_rows is None else self.act_quant_min_rows
            return cpu_int8.linear_w8(x, layer.int8_weight, bias, act_quant_min_rows=rows)
        from shard.kernels import triton_quant

        if self.dynamic:
            return triton_quant.int8_dynamic_linear(x, layer.w_int8, layer.w_scales, bias)
        return triton_quant.w8a16_linear(x, layer.w_int8, layer.w_scales, bias)

    def weight_bytes(self, layer: nn.Module) -> int:
        return layer.weight_nbytes + super().weight_bytes(layer)  # + the bias


def _check_device(target: Target, scheme: str) -> None:
    if target.device.type == "cpu":
        from shard.kernels import cpu_int8

        ok, reason = cpu_int8.available(dynamic=scheme == "int8-dynamic")
        if not ok:
            raise QuantizationError(f"--quantize {scheme} cannot run fast on this CPU: {reason}")
    elif target.device.type != "cuda":
        raise QuantizationError(f"--quantize {scheme} runs on CPU and CUDA, not {target.device.type}")


def weight_only(target: Target) -> Quantization:
    _check_device(target, "int8")
    act_quant_min_rows = CPU_ACT_QUANT_MIN_ROWS
    if target.device.type == "cpu":
        from shard.kernels import cpu_int8

        # 8-bit activations need VNNI: without it (AVX2) every batch stays weight-only, which the
        # AVX2 kernels multiply in integers with the activations rounded to 16 bits (cpu_int8.py)
        act_quant_min_rows = CPU_ACT_QUANT_MIN_ROWS if cpu_int8.available(dynamic=True)[0] else None
    return Quantization(
        "int8",
        Int8LinearMethod(target.device, dynamic=False, act_quant_min_rows=act_quant_min_rows),
        Int8LinearMethod(target.device, dynamic=False),
    )


def dynamic(target: Target) -> Quantization:
    _check_device(target, "int8-dynamic")
    return Quantization(
        "int8-dynamic", Int8LinearMethod(target.device, dynamic=True), Int8LinearMethod(target.device, dynamic=False)
    )
