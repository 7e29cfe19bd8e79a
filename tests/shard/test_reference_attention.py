"""The torch reference attention: decode rows grouped by length give the same results, and the
per-layer features (sliding window, soft-cap, ALiBi, T5's position bias) match a dense computation written the way
transformers writes it, without reading the KV blocks that lie wholly before a query's window.

The helpers here (`layer_features`, `paged_case`, `poison_outside_windows`) also serve the C++ and
Triton kernel tests."""

import pytest
import torch
from transformers.models.bloom.modeling_bloom import build_alibi_tensor

from shard.kernels import reference

FEATURES = ["window", "softcap", "alibi", "position_bias", "all"]
WINDOW, SOFTCAP = 8, 3.0  # window in positions; the cap is low enough to bend most scores
BIAS_DISTANCES = 6  # columns of the position bias: distances 0..4, and 5 or more (shorter than the window)


def alibi_slopes(num_heads: int, device="cpu") -> torch.Tensor:
    """[num_heads] float32: BLOOM's slopes, as transformers computes them (any head count)."""
    return build_alibi_tensor(torch.ones(1, 2), num_heads, torch.float32)[:, 0, 1].to(device)


def position_bias(num_heads: int, device="cpu") -> torch.Tensor:
    """[num_heads, BIAS_DISTANCES] float32: a random bias by distance, as T5's decoder has (scores
    of order 1, like a trained model's)."""
    return torch.randn(num_heads, BIAS_DISTANCES, generator=torch.Generator().manual_seed(7)).to(device)


def layer_features(name: str, num_heads: int, window: int = WINDOW, device="cpu") -> dict:
    """The keyword arguments (sliding_window, softcap, alibi_slopes, position_bias) of one feature
    set of FEATURES ("none" or any other name: all off)."""
    every = name == "all"
    return {
        "sliding_window": window if name == "window" or every else 0,
        "softcap": SOFTCAP if name == "softcap" or every else 0.0,
        "alibi_slopes": alibi_slopes(num_heads, device) if name == "alibi" or every else None,
        "position_bias": position_bias(num_heads, device) if name == "position_bias" or every else None,
    }


