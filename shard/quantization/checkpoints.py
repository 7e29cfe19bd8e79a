"""Pre-quantized checkpoints: their config.json `quantization_config`, checked and turned into a scheme.

`BUILDERS[quant_method](quantization_config, target)` (quant_method lowercased, '_' -> '-') reads
the config of a GPTQ, AWQ, compressed-tensors or FP8 checkpoint, refuses at startup, naming the
problem, what this server cannot serve exactly (other bit widths, layouts or formats, decoder
linears left unquantized, a quantized LM head), and returns the `Quantization` whose linear
method loads the checkpoint's tensors (gptq.py, awq.py, compressed_tensors.py, fp8.py).

Every decoder linear of the supported models (q/k/v/o, gate/up/down projections) must be
quantized with the same scheme: the model builds all of them with one linear method, and the LM
head stays dense, as these tools leave it.
"""

import re
from collections.abc import Callable

import torch

from shard.quantization import awq as awq_module
from shard.quantization import compressed_tensors as ct_module
from shard.quantization import fp8 as fp8_module
from shard.quantization import gptq as gptq_module
from shard.quantization import int4
from shard.quantization.base import Quantization, QuantizationError, Target, UnquantizedLinearMethod

DECODER_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
_LAYERS_CHECKED = 256  # layer indices whose names are matched against a config's targets / ignore lists


def decoder_linear_names() -> list[str]:
    return [f"model.layers.{i}.{kind}" for i in range(_LAYERS_CHECKED) for kind in DECODER_LINEARS]


def _quantization(name: str, linear, target: Target) -> Quantization:
    return Quantization(name, linear, UnquantizedLinearMethod(target.cpu_gemm), pre_quantized=True)


def _int(config: dict, keys: tuple[str, ...], what: str, default=None) -> int:
    for key in keys:
        if config.get(key) is not None:
            value = config[key]
            if isinstance(value, bool) or not isinstance(value, int):
                raise QuantizationError(f"{what}: {key} must be an integer, got {value!r}")
            return value
    if default is None:
        raise QuantizationError(f"{what}: quantization_config has no {' or '.join(keys)}")
    return default


def _check_group_size(group_size: int, what: str) -> None:
    if group_size != -1 and group_size <= 0:
        raise QuantizationError(f"{what}: group_size must be positive or -1 (per channel), got {group_size}")


def _check_not_skipped(fragments, key: str, what: str) -> None:
    """`fragments`: module names (or parts of them) a config leaves unquantized."""
    for fragment in fragments or ():
        hit = next((n for n in decoder_linear_names() if fragment in n), None)
        if hit is not None:
            raise QuantizationError(
                f"{what}: {key} leaves decoder linears unquantized ({fragment!r} matches {hit}); "
                "checkpoints quantized only in part are not supported"
            )


# -- GPTQ ----------------------------------------------------------------------------------


def gptq(config: dict, target: Target) -> Quantization:
    what = "GPTQ checkpoint"
    bits = _int(config, ("bits", "w_bit"), what)
    if bits != 4:
        raise QuantizationError(f"{what}: {bits}-bit weights are not supported, only 4-bit (bits: 4)")
    group_size = _int(config, ("group_size",), what, default=-1)
    _check_group_size(group_size, what)
    fmt = str(config.get("checkpoint_format") or config.get("format") or "gptq").lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise QuantizationError(f"{what}: checkpoint_format {fmt!r} is not supported, only gptq and gptq_v2")
    if config.get("lm_head"):
        raise QuantizationError(f"{what}: a quantized lm_head (lm_head: true) is not supported")
    if config.get("dynamic"):
        raise QuantizationError(f"{what}: per-module overrides (dynamic) are not supported")
    if str(config.get("pack_dtype", "int32")).removeprefix("torch.") != "int32":
        raise QuantizationError(f"{what}: pack_dtype {config['pack_dtype']} is not supported, only int32")
    in_block = config.get("modules_in_block_to_quantize")
    if in_block:
        listed = {name for names in in_block for name in (names if isinstance(names, list) else [names])}
        unlisted = [kind for kind in DECODER_LINEARS if kind not in listed]
        if unlisted:
            raise QuantizationError(
                f"{what}: modules_in_block_to_quantize leaves {', '.join(unlisted)} unquantized; "
                "checkpoints quantized only in part are not supported"
            )
    int4.require_kernels(target, what)
    method = gptq_module.GPTQLinearMethod(
        gptq_module.GPTQConfig(
            group_size=group_size,
            desc_act=bool(config.get("desc_act", False)),
            sym=bool(config.get("sym", True)),
            v1_zeros=fmt == "gptq",
        ),
        target,
    )
    return _quantization("gptq", method, target)


