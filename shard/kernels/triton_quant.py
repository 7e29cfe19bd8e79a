"""GEMMs with quantized weights for the CUDA path: Triton kernels (W4A16, W8A16) and torch's int8 / fp8 GEMMs.

Every function takes activations x [..., K] (any leading dims, flattened to M rows) and returns [..., N] in x's
dtype; `bias` [N] is optional. Accumulation is always fp32 (int32 for int8 x int8).

- w4a16_linear: 4-bit weights in GPTQ's packing, asymmetric, one (scale, zero) pair per `group_size` inputs
  and output channel. Layout contract:
      qweight [K // 8, N] int32: nibble j (bits 4j..4j+3, unsigned 0..15) of qweight[r, n] is q[8r + j, n]
      scales, zeros [K // group_size, N] (float; zeros are float zero points, not packed)
      w[k, n] = (q[k, n] - zeros[k // G, n]) * scales[k // G, n]      out = x @ w  (w is [K, N])
  The kernel reads each tile's packed words (a word serves 8 consecutive K rows), unpacks them with a shift
  and a mask, dequantizes in fp32, rounds to x's dtype and feeds `tl.dot` (tensor cores). A K tile inside
  one group reads one row of scales / zeros; groups smaller than the tile (or not aligned to it, such as a
  per-channel group_size == K that is not a multiple of the tile) are read per K row.
- w8a16_linear: int8 weights [N, K] (nn.Linear's layout), one symmetric fp32 scale per output channel:
  out = x @ (w_int8 * scales[:, None]).T. int8 values convert exactly to fp16 / bf16; the scale is applied
  to the fp32 accumulator.
- int8_dynamic_linear (W8A8): each activation row quantized to int8 (symmetric, max |x| / 127), then
  torch._int_mm (cuBLASLt int8 on CUDA, with up to 16 rows padded to 32 as it needs more than 16; oneDNN
  on CPU; an exact float64 GEMM for a CUDA layer whose K or N is not a multiple of 8), rescaled in fp32.
- fp8_linear: float8_e4m3fn weights through torch._scaled_mm with dynamic activation scales: per token
  (row-wise scaled GEMM) by default on Hopper for fp16 / bf16 activations, per tensor otherwise. Needs
  compute capability 8.9+ (fp8_supported says why not); K and N multiples of 16.

The Triton kernels share one launch plan (GemmConfig, chosen from the shapes and the GPU by `pick_config`,
never from data, so a call can be captured in a CUDA graph):
- decode (M <= 16, memory bound): 16-row tiles and split-K, so that a skinny GEMM still puts at least
  2 programs on every SM: the grid is (M tiles x N tiles, SPLIT_K); each split sums a contiguous range of K tiles
  into an fp32 partial [SPLIT_K, M, N], and a second kernel adds the partials in a fixed order
  (deterministic, unlike atomics), adds the bias and casts;
- 16 < M <= 64: 32/64-row tiles, split-K up to 4 when the tiles alone leave SMs idle;
- prefill (M > 64, compute bound): 64/128 x 128 tiles, no split, tiles ordered in groups of GROUP_M rows of
  tiles so that neighbouring programs share weight tiles in L2.
Ideas from vLLM's awq_triton.py (split-K, in-kernel unpacking) and gemlite (unpacking GPTQ-packed words
with per-row shifts, block sizes by M); the code is our own.
"""

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = [
    "GemmConfig",
    "pick_config",
    "w4a16_linear",
    "w8a16_linear",
    "dequantize_w4",
    "pack_w4",
    "quantize_int8_per_token",
    "int8_dynamic_linear",
    "FP8_DTYPE",
    "FP8_MAX",
    "fp8_supported",
    "quantize_fp8_per_channel",
    "quantize_fp8_per_tensor",
    "quantize_fp8_per_token",
    "fp8_linear",
]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INTERPRETER_SMS = 4  # stand-in SM count off CUDA (the interpreter): small, so that the tests reach split-K
_REDUCE_BLOCK = 1024  # elements per program of the split-K reduction
_INT_MM_PAD_ROWS = 32  # cuBLASLt's int8 GEMM (torch._int_mm on CUDA) needs more than 16 rows: pad up to this
_FP8_MIN_ROWS = 17  # fp8_linear pads fewer activation rows up to this
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448


