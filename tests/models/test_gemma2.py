"""Gemma 2 against transformers: a local (sliding window) and a global layer, contexts past the
window, attention and final soft-capping small enough to change the logits, two ranks, greedy
tokens over HTTP."""

import pytest
import torch
import transformers

from tests.models import harness

# float32 as transformers computes (bf16, this CPU's default, flips near-ties); a KV pool of 1024
# tokens rather than the default 4 GiB, which takes seconds to allocate
ARCH = "Gemma2ForCausalLM"
CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,  # layer_types: local, then global
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    query_pre_attn_scalar=16,
    sliding_window=16,
    max_position_embeddings=256,
    attn_logit_softcapping=2.0,
    final_logit_softcapping=5.0,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return harness.write_checkpoint(tmp_path_factory.mktemp("gemma2"), ARCH, **CONFIG)


def test_soft_caps_change_the_logits(model_dir):
    """Without either cap transformers' logits move by far more than the parity tolerance, so the
    tests below fail should a cap be ignored."""
    ids = torch.randint(2, harness.VOCAB, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    capped = harness.hf_logits(harness.hf_model(model_dir), ids)
    for cap in ("attn_logit_softcapping", "final_logit_softcapping"):
        hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **{cap: None})
        assert (harness.hf_logits(hf.eval(), ids) - capped).abs().max() > 0.1, cap


def test_prefill_and_decode_match_transformers(model_dir):
    harness.check_prefill_and_decode(model_dir, compiled=True)


def test_chunked_prefill_reads_the_cached_prefix(model_dir):
    harness.check_chunked_prefill(model_dir)


def test_two_ranks_match_one(model_dir):
    harness.check_tensor_parallel(model_dir)


def test_greedy_over_http_matches_generate(tmp_path):
    harness.check_http_greedy(harness.with_bundled_tokenizer(tmp_path, ARCH, **CONFIG))
