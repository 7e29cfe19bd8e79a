"""oneDNN-packed CPU linears compute what F.linear does, and the runner uses them on CPU."""

import pytest
import torch

from shard.config import ShardConfig, default_cache_dir
from shard.kernels import cpu_native
from shard.layers.linear import ReplicatedLinear
from shard.runner import ModelRunner
from shard.sampler import SamplingParams
from shard.step import Batch, RequestState

cpu_native.load(default_cache_dir())  # packing needs the C++ kernels; a machine that cannot build them fails here
pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")


@pytest.mark.parametrize("rows", [0, 1, 7, 33, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_f_linear(rows, bias):
    g = torch.Generator().manual_seed(rows)
    layer = ReplicatedLinear(96, 80, bias=bias)
    layer.weight.data.copy_(torch.randn(80, 96, generator=g))
    if bias:
        layer.bias.data.copy_(torch.randn(80, generator=g))
    x = torch.randn(rows, 192, generator=g)[:, ::2]  # strided input, as a slice of a wider tensor
    expected = torch.nn.functional.linear(x, layer.weight, layer.bias)
    layer.process_weights_after_loading()
    assert layer.packed_weight is not None
    assert not hasattr(layer, "weight")  # the dense copy is released
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_bfloat16_weights_pack_only_where_onednn_runs_them():
    """oneDNN refuses bf16 weights on AVX2-only CPUs: there the layer keeps F.linear, and computes the same."""
    g = torch.Generator().manual_seed(5)
    layer = ReplicatedLinear(96, 80).to(torch.bfloat16)
    layer.weight.data.copy_(torch.randn(80, 96, generator=g))
    x = torch.randn(3, 96, generator=g).bfloat16()
    expected = torch.nn.functional.linear(x.float(), layer.weight.float()).bfloat16()
    layer.process_weights_after_loading()
    assert (layer.packed_weight is not None) == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    torch.testing.assert_close(layer(x), expected, rtol=2**-7, atol=1e-2)


def test_unsupported_weights_stay_dense():
    layer = ReplicatedLinear(8, 8).to(torch.float64)
    layer.process_weights_after_loading()
    assert layer.packed_weight is None and layer.weight.shape == (8, 8)


def test_runner_logits_are_the_same_with_and_without_packing(tiny_model_dir):
    # eager: the packed weights' math is what differs (the compiled forward over them: test_compiled_forward)
    ids = torch.randint(2, 384, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    logits = []
    for gemm in ("aten", "onednn"):
        runner = ModelRunner(
            ShardConfig(model_dir=tiny_model_dir, device="cpu", dtype="float32", cpu_gemm=gemm, enforce_eager=True)
        )
        layers = [m for m in runner.model.modules() if hasattr(m, "quant_method")]
        packed = [m.packed_weight is not None for m in layers] + [runner.model.lm_head.head.packed_weight is not None]
        assert all(packed) if gemm == "onednn" else not any(packed)
        runner.warmup(64, 4, max_num_blocks=8)
        state = RequestState(0, ids, len(ids), 0, [1, 2, 3], SamplingParams())
        logits.append(runner.forward(Batch([state], [len(ids)]), sample_rows_override=torch.arange(40)))
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=1e-4)
