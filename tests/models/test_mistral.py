"""Sliding windows against transformers: Mistral's on every layer (contexts well past the window;
blocks behind it may be given back, their table entries then naming blocks that hold anything),
Qwen2's on the layers from max_window_layers on; two ranks; greedy tokens over HTTP on a KV pool
smaller than one request, which only giving blocks back makes possible."""

import pytest
import torch

from tests.models import harness

WINDOW = 16
COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
MISTRAL = dict(COMMON, sliding_window=WINDOW)
QWEN2 = dict(COMMON, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)  # layer 0 full


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    return harness.write_checkpoint(tmp_path_factory.mktemp("mistral"), "MistralForCausalLM", **MISTRAL)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return harness.write_checkpoint(tmp_path_factory.mktemp("qwen2-window"), "Qwen2ForCausalLM", seed=1, **QWEN2)


def test_windows_are_per_layer_as_transformers_has_them_and_positions_are_not_capped(mistral, qwen2):
    from shard.config import ShardConfig
    from shard.runner import ModelRunner

    m, q = (ModelRunner(ShardConfig(model_dir=d, device="cpu", enforce_eager=True)) for d in (mistral, qwen2))
    assert [a.sliding_window for a in m.attention_layers] == [WINDOW, WINDOW]
    assert m.sliding_window == WINDOW and m.max_positions == 256  # the router may give blocks back
    assert [a.sliding_window for a in q.attention_layers] == [0, WINDOW]
    assert q.sliding_window == 0  # a global layer reads every block


def test_mistral_prefill_and_decode_match_transformers(mistral):
    harness.check_prefill_and_decode(mistral, prompt_lens=(40, 5, 70))


def test_mistral_chunked_prefill_reads_the_window_before_the_chunk(mistral):
    harness.check_chunked_prefill(mistral, length=64, first_chunk=37)


def test_qwen2_with_local_and_global_layers_matches_transformers(qwen2):
    harness.check_prefill_and_decode(qwen2, prompt_lens=(45, 70), decode_steps=2)


def test_blocks_behind_the_window_are_never_read(mistral):
    """Chunks of 12 then decodes, with blocks of 4: as the router does, each step's table names
    block 0 for the blocks wholly behind the window of its first token; those blocks and block 0
    are filled with noise. Logits still equal transformers'."""
    from shard.step import Batch, RequestState

    hf, bs = harness.hf_model(mistral), 4
    r = harness.runner(mistral, block_size=bs, max_num_blocks=24)
    ids = torch.randint(2, harness.VOCAB, (52,), generator=torch.Generator().manual_seed(3)).tolist()
    expected = harness.hf_logits(hf, ids)
    state = RequestState(0, ids, len(ids), 0, list(range(1, 14)))
    noise = torch.Generator().manual_seed(4)

    def scribble(block_ids: list[int]) -> None:
        for k, v in r.kv_caches:
            for b in block_ids:
                k[b] = torch.randn(k[b].shape, generator=noise) * 100
                v[b] = torch.randn(v[b].shape, generator=noise) * 100

    scribble([0])
    for n in (12, 12, 12, 12, 1, 1, 1, 1):
        start = state.num_computed_tokens
        behind = max(0, start - WINDOW + 1) // bs
        scribble([b for b in state.block_ids[:behind] if b])  # given back, reused by another request
        state.block_ids[:behind] = [0] * behind
        ours = r.forward(Batch([state], [n]), sample_rows_override=torch.arange(n))
        torch.testing.assert_close(ours, expected[start : start + n], atol=harness.ATOL, rtol=0)
        state.num_computed_tokens += n
    assert state.block_ids[:8] == [0] * 8  # position 48 reads 33 ..: blocks 0 .. 7 went back


def test_two_ranks_match_one(mistral):
    harness.check_tensor_parallel(mistral)


def test_greedy_over_http_matches_generate_on_a_pool_smaller_than_a_request(tmp_path):
    """Blocks of 4 and a pool of 8 (32 tokens); prompts of up to 13 tokens and 40 new: every request
    outgrows the pool, and runs on the ~7 blocks its window and a chunk of 8 take. In float32: over
    40 tokens, bfloat16's rounding flips a near tie of this random model's logits."""
    model_dir = harness.with_bundled_tokenizer(tmp_path, "MistralForCausalLM", **MISTRAL)
    flags = ("--block-size", "4", "--max-batch-prefill-tokens", "8", "--max-batch-total-tokens", "32")
    harness.check_http_greedy(model_dir, *flags, max_new_tokens=40)
