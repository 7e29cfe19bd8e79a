"""Constrained decoding on CUDA: the bitmask op and the sampler's new features give the CPU's
results, and a constrained generation through the runner (pinned mask buffer, device unpacking)
yields JSON that follows its schema."""

import dataclasses
import json

import llguidance
import pytest
import torch

from shard.config import ShardConfig
from shard.runner import ModelRunner
from shard.sampler import Sampler, SamplingParams, TokenBitmask, apply_token_bitmask
from shard.sampling_table import sampling_batch
from shard.step import NewRequest, RunningRequest, StepInput

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("vocab, rows", [(49152, None), (151936, [0, 3, 5]), (389, [1])])
def test_the_bitmask_op_on_cuda_equals_cpu(vocab, rows):
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(6, vocab, generator=g)
    constrained = 6 if rows is None else len(rows)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (constrained, -(-vocab // 32)), generator=g, dtype=torch.int32)
    index = None if rows is None else torch.tensor(rows)
    cpu = apply_token_bitmask(logits, TokenBitmask(index, bitmask))
    cuda = apply_token_bitmask(
        logits.cuda(), TokenBitmask(None if index is None else index.cuda(), bitmask.pin_memory().cuda())
    )
    assert torch.equal(cuda.cpu(), cpu)


def test_the_sampler_with_grammar_bias_presence_and_min_p_on_cuda_equals_cpu():
    vocab = 49152
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(1)) * 3
    params = [
        SamplingParams(logit_bias=((7, 5.0),), top_n_tokens=3),
        SamplingParams(do_sample=True, seed=3, min_p=0.05, presence_penalty=0.7, raw_logprobs=True, top_n_tokens=2),
        SamplingParams(do_sample=True, seed=4, temperature=0.8, min_p=0.2),
        SamplingParams(presence_penalty=-0.5, frequency_penalty=0.2),
    ]
    histories = [[1, 2, 7], [5, 9, 9, 11], [3], [4, 4, 8]]
    bitmask = torch.randint(-(2**31), 2**31 - 1, (2, vocab // 32), dtype=torch.int32)
    rows = torch.tensor([0, 2])
    out = {}
    for device in ("cpu", "cuda"):
        batch = sampling_batch(params, histories, [1, 2, 1, 1], device)
        mask = TokenBitmask(rows.to(device), bitmask.to(device))
        out[device] = Sampler()(logits.to(device), dataclasses.replace(batch, grammar=mask))
    assert out["cuda"].token_ids.tolist() == out["cpu"].token_ids.tolist()
    torch.testing.assert_close(out["cuda"].logprobs.cpu(), out["cpu"].logprobs, atol=1e-4, rtol=0)
    torch.testing.assert_close(out["cuda"].top_logprobs.cpu(), out["cpu"].top_logprobs, atol=1e-4, rtol=0)


def test_constrained_generation_through_the_runner_on_cuda(gpu_models):
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    model_dir = gpu_models / "smollm2-135m"
    runner = ModelRunner(ShardConfig(model_dir=model_dir, dtype="bfloat16", cuda_memory_fraction=0.05))
    runner.warmup(max_prefill_tokens=256, max_batch_size=8, max_num_blocks=64)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = tokenizer.encode("A person as JSON:")
    samplings = [SamplingParams()] + [SamplingParams(do_sample=True, seed=s) for s in range(3)] + [SamplingParams()]
    requests = [
        NewRequest(
            i, prompt, 0, len(prompt), [4 * i, 4 * i + 1, 4 * i + 2, 4 * i + 3], s, grammar=grammar if i < 4 else ""
        )
        for i, s in enumerate(samplings)
    ]
    outputs: dict[int, list] = {i: [] for i in range(5)}
    step = StepInput(0, new_requests=requests)
    for step_id in range(1, 40):
        for o in runner.step(step).outputs:
            outputs[o.req_id].append(o)
        running = [i for i in range(4) if not outputs[i][-1].grammar_completed] + [4]
        step = StepInput(step_id, running_requests=[RunningRequest(i, 1, []) for i in running])
        if running == [4]:
            break
    for i in range(4):
        document = json.loads(tokenizer.decode([o.token_id for o in outputs[i]]))
        assert set(document) == {"name", "age"} and isinstance(document["age"], int), document
        assert outputs[i][-1].grammar_completed
    assert not any(o.grammar_completed for o in outputs[4])
