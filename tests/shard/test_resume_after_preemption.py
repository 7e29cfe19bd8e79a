"""A request recomputed after a preemption continues exactly as an uninterrupted run: the
tokens it generated before still count as generated for the penalties."""

import pytest

from shard.config import ShardConfig
from shard.runner import ModelRunner
from shard.sampler import SamplingParams
from shard.step import NewRequest, RunningRequest, StepInput

PROMPT = [5, 6, 7, 8, 9]
SAMPLING = SamplingParams(frequency_penalty=1.5, repetition_penalty=1.3)


@pytest.fixture(scope="module")
def runner(tiny_model_dir):
    r = ModelRunner(ShardConfig(model_dir=tiny_model_dir, device="cpu", enforce_eager=True))
    r.warmup(64, 4, max_num_blocks=16)
    return r


def _generate(runner, req: NewRequest, count: int, step_id: int = 0) -> list[int]:
    """`count` tokens of `req`: its first step, then decode steps."""
    tokens = [runner.step(StepInput(step_id, new_requests=[req])).outputs[0].token_id]
    while len(tokens) < count:
        step_id += 1
        out = runner.step(StepInput(step_id, running_requests=[RunningRequest(req.req_id, 1, [])]))
        tokens.append(out.outputs[0].token_id)
    return tokens


def test_penalties_count_the_tokens_generated_before_a_preemption(runner):
    runner.clear()
    whole = _generate(runner, NewRequest(1, PROMPT, 0, len(PROMPT), [0, 1], SAMPLING), 12)
    runner.clear()
    before = _generate(runner, NewRequest(2, PROMPT, 0, len(PROMPT), [2, 3], SAMPLING), 6)
    runner.step(StepInput(50, forget_req_ids=[2]))  # preempted: recomputed from its known tokens
    known = PROMPT + before
    resumed = NewRequest(3, known, 0, len(known), [4, 5], SAMPLING, num_prompt_tokens=len(PROMPT))
    after = _generate(runner, resumed, 6, step_id=51)
    assert before + after == whole


def test_a_prompt_length_past_the_tokens_is_refused(runner):
    runner.clear()
    bad = NewRequest(4, PROMPT, 0, len(PROMPT), [0], SAMPLING, num_prompt_tokens=len(PROMPT) + 1)
    with pytest.raises(ValueError, match="6 prompt tokens of 5"):
        runner.step(StepInput(0, new_requests=[bad]))
