"""Checkpoints we cannot serve exactly fail at startup, and the error names the problem."""

import json
import shutil

import pytest
import torch
from transformers import LlamaConfig

from shard import dist
from shard.config import ShardConfig
from shard.quantization import QuantizationError, Target, resolve
from shard.runner import ModelRunner
from tests.shard.quantization import writers as W

CPU = Target(torch.device("cpu"), torch.float32)


def _resolve(quantization_config: dict):
    return resolve(None, LlamaConfig(**W.TINY, quantization_config=quantization_config), CPU)


def _runner(model_dir):
    return ModelRunner(ShardConfig(model_dir=model_dir, device="cpu", dtype="float32", enforce_eager=True))


def _copy(tmp_path, kind: str, drop=(), **kw):
    """A copy of a shared test checkpoint, without the tensors `drop`."""
    from safetensors.torch import load_file, save_file

    model_dir = tmp_path / "model"
    shutil.copytree(W.cached(kind, **kw)[0], model_dir)
    if drop:
        tensors = load_file(model_dir / "model.safetensors")
        for name in drop:
            del tensors[name]
        save_file(tensors, model_dir / "model.safetensors")
    return model_dir


def _rewrite_config(model_dir, **changes):
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"].update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "missing, named",
    [
        ("model.layers.1.mlp.down_proj.scales", r"model.layers.1.mlp.down_proj.scales"),
        # one projection of a merged layer: its siblings' tensors fill the same parameter
        ("model.layers.0.self_attn.k_proj.scales", r"model.layers.0.self_attn.qkv_proj.scales \(k\)"),
        ("model.layers.0.mlp.up_proj.qzeros", r"model.layers.0.mlp.gate_up_proj.qzeros \(1\)"),
    ],
)
def test_missing_tensor(tmp_path, missing, named):
    model_dir = _copy(tmp_path, "gptq", drop=[missing], group_size=32, sym=False, v1=True)
    with pytest.raises(KeyError, match=f"missing from the checkpoint.*{named}"):
        _runner(model_dir)


def test_missing_per_tensor_fp8_scale(tmp_path):
    model_dir = _copy(tmp_path, "fp8", drop=["model.layers.0.self_attn.v_proj.weight_scale"], static_input=True)
    with pytest.raises(QuantizationError, match="lacks weight_scale for one of its projections"):
        _runner(model_dir)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_group_size_that_does_not_divide_the_inputs(tmp_path, method):
    model_dir = _copy(tmp_path, method, group_size=32, **(dict(sym=False, v1=True) if method == "gptq" else {}))
    _rewrite_config(model_dir, group_size=48)  # 128 and 256 input features
    with pytest.raises(QuantizationError, match="group size 48 does not divide a layer's 128 input features"):
        _runner(model_dir)


@pytest.mark.parametrize("method, bits", [("gptq", 8), ("gptq", 3), ("awq", 8)])
def test_bits_other_than_4(method, bits):
    config = dict(quant_method=method, bits=bits, group_size=128, desc_act=False, zero_point=True, version="gemm")
    with pytest.raises(QuantizationError, match=f"{bits}-bit weights are not supported, only 4-bit"):
        _resolve(config)


def test_unknown_quant_method(tmp_path):
    model_dir = _copy(tmp_path, "awq", group_size=32)
    _rewrite_config(model_dir, quant_method="hqq")
    with pytest.raises(QuantizationError, match="quantized with 'hqq', which is not supported"):
        _runner(model_dir)


