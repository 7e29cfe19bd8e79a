"""8-bit weights with float scales: FP8 checkpoints, `--quantize fp8`, and int8 W8A8 checkpoints.

A linear layer of N outputs and K inputs holds `weight` [N, K] (float8_e4m3fn or int8) and a
scale of one of three shapes, w = weight * scale:
  tensor   one per tensor: for merged projections (q/k/v, gate/up) one per projection, which
           becomes a per-channel scale over that projection's rows once loaded
  channel  [N, 1]
  block    [N / bn, K / bk] for blocks of bn outputs by bk inputs (DeepSeek-style `weight_block_size`)
and, with static activation scales, `input_scale` (one per tensor). Checkpoints name the scale
`weight_scale` (compressed-tensors, AutoFP8, vLLM) or `weight_scale_inv` (block-wise FP8 from
DeepSeek, Qwen, transformers; a multiplier too, despite the name).

On CPU the weights are dequantized to the compute dtype at load and served as an unquantized
model's (oneDNN); activations are not quantized there (`--quantize fp8`, which would only round a
full-precision checkpoint's weights, is refused on CPU). On CUDA they stay 8-bit and run through
shard/kernels/triton_quant.py (fp8_linear, int8_dynamic_linear, w8a16_linear), which quantize
activations per token dynamically: a checkpoint's static input scales are not used. Block-scaled
FP8 has no kernel yet and is dequantized on CUDA too (logged).
"""

from dataclasses import dataclass

import torch
from torch import nn

from shard.quantization import int4
from shard.quantization.base import (
    LayerShape,
    LinearMethod,
    ParamDims,
    Quantization,
    QuantizationError,
    Target,
    UnquantizedLinearMethod,
    add_param,
)

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


@dataclass(frozen=True, slots=True)
class EightBitConfig:
    weight_dtype: torch.dtype  # torch.float8_e4m3fn or torch.int8
    strategy: str  # "tensor", "channel" or "block"
    block: tuple[int, int] | None = None  # (outputs, inputs) per block
    scale_names: tuple[str, ...] = ("weight_scale",)  # the checkpoint's name for the scale (any one of these)
    activations: str | None = "dynamic"  # "dynamic", "static" (input_scale in the checkpoint) or None (weight-only)
    format_name: str = "FP8"


def check_fp8_device(target: Target, scheme: str) -> None:
    """FP8 on CUDA needs hardware FP8 (compute capability 8.9+) and the kernels; CPU dequantizes."""
    int4.require_kernels(target, scheme)
    if target.device.type == "cuda":
        ok, reason = int4.kernels().fp8_supported(target.device)
        if not ok:
            raise QuantizationError(f"{scheme} cannot run on {target.device}: {reason}")


