"""Our paged, batched forward gives transformers' logits on tiny random models. Eager, as each
compile takes seconds: test_compiled_forward shows the compiled forward computes the same."""

import torch
from transformers import AutoModelForCausalLM

from shard.config import ShardConfig
from shard.runner import ModelRunner
from shard.sampler import SamplingParams
from shard.step import Batch, RequestState

ATOL = 1e-4


def _runner(model_dir, block_size=16) -> ModelRunner:
    runner = ModelRunner(
        ShardConfig(model_dir=model_dir, block_size=block_size, device="cpu", dtype="float32", enforce_eager=True)
    )
    runner.warmup(64, 4, max_num_blocks=64)
    return runner


def _hf_logits(hf, ids: list[int]) -> torch.Tensor:  # [len(ids), vocab]
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def test_prefill_and_decode_logits_match_transformers(tiny_model_dir):
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    runner = _runner(tiny_model_dir)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 384, (n,), generator=g).tolist() for n in (37, 5, 70)]
    # Blocks interleaved across requests so a wrong block table shows up as wrong logits.
    states = [
        RequestState(i, list(p), len(p), 0, list(range(i, 3 * 10, 3)), SamplingParams()) for i, p in enumerate(prompts)
    ]
    batch = Batch(states, [len(p) for p in prompts])
    all_rows = torch.arange(sum(len(p) for p in prompts))
    ours = runner.forward(batch, sample_rows_override=all_rows)
    expected = torch.cat([_hf_logits(hf, p) for p in prompts])
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)

    for s in states:
        s.num_computed_tokens = len(s.token_ids)
    for _ in range(4):  # decode steps, feeding transformers' greedy token
        for s in states:
            s.token_ids.append(int(_hf_logits(hf, s.token_ids)[-1].argmax()))
        ours = runner.forward(Batch(states, [1] * len(states)))
        expected = torch.stack([_hf_logits(hf, s.token_ids)[-1] for s in states])
        torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)
        for s in states:
            s.num_computed_tokens += 1


def test_chunked_prefill_with_cached_prefix_matches_full_prefill(tiny_model_dir):
    runner = _runner(tiny_model_dir)
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = torch.randint(2, 384, (50,), generator=torch.Generator().manual_seed(2)).tolist()
    state = RequestState(0, ids, len(ids), 0, [7, 3, 9, 1], SamplingParams())
    runner.forward(Batch([state], [20]))  # first chunk: no token due
    state.num_computed_tokens = 20
    ours = runner.forward(Batch([state], [30]))  # second chunk reads the first through the cache
    torch.testing.assert_close(ours[0], _hf_logits(hf, ids)[-1], atol=ATOL, rtol=0)


def test_mixed_step_of_decodes_and_prompt_chunks_matches_transformers(tiny_model_dir):
    """Decodes, a second prompt chunk and a fresh prompt in one step, sent with the single-token
    requests first: the shard runs the chunks with the extend kernel and the tokens with the
    decode kernel, and every request still gets transformers' next token."""
    from shard.step import NewRequest, RunningRequest, StepInput

    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    runner = _runner(tiny_model_dir)
    g = torch.Generator().manual_seed(7)
    a, b, c = (torch.randint(2, 384, (n,), generator=g).tolist() for n in (30, 45, 12))
    runner.step(
        StepInput(
            0,
            new_requests=[
                NewRequest(1, a, 0, 30, [0, 5], SamplingParams()),
                NewRequest(2, b, 0, 20, [1, 6, 9], SamplingParams()),
            ],
        )
    )
    out = runner.step(
        StepInput(
            1,
            new_requests=[NewRequest(3, c, 0, 12, [2], SamplingParams())],
            running_requests=[RunningRequest(1, 1, []), RunningRequest(2, 25, [])],
        )
    )
    greedy = {o.req_id: o.token_id for o in out.outputs}
    first_a = int(_hf_logits(hf, a)[-1].argmax())
    expected = {1: int(_hf_logits(hf, a + [first_a])[-1].argmax()), 2: int(_hf_logits(hf, b)[-1].argmax())}
    expected[3] = int(_hf_logits(hf, c)[-1].argmax())
    assert greedy == expected


