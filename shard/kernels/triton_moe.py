"""Fused mixture-of-experts MLP in Triton: the CUDA path of `shard.kernels.moe.fused_experts`.

The design is vLLM's fused_moe (vllm/model_executor/layers/fused_moe/fused_moe.py); the code is our own.
A step's T tokens each go to top_k experts: N = T * top_k (token, expert) assignments, assignment
a = t * top_k + j being token t's j-th expert.

1. moe_align_block_size sorts the assignments by expert and pads each expert's run to a multiple of
   BLOCK_M with a sentinel (N), so that every BLOCK_M-row block of `sorted_ids` belongs to one expert
   (`expert_ids[block]`). Its sizes depend on shapes only (an upper bound on the padded length), and it
   runs as a few torch ops without a host sync, so a decode step captures in a CUDA graph; blocks past
   the real padded length (`num_post_padded`) exit at once.
2. _gate_up_kernel: one program per (block of sorted rows, BLOCK_N intermediate features). It gathers
   the block's token rows of x, multiplies them by its expert's gate rows and up rows into two fp32
   accumulators (one read of each x tile for both), and writes silu(gate) * up for each assignment:
   h [N, I]. No [N, 2I] tensor is ever written.
3. _down_kernel: the same over h's rows and the expert's down projection [H, I]; the routing weight of
   each assignment scales its fp32 accumulator before the store: y [N, H].
4. y viewed [T, top_k, H] is summed over top_k in fp32 (a fixed order: deterministic, no atomics).

Launch plan (vLLM's default when no tuned config exists): decode-sized batches (N <= E: few tokens per
expert) use 16-row blocks, larger ones 64-row blocks grouped GROUP_M at a time so neighbouring
programs share weight tiles in L2. fp32 inputs are multiplied in full precision (no TF32).
"""

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def moe_align_block_size(
    topk_ids: torch.Tensor,  # [T, top_k] expert of each assignment
    num_experts: int,
    block_m: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Assignments grouped by expert, each expert's run padded to a multiple of `block_m`.

    Returns sorted_ids [P] int32 (assignment ids, N = T * top_k for padding), expert_ids [P // block_m]
    int32 (the expert of each block; blocks past the padded length name the last expert and are
    skipped), num_post_padded [1] int32 (the padded length). P = N + min(N, E) * (block_m - 1) rounded
    up to block_m, an upper bound from shapes alone."""
    flat = topk_ids.reshape(-1).long()
    n, device = flat.numel(), flat.device
    counts = torch.zeros(num_experts, dtype=torch.long, device=device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)  # [E] end of each expert's padded run
    order = flat.argsort(stable=True)  # [N] assignment ids by expert
    expert_of = flat[order]
    first = counts.cumsum(0) - counts  # [E] index in `order` of each expert's first assignment
    dest = (ends - padded)[expert_of] + torch.arange(n, device=device) - first[expert_of]
    size = triton.cdiv(n + min(n, num_experts) * (block_m - 1), block_m) * block_m
    sorted_ids = torch.full((size,), n, dtype=torch.int32, device=device)
    sorted_ids[dest] = order.to(torch.int32)
    block_starts = torch.arange(0, size, block_m, device=device)
    expert_ids = torch.searchsorted(ends, block_starts, right=True).clamp_(max=num_experts - 1).to(torch.int32)
    return sorted_ids, expert_ids, ends[-1:].to(torch.int32)


@triton.jit
def _block(
    sorted_ids_ptr,
    expert_ids_ptr,
    num_post_padded_ptr,
    num_rows_padded,
    N_OUT,
    num_valid,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """This program's tile: (assignment ids [BLOCK_M] int64, their mask, expert int64, output
    features [BLOCK_N], is the block live). Programs are ordered GROUP_M row-blocks at a time."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(num_rows_padded, BLOCK_M)
    num_pid_n = tl.cdiv(N_OUT, BLOCK_N)
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_m
    pid_n = (pid % in_group) // group_m
    live = pid_m * BLOCK_M < tl.load(num_post_padded_ptr)
    rows = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return rows, rows < num_valid, expert, offs_n, live


@triton.jit
def _gate_up_kernel(
    x_ptr,  # [T, K]
    w_ptr,  # [E, 2 * N_OUT, K]: gate rows, then up rows
    h_ptr,  # [num_valid, N_OUT] out: silu(gate) * up per assignment
    sorted_ids_ptr,
    expert_ids_ptr,
    num_post_padded_ptr,
    num_rows_padded,
    N_OUT,
    K,
    num_valid,
    stride_xt,
    stride_we,
    stride_wn,
    stride_hm,
    TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    rows, row_mask, expert, offs_n, live = _block(
        sorted_ids_ptr,
        expert_ids_ptr,
        num_post_padded_ptr,
        num_rows_padded,
        N_OUT,
        num_valid,
        BLOCK_M,
        BLOCK_N,
        GROUP_M,
    )
    if live:
        n_mask = offs_n < N_OUT
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + (rows // TOP_K)[:, None] * stride_xt + offs_k[None, :]  # [M, BK]
        g_ptrs = w_ptr + expert * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]  # [BK, N]
        u_ptrs = g_ptrs + N_OUT * stride_wn
        gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            k_mask = offs_k < K - k * BLOCK_K
            a = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w_mask = k_mask[:, None] & n_mask[None, :]
            gate = tl.dot(a, tl.load(g_ptrs, mask=w_mask, other=0.0), gate, input_precision=DOT_PREC)
            up = tl.dot(a, tl.load(u_ptrs, mask=w_mask, other=0.0), up, input_precision=DOT_PREC)
            x_ptrs += BLOCK_K
            g_ptrs += BLOCK_K
            u_ptrs += BLOCK_K
        h = gate * tl.sigmoid(gate) * up
        h_ptrs = h_ptr + rows[:, None] * stride_hm + offs_n[None, :]
        tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def _down_kernel(
    h_ptr,  # [num_valid, K]
    w_ptr,  # [E, N_OUT, K]
    y_ptr,  # [num_valid, N_OUT] out: routing weight * (h @ w[e].T) per assignment
    routing_ptr,  # [num_valid] float32
    sorted_ids_ptr,
    expert_ids_ptr,
    num_post_padded_ptr,
    num_rows_padded,
    N_OUT,
    K,
    num_valid,
    stride_hm,
    stride_we,
    stride_wn,
    stride_ym,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    rows, row_mask, expert, offs_n, live = _block(
        sorted_ids_ptr,
        expert_ids_ptr,
        num_post_padded_ptr,
        num_rows_padded,
        N_OUT,
        num_valid,
        BLOCK_M,
        BLOCK_N,
        GROUP_M,
    )
    if live:
        n_mask = offs_n < N_OUT
        offs_k = tl.arange(0, BLOCK_K)
        h_ptrs = h_ptr + rows[:, None] * stride_hm + offs_k[None, :]  # [M, BK]
        w_ptrs = w_ptr + expert * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]  # [BK, N]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            k_mask = offs_k < K - k * BLOCK_K
            a = tl.load(h_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc = tl.dot(a, w, acc, input_precision=DOT_PREC)
            h_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        acc *= tl.load(routing_ptr + rows, mask=row_mask, other=0.0)[:, None]
        y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


def _launch_config(num_assignments: int, num_experts: int) -> dict:
    """Block sizes from the shapes only (graph-safe): vLLM's defaults for untuned shapes."""
    if num_assignments <= num_experts:  # a few tokens per expert: stream the weights
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3)


def fused_experts(
    x: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2 * I, H]: each expert's gate rows, then its up rows
    w2: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, top_k] float32
    topk_ids: torch.Tensor,  # [T, top_k] int
) -> torch.Tensor:  # [T, H] in x's dtype
    """sum_j topk_weights[t, j] * w2[e] @ (silu(gate_e x_t) * up_e x_t), e = topk_ids[t, j], in two
    grouped-GEMM kernels (module docstring)."""
    assert x.dtype in _DTYPES and w13.dtype == x.dtype and w2.dtype == x.dtype, (x.dtype, w13.dtype, w2.dtype)
    T, H = x.shape
    E, two_i, _ = w13.shape
    inter, top_k = two_i // 2, topk_ids.shape[1]
    assert w13.shape == (E, 2 * inter, H) and w2.shape == (E, H, inter), (tuple(w13.shape), tuple(w2.shape))
    x, w13, w2 = x.contiguous(), w13.contiguous(), w2.contiguous()
    n = T * top_k
    if n == 0:
        return torch.empty_like(x)
    cfg = _launch_config(n, E)
    sorted_ids, expert_ids, num_post = moe_align_block_size(topk_ids, E, cfg["BLOCK_M"])
    common = dict(cfg, DOT_PREC="ieee" if x.dtype == torch.float32 else "tf32")
    h = torch.empty((n, inter), dtype=x.dtype, device=x.device)
    m_blocks = sorted_ids.numel() // cfg["BLOCK_M"]
    _gate_up_kernel[(m_blocks * triton.cdiv(inter, cfg["BLOCK_N"]),)](
        x,
        w13,
        h,
        sorted_ids,
        expert_ids,
        num_post,
        sorted_ids.numel(),
        inter,
        H,
        n,
        x.stride(0),
        w13.stride(0),
        w13.stride(1),
        h.stride(0),
        TOP_K=top_k,
        **common,
    )
    y = torch.empty((n, H), dtype=x.dtype, device=x.device)
    _down_kernel[(m_blocks * triton.cdiv(H, cfg["BLOCK_N"]),)](
        h,
        w2,
        y,
        topk_weights.reshape(-1).float().contiguous(),
        sorted_ids,
        expert_ids,
        num_post,
        sorted_ids.numel(),
        H,
        inter,
        n,
        h.stride(0),
        w2.stride(0),
        w2.stride(1),
        y.stride(0),
        **common,
    )
    return torch.sum(y.view(T, top_k, H), dim=1, dtype=torch.float32).to(x.dtype)
