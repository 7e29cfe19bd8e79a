"""Gemma 3 (text) against transformers: q/k norms, a local layer rotating by rope_local_base_freq
and a global one by rope_theta with linear scaling, contexts past the window, two ranks, greedy
tokens over HTTP."""

import pytest
import transformers

from tests.models import harness

# float32 as transformers computes (bf16, this CPU's default, flips near-ties); a KV pool of 1024
# tokens rather than the default 4 GiB, which takes seconds to allocate
ARCH = "Gemma3ForCausalLM"
CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    layer_types=["sliding_attention", "full_attention"],
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    query_pre_attn_scalar=16,
    sliding_window=16,
    max_position_embeddings=256,
    rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
    },
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return harness.write_checkpoint(tmp_path_factory.mktemp("gemma3"), ARCH, **CONFIG)


def test_prefill_and_decode_match_transformers(model_dir):
    harness.check_prefill_and_decode(model_dir)


def test_chunked_prefill_reads_the_cached_prefix(model_dir):
    harness.check_chunked_prefill(model_dir)


def test_two_ranks_match_one(model_dir):
    harness.check_tensor_parallel(model_dir)


def test_greedy_over_http_matches_generate(tmp_path):
    harness.check_http_greedy(harness.with_bundled_tokenizer(tmp_path, ARCH, **CONFIG))


def test_attention_soft_capping_fails_at_load():
    """transformers' Gemma 3 ignores attn_logit_softcapping; serving it either way would be a guess."""
    from shard.models.gemma3 import Gemma3ForCausalLM

    config = transformers.Gemma3TextConfig(architectures=[ARCH], attn_logit_softcapping=50.0, **CONFIG)
    with pytest.raises(ValueError, match="attn_logit_softcapping"):
        Gemma3ForCausalLM(config, None)
