"""Decode replayed from CUDA graphs against eager decode."""

import pytest
import torch

from shard.config import ShardConfig
from shard.runner import ModelRunner
from shard.sampler import SamplingParams
from shard.step import NewRequest, RunningRequest, StepInput

pytestmark = pytest.mark.gpu

BUCKETS = (1, 2, 4, 8, 16, 32, 64)
STEPS = 12


def _runner(model_dir, **config) -> ModelRunner:
    runner = ModelRunner(ShardConfig(model_dir=model_dir, dtype="bfloat16", cuda_memory_fraction=0.9, **config))
    runner.warmup(max_prefill_tokens=4096, max_batch_size=max(BUCKETS), max_num_blocks=4096)
    return runner


def _greedy(runner: ModelRunner, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """Each prompt's greedy tokens: one prefill step for all, then `steps` decode steps."""
    bs, first, new = runner.config.block_size, 0, []
    for i, prompt in enumerate(prompts):
        n = -(-(len(prompt) + steps + 1) // bs)
        new.append(NewRequest(i, prompt, 0, len(prompt), list(range(first, first + n)), SamplingParams()))
        first += n
    tokens: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    step = StepInput(0, new_requests=new)
    for s in range(steps + 1):
        for out in runner.step(step).outputs:
            tokens[out.req_id].append(out.token_id)
        step = StepInput(s + 1, running_requests=[RunningRequest(i, 1, []) for i in range(len(prompts))])
    runner.step(StepInput(steps + 1, forget_req_ids=list(tokens)))
    return [tokens[i] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def runners(gpu_models):
    model = gpu_models / "smollm2-135m"
    graphs, eager = _runner(model, cuda_graphs=BUCKETS), _runner(model, cuda_graphs=())
    assert graphs.decode_graphs is not None and graphs.decode_graphs.buckets == list(BUCKETS)
    assert eager.decode_graphs is None
    yield graphs, eager
    del graphs, eager
    torch.cuda.empty_cache()


@pytest.mark.parametrize("batch", [1, 2, 3, 4, 5, 8, 13, 16, 31, 32, 33, 64])
def test_graph_decode_gives_the_eager_tokens(runners, batch):
    """Every bucket, sizes between buckets (padded rows), and mixed prompt lengths."""
    graphs, eager = runners
    g = torch.Generator().manual_seed(batch)
    prompts = [
        torch.randint(100, 40000, (int(n),), generator=g).tolist() for n in torch.randint(1, 300, (batch,), generator=g)
    ]
    assert _greedy(graphs, prompts, STEPS) == _greedy(eager, prompts, STEPS)


def test_a_batch_past_the_largest_bucket_runs_eagerly(runners):
    graphs, _ = runners
    assert graphs.decode_graphs.bucket(max(BUCKETS) + 1) is None
