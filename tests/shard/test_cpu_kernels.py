"""The C++ CPU kernels: decode and extend attention read the paged cache in place and give the
torch reference's rows, with the per-layer features (sliding window, soft-cap, ALiBi) too and
without reading the blocks before a window; the greedy argmax and log-sum-exp give torch's."""

import pytest
import torch

from shard.config import default_cache_dir
from shard.context import DecodeMeta, ExtendMeta, ForwardContext
from shard.kernels import cpu_native, reference
from tests.shard.test_reference_attention import FEATURES, layer_features, poison_outside_windows


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


def test_argmax_logsumexp_of_rows_with_nan_and_infinities_matches_torch():
    """A NaN is the maximum (its first one wins), +inf gives +inf, an all -inf row gives -inf."""
    inf, nan = float("inf"), float("nan")
    logits = torch.zeros(4, 40)
    logits[0, [3, 30]] = nan
    logits[1, [5, 33]] = inf
    logits[2] = -inf
    logits[3, 37] = 2.0  # the maximum past the last full vector
    ids, lse = cpu_native.argmax_logsumexp(logits)
    assert ids.tolist() == logits.argmax(-1).tolist() == [3, 5, 0, 37]
    torch.testing.assert_close(lse, logits.logsumexp(-1), equal_nan=True)


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


WINDOW = 24  # positions: several blocks of 4 and 16, less than most contexts below


