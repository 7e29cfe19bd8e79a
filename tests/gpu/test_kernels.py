"""The Triton kernels on CUDA at the served models' shapes, in bf16 and fp16, against the torch
reference in fp32 on the same (rounded) inputs."""

import pytest
import torch

from shard.kernels import reference, triton_attention
from tests.shard.test_triton_kernels import ATOL, make_block_tables, make_cache

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16]
# (query heads, kv heads, head_dim): SmolLM2-135M, Qwen3-0.6B, Llama-3-8B
SHAPES = {"smollm2": (9, 3, 64), "qwen3-0.6b": (16, 8, 128), "llama3-8b": (32, 8, 128)}
BLOCK = 16


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
def test_store_kv_at_served_shapes(shape, dtype):
    _, kv_heads, head_dim = SHAPES[shape]
    k_cache, v_cache = make_cache(1024, BLOCK, kv_heads, head_dim, dtype)
    kv = torch.randn(4096, 2, kv_heads, head_dim, device="cuda").to(dtype)
    slots = torch.randperm(1024 * BLOCK, device="cuda")[:4096]
    slots[::7] = -1
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    keep = slots >= 0
    reference.store_kv(kv[keep, 0], kv[keep, 1], k_ref, v_ref, slots[keep])
    triton_attention.store_kv(kv[:, 0], kv[:, 1], k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
def test_extend_at_served_shapes(shape, dtype):
    """Prompts of 1 to 1,500 tokens, some after a cached prefix of up to 2,000."""
    heads, kv_heads, head_dim = SHAPES[shape]
    q_lens = [1500, 1, 333, 64, 1024, 17]
    cached = [0, 2000, 0, 511, 96, 0]
    context_lens = [q + c for q, c in zip(q_lens, cached)]
    tables, num_blocks = make_block_tables(context_lens, BLOCK)
    k_cache, v_cache = make_cache(num_blocks, BLOCK, kv_heads, head_dim, dtype)
    query = torch.randn(sum(q_lens), heads, head_dim, device="cuda").to(dtype)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    lens = torch.tensor(context_lens, dtype=torch.int32, device="cuda")
    scale = head_dim**-0.5
    out = triton_attention.attention_extend(query, k_cache, v_cache, cu, lens, tables, scale)
    ref = reference.attention_extend(query.float(), k_cache.float(), v_cache.float(), cu, lens, tables, scale)
    torch.testing.assert_close(out.float(), ref, atol=ATOL[dtype], rtol=ATOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
def test_decode_at_served_shapes(shape, dtype):
    """128 requests of 1 to 4,096 tokens, the last 28 padding rows (context length 0) as a CUDA graph pads."""
    heads, kv_heads, head_dim = SHAPES[shape]
    g = torch.Generator().manual_seed(1)
    context_lens = torch.randint(1, 4097, (128,), generator=g).tolist()
    context_lens[:3] = [1, 4096, 16]
    tables, num_blocks = make_block_tables(context_lens, BLOCK)
    k_cache, v_cache = make_cache(num_blocks, BLOCK, kv_heads, head_dim, dtype)
    query = torch.randn(128, heads, head_dim, device="cuda").to(dtype)
    lens = torch.tensor(context_lens, dtype=torch.int32, device="cuda")
    scale = head_dim**-0.5
    padded = lens.clone()
    padded[100:] = 0
    out = triton_attention.attention_decode(query, k_cache, v_cache, padded, tables, scale, max(context_lens))
    ref = reference.attention_decode(
        query[:100].float(), k_cache.float(), v_cache.float(), lens[:100], tables[:100], scale, max(context_lens)
    )
    torch.testing.assert_close(out[:100].float(), ref, atol=ATOL[dtype], rtol=ATOL[dtype])
