"""The quantized-weight GEMMs on CUDA at Llama-7B-like shapes (K 4096; N 4096 and 11008; 4-bit groups of
128), in bf16 and fp16, for decode (M 1, 16) and prefill (M 256), against fp32 references on the same
rounded inputs.

Tolerances: the Triton kernels feed the tensor cores exactly the weights the reference multiplies (the
dequantized values rounded to x's dtype, bit for bit) and sum in fp32, so they differ from the reference by
summation order (~sqrt(K) * 2**-24 relative: nothing) and the final rounding to bf16 / fp16, half a unit in
the last place: assert_matches allows two (rtol 2**-7 / 2**-10). int8_dynamic is checked against an exact
emulation (same int8 activations, integer sums exact in float64), so only the fp32 rescale and the output
rounding differ; fp8 against an emulation with the same e4m3 activations, allowing 2**-9 of the largest
output for the accumulation inside cuBLAS's fp8 kernels (fp32, promoted in steps on Hopper). Both are also
checked against the unquantized product, with bounds twice the error that 8-bit rounding of Gaussian data
gives (int8 ~1.2%, e4m3 ~3.7% of the norm).
"""

import pytest
import torch

from shard.kernels import triton_quant as tq
from tests.shard.test_triton_quant import RTOL, assert_matches, exact_int8_dynamic, make_w4

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16]
ROWS = [1, 16, 256]  # decode (split-K), the largest decode tile, prefill
NK = [(4096, 4096), (11008, 4096)]  # (N, K): attention projections, the MLP's gate / up
GROUP = 128


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,K", NK, ids=[f"N{n}-K{k}" for n, k in NK])
@pytest.mark.parametrize("M", ROWS)
def test_w4a16_at_served_shapes(M, N, K, dtype):
    _, qweight, scales, zeros = make_w4(K, N, GROUP, dtype, "cuda")
    x = torch.randn(M, K, device="cuda").to(dtype)
    bias = torch.randn(N, device="cuda").to(dtype)
    out = tq.w4a16_linear(x, qweight, scales, zeros, GROUP, bias)
    ref = x.float() @ tq.dequantize_w4(qweight, scales, zeros, GROUP, dtype).float() + bias.float()
    assert_matches(out, ref, dtype)


@pytest.mark.parametrize("group_size", [32, 64, 4096], ids=["g32", "g64", "per-channel"])
@pytest.mark.parametrize("M", [1, 256])
def test_w4a16_group_sizes(M, group_size):
    N, K, dtype = 4096, 4096, torch.bfloat16
    _, qweight, scales, zeros = make_w4(K, N, group_size, dtype, "cuda")
    x = torch.randn(M, K, device="cuda").to(dtype)
    out = tq.w4a16_linear(x, qweight, scales, zeros, group_size)
    ref = x.float() @ tq.dequantize_w4(qweight, scales, zeros, group_size, dtype).float()
    assert_matches(out, ref, dtype)


