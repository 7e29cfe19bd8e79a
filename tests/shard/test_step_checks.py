"""The shard refuses a malformed step before it touches its state, and serves the next one."""

import pytest

from shard.config import ShardConfig
from shard.runner import ModelRunner
from shard.sampler import SamplingParams
from shard.step import NewRequest, RunningRequest, StepInput


@pytest.fixture(scope="module")
def runner(tiny_model_dir):
    r = ModelRunner(ShardConfig(model_dir=tiny_model_dir, device="cpu", enforce_eager=True))
    r.warmup(64, 4, max_num_blocks=16)
    return r


def _start_request_1(runner) -> None:
    """Request 1 computed its 3 prompt tokens and sampled a 4th; nothing else runs."""
    runner.clear()
    runner.step(StepInput(0, new_requests=[NewRequest(1, [5, 6, 7], 0, 3, [0], SamplingParams())]))


def _state(runner) -> dict[int, tuple]:
    b = runner.batch
    return {
        req_id: (int(b.num_tokens[row]), int(b.num_computed[row]), b.block_table[row, : b.num_blocks[row]].tolist())
        for req_id, row in b.row_of.items()
    }


def _new(req_id=2, token_ids=(5, 6, 7), cached=0, scheduled=3, blocks=(1,), sampling=SamplingParams()):
    return NewRequest(req_id, list(token_ids), cached, scheduled, list(blocks), sampling)


@pytest.mark.parametrize(
    ("step", "message"),
    [
        (StepInput(1, new_requests=[_new(token_ids=(), scheduled=0)]), "0 tokens scheduled"),
        (StepInput(1, new_requests=[_new(scheduled=0)]), "0 tokens scheduled"),
        (StepInput(1, new_requests=[_new(scheduled=4)]), "tokens 0..4 scheduled, 3 known"),
        (StepInput(1, new_requests=[_new(cached=-1)]), "scheduled, 3 known"),
        (StepInput(1, new_requests=[_new(token_ids=range(20), scheduled=20)]), "1 blocks cannot hold 20 tokens"),
        (StepInput(1, new_requests=[_new(blocks=(16,))]), "outside the cache's 16 blocks"),
        (StepInput(1, new_requests=[_new(blocks=(-1,))]), "outside the cache's 16 blocks"),
        (StepInput(1, new_requests=[_new(sampling=SamplingParams(logit_bias=((384, 1.0),)))]), "logit_bias token"),
        (StepInput(1, new_requests=[_new(sampling=SamplingParams(logit_bias=((3, float("inf")),)))]), "or not finite"),
        (StepInput(1, running_requests=[RunningRequest(9, 1, [])]), "request 9 is not running"),
        (StepInput(1, running_requests=[RunningRequest(1, 2, [])]), "tokens 3..5 scheduled, 4 known"),
        (StepInput(1, running_requests=[RunningRequest(1, 1, [99])]), "outside the cache's 16 blocks"),
        (StepInput(1, running_requests=[RunningRequest(1, 1, [])], forget_req_ids=[1]), "request 1 is not running"),
        # a good request beside a bad one is refused with it, and left out of the state
        (StepInput(1, new_requests=[_new(req_id=3), _new(scheduled=0)]), "0 tokens scheduled"),
    ],
)
def test_malformed_steps_are_refused_without_side_effects(runner, step, message):
    _start_request_1(runner)
    before = _state(runner)
    with pytest.raises(ValueError, match=message):
        runner.step(step)
    assert _state(runner) == before
    out = runner.step(StepInput(2, running_requests=[RunningRequest(1, 1, [])]))
    assert [o.req_id for o in out.outputs] == [1]
