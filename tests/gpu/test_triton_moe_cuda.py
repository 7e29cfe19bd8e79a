"""The fused-MoE Triton kernels on CUDA: at served models' expert shapes in bf16 and fp16 against the
grouped torch path in fp32 on the same (rounded) inputs; captured in a CUDA graph and replayed on new
routing; and whole tiny MoE models decoding under CUDA graphs with transformers' greedy tokens."""

import pytest
import torch

from shard.config import ShardConfig
from shard.kernels import moe, triton_moe
from shard.runner import ModelRunner
from tests.gpu.test_cuda_graphs import _greedy
from tests.models import harness
from tests.models.test_mixtral import CONFIG as MIXTRAL
from tests.models.test_qwen_moe import QWEN2_MOE

pytestmark = pytest.mark.gpu

# (experts, top_k, hidden, intermediate per rank): Mixtral-8x7B at TP=2, Qwen1.5-MoE-A2.7B, Qwen3-30B-A3B
SHAPES = {
    "mixtral-8x7b-tp2": (8, 2, 4096, 7168),
    "qwen1.5-moe": (60, 4, 2048, 1408),
    "qwen3-30b-a3b": (128, 8, 2048, 768),
}
# h and each expert's output are rounded to the dtype before the fp32 sum over top_k: ~2 units in the last place
TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _problem(num_tokens: int, shape: str, dtype: torch.dtype):
    experts, top_k, hidden, inter = SHAPES[shape]
    x = torch.randn(num_tokens, hidden, device="cuda").to(dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, device="cuda") / hidden**0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, device="cuda") / inter**0.5).to(dtype)
    weights, ids = torch.softmax(torch.randn(num_tokens, experts, device="cuda"), dim=-1).topk(top_k, dim=-1)
    return x, w13, w2, weights, ids


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("num_tokens", [1, 7, 256, 2048])  # decode-sized blocks, then prefill-sized
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_experts_at_served_shapes(shape, num_tokens, dtype):
    x, w13, w2, weights, ids = _problem(num_tokens, shape, dtype)
    out = triton_moe.fused_experts(x, w13, w2, weights, ids)
    ref = moe.grouped_experts(x.float(), w13.float(), w2.float(), weights, ids)
    tol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref, atol=tol * ref.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("num_tokens", [4, 96])
def test_fused_experts_replay_from_a_cuda_graph(num_tokens):
    """Alignment and kernels run without a host sync, so a decode step captures; a replay on new
    tokens and new routing gives the eager result."""
    x, w13, w2, weights, ids = _problem(num_tokens, "qwen3-30b-a3b", torch.bfloat16)
    triton_moe.fused_experts(x, w13, w2, weights, ids)  # compiles the kernels outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_moe.fused_experts(x, w13, w2, weights, ids)
    x2, _, _, weights2, ids2 = _problem(num_tokens, "qwen3-30b-a3b", torch.bfloat16)
    x.copy_(x2)
    weights.copy_(weights2)
    ids.copy_(ids2)
    graph.replay()
    torch.testing.assert_close(out, triton_moe.fused_experts(x, w13, w2, weights, ids), atol=0, rtol=0)


@pytest.mark.parametrize("arch, config", [("MixtralForCausalLM", MIXTRAL), ("Qwen2MoeForCausalLM", QWEN2_MOE)])
def test_tiny_moe_models_decode_transformers_tokens_under_cuda_graphs(tmp_path, arch, config):
    """float32 (the kernels multiply fp32 without TF32): prefill then decode steps replayed from graphs,
    three requests in a bucket of four (a padding row routes through the experts too)."""
    model_dir = harness.write_checkpoint(tmp_path, arch, **config)
    runner = ModelRunner(ShardConfig(model_dir=model_dir, dtype="float32", cuda_graphs=(1, 2, 4, 8)))
    runner.warmup(max_prefill_tokens=256, max_batch_size=8, max_num_blocks=64)
    assert runner.decode_graphs is not None
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, harness.VOCAB, (n,), generator=g).tolist() for n in (5, 23, 40)]
    steps = 8
    hf = harness.hf_model(model_dir)  # on the CPU
    expected = []
    for prompt in prompts:
        ids = list(prompt)
        for _ in range(steps + 1):
            ids.append(int(harness.hf_logits(hf, ids)[-1].argmax()))
        expected.append(ids[len(prompt) :])
    assert _greedy(runner, prompts, steps) == expected