def test_prompt_logprobs_match_transformers_across_chunks(tiny_model_dir):
    from shard.step import NewRequest, RunningRequest, StepInput

    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    runner = _runner(tiny_model_dir)
    ids = torch.randint(2, 384, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    first = runner.step(StepInput(0, new_requests=[NewRequest(9, ids, 0, 25, [4, 2, 7], SamplingParams(), True)]))
    second = runner.step(StepInput(1, running_requests=[RunningRequest(9, 15, [])]))
    (a,), (b,) = first.prompt_logprobs, second.prompt_logprobs
    assert (a.first_position, len(a.logprobs), b.first_position, len(b.logprobs)) == (1, 25, 26, 14)
    expected = _hf_logits(hf, ids).log_softmax(-1)[:-1].gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
    torch.testing.assert_close(torch.tensor(a.logprobs + b.logprobs), expected, atol=ATOL, rtol=0)


def test_prompt_top_tokens_are_transformers_most_likely_across_chunks(tiny_model_dir):
    """With prompt_top_n, each prompt position also gets its n most likely tokens, in order, under
    the model's own distribution: the request's temperature and penalties do not touch them."""
    from shard.step import NewRequest, RunningRequest, StepInput

    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    runner = _runner(tiny_model_dir)
    ids = torch.randint(2, 384, (40,), generator=torch.Generator().manual_seed(6)).tolist()
    sampling = SamplingParams(do_sample=True, temperature=0.3, repetition_penalty=2.0, logit_bias=((5, 50.0),))
    new = NewRequest(9, ids, 0, 25, [4, 2, 7], sampling, True, prompt_top_n=5)
    first = runner.step(StepInput(0, new_requests=[new, NewRequest(8, ids[:10], 0, 10, [3], SamplingParams(), True)]))
    second = runner.step(StepInput(1, running_requests=[RunningRequest(9, 15, [])]))
    (a,), (b,) = [p for p in first.prompt_logprobs if p.req_id == 9], second.prompt_logprobs
    other = next(p for p in first.prompt_logprobs if p.req_id == 8)
    assert len(a.top_tokens) == 25 and len(b.top_tokens) == 14 and other.top_tokens == []
    logprobs = _hf_logits(hf, ids).log_softmax(-1)[:-1]  # [39, vocab]: position p predicts token p + 1
    top = a.top_tokens + b.top_tokens
    top_ids = torch.tensor([[t for t, _ in position] for position in top])
    top_values = torch.tensor([[lp for _, lp in position] for position in top])
    torch.testing.assert_close(top_values, logprobs.topk(5).values, atol=ATOL, rtol=0)  # the 5 largest, in order
    torch.testing.assert_close(logprobs.gather(-1, top_ids), top_values, atol=ATOL, rtol=0)  # of those tokens
    chosen = logprobs.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
    torch.testing.assert_close(torch.tensor(a.logprobs + b.logprobs), chosen, atol=ATOL, rtol=0)


def test_a_sliding_window_does_not_cap_the_positions_served(tmp_path):
    """Attention applies windows now (tests/models/test_mistral.py), so positions go as far as the
    model's; Llama ignores a `sliding_window` in its config, as transformers' Llama does."""
    import json

    from tests.conftest import make_tiny_model

    model_dir = make_tiny_model("llama", tmp_path)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "sliding_window": 128}))
    runner = ModelRunner(ShardConfig(model_dir=model_dir, device="cpu"))
    assert runner.max_positions == config["max_position_embeddings"] == 512
    assert runner.sliding_window == 0 and all(a.sliding_window == 0 for a in runner.attention_layers)
