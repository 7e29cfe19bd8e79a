"""lm-eval's `local-completions` model against a live server: its loglikelihood requests (completions
with `echo` and `logprobs`) give the log-probabilities `transformers` computes itself, in float32."""

import math

import pytest
import torch
import transformers
from lm_eval.api.instance import Instance
from lm_eval.models.openai_completions import LocalCompletionsAPI

PAIRS = [
    ("The capital of France is", " Paris"),
    ("Once upon a time, there was a", " little girl who lived in a village"),
    ("Question: what is two plus two?\nAnswer:", " four"),
    ("Le chat est assis sur", " le tapis."),
    ("日本の首都は", "東京です。"),
    ("def add(a, b):\n", "    return a + b"),
]
ROLLING = ["The quick brown fox jumps over the lazy dog. " * 3, "Ein kleiner Test: Grüße aus München! 🌊"]


@pytest.fixture(scope="module")
def lm(server, bundled_model_dir) -> LocalCompletionsAPI:
    return LocalCompletionsAPI(
        base_url=server.url + "/v1/completions",
        model="smol",
        tokenizer=str(bundled_model_dir),
        tokenizer_backend="huggingface",
        tokenized_requests=True,
        max_length=512,
        max_retries=1,
        timeout=120,
    )


@pytest.fixture(scope="module")
def model(bundled_model_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(bundled_model_dir, dtype=torch.float32).eval()


def _continuation_logprob(model, context_ids: list[int], continuation_ids: list[int]) -> tuple[float, bool]:
    """transformers' log-probability of the continuation after the context, and whether it is greedy."""
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    positions = range(len(context_ids) - 1, len(context_ids) + len(continuation_ids) - 1)
    picked = [logprobs[p, t].item() for p, t in zip(positions, continuation_ids)]
    greedy = all(logprobs[p].argmax().item() == t for p, t in zip(positions, continuation_ids))
    return sum(picked), greedy


def test_loglikelihood_equals_transformers(lm, model):
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(PAIRS)]
    served = lm.loglikelihood(requests, disable_tqdm=True)
    for (context, continuation), (logprob, greedy) in zip(PAIRS, served):
        context_ids, continuation_ids = lm._encode_pair(context, continuation)
        expected, expected_greedy = _continuation_logprob(model, context_ids, continuation_ids)
        assert math.isclose(logprob, expected, abs_tol=1e-3), (context, continuation, logprob, expected)
        assert greedy == expected_greedy, (context, continuation)


def test_loglikelihood_rolling_equals_transformers(lm, model):
    requests = [Instance("loglikelihood_rolling", {}, (text,), i) for i, text in enumerate(ROLLING)]
    served = lm.loglikelihood_rolling(requests, disable_tqdm=True)
    for text, logprob in zip(ROLLING, served):
        ids = lm.tok_encode(text)
        # lm-eval's first window predicts every token after a prefix token (the EOS prefix token).
        expected, _ = _continuation_logprob(model, [lm.prefix_token_id], ids)
        assert math.isclose(logprob, expected, abs_tol=1e-3), (text, logprob, expected)
