"""Triton paged-attention kernels vs the torch reference.

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set before triton is
imported), in float32 with a tight tolerance; with CUDA they also run in fp16 / bf16. Shapes are small
so the interpreter stays fast (the whole module takes ~25 s on 2 CPU cores): the attention tests take
the full product of head_dim (64, 128), query/KV head ratio (1, 3, 4) and block size (16, 32); the
per-layer features (sliding window, soft-cap, ALiBi) one shape each, and a check that the blocks
before a window are never read.
"""

import itertools
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# triton is a dependency: without it these tests fail rather than skip.
import triton  # noqa: F401, E402

from shard.kernels import reference, triton_attention  # noqa: E402
from tests.shard.test_reference_attention import FEATURES, layer_features, poison_outside_windows  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32] + ([torch.float16, torch.bfloat16] if DEVICE == "cuda" else [])
# The reference runs in fp32 on the same (rounded) inputs. fp32 on CPU is exact up to summation
# order; on CUDA allow for SDPA's own kernels. fp16 / bf16: the kernels round P to the input dtype
# before the PV product and round the output (bf16 keeps 8 mantissa bits, ~4e-3 relative).
ATOL = {torch.float32: 1e-4 if DEVICE == "cpu" else 1e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}

# (head_dim, num_kv_heads, query heads per KV head, block_size)
SHAPES = [(d, 2, g, bs) for d, g, bs in itertools.product((64, 128), (1, 3, 4), (16, 32))]
SHAPE_IDS = [f"d{d}-kv{h}-g{g}-bs{b}" for d, h, g, b in SHAPES]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype):
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return torch.randn(shape, device=DEVICE).to(dtype), torch.randn(shape, device=DEVICE).to(dtype)


def make_block_tables(context_lens, block_size, extra_blocks=3):
    """Each request gets its blocks from one random permutation (never the identity); unused entries
    hold random valid ids, so reading past a request's context shows up as a wrong answer."""
    needed = [(n + block_size - 1) // block_size for n in context_lens]
    num_blocks = sum(needed) + extra_blocks
    perm = torch.randperm(num_blocks)
    max_blocks = max(needed) + 1
    tables = torch.randint(0, num_blocks, (len(context_lens), max_blocks))
    used = 0
    for i, n in enumerate(needed):
        tables[i, :n] = perm[used : used + n]
        used += n
    return tables.to(torch.int32).to(DEVICE), num_blocks


def _as_float(*tensors):
    return [t.float() for t in tensors]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_kv_heads,head_dim,block_size", [(3, 64, 16), (2, 128, 32)])
def test_store_kv(num_kv_heads, head_dim, block_size, dtype):
    num_blocks, num_tokens = 6, 20
    k_cache, v_cache = make_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype)
    # key/value as strided views of a fused projection (only the last dim contiguous)
    kv = torch.randn(num_tokens, 2, num_kv_heads, head_dim, device=DEVICE).to(dtype)
    key, value = kv[:, 0], kv[:, 1]
    slots = torch.randperm(num_blocks * block_size, device=DEVICE)[:num_tokens]
    slots[[3, 11, 19]] = -1  # padding tokens: must not be written anywhere
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    keep = slots >= 0
    reference.store_kv(key[keep], value[keep], k_ref, v_ref, slots[keep])
    triton_attention.store_kv(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim,num_kv_heads,group,block_size", SHAPES, ids=SHAPE_IDS)
def test_attention_extend(head_dim, num_kv_heads, group, block_size, dtype):
    # (context_len, q_len): short full prefill, a multi-block prefill, cached prefixes (q_len <
    # context_len, one not block-aligned), a single-token extend, and a prefix ending on a block edge.
    long = 3 * block_size + 7
    reqs = [(5, 5), (long, long), (2 * block_size + 9, 11), (40, 1), (2 * block_size + 3, 3)]
    ctx = [c for c, _ in reqs]
    q_lens = [q for _, q in reqs]
    tables, num_blocks = make_block_tables(ctx, block_size)
    k_cache, v_cache = make_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype)
    # query as a strided view (heads of a fused QKV projection)
    qkv = torch.randn(sum(q_lens), num_kv_heads * group + 2, head_dim, device=DEVICE).to(dtype)
    query = qkv[:, : num_kv_heads * group]
    cu = torch.tensor([0] + q_lens, device=DEVICE).cumsum(0).to(torch.int32)
    context_lens = torch.tensor(ctx, dtype=torch.int32, device=DEVICE)
    scale = head_dim**-0.5
    out = triton_attention.attention_extend(query, k_cache, v_cache, cu, context_lens, tables, scale)
    q32, k32, v32 = _as_float(query, k_cache, v_cache)
    ref = reference.attention_extend(q32.contiguous(), k32, v32, cu, context_lens, tables, scale)
    assert out.dtype == dtype and out.shape == query.shape
    torch.testing.assert_close(out.float(), ref, atol=ATOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim,num_kv_heads,group,block_size", SHAPES, ids=SHAPE_IDS)
def test_attention_decode(head_dim, num_kv_heads, group, block_size, dtype):
    # 1 token; exactly one, two and four blocks; multi-split contexts not on a block edge.
    ctx = [1, block_size, 2 * block_size, 4 * block_size, 100, 3 * block_size + 5]
    tables, num_blocks = make_block_tables(ctx, block_size)
    k_cache, v_cache = make_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype)
    query = torch.randn(len(ctx), num_kv_heads * group, head_dim, device=DEVICE).to(dtype)
    context_lens = torch.tensor(ctx, dtype=torch.int32, device=DEVICE)
    scale = head_dim**-0.5
    out = triton_attention.attention_decode(query, k_cache, v_cache, context_lens, tables, scale, max(ctx))
    q32, k32, v32 = _as_float(query, k_cache, v_cache)
    ref = reference.attention_decode(q32, k32, v32, context_lens, tables, scale, max(ctx))
    assert out.dtype == dtype and out.shape == query.shape
    torch.testing.assert_close(out.float(), ref, atol=ATOL[dtype], rtol=0)