# -- AWQ -----------------------------------------------------------------------------------


def awq(config: dict, target: Target) -> Quantization:
    what = "AWQ checkpoint"
    bits = _int(config, ("bits", "w_bit"), what)
    if bits != 4:
        raise QuantizationError(f"{what}: {bits}-bit weights are not supported, only 4-bit (bits: 4)")
    group_size = _int(config, ("group_size", "q_group_size"), what)
    _check_group_size(group_size, what)
    version = str(config.get("version", "gemm")).lower()
    if version != "gemm":
        raise QuantizationError(f"{what}: version {version!r} is not supported, only the GEMM layout (version: gemm)")
    if not config.get("zero_point", True):
        raise QuantizationError(f"{what}: zero_point false is not supported, only AWQ with zero points")
    _check_not_skipped(config.get("modules_to_not_convert"), "modules_to_not_convert", what)
    int4.require_kernels(target, what)
    return _quantization("awq", awq_module.AWQLinearMethod(awq_module.AWQConfig(group_size), target), target)


# -- FP8 (quant_method fp8) ----------------------------------------------------------------


def fp8(config: dict, target: Target) -> Quantization:
    what = "FP8 checkpoint"
    fmt = str(config.get("fmt", "e4m3")).lower()
    if fmt != "e4m3":
        raise QuantizationError(f"{what}: fmt {fmt!r} is not supported, only e4m3 (float8_e4m3fn)")
    scheme = str(config.get("activation_scheme", "dynamic")).lower()
    if scheme not in ("dynamic", "static"):
        raise QuantizationError(f"{what}: activation_scheme {scheme!r} is not supported, only dynamic and static")
    if str(config.get("scale_fmt", "float")) != "float":
        raise QuantizationError(f"{what}: scale_fmt {config['scale_fmt']!r} is not supported, only float scales")
    for key in ("modules_to_not_convert", "ignored_layers"):
        _check_not_skipped(config.get(key), key, what)
    block = config.get("weight_block_size")
    if block is not None:
        if len(block) != 2 or any(isinstance(b, bool) or not isinstance(b, int) or b <= 0 for b in block):
            raise QuantizationError(f"{what}: weight_block_size must be two positive integers, got {block!r}")
        if scheme == "static":
            raise QuantizationError(f"{what}: static activation scales with block-wise weights are not supported")
        cfg = fp8_module.EightBitConfig(
            torch.float8_e4m3fn, "block", tuple(block), ("weight_scale_inv", "weight_scale"), "dynamic", "FP8"
        )
    else:
        cfg = fp8_module.EightBitConfig(
            torch.float8_e4m3fn, "tensor", None, ("weight_scale", "weight_scale_inv"), scheme, "FP8"
        )
    fp8_module.check_fp8_device(target, what)
    return _quantization("fp8", fp8_module.EightBitLinearMethod(cfg, target), target)


# -- compressed-tensors --------------------------------------------------------------------

_CT_SUPPORTED = (
    "supported compressed-tensors schemes: W4A16 (int4 weights, group or channel strategy, pack-quantized), "
    "W8A8 / W8A16 int8 (channel or tensor weights; dynamic per-token or static per-tensor activations), "
    "FP8 (tensor, channel or block weights; dynamic or static activations)"
)