def _quantize_fp8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (float8_e4m3fn [N, K], scales [N] float32) with weight ~= fp8 * scales[:, None]."""
    w = weight.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / FP8_MAX
    return (w / scales[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scales


def _expand_blocks(scale: torch.Tensor, block: tuple[int, int], n: int, k: int) -> torch.Tensor:
    """Block scales [ceil(n / bn), ceil(k / bk)] -> one per weight element [n, k]."""
    bn, bk = block
    return scale.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]


class EightBitLinearMethod(LinearMethod):
    """A pre-quantized 8-bit weight (module docstring)."""

    def __init__(self, config: EightBitConfig, target: Target):
        self.config = config
        self.target = target
        self.dense = UnquantizedLinearMethod(target.cpu_gemm)
        self.use_kernels = target.device.type != "cpu"
        self.name = config.format_name.lower()

    def create_weights(self, layer: nn.Module, shape: LayerShape) -> None:
        cfg = self.config
        N, K = shape.output_size, shape.input_size
        add_param(layer, "weight", torch.empty(N, K, dtype=cfg.weight_dtype), ParamDims(output_dim=0, input_dim=1))
        per_shard = ParamDims(per_shard=True)
        if cfg.strategy == "tensor":
            scales = [
                add_param(
                    layer, name, torch.full((len(shape.output_sizes),), float("nan"), dtype=torch.float32), per_shard
                )
                for name in cfg.scale_names
            ]
        elif cfg.strategy == "channel":
            scales = [
                add_param(layer, name, torch.full((N, 1), float("nan"), dtype=torch.float32), ParamDims(output_dim=0))
                for name in cfg.scale_names
            ]
        else:
            bn, bk = cfg.block
            for size in shape.output_sizes:
                int4.check_multiple(
                    size, bn, f"{cfg.format_name}: a projection's output features on this rank (block size {bn})"
                )
            if shape.input_is_split:
                int4.check_multiple(
                    K, bk, f"{cfg.format_name}: a row-parallel layer's input features on this rank (block size {bk})"
                )
            dims = ParamDims(output_dim=0, input_dim=1, pack_dim=0, pack_factor=bn)
            scales = [
                add_param(layer, name, torch.full((N // bn, -(-K // bk)), float("nan"), dtype=torch.float32), dims)
                for name in cfg.scale_names
            ]
        for scale in scales:  # several names: the checkpoint has one of them
            scale.optional = len(scales) > 1
        if cfg.activations == "static":
            add_param(
                layer,
                "input_scale",
                torch.full((len(shape.output_sizes),), float("nan"), dtype=torch.float32),
                per_shard,
            )

    def _weight_scale(self, layer: nn.Module) -> torch.Tensor:
        """The loaded scale: [N] float32 per output channel, or the block scales."""
        cfg = self.config
        loaded = [getattr(layer, n).data for n in cfg.scale_names if not bool(getattr(layer, n).isnan().all())]
        if len(loaded) != 1:
            names = " or ".join(cfg.scale_names)
            raise QuantizationError(
                f"{cfg.format_name} checkpoint: a layer has {'no' if not loaded else 'more than one'} {names} tensor"
            )
        scale = loaded[0].float()
        if bool(scale.isnan().any()):
            raise QuantizationError(
                f"{cfg.format_name} checkpoint: a merged layer lacks {cfg.scale_names[0]} for one of its projections"
            )
        if cfg.strategy == "tensor":
            return scale.repeat_interleave(torch.tensor(layer.shape.output_sizes, device=scale.device))
        if cfg.strategy == "channel":
            return scale.reshape(-1)
        return scale

    def process_after_loading(self, layer: nn.Module) -> None:
        cfg = self.config
        if cfg.activations == "static" and bool(layer.input_scale.isnan().any()):
            raise QuantizationError(f"{cfg.format_name} checkpoint with static activation scales lacks an input_scale")
        weight, scale = layer.weight.data, self._weight_scale(layer)
        names = [n for n in layer._parameters if n != "bias"]
        if not self.use_kernels or cfg.strategy == "block":
            if cfg.strategy == "block":
                dense = weight.float() * _expand_blocks(scale, cfg.block, *weight.shape)
            else:
                dense = weight.float() * scale[:, None]
            where = "no block-scaled FP8 kernel" if self.use_kernels else "no 8-bit CPU kernel"
            int4.log_once(
                f"dequantized-{cfg.format_name}-{cfg.strategy}",
                "%s checkpoint (%s scales): weights dequantized to %s at load on %s (%s)",
                cfg.format_name,
                cfg.strategy,
                str(self.target.dtype).removeprefix("torch."),
                self.target.device,
                where,
            )
            int4.replace_with_dense(self, layer, dense, names, self.target)
            return
        if cfg.activations == "static":
            int4.log_once(
                f"static-{cfg.format_name}",
                "%s checkpoint: static input scales ignored, activations are quantized per token",
                cfg.format_name,
            )
        for name in names:
            del layer._parameters[name]
        layer.register_parameter("q_weight", nn.Parameter(weight.contiguous(), requires_grad=False))
        layer.register_parameter("q_scale", nn.Parameter(scale.contiguous(), requires_grad=False))

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if not hasattr(layer, "q_weight"):
            return self.dense.apply(layer, x, bias)
        kernels = int4.kernels()
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if self.config.weight_dtype == torch.float8_e4m3fn:
            out = kernels.fp8_linear(x, layer.q_weight, layer.q_scale, bias)
        elif self.config.activations is None:
            out = kernels.w8a16_linear(x, layer.q_weight, layer.q_scale, bias)
        else:
            out = kernels.int8_dynamic_linear(x, layer.q_weight, layer.q_scale, bias)
        return out.reshape(*shape[:-1], out.shape[-1])

    def weight_bytes(self, layer: nn.Module) -> int:
        return self.dense.weight_bytes(layer)


class Fp8OnTheFlyMethod(EightBitLinearMethod):
    """`--quantize fp8` (CUDA): the checkpoint's dense weight, quantized per output channel after loading."""

    def __init__(self, target: Target):
        super().__init__(EightBitConfig(torch.float8_e4m3fn, "channel", format_name="FP8"), target)

    def create_weights(self, layer: nn.Module, shape: LayerShape) -> None:
        self.dense.create_weights(layer, shape)

    def process_after_loading(self, layer: nn.Module) -> None:
        w_fp8, scales = _quantize_fp8_per_channel(layer.weight.data)
        del layer._parameters["weight"]
        layer.register_parameter("q_weight", nn.Parameter(w_fp8, requires_grad=False))
        layer.register_parameter("q_scale", nn.Parameter(scales, requires_grad=False))


def on_the_fly(target: Target) -> Quantization:
    """`--quantize fp8`: decoder linears in FP8 with per-channel scales, the LM head dense. CUDA only:
    on CPU rounding the weights to FP8 would cost accuracy and save nothing (no FP8 CPU kernel)."""
    if target.device.type != "cuda":
        raise QuantizationError(
            f"--quantize fp8 needs a CUDA GPU with FP8 support (compute capability 8.9+), not {target.device.type}: "
            "there is no FP8 CPU kernel; on CPU use --quantize int8 or int8-dynamic"
        )
    check_fp8_device(target, "--quantize fp8")
    return Quantization("fp8", Fp8OnTheFlyMethod(target), UnquantizedLinearMethod(target.cpu_gemm))
