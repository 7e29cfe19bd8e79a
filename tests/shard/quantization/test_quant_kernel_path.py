"""The CUDA path of the pre-quantized formats, run on CPU: weights repacked at load into the layouts of
shard/kernels/triton_quant.py and multiplied by its functions (its W4A16 Triton kernel under the interpreter
for act-order GPTQ, elsewhere its torch dequantization of the same layout, which is faster there; its int8 GEMM
through oneDNN, its fp8 GEMM through torch._scaled_mm on CPU), the first decoder layer's linears against the same
checkpoint served dequantized, on one rank and on each of two ranks (the ranks simulated in one process: loading
runs no collective). With two ranks an act-order GPTQ layer's input features come from groups scattered over the
ranks: the repacking sorts and pads them into whole groups.

Tolerances: 4-bit weights dequantize to the same float32 values on both paths, so the outputs differ by summation
order (1e-4 relative to the output's scale). The 8-bit kernels also quantize the activations (per token to int8,
per tensor to e4m3), which the dequantized path does not: there the check is a relative error below 3% (int8) and
8% (e4m3: 3 mantissa bits), far under what a wrong scale, permutation or slice would give (order 100%).
"""

import os

import pytest
import torch

from shard import dist
from tests.shard.quantization import writers as W

pytest.importorskip("triton")


def _patch(monkeypatch, triton_kernel: bool):
    from shard.kernels import triton_quant
    from shard.quantization import int4

    # torch._scaled_mm also runs on CPU; fp8_linear itself insists on CUDA
    monkeypatch.setattr(triton_quant, "fp8_linear", lambda *a: triton_quant._fp8_linear(*a, per_token=False))
    if not triton_kernel:  # the interpreter is slow: elsewhere the 4-bit GEMM is the module's own torch dequantization
        monkeypatch.setattr(
            triton_quant,
            "w4a16_linear",
            lambda x, qw, s, z, gs, bias=None: torch.nn.functional.linear(
                x, triton_quant.dequantize_w4(qw, s, z, gs, torch.float32).t(), bias
            ),
        )
    monkeypatch.setattr(int4, "kernels", lambda: triton_quant)


@pytest.fixture
def kernels(monkeypatch):
    _patch(monkeypatch, triton_kernel=False)


@pytest.fixture
def triton_kernels(monkeypatch):
    if os.environ.get("TRITON_INTERPRET") != "1":  # tests/conftest.py sets it on machines without a GPU
        pytest.skip("the Triton kernel runs on these CPU tensors under the interpreter only")
    _patch(monkeypatch, triton_kernel=True)


def _layers(model):  # the first decoder layer's: the others are built alike
    for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
        yield name, model.model.layers[0].get_submodule(name)


def _compare(model_dir, tp: int, rel_tol: float, expect_padding: bool = False) -> None:
    g = torch.Generator().manual_seed(0)
    padded = []
    try:
        for rank in range(tp):
            dist._rank, dist._size = rank, tp
            fast, dense = W.shard_model(model_dir, kernels=True), W.shard_model(model_dir)
            for (name, f), (_, d) in zip(_layers(fast), _layers(dense)):
                assert "weight" not in f._parameters, f"{name} was dequantized on the kernel path"
                x = torch.randn(5, 3, f.shape.input_size, generator=g)
                got = f.quant_method.apply(f, x, f.bias)
                expected = d.quant_method.apply(d, x, d.bias)
                err = (got - expected).norm() / expected.norm()
                assert err < rel_tol, f"rank {rank} of {tp}, layer {name}: relative error {err:.2e}"
                padded.append(bool(getattr(f, "w4_padded", False)))
    finally:
        dist._rank, dist._size = 0, 1
    assert any(padded) == expect_padding


@pytest.mark.parametrize("tp", [1, 2])
def test_gptq_act_order_through_the_triton_kernel(triton_kernels, tp):
    model_dir, _ = W.cached("gptq", group_size=32, desc_act=True)
    _compare(model_dir, tp, 1e-4, expect_padding=tp == 2)


@pytest.mark.parametrize("fmt", ["gptq-v1", "gptq-per-channel", "awq", "ct-w4a16-act-order"])
def test_4bit_formats_on_two_ranks(kernels, fmt):
    if fmt == "awq":
        model_dir, _ = W.cached("awq", group_size=32)
    elif fmt == "ct-w4a16-act-order":
        model_dir, _ = W.cached("ct-actorder", group_size=32)
    elif fmt == "gptq-v1":
        model_dir, _ = W.cached("gptq", group_size=32, sym=False, v1=True)
    else:
        model_dir, _ = W.cached("gptq", group_size=-1)
    _compare(model_dir, 2, 1e-4, expect_padding=fmt.endswith("act-order"))


CT_TOLERANCE = {"w4a16-asym-group": 1e-4, "w8a8-int8-static": 0.03, "fp8-dynamic": 0.08}


@pytest.mark.parametrize("name", list(CT_TOLERANCE))
def test_compressed_tensors_on_two_ranks(kernels, name):
    pytest.importorskip("compressed_tensors")
    weights, inputs, fmt = W.CT_SCHEMES[name]
    model_dir, _ = W.cached("ct", weights=weights, input_activations=inputs, fmt=fmt)
    _compare(model_dir, 2, CT_TOLERANCE[name])


def test_fp8_per_tensor_checkpoint(kernels):
    model_dir, _ = W.cached("fp8", static_input=True)
    _compare(model_dir, 1, 0.08)


def test_quantize_fp8_on_the_fly(kernels):
    """`--quantize fp8`: each output channel scaled so that its largest weight becomes e4m3's 448."""
    from shard.layers.linear import ReplicatedLinear
    from shard.quantization import Target, fp8

    g = torch.Generator().manual_seed(0)
    layer = ReplicatedLinear(
        128, 96, bias=True, quant=fp8.Fp8OnTheFlyMethod(Target(torch.device("cpu"), torch.float32))
    )
    layer.quant_method.use_kernels = True
    weight, bias = torch.randn(96, 128, generator=g), torch.randn(96, generator=g)
    layer.weight.data.copy_(weight)
    layer.bias.data.copy_(bias)
    layer.process_weights_after_loading()
    assert layer.q_weight.dtype == torch.float8_e4m3fn and "weight" not in layer._parameters
    torch.testing.assert_close(layer.q_scale, weight.abs().amax(dim=1) / 448.0)
    torch.testing.assert_close(layer.q_weight.float() * layer.q_scale[:, None], weight, rtol=0.07, atol=1e-3)
    x = torch.randn(7, 128, generator=g)
    expected = torch.nn.functional.linear(x, weight, bias)
    assert (layer(x) - expected).norm() / expected.norm() < 0.08
