"""T5 against transformers: the encoder once per request, cross-attention over encoder blocks,
the decoder's bucketed relative position bias (distances past its max_distance included), T5 1.0
(ReLU, scaled tied head) and 1.1 (gated GELU, a head of its own); two ranks; greedy tokens through /generate."""

import json

import pytest
import requests
import torch
from safetensors.torch import load_file, save_file

from tests.models import harness

COMMON = dict(
    d_model=64,
    d_kv=16,
    d_ff=128,
    num_layers=2,
    num_decoder_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=20,  # the tests' sequences reach past it
    decoder_start_token_id=0,
    pad_token_id=0,
)
T5_V1_0 = dict(COMMON, feed_forward_proj="relu")
T5_V1_1 = dict(COMMON, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
# T5 1.1 scales neither its attention scores nor its logits: weights of N(0, 0.1), not the harness's
# 0.2, keep its logits within a few units, where float32's summation order stays under 1e-4.
V1_1_STD = 0.1


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    return harness.write_checkpoint(tmp_path_factory.mktemp("t5"), "T5ForConditionalGeneration", **T5_V1_0)


@pytest.fixture(scope="module")
def t5_v1_1(tmp_path_factory):
    """As T5 1.1 and Flan-T5 checkpoints are: an LM head of their own (transformers 5 saves every T5
    tied, and keeps a checkpoint's own head untied on loading), unscaled decoder outputs."""
    model_dir = harness.write_checkpoint(
        tmp_path_factory.mktemp("t5-v1.1"), "T5ForConditionalGeneration", 1, std=V1_1_STD, **T5_V1_1
    )
    tensors = load_file(model_dir / "model.safetensors")
    assert "lm_head.weight" not in tensors
    head = torch.randn(tensors["shared.weight"].shape, generator=torch.Generator().manual_seed(3))
    tensors["lm_head.weight"] = head * V1_1_STD
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(dict(config, tie_word_embeddings=False)))
    hf = harness.hf_model(model_dir)
    assert not hf.config.scale_decoder_outputs and torch.equal(hf.lm_head.weight, tensors["lm_head.weight"])
    return model_dir


def _hf_logits(hf, encoder_ids: list[int], decoder_ids: list[int]) -> torch.Tensor:  # [len(decoder_ids), vocab]
    with torch.no_grad():
        return hf(input_ids=torch.tensor([encoder_ids]), decoder_input_ids=torch.tensor([decoder_ids])).logits[0]


def _check(model_dir, encoder_lens, decoder_lens, decode_steps: int, first_chunk: int = 0) -> None:
    """Requests encoded and prefilled together (decoder sequences of `decoder_lens`, teacher-forced;
    with `first_chunk`, the first request's in two chunks), then batched decode steps fed
    transformers' greedy tokens: every computed position's logits equal transformers'."""
    from shard.sampler import SamplingParams
    from shard.step import Batch, RequestState

    hf = harness.hf_model(model_dir)
    n, bs = len(encoder_lens), 16
    blocks_each = -(-(max(encoder_lens) + max(decoder_lens) + decode_steps) // bs)
    r = harness.runner(model_dir, max_num_blocks=2 * n * blocks_each + 4)
    g = torch.Generator().manual_seed(1)
    states = []
    for i, (e, d) in enumerate(zip(encoder_lens, decoder_lens)):
        blocks = list(range(i, 2 * n * blocks_each, n))  # interleaved: a wrong table shows
        s = RequestState(i, [0] + torch.randint(2, 384, (d - 1,), generator=g).tolist(), 1, 0, blocks[::2])
        s.encoder_token_ids, s.encoder_block_ids = torch.randint(2, 384, (e,), generator=g).tolist(), blocks[1::2]
        states.append(s)
    expected = torch.cat([_hf_logits(hf, s.encoder_token_ids, s.token_ids) for s in states])
    if first_chunk:
        r.forward(Batch(states[:1], [first_chunk]))
        states[0].num_computed_tokens = first_chunk
        expected = expected[first_chunk:]
    scheduled = [len(s.token_ids) - s.num_computed_tokens for s in states]
    ours = r.forward(Batch(states, scheduled), sample_rows_override=torch.arange(sum(scheduled)))
    torch.testing.assert_close(ours, expected, atol=harness.ATOL, rtol=0)
    for s in states:
        s.num_computed_tokens, s.sampling = len(s.token_ids), SamplingParams()
    for _ in range(decode_steps):
        for s in states:
            s.token_ids.append(int(_hf_logits(hf, s.encoder_token_ids, s.token_ids)[-1].argmax()))
        ours = r.forward(Batch(states, [1] * n))
        expected = torch.stack([_hf_logits(hf, s.encoder_token_ids, s.token_ids)[-1] for s in states])
        torch.testing.assert_close(ours, expected, atol=harness.ATOL, rtol=0)
        for s in states:
            s.num_computed_tokens += 1


def test_t5_encodes_each_request_and_decodes_as_transformers(t5):
    _check(t5, encoder_lens=(37, 5, 26), decoder_lens=(1, 1, 1), decode_steps=24)  # decode past max_distance


def test_t5_v1_1_prefill_of_a_decoder_sequence_and_a_chunk_over_its_cache(t5_v1_1):
    # A decoder sequence longer than one token is what a preempted request recomputes.
    _check(t5_v1_1, encoder_lens=(19, 44), decoder_lens=(30, 3), decode_steps=3, first_chunk=12)


def test_t5_tensor_parallel_matches_one_rank(t5_v1_1):
    harness.check_tensor_parallel(t5_v1_1)


def test_t5_compiled_forward_matches_transformers(t5):
    from shard.sampler import SamplingParams
    from shard.step import Batch, RequestState

    hf = harness.hf_model(t5)
    r = harness.runner(t5, max_num_blocks=16, eager=False)
    s = RequestState(0, [0, 5, 9], 1, 0, [3], SamplingParams(), encoder_token_ids=list(range(40, 70)))
    s.encoder_block_ids = [7, 1]
    ours = r.forward(Batch([s], [3]), sample_rows_override=torch.arange(3))
    torch.testing.assert_close(ours, _hf_logits(hf, s.encoder_token_ids, s.token_ids), atol=harness.ATOL, rtol=0)


def _seq2seq_answers(server) -> None:
    """As TGI's seq2seq path: the prefill details are the decoder's start token; usage counts the
    encoder's input; OpenAI's echo with logprobs has no prompt logprobs to show and is refused."""
    body = {
        "inputs": "Hello there",
        "parameters": {"max_new_tokens": 3, "details": True, "decoder_input_details": True},
    }
    details = requests.post(server.url + "/generate", json=body, timeout=60).json()["details"]
    assert [t["id"] for t in details["prefill"]] == [0] and details["generated_tokens"] == 3
    r = requests.post(server.url + "/v1/completions", json={"prompt": "Hello there", "max_tokens": 3}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 2, r.text
    echo = {"prompt": "Hello there", "max_tokens": 3, "echo": True, "logprobs": 1}
    r = requests.post(server.url + "/v1/completions", json=echo, timeout=60)
    assert r.status_code == 422 and "encoder-decoder" in r.text


def test_t5_greedy_generate_through_http(tmp_path):
    model_dir = harness.with_bundled_tokenizer(tmp_path, "T5ForConditionalGeneration", seed=2, **T5_V1_1)
    # a request holds its encoder's blocks and its decoder's: 2 x 512 tokens fit the tests' small pool
    harness.check_http_greedy(model_dir, "--max-total-tokens", "512", then=_seq2seq_answers)