def test_attention_decode_long_context_and_padding_rows():
    """A context long enough that every split is used and splits span several tiles; a
    context_len-0 row (CUDA-graph padding) yields zeros without disturbing its neighbours;
    max_context_len is only a hint (a larger value changes nothing)."""
    head_dim, num_kv_heads, group, block_size = 64, 1, 3, 16
    n = triton_attention.NUM_KV_SPLITS * triton_attention.BLOCK_N * 2 + 16  # every split covers > 2 tiles
    ctx = [n, 0, 17]
    tables, num_blocks = make_block_tables(ctx, block_size)
    k_cache, v_cache = make_cache(num_blocks, block_size, num_kv_heads, head_dim, torch.float32)
    query = torch.randn(len(ctx), num_kv_heads * group, head_dim, device=DEVICE)
    context_lens = torch.tensor(ctx, dtype=torch.int32, device=DEVICE)
    out = triton_attention.attention_decode(query, k_cache, v_cache, context_lens, tables, 0.125, n + 100)
    ref = reference.attention_decode(query, k_cache, v_cache, context_lens, tables, 0.125, n)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    keep = [0, 2]
    torch.testing.assert_close(out[keep], ref[keep], atol=ATOL[torch.float32], rtol=0)


def test_wrappers_reject_bad_inputs():
    k_cache, v_cache = make_cache(4, 16, 2, 64, torch.float32)
    tables = torch.zeros(1, 4, dtype=torch.int32, device=DEVICE)
    query = torch.randn(1, 4, 64, device=DEVICE)
    lens = torch.tensor([5], dtype=torch.int32, device=DEVICE)
    with pytest.raises(AssertionError):  # int64 context_lens
        triton_attention.attention_decode(query, k_cache, v_cache, lens.long(), tables, 0.1, 5)
    with pytest.raises(AssertionError):  # head_dim not contiguous
        strided = query.transpose(1, 2).contiguous().transpose(1, 2)
        triton_attention.attention_decode(strided, k_cache, v_cache, lens, tables, 0.1, 5)
    with pytest.raises(AssertionError):  # dtype mismatch between query and cache
        triton_attention.attention_decode(query.double(), k_cache, v_cache, lens, tables, 0.1, 5)


WINDOW = 40  # positions: neither a whole number of pages (16) nor of KV tiles (32)
# (context_len, q_len): prefills shorter and longer than the window, chunks over cached prefixes
# (one whose first query's window starts mid-page), a single-token extend far past the window.
FEATURE_EXTEND = [(5, 5), (55, 55), (41, 11), (100, 1), (83, 20)]
FEATURE_DECODE = [1, 16, 40, 41, 100, 53]