def _ct_match(name: str, pattern: str) -> bool:
    """compressed-tensors' target matching for a linear module `name` ("re:" regex, exact name, or a class)."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern in (name, "Linear")


def _ct_args(args: dict | None, what: str) -> dict | None:
    """A QuantizationArgs dict with compressed-tensors' defaults filled in."""
    if args is None:
        return None
    a = {
        "num_bits": args.get("num_bits", 8),
        "type": str(args.get("type", "int")).lower(),
        "symmetric": args.get("symmetric", True),
        "group_size": args.get("group_size"),
        "strategy": args.get("strategy"),
        "block_structure": args.get("block_structure"),
        "dynamic": args.get("dynamic", False),
        "actorder": args.get("actorder"),
    }
    if a["strategy"] is None:
        a["strategy"] = "group" if a["group_size"] is not None else "tensor"
    a["strategy"] = str(a["strategy"]).lower()
    if a["strategy"] == "group" and (not isinstance(a["group_size"], int) or a["group_size"] <= 0):
        raise QuantizationError(f"{what}: group strategy with group_size {a['group_size']!r}")
    return a


def _describe(args: dict | None) -> str:
    if args is None:
        return "none"
    return (
        f"{args['type']}{args['num_bits']} {args['strategy']} "
        f"{'symmetric' if args['symmetric'] else 'asymmetric'}{' dynamic' if args['dynamic'] else ''}"
    )


def _ct_scheme(name: str, group, global_format: str | None) -> tuple:
    what = f"compressed-tensors config group {name!r}"
    if not isinstance(group, dict):
        raise QuantizationError(f"{what}: a preset reference ({group!r}) rather than a scheme is not supported")
    if group.get("output_activations") is not None:
        raise QuantizationError(f"{what}: output activation quantization is not supported")
    weights = _ct_args(group.get("weights"), what)
    inputs = _ct_args(group.get("input_activations"), what)
    fmt = group.get("format") or global_format
    if fmt in (None, "mixed-precision"):
        raise QuantizationError(f"{what}: no compression format (format) for the group")
    return weights, inputs, str(fmt)


def _ct_method(weights: dict | None, inputs: dict | None, fmt: str, target: Target):
    what = f"compressed-tensors scheme (weights {_describe(weights)}, activations {_describe(inputs)}, format {fmt})"
    if weights is None:
        raise QuantizationError(f"{what}: a scheme without weight quantization is not supported")
    if weights["type"] == "int" and weights["num_bits"] == 4:
        if inputs is not None:
            raise QuantizationError(
                f"{what}: int4 weights with quantized activations are not supported; {_CT_SUPPORTED}"
            )
        if fmt != "pack-quantized":
            raise QuantizationError(f"{what}: int4 weights are supported in the pack-quantized format only")
        if weights["strategy"] not in ("group", "channel"):
            raise QuantizationError(
                f"{what}: int4 {weights['strategy']} strategy is not supported, only group and channel"
            )
        actorder = weights["actorder"]
        act_order = actorder is True or str(actorder).lower() in ("group", "dynamic")
        group_size = weights["group_size"] if weights["strategy"] == "group" else -1
        int4.require_kernels(target, "compressed-tensors W4A16 checkpoint")
        cfg = ct_module.W4A16Config(group_size, bool(weights["symmetric"]), act_order)
        return ct_module.CompressedTensorsW4A16(cfg, target)
    if weights["num_bits"] != 8 or weights["type"] not in ("int", "float"):
        raise QuantizationError(f"{what}: not supported; {_CT_SUPPORTED}")
    is_fp8 = weights["type"] == "float"
    kind = "FP8" if is_fp8 else "int8"
    formats = ("float-quantized", "naive-quantized") if is_fp8 else ("int-quantized", "naive-quantized")
    if fmt not in formats:
        raise QuantizationError(f"{what}: {kind} weights are supported in the {' or '.join(formats)} formats")
    if not weights["symmetric"]:
        raise QuantizationError(f"{what}: asymmetric {kind} weights are not supported")
    strategies = ("tensor", "channel", "block") if is_fp8 else ("tensor", "channel")
    if weights["strategy"] not in strategies:
        raise QuantizationError(f"{what}: {kind} weights with the {weights['strategy']} strategy are not supported")
    block = None
    if weights["strategy"] == "block":
        block = weights["block_structure"]
        if not block or len(block) != 2:
            raise QuantizationError(f"{what}: block strategy without a block_structure of two sizes")
        block = tuple(int(b) for b in block)
    if inputs is None:
        activations = None
        if is_fp8 and target.device.type == "cuda":
            raise QuantizationError(f"{what}: FP8 weights with unquantized activations have no CUDA kernel")
    else:
        if inputs["type"] != weights["type"] or inputs["num_bits"] != 8:
            raise QuantizationError(f"{what}: {kind} weights need {kind} activations; {_CT_SUPPORTED}")
        if not inputs["symmetric"]:
            raise QuantizationError(f"{what}: asymmetric activation quantization is not supported")
        if inputs["dynamic"] is True:
            activations = "dynamic"
        elif inputs["dynamic"] is False and inputs["strategy"] == "tensor" and block is None:
            activations = "static"
        else:
            raise QuantizationError(
                f"{what}: activations {_describe(inputs)} are not supported, only dynamic, or static per tensor"
            )
    cfg = fp8_module.EightBitConfig(
        torch.float8_e4m3fn if is_fp8 else torch.int8,
        weights["strategy"],
        block,
        ("weight_scale",),
        activations,
        f"compressed-tensors {'FP8' if is_fp8 else 'int8'}",
    )
    if is_fp8:
        fp8_module.check_fp8_device(target, "compressed-tensors FP8 checkpoint")
    else:
        int4.require_kernels(target, "compressed-tensors int8 checkpoint")
    return fp8_module.EightBitLinearMethod(cfg, target)


