"""Sampling on crafted logits: exact filtered sets, reproducible seeds, penalties, watermark."""

import math

import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from shard.sampler import Sampler, SamplerConfig, SamplingParams, hash_uniform, watermark_greenlist
from shard.sampling_table import sampling_batch

VOCAB = 16
# Probabilities 0.4, 0.3, 0.15, 0.1, then 0.05 spread over the other 12 tokens.
PROBS = torch.tensor([0.4, 0.3, 0.15, 0.1] + [0.05 / 12] * 12)
LOGITS = PROBS.log()


def _sample(sampler: Sampler, logits, params, histories, num_prompt_tokens):
    return sampler(logits, sampling_batch(params, histories, num_prompt_tokens))


def sample_many(params: SamplingParams, n: int = 400, logits=LOGITS) -> set[int]:
    """Sampled tokens of n rows differing only in seed."""
    rows = [SamplingParams(**{**_fields(params), "seed": s}) for s in range(n)]
    out = _sample(Sampler(), logits.expand(n, -1).clone(), rows, [[0]] * n, [1] * n)
    return set(out.token_ids.tolist())


def _fields(p: SamplingParams) -> dict:
    return {f: getattr(p, f) for f in p.__slots__}


def test_greedy_is_argmax():
    out = _sample(Sampler(), LOGITS[None].clone(), [SamplingParams()], [[0]], [1])
    assert out.token_ids.tolist() == [0] and math.isclose(out.logprobs.item(), math.log(0.4), rel_tol=1e-5)


def test_top_k_keeps_exactly_k_tokens():
    assert sample_many(SamplingParams(do_sample=True, top_k=2)) == {0, 1}


def test_top_p_keeps_the_smallest_nucleus():
    # 0.4 + 0.3 = 0.7 < 0.8, so the third token is needed; the fourth is not.
    assert sample_many(SamplingParams(do_sample=True, top_p=0.8)) == {0, 1, 2}


def test_typical_p_keeps_tokens_closest_to_the_entropy():
    from transformers.generation.logits_process import TypicalLogitsWarper

    expected = TypicalLogitsWarper(mass=0.5)(None, LOGITS[None].clone())
    kept = set(torch.isfinite(expected[0]).nonzero().flatten().tolist())
    assert sample_many(SamplingParams(do_sample=True, typical_p=0.5)) == kept


def test_seeded_rows_are_reproducible_and_independent_of_the_batch():
    params = SamplingParams(do_sample=True, temperature=1.5, seed=42)
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(0))
    alone = _sample(Sampler(), logits.clone(), [params], [[1, 2, 3]], [3]).token_ids.item()
    others = [SamplingParams(do_sample=True, seed=s) for s in range(5)]
    batch = torch.cat([torch.randn(5, 1000), logits])
    together = _sample(Sampler(), batch, others + [params], [[1]] * 5 + [[1, 2, 3]], [1] * 6).token_ids[-1].item()
    assert alone == together


def test_sampling_follows_the_distribution():
    n = 4000
    rows = [SamplingParams(do_sample=True, seed=s) for s in range(n)]
    tokens = _sample(Sampler(), LOGITS.expand(n, -1).clone(), rows, [[0]] * n, [1] * n).token_ids
    freq = torch.bincount(tokens, minlength=VOCAB).float() / n
    assert torch.allclose(freq[:4], PROBS[:4], atol=0.03)


def test_temperature_reshapes_the_distribution_as_softmax_of_logits_over_t():
    """0.5 sharpens it (the first token's 0.4 becomes 0.57), 2.0 flattens it (0.24)."""
    n = 4000
    for temperature in (0.5, 2.0):
        rows = [SamplingParams(do_sample=True, temperature=temperature, seed=s) for s in range(n)]
        tokens = _sample(Sampler(), LOGITS.expand(n, -1).clone(), rows, [[0]] * n, [1] * n).token_ids
        freq = torch.bincount(tokens, minlength=VOCAB).float() / n
        expected = (LOGITS / temperature).softmax(-1)
        assert torch.allclose(freq[:4], expected[:4], atol=0.03), (temperature, freq[:4], expected[:4])


def test_logprobs_are_under_the_processed_distribution_or_the_raw_one_as_asked():
    """TGI's routes: under what the token was drawn from (top_k=1 leaves one token: logprob 0).
    OpenAI's: under the model's own distribution, whatever the filters and penalties."""
    shaped = dict(do_sample=True, top_k=1, temperature=0.5, frequency_penalty=2.0, top_n_tokens=2)
    rows = [SamplingParams(**shaped), SamplingParams(**shaped, raw_logprobs=True)]
    out = _sample(Sampler(), LOGITS.expand(2, -1).clone(), rows, [[0, 0], [0, 0]], [1, 1])
    assert out.token_ids.tolist() == [1, 1]  # token 0 was generated: the penalty moves the pick to 1
    processed, raw = out.logprobs.tolist()
    assert math.isclose(processed, 0.0, abs_tol=1e-6) and math.isclose(raw, math.log(0.3), rel_tol=1e-5)
    assert out.top_ids[1].tolist() == [0, 1]
    assert torch.allclose(out.top_logprobs[1], PROBS[:2].log())


