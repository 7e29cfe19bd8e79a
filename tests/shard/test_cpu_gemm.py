"""Packed CPU linears (oneDNN, our AMX and AVX2 kernels) compute what F.linear does, and the runner uses them on CPU."""

import pytest
import torch

from shard.config import ShardConfig, default_cache_dir
from shard.kernels import cpu_gemm, cpu_native
from shard.layers.linear import ReplicatedLinear
from shard.quantization.base import UnquantizedLinearMethod
from shard.runner import ModelRunner
from shard.sampler import SamplingParams
from shard.step import Batch, RequestState

cpu_native.load(default_cache_dir())  # packing needs the C++ kernels; a machine that cannot build them fails here
HAS_AVX2 = torch.ops.sluice_cpu.dense_avx2_available()
HAS_AMX = torch.ops.sluice_cpu.dense_amx_available()
KERNELS = [
    pytest.param("onednn", marks=pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN")),
    pytest.param("avx2", marks=pytest.mark.skipif(not HAS_AVX2, reason="CPU without AVX2")),
]
AMX = pytest.param("amx", marks=pytest.mark.skipif(not HAS_AMX, reason="CPU without AMX"))


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("rows", [0, 1, 2, 7, 33, 300])  # 300: more than the AVX2 kernels' 48-row chunk
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_f_linear(kernels, rows, bias):
    g = torch.Generator().manual_seed(rows)
    layer = ReplicatedLinear(97, 83, bias=bias)  # neither a multiple of 16 outputs nor of 4 inputs
    layer.quant_method = UnquantizedLinearMethod(kernels)
    layer.weight.data.copy_(torch.randn(83, 97, generator=g))
    if bias:
        layer.bias.data.copy_(torch.randn(83, generator=g))
    x = torch.randn(rows, 194, generator=g)[:, ::2]  # strided input, as a slice of a wider tensor
    expected = torch.nn.functional.linear(x, layer.weight, layer.bias)
    layer.process_weights_after_loading()
    assert layer.packed_weight is not None and layer.packed_weight.kernels == kernels
    assert not hasattr(layer, "weight")  # the dense copy is released
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernels", [*KERNELS, AMX])
@pytest.mark.parametrize("rows", [0, 1, 5, 17, 33, 60, 300])  # 17, 33: tiles of 16 and 32 rows; 300: oneDNN's for AMX
@pytest.mark.parametrize("shape", [(80, 96), (83, 97)])  # AMX: N a multiple of 32 or not, K of 32 or not
def test_bfloat16_weights_pack_where_the_kernels_run_them(kernels, rows, shape):
    """oneDNN refuses bf16 weights on AVX2-only CPUs (the layer keeps F.linear there); the AVX2
    kernels widen them to float32 in registers; the AMX ones multiply bf16 pairs on tiles. Either
    way: F.linear's result in float32 (bias included), rounded to bfloat16 (to within one bf16
    rounding: the sums' order differs)."""
    g = torch.Generator().manual_seed(5)
    n, k = shape
    layer = ReplicatedLinear(k, n, bias=True).to(torch.bfloat16)
    layer.quant_method = UnquantizedLinearMethod(kernels)
    layer.weight.data.copy_(torch.randn(n, k, generator=g))
    layer.bias.data.copy_(torch.randn(n, generator=g))
    x = torch.randn(rows, 2 * k, generator=g).bfloat16()[:, ::2]  # strided, as a slice of a wider tensor
    expected = torch.nn.functional.linear(x.float(), layer.weight.float(), layer.bias.float()).bfloat16()
    layer.process_weights_after_loading()
    packs = kernels != "onednn" or torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert (layer.packed_weight is not None) == packs
    out = layer(x)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, n)
    torch.testing.assert_close(out, expected, rtol=2**-7, atol=2e-2)


@pytest.mark.skipif(not HAS_AMX, reason="CPU without AMX")
def test_amx_takes_only_bfloat16_weights():
    """`amx` (and `auto` on a CPU with AMX) packs bfloat16 weights; float32 ones keep oneDNN under
    `auto` and F.linear under an explicit `amx`."""
    assert cpu_gemm.resolve("auto", torch.bfloat16) == "amx"
    assert cpu_gemm.resolve("auto", torch.float32) != "amx"
    assert not cpu_gemm.available(torch.randn(64, 64), "amx")
    assert cpu_gemm.PackedWeight(torch.randn(64, 64).bfloat16()).kernels == "amx"


@pytest.mark.parametrize(
    ("capability", "expected"), [("AVX2", "avx2"), ("AVX512", "onednn"), ("AVX512_BF16", "onednn")]
)
def test_auto_takes_the_avx2_kernels_only_without_avx512(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert cpu_gemm.resolve("auto") == (expected if HAS_AVX2 else "onednn")
    assert cpu_gemm.resolve("aten") == "aten"
    with pytest.raises(ValueError, match="must be one of auto, onednn, amx, avx2, aten"):
        cpu_gemm.resolve("mkl")


def test_unsupported_weights_stay_dense():
    layer = ReplicatedLinear(8, 8).to(torch.float64)
    layer.process_weights_after_loading()
    assert layer.packed_weight is None and layer.weight.shape == (8, 8)


def test_runner_logits_are_the_same_with_and_without_packing(tiny_model_dir):
    # eager: the packed weights' math is what differs (the compiled forward over them: test_compiled_forward)
    ids = torch.randint(2, 384, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    logits = []
    for gemm in ("aten", "onednn", "avx2"):
        if gemm == "avx2" and not HAS_AVX2:
            continue
        runner = ModelRunner(
            ShardConfig(model_dir=tiny_model_dir, device="cpu", dtype="float32", cpu_gemm=gemm, enforce_eager=True)
        )
        layers = [m for m in runner.model.modules() if hasattr(m, "quant_method")]
        packed = [m.packed_weight is not None for m in layers] + [runner.model.lm_head.head.packed_weight is not None]
        assert all(packed) if gemm != "aten" else not any(packed)
        runner.warmup(64, 4, max_num_blocks=8)
        state = RequestState(0, ids, len(ids), 0, [1, 2, 3], SamplingParams())
        logits.append(runner.forward(Batch([state], [len(ids)]), sample_rows_override=torch.arange(40)))
    for packed_logits in logits[1:]:
        torch.testing.assert_close(packed_logits, logits[0], rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    ("kernels", "dtype"),
    [
        pytest.param("avx2", torch.float32, marks=pytest.mark.skipif(not HAS_AVX2, reason="CPU without AVX2")),
        pytest.param("avx2", torch.bfloat16, marks=pytest.mark.skipif(not HAS_AVX2, reason="CPU without AVX2")),
        pytest.param("amx", torch.bfloat16, marks=pytest.mark.skipif(not HAS_AMX, reason="CPU without AMX")),
    ],
)
def test_rows_come_out_the_same_alone_or_in_any_batch(kernels, dtype):
    """Each output sums its products in k order whatever the tile, so a request's logits do not
    depend on what it is batched with (the grammar tests compare a row alone and batched exactly)."""
    g = torch.Generator().manual_seed(9)
    weight = cpu_gemm.PackedWeight(torch.randn(200, 576, generator=g).to(dtype), kernels)
    x = torch.randn(50, 576, generator=g).to(dtype)
    batched = cpu_gemm.linear(x, weight, None)
    for rows in (1, 2, 3, 7, 13, 17, 33):
        assert torch.equal(cpu_gemm.linear(x[:rows], weight, None), batched[:rows])
