"""Int8 linear layers on CPU: per-output-channel int8 weights, two ways to multiply by them.

- `linear_w8` (weight-only, `--quantize int8`): activations stay bfloat16/float32 and the result is
  what `x @ (w_int8 * scales[:, None]).T` gives in float32, rounded to x's dtype. The int8 weights
  become exact bf16 (or fp32) values inside the kernel and are multiplied with AVX-512 BF16 dot
  products (bf16 x) or FMAs (fp32 x): converted in registers as they stream in for up to 4 rows
  (decoding reads every weight once a step, and int8 halves bf16's bytes), through a
  cache-resident scratch of 64 columns for more rows (multiplied on AMX-BF16 tiles where the CPU
  has them).
- `linear_w8a8` (`--quantize int8-dynamic`): each activation row is quantized on the fly to u8
  with its own scale and zero point (asymmetric, over the row's [min(x, 0), max(x, 0)]) and the
  integer matmul runs on AMX-INT8 tiles, or AVX-512 VNNI (twice bf16's multiply rate): faster on
  many rows (prefill, large batches), at the price of the activations' rounding error.

`linear_w8(..., act_quant_min_rows=R)` multiplies as `linear_w8a8` does when x has at least R rows
(as IPEX's weight-only quantization does with lowp_mode=INT8), weight-only below.

Packed weights live in the C++ kernels (csrc/cpu_int8.cpp) under an integer handle, like
cpu_gemm's oneDNN weights, so that a compiled graph calls `sluice_cpu::int8_linear(x, handle, ...)`
with a constant. The kernels need cpu_native.load(). CPUs with AVX2 but no AVX-512 run weight-only
in integers: each activation row rounded to 16 bits, q = rne(x * 32767 / max|x|), multiplied with
vpmaddwd (16 products an instruction, twice an fp32 FMA's), the error at most 2^-16 of the row's
largest magnitude (W8A8 there falls back to plain C++ loops, as everything does on CPUs with
neither: the same results, 50-100x slower than a float32 matmul).
"""

import torch

from shard.kernels import cpu_native

NEVER = 2**62  # act_quant_min_rows that keeps every batch weight-only


def available(dynamic: bool = False) -> tuple[bool, str]:
    """Whether int8 linears (`dynamic`: W8A8) run fast on this CPU, and which kernels they use (or
    why not): the scalar loops are correct but slower than not quantizing at all."""
    if not cpu_native.is_loaded():
        return False, "the C++ CPU kernels are not loaded (shard.kernels.cpu_native.load)"
    kernels = torch.ops.sluice_cpu.int8_kernels()
    if kernels == "generic":
        return (
            False,
            "this CPU has neither AVX-512 nor AVX2 with FMA, and the plain C++ loops are ~50x slower than float32",
        )
    if dynamic and "vnni" not in kernels:
        return False, (
            f"W8A8 multiplies u8 x s8 with AVX-512 VNNI, which this CPU lacks (kernels: {kernels}): use "
            "--quantize int8, which multiplies in integers here too, with activations rounded to 16 bits"
        )
    return True, kernels


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] float -> (int8 [N, K], scales [N] float32), symmetric: scale = max|w| / 127,
    so that weight ~= int8 * scales[:, None]."""
    w = weight.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    return torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


class Int8Weight:
    """An int8 weight [out, in] with its per-output-channel scales, packed for the kernels and held
    by its handle (released with the object). Symmetric weights only: values in [-127, 127]."""

    def __init__(self, w_int8: torch.Tensor, scales: torch.Tensor):
        # w_int8 [N, K] int8, scales [N] float
        self.out_features, self.in_features = w_int8.shape
        self.handle = torch.ops.sluice_cpu.pack_int8_weight(w_int8, scales)

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> "Int8Weight":
        """From a float weight [N, K], through quantize_per_channel."""
        return cls(*quantize_per_channel(weight))

    def __del__(self):
        try:
            torch.ops.sluice_cpu.release_int8_weight(self.handle)
        except (RuntimeError, AttributeError):  # the interpreter is shutting down
            pass


def linear_w8(
    x: torch.Tensor, weight: Int8Weight, bias: torch.Tensor | None = None, act_quant_min_rows: int = NEVER
) -> torch.Tensor:
    """x [..., K] bfloat16/float32 -> [..., N] in x's dtype: x @ dequantized(weight).T + bias, with
    x kept in its precision (on AVX2-only CPUs: rounded to 16 bits a row, see above), unless x has
    >= act_quant_min_rows rows (then as linear_w8a8)."""
    return torch.ops.sluice_cpu.int8_linear(x, weight.handle, weight.out_features, bias, act_quant_min_rows)


def linear_w8a8(x: torch.Tensor, weight: Int8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] bfloat16/float32 -> [..., N] in x's dtype, with each row of x quantized to u8:
    q = clamp(round(x / s) + zp, 0, 255), s = (max(x, 0) - min(x, 0)) / 255, zp = round(-min(x, 0) / s)
    (s = 1 for an all-zero row); out = s * (q - zp) @ (w_int8 * scales[:, None]).T + bias."""
    return torch.ops.sluice_cpu.int8_linear(x, weight.handle, weight.out_features, bias, 0)
