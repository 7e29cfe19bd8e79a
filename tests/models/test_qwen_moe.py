"""Qwen2-MoE (shared expert, a dense layer) and Qwen3-MoE (renormalized top-k, q/k norms) against
transformers on tiny random checkpoints; the sparse-MoE layer's CPU path against a per-token loop."""

import pytest
import torch
import transformers
from torch.nn import functional as F

from shard import quantization
from shard.layers.moe import FusedMoE
from shard.models import build_model
from tests.models import harness

COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=48,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts_per_tok=2,
    max_position_embeddings=512,
)
QWEN2_MOE = dict(COMMON, num_hidden_layers=3, num_experts=6, shared_expert_intermediate_size=80, mlp_only_layers=[1])
QWEN3_MOE = dict(COMMON, num_hidden_layers=2, num_experts=8, head_dim=32, norm_topk_prob=True)
CPU_FP32 = quantization.Target(torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def qwen2_moe_dir(tmp_path_factory):
    return harness.write_checkpoint(tmp_path_factory.mktemp("qwen2-moe"), "Qwen2MoeForCausalLM", **QWEN2_MOE)


@pytest.fixture(scope="module")
def qwen3_moe_dir(tmp_path_factory):
    return harness.write_checkpoint(tmp_path_factory.mktemp("qwen3-moe"), "Qwen3MoeForCausalLM", **QWEN3_MOE)


def test_qwen2_moe_prefill_and_decode_match_transformers(qwen2_moe_dir):
    harness.check_prefill_and_decode(qwen2_moe_dir)


def test_qwen2_moe_chunked_prefill_matches_transformers(qwen2_moe_dir):
    harness.check_chunked_prefill(qwen2_moe_dir)


def test_qwen2_moe_tensor_parallel_matches_one_rank(qwen2_moe_dir):
    """The shared expert's and the routed experts' partial sums meet in one all-reduce."""
    harness.check_tensor_parallel(qwen2_moe_dir, world_size=2)


def test_qwen3_moe_prefill_and_decode_match_transformers(qwen3_moe_dir):
    harness.check_prefill_and_decode(qwen3_moe_dir)


def test_qwen3_moe_greedy_over_http_matches_generate(tmp_path_factory):
    model_dir = harness.with_bundled_tokenizer(
        tmp_path_factory.mktemp("qwen3-moe-http"), "Qwen3MoeForCausalLM", **QWEN3_MOE
    )
    harness.check_http_greedy(model_dir)


@pytest.mark.parametrize("arch", ["Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"])
def test_sparse_layers_are_where_transformers_puts_them(arch):
    """decoder_sparse_step and mlp_only_layers pick the sparse layers as in transformers."""
    config = getattr(transformers, arch).config_class(
        architectures=[arch],
        **dict(COMMON, num_hidden_layers=6, num_experts=4, decoder_sparse_step=2, mlp_only_layers=[3]),
    )
    with torch.device("meta"):
        hf = getattr(transformers, arch)(config)
        ours = build_model(config, quantization.none(CPU_FP32))
    expected = [type(layer.mlp).__name__.endswith("SparseMoeBlock") for layer in hf.model.layers]
    assert (
        [isinstance(layer.mlp, FusedMoE) for layer in ours.model.layers]
        == expected
        == [False, True, False, False, False, True]
    )


@pytest.mark.parametrize("renormalize", [False, True])
def test_sparse_block_matches_a_per_token_loop(renormalize):
    """The layer's CPU path (fp32 softmax routing, assignments grouped by expert, the shared expert
    behind its sigmoid gate) against the definition, token by token."""
    torch.manual_seed(0)
    hidden, inter, experts, top_k, shared = 32, 24, 6, 3, 40
    layer = FusedMoE(hidden, inter, experts, top_k, renormalize, quantization.none(CPU_FP32), shared)
    for p in layer.parameters():
        p.data.normal_(0, 0.3)
    router, w13, w2 = layer.gate.weight, layer.w13.weight, layer.w2.weight
    shared_gate, shared_up = layer.shared_expert.gate_up_proj.weight.chunk(2)
    shared_down, shared_sigmoid = layer.shared_expert.down_proj.weight, layer.shared_expert_gate.weight[0]
    x = torch.randn(37, hidden)
    expected = torch.empty_like(x)
    for t, xt in enumerate(x):
        weights, ids = torch.softmax(router @ xt, dim=-1).topk(top_k)
        if renormalize:
            weights = weights / weights.sum()
        out = sum(w * (w2[e] @ (F.silu(w13[e, :inter] @ xt) * (w13[e, inter:] @ xt))) for w, e in zip(weights, ids))
        shared_out = shared_down @ (F.silu(shared_gate @ xt) * (shared_up @ xt))
        expected[t] = out + torch.sigmoid(shared_sigmoid @ xt) * shared_out
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
