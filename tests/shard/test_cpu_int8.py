"""The CPU int8 linears (shard/kernels/cpu_int8.py) compute what their float64 references do,
within the rounding their arithmetic allows, on the SIMD kernels and on the generic C++ loops.

Tolerances are bounds, not guesses. The kernels multiply exact values (bf16/fp32 x, int8 weights
as exact bf16/fp32; u8 x s8, or x rounded to int16 x s8 on AVX2 and AMX, in exact int32) and
accumulate K products in fp32, so an entry differs from the exact sum of what they multiply by at most
gamma * sum_k |x_k w_k| (gamma = (K + 3) * 2^-24: K additions, the scale multiply, the bias add); a
bf16 output adds its rounding, half a unit in the last place (2^-9 relative; 2^-8 allowed, to
cover that and the fp32 noise before it).
"""

import pytest
import torch

from shard.config import default_cache_dir
from shard.kernels import cpu_int8, cpu_native

cpu_native.load(default_cache_dir())  # a machine that cannot build the C++ kernels fails here

# [N, K]: K % 64 != 0, K odd, N % 16 != 0 (with K % 64 == 0, as AMX's W8A8 needs); a real qkv
SHAPES = [(80, 96), (33, 70), (130, 257), (130, 128), (960, 576)]
ROWS = [1, 3, 17, 40, 64]  # on AMX: one tile, two, a pass of 32 and 8, two passes


NATIVE = torch.ops.sluice_cpu.int8_kernels()


@pytest.fixture(params=["native", "avx512", "avx2", "generic"])
def kernels(request):
    """Each test runs on this CPU's SIMD kernels, on the same without AMX where it has AMX, on the
    AVX2 ones CPUs without AVX-512 get, and on the scalar loops."""
    if request.param == "native" and NATIVE == "generic":
        pytest.skip("no SIMD kernels for this CPU")
    if request.param == "avx512" and not NATIVE.endswith("+amx"):
        pytest.skip("`native` runs the AVX-512 kernels here" if NATIVE.startswith("avx512") else "no AMX on this CPU")
    if request.param == "avx2" and (NATIVE == "avx2" or not _has_avx2()):
        pytest.skip("`native` runs the AVX2 kernels here" if NATIVE == "avx2" else "no AVX2 on this CPU")
    torch.ops.sluice_cpu.int8_force_kernels(request.param)
    yield torch.ops.sluice_cpu.int8_kernels()
    torch.ops.sluice_cpu.int8_force_kernels("native")


def _has_avx2() -> bool:
    torch.ops.sluice_cpu.int8_force_kernels("avx2")
    try:
        return torch.ops.sluice_cpu.int8_kernels() == "avx2"
    finally:
        torch.ops.sluice_cpu.int8_force_kernels("native")


def _weight(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    w8, scales = cpu_int8.quantize_per_channel(torch.randn(n, k, generator=g) * 0.05)
    return w8, scales, torch.randn(n, generator=g) * 0.1


def _dequantized(w8, scales):  # [N, K] float64
    return w8.double() * scales.double()[:, None]


def _quantize_rows(x):
    """linear_w8a8's activation quantization, in torch ops (same float32 arithmetic, so the same q)."""
    xf = x.float()
    lo, hi = xf.amin(-1, keepdim=True).clamp(max=0), xf.amax(-1, keepdim=True).clamp(min=0)
    s = (hi - lo) / 255
    s = torch.where(s > 0, s, torch.ones_like(s))
    zp = torch.round(-lo / s)
    return (torch.round(xf / s) + zp).clamp(0, 255), s, zp


def _assert_within(out, expected, magnitude, k):
    """|out - expected| <= gamma * magnitude (+ the output's rounding), elementwise; magnitude =
    sum_k |x_k w_k| + |bias|, the scale of the fp32 accumulation error."""
    bound = (k + 3) * 2.0**-24 * magnitude
    if out.dtype == torch.bfloat16:
        bound = bound + 2.0**-8 * expected.abs()
    err = (out.double() - expected).abs()
    worst = (err - bound).argmax()
    assert (err <= bound + 1e-30).all(), f"error {err.flatten()[worst]:.3g} > bound {bound.flatten()[worst]:.3g}"


def _weight_only_x(x, padded_k):
    """The activations weight-only multiplies, exactly (float64): x itself, but where the kernels
    multiply in integers (AVX2; AMX with more than 4 rows and K padded to 64s), x's rows rounded to
    16 bits: q = rne(x * inv), inv = 32767 / max|x| in float32 (0 for an all-zero row), times s = 1 / inv."""
    kernels = torch.ops.sluice_cpu.int8_kernels()
    amx = kernels.endswith("+amx") and x.shape[0] > 4 and padded_k % 64 == 0
    if kernels != "avx2" and not amx:
        return x.double()
    xf = x.float()
    amax = xf.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 32767 / amax, torch.zeros_like(amax))
    s = torch.where(amax > 0, 1 / inv, torch.zeros_like(amax))
    return torch.round(xf * inv).double() * s.double()


