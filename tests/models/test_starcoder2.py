"""StarCoder2 against transformers: a sliding window of 16 positions over contexts of up to 74
tokens (prefill, decode, a 30-token chunk reading its 20 cached ones), grouped KV heads, biases;
two ranks sharing its one KV head; greedy tokens over HTTP."""

import pytest
import torch
import transformers

from tests.models import harness

ARCH = "Starcoder2ForCausalLM"
CONFIG = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    sliding_window=16,
    max_position_embeddings=256,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return harness.write_checkpoint(tmp_path_factory.mktemp("starcoder2"), ARCH, **CONFIG)


def test_the_window_changes_the_logits(model_dir):
    """Without the window transformers' logits past it move by far more than the parity tolerance,
    so the tests below fail should it be ignored."""
    ids = torch.randint(2, harness.VOCAB, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    windowed = harness.hf_logits(harness.hf_model(model_dir), ids)
    full = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, sliding_window=None)
    assert (harness.hf_logits(full.eval(), ids) - windowed).abs().max() > 0.1


def test_prefill_and_decode_over_the_window_match_transformers(model_dir):
    harness.check_prefill_and_decode(model_dir)  # prompts of 37, 5 and 70 tokens


def test_chunked_prefill_reads_the_cached_prefix(model_dir):
    harness.check_chunked_prefill(model_dir)


def test_two_ranks_replicating_the_kv_head_match_one(tmp_path):
    """One KV head for two ranks: each keeps a copy (QKVParallelLinear from separate q/k/v)."""
    harness.check_tensor_parallel(harness.write_checkpoint(tmp_path, ARCH, **dict(CONFIG, num_key_value_heads=1)))


def test_greedy_over_http_matches_generate(tmp_path):
    # a window of 8: each prompt (5-13 tokens) and its 12 new tokens run past it
    harness.check_http_greedy(harness.with_bundled_tokenizer(tmp_path, ARCH, **dict(CONFIG, sliding_window=8)))
