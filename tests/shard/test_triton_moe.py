"""The fused-MoE Triton kernels (shard/kernels/triton_moe.py) against the grouped torch path
(shard/kernels/moe.py), which the model tests check against transformers.

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set before triton is
imported) in fp32 and fp16 (the interpreter's bf16 dot product is broken, so bf16 runs on CUDA only),
at small shapes whose sizes are not multiples of the tiles, so that every mask is exercised; the
reference runs in fp32 on the same rounded inputs.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# triton is a dependency: without it these tests fail rather than skip.
import triton  # noqa: F401, E402

from shard.kernels import moe, triton_moe  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# fp32: summation order only (on CUDA, tensor-core accumulation order); fp16 / bf16: h and the
# per-expert outputs are rounded to the dtype before the sum over top_k, as in vLLM.
ATOL = {torch.float32: 1e-5 if DEVICE == "cpu" else 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
HIDDEN, INTER = 48, 40  # not multiples of the 32/64 tiles


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_routing(num_tokens: int, num_experts: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, top_k] float32, distinct expert ids [T, top_k]), as the router gives them."""
    logits = torch.randn(num_tokens, num_experts, device=DEVICE)
    weights, ids = torch.softmax(logits, dim=-1).topk(top_k, dim=-1)
    return weights, ids


def make_weights(num_experts: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    w13 = (torch.randn(num_experts, 2 * INTER, HIDDEN, device=DEVICE) / HIDDEN**0.5).to(dtype)
    w2 = (torch.randn(num_experts, HIDDEN, INTER, device=DEVICE) / INTER**0.5).to(dtype)
    return w13, w2


@pytest.mark.parametrize("num_tokens, num_experts, top_k", [(1, 8, 2), (37, 4, 2), (5, 6, 3)])
@pytest.mark.parametrize("block_m", [16, 64])
def test_align_groups_every_assignment_once_in_single_expert_blocks(num_tokens, num_experts, top_k, block_m):
    _, ids = make_routing(num_tokens, num_experts, top_k)
    sorted_ids, expert_ids, num_post = triton_moe.moe_align_block_size(ids, num_experts, block_m)
    n, used = ids.numel(), int(num_post)
    assert used % block_m == 0 and sorted_ids.numel() % block_m == 0 and used <= sorted_ids.numel()
    real = sorted_ids[:used][sorted_ids[:used] < n]
    assert sorted(real.tolist()) == list(range(n))  # every assignment once
    assert (sorted_ids[used:] == n).all()
    flat = ids.reshape(-1)
    for block in range(used // block_m):
        rows = sorted_ids[block * block_m : (block + 1) * block_m]
        rows = rows[rows < n].long()
        assert rows.numel() > 0 and (flat[rows] == expert_ids[block]).all()  # no empty block, one expert each
    counts = torch.bincount(flat, minlength=num_experts)
    assert used == int(((counts + block_m - 1) // block_m * block_m).sum())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "num_tokens, num_experts, top_k",
    [(1, 8, 2), (3, 8, 2), (37, 4, 2), (70, 8, 3)],  # 16-row blocks (decode-sized), then 64-row blocks
)
def test_fused_experts_match_grouped_torch(num_tokens, num_experts, top_k, dtype):
    weights, ids = make_routing(num_tokens, num_experts, top_k)
    w13, w2 = make_weights(num_experts, dtype)
    x = torch.randn(num_tokens, HIDDEN, device=DEVICE).to(dtype)
    out = triton_moe.fused_experts(x, w13, w2, weights, ids)
    ref = moe.grouped_experts(x.float(), w13.float(), w2.float(), weights, ids)
    assert out.dtype == dtype and out.shape == (num_tokens, HIDDEN)
    torch.testing.assert_close(out.float(), ref, atol=ATOL[dtype], rtol=ATOL[dtype])


def test_experts_without_tokens_and_a_crowded_expert():
    """All tokens on experts 1 and 2 of 5 (three experts idle; one with more than a block of rows)."""
    num_tokens = 70
    ids = torch.stack([torch.ones(num_tokens), torch.full((num_tokens,), 2)], dim=1).long().to(DEVICE)
    weights = torch.rand(num_tokens, 2, device=DEVICE)
    w13, w2 = make_weights(5, torch.float32)
    x = torch.randn(num_tokens, HIDDEN, device=DEVICE)
    out = triton_moe.fused_experts(x, w13, w2, weights, ids)
    torch.testing.assert_close(out, moe.grouped_experts(x, w13, w2, weights, ids), atol=ATOL[torch.float32], rtol=0)
