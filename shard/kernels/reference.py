"""Torch implementations of the paged-attention kernels: the CPU backend and the test oracle.

KV cache layout (per layer, K and V alike): [num_blocks, block_size, num_kv_heads, head_dim];
the slot of position p of a sequence is block_table[p // block_size] * block_size
+ p % block_size.

With a sliding window W, a query at position i sees positions i - W + 1 .. i only, and the
blocks wholly before its window are never read: the router may already have given them to
another sequence (every backend keeps to this; the tests poison those blocks).
"""

import torch
import torch.nn.functional as F


def store_kv(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64
) -> None:
    """Write each token's K and V into its slot of the paged cache."""
    k_cache.view(-1, *k_cache.shape[2:])[slot_mapping] = key
    v_cache.view(-1, *v_cache.shape[2:])[slot_mapping] = value


def _gather_kv(cache: torch.Tensor, block_tables: torch.Tensor, length: int) -> torch.Tensor:
    """[num_reqs, length, num_kv_heads, head_dim]: the first `length` positions of each row.

    Whole blocks are copied with index_select (block_size rows at a time), which is several
    times faster on CPU than indexing slot by slot."""
    num_reqs, block_size = block_tables.shape[0], cache.shape[1]
    num_blocks = -(-length // block_size)
    blocks = cache.index_select(0, block_tables[:, :num_blocks].reshape(-1).long())
    return blocks.view(num_reqs, num_blocks * block_size, *cache.shape[2:])[:, :length]


def _gather_positions(cache: torch.Tensor, block_tables: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[num_reqs, L, num_kv_heads, head_dim]: row r's K or V at positions [r, :] ([num_reqs, L] int64),
    looked up slot by slot, so only the blocks holding those positions are read."""
    block_size = cache.shape[1]
    blocks = block_tables.long().gather(1, positions // block_size)
    return cache.view(-1, *cache.shape[2:])[blocks * block_size + positions % block_size]


def _attend(q, k, v, mask, scale):
    """q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D], mask [B, 1, Lq, Lk] bool or None for causal -> [B, Hq, Lq, D]."""
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


def _attend_with_features(
    q, k, v, q_pos, k_pos, k_valid, scale, sliding_window, softcap, alibi_slopes, position_bias=None
):
    """Attention with the per-layer features SDPA has no argument for, written out in float32.

    q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D]; q_pos [B, Lq] each query's position, k_pos [B, Lk] each
    key's, k_valid [B, Lk] which keys exist -> [B, Hq, Lq, D]. Key j is seen by query i when j <= i
    and, with a window W, i - j < W; scores are soft-capped (softcap * tanh(s / softcap)) before
    ALiBi's slope * (j - i) and position_bias[h, min(i - j, L - 1)] ([Hq, L], T5) are added.
    """
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale  # [B, Hq, Lq, Lk]
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    rel = k_pos[:, None, :] - q_pos[:, :, None]  # [B, Lq, Lk]: j - i
    if alibi_slopes is not None:
        scores = scores + alibi_slopes.float()[None, :, None, None] * rel[:, None]
    if position_bias is not None:
        distance = (-rel).clamp(0, position_bias.shape[1] - 1)  # [B, Lq, Lk]
        scores = scores + position_bias.float()[:, distance].transpose(0, 1)  # [Hq, B, Lq, Lk] -> [B, Hq, ...]
    seen = (rel <= 0) & k_valid[:, None, :]
    if sliding_window:
        seen &= rel > -sliding_window
    scores = scores.masked_fill(~seen[:, None], float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype)


def _decode_with_features(
    query, k_cache, v_cache, context_lens, block_tables, scale, sliding_window, softcap, alibi_slopes, position_bias
):
    """attention_decode with the features: each row reads only its window's positions
    [max(0, len - W), len), so blocks wholly before the window are never touched."""
    lens = context_lens.long()  # [num_reqs]
    first = (lens - sliding_window).clamp(min=0) if sliding_window else torch.zeros_like(lens)
    span = int((lens - first).max()) if lens.numel() else 0
    k_pos = first[:, None] + torch.arange(span, device=query.device)  # [num_reqs, span]
    k_valid = k_pos < lens[:, None]
    read = torch.minimum(k_pos, (lens - 1).clamp(min=0)[:, None])  # padding keys re-read the row's last one
    k = _gather_positions(k_cache, block_tables, read).transpose(1, 2)
    v = _gather_positions(v_cache, block_tables, read).transpose(1, 2)
    q_pos = (lens - 1)[:, None]
    out = _attend_with_features(
        query.unsqueeze(2), k, v, q_pos, k_pos, k_valid, scale, sliding_window, softcap, alibi_slopes, position_bias
    )
    return out.squeeze(2)


_DECODE_GROUPS, _MIN_DECODE_GROUP = 4, 8  # decode rows go in up to 4 length-sorted groups of at least 8


def attention_decode(
    query: torch.Tensor,  # [num_reqs, num_heads, head_dim], one token per request
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    context_lens: torch.Tensor,  # [num_reqs] int32, including the query token
    block_tables: torch.Tensor,  # [num_reqs, max_blocks] int32
    scale: float,
    max_context_len: int,
    sliding_window: int = 0,  # > 0: each query sees only its last `sliding_window` positions
    softcap: float = 0.0,  # > 0: scores soft-capped at +-softcap (Gemma 2)
    alibi_slopes: torch.Tensor | None = None,  # [num_heads] float32: ALiBi (BLOOM)
    position_bias: torch.Tensor | None = None,  # [num_heads, L] float32: bias by distance (T5)
) -> torch.Tensor:  # [num_reqs, num_heads, head_dim]
    """Attention of one new token per request over its whole cached sequence.

    The gathered K/V are padded to the longest row, so rows sorted by length (the runner orders
    a step's decodes so) go in a few groups, each padded to its own longest: with lengths spread
    over 100-400 tokens that is ~30% less memory traffic at batch 32. With a feature set, each row
    reads only its window's positions, slot by slot."""
    if sliding_window or softcap or alibi_slopes is not None or position_bias is not None:
        return _decode_with_features(
            query,
            k_cache,
            v_cache,
            context_lens,
            block_tables,
            scale,
            sliding_window,
            softcap,
            alibi_slopes,
            position_bias,
        )
    lens = context_lens.tolist()
    group = max(_MIN_DECODE_GROUP, -(-len(lens) // _DECODE_GROUPS))
    if len(lens) <= group or lens != sorted(lens):
        return _attention_decode(query, k_cache, v_cache, context_lens, block_tables, scale, max_context_len)
    out = torch.empty_like(query)
    for s in range(0, len(lens), group):
        e = min(s + group, len(lens))
        rows = slice(s, e)
        out[rows] = _attention_decode(
            query[rows], k_cache, v_cache, context_lens[rows], block_tables[rows], scale, lens[e - 1]
        )
    return out


def _attention_decode(query, k_cache, v_cache, context_lens, block_tables, scale, max_context_len):
    k = _gather_kv(k_cache, block_tables, max_context_len).transpose(1, 2)
    v = _gather_kv(v_cache, block_tables, max_context_len).transpose(1, 2)
    pos = torch.arange(max_context_len, device=query.device)
    mask = (pos[None, :] < context_lens[:, None])[:, None, None, :]
    return _attend(query.unsqueeze(2), k, v, mask, scale).squeeze(2)


def attention_extend(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,  # [num_reqs + 1] int32
    context_lens: torch.Tensor,  # [num_reqs] int32, cached prefix + new tokens
    block_tables: torch.Tensor,  # [num_reqs, max_blocks] int32
    scale: float,
    sliding_window: int = 0,  # as attention_decode
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    position_bias: torch.Tensor | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Causal attention of each request's new tokens over its cached prefix and themselves.

    Query row j of a request with q_len new tokens and context_len in all sits at position
    context_len - q_len + j and sees positions 0..that position (the last `sliding_window` of
    them with a window: keys are read from the first row's window on).
    """
    out = torch.empty_like(query)
    starts, lens = cu_seqlens_q.tolist(), context_lens.tolist()
    for i, ctx_len in enumerate(lens):
        q = query[starts[i] : starts[i + 1]]  # [q_len, Hq, D]
        q_len = q.shape[0]
        if sliding_window or softcap or alibi_slopes is not None or position_bias is not None:
            # keys from the first query's window on: blocks wholly before it are never read
            first = max(0, ctx_len - q_len - sliding_window + 1) if sliding_window else 0
            k_pos = torch.arange(first, ctx_len, device=q.device)[None]  # [1, Lk]
            k = _gather_positions(k_cache, block_tables[i : i + 1], k_pos).transpose(1, 2)
            v = _gather_positions(v_cache, block_tables[i : i + 1], k_pos).transpose(1, 2)
            q_pos = torch.arange(ctx_len - q_len, ctx_len, device=q.device)[None]
            k_valid = torch.ones_like(k_pos, dtype=torch.bool)
            out[starts[i] : starts[i + 1]] = _attend_with_features(
                q.transpose(0, 1)[None],
                k,
                v,
                q_pos,
                k_pos,
                k_valid,
                scale,
                sliding_window,
                softcap,
                alibi_slopes,
                position_bias,
            )[0].transpose(0, 1)
            continue
        k = _gather_kv(k_cache, block_tables[i : i + 1], ctx_len).transpose(1, 2)
        v = _gather_kv(v_cache, block_tables[i : i + 1], ctx_len).transpose(1, 2)
        if q_len == ctx_len:  # no cached prefix: plain causal attention, SDPA's fastest path
            mask = None
        else:
            q_pos = torch.arange(ctx_len - q_len, ctx_len, device=q.device)
            k_pos = torch.arange(ctx_len, device=q.device)
            mask = (k_pos[None, :] <= q_pos[:, None])[None, None]
        out[starts[i] : starts[i + 1]] = _attend(q.transpose(0, 1)[None], k, v, mask, scale)[0].transpose(0, 1)
    return out


def argmax_logsumexp(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, vocab] float32 -> (argmax [N] int64, logsumexp [N] float32)."""
    return logits.argmax(-1), logits.logsumexp(-1)
