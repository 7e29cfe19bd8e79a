"""Mixtral against transformers on a tiny random checkpoint: prefill, chunked prefill and decode
logits, TP=2 against TP=1, greedy tokens over HTTP; and --quantize refused at startup."""

import pytest

from shard.quantization import QuantizationError
from tests.models import harness

ARCH = "MixtralForCausalLM"
CONFIG = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=512,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return harness.write_checkpoint(tmp_path_factory.mktemp("mixtral"), ARCH, **CONFIG)


def test_prefill_and_decode_match_transformers(model_dir):
    harness.check_prefill_and_decode(model_dir, compiled=True)


def test_chunked_prefill_matches_transformers(model_dir):
    harness.check_chunked_prefill(model_dir)


def test_tensor_parallel_matches_one_rank(model_dir):
    harness.check_tensor_parallel(model_dir, world_size=2)


def test_greedy_over_http_matches_generate(tmp_path_factory):
    model_dir = harness.with_bundled_tokenizer(tmp_path_factory.mktemp("mixtral-http"), ARCH, **CONFIG)
    harness.check_http_greedy(model_dir)


def test_quantize_is_refused_at_startup_naming_the_experts(model_dir):
    """The experts have no quantized kernels: --quantize fails the shard's startup, with the reason,
    instead of serving full-precision experts under a quantized name."""
    with pytest.raises(QuantizationError, match="expert weights are served unquantized only; drop --quantize"):
        harness.runner(model_dir, quantize="int8")
