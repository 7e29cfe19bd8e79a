"""Which quantization scheme a shard serves, and the linear methods that implement it.

The scheme comes from `--quantize` (on-the-fly quantization of a full-precision checkpoint) or
from the checkpoint's own `quantization_config` (pre-quantized weights); `resolve` checks that
the device can serve it and fails at startup, with the reason, where it cannot: never a silent
fallback to another scheme.
"""

import importlib
from collections.abc import Callable

import torch

from shard.quantization.base import Quantization, QuantizationError, Target, UnquantizedLinearMethod

__all__ = ["Quantization", "QuantizationError", "Target", "resolve", "weight_bytes"]


def none(target: Target) -> Quantization:
    dense = UnquantizedLinearMethod(target.cpu_gemm)
    return Quantization(None, dense, dense)


# --quantize value -> (module of shard.quantization, its builder), imported when chosen: each pulls its own kernels.
ON_THE_FLY = {
    "int8": ("int8", "weight_only"),
    "int8-dynamic": ("int8", "dynamic"),
    "fp8": ("fp8", "on_the_fly"),
    "bitsandbytes": ("bnb", "llm_int8"),
    "bitsandbytes-nf4": ("bnb", "nf4"),
    "bitsandbytes-fp4": ("bnb", "fp4"),
}


def _on_the_fly_builder(scheme: str) -> Callable[[Target], Quantization]:
    module, builder = ON_THE_FLY[scheme]
    return getattr(importlib.import_module(f"shard.quantization.{module}"), builder)


def _checkpoint_builders() -> dict[str, Callable[[dict, Target], Quantization]]:
    from shard.quantization import checkpoints

    return checkpoints.BUILDERS


def resolve(quantize: str | None, hf_config, target: Target) -> Quantization:
    """The scheme to serve: the checkpoint's quantization_config if it has one (`quantize`, if
    given, must name the same method), else `quantize` applied at load, else none."""
    checkpoint_config = getattr(hf_config, "quantization_config", None)
    if checkpoint_config is not None:
        if not isinstance(checkpoint_config, dict):
            checkpoint_config = checkpoint_config.to_dict()
        method = str(checkpoint_config.get("quant_method", "")).lower().replace("_", "-")
        builders = _checkpoint_builders()
        if method not in builders:
            raise QuantizationError(
                f"the checkpoint is quantized with {method or 'an unnamed method'!r}, which is not supported; "
                f"supported pre-quantized formats: {', '.join(sorted(builders))}"
            )
        if quantize is not None and quantize != method:
            raise QuantizationError(
                f"--quantize {quantize} was given, but the checkpoint is already quantized with {method}: "
                f"drop --quantize, or pass --quantize {method}"
            )
        return builders[method](checkpoint_config, target)
    if quantize is None:
        return none(target)
    if quantize not in ON_THE_FLY:
        raise QuantizationError(
            f"--quantize {quantize} needs a checkpoint quantized with {quantize} (its config.json has no "
            f"quantization_config); full-precision checkpoints can be quantized at load with: {', '.join(ON_THE_FLY)}"
        )
    return _on_the_fly_builder(quantize)(target)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's weights as served: each linear layer's processed form (packed,
    quantized) as its method counts it, then every other parameter once (a tied embedding that
    shares the head's dense tensor is not counted twice)."""
    total, seen = 0, set()
    for module in model.modules():
        if hasattr(module, "quant_method"):
            method, layer = module.quant_method, module
        elif getattr(module, "head", None) is not None:  # ParallelLMHead, processed
            method, layer = module.head_method, module.head
        else:
            continue
        total += method.weight_bytes(layer)
        seen.update(p.data_ptr() for p in layer.parameters())
    for param in model.parameters():
        if param.data_ptr() not in seen:
            seen.add(param.data_ptr())
            total += param.numel() * param.element_size()
    return total