def _extend_inputs(reqs, heads, kv_heads, head_dim, dtype, block_size=16):
    ctx, q_lens = [c for c, _ in reqs], [q for _, q in reqs]
    tables, num_blocks = make_block_tables(ctx, block_size)
    k_cache, v_cache = make_cache(num_blocks, block_size, kv_heads, head_dim, dtype)
    query = torch.randn(sum(q_lens), heads, head_dim, device=DEVICE).to(dtype)
    cu = torch.tensor([0] + q_lens, device=DEVICE).cumsum(0).to(torch.int32)
    return query, k_cache, v_cache, cu, torch.tensor(ctx, dtype=torch.int32, device=DEVICE), tables


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("feature", FEATURES)
def test_attention_extend_features(feature, dtype):
    """GQA with a padded group (3 query heads per kv head) so ALiBi's per-head slopes are masked too."""
    query, k_cache, v_cache, cu, lens, tables = _extend_inputs(FEATURE_EXTEND, 6, 2, 64, dtype)
    kw = layer_features(feature, 6, WINDOW, DEVICE)
    out = triton_attention.attention_extend(query, k_cache, v_cache, cu, lens, tables, 0.25, **kw)
    q32, k32, v32 = _as_float(query, k_cache, v_cache)
    ref = reference.attention_extend(q32, k32, v32, cu, lens, tables, 0.25, **kw)
    torch.testing.assert_close(out.float(), ref, atol=ATOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("feature", FEATURES)
def test_attention_decode_features(feature, dtype):
    ctx = FEATURE_DECODE
    tables, num_blocks = make_block_tables(ctx, 16)
    k_cache, v_cache = make_cache(num_blocks, 16, 2, 64, dtype)
    query = torch.randn(len(ctx), 6, 64, device=DEVICE).to(dtype)
    lens = torch.tensor(ctx, dtype=torch.int32, device=DEVICE)
    kw = layer_features(feature, 6, WINDOW, DEVICE)
    out = triton_attention.attention_decode(query, k_cache, v_cache, lens, tables, 0.25, max(ctx), **kw)
    q32, k32, v32 = _as_float(query, k_cache, v_cache)
    ref = reference.attention_decode(q32, k32, v32, lens, tables, 0.25, max(ctx), **kw)
    torch.testing.assert_close(out.float(), ref, atol=ATOL[dtype], rtol=0)


def test_blocks_before_the_window_are_not_read():
    """NaN in every block outside each query's window (before it, past the context, unused) leaves
    the outputs finite and unchanged. Decode: a window of 600 over a context long enough that the
    window is cut into every split, and a padding row (context 0) that stays zeros."""
    kw = layer_features("all", 6, WINDOW, DEVICE)
    query, k_cache, v_cache, cu, lens, tables = _extend_inputs(FEATURE_EXTEND, 6, 2, 64, torch.float32)
    first = [max(0, c - q - WINDOW + 1) for c, q in FEATURE_EXTEND]
    k_bad, v_bad = poison_outside_windows(k_cache, v_cache, tables, first, lens.tolist())
    assert k_bad.isnan().any()
    clean = triton_attention.attention_extend(query, k_cache, v_cache, cu, lens, tables, 0.25, **kw)
    poisoned = triton_attention.attention_extend(query, k_bad, v_bad, cu, lens, tables, 0.25, **kw)
    assert poisoned.isfinite().all()
    torch.testing.assert_close(poisoned, clean, atol=0, rtol=0)

    window = 600
    kw = layer_features("all", 6, window, DEVICE)
    ctx = [triton_attention.NUM_KV_SPLITS * triton_attention.BLOCK_N * 2 + 16, 0, *FEATURE_DECODE]
    tables, num_blocks = make_block_tables(ctx, 16)
    k_cache, v_cache = make_cache(num_blocks, 16, 2, 64, torch.float32)
    query = torch.randn(len(ctx), 6, 64, device=DEVICE)
    lens = torch.tensor(ctx, dtype=torch.int32, device=DEVICE)
    k_bad, v_bad = poison_outside_windows(k_cache, v_cache, tables, [max(0, n - window) for n in ctx], ctx)
    assert k_bad.isnan().any()
    poisoned = triton_attention.attention_decode(query, k_bad, v_bad, lens, tables, 0.25, max(ctx), **kw)
    assert poisoned.isfinite().all() and torch.equal(poisoned[1], torch.zeros_like(poisoned[1]))
    keep = [i for i, n in enumerate(ctx) if n]
    ref = reference.attention_decode(query[keep], k_cache, v_cache, lens[keep], tables[keep], 0.25, max(ctx), **kw)
    torch.testing.assert_close(poisoned[keep], ref, atol=ATOL[torch.float32], rtol=0)
