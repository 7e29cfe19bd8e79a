"""Quantized-weight GEMMs (shard/kernels/triton_quant.py) against float references.

Without CUDA the Triton kernels run under the interpreter (TRITON_INTERPRET=1, set before triton is
imported) in fp32 and fp16 (the interpreter's bf16 dot product is broken, so bf16 runs on CUDA only);
shapes are small so that the module takes ~15 s on 2 CPU cores. The references are computed in fp32 from
the same rounded inputs: `x @ dequantize_w4(...)` with the weight rounded to x's dtype as the kernel does,
so fp32 agrees to summation order and fp16 to the rounding of the output. The int8 and fp8 paths are
plain torch (torch._int_mm, torch._scaled_mm both run on CPU) and are checked against exact emulations.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# triton is a dependency: without it these tests fail rather than skip.
import triton  # noqa: F401, E402

from shard.kernels import triton_quant as tq  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# Relative tolerance: fp32 differs from the reference by summation order only (on CUDA, tensor cores
# and split-K partial sums); fp16 / bf16 outputs are rounded once to 11 / 8 significant bits, so allow
# two units in the last place. The absolute part covers outputs near zero.
RTOL = {torch.float32: 1e-5 if DEVICE == "cpu" else 1e-4, torch.float16: 2**-10, torch.bfloat16: 2**-7}
N = 48  # not a multiple of 32: the last N tile is masked


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def assert_matches(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """out (in dtype) against an fp32 reference: |out - ref| <= rtol * |ref| + 1e-4 * max |ref|."""
    assert out.dtype == dtype and out.shape == ref.shape, (out.dtype, out.shape, ref.shape)
    torch.testing.assert_close(out.float(), ref, rtol=RTOL[dtype], atol=1e-4 * ref.abs().max().item())


def make_w4(K: int, n: int, group_size: int, dtype: torch.dtype, device=DEVICE):
    """Random 4-bit weights: q [K, n] in 0..15, qweight packed, scales in [0.005, 0.02], float zeros in [0, 15]."""
    q = torch.randint(0, 16, (K, n), dtype=torch.uint8, device=device)
    scales = (torch.rand(K // group_size, n, device=device) * 0.015 + 0.005).to(dtype)
    zeros = (torch.rand(K // group_size, n, device=device) * 15).to(dtype)
    return q, tq.pack_w4(q), scales, zeros


def loop_pack(q: torch.Tensor) -> torch.Tensor:
    """GPTQ packing spelled out: word (r, n) = sum_j q[8r + j, n] << 4j, stored as a signed int32."""
    K, n = q.shape
    words = torch.empty(K // 8, n, dtype=torch.int32)
    for r in range(K // 8):
        for c in range(n):
            word = sum(int(q[8 * r + j, c]) << (4 * j) for j in range(8))
            words[r, c] = word - 2**32 if word >= 2**31 else word
    return words


def loop_dequantize(qweight, scales, zeros, group_size) -> torch.Tensor:
    """w[k, n] = (nibble k % 8 of word (k // 8, n) - zero) * scale, element by element in float64."""
    K, n = qweight.shape[0] * 8, qweight.shape[1]
    w = torch.empty(K, n, dtype=torch.float64)
    for k in range(K):
        for c in range(n):
            word = int(qweight[k // 8, c]) & 0xFFFFFFFF
            nibble = (word >> (4 * (k % 8))) & 0xF
            g = k // group_size
            w[k, c] = (nibble - float(zeros[g, c])) * float(scales[g, c])
    return w


# ---------------------------------------------------------------------------------------------------------
# pack / dequantize references


def test_pack_w4_matches_the_packing_spelled_out():
    q = torch.randint(0, 16, (24, 5), dtype=torch.uint8)
    q[7, 0] = 15  # nibble 7 >= 8: the word's sign bit is set
    packed = tq.pack_w4(q)
    assert packed.dtype == torch.int32 and packed.shape == (3, 5)
    assert torch.equal(packed, loop_pack(q))
    assert packed[0, 0] < 0


def test_dequantize_w4_matches_a_loop():
    K, n, G = 32, 3, 8
    q = torch.randint(0, 16, (K, n), dtype=torch.uint8)
    qweight = loop_pack(q)  # independent of pack_w4
    scales = torch.rand(K // G, n) * 0.1 + 0.01
    zeros = torch.rand(K // G, n) * 15
    w = tq.dequantize_w4(qweight, scales, zeros, G)
    assert w.dtype == torch.float32 and w.shape == (K, n)
    torch.testing.assert_close(w.double(), loop_dequantize(qweight, scales, zeros, G), rtol=1e-6, atol=1e-7)
    # rounded to another dtype: the fp32 values rounded once
    w16 = tq.dequantize_w4(qweight, scales.half(), zeros.half(), G, dtype=torch.bfloat16)
    assert w16.dtype == torch.bfloat16
    assert torch.equal(w16, tq.dequantize_w4(qweight, scales.half().float(), zeros.half().float(), G).bfloat16())


# ---------------------------------------------------------------------------------------------------------
# W4A16 Triton kernel

W4_SHAPES = [(64, 32), (64, 64), (256, 32), (256, 64), (256, 256)]  # (K, group_size); group_size == K: per channel


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K,group_size", W4_SHAPES, ids=[f"K{k}-g{g}" for k, g in W4_SHAPES])
@pytest.mark.parametrize("M", [1, 5, 33])
def test_w4a16_linear(M, K, group_size, dtype):
    _, qweight, scales, zeros = make_w4(K, N, group_size, dtype)
    x = torch.randn(M, K, device=DEVICE).to(dtype)
    bias = torch.randn(N, device=DEVICE).to(dtype) if M != 5 else None
    out = tq.w4a16_linear(x, qweight, scales, zeros, group_size, bias)
    ref = x.float() @ tq.dequantize_w4(qweight, scales, zeros, group_size, dtype).float()
    if bias is not None:
        ref += bias.float()
    assert_matches(out, ref, dtype)


# (M, K, group_size, n, config): each forces one corner of the kernel
W4_CORNERS = {
    # K not a multiple of the tile: the last K tile is masked; groups smaller than the tile
    "k-tail": (3, 96, 32, N, tq.GemmConfig(16, 64, 64)),
    # per-channel group (== K) that is not a multiple of the tile: looked up per K row
    "per-channel-unaligned": (3, 96, 96, N, tq.GemmConfig(16, 64, 64)),
    # groups of 32 inside a 128-wide K tile
    "groups-inside-tile": (2, 256, 32, N, tq.GemmConfig(16, 32, 128)),
    # 8 K tiles in 3 splits (3 + 3 + 2): uneven ranges
    "uneven-split": (4, 256, 64, N, tq.GemmConfig(16, 64, 32, split_k=3)),
    # more splits than K tiles: the empty splits must write zeros
    "empty-splits": (1, 64, 32, N, tq.GemmConfig(16, 64, 32, split_k=4)),
    # several M and N tiles, grouped tile order, masked edges on both
    "many-tiles": (40, 64, 64, 200, tq.GemmConfig(16, 64, 32, group_m=2)),
    # several M and N tiles with split-K
    "many-tiles-split": (20, 128, 32, 100, tq.GemmConfig(16, 32, 32, split_k=2, group_m=1)),
}


@pytest.mark.parametrize("case", W4_CORNERS)
def test_w4a16_tiling_corners(case):
    M, K, group_size, n, config = W4_CORNERS[case]
    _, qweight, scales, zeros = make_w4(K, n, group_size, torch.float32)
    x = torch.randn(M, K, device=DEVICE)
    bias = torch.randn(n, device=DEVICE)
    out = tq.w4a16_linear(x, qweight, scales, zeros, group_size, bias, config=config)
    ref = x @ tq.dequantize_w4(qweight, scales, zeros, group_size) + bias
    assert_matches(out, ref, torch.float32)


def test_w4a16_leading_dims_and_strided_rows():
    K, G = 64, 32
    _, qweight, scales, zeros = make_w4(K, N, G, torch.float32)
    x = torch.randn(2, 3, K + 8, device=DEVICE)[..., :K]  # rows K + 8 apart
    out = tq.w4a16_linear(x, qweight, scales, zeros, G)
    assert out.shape == (2, 3, N)
    ref = x.reshape(-1, K) @ tq.dequantize_w4(qweight, scales, zeros, G)
    assert_matches(out.reshape(-1, N), ref, torch.float32)
    empty = tq.w4a16_linear(x[:0], qweight, scales, zeros, G)
    assert empty.shape == (0, 3, N)


def test_w4a16_rejects_bad_inputs():
    K, G = 64, 32
    _, qweight, scales, zeros = make_w4(K, N, G, torch.float32)
    x = torch.randn(2, K, device=DEVICE)
    with pytest.raises(AssertionError):  # group size does not divide K
        tq.w4a16_linear(x, qweight, scales, zeros, 48)
    with pytest.raises(AssertionError):  # scales for another group size
        tq.w4a16_linear(x, qweight, scales, zeros, 64)
    with pytest.raises(AssertionError):  # K mismatch
        tq.w4a16_linear(x[:, :56], qweight, scales, zeros, G)
    with pytest.raises(AssertionError):  # weights not packed in int32
        tq.w4a16_linear(x, qweight.to(torch.int64), scales, zeros, G)
    with pytest.raises(AssertionError):  # bias of the wrong size
        tq.w4a16_linear(x, qweight, scales, zeros, G, torch.zeros(N + 1, device=DEVICE))


# ---------------------------------------------------------------------------------------------------------
# W8A16 Triton kernel


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K", [64, 256])
@pytest.mark.parametrize("M", [1, 5, 33])
def test_w8a16_linear(M, K, dtype):
    # the weight as a view with rows K + 16 apart: the kernel reads it through its row stride
    w_int8 = torch.randint(-127, 128, (N, K + 16), dtype=torch.int8, device=DEVICE)[:, :K]
    scales = torch.rand(N, device=DEVICE) * 0.01 + 0.001
    x = torch.randn(M, K, device=DEVICE).to(dtype)
    bias = torch.randn(N, device=DEVICE).to(dtype) if M != 5 else None
    out = tq.w8a16_linear(x, w_int8, scales, bias)
    ref = x.float() @ (w_int8.float() * scales[:, None]).t()
    if bias is not None:
        ref += bias.float()
    assert_matches(out, ref, dtype)


def test_w8a16_split_k_and_many_tiles():
    M, K, n = 20, 160, 100  # K tail (160 = 5 x 32), 3 splits of 2 + 2 + 1 tiles
    w_int8 = torch.randint(-127, 128, (n, K), dtype=torch.int8, device=DEVICE)
    scales = torch.rand(n, device=DEVICE) * 0.01
    x = torch.randn(2, M // 2, K, device=DEVICE)
    bias = torch.randn(n, device=DEVICE)
    out = tq.w8a16_linear(x, w_int8, scales, bias, config=tq.GemmConfig(16, 32, 32, split_k=3, group_m=2))
    assert out.shape == (2, M // 2, n)
    ref = x.reshape(M, K) @ (w_int8.float() * scales[:, None]).t() + bias
    assert_matches(out.reshape(M, n), ref, torch.float32)


# ---------------------------------------------------------------------------------------------------------
# Launch plan


def test_pick_config_by_regime(monkeypatch):
    monkeypatch.setattr(tq, "_device_limits", lambda device: (132, 227 * 1024))  # an H100 / H200
    cpu = torch.device("cpu")
    decode = tq.pick_config(1, 4096, 4096, cpu)
    assert (decode.block_m, decode.split_k) == (16, 8)  # 64 N tiles x 8 splits: >= 2 programs per SM
    assert tq.pick_config(16, 11008, 4096, cpu).split_k == 2  # 172 x 2
    assert tq.pick_config(1, 4096, 128, cpu).split_k == 1  # never more splits than K tiles
    mid = tq.pick_config(48, 4096, 4096, cpu)
    assert (mid.block_m, mid.split_k) == (64, 4)  # 64 tiles of 64 x 64 would leave half the SMs idle
    assert tq.pick_config(48, 11008, 4096, cpu).split_k == 1  # 172 tiles fill them
    prefill = tq.pick_config(256, 4096, 4096, cpu)
    assert (prefill.block_m, prefill.block_n, prefill.split_k, prefill.num_warps) == (128, 128, 1, 8)
    small = tq.pick_config(3, 48, 40, cpu)
    assert (small.block_n, small.block_k) == (64, 64)  # tiles shrink to the (power-of-two padded) matrix
    monkeypatch.setattr(tq, "_device_limits", lambda device: (128, 99 * 1024))  # an Ada GPU: less shared memory
    assert tq.pick_config(1, 4096, 4096, cpu).num_stages == 2
    with pytest.raises(AssertionError):
        tq.GemmConfig(16, 48, 32)  # not a power of two


# ---------------------------------------------------------------------------------------------------------
# W8A8 int8 dynamic (torch._int_mm)


def exact_int8_dynamic(x2d, w_int8, w_scales, bias):
    """The same quantized activations, the integer GEMM in float64 (exact: |sums| <= 127**2 * K < 2**53, and
    it runs on CUDA, unlike int64 matmuls), the rescale in fp32."""
    x_q, x_scales = tq.quantize_int8_per_token(x2d)
    acc = (x_q.double() @ w_int8.double().t()).float()
    out = acc * (x_scales[:, None] * w_scales[None, :])
    return out + bias.float() if bias is not None else out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M", [1, 5, 33])
def test_int8_dynamic_linear(M, dtype):
    K = 256
    w = torch.randn(N, K)
    w_scales = w.abs().amax(dim=1) / 127
    w_int8 = torch.round(w / w_scales[:, None]).to(torch.int8)
    x = torch.randn(M, K).to(dtype)
    bias = torch.randn(N).to(dtype) if M != 5 else None
    on_device = [None if t is None else t.to(DEVICE) for t in (x, w_int8, w_scales, bias)]
    out = tq.int8_dynamic_linear(*on_device).cpu()
    assert_matches(out, exact_int8_dynamic(x, w_int8, w_scales, bias), dtype)
    # and close to the unquantized product: 8-bit rounding of both operands, ~1% of the output's norm
    ref = x.float() @ w.t() + (bias.float() if bias is not None else 0)
    assert ((out.float() - ref).norm() / ref.norm()).item() < 0.03


def test_quantize_int8_per_token():
    x = torch.randn(4, 64) * torch.tensor([[1.0], [100.0], [1e-3], [0.0]])
    x_q, scales = tq.quantize_int8_per_token(x)
    assert x_q.dtype == torch.int8 and scales.shape == (4,)
    assert torch.equal(x_q[:3].abs().amax(dim=1), torch.full((3,), 127, dtype=torch.int8))  # max |x| -> 127
    assert torch.equal(x_q[3], torch.zeros(64, dtype=torch.int8))  # an all-zero row stays zero
    assert ((x_q.float() * scales[:, None] - x).abs() <= scales[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("M", [1, 16, 17, 40])
def test_int_mm_cuda_pads_small_batches(M, monkeypatch):
    """_int_mm_cuda meets torch._int_mm's CUDA limits (checked by a stand-in here) for any M."""

    def cuda_int_mm(a, b):
        assert a.shape[0] > 16, f"self.size(0) needs to be greater than 16, but got {a.shape[0]}"
        assert a.shape[1] % 8 == 0 and b.shape[1] % 8 == 0
        assert a.dtype == b.dtype == torch.int8
        return (a.long() @ b.long()).to(torch.int32)

    monkeypatch.setattr(torch, "_int_mm", cuda_int_mm)
    a = torch.randint(-127, 128, (M, 32), dtype=torch.int8)
    w = torch.randint(-127, 128, (24, 32), dtype=torch.int8)
    out = tq._int_mm_cuda(a, w)
    assert out.shape == (M, 24) and torch.equal(out, (a.long() @ w.long().t()).int())


# ---------------------------------------------------------------------------------------------------------
# FP8 (torch._scaled_mm runs on CPU too; fp8_linear itself refuses devices without fp8 tensor cores)


def test_quantize_fp8_per_channel():
    w = torch.randn(32, 64) * torch.logspace(-3, 2, 32)[:, None]
    w_fp8, scales = tq.quantize_fp8_per_channel(w)
    assert w_fp8.dtype == torch.float8_e4m3fn and scales.shape == (32,) and scales.dtype == torch.float32
    assert torch.equal(w_fp8.float().abs().amax(dim=1), torch.full((32,), 448.0))  # each row's max -> 448
    # e4m3 keeps 3 mantissa bits: relative rounding error <= 2**-4 for normal values (>= 2**-6 * scale)
    back = w_fp8.float() * scales[:, None]
    normal = (w / scales[:, None]).abs() >= 2**-6
    assert ((back - w).abs() <= 2**-4 * w.abs() + 1e-12)[normal].all()


def test_fp8_supported_and_refused_on_cpu():
    ok, reason = tq.fp8_supported("cpu")
    assert not ok and "CUDA" in reason
    w_fp8, scales = tq.quantize_fp8_per_channel(torch.randn(32, 64))
    if DEVICE == "cpu":
        with pytest.raises(RuntimeError, match="8.9"):
            tq.fp8_linear(torch.randn(2, 64), w_fp8, scales)


def strict_scaled_mm(real):
    """torch._scaled_mm, checking first the operand layouts and scale shapes its CUDA kernels require."""

    def scaled_mm(a, b, scale_a, scale_b, bias=None, scale_result=None, out_dtype=None, use_fast_accum=False):
        assert a.dtype == b.dtype == torch.float8_e4m3fn
        assert a.stride(1) == 1 and b.stride(0) == 1, "mat1 row-major, mat2 column-major"
        assert a.shape[1] % 16 == 0 and b.shape[0] % 16 == 0 and b.shape[1] % 16 == 0
        assert scale_a.dtype == scale_b.dtype == torch.float32
        if scale_a.numel() != 1 or scale_b.numel() != 1:  # row-wise
            assert scale_a.shape == (a.shape[0], 1) and scale_b.shape == (1, b.shape[1]), (scale_a.shape, scale_b.shape)
            assert scale_a.is_contiguous() and scale_b.is_contiguous()
            assert out_dtype in (torch.bfloat16, torch.float16)
        return real(a, b, scale_a, scale_b, bias=bias, scale_result=scale_result, out_dtype=out_dtype)

    return scaled_mm


# (x dtype, per-token activation scales); row-wise scaling outputs fp16 / bf16 only
FP8_MODES = [(torch.bfloat16, True), (torch.float16, True), (torch.bfloat16, False), (torch.float32, False)]


@pytest.mark.parametrize("per_channel", [True, False], ids=["w-per-channel", "w-per-tensor"])
@pytest.mark.parametrize("dtype,per_token", FP8_MODES, ids=[f"{d}-{'token' if t else 'tensor'}" for d, t in FP8_MODES])
@pytest.mark.parametrize("rows", [5, 20])  # 2 x 5 rows are padded to 17 for the GEMM, 2 x 20 are not
def test_fp8_linear_plumbing_on_cpu(rows, dtype, per_token, per_channel, monkeypatch):
    monkeypatch.setattr(torch, "_scaled_mm", strict_scaled_mm(torch._scaled_mm))
    K = 64
    w = torch.randn(N, K)
    if per_channel:
        w_fp8, w_scale = tq.quantize_fp8_per_channel(w)
    else:
        w_fp8, w_scale = tq.quantize_fp8_per_tensor(w)
    x = torch.randn(2, rows, K).to(dtype)
    bias = torch.randn(N).to(dtype)
    out = tq._fp8_linear(x, w_fp8, w_scale, bias, per_token)
    assert out.shape == (2, rows, N) and out.dtype == dtype
    x2 = x.reshape(-1, K)
    x_fp8, x_scale = tq.quantize_fp8_per_token(x2) if per_token else tq.quantize_fp8_per_tensor(x2)
    w_deq = w_fp8.float() * (w_scale[:, None] if per_channel else w_scale)
    ref = (x_fp8.float() * x_scale) @ w_deq.t() + bias.float()
    # CPU's row-wise kernel sums in reduced precision (errors of ~2**-9 of the largest output in bf16); a
    # scale applied twice, or to the wrong dimension, would be off by far more
    atol = (2**-8 if dtype == torch.bfloat16 else 1e-4) * ref.abs().max().item()
    assert out.dtype == dtype
    torch.testing.assert_close(out.reshape(-1, N).float(), ref, rtol=RTOL[dtype], atol=atol)
