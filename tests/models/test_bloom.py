"""BLOOM against transformers: ALiBi (slopes of each rank's heads over two ranks), fused per-head
q/k/v, the embedding LayerNorm, and the variant with 6 heads (slopes past the power of two) and
the residual taken after each norm; greedy tokens over HTTP."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from shard import quantization
from shard.loader import load_weights
from shard.models import build_model
from tests.models import harness

ARCH = "BloomForCausalLM"
# BLOOM's config has no max_position_embeddings (2048 are served): requests of up to 256 tokens fit the
# harness's small KV pool
SERVER_FLAGS = ("--max-total-tokens", "256")
CONFIG = dict(hidden_size=64, n_layer=2, n_head=4)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return harness.write_checkpoint(tmp_path_factory.mktemp("bloom"), ARCH, **CONFIG)


def test_prefill_and_decode_match_transformers(model_dir):
    harness.check_prefill_and_decode(model_dir, compiled=True)


def test_six_heads_residual_after_norm_match_transformers(tmp_path):
    config = dict(CONFIG, hidden_size=96, n_head=6, apply_residual_connection_post_layernorm=True)
    harness.check_prefill_and_decode(
        harness.write_checkpoint(tmp_path, ARCH, seed=1, **config), prompt_lens=(21, 40), decode_steps=2
    )


def test_chunked_prefill_reads_the_cached_prefix(model_dir):
    harness.check_chunked_prefill(model_dir)


def test_two_ranks_match_one(model_dir):
    harness.check_tensor_parallel(model_dir)


def test_greedy_over_http_matches_generate(tmp_path):
    harness.check_http_greedy(harness.with_bundled_tokenizer(tmp_path, ARCH, **CONFIG), *SERVER_FLAGS)


def test_checkpoint_without_the_transformer_prefix_loads(model_dir, tmp_path):
    """BigScience's checkpoints name their tensors as BloomModel's (h.0..., not transformer.h.0...)."""
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(model_dir / "model.safetensors").items()}
    save_file(tensors, tmp_path / "model.safetensors")
    target = quantization.Target(torch.device("cpu"), torch.float32, cpu_gemm="aten")
    model = build_model(AutoConfig.from_pretrained(model_dir), quantization.none(target))
    load_weights(model, tmp_path)
    for name, param in model.named_parameters():
        if "query_key_value" not in name:  # stored per head there, q|k|v here
            assert torch.equal(param, tensors[name.removeprefix("transformer.")]), name
