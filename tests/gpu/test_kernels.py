"""The Triton kernels on CUDA at the served models' shapes, in bf16 and fp16, against the torch
reference in fp32 on the same (rounded) inputs; the per-layer features (sliding window, soft-cap,
ALiBi, T5's position bias) at the shapes of the families that use them, under a CUDA graph too, and without reading
the blocks before a window."""

import pytest
import torch

from shard.kernels import reference, triton_attention
from tests.shard.test_reference_attention import alibi_slopes, poison_outside_windows
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


WINDOW, SOFTCAP = 700, 3.0  # a window shorter than most contexts below; a cap that bends the scores
T5_DISTANCES = 129  # T5 v1.1's decoder: a bias for distances 0..127, and one for 128 or more
# name: ((query heads, kv heads, head_dim), (sliding_window, softcap, ALiBi, position bias))
FEATURE_CASES = {
    "mistral-7b-window": ((32, 8, 128), (WINDOW, 0.0, False, False)),
    "starcoder2-3b-window": ((24, 2, 128), (WINDOW, 0.0, False, False)),
    "gemma2-2b-global": ((8, 4, 256), (0, SOFTCAP, False, False)),
    "gemma2-2b-local": ((8, 4, 256), (WINDOW, SOFTCAP, False, False)),
    "bloom-560m-alibi": ((16, 16, 64), (0, 0.0, True, False)),
    "t5-v1.1-large-bias": ((16, 16, 64), (0, 0.0, False, True)),
    "smollm2-all": ((9, 3, 64), (WINDOW, SOFTCAP, True, True)),
}
EXTEND_Q_LENS, EXTEND_CACHED = [1500, 1, 333, 64, 1024, 17], [0, 2000, 0, 511, 96, 0]


def _features(case: str) -> dict:
    (heads, _, _), (window, softcap, alibi, bias) = FEATURE_CASES[case]
    slopes = alibi_slopes(heads, "cuda") if alibi else None
    table = torch.randn(heads, T5_DISTANCES, generator=torch.Generator().manual_seed(2)).cuda() if bias else None
    return {"sliding_window": window, "softcap": softcap, "alibi_slopes": slopes, "position_bias": table}