# ---------------------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program `pid`, walking the output tiles GROUP_M tile rows at a time (L2 reuse)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows
    pid_n = (pid % per_group) // rows
    return pid_m, pid_n


@triton.jit
def _k_tile_range(K, pid_k, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """The K tiles [begin, end) that split `pid_k` sums: contiguous, ceil(tiles / SPLIT_K) each (the last
    splits may get fewer, or none: they then write zeros)."""
    num_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(num_tiles, SPLIT_K)
    begin = pid_k * per_split
    end = tl.minimum(begin + per_split, num_tiles)
    return begin, end


@triton.jit
def _store_tile(
    acc,  # [BLOCK_M, BLOCK_N] fp32
    out_ptr,  # SPLIT_K == 1: [M, N] contiguous, x's dtype; else [SPLIT_K, M, N] fp32 partial sums
    bias_ptr,  # [N] (read only with HAS_BIAS and SPLIT_K == 1: the reduction adds it otherwise)
    offs_m,
    offs_n,  # [BLOCK_M], [BLOCK_N] output rows / columns
    M,
    N,
    pid_k,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    n_ok = offs_n < N
    mask = (offs_m < M)[:, None] & n_ok[None, :]
    offs = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + pid_k.to(tl.int64) * M * N + offs, acc, mask=mask)


@triton.jit
def _w4a16_kernel(
    x_ptr,  # [M, K], K contiguous, rows stride_xm apart
    qw_ptr,  # [K // 8, N] int32, contiguous: nibble j of qw[r, n] is q[8r + j, n]
    scales_ptr,  # [K // GROUP_SIZE, N], contiguous
    zeros_ptr,  # [K // GROUP_SIZE, N], contiguous
    bias_ptr,  # [N]
    out_ptr,  # [M, N] or [SPLIT_K, M, N] fp32 (see _store_tile)
    M,
    N,
    K,
    stride_xm,
    GROUP_SIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm  # [BM, 1]
    begin, end = _k_tile_range(K, pid_k, BLOCK_K, SPLIT_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for t in range(begin, end):
        offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)  # [BK]
        k_ok = offs_k < K
        kn_ok = k_ok[:, None] & n_ok[None, :]  # [BK, BN]
        x = tl.load(x_rows + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
        # the 8 K rows of a word load the same address (one memory transaction), each keeps its own nibble
        packed = tl.load(qw_ptr + (offs_k // 8)[:, None] * N + offs_n[None, :], mask=kn_ok, other=0)  # [BK, BN]
        q = (packed >> ((offs_k % 8) * 4)[:, None]) & 0xF  # [BK, BN] int32 in 0..15 (& drops the sign bits)
        if GROUP_SIZE % BLOCK_K == 0:  # the tile lies inside one group: one row of scales and zeros
            meta = ((t * BLOCK_K) // GROUP_SIZE) * N + offs_n[None, :]  # [1, BN]
            meta_ok = n_ok[None, :]
        else:  # groups smaller than the tile, or not aligned to it: each K row looks up its group
            meta = (offs_k // GROUP_SIZE)[:, None] * N + offs_n[None, :]  # [BK, BN]
            meta_ok = kn_ok
        s = tl.load(scales_ptr + meta, mask=meta_ok, other=0.0).to(tl.float32)
        z = tl.load(zeros_ptr + meta, mask=meta_ok, other=0.0).to(tl.float32)
        w = ((q.to(tl.float32) - z) * s).to(x_ptr.dtype.element_ty)  # [BK, BN]; masked entries are 0
        acc = tl.dot(x, w, acc, input_precision=DOT_PREC)
    _store_tile(acc, out_ptr, bias_ptr, offs_m, offs_n, M, N, pid_k, HAS_BIAS, SPLIT_K)


@triton.jit
def _w8a16_kernel(
    x_ptr,  # [M, K], K contiguous, rows stride_xm apart
    w_ptr,  # [N, K] int8, K contiguous, rows stride_wn apart
    scales_ptr,  # [N] per output channel
    bias_ptr,  # [N]
    out_ptr,  # [M, N] or [SPLIT_K, M, N] fp32 (see _store_tile)
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm  # [BM, 1]
    w_cols = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn  # [1, BN]: the tile is read as W^T
    begin, end = _k_tile_range(K, pid_k, BLOCK_K, SPLIT_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for t in range(begin, end):
        offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)  # [BK]
        k_ok = offs_k < K
        x = tl.load(x_rows + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
        w = tl.load(w_cols + offs_k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0)  # [BK, BN] int8
        acc = tl.dot(x, w.to(x_ptr.dtype.element_ty), acc, input_precision=DOT_PREC)  # int8 -> float: exact
    acc *= tl.load(scales_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    _store_tile(acc, out_ptr, bias_ptr, offs_m, offs_n, M, N, pid_k, HAS_BIAS, SPLIT_K)


@triton.jit
def _split_k_reduce_kernel(
    partial_ptr,  # [SPLIT_K, M, N] fp32, contiguous
    bias_ptr,  # [N]
    out_ptr,  # [M, N] contiguous
    total,  # M * N
    N,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):  # a fixed order: the result does not depend on scheduling
        acc += tl.load(partial_ptr + s * total + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------
# Launch plan


@dataclass(frozen=True, slots=True)
class GemmConfig:
    """Tile sizes and launch parameters of the Triton GEMMs. block_* are powers of two >= 16 (tl.dot)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            assert v >= 16 and v & (v - 1) == 0, f"{name} = {v}: a power of two >= 16"
        assert self.split_k >= 1 and self.group_m >= 1, self


@functools.cache
def _device_limits(device: torch.device) -> tuple[int, int]:
    """(streaming multiprocessors, shared memory a block may use in bytes) of `device`."""
    if device.type != "cuda":
        return _INTERPRETER_SMS, 1 << 30
    props = torch.cuda.get_device_properties(device)
    smem = getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024
    return props.multi_processor_count, smem


def _cuda_index(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def pick_config(M: int, N: int, K: int, device: torch.device, x_bytes: int = 2, w_tile_bytes: int = 4) -> GemmConfig:
    """The launch plan for an [M, K] x [K, N] GEMM on `device` (a function of the shapes only).

    w_tile_bytes: bytes per weight-tile element as loaded (4: int32 words of the 4-bit kernel, read once per
    K row; 1: int8); with x_bytes it bounds the pipeline depth by the GPU's shared memory."""
    sms, smem = _device_limits(_cuda_index(device))
    if M <= 16:  # decode: stream the weights; split K so that ~2 programs run on every SM
        bm, bn, bk, warps, stages, max_split, target = 16, 64, 128, 4, 4, 16, 2 * sms
    elif M <= 64:
        bm, bn, bk, warps, stages, max_split, target = (32 if M <= 32 else 64), 64, 64, 4, 3, 4, sms
    else:  # prefill: compute bound, big tiles
        bm, bn, bk, warps, stages, max_split, target = (64 if M <= 128 else 128), 128, 64, 4, 3, 1, 0
        warps = 8 if bm == 128 else 4
    bn = min(bn, max(16, triton.next_power_of_2(N)))
    bk = min(bk, max(16, triton.next_power_of_2(K)))
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    max_split = min(max_split, triton.cdiv(K, bk))
    split = 1
    while split * 2 <= max_split and tiles * split < target:
        split *= 2
    per_stage = bm * bk * x_bytes + bk * bn * w_tile_bytes
    spare = bk * bn * x_bytes + 8 * 1024  # the dequantized tile's layout conversion, the epilogue
    while stages > 2 and stages * per_stage + spare > smem:
        stages -= 1
    return GemmConfig(bm, bn, bk, split, 8, warps, stages)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # no TF32 rounding for fp32 inputs (as triton_attention)


def _rows(x: torch.Tensor, K: int) -> torch.Tensor:
    """x [..., K] as [M, K] with K contiguous."""
    assert x.dtype in _FLOAT_DTYPES, f"activations must be fp32/fp16/bf16, got {x.dtype}"
    assert x.shape[-1] == K, f"x has {x.shape[-1]} features, the weight {K}"
    x2 = x.reshape(-1, K)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _check_bias(bias: torch.Tensor | None, N: int, x: torch.Tensor) -> torch.Tensor | None:
    if bias is None:
        return None
    assert bias.shape == (N,), f"bias: shape {tuple(bias.shape)}, expected ({N},)"
    assert bias.device == x.device and bias.is_floating_point(), (bias.device, bias.dtype)
    return bias.contiguous()


def _launch(kernel, x2, weight_args, bias, N, K, config, w_tile_bytes, extra_args=(), **constexprs) -> torch.Tensor:
    """Run `kernel` over the output tiles (and K splits), then the split-K reduction if any. -> [M, N]."""
    M = x2.shape[0]
    out = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    if M == 0:
        return out
    cfg = config or pick_config(M, N, K, x2.device, x2.element_size(), w_tile_bytes)
    split = cfg.split_k
    partial = out if split == 1 else torch.empty((split, M, N), dtype=torch.float32, device=x2.device)
    bias_arg = bias if bias is not None else out  # never read without HAS_BIAS
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n), split)
    for stages in range(cfg.num_stages, 0, -1):  # pick_config's shared-memory estimate is an estimate
        try:
            kernel[grid](
                x2,
                *weight_args,
                bias_arg,
                partial,
                M,
                N,
                K,
                x2.stride(0),
                *extra_args,
                **constexprs,
                HAS_BIAS=bias is not None,
                BLOCK_M=cfg.block_m,
                BLOCK_N=cfg.block_n,
                BLOCK_K=cfg.block_k,
                SPLIT_K=split,
                GROUP_M=cfg.group_m,
                DOT_PREC=_dot_precision(x2.dtype),
                num_warps=cfg.num_warps,
                num_stages=stages,
            )
            break
        except triton.OutOfResources:  # raised when compiling, before anything runs
            if stages == 1:
                raise
    if split > 1:
        _split_k_reduce_kernel[(triton.cdiv(M * N, _REDUCE_BLOCK),)](
            partial,
            bias_arg,
            out,
            M * N,
            N,
            HAS_BIAS=bias is not None,
            SPLIT_K=split,
            BLOCK=_REDUCE_BLOCK,
            num_warps=4,
        )
    return out


# ---------------------------------------------------------------------------------------------------------
# W4A16


def w4a16_linear(
    x: torch.Tensor,  # [..., K] fp32 / fp16 / bf16
    qweight: torch.Tensor,  # [K // 8, N] int32, GPTQ packing (module docstring)
    scales: torch.Tensor,  # [K // group_size, N] float
    zeros: torch.Tensor,  # [K // group_size, N] float zero points
    group_size: int,
    bias: torch.Tensor | None = None,  # [N]
    config: GemmConfig | None = None,  # None: pick_config
) -> torch.Tensor:  # [..., N] in x's dtype
    """x @ dequantize_w4(qweight, scales, zeros, group_size) (+ bias), dequantizing tile by tile in the kernel."""
    assert qweight.dtype == torch.int32 and qweight.dim() == 2, f"qweight: int32 [K // 8, N], got {qweight.dtype}"
    K, N = qweight.shape[0] * 8, qweight.shape[1]
    assert group_size > 0 and K % group_size == 0, f"group_size {group_size} must divide K = {K}"
    groups = K // group_size
    assert scales.shape == (groups, N) and zeros.shape == (groups, N), (
        f"scales {tuple(scales.shape)} / zeros {tuple(zeros.shape)}: expected ({groups}, {N})"
    )
    assert scales.is_floating_point() and zeros.is_floating_point(), (scales.dtype, zeros.dtype)
    x2 = _rows(x, K)
    out = _launch(
        _w4a16_kernel,
        x2,
        (qweight.contiguous(), scales.contiguous(), zeros.contiguous()),
        _check_bias(bias, N, x),
        N,
        K,
        config,
        w_tile_bytes=4,
        GROUP_SIZE=group_size,
    )
    return out.reshape(*x.shape[:-1], N)


def dequantize_w4(
    qweight: torch.Tensor,  # [K // 8, N] int32
    scales: torch.Tensor,  # [K // group_size, N]
    zeros: torch.Tensor,  # [K // group_size, N]
    group_size: int,
    dtype: torch.dtype | None = None,  # default: scales' dtype
) -> torch.Tensor:  # [K, N]
    """The dense weight, in pure torch: (q - zeros) * scales computed in fp32, then rounded to `dtype` (the
    same values the kernel feeds its dot product)."""
    K, N = qweight.shape[0] * 8, qweight.shape[1]
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=qweight.device)  # nibble j at bits 4j..4j+3
    q = ((qweight.unsqueeze(1) >> shifts[None, :, None]) & 0xF).reshape(K, N)  # [K // 8, 8, N] -> [K, N]
    group = torch.arange(K, device=qweight.device) // group_size
    w = (q.float() - zeros.float()[group]) * scales.float()[group]
    return w.to(dtype or scales.dtype)


def pack_w4(q: torch.Tensor) -> torch.Tensor:
    """q [K, N] integers in 0..15 (K a multiple of 8) -> qweight [K // 8, N] int32 in GPTQ's packing."""
    K, N = q.shape
    assert K % 8 == 0, f"K = {K} must be a multiple of 8"
    q64 = q.to(torch.int64)
    assert bool(((q64 >= 0) & (q64 <= 15)).all()), "values must lie in 0..15"
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=q.device)
    words = (q64.reshape(K // 8, 8, N) << shifts[None, :, None]).sum(dim=1)  # [K // 8, N], 0 .. 2**32 - 1
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # the same bits, as int32


# ---------------------------------------------------------------------------------------------------------
# W8A16


def w8a16_linear(
    x: torch.Tensor,  # [..., K] fp32 / fp16 / bf16
    w_int8: torch.Tensor,  # [N, K] int8
    scales: torch.Tensor,  # [N] float32, symmetric per output channel
    bias: torch.Tensor | None = None,  # [N]
    config: GemmConfig | None = None,  # None: pick_config
) -> torch.Tensor:  # [..., N] in x's dtype
    """x @ (w_int8 * scales[:, None]).T (+ bias)."""
    assert w_int8.dtype == torch.int8 and w_int8.dim() == 2, f"w_int8: int8 [N, K], got {w_int8.dtype}"
    N, K = w_int8.shape
    assert scales.shape == (N,) and scales.is_floating_point(), f"scales: [{N}] float, got {tuple(scales.shape)}"
    if w_int8.stride(1) != 1:
        w_int8 = w_int8.contiguous()
    x2 = _rows(x, K)
    out = _launch(
        _w8a16_kernel,
        x2,
        (w_int8, scales.contiguous()),
        _check_bias(bias, N, x),
        N,
        K,
        config,
        w_tile_bytes=1,
        extra_args=(w_int8.stride(0),),
    )
    return out.reshape(*x.shape[:-1], N)


# ---------------------------------------------------------------------------------------------------------
# W8A8 int8, dynamic per-token activation scales


def quantize_int8_per_token(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (int8 [M, K], scales [M] float32), x ~= int8 * scales[:, None] (symmetric, max |x| / 127)."""
    xf = x2d.float()
    scales = xf.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    return torch.round(xf / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


def _int_mm_cuda(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a [M, K] int8 @ w [N, K]^T int8 -> [M, N] int32 through torch._int_mm, meeting its CUDA limits
    (M > 16, K and N multiples of 8; the caller checks K and N): up to 16 rows are padded with zero rows."""
    M, K = a.shape
    if M <= 16:
        padded = a.new_zeros((_INT_MM_PAD_ROWS, K))
        padded[:M] = a
        a = padded
    return torch._int_mm(a, w.t())[:M]


def _int8_matmul(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a [M, K] int8 @ w [N, K]^T int8 -> [M, N] int32, exact."""
    K, N = a.shape[1], w.shape[0]
    if a.device.type == "cuda" and K % 8 == 0 and N % 8 == 0:
        return _int_mm_cuda(a, w)
    if a.device.type == "cpu":
        return torch._int_mm(a, w.t())  # oneDNN; no shape limits on CPU
    # Any other case (a CUDA layer with K or N not a multiple of 8): int8 products summed in float64 are
    # exact while |sum| < 2**53, i.e. for K < 2**53 / 127**2: the same result, more slowly.
    return (a.double() @ w.double().t()).to(torch.int32)


def int8_dynamic_linear(
    x: torch.Tensor,  # [..., K] fp32 / fp16 / bf16
    w_int8: torch.Tensor,  # [N, K] int8
    w_scales: torch.Tensor,  # [N] float32, symmetric per output channel
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:  # [..., N] in x's dtype
    """W8A8: each row of x quantized to int8 with its own scale, an exact int32 GEMM, rescaled in fp32:
    out[m, n] = (sum_k xq[m, k] * w[n, k]) * x_scale[m] * w_scale[n] (+ bias)."""
    assert w_int8.dtype == torch.int8 and w_int8.dim() == 2, f"w_int8: int8 [N, K], got {w_int8.dtype}"
    N, K = w_int8.shape
    assert w_scales.shape == (N,), f"w_scales: [{N}], got {tuple(w_scales.shape)}"
    x2 = _rows(x, K)
    bias = _check_bias(bias, N, x)
    x_q, x_scales = quantize_int8_per_token(x2)
    acc = _int8_matmul(x_q, w_int8)  # [M, N] int32
    out = acc.float() * (x_scales[:, None] * w_scales.float()[None, :])
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], N)


# ---------------------------------------------------------------------------------------------------------
# FP8 (e4m3) through torch._scaled_mm


def fp8_supported(device: torch.device | str) -> tuple[bool, str]:
    """Whether fp8_linear runs on `device`, and why (not)."""
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"fp8 GEMMs need a CUDA GPU of compute capability 8.9+, not {device.type} (dequantize instead)"
    if not torch.cuda.is_available():
        return False, "CUDA is not available"
    if torch.version.hip:
        return False, "ROCm GPUs use float8_e4m3fnuz, which this path does not handle"
    if not hasattr(torch, "_scaled_mm"):
        return False, f"torch {torch.__version__} has no torch._scaled_mm"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return False, f"compute capability {major}.{minor} < 8.9: no fp8 tensor cores (Ada, Hopper and later have them)"
    return True, f"compute capability {major}.{minor}"


def _rowwise_supported(device: torch.device) -> bool:
    """torch._scaled_mm with per-row x per-column scales: used on Hopper (sm90), where torch has row-wise
    kernels (CUTLASS, or cuBLAS 12.9+); Ada and the Blackwell variants get tensor-wise scaling by default."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def quantize_fp8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (float8_e4m3fn [N, K], scales [N] float32), w ~= w_fp8 * scales[:, None] (max |w| -> 448)."""
    wf = w.float()
    scales = wf.abs().amax(dim=1).clamp(min=1e-12) / FP8_MAX
    return (wf / scales[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scales


def quantize_fp8_per_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (float8_e4m3fn like x, scale: 0-dim float32), x ~= x_fp8 * scale."""
    xf = x.float()
    scale = xf.abs().amax().clamp(min=1e-12) / FP8_MAX
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def quantize_fp8_per_token(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (float8_e4m3fn [M, K], scales [M, 1] float32), one scale per row."""
    xf = x2d.float()
    scales = xf.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return (xf / scales).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scales


def fp8_linear(
    x: torch.Tensor,  # [..., K] fp32 / fp16 / bf16
    w_fp8: torch.Tensor,  # [N, K] float8_e4m3fn
    w_scale: torch.Tensor,  # per tensor (one element) or per output channel [N], float32
    bias: torch.Tensor | None = None,  # [N]
    per_token: bool | None = None,  # activation scales per row; None: where the GPU has row-wise fp8 GEMMs
) -> torch.Tensor:  # [..., N] in x's dtype
    """x @ (w_fp8 * w_scale).T (+ bias) with x quantized to e4m3 on the fly (dynamic scales)."""
    ok, reason = fp8_supported(x.device)
    if not ok:
        raise RuntimeError(f"fp8_linear: {reason}")
    if per_token is None:
        per_token = x.dtype != torch.float32 and _rowwise_supported(x.device)
    return _fp8_linear(x, w_fp8, w_scale, bias, per_token)


def _fp8_linear(x, w_fp8, w_scale, bias, per_token: bool) -> torch.Tensor:
    """fp8_linear on any device torch._scaled_mm runs on (also CPU, which the tests use)."""
    assert w_fp8.dtype == FP8_DTYPE and w_fp8.dim() == 2, f"w_fp8: float8_e4m3fn [N, K], got {w_fp8.dtype}"
    N, K = w_fp8.shape
    assert K % 16 == 0 and N % 16 == 0, f"torch._scaled_mm needs K and N multiples of 16, got K={K}, N={N}"
    w_scale = w_scale.float().reshape(-1)
    assert w_scale.numel() in (1, N), f"w_scale: one scale or [{N}], got {w_scale.numel()}"
    x2 = _rows(x, K)
    bias = _check_bias(bias, N, x)
    M = x2.shape[0]
    if M == 0:
        return x.new_empty(*x.shape[:-1], N)
    if M < _FP8_MIN_ROWS:  # cuBLASLt's fp8 GEMMs are slow for <= 16 rows (vLLM pads too); zero rows change no scale
        x2 = torch.cat([x2, x2.new_zeros((_FP8_MIN_ROWS - M, K))])
    w_t = w_fp8.t()  # [K, N] column-major, as _scaled_mm wants its second operand
    if w_t.stride(0) != 1:
        w_t = w_fp8.contiguous().t()
    if per_token:  # row-wise scaling: scale_a [M, 1], scale_b [1, N]; fp16 / bf16 output only
        assert x.dtype in (torch.float16, torch.bfloat16), f"per-token fp8 scaling outputs fp16/bf16, not {x.dtype}"
        x_fp8, x_scales = quantize_fp8_per_token(x2)
        scale_b = w_scale.expand(N).reshape(1, N).contiguous()
        out = torch._scaled_mm(x_fp8, w_t, scale_a=x_scales, scale_b=scale_b, out_dtype=x.dtype)[:M]
        if bias is not None:
            out = (out.float() + bias.float()).to(x.dtype)
    else:  # tensor-wise: one activation scale; a per-channel weight scale is applied to the fp32 output
        x_fp8, x_scale = quantize_fp8_per_tensor(x2)
        if w_scale.numel() == 1:
            scale_b = w_scale.reshape(())
        else:
            scale_b = torch.ones((), dtype=torch.float32, device=x.device)
        out = torch._scaled_mm(x_fp8, w_t, scale_a=x_scale, scale_b=scale_b, out_dtype=torch.float32)[:M]
        if w_scale.numel() != 1:
            out *= w_scale[None, :]
        if bias is not None:
            out += bias.float()
        out = out.to(x.dtype)
    return out.reshape(*x.shape[:-1], N)
