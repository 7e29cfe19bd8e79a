"""Phi-3 against transformers: fused q/k/v (grouped KV heads) and gate/up sliced over two ranks,
LongRoPE below and past original_max_position_embeddings, a sliding window on every layer,
partial rotary (Phi-4-mini), greedy tokens over HTTP."""

import pytest
import torch

from tests.models import harness

# float32 as transformers computes (bf16, this CPU's default, flips near-ties); a KV pool of 1024
# tokens rather than the default 4 GiB, which takes seconds to allocate
ARCH = "Phi3ForCausalLM"
ORIGINAL = 64  # original_max_position_embeddings: LongRoPE's short factors below, long ones from here


def _config(rotary_dims: int = 16, **overrides) -> dict:
    """A tiny Phi-3 with heads of 16 dimensions, LongRoPE over the first `rotary_dims` of each."""
    half = rotary_dims // 2
    rope = {
        "rope_type": "longrope",
        "rope_theta": 10_000.0,
        "partial_rotary_factor": rotary_dims / 16,
        "short_factor": [1.0 + 0.1 * i for i in range(half)],
        "long_factor": [1.0 + 1.5 * i for i in range(half)],
    }
    return dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        original_max_position_embeddings=ORIGINAL,
        sliding_window=16,
        pad_token_id=0,
        rope_parameters=rope,
        **overrides,
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return harness.write_checkpoint(tmp_path_factory.mktemp("phi3"), ARCH, **_config())


def test_prefill_and_decode_match_transformers(model_dir):
    """Contexts past the window, below ORIGINAL: transformers' short factors throughout."""
    harness.check_prefill_and_decode(model_dir, prompt_lens=(37, 5, 56), compiled=True)


def test_chunked_prefill_reads_the_cached_prefix(model_dir):
    harness.check_chunked_prefill(model_dir)


def test_longrope_past_the_original_positions_matches_cached_generation(model_dir):
    """A 50-token prompt, then 24 tokens one at a time across ORIGINAL: transformers' cached
    generation keeps the prompt rotated by the short factors and rotates each token from ORIGINAL
    on by the long ones, as the position-indexed table does (LongRotaryEmbedding's docstring)."""
    from shard.step import Batch, RequestState

    hf = harness.hf_model(model_dir)
    prompt = torch.randint(2, harness.VOCAB, (50,), generator=torch.Generator().manual_seed(3)).tolist()
    r = harness.runner(model_dir, max_num_blocks=8)
    state = RequestState(0, list(prompt), len(prompt), 0, [5, 1, 6, 0, 3])
    ours = r.forward(Batch([state], [len(prompt)]))
    with torch.no_grad():
        out = hf(torch.tensor([prompt]), use_cache=True)
        for _ in range(24):
            torch.testing.assert_close(ours[0], out.logits[0, -1], atol=harness.ATOL, rtol=0)
            token = int(out.logits[0, -1].argmax())
            state.num_computed_tokens = len(state.token_ids)
            state.token_ids.append(token)
            out = hf(torch.tensor([[token]]), cache=out.cache, use_cache=True)
            ours = r.forward(Batch([state], [1]))
    assert len(state.token_ids) == len(prompt) + 24 > ORIGINAL


def test_partial_rotary_matches_transformers(tmp_path):
    """Phi-4-mini's layout: LongRoPE over the first 12 of 16 dimensions of each head."""
    from shard.step import Batch, RequestState

    model_dir = harness.write_checkpoint(tmp_path, ARCH, seed=1, **_config(rotary_dims=12))
    hf, r = harness.hf_model(model_dir), harness.runner(model_dir, max_num_blocks=8)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(2, harness.VOCAB, (n,), generator=g).tolist() for n in (40, 9)]
    states = [RequestState(i, p, len(p), 0, [i, i + 2, i + 4]) for i, p in enumerate(prompts)]
    ours = r.forward(Batch(states, [len(p) for p in prompts]), sample_rows_override=torch.arange(49))
    expected = torch.cat([harness.hf_logits(hf, p) for p in prompts])
    torch.testing.assert_close(ours, expected, atol=harness.ATOL, rtol=0)


def test_two_ranks_match_one(model_dir):
    harness.check_tensor_parallel(model_dir)


def test_greedy_over_http_matches_generate(tmp_path):
    harness.check_http_greedy(harness.with_bundled_tokenizer(tmp_path, ARCH, **_config()))