def _extend_case(case, dtype):
    heads, kv_heads, head_dim = FEATURE_CASES[case][0]
    context_lens = [q + c for q, c in zip(EXTEND_Q_LENS, EXTEND_CACHED)]
    tables, num_blocks = make_block_tables(context_lens, BLOCK)
    k_cache, v_cache = make_cache(num_blocks, BLOCK, kv_heads, head_dim, dtype)
    query = torch.randn(sum(EXTEND_Q_LENS), heads, head_dim, device="cuda").to(dtype)
    cu = torch.tensor([0, *torch.tensor(EXTEND_Q_LENS).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    lens = torch.tensor(context_lens, dtype=torch.int32, device="cuda")
    return query, k_cache, v_cache, cu, lens, tables, head_dim**-0.5


def _decode_case(case, dtype, num_reqs=128):
    heads, kv_heads, head_dim = FEATURE_CASES[case][0]
    g = torch.Generator().manual_seed(1)
    context_lens = torch.randint(1, 4097, (num_reqs,), generator=g).tolist()
    context_lens[:4] = [1, 4096, WINDOW, WINDOW + 1]
    tables, num_blocks = make_block_tables(context_lens, BLOCK)
    k_cache, v_cache = make_cache(num_blocks, BLOCK, kv_heads, head_dim, dtype)
    query = torch.randn(num_reqs, heads, head_dim, device="cuda").to(dtype)
    lens = torch.tensor(context_lens, dtype=torch.int32, device="cuda")
    return query, k_cache, v_cache, lens, tables, head_dim**-0.5


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", FEATURE_CASES)
def test_extend_features_at_served_shapes(case, dtype):
    """Prompts of 1 to 1,500 tokens, some after a cached prefix of up to 2,000, with the layer's features."""
    query, k_cache, v_cache, cu, lens, tables, scale = _extend_case(case, dtype)
    kw = _features(case)
    out = triton_attention.attention_extend(query, k_cache, v_cache, cu, lens, tables, scale, **kw)
    ref = reference.attention_extend(query.float(), k_cache.float(), v_cache.float(), cu, lens, tables, scale, **kw)
    torch.testing.assert_close(out.float(), ref, atol=ATOL[dtype], rtol=ATOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", FEATURE_CASES)
def test_decode_features_at_served_shapes(case, dtype):
    """128 requests of 1 to 4,096 tokens with the layer's features, the last 28 padding rows."""
    query, k_cache, v_cache, lens, tables, scale = _decode_case(case, dtype)
    kw = _features(case)
    padded = lens.clone()
    padded[100:] = 0
    out = triton_attention.attention_decode(query, k_cache, v_cache, padded, tables, scale, 4096, **kw)
    ref = reference.attention_decode(
        query[:100].float(), k_cache.float(), v_cache.float(), lens[:100], tables[:100], scale, 4096, **kw
    )
    torch.testing.assert_close(out[:100].float(), ref, atol=ATOL[dtype], rtol=ATOL[dtype])
    assert torch.equal(out[100:], torch.zeros_like(out[100:]))


@pytest.mark.parametrize("case", ["gemma2-2b-local", "smollm2-all"])
def test_decode_features_replayed_in_a_cuda_graph(case):
    """The decode grid does not depend on lengths: a graph captured at one set of context lengths,
    replayed at others (longer and shorter than the window), gives the reference's rows."""
    query, k_cache, v_cache, lens, tables, scale = _decode_case(case, torch.bfloat16, num_reqs=32)
    kw = _features(case)
    static_lens = torch.ones_like(lens)
    triton_attention.attention_decode(query, k_cache, v_cache, static_lens, tables, scale, 4096, **kw)  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_attention.attention_decode(query, k_cache, v_cache, static_lens, tables, scale, 4096, **kw)
    static_lens.copy_(lens)
    graph.replay()
    ref = reference.attention_decode(query.float(), k_cache.float(), v_cache.float(), lens, tables, scale, 4096, **kw)
    torch.testing.assert_close(out.float(), ref, atol=ATOL[torch.bfloat16], rtol=ATOL[torch.bfloat16])


def test_blocks_before_the_window_are_not_read_on_cuda():
    """NaN in every block outside each query's window leaves the outputs finite and unchanged."""
    case = "smollm2-all"
    kw = _features(case)
    query, k_cache, v_cache, cu, lens, tables, scale = _extend_case(case, torch.bfloat16)
    first = [max(0, c - WINDOW + 1) for c in EXTEND_CACHED]
    k_bad, v_bad = poison_outside_windows(k_cache, v_cache, tables, first, lens.tolist())
    assert k_bad.isnan().any()
    clean = triton_attention.attention_extend(query, k_cache, v_cache, cu, lens, tables, scale, **kw)
    poisoned = triton_attention.attention_extend(query, k_bad, v_bad, cu, lens, tables, scale, **kw)
    assert poisoned.isfinite().all()
    torch.testing.assert_close(poisoned, clean, atol=0, rtol=0)

    query, k_cache, v_cache, lens, tables, scale = _decode_case(case, torch.bfloat16)
    n = lens.tolist()
    k_bad, v_bad = poison_outside_windows(k_cache, v_cache, tables, [max(0, x - WINDOW) for x in n], n)
    assert k_bad.isnan().any()
    clean = triton_attention.attention_decode(query, k_cache, v_cache, lens, tables, scale, 4096, **kw)
    poisoned = triton_attention.attention_decode(query, k_bad, v_bad, lens, tables, scale, 4096, **kw)
    assert poisoned.isfinite().all()
    torch.testing.assert_close(poisoned, clean, atol=0, rtol=0)
