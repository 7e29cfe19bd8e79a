"""Sharded over 2 and 3 gloo ranks, the model gives the unsharded logits (prefill and decode)."""

import multiprocessing as mp

import pytest
import torch

from tests.conftest import TINY_CONFIGS, make_tiny_model
from tests.e2e.server import free_port

# 12 query and 6 KV heads split over 2 and 3 ranks; an odd vocab pads the last rank's rows.
TP_CONFIG = dict(
    TINY_CONFIGS["llama"],
    hidden_size=96,
    num_attention_heads=12,
    num_key_value_heads=6,
    head_dim=8,
    vocab_size=389,
    intermediate_size=192,
)


def _logits(model_dir, rank: int, world_size: int, port: int, queue) -> None:
    """In a process: prefill two prompts, decode three steps, send rank 0's logits."""
    from shard import dist
    from shard.config import ShardConfig
    from shard.runner import ModelRunner
    from shard.sampler import SamplingParams
    from shard.step import Batch, RequestState

    torch.set_num_threads(1)
    dist.init(rank, world_size, "127.0.0.1", port, torch.device("cpu"))
    runner = ModelRunner(
        # TP=2 through the compiled forward (its all-reduces inside the graph), TP=1 and TP=3 eager (time)
        ShardConfig(
            model_dir=model_dir,
            rank=rank,
            world_size=world_size,
            device="cpu",
            dtype="float32",
            enforce_eager=world_size != 2,
        )
    )
    runner.warmup(64, 4, max_num_blocks=16)
    g = torch.Generator().manual_seed(0)
    states = [
        RequestState(i, torch.randint(2, 389, (n,), generator=g).tolist(), n, 0, [i, i + 2, i + 4], SamplingParams())
        for i, n in enumerate((29, 11))
    ]
    results = [runner.forward(Batch(states, [len(s.token_ids) for s in states]), torch.arange(40))]
    for step in range(3):
        for s in states:
            s.num_computed_tokens = len(s.token_ids)
            s.token_ids.append(100 + step)
        results.append(runner.forward(Batch(states, [1, 1])))
    if rank == 0:
        queue.put([r.tolist() for r in results])
    dist.shutdown()


def _run(model_dir, world_size: int) -> list[torch.Tensor]:
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_logits, args=(model_dir, r, world_size, port, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results = queue.get(timeout=120)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    return [torch.tensor(r) for r in results]


@pytest.fixture(scope="module")
def tp_model_dir(tmp_path_factory):
    import transformers

    out = tmp_path_factory.mktemp("tiny-tp")
    config = transformers.LlamaConfig(**TP_CONFIG, torch_dtype="float32")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).float()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_logits_match_unsharded(tp_model_dir, world_size):
    expected, sharded = _run(tp_model_dir, 1), _run(tp_model_dir, world_size)
    for e, s in zip(expected, sharded):
        torch.testing.assert_close(s, e, atol=1e-4, rtol=0)


def test_indivisible_heads_fail_with_the_numbers(tmp_path):
    from shard import dist
    from shard.config import ShardConfig
    from shard.runner import ModelRunner

    model_dir = make_tiny_model("llama", tmp_path)  # 4 heads, 2 KV heads
    dist._rank, dist._size = 0, 3  # as if there were 3 ranks; no collective runs before the check
    try:
        with pytest.raises(ValueError, match="num_attention_heads=4, which does not divide by --num-shard 3"):
            ModelRunner(ShardConfig(model_dir=model_dir, world_size=3, device="cpu"))
    finally:
        dist._rank, dist._size = 0, 1
