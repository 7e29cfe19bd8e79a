"""Falcon against transformers in its variants: the new decoder architecture (grouped KV heads,
ln_attn/ln_mlp; sliced over two ranks), the old one with multi-query attention in parallel, and
the old one with ALiBi, a KV head per head and attention then MLP in sequence (Falcon-RW);
greedy tokens over HTTP."""

import pytest

from tests.models import harness

ARCH = "FalconForCausalLM"
BASE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256)
NEW = dict(BASE, new_decoder_architecture=True, num_kv_heads=2)
OLD_MULTI_QUERY = dict(BASE, new_decoder_architecture=False, multi_query=True, parallel_attn=True)
# 4 heads: slopes are powers of two, so transformers' bfloat16 ALiBi table is exact at these lengths
OLD_ALIBI = dict(BASE, new_decoder_architecture=False, multi_query=False, parallel_attn=False, alibi=True, bias=True)


@pytest.fixture(scope="module")
def new_architecture(tmp_path_factory):
    return harness.write_checkpoint(tmp_path_factory.mktemp("falcon-new"), ARCH, **NEW)


def test_new_architecture_prefill_and_decode_match_transformers(new_architecture):
    harness.check_prefill_and_decode(new_architecture)


@pytest.mark.parametrize("config", [OLD_MULTI_QUERY, OLD_ALIBI], ids=["multi-query", "alibi"])
def test_old_architecture_prefill_and_decode_match_transformers(tmp_path, config):
    harness.check_prefill_and_decode(
        harness.write_checkpoint(tmp_path, ARCH, seed=1, **config), prompt_lens=(21, 40), decode_steps=2
    )


def test_chunked_prefill_reads_the_cached_prefix(new_architecture):
    harness.check_chunked_prefill(new_architecture)


def test_two_ranks_match_one(new_architecture):
    harness.check_tensor_parallel(new_architecture)


def test_greedy_over_http_matches_generate(tmp_path):
    harness.check_http_greedy(harness.with_bundled_tokenizer(tmp_path, ARCH, **NEW))