def test_repetition_penalty_matches_transformers():
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(3))
    history = [[1, 5, 5, 9], [2, 3]]
    expected = torch.cat(
        [
            RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([h]), logits[i : i + 1].clone())
            for i, h in enumerate(history)
        ]
    )
    params = [SamplingParams(repetition_penalty=1.3, top_n_tokens=50)] * 2
    out = _sample(Sampler(), logits.clone(), params, history, [2, 2])
    torch.testing.assert_close(out.top_logprobs.exp().sum(-1), torch.ones(2))
    ours = torch.full_like(logits, float("nan")).scatter(-1, out.top_ids, out.top_logprobs)
    torch.testing.assert_close(ours, expected.log_softmax(-1), atol=1e-5, rtol=0)


def test_frequency_penalty_counts_generated_tokens_only():
    logits = torch.zeros(1, 10)
    # prompt [4, 4], generated [7, 7, 7]: only token 7 is penalized, three times.
    out = _sample(
        Sampler(), logits.clone(), [SamplingParams(frequency_penalty=0.5, top_n_tokens=10)], [[4, 4, 7, 7, 7]], [2]
    )
    ours = torch.zeros(10).scatter(0, out.top_ids[0], out.top_logprobs[0])
    expected = torch.zeros(10)
    expected[7] = -1.5
    torch.testing.assert_close(ours, expected.log_softmax(-1))


def test_top_n_tokens_are_the_most_likely_in_order():
    out = _sample(Sampler(), LOGITS[None].clone(), [SamplingParams(top_n_tokens=3)], [[0]], [1])
    assert out.top_ids[0].tolist() == [0, 1, 2]


def _z_score(tokens: list[int], gamma: float) -> float:
    """Kirchenbauer et al.'s one-proportion z-test on green tokens."""
    prev, nxt = torch.tensor(tokens[:-1]), torch.tensor(tokens[1:])
    green = watermark_greenlist(prev, 1000, gamma).gather(1, nxt[:, None]).sum().item()
    t = len(tokens) - 1
    return (green - gamma * t) / math.sqrt(t * gamma * (1 - gamma))


def test_watermarked_text_is_detected_and_plain_text_is_not():
    gamma, steps = 0.5, 200
    sampler = Sampler(SamplerConfig(watermark_gamma=gamma, watermark_delta=2.0))
    g = torch.Generator().manual_seed(7)
    for watermark in (True, False):
        tokens = [1]
        for _ in range(steps):
            logits = torch.randn(1, 1000, generator=g)
            p = SamplingParams(do_sample=True, seed=11, watermark=watermark)
            tokens.append(_sample(sampler, logits, [p], [tokens], [1]).token_ids.item())
        z = _z_score(tokens, gamma)
        assert (z > 4) if watermark else (abs(z) < 3), (watermark, z)


def _processed_logprobs(logits: torch.Tensor, params, histories, num_prompt_tokens) -> torch.Tensor:
    """[N, vocab] the processed log-distribution each row samples from, -inf where filtered out."""
    vocab = logits.shape[-1]
    params = [SamplingParams(**{**_fields(p), "top_n_tokens": vocab}) for p in params]
    out = _sample(Sampler(), logits.clone(), params, histories, num_prompt_tokens)
    return torch.full_like(logits, float("nan")).scatter(-1, out.top_ids, out.top_logprobs)


def test_presence_penalty_subtracts_once_per_generated_token():
    """OpenAI's presence penalty on a torch reference: once for every token among the generated
    ones, however often it occurs; prompt tokens (before num_prompt_tokens) are not penalized,
    tokens generated before a preemption (after it) are. With frequency, both add up."""
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(4))
    histories = [[4, 4, 7, 7, 7, 9], [1, 2, 3], [5, 6, 5, 6]]
    num_prompt = [2, 1, 2]
    params = [
        SamplingParams(presence_penalty=0.8),
        SamplingParams(presence_penalty=-0.5, frequency_penalty=0.25),
        SamplingParams(),  # no penalty in a penalized batch
    ]
    expected = logits.clone()
    for row, (h, n, p) in enumerate(zip(histories, num_prompt, params)):
        counts = torch.bincount(torch.tensor(h[n:], dtype=torch.long), minlength=20).float()
        expected[row] -= p.presence_penalty * (counts > 0).float() + p.frequency_penalty * counts
    ours = _processed_logprobs(logits, params, histories, num_prompt)
    torch.testing.assert_close(ours, expected.log_softmax(-1), atol=1e-5, rtol=0)