def compressed_tensors(config: dict, target: Target) -> Quantization:
    what = "compressed-tensors checkpoint"
    sparsity = config.get("sparsity_config") or {}
    if sparsity and str(sparsity.get("format", "dense")) != "dense":
        raise QuantizationError(
            f"{what}: sparse weights (sparsity_config format {sparsity.get('format')}) are not supported"
        )
    if config.get("transform_config"):
        raise QuantizationError(f"{what}: transforms (transform_config: rotations) are not supported")
    if config.get("kv_cache_scheme") is not None:
        raise QuantizationError(f"{what}: a quantized KV cache (kv_cache_scheme) is not supported")
    groups = config.get("config_groups") or {}
    if not groups:
        raise QuantizationError(f"{what}: no config_groups")
    fmt = config.get("format")
    schemes = {name: _ct_scheme(name, group, fmt) for name, group in groups.items()}
    targets = {name: list(group.get("targets") or []) for name, group in groups.items()}
    ignore = list(config.get("ignore") or [])

    def groups_of(module: str) -> list[str]:
        return [g for g, patterns in targets.items() if any(_ct_match(module, p) for p in patterns)]

    chosen = None
    for module in decoder_linear_names():
        if any(_ct_match(module, p) for p in ignore):
            raise QuantizationError(
                f"{what}: {module} is in the ignore list (left unquantized); checkpoints with decoder linears "
                "left unquantized are not supported"
            )
        matched = groups_of(module)
        if not matched:
            raise QuantizationError(
                f"{what}: {module} is not targeted by any config group (left unquantized); checkpoints with "
                "decoder linears left unquantized are not supported"
            )
        for g in matched:
            if chosen is None:
                chosen = g
            elif schemes[g] != schemes[chosen]:
                raise QuantizationError(
                    f"{what}: decoder linears are quantized with different schemes (config groups {chosen!r} and "
                    f"{g!r}); one scheme for all of them is supported"
                )
    if groups_of("lm_head") and not any(_ct_match("lm_head", p) for p in ignore):
        raise QuantizationError(f"{what}: a quantized lm_head is not supported (it is not in the ignore list)")
    return _quantization("compressed-tensors", _ct_method(*schemes[chosen], target), target)


BUILDERS: dict[str, Callable[[dict, Target], Quantization]] = {
    "gptq": gptq,
    "awq": awq,
    "compressed-tensors": compressed_tensors,
    "fp8": fp8,
}