def test_w4a16_down_projection_and_odd_sizes():
    """K = 11008 (the MLP's down projection; 86 K tiles of 128, an uneven split) and an N that is not a
    multiple of any tile."""
    dtype = torch.float16
    for M, N, K in [(1, 4096, 11008), (77, 4096, 11008), (5, 1000, 4096)]:
        _, qweight, scales, zeros = make_w4(K, N, GROUP, dtype, "cuda")
        x = torch.randn(M, K, device="cuda").to(dtype)
        out = tq.w4a16_linear(x, qweight, scales, zeros, GROUP)
        ref = x.float() @ tq.dequantize_w4(qweight, scales, zeros, GROUP, dtype).float()
        assert_matches(out, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,K", NK, ids=[f"N{n}-K{k}" for n, k in NK])
@pytest.mark.parametrize("M", ROWS)
def test_w8a16_at_served_shapes(M, N, K, dtype):
    w_int8 = torch.randint(-127, 128, (N, K), dtype=torch.int8, device="cuda")
    scales = torch.rand(N, device="cuda") * 2e-3 + 1e-4
    x = torch.randn(M, K, device="cuda").to(dtype)
    bias = torch.randn(N, device="cuda").to(dtype)
    out = tq.w8a16_linear(x, w_int8, scales, bias)
    ref = x.float() @ (w_int8.float() * scales[:, None]).t() + bias.float()
    assert_matches(out, ref, dtype)


def test_triton_gemms_replay_in_a_cuda_graph():
    """Decode-sized calls (split-K: partial buffer + reduction) captured once, replayed on new inputs."""
    N, K, dtype = 4096, 4096, torch.bfloat16
    _, qweight, scales, zeros = make_w4(K, N, GROUP, dtype, "cuda")
    w_int8 = torch.randint(-127, 128, (N, K), dtype=torch.int8, device="cuda")
    w_scales = torch.rand(N, device="cuda") * 2e-3
    x = torch.randn(4, K, device="cuda").to(dtype)

    def step():
        return tq.w4a16_linear(x, qweight, scales, zeros, GROUP), tq.w8a16_linear(x, w_int8, w_scales)

    assert tq.pick_config(4, N, K, x.device).split_k > 1
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out4, out8 = step()
    x.copy_(torch.randn(4, K, device="cuda").to(dtype))
    graph.replay()
    torch.cuda.synchronize()
    assert_matches(out4, x.float() @ tq.dequantize_w4(qweight, scales, zeros, GROUP, dtype).float(), dtype)
    assert_matches(out8, x.float() @ (w_int8.float() * w_scales[:, None]).t(), dtype)


@pytest.mark.parametrize("N,K", NK, ids=[f"N{n}-K{k}" for n, k in NK])
@pytest.mark.parametrize("M", [1, 16, 17, 256])  # up to 16 rows are padded for torch._int_mm
def test_int8_dynamic_at_served_shapes(M, N, K):
    dtype = torch.bfloat16
    w = torch.randn(N, K, device="cuda") / K**0.5
    w_scales = w.abs().amax(dim=1) / 127
    w_int8 = torch.round(w / w_scales[:, None]).to(torch.int8)
    x = torch.randn(M, K, device="cuda").to(dtype)
    bias = torch.randn(N, device="cuda").to(dtype)
    out = tq.int8_dynamic_linear(x, w_int8, w_scales, bias)
    assert_matches(out, exact_int8_dynamic(x, w_int8, w_scales, bias), dtype)
    assert relative_error(out, x.float() @ w.t() + bias.float()) < 0.025


@pytest.mark.parametrize("per_channel", [True, False], ids=["w-per-channel", "w-per-tensor"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,K", NK, ids=[f"N{n}-K{k}" for n, k in NK])
@pytest.mark.parametrize("M", ROWS)
def test_fp8_linear_at_served_shapes(M, N, K, dtype, per_channel):
    ok, reason = tq.fp8_supported("cuda")
    if not ok:
        pytest.skip(reason)
    w = torch.randn(N, K, device="cuda") / K**0.5
    w_fp8, w_scale = tq.quantize_fp8_per_channel(w) if per_channel else tq.quantize_fp8_per_tensor(w)
    w_deq = w_fp8.float() * (w_scale[:, None] if per_channel else w_scale)
    x = torch.randn(M, K, device="cuda").to(dtype)
    bias = torch.randn(N, device="cuda").to(dtype)
    rowwise = tq._rowwise_supported(x.device)
    for per_token in [None, False] + ([True] if rowwise else []):  # None: per token where row-wise GEMMs exist
        out = tq.fp8_linear(x, w_fp8, w_scale, bias, per_token=per_token)
        assert out.shape == (M, N) and out.dtype == dtype
        by_token = rowwise if per_token is None else per_token
        x_fp8, x_scale = tq.quantize_fp8_per_token(x) if by_token else tq.quantize_fp8_per_tensor(x)
        emulated = (x_fp8.float() * x_scale) @ w_deq.t() + bias.float()
        atol = 2**-9 * emulated.abs().max().item()
        torch.testing.assert_close(out.float(), emulated, rtol=RTOL[dtype], atol=atol)
        assert relative_error(out, x.float() @ w.t() + bias.float()) < 0.075


def test_fp8_supported_reports_the_capability():
    ok, reason = tq.fp8_supported("cuda")
    major, minor = torch.cuda.get_device_capability()
    assert ok == ((major, minor) >= (8, 9) and not torch.version.hip), reason