def paged_case(lens, heads, kv_heads, head_dim, block, q_lens=None, seed=0, device="cpu", dtype=torch.float32):
    """Random sequences of `lens` tokens in a paged cache, each request's blocks scattered by one
    permutation and its table padded with block 0, as the runner pads. Returns (query [sum(q_lens)
    or len(lens), heads, head_dim], k_cache, v_cache, context_lens [R] int32, block_tables [R, max_blocks]
    int32); query rows are each request's last q_lens[r] tokens (one each without q_lens)."""
    g = torch.Generator().manual_seed(seed)
    needed = [-(-n // block) for n in lens]
    num_blocks = sum(needed) + 2
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.zeros(len(lens), max(needed), dtype=torch.int32)
    used = 0
    for r, n in enumerate(needed):
        tables[r, :n] = perm[used : used + n]
        used += n
    shape = (num_blocks, block, kv_heads, head_dim)
    k_cache, v_cache = (torch.randn(shape, generator=g).to(dtype) for _ in range(2))
    query = torch.randn(sum(q_lens) if q_lens else len(lens), heads, head_dim, generator=g).to(dtype)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    return tuple(t.to(device) for t in (query, k_cache, v_cache, lens_t, tables))


def poison_outside_windows(k_cache, v_cache, block_tables, first, lens):
    """Copies of the caches with NaN in every block that holds none of row r's positions
    first[r] .. lens[r] - 1: the blocks wholly before each window, past each context, and unused."""
    block = k_cache.shape[1]
    live = torch.zeros(k_cache.shape[0], dtype=torch.bool, device=k_cache.device)
    for r, (f, n) in enumerate(zip(first, lens)):
        live[block_tables[r, f // block : -(-n // block)].long()] = True
    k, v = k_cache.clone(), v_cache.clone()
    k[~live] = float("nan")
    v[~live] = float("nan")
    return k, v


def _sequence(cache, table, length):
    """[length, kv_heads, head_dim]: one request's K or V, in position order."""
    return cache[table.long()].reshape(-1, *cache.shape[2:])[:length]


def _dense(q, k, v, q_pos, scale, sliding_window, softcap, alibi_slopes, position_bias):
    """One sequence densely, as transformers' eager attention: q [Lq, Hq, D] at positions q_pos,
    k/v [L, Hkv, D] -> [Lq, Hq, D]. Additive mask (causal, and j > i - W with a window), scores
    soft-capped as Gemma 2 does, then BLOOM's ALiBi bias slope * j (build_alibi_tensor's form; it
    differs from slope * (j - i) by a per-row constant, which the softmax drops) and a bias looked
    up per (query, key) pair from its distance, as T5 builds its [H, Lq, Lk] position_bias."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    j = torch.arange(k.shape[0])
    if alibi_slopes is not None:
        scores = scores + alibi_slopes[:, None, None] * j
    i = torch.as_tensor(q_pos)[:, None]
    if position_bias is not None:
        pairs = torch.zeros(scores.shape)
        for a, qi in enumerate(q_pos):
            for key in range(min(qi + 1, k.shape[0])):
                pairs[:, a, key] = position_bias[:, min(qi - key, position_bias.shape[1] - 1)]
        scores = scores + pairs
    allowed = j <= i
    if sliding_window:
        allowed &= j > i - sliding_window
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return torch.einsum("hqk,khd->qhd", (scores + mask).softmax(-1), v)


def test_decode_rows_sorted_by_length_are_grouped_without_changing_results():
    g = torch.Generator().manual_seed(0)
    num_reqs, heads, kv_heads, head_dim, block = 21, 6, 2, 16, 4
    lens = sorted(torch.randint(1, 60, (num_reqs,), generator=g).tolist())
    k_cache, v_cache = (torch.randn(400, block, kv_heads, head_dim, generator=g) for _ in range(2))
    tables = torch.randperm(400, generator=g)[: num_reqs * 15].view(num_reqs, 15).int()
    query = torch.randn(num_reqs, heads, head_dim, generator=g)
    context_lens = torch.tensor(lens, dtype=torch.int32)
    grouped = reference.attention_decode(query, k_cache, v_cache, context_lens, tables, 0.25, max(lens))
    perm = torch.randperm(num_reqs, generator=g)  # unsorted: one padded batch
    single = reference.attention_decode(
        query[perm], k_cache, v_cache, context_lens[perm], tables[perm], 0.25, max(lens)
    )
    torch.testing.assert_close(grouped[perm], single, rtol=1e-5, atol=1e-6)
    for i in (0, num_reqs - 1):  # and each row is its own attention
        n = lens[i]
        k = k_cache[tables[i]].reshape(-1, kv_heads, head_dim)[:n].repeat_interleave(3, dim=1)
        v = v_cache[tables[i]].reshape(-1, kv_heads, head_dim)[:n].repeat_interleave(3, dim=1)
        p = (torch.einsum("hd,lhd->hl", query[i], k) * 0.25).softmax(-1)
        torch.testing.assert_close(grouped[i], torch.einsum("hl,lhd->hd", p, v), rtol=1e-5, atol=1e-6)


DECODE_LENS = [1, 5, 8, 9, 37, 64]  # under, at and past the window of 8; block edges of 4
EXTEND_REQS = [(23, 23), (20, 7), (31, 1), (7, 2), (40, 12)]  # (context_len, q_len): a long prefill, chunks


@pytest.mark.parametrize("feature", FEATURES)
def test_decode_features_match_dense_attention(feature):
    """GQA (6 query heads on 2 kv heads), contexts shorter and longer than the window."""
    query, k_cache, v_cache, lens, tables = paged_case(DECODE_LENS, 6, 2, 16, 4)
    kw = layer_features(feature, 6)
    out = reference.attention_decode(query, k_cache, v_cache, lens, tables, 1.0, max(DECODE_LENS), **kw)
    for r, n in enumerate(DECODE_LENS):
        k, v = _sequence(k_cache, tables[r], n), _sequence(v_cache, tables[r], n)
        expected = _dense(query[r : r + 1], k, v, [n - 1], 1.0, **kw)[0]
        torch.testing.assert_close(out[r], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("feature", FEATURES)
def test_extend_features_match_dense_attention(feature):
    """A prefill longer than the window and chunks over cached prefixes, in one call."""
    lens, q_lens = [c for c, _ in EXTEND_REQS], [q for _, q in EXTEND_REQS]
    query, k_cache, v_cache, context_lens, tables = paged_case(lens, 6, 2, 16, 4, q_lens=q_lens)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    kw = layer_features(feature, 6)
    out = reference.attention_extend(query, k_cache, v_cache, cu, context_lens, tables, 1.0, **kw)
    for r, (n, q_len) in enumerate(EXTEND_REQS):
        k, v = _sequence(k_cache, tables[r], n), _sequence(v_cache, tables[r], n)
        rows = slice(int(cu[r]), int(cu[r + 1]))
        expected = _dense(query[rows], k, v, list(range(n - q_len, n)), 1.0, **kw)
        torch.testing.assert_close(out[rows], expected, rtol=1e-5, atol=1e-5)


def test_features_off_give_plain_causal_attention():
    """With every feature off, the written-out path and SDPA's agree (a window wider than every
    context changes nothing either)."""
    query, k_cache, v_cache, lens, tables = paged_case(DECODE_LENS, 6, 2, 16, 4)
    plain = reference.attention_decode(query, k_cache, v_cache, lens, tables, 0.25, 64)
    wide = reference.attention_decode(query, k_cache, v_cache, lens, tables, 0.25, 64, sliding_window=64)
    torch.testing.assert_close(wide, plain, rtol=1e-5, atol=1e-6)


def test_blocks_before_the_window_are_not_read():
    """NaN in every block outside each row's window (before it, past the context, unused) leaves
    the windowed outputs finite and unchanged, for decode and extend."""
    kw = layer_features("all", 6)
    query, k_cache, v_cache, lens, tables = paged_case(DECODE_LENS, 6, 2, 16, 4)
    first = [max(0, n - WINDOW) for n in DECODE_LENS]
    k_bad, v_bad = poison_outside_windows(k_cache, v_cache, tables, first, DECODE_LENS)
    assert k_bad.isnan().any()
    clean = reference.attention_decode(query, k_cache, v_cache, lens, tables, 1.0, 64, **kw)
    poisoned = reference.attention_decode(query, k_bad, v_bad, lens, tables, 1.0, 64, **kw)
    assert poisoned.isfinite().all()
    torch.testing.assert_close(poisoned, clean, rtol=0, atol=0)

    ctx, q_lens = [c for c, _ in EXTEND_REQS], [q for _, q in EXTEND_REQS]
    query, k_cache, v_cache, context_lens, tables = paged_case(ctx, 6, 2, 16, 4, q_lens=q_lens)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    first = [max(0, n - q - WINDOW + 1) for n, q in EXTEND_REQS]
    k_bad, v_bad = poison_outside_windows(k_cache, v_cache, tables, first, ctx)
    assert k_bad.isnan().any()
    clean = reference.attention_extend(query, k_cache, v_cache, cu, context_lens, tables, 1.0, **kw)
    poisoned = reference.attention_extend(query, k_bad, v_bad, cu, context_lens, tables, 1.0, **kw)
    assert poisoned.isfinite().all()
    torch.testing.assert_close(poisoned, clean, rtol=0, atol=0)