@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(9, 3, 64), (8, 2, 128), (6, 2, 10)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_features_match_the_reference(feature, heads, kv_heads, head_dim, dtype):
    """The vector kernels and the scalar one (head_dim 10), over the window of each row."""
    query, k_cache, v_cache, lens, tables = _case(11, heads, kv_heads, head_dim, 4, dtype, max_len=90)
    kw = layer_features(feature, heads, WINDOW)
    ours = cpu_native.attention_decode(query, k_cache, v_cache, lens, tables, 1.0, int(lens.max()), **kw)
    expected = reference.attention_decode(
        query.float(), k_cache.float(), v_cache.float(), lens, tables, 1.0, int(lens.max()), **kw
    )
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours.float(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("feature", FEATURES)
def test_long_rows_split_over_threads_with_features(feature):
    """A window of 700 over 1,499 positions: the split-KV spans cover the window only."""
    query, k_cache, v_cache, lens, tables = _case(2, 9, 3, 64, 16, torch.float32, max_len=1500, seed=3)
    lens[-1] = 1499
    kw = layer_features(feature, 9, 700)
    ours = cpu_native.attention_decode(query, k_cache, v_cache, lens, tables, 0.125, 1499, **kw)
    expected = reference.attention_decode(query, k_cache, v_cache, lens, tables, 0.125, 1499, **kw)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def _extend_case(heads, kv_heads, head_dim, dtype, q_lens, cached, seed=0):
    g = torch.Generator().manual_seed(seed)
    block = 16
    context_lens = [q + c for q, c in zip(q_lens, cached)]
    max_blocks = -(-max(context_lens) // block)
    num_blocks = len(q_lens) * max_blocks + 2
    k_cache, v_cache = (torch.randn(num_blocks, block, kv_heads, head_dim, generator=g).to(dtype) for _ in range(2))
    tables = torch.randperm(num_blocks, generator=g)[: len(q_lens) * max_blocks].view(len(q_lens), max_blocks).int()
    query = torch.randn(sum(q_lens), heads, head_dim, generator=g).to(dtype)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return query, k_cache, v_cache, cu, torch.tensor(context_lens, dtype=torch.int32), tables


EXTEND_Q_LENS, EXTEND_CACHED = [37, 1, 130, 16, 70, 5], [0, 5, 0, 33, 200, 10]


@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(9, 3, 64), (8, 2, 128), (6, 2, 10)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extend_features_match_the_reference(feature, heads, kv_heads, head_dim, dtype):
    """Prefills longer than the window and chunks over cached prefixes (query blocks whose rows'
    windows start at different key blocks)."""
    query, k_cache, v_cache, cu, lens, tables = _extend_case(
        heads, kv_heads, head_dim, dtype, EXTEND_Q_LENS, EXTEND_CACHED
    )
    kw = layer_features(feature, heads, WINDOW)
    ours = cpu_native.attention_extend(query, k_cache, v_cache, cu, lens, tables, 1.0, **kw)
    expected = reference.attention_extend(query.float(), k_cache.float(), v_cache.float(), cu, lens, tables, 1.0, **kw)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours.float(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("head_dim", [64, 10])
def test_blocks_before_the_window_are_not_read(head_dim):
    """NaN in every block outside each row's window leaves the outputs finite and unchanged."""
    kw = layer_features("all", 6, WINDOW)
    query, k_cache, v_cache, lens, tables = _case(7, 6, 2, head_dim, 4, torch.float32, max_len=90)
    n = lens.tolist()
    k_bad, v_bad = poison_outside_windows(k_cache, v_cache, tables, [max(0, x - WINDOW) for x in n], n)
    assert k_bad.isnan().any()
    clean = cpu_native.attention_decode(query, k_cache, v_cache, lens, tables, 1.0, max(n), **kw)
    poisoned = cpu_native.attention_decode(query, k_bad, v_bad, lens, tables, 1.0, max(n), **kw)
    assert poisoned.isfinite().all()
    torch.testing.assert_close(poisoned, clean, rtol=0, atol=0)

    query, k_cache, v_cache, cu, lens, tables = _extend_case(
        6, 2, head_dim, torch.float32, EXTEND_Q_LENS, EXTEND_CACHED
    )
    first = [max(0, c - WINDOW + 1) for c in EXTEND_CACHED]
    k_bad, v_bad = poison_outside_windows(k_cache, v_cache, tables, first, lens.tolist())
    assert k_bad.isnan().any()
    clean = cpu_native.attention_extend(query, k_cache, v_cache, cu, lens, tables, 1.0, **kw)
    poisoned = cpu_native.attention_extend(query, k_bad, v_bad, cu, lens, tables, 1.0, **kw)
    assert poisoned.isfinite().all()
    torch.testing.assert_close(poisoned, clean, rtol=0, atol=0)


@pytest.mark.parametrize("feature", [*FEATURES, "none"])
def test_fused_attention_op_of_a_mixed_step_matches_the_reference(feature):
    """sluice_cpu::attention (what the compiled forward calls) stores the step's K/V in the layer's
    cache and attends with the layer's features: prompt chunks first, then single tokens."""
    g = torch.Generator().manual_seed(5)
    heads, kv_heads, head_dim, block = 6, 2, 32, 4
    extend_q, extend_ctx, decode_ctx = [9, 30], [40, 30], [1, 50, 27]
    lens = extend_ctx + decode_ctx
    max_blocks = -(-max(lens) // block)
    num_blocks = len(lens) * max_blocks + 1
    caches = [
        tuple(torch.randn(num_blocks, block, kv_heads, head_dim, generator=g) for _ in range(2)) for _ in range(2)
    ]
    tables = torch.randperm(num_blocks, generator=g)[: len(lens) * max_blocks].view(len(lens), max_blocks).int()
    new_pos = [range(c - q, c) for c, q in zip(extend_ctx, extend_q)] + [range(c - 1, c) for c in decode_ctx]
    slots = torch.tensor(
        [int(tables[r, p // block]) * block + p % block for r, positions in enumerate(new_pos) for p in positions]
    )
    t = len(slots)
    q, k, v = (torch.randn(t, h, head_dim, generator=g) for h in (heads, kv_heads, kv_heads))
    extend = ExtendMeta(
        sum(extend_q),
        torch.tensor([0, extend_q[0], sum(extend_q)], dtype=torch.int32),
        torch.tensor(extend_ctx, dtype=torch.int32),
        tables[:2],
    )
    decode = DecodeMeta(torch.tensor(decode_ctx, dtype=torch.int32), tables[2:], max(decode_ctx))
    kw = layer_features(feature, heads, 8)
    expected_caches = [(kc.clone(), vc.clone()) for kc, vc in caches]
    cpu_native.set_step(ForwardContext(slots, extend, decode, caches))
    ours = torch.ops.sluice_cpu.attention(q, k, v, 1, 0.5, **kw)

    kc, vc = expected_caches[1]
    reference.store_kv(k, v, kc, vc, slots)
    e = extend.num_tokens
    expected = torch.cat(
        [
            reference.attention_extend(q[:e], kc, vc, extend.cu_seqlens_q, extend.context_lens, tables[:2], 0.5, **kw),
            reference.attention_decode(q[e:], kc, vc, decode.context_lens, tables[2:], 0.5, max(decode_ctx), **kw),
        ]
    )
    assert torch.equal(caches[1][0], kc) and torch.equal(caches[1][1], vc)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