def test_min_p_drops_tokens_below_a_fraction_of_the_top_probability_after_temperature():
    """vLLM's min_p on a torch reference: probabilities after temperature, tokens below
    min_p * max dropped, the rest renormalized."""
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(5)) * 2
    params = [
        SamplingParams(do_sample=True, min_p=0.1),
        SamplingParams(do_sample=True, min_p=0.1, temperature=2.0),
        SamplingParams(do_sample=True, min_p=0.5, temperature=0.5, top_k=3),
        SamplingParams(do_sample=True),  # min_p 0: nothing dropped
    ]
    expected = []
    for row, p in enumerate(params):
        scaled = logits[row] / p.temperature
        probs = scaled.softmax(-1)
        keep = probs >= p.min_p * probs.max()
        if p.top_k:
            keep &= scaled >= scaled.topk(p.top_k).values[-1]
        expected.append(scaled.masked_fill(~keep, float("-inf")).log_softmax(-1))
    ours = _processed_logprobs(logits, params, [[0]] * 4, [1] * 4)
    torch.testing.assert_close(ours, torch.stack(expected), atol=1e-5, rtol=0)
    kept = sample_many(SamplingParams(do_sample=True, min_p=0.3))  # 0.3 * 0.4 = 0.12: 0.1 is dropped
    assert kept == {0, 1, 2}


def test_min_p_is_ignored_when_greedy():
    """As temperature and the filters: it shapes a sampled distribution, the argmax is its own."""
    out = _sample(Sampler(), LOGITS[None].clone(), [SamplingParams(min_p=0.9, top_n_tokens=2)], [[0]], [1])
    assert out.top_ids[0].tolist() == [0, 1] and math.isclose(out.logprobs.item(), math.log(0.4), rel_tol=1e-5)


def test_logit_bias_is_added_to_the_logits_and_raw_logprobs_do_not_see_it():
    """Added before anything else: it moves the greedy pick and the processed logprobs; raw
    logprobs (OpenAI's routes) stay the model's own, as vLLM's raw_logprobs are."""
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(6))
    bias = ((3, 100.0), (7, -2.5), (11, 1.5))
    params = [
        SamplingParams(logit_bias=bias),
        SamplingParams(logit_bias=((5, 3.0),), raw_logprobs=True),
        SamplingParams(),  # no bias in a biased batch
    ]
    expected = logits.clone()
    for t, v in bias:
        expected[0, t] += v
    expected[1, 5] += 3.0
    ours = _processed_logprobs(logits[[0, 2]], params[:1] + params[2:], [[0]] * 2, [1] * 2)
    torch.testing.assert_close(ours, expected[[0, 2]].log_softmax(-1), atol=1e-5, rtol=0)
    out = _sample(Sampler(), logits.clone(), params, [[0]] * 3, [1] * 3)
    assert out.token_ids.tolist() == expected.argmax(-1).tolist() and out.token_ids[0] == 3
    raw = logits[1].log_softmax(-1)
    assert math.isclose(out.logprobs[1].item(), raw[out.token_ids[1]].item(), rel_tol=1e-5)


def test_rows_without_the_new_features_cost_nothing_and_are_unchanged():
    """A greedy batch gathers no penalty, min_p, bias or grammar tensors; greedy rows next to rows
    using every new feature get exactly the tokens and logprobs they get alone."""
    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(8))
    plain = [SamplingParams(), SamplingParams(top_n_tokens=3)]
    batch = sampling_batch(plain, [[1, 2], [3]], [1, 1])
    fields = ("penalties", "min_p", "logit_bias", "grammar", "do_sample", "watermark", "raw_logprobs")
    assert all(getattr(batch, f) is None for f in fields)
    alone = Sampler()(logits[:2].clone(), batch)
    assert alone.token_ids.tolist() == logits[:2].argmax(-1).tolist()
    featured = [
        SamplingParams(do_sample=True, min_p=0.2, presence_penalty=1.0, seed=1),
        SamplingParams(logit_bias=((0, 5.0),), presence_penalty=-1.0),
    ]
    mixed = _sample(Sampler(), logits.clone(), plain + featured, [[1, 2], [3], [4, 5], [6, 7]], [1, 1, 1, 1])
    assert mixed.token_ids[:2].tolist() == alone.token_ids.tolist()
    assert torch.equal(mixed.logprobs[:2], alone.logprobs)
    assert torch.equal(mixed.top_ids[1, :3], alone.top_ids[1])
    assert torch.equal(mixed.top_logprobs[1, :3], alone.top_logprobs[1])


def test_a_filtered_token_is_never_drawn_even_where_the_uniform_is_at_its_top():
    """Seed 134 at position 5 draws the largest 24-bit uniform for token 45433, which float32 used to
    round to 1.0: its Exp(1) noise was 0 and its -inf logit turned NaN, which argmax picked."""
    u = hash_uniform(torch.tensor([134]), torch.tensor([5]), 49152)
    assert u.max() < 1 and u.argmax().item() == 45433
    logits = torch.zeros(1, 49152)
    logits[0, 0] = 5.0
    out = _sample(Sampler(), logits, [SamplingParams(do_sample=True, seed=134, top_k=1)], [[1, 2, 3, 4, 5]], [5])
    assert out.token_ids.tolist() == [0] and out.logprobs.item() == 0.0
