"""Serving on CUDA through the HTTP API: bf16 parity with transformers, and the KV pool sized from
`--cuda-memory-fraction` and filled until requests are preempted."""

import asyncio

import pytest
import requests
import torch

from benchmarks.loadgen import run_load
from benchmarks.workload import make_requests
from shard.config import ShardConfig
from shard.runner import ModelRunner
from tests.e2e.server import LauncherProcess
from tests.e2e.test_bfloat16_parity import check_parity_with_transformers

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("model", ["smollm2-135m", "qwen3-0.6b"])
def test_bfloat16_generations_match_transformers_on_cuda(gpu_models, model):
    # A third of the card, not the default 0.9: other test files run beside this one (gpu_check's workers).
    with LauncherProcess(gpu_models / model, "--dtype", "bfloat16", "--cuda-memory-fraction", "0.3") as server:
        check_parity_with_transformers(server.url, gpu_models / model, "cuda", max_diverged=1.0)


def test_warmup_sizes_the_kv_cache_from_the_memory_fraction(gpu_models):
    """The pool is what the fraction leaves after the weights and the largest prefill's peak."""
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    runner = ModelRunner(
        ShardConfig(model_dir=gpu_models / "smollm2-135m", dtype="bfloat16", cuda_memory_fraction=0.05)
    )
    blocks = runner.warmup(max_prefill_tokens=2048, max_batch_size=32, max_num_blocks=0)
    budget = 0.05 * torch.cuda.get_device_properties(0).total_memory
    assert 0.5 * budget < blocks * runner.block_bytes < budget
    assert torch.cuda.memory_allocated() - before <= budget * 1.02, "weights + cache + graphs exceed the fraction"
    del runner
    torch.cuda.empty_cache()


def _metric(url: str, name: str) -> float:
    text = requests.get(url + "/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def test_a_run_that_fills_the_pool_completes_through_preemption(gpu_models):
    """A small fraction (0.45% of an H200: ~640 MB, 270 of them weights) gives a pool of some
    thousands of tokens; 48 sequences of ~700 tokens need several times that."""
    model = gpu_models / "smollm2-135m"
    limits = ("--max-input-tokens", "512", "--max-total-tokens", "1024", "--max-batch-prefill-tokens", "1024")
    with LauncherProcess(model, "--dtype", "bfloat16", "--cuda-memory-fraction", "0.0045", *limits) as server:
        total = _metric(server.url, "tgi_batch_max_total_tokens")
        specs = make_requests(model, 48, (200, 300), (400, 500))
        assert sum(s.prompt_len + s.max_tokens for s in specs) > 2 * total, total
        records, _ = asyncio.run(run_load(server.url, specs, concurrency=48))
        assert [r.error for r in records if not r.ok] == []
        assert [r.output_tokens for r in records] == [s.max_tokens for s in specs]
        assert _metric(server.url, "sluice_preemptions") > 0
        assert requests.get(server.url + "/health", timeout=10).status_code == 200
