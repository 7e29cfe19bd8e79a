"""GPTBigCode against transformers: multi-query attention (its one KV head replicated on each of
two ranks), learned position embeddings, and the variant with a KV head per head and unscaled
scores; greedy tokens over HTTP."""

import pytest

from tests.models import harness

ARCH = "GPTBigCodeForCausalLM"
CONFIG = dict(n_embd=64, n_layer=2, n_head=4, n_positions=256)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return harness.write_checkpoint(tmp_path_factory.mktemp("bigcode"), ARCH, **CONFIG)


def test_prefill_and_decode_match_transformers(model_dir):
    harness.check_prefill_and_decode(model_dir)


def test_multi_head_unscaled_variant_matches_transformers(tmp_path):
    """multi_query=False (c_attn fused per head), scale_attn_weights=False, exact GELU."""
    config = dict(CONFIG, multi_query=False, scale_attn_weights=False, activation_function="gelu")
    harness.check_prefill_and_decode(
        harness.write_checkpoint(tmp_path, ARCH, seed=1, std=0.1, **config), prompt_lens=(21, 40), decode_steps=2
    )


def test_chunked_prefill_reads_the_cached_prefix(model_dir):
    harness.check_chunked_prefill(model_dir)


def test_two_ranks_replicating_the_kv_head_match_one(model_dir):
    harness.check_tensor_parallel(model_dir)


def test_greedy_over_http_matches_generate(tmp_path):
    harness.check_http_greedy(harness.with_bundled_tokenizer(tmp_path, ARCH, **CONFIG))