def _check_w8(out, x, w8, scales, bias):
    w, xw = _dequantized(w8, scales), _weight_only_x(x, -(-x.shape[-1] // 4) * 4)
    expected = xw @ w.T + (bias.double() if bias is not None else 0)
    magnitude = xw.abs() @ w.abs().T + (bias.double().abs() if bias is not None else 0)
    _assert_within(out, expected, magnitude, x.shape[-1])


def _check_w8a8(out, x, w8, scales, bias):
    q, s, zp = _quantize_rows(x)
    w = _dequantized(w8, scales)
    xq = (q.double() - zp.double()) * s.double()  # what the integer matmul multiplies, exactly
    expected = xq @ w.T + (bias.double() if bias is not None else 0)
    magnitude = xq.abs() @ w.abs().T + (bias.double().abs() if bias is not None else 0)
    _assert_within(out, expected, magnitude, x.shape[-1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("scheme", ["w8", "w8a8"])
def test_matches_reference(kernels, scheme, n, k, dtype):
    w8, scales, bias = _weight(n, k)
    weight = cpu_int8.Int8Weight(w8, scales)
    linear, check = (cpu_int8.linear_w8, _check_w8) if scheme == "w8" else (cpu_int8.linear_w8a8, _check_w8a8)
    g = torch.Generator().manual_seed(n + k)
    for rows in ROWS:
        x = torch.randn(rows, k, generator=g).to(dtype)
        for b in (None, bias.to(dtype)):
            out = linear(x, weight, b)
            assert out.shape == (rows, n) and out.dtype == dtype
            check(out, x, w8, scales, b)


def test_amx_w8a8_equals_vnni_exactly():
    """AMX and VNNI both sum u8 x s8 products exactly in int32 and share the epilogue: the same bits."""
    if not NATIVE.endswith("+amx"):
        pytest.skip("no AMX on this CPU")
    w8, scales, bias = _weight(200, 576)
    weight = cpu_int8.Int8Weight(w8, scales)
    x = torch.randn(70, 576, generator=torch.Generator().manual_seed(5)).bfloat16()
    amx = cpu_int8.linear_w8a8(x, weight, bias)
    torch.ops.sluice_cpu.int8_force_kernels("avx512")
    try:
        assert torch.equal(amx, cpu_int8.linear_w8a8(x, weight, bias))
    finally:
        torch.ops.sluice_cpu.int8_force_kernels("native")


def test_avx2_weight_only_rows_come_out_the_same_alone_or_in_any_batch(kernels):
    """The AVX2 weight-only kernels add up each output's exact int32 sums of 96 k in k order on
    every path (a few rows widening the weight in registers, more rows by widened panels), so a
    row's result does not depend on the rows batched with it."""
    if torch.ops.sluice_cpu.int8_kernels() != "avx2":
        pytest.skip("the AVX2 kernels are not the ones running")
    w8, scales, bias = _weight(200, 257)
    weight = cpu_int8.Int8Weight(w8, scales)
    x = torch.randn(70, 257, generator=torch.Generator().manual_seed(3))
    batched = cpu_int8.linear_w8(x, weight, bias)
    for rows in (1, 2, 5, 13, 48):
        assert torch.equal(cpu_int8.linear_w8(x[:rows], weight, bias), batched[:rows])


@pytest.mark.parametrize("k", [96, 128])  # 128: AMX multiplies the 7 rows in integers
def test_a_row_with_nan_or_inf_spoils_only_its_own_outputs(kernels, k):
    """Weight-only: a NaN or infinity in a row makes that row's outputs non-finite (the kernels that
    round rows to 16 bits give it NaN, as the rounding has no scale), an all-zero or subnormal row
    gives the bias, and the other rows come out as they would beside finite rows."""
    w8, scales, bias = _weight(80, k)
    weight = cpu_int8.Int8Weight(w8, scales)
    x = torch.randn(7, k, generator=torch.Generator().manual_seed(4))
    x[1, 7], x[3, 50], x[4], x[6] = float("nan"), float("inf"), 0.0, 1e-40
    out = cpu_int8.linear_w8(x, weight, bias)
    assert not torch.isfinite(out[1]).any() and not torch.isfinite(out[3]).any()
    assert torch.equal(out[4], bias) and torch.equal(out[6], bias)
    clean = x.clone()
    clean[1], clean[3] = 1.0, -1.0
    expected = cpu_int8.linear_w8(clean, weight, bias)
    for row in (0, 2, 5):
        assert torch.equal(out[row], expected[row])


def test_w8a8_is_close_to_the_weight_only_result():
    """Quantizing activations per row costs about 1/255 of each row's range: a few tenths of a
    percent relative error on Gaussian activations (the accuracy the VNNI path trades for speed)."""
    w8, scales, _ = _weight(960, 576)
    weight = cpu_int8.Int8Weight(w8, scales)
    x = torch.randn(64, 576, generator=torch.Generator().manual_seed(1))
    exact = cpu_int8.linear_w8(x, weight)
    rel = (cpu_int8.linear_w8a8(x, weight) - exact).norm() / exact.norm()
    assert 1e-4 < rel < 1e-2


def test_act_quant_min_rows_switches_to_w8a8(kernels):
    w8, scales, bias = _weight(80, 96)
    weight = cpu_int8.Int8Weight(w8, scales)
    x = torch.randn(17, 96, generator=torch.Generator().manual_seed(2)).bfloat16()
    below, at = x[:16], x
    exact = dict(rtol=0, atol=0)
    torch.testing.assert_close(
        cpu_int8.linear_w8(below, weight, bias, 17), cpu_int8.linear_w8(below, weight, bias), **exact
    )
    torch.testing.assert_close(
        cpu_int8.linear_w8(at, weight, bias, 17), cpu_int8.linear_w8a8(at, weight, bias), **exact
    )


@pytest.mark.parametrize("linear", [cpu_int8.linear_w8, cpu_int8.linear_w8a8])
def test_leading_dims_strided_and_empty_inputs(linear):
    w8, scales, bias = _weight(80, 96)
    weight = cpu_int8.Int8Weight(w8, scales)
    x = torch.randn(2, 3, 192, generator=torch.Generator().manual_seed(3)).bfloat16()[..., ::2]  # strided
    out = linear(x, weight, bias)
    assert out.shape == (2, 3, 80)
    torch.testing.assert_close(out, linear(x.contiguous().view(6, 96), weight, bias).view(2, 3, 80), rtol=0, atol=0)
    wide = torch.randn(5, 200).bfloat16()  # rows of a wider tensor: a row stride, no copy
    torch.testing.assert_close(linear(wide[:, 100:196], weight), linear(wide[:, 100:196].contiguous(), weight))
    assert linear(torch.empty(0, 96), weight).shape == (0, 80)


def test_real_shapes_single_row():
    """Decode-sized calls on the model's own shapes (N, K multiples of 64; the LM head's N = 49152)."""
    for n, k in [(3072, 576), (576, 1536), (49152, 576)]:
        w8, scales, _ = _weight(n, k)
        weight = cpu_int8.Int8Weight(w8, scales)
        x = torch.randn(1, k).bfloat16()
        _check_w8(cpu_int8.linear_w8(x, weight), x, w8, scales, None)
        _check_w8a8(cpu_int8.linear_w8a8(x, weight), x, w8, scales, None)


def test_bad_arguments_are_rejected():
    w8, scales, _ = _weight(80, 96)
    weight = cpu_int8.Int8Weight(w8, scales)
    with pytest.raises(RuntimeError, match="x \\[..., 96\\] expected"):
        cpu_int8.linear_w8(torch.randn(2, 95), weight)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        cpu_int8.linear_w8(torch.randn(2, 96, dtype=torch.float64), weight)
    with pytest.raises(RuntimeError, match="int8"):
        cpu_int8.Int8Weight(w8.float(), scales)
    w8[3, 5] = -128  # symmetric weights only: the bf16 kernels' table has no -128
    with pytest.raises(RuntimeError, match="\\[-127, 127\\]"):
        cpu_int8.Int8Weight(w8, scales)


def test_released_handles_are_refused():
    w8, scales, _ = _weight(80, 96)
    weight = cpu_int8.Int8Weight(w8, scales)
    handle = weight.handle
    del weight  # __del__ releases the packed copy
    with pytest.raises(RuntimeError, match="was released"):
        torch.ops.sluice_cpu.int8_linear(torch.randn(1, 96), handle, 80, None, 0)


def test_available_names_the_kernels_and_refuses_slow_ones(kernels):
    """--quantize int8 needs AVX2 or AVX-512 (the scalar loops are slower than float32), and
    int8-dynamic needs VNNI; the reason says which."""
    ok, reason = cpu_int8.available()
    assert (ok, reason) == (True, kernels) if kernels != "generic" else not ok and "neither" in reason
    ok, reason = cpu_int8.available(dynamic=True)
    assert ok == ("vnni" in kernels), reason
    if kernels != "generic" and not ok:
        assert "VNNI" in reason and "--quantize int8" in reason


def test_torch_compile_fullgraph():
    """The op traces (fake impl in cpu_native) into one Inductor graph with a dynamic row count."""
    w8, scales, bias = _weight(80, 96)
    up, down = cpu_int8.Int8Weight(w8, scales), cpu_int8.Int8Weight(*_weight(96, 80, seed=1)[:2])

    class Block(torch.nn.Module):
        def forward(self, x):  # [T, 96] -> [T, 96]
            h = torch.relu(cpu_int8.linear_w8(x, up, bias))
            return cpu_int8.linear_w8a8(h * 2, down) + 1

    block = Block()
    compiled = torch.compile(block, fullgraph=True, dynamic=True)
    for rows in (5, 9):
        x = torch.randn(rows, 96).bfloat16()
        torch.testing.assert_close(compiled(x), block(x), rtol=0, atol=0)
