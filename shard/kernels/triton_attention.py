"""Triton paged-attention kernels: the CUDA backend of `shard.kernels` (same signatures as reference.py).

Cache layout (per layer, K and V alike): [num_blocks, block_size, num_kv_heads, head_dim]; position p of a
request lives in slot block_table[p // block_size] * block_size + p % block_size. The kernels compute
that slot per KV position, so the KV tile (BLOCK_N positions) is independent of the page size.

GQA packing: every attention program owns ONE kv head and all `group = Hq // Hkv` query heads sharing
it. Its query tile has one row per (token, head) pair: row r = (token r // GROUP_PAD, head r % GROUP_PAD),
GROUP_PAD = next_pow2(group) with the padded heads masked, so QK^T and PV are `tl.dot`s on tensor cores
and each K/V tile is read once per group instead of once per query head.

store_kv: one program per token writes its [Hkv, D] K and V rows; slot < 0 (padding) is skipped.

attention_extend (prefill over a cached prefix, vLLM "unified attention" layout): grid
(num_tokens // BLOCK_Q + num_reqs, Hkv), an upper bound on the number of BLOCK_Q-token query blocks
computed from shapes only (no host sync). A program binary-searches cu_seqlens_q for its request and
exits if its block lies past that request's q_len. Query j of a request sits at position
context_len - q_len + j; the program streams KV tiles (cached prefix and new tokens alike, all through
the block table) from its first query's first visible position (0, or the start of that query's
sliding window) to its last query position with a causal (and window) mask and an online softmax
(exp2 domain; fp32 running max, denominator and accumulator).

attention_decode (flash-decoding / split-KV): stage 1 grid (num_reqs, Hkv, NUM_KV_SPLITS) is static
(no sequence lengths in it), so it can be captured in a CUDA graph. Each request's visible range
[first, context_len) (first = 0, or max(0, context_len - W) with a sliding window W) is cut into
NUM_KV_SPLITS chunks of ceil(range / NUM_KV_SPLITS) positions rounded up to BLOCK_N; a program whose
chunk starts past the context exits at once, the others write a normalised partial output and its
log-sum-exp (fp32). Stage 2, grid (num_reqs, Hq), recomputes which chunks are non-empty and merges them
with LSE weights. A request with context_len 0 (a CUDA-graph padding row) gets zeros.

Per-layer features (semantics as reference.attention_decode): the sliding window is a runtime int
(0 = none; one compiled kernel serves local and global layers), the soft-cap a float behind the
HAS_SOFTCAP constexpr and ALiBi a slopes pointer behind HAS_ALIBI, so a layer without them compiles
to the plain kernel. Neither kernel loads a block-table entry or KV block lying wholly before a
query's window: the router may have handed those blocks to another sequence.
"""

import torch
import triton
import triton.language as tl

