"""The compiled CPU forward computes what the eager one does, whatever the number of tokens, and
`--dtype auto` picks bfloat16 only where the CPU multiplies it natively."""

import pytest
import torch

from shard import runner as runner_module
from shard.config import ShardConfig
from shard.runner import ModelRunner, resolve_dtype
from shard.sampler import SamplingParams
from shard.step import NewRequest, RunningRequest, StepInput

TOP = SamplingParams(top_n_tokens=5)


def _outputs(model_dir, enforce_eager: bool) -> list[list[tuple]]:
    runner = ModelRunner(ShardConfig(model_dir=model_dir, device="cpu", dtype="float32", enforce_eager=enforce_eager))
    assert runner.compiled != enforce_eager
    runner.warmup(64, 4, max_num_blocks=32)
    g = torch.Generator().manual_seed(4)
    a, b, c = (torch.randint(2, 384, (n,), generator=g).tolist() for n in (21, 40, 9))
    steps = [
        StepInput(0, new_requests=[NewRequest(1, a, 0, 21, [0, 1], TOP)]),  # prefill
        StepInput(1, running_requests=[RunningRequest(1, 1, [])]),  # one token: T = 1
        StepInput(
            2, new_requests=[NewRequest(2, b, 0, 16, [2, 3, 4], TOP)], running_requests=[RunningRequest(1, 1, [])]
        ),
        StepInput(3, running_requests=[RunningRequest(2, 24, [])]),  # the prompt's second chunk
        StepInput(4, new_requests=[NewRequest(3, c, 0, 9, [5], TOP)], running_requests=[RunningRequest(1, 1, [6])]),
        StepInput(5, running_requests=[RunningRequest(r, 1, []) for r in (1, 2, 3)]),
    ]
    outputs = []
    for step in steps:
        out = runner.step(step)
        outputs.append(
            sorted((o.req_id, o.token_id, o.logprob, tuple(t for t, _ in o.top_tokens)) for o in out.outputs)
        )
    return outputs


def test_compiled_forward_gives_the_eager_tokens_and_logprobs(tiny_model_dir):
    eager, compiled = _outputs(tiny_model_dir, True), _outputs(tiny_model_dir, False)
    assert [[o[:2] + o[3:] for o in step] for step in compiled] == [[o[:2] + o[3:] for o in step] for step in eager]
    for step_e, step_c in zip(eager, compiled):
        for e, c in zip(step_e, step_c):
            assert c[2] == pytest.approx(e[2], abs=1e-5)


@pytest.mark.parametrize(("fast_bf16", "expected"), [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_dtype_on_cpu_follows_native_bf16_support(monkeypatch, fast_bf16, expected):
    monkeypatch.setattr(runner_module, "cpu_has_fast_bf16", lambda: fast_bf16)
    assert resolve_dtype("auto", torch.device("cpu"), None) == expected
    assert resolve_dtype("float32", torch.device("cpu"), None) == torch.float32
