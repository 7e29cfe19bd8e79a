"""The C++ CPU kernels: decode attention reads the paged cache in place and gives the torch
reference's rows; the greedy argmax and log-sum-exp give torch's."""

import pytest
import torch

from shard.config import default_cache_dir
from shard.kernels import cpu_native, reference


@pytest.fixture(scope="module", autouse=True)
def _built():
    cpu_native.load(default_cache_dir())


def _case(num_reqs, heads, kv_heads, head_dim, block, dtype, max_len=70, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, max_len, (num_reqs,), generator=g)
    lens[0] = 1  # a request whose only token is the query's own
    max_blocks = -(-max_len // block)
    num_blocks = num_reqs * max_blocks + 3
    k_cache, v_cache = (torch.randn(num_blocks, block, kv_heads, head_dim, generator=g).to(dtype) for _ in range(2))
    tables = torch.randperm(num_blocks, generator=g)[: num_reqs * max_blocks].view(num_reqs, max_blocks).int()
    query = torch.randn(num_reqs, heads, head_dim, generator=g).to(dtype)
    return query, k_cache, v_cache, lens.int(), tables


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim"),
    [(9, 3, 64), (4, 4, 32), (8, 2, 128), (6, 2, 16), (6, 2, 10), (16, 1, 64), (32, 2, 64)],
)
@pytest.mark.parametrize("block", [4, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decode_matches_the_reference(heads, kv_heads, head_dim, block, dtype):
    query, k_cache, v_cache, lens, tables = _case(11, heads, kv_heads, head_dim, block, dtype)
    scale = head_dim**-0.5
    ours = cpu_native.attention_decode(query, k_cache, v_cache, lens, tables, scale, int(lens.max()))
    expected = reference.attention_decode(
        query.float(), k_cache.float(), v_cache.float(), lens, tables, scale, int(lens.max())
    )
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert ours.dtype == dtype and ours.shape == query.shape
    torch.testing.assert_close(ours.float(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("num_reqs", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_rows_split_over_threads_merge_to_the_reference(num_reqs, dtype):
    """Fewer requests than threads can share: each row's positions are split and merged back."""
    query, k_cache, v_cache, lens, tables = _case(num_reqs, 9, 3, 64, 16, dtype, max_len=1500, seed=3)
    lens[-1] = 1499
    ours = cpu_native.attention_decode(query, k_cache, v_cache, lens, tables, 0.125, 1499)
    expected = reference.attention_decode(query.float(), k_cache.float(), v_cache.float(), lens, tables, 0.125, 1499)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(ours.float(), expected, rtol=tol, atol=tol)


def test_decode_reads_only_each_rows_own_positions():
    """Positions past a row's length and blocks outside its table may hold anything, NaN included."""
    query, k_cache, v_cache, lens, tables = _case(5, 6, 2, 64, 16, torch.float32)
    expected = cpu_native.attention_decode(query, k_cache, v_cache, lens, tables, 0.125, int(lens.max()))
    poisoned_k, poisoned_v = k_cache.clone(), v_cache.clone()
    used = torch.zeros(k_cache.shape[0] * 16, dtype=torch.bool)
    for row, n in enumerate(lens.tolist()):
        pos = torch.arange(n)
        used[tables[row, pos // 16].long() * 16 + pos % 16] = True
    poisoned_k.view(-1, 2, 64)[~used] = float("nan")
    poisoned_v.view(-1, 2, 64)[~used] = float("nan")
    ours = cpu_native.attention_decode(query, poisoned_k, poisoned_v, lens, tables, 0.125, int(lens.max()))
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)


def test_decode_takes_a_strided_query():
    """The runner passes the decode rows of a step's query, a slice of a [T, Hq, D] tensor."""
    query, k_cache, v_cache, lens, tables = _case(6, 9, 3, 64, 16, torch.bfloat16)
    wide = torch.cat([query, query], dim=-1)[..., :64]  # the same values, strided rows
    assert not wide.is_contiguous()
    torch.testing.assert_close(
        cpu_native.attention_decode(wide, k_cache, v_cache, lens, tables, 0.125, 0),
        cpu_native.attention_decode(query, k_cache, v_cache, lens, tables, 0.125, 0),
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize("vocab", [1, 15, 16, 49152, 1000])
def test_argmax_logsumexp_matches_torch(vocab):
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(7, vocab, generator=g) * 5
    logits[1] = logits[1].clamp(max=0.5)  # ties at the maximum: the first one wins, as torch.argmax
    if vocab > 3:
        logits[2, :-2] = float("-inf")  # masked by a filter: only two tokens left
        logits[3, torch.randperm(vocab, generator=g)[: vocab // 2]] = float("-inf")
    ids, lse = cpu_native.argmax_logsumexp(logits)
    assert ids.tolist() == logits.argmax(-1).tolist()
    torch.testing.assert_close(lse, logits.logsumexp(-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim"), [(9, 3, 64), (4, 4, 32), (8, 2, 128), (6, 2, 10), (16, 1, 16)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extend_matches_the_reference(heads, kv_heads, head_dim, dtype):
    """Prompt chunks with and without a cached prefix, one token to a few blocks' worth, in one call."""
    g = torch.Generator().manual_seed(heads * head_dim)
    block = 16
    q_lens, cached = [37, 1, 130, 16, 70], [0, 5, 0, 33, 200]
    context_lens = [q + c for q, c in zip(q_lens, cached)]
    max_blocks = -(-max(context_lens) // block)
    num_blocks = len(q_lens) * max_blocks + 2
    k_cache, v_cache = (torch.randn(num_blocks, block, kv_heads, head_dim, generator=g).to(dtype) for _ in range(2))
    tables = torch.randperm(num_blocks, generator=g)[: len(q_lens) * max_blocks].view(len(q_lens), max_blocks).int()
    query = torch.randn(sum(q_lens), heads, head_dim, generator=g).to(dtype)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    lens = torch.tensor(context_lens, dtype=torch.int32)
    scale = head_dim**-0.5
    ours = cpu_native.attention_extend(query, k_cache, v_cache, cu, lens, tables, scale)
    expected = reference.attention_extend(query.float(), k_cache.float(), v_cache.float(), cu, lens, tables, scale)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours.float(), expected, rtol=tol, atol=tol)


def test_store_kv_writes_each_row_to_its_slot_and_skips_padding():
    g = torch.Generator().manual_seed(1)
    k_cache, v_cache = torch.zeros(6, 4, 2, 8), torch.zeros(6, 4, 2, 8)
    key = torch.randn(5, 3, 8, generator=g)[:, 1:]  # a slice of the heads, as the model passes it
    value = torch.randn(5, 2, 8, generator=g)
    slots = torch.tensor([3, 22, -1, 0, 9])
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    reference.store_kv(key[[0, 1, 3, 4]], value[[0, 1, 3, 4]], expected_k, expected_v, slots[[0, 1, 3, 4]])
    cpu_native.store_kv(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