NUM_KV_SPLITS = 16  # decode chunks per (request, kv head); fixed so the decode grid is graph-safe
EXTEND_BLOCK_M = 64  # packed query rows (BLOCK_Q tokens x GROUP_PAD heads) per extend program
BLOCK_N = 32  # KV positions per inner-loop tile (two pages of 16, one of 32)
MIN_DECODE_ROWS = 16  # tl.dot needs M >= 16: decode pads the packed group of heads up to this
_LOG2E = 1.4426950408889634
LOG2E: tl.constexpr = tl.constexpr(_LOG2E)  # for the kernels (a plain global float is not visible to them)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _store_kv_kernel(
    key_ptr,
    value_ptr,  # [num_tokens, Hkv, D], last dim contiguous
    k_cache_ptr,
    v_cache_ptr,  # [num_blocks, block_size, Hkv, D], contiguous
    slot_ptr,  # [num_tokens] int32/int64
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    NUM_KV_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot < 0:
        return
    h = tl.arange(0, HEADS_PAD)[:, None]
    d = tl.arange(0, HEAD_DIM)[None, :]
    mask = h < NUM_KV_HEADS
    dst = slot * (NUM_KV_HEADS * HEAD_DIM) + h * HEAD_DIM + d  # [HEADS_PAD, D]
    k = tl.load(key_ptr + tok * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(value_ptr + tok * stride_vt + h * stride_vh + d, mask=mask)
    tl.store(k_cache_ptr + dst, k, mask=mask)
    tl.store(v_cache_ptr + dst, v, mask=mask)


@triton.jit
def _attend_tile(
    q,
    acc,
    m_i,
    l_i,  # q [M, D] (input dtype); acc [M, D], m_i [M], l_i [M] fp32
    k_cache_ptr,
    v_cache_ptr,
    block_table_ptr,  # block_table_ptr: this request's row [max_blocks] int32
    start,  # the tile's first position
    kv_end,  # positions >= kv_end are not loaded
    kv_first,
    q_pos,  # [M]: row r is the query at q_pos[r] and sees positions kv_first[r] .. q_pos[r]
    alibi_log2,  # [M] fp32: row r's ALiBi slope in log2 units (HAS_ALIBI)
    bias_ptr,  # [Hq, bias_len] fp32 bias by distance (HAS_POS_BIAS)
    bias_off,  # [M] int32: row r's head's offset in bias_ptr
    bias_len,
    kv_head,
    scale_log2,
    softcap_log2,  # the soft-cap in log2 units (HAS_SOFTCAP)
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    HAS_POS_BIAS: tl.constexpr,
):
    """One online-softmax step over KV positions [start, start + BLOCK_N), gathered through the block table."""
    pos = start + tl.arange(0, BLOCK_N)  # [N]
    in_range = pos < kv_end
    block = tl.load(block_table_ptr + pos // BLOCK_SIZE, mask=in_range, other=0).to(tl.int64)
    row = (block * BLOCK_SIZE + pos % BLOCK_SIZE) * (NUM_KV_HEADS * HEAD_DIM) + kv_head * HEAD_DIM  # [N]
    d = tl.arange(0, HEAD_DIM)
    k_t = tl.load(k_cache_ptr + row[None, :] + d[:, None], mask=in_range[None, :], other=0.0)  # [D, N]
    v = tl.load(v_cache_ptr + row[:, None] + d[None, :], mask=in_range[:, None], other=0.0)  # [N, D]
    qk = tl.dot(q, k_t, input_precision=DOT_PREC) * scale_log2  # [M, N], log2 units
    if HAS_SOFTCAP:  # softcap * tanh(s / softcap), tanh(x) = 2 sigmoid(2x) - 1 (scaling by log2(e) commutes)
        qk = softcap_log2 * (2.0 * tl.sigmoid(qk * (2.0 / softcap_log2)) - 1.0)
    if HAS_ALIBI:
        qk += alibi_log2[:, None] * (pos[None, :] - q_pos[:, None]).to(tl.float32)
    if HAS_POS_BIAS:  # bias_ptr[head, min(i - j, bias_len - 1)], clamped into the row (masked keys too)
        distance = tl.minimum(tl.maximum(q_pos[:, None] - pos[None, :], 0), bias_len - 1)
        qk += tl.load(bias_ptr + bias_off[:, None] + distance) * LOG2E
    visible = (pos[None, :] >= kv_first[:, None]) & (pos[None, :] <= q_pos[:, None]) & in_range[None, :]
    qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))  # m_i starts finite (-1e30): no inf - inf
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _find_request(cu_seqlens_q_ptr, qblock, num_reqs, BLOCK_Q: tl.constexpr):  # cu_seqlens_q: [num_reqs + 1] int32
    """The last request r with cu_seqlens_q[r] // BLOCK_Q + r <= qblock (binary search)."""
    lo = 0
    hi = num_reqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(cu_seqlens_q_ptr + mid) // BLOCK_Q + mid <= qblock:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _extend_kernel(
    q_ptr,  # [num_tokens, Hq, D], last dim contiguous
    k_cache_ptr,
    v_cache_ptr,  # [num_blocks, block_size, Hkv, D], contiguous
    out_ptr,  # [num_tokens, Hq, D], contiguous
    cu_seqlens_q_ptr,  # [num_reqs + 1] int32
    context_lens_ptr,  # [num_reqs] int32
    block_tables_ptr,  # [num_reqs, max_blocks] int32
    alibi_ptr,  # [Hq] fp32 ALiBi slopes (HAS_ALIBI)
    bias_ptr,  # [Hq, bias_len] fp32 bias by distance (HAS_POS_BIAS)
    bias_len,
    scale_log2,
    softcap_log2,
    window,  # sliding window in positions, 0: none
    num_reqs,
    stride_qt,
    stride_qh,
    stride_bt,
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    HAS_POS_BIAS: tl.constexpr,
):
    qblock = tl.program_id(0)
    kv_head = tl.program_id(1)
    req = _find_request(cu_seqlens_q_ptr, qblock, num_reqs, BLOCK_Q)
    q_start = tl.load(cu_seqlens_q_ptr + req)
    q_len = tl.load(cu_seqlens_q_ptr + req + 1) - q_start
    first_tok = (qblock - (q_start // BLOCK_Q + req)) * BLOCK_Q
    if first_tok >= q_len:
        return
    ctx_len = tl.load(context_lens_ptr + req)
    prefix = ctx_len - q_len

    rows = tl.arange(0, BLOCK_Q * GROUP_PAD)
    tok = first_tok + rows // GROUP_PAD  # [M] token index within the request
    head = kv_head * GROUP + rows % GROUP_PAD  # [M] query head
    row_ok = (tok < q_len) & (rows % GROUP_PAD < GROUP)
    d = tl.arange(0, HEAD_DIM)
    q_off = (q_start + tok).to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_off, mask=row_ok[:, None], other=0.0)  # [M, D]

    q_pos = prefix + tok  # [M] causal: row sees positions <= its own
    kv_first = tl.where(window > 0, tl.maximum(q_pos - window + 1, 0), 0)  # [M] and, with a window, its last W
    kv_start = tl.where(window > 0, tl.maximum(prefix + first_tok - window + 1, 0), 0)  # the first row's first
    kv_end = tl.minimum(ctx_len, prefix + first_tok + BLOCK_Q)  # last query position of the block + 1
    alibi_log2 = tl.zeros([BLOCK_Q * GROUP_PAD], tl.float32)
    if HAS_ALIBI:
        alibi_log2 = tl.load(alibi_ptr + head, mask=row_ok, other=0.0) * LOG2E
    bias_off = tl.where(row_ok, head, 0) * bias_len  # [M]; padding rows read head 0's
    acc = tl.zeros([BLOCK_Q * GROUP_PAD, HEAD_DIM], tl.float32)
    m_i = tl.full([BLOCK_Q * GROUP_PAD], -1e30, tl.float32)
    l_i = tl.zeros([BLOCK_Q * GROUP_PAD], tl.float32)
    bt_row = block_tables_ptr + req.to(tl.int64) * stride_bt
    for start in range(kv_start, kv_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            q,
            acc,
            m_i,
            l_i,
            k_cache_ptr,
            v_cache_ptr,
            bt_row,
            start,
            kv_end,
            kv_first,
            q_pos,
            alibi_log2,
            bias_ptr,
            bias_off,
            bias_len,
            kv_head,
            scale_log2,
            softcap_log2,
            NUM_KV_HEADS,
            HEAD_DIM,
            BLOCK_SIZE,
            BLOCK_N,
            DOT_PREC,
            HAS_SOFTCAP,
            HAS_ALIBI,
            HAS_POS_BIAS,
        )
    out_row = (q_start + tok).to(tl.int64) * (NUM_KV_HEADS * GROUP) + head  # [M] out is contiguous
    out_off = out_row[:, None] * HEAD_DIM + d[None, :]
    tl.store(out_ptr + out_off, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _decode_first(ctx_len, window):
    """The first position a decode query sees: 0, or with a sliding window max(0, ctx_len - window)."""
    return tl.where(window > 0, tl.maximum(ctx_len - window, 0), 0)


@triton.jit
def _split_len(span, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Positions per decode chunk of a `span`-position range: ceil(span / NUM_SPLITS) rounded up to a whole tile."""
    return tl.cdiv(tl.cdiv(span, NUM_SPLITS), BLOCK_N) * BLOCK_N


@triton.jit
def _decode_stage1_kernel(
    q_ptr,  # [num_reqs, Hq, D], last dim contiguous
    k_cache_ptr,
    v_cache_ptr,  # [num_blocks, block_size, Hkv, D], contiguous
    mid_o_ptr,  # [num_reqs, Hq, NUM_SPLITS, D] fp32: normalised partial outputs
    mid_lse_ptr,  # [num_reqs, Hq, NUM_SPLITS] fp32: log2-sum-exp2 of each chunk's scores
    context_lens_ptr,  # [num_reqs] int32
    block_tables_ptr,  # [num_reqs, max_blocks] int32
    alibi_ptr,  # [Hq] fp32 ALiBi slopes (HAS_ALIBI)
    bias_ptr,  # [Hq, bias_len] fp32 bias by distance (HAS_POS_BIAS)
    bias_len,
    scale_log2,
    softcap_log2,
    window,  # sliding window in positions, 0: none
    stride_qb,
    stride_qh,
    stride_bt,
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DOT_PREC: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    HAS_POS_BIAS: tl.constexpr,
):
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx_len = tl.load(context_lens_ptr + req)
    first = _decode_first(ctx_len, window)  # the chunks cut [first, ctx_len) only
    split_len = _split_len(ctx_len - first, NUM_SPLITS, BLOCK_N)
    split_start = first + split * split_len
    if split_start >= ctx_len:  # empty chunk (also every chunk when ctx_len == 0)
        return
    split_end = tl.minimum(split_start + split_len, ctx_len)

    rows = tl.arange(0, GROUP_PAD)
    head = kv_head * GROUP + rows  # [M] query heads of this kv head's group
    row_ok = rows < GROUP
    d = tl.arange(0, HEAD_DIM)
    q_off = req.to(tl.int64) * stride_qb + head[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_off, mask=row_ok[:, None], other=0.0)  # [M, D]

    kv_first = tl.zeros([GROUP_PAD], tl.int32) + first  # [M] every row sees [first, ctx_len): the whole chunk
    q_pos = tl.zeros([GROUP_PAD], tl.int32) + (ctx_len - 1)  # [M]
    alibi_log2 = tl.zeros([GROUP_PAD], tl.float32)
    if HAS_ALIBI:
        alibi_log2 = tl.load(alibi_ptr + head, mask=row_ok, other=0.0) * LOG2E
    bias_off = tl.where(row_ok, head, 0) * bias_len  # [M]; padding rows read head 0's
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    m_i = tl.full([GROUP_PAD], -1e30, tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    bt_row = block_tables_ptr + req.to(tl.int64) * stride_bt
    for start in range(split_start, split_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            q,
            acc,
            m_i,
            l_i,
            k_cache_ptr,
            v_cache_ptr,
            bt_row,
            start,
            split_end,
            kv_first,
            q_pos,
            alibi_log2,
            bias_ptr,
            bias_off,
            bias_len,
            kv_head,
            scale_log2,
            softcap_log2,
            NUM_KV_HEADS,
            HEAD_DIM,
            BLOCK_SIZE,
            BLOCK_N,
            DOT_PREC,
            HAS_SOFTCAP,
            HAS_ALIBI,
            HAS_POS_BIAS,
        )
    mid = (req * (NUM_KV_HEADS * GROUP) + head) * NUM_SPLITS + split  # [M]
    tl.store(mid_o_ptr + mid[:, None] * HEAD_DIM + d[None, :], acc / l_i[:, None], mask=row_ok[:, None])
    tl.store(mid_lse_ptr + mid, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _decode_stage2_kernel(
    mid_o_ptr,  # [num_reqs, Hq, NUM_SPLITS, D] fp32
    mid_lse_ptr,  # [num_reqs, Hq, NUM_SPLITS] fp32
    out_ptr,  # [num_reqs, Hq, D], contiguous
    context_lens_ptr,  # [num_reqs] int32
    window,  # sliding window in positions, 0: none
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    req = tl.program_id(0)
    head = tl.program_id(1)
    ctx_len = tl.load(context_lens_ptr + req)
    span = ctx_len - _decode_first(ctx_len, window)
    s = tl.arange(0, NUM_SPLITS)
    valid = s * _split_len(span, NUM_SPLITS, BLOCK_N) < span  # chunks stage 1 wrote
    base = (req * NUM_HEADS + head) * NUM_SPLITS
    d = tl.arange(0, HEAD_DIM)
    lse = tl.load(mid_lse_ptr + base + s, mask=valid, other=float("-inf"))  # [S]
    o = tl.load(mid_o_ptr + (base + s)[:, None] * HEAD_DIM + d[None, :], mask=valid[:, None], other=0.0)
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # no chunk at all (ctx_len == 0): weights become 0
    w = tl.exp2(lse - m)  # [S]
    denom = tl.sum(w, 0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + (req * NUM_HEADS + head) * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty))


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, dtype: torch.dtype) -> None:
    assert dtype in _DTYPES, f"unsupported dtype {dtype}"
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, (k_cache.shape, v_cache.shape)
    assert k_cache.dtype == v_cache.dtype == dtype, (k_cache.dtype, v_cache.dtype, dtype)
    assert k_cache.is_contiguous() and v_cache.is_contiguous(), "KV cache must be contiguous"
    head_dim = k_cache.shape[3]
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0, f"head_dim {head_dim}: power of two >= 16"


def _check_index(t: torch.Tensor, name: str, ndim: int, rows: int) -> None:
    assert t.dtype == torch.int32, f"{name} must be int32, got {t.dtype}"
    assert t.dim() == ndim and t.shape[0] == rows, f"{name}: shape {tuple(t.shape)}, expected {rows} rows"
    assert t.stride(-1) == 1, f"{name}: last dim must be contiguous"


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # no TF32 rounding for fp32 inputs


def _features(
    query: torch.Tensor,
    sliding_window: int,
    softcap: float,
    alibi_slopes: torch.Tensor | None,
    position_bias: torch.Tensor | None,
) -> tuple[int, float, torch.Tensor | None, torch.Tensor | None]:
    """The kernels' (window, softcap_log2, slopes [Hq] fp32 contiguous or None, position bias
    [Hq, L] fp32 contiguous or None), checked."""
    assert sliding_window >= 0, f"sliding_window {sliding_window}: 0 (none) or a positive number of positions"
    assert softcap >= 0, f"softcap {softcap}: 0 (none) or positive"
    if alibi_slopes is not None:
        assert alibi_slopes.shape == (query.shape[1],) and alibi_slopes.dtype == torch.float32, alibi_slopes.shape
        assert alibi_slopes.device == query.device, (alibi_slopes.device, query.device)
        alibi_slopes = alibi_slopes.contiguous()
    if position_bias is not None:
        assert position_bias.dim() == 2 and position_bias.shape[0] == query.shape[1], position_bias.shape
        assert position_bias.shape[1] >= 1 and position_bias.dtype == torch.float32, position_bias.dtype
        assert position_bias.device == query.device, (position_bias.device, query.device)
        position_bias = position_bias.contiguous()
    return int(sliding_window), float(softcap) * _LOG2E, alibi_slopes, position_bias


def store_kv(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64 (or int32); -1 = padding, skipped
) -> None:
    """Write each token's K and V into its slot of the paged cache."""
    _check_cache(k_cache, v_cache, key.dtype)
    num_tokens, num_kv_heads, head_dim = key.shape
    assert value.shape == key.shape and value.dtype == key.dtype, (key.shape, value.shape)
    assert tuple(k_cache.shape[2:]) == (num_kv_heads, head_dim), (k_cache.shape, key.shape)
    assert key.stride(2) == 1 and value.stride(2) == 1, "K/V: head_dim must be contiguous"
    assert slot_mapping.shape == (num_tokens,) and slot_mapping.dtype in (torch.int32, torch.int64)
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping.contiguous(),
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        NUM_KV_HEADS=num_kv_heads,
        HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim,
    )


def attention_extend(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    cu_seqlens_q: torch.Tensor,  # [num_reqs + 1] int32
    context_lens: torch.Tensor,  # [num_reqs] int32, cached prefix + new tokens
    block_tables: torch.Tensor,  # [num_reqs, max_blocks] int32
    scale: float,
    sliding_window: int = 0,  # > 0: each query sees only its last `sliding_window` positions
    softcap: float = 0.0,  # > 0: scores soft-capped at +-softcap
    alibi_slopes: torch.Tensor | None = None,  # [num_heads] float32: ALiBi
    position_bias: torch.Tensor | None = None,  # [num_heads, L] float32: bias by distance (T5)
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Causal attention of each request's new tokens (the last q_len positions) over its context
    (the window of each query with a sliding window)."""
    _check_cache(k_cache, v_cache, query.dtype)
    window, softcap_log2, alibi_slopes, position_bias = _features(
        query, sliding_window, softcap, alibi_slopes, position_bias
    )
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_reqs = context_lens.shape[0]
    assert k_cache.shape[3] == head_dim and num_heads % num_kv_heads == 0, (query.shape, k_cache.shape)
    assert query.stride(2) == 1, "query: head_dim must be contiguous"
    _check_index(cu_seqlens_q, "cu_seqlens_q", 1, num_reqs + 1)
    _check_index(context_lens, "context_lens", 1, num_reqs)
    _check_index(block_tables, "block_tables", 2, num_reqs)
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if num_tokens == 0 or num_reqs == 0:
        return out
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    block_q = max(1, EXTEND_BLOCK_M // group_pad)
    grid = (num_tokens // block_q + num_reqs, num_kv_heads)  # shape-only upper bound on query blocks
    _extend_kernel[grid](
        query,
        k_cache,
        v_cache,
        out,
        cu_seqlens_q.contiguous(),
        context_lens.contiguous(),
        block_tables,
        alibi_slopes,
        position_bias,
        0 if position_bias is None else position_bias.shape[1],
        scale * _LOG2E,
        softcap_log2,
        window,
        num_reqs,
        query.stride(0),
        query.stride(1),
        block_tables.stride(0),
        NUM_KV_HEADS=num_kv_heads,
        GROUP=group,
        GROUP_PAD=group_pad,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_Q=block_q,
        BLOCK_N=BLOCK_N,
        DOT_PREC=_dot_precision(query.dtype),
        HAS_SOFTCAP=softcap_log2 > 0,
        HAS_ALIBI=alibi_slopes is not None,
        HAS_POS_BIAS=position_bias is not None,
        num_warps=4 if head_dim <= 64 else 8,
    )
    return out


def attention_decode(
    query: torch.Tensor,  # [num_reqs, num_heads, head_dim], one token per request
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    context_lens: torch.Tensor,  # [num_reqs] int32, including the query token; 0 = padding row
    block_tables: torch.Tensor,  # [num_reqs, max_blocks] int32
    scale: float,
    max_context_len: int,  # unused: the grid must not depend on lengths (CUDA graphs)
    sliding_window: int = 0,  # as attention_extend
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    position_bias: torch.Tensor | None = None,
) -> torch.Tensor:  # [num_reqs, num_heads, head_dim]
    """Attention of one new token per request over its cached sequence, or the window of it (split-KV)."""
    del max_context_len
    _check_cache(k_cache, v_cache, query.dtype)
    window, softcap_log2, alibi_slopes, position_bias = _features(
        query, sliding_window, softcap, alibi_slopes, position_bias
    )
    num_reqs, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    assert k_cache.shape[3] == head_dim and num_heads % num_kv_heads == 0, (query.shape, k_cache.shape)
    assert query.stride(2) == 1, "query: head_dim must be contiguous"
    _check_index(context_lens, "context_lens", 1, num_reqs)
    _check_index(block_tables, "block_tables", 2, num_reqs)
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if num_reqs == 0:
        return out
    group = num_heads // num_kv_heads
    mid_o = torch.empty((num_reqs, num_heads, NUM_KV_SPLITS, head_dim), dtype=torch.float32, device=query.device)
    mid_lse = torch.empty((num_reqs, num_heads, NUM_KV_SPLITS), dtype=torch.float32, device=query.device)
    context_lens = context_lens.contiguous()
    _decode_stage1_kernel[(num_reqs, num_kv_heads, NUM_KV_SPLITS)](
        query,
        k_cache,
        v_cache,
        mid_o,
        mid_lse,
        context_lens,
        block_tables,
        alibi_slopes,
        position_bias,
        0 if position_bias is None else position_bias.shape[1],
        scale * _LOG2E,
        softcap_log2,
        window,
        query.stride(0),
        query.stride(1),
        block_tables.stride(0),
        NUM_KV_HEADS=num_kv_heads,
        GROUP=group,
        GROUP_PAD=max(MIN_DECODE_ROWS, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_N=BLOCK_N,
        NUM_SPLITS=NUM_KV_SPLITS,
        DOT_PREC=_dot_precision(query.dtype),
        HAS_SOFTCAP=softcap_log2 > 0,
        HAS_ALIBI=alibi_slopes is not None,
        HAS_POS_BIAS=position_bias is not None,
        num_warps=4,
        num_stages=2,
    )
    _decode_stage2_kernel[(num_reqs, num_heads)](
        mid_o,
        mid_lse,
        out,
        context_lens,
        window,
        NUM_HEADS=num_heads,
        HEAD_DIM=head_dim,
        BLOCK_N=BLOCK_N,
        NUM_SPLITS=NUM_KV_SPLITS,
        num_warps=4,
    )
    return out
