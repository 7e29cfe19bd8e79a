"""Sharded over 2 and 3 gloo ranks, the model gives the unsharded logits (prefill and decode)."""

import pytest

from tests.conftest import TINY_CONFIGS, make_tiny_model
from tests.models import harness

# 12 query and 6 KV heads split over 2 and 3 ranks; an odd vocab pads the last rank's rows.
TP_CONFIG = dict(
    {k: v for k, v in TINY_CONFIGS["llama"].items() if k != "architectures"},
    hidden_size=96,
    num_attention_heads=12,
    num_key_value_heads=6,
    head_dim=8,
    vocab_size=389,
    intermediate_size=192,
)


@pytest.fixture(scope="module")
def tp_model_dir(tmp_path_factory):
    return harness.write_checkpoint(tmp_path_factory.mktemp("tiny-tp"), "LlamaForCausalLM", **TP_CONFIG)


@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_logits_match_unsharded(tp_model_dir, world_size):
    # TP=2 through the compiled forward (its all-reduces inside the graph), TP=3 eager (time)
    harness.check_tensor_parallel(tp_model_dir, world_size, compiled=world_size == 2)


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