@pytest.mark.parametrize(
    "config, message",
    [
        (dict(quant_method="awq", bits=4, group_size=128, version="gemv"), "version 'gemv' is not supported"),
        (
            dict(quant_method="awq", bits=4, group_size=128, modules_to_not_convert=["mlp.down_proj"]),
            "leaves decoder linears unquantized",
        ),
        (
            dict(quant_method="gptq", bits=4, group_size=128, checkpoint_format="marlin"),
            "checkpoint_format 'marlin' is not supported",
        ),
        (dict(quant_method="gptq", bits=4, group_size=128, lm_head=True), "quantized lm_head"),
        (dict(quant_method="gptq", bits=4, group_size=0), "group_size must be positive or -1"),
        (dict(quant_method="fp8", activation_scheme="dynamic", fmt="e5m2"), "fmt 'e5m2' is not supported"),
        (
            dict(quant_method="fp8", activation_scheme="static", weight_block_size=[128, 128]),
            "static activation scales with block-wise weights",
        ),
    ],
)
def test_unsupported_configs(config, message):
    with pytest.raises(QuantizationError, match=message):
        _resolve(config)


W4 = dict(num_bits=4, type="int", symmetric=True, strategy="group", group_size=128)


def _ct(groups: dict, ignore=("lm_head",), **extra) -> dict:
    return dict(
        quant_method="compressed-tensors", format="pack-quantized", config_groups=groups, ignore=list(ignore), **extra
    )


@pytest.mark.parametrize(
    "config, message",
    [
        (
            _ct({"g": dict(targets=["Linear"], weights=W4)}, ignore=["lm_head", "model.layers.3.mlp.down_proj"]),
            "model.layers.3.mlp.down_proj is in the ignore list",
        ),
        (
            _ct({"g": dict(targets=["Linear"], weights=W4)}, ignore=["lm_head", "re:.*self_attn.o_proj$"]),
            r"model.layers.0.self_attn.o_proj is in the ignore list",
        ),
        (_ct({"g": dict(targets=["re:.*mlp.*"], weights=W4)}), "self_attn.q_proj is not targeted by any config group"),
        (_ct({"g": dict(targets=["Linear"], weights=W4)}, ignore=[]), "quantized lm_head"),
        (
            _ct(
                {
                    "a": dict(targets=["re:.*self_attn.*"], weights=W4),
                    "b": dict(targets=["re:.*mlp.*"], weights=dict(W4, group_size=64)),
                }
            ),
            "different schemes",
        ),
        (_ct({"g": dict(targets=["Linear"], weights=dict(W4, num_bits=3))}), "not supported"),
        (
            _ct({"g": dict(targets=["Linear"], weights=W4, input_activations=dict(num_bits=8, type="int"))}),
            "int4 weights with quantized activations are not supported",
        ),
        (
            _ct({"g": dict(targets=["Linear"], weights=W4)}, kv_cache_scheme=dict(num_bits=8, type="float")),
            "kv_cache_scheme",
        ),
        (
            _ct({"g": dict(targets=["Linear"], weights=W4)}, sparsity_config=dict(format="sparse-24-bitmask")),
            "sparse weights",
        ),
    ],
)
def test_unsupported_compressed_tensors_configs(config, message):
    with pytest.raises(QuantizationError, match=message):
        _resolve(config)


def test_groups_that_do_not_fit_a_rank():
    """Row-parallel layers split their groups over the ranks: 128 input features of o_proj over 2 ranks leave
    64 per rank, not a whole group of 128. Act-order checkpoints keep every group on every rank instead."""
    from shard.models import build_model

    config = LlamaConfig(**W.TINY)
    dist._rank, dist._size = 0, 2  # as if there were 2 ranks: building the model runs no collective
    try:
        gptq = dict(quant_method="gptq", bits=4, group_size=128, desc_act=False)
        with pytest.raises(QuantizationError, match="64 input features per rank are not a multiple of the group size"):
            build_model(config, _resolve(gptq))
        build_model(config, _resolve(dict(gptq, desc_act=True)))
    finally:
        dist._rank, dist._size = 0, 1


def test_g_idx_that_contradicts_desc_act(tmp_path):
    model_dir = _copy(tmp_path, "gptq", group_size=32, desc_act=True)
    _rewrite_config(model_dir, desc_act=False)
    with pytest.raises(QuantizationError, match="g_idx that is not sequential"):
        _runner(model_dir)
