"""Linear layers on CPU with weights packed once at load, by one of three kernel sets.

- `onednn`: PyTorch's own oneDNN ops (`torch.ops.mkldnn`, the ones Inductor emits for frozen CPU
  linears). `F.linear` on CPU calls MKL, which on AMD processors takes a generic code path: on
  this project's AVX-512 EPYC a prepacked oneDNN weight runs the model's matmuls 2-3.5x faster
  (batch 1 to 1024, float32, same results within float32 rounding).
- `avx2`: our kernels for CPUs with AVX2 but no AVX-512 (csrc/cpu_dense_avx2.cpp), where oneDNN
  falls short of the memory's speed on a decode step and does not take bfloat16 weights at all. On
  a 2-core AVX2 EPYC, the model's 120 decoder linears (each set in turn, median of 11 rounds):
  float32 0.65x oneDNN's time at 1-2 rows, 0.54-0.71x at 4-32, 0.9x at 64-256; bfloat16
  weights 0.37-0.40x at 1-8 rows.
  Every output sums in k order whatever the batch: a row's result does not depend on its neighbours.
- `amx`: our kernels for bfloat16 weights on CPUs with AMX (csrc/cpu_dense_amx.cpp). oneDNN spends
  15-35 us setting up each call, on one thread, and streams a decode step's weights slower. On a
  2-core Xeon with AMX, the model's 120 decoder linears: 0.61-0.68x oneDNN's time at 1-32 rows,
  0.86x at 128-256, level at 2048.

`auto` takes `amx` for bfloat16 weights on CPUs with AMX, `avx2` on CPUs without AVX-512 and
`onednn` elsewhere; `aten` keeps `F.linear`.

A packed weight is opaque to a compiled graph (oneDNN's is not even a strided tensor), so it lives
in the C++ kernels under an integer handle and the graph calls `sluice_cpu::packed_linear(x,
handle, ...)`, `sluice_cpu::dense_amx_linear(...)` or `sluice_cpu::dense_avx2_linear(...)`.
Packing needs those kernels built; without them (no C++ compiler) the layers keep `F.linear`.
"""

import torch

from shard.config import CPU_GEMM_KERNELS as KERNELS
from shard.kernels import cpu_native

_DTYPES = (torch.float32, torch.bfloat16)


def resolve(kernels: str, dtype: torch.dtype = torch.float32) -> str:
    """`auto` -> the kernel set for weights of `dtype` on this CPU; other names as they are."""
    if kernels not in KERNELS:
        raise ValueError(f"CPU linear kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")
    if kernels != "auto":
        return kernels
    if dtype == torch.bfloat16 and cpu_native.is_loaded() and torch.ops.sluice_cpu.dense_amx_available():
        return "amx"
    avx512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    return "avx2" if cpu_native.is_loaded() and not avx512 and torch.ops.sluice_cpu.dense_avx2_available() else "onednn"


def available(weight: torch.Tensor, kernels: str = "auto") -> bool:
    """Whether `kernels` can pack `weight`: a CPU float32/bfloat16 matrix and our C++ kernels loaded;
    for `onednn`, oneDNN present and, for bfloat16, a CPU it runs it on (AVX-512BW/VL/DQ or
    AVX-NE-CONVERT); for `amx`, a bfloat16 weight and a CPU with AMX; for `avx2`, a CPU with AVX2 and FMA."""
    kernels = resolve(kernels, weight.dtype)
    if kernels == "aten" or not cpu_native.is_loaded():
        return False
    if not (weight.device.type == "cpu" and weight.dtype in _DTYPES and weight.dim() == 2):
        return False
    if kernels == "amx":
        return weight.dtype == torch.bfloat16 and torch.ops.sluice_cpu.dense_amx_available()
    if kernels == "avx2":
        return torch.ops.sluice_cpu.dense_avx2_available()
    return torch.backends.mkldnn.is_available() and (
        weight.dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


_PACK = {"amx": "pack_dense_amx", "avx2": "pack_dense_avx2", "onednn": "pack_linear_weight"}
_RELEASE = {"amx": "release_dense_amx", "avx2": "release_dense_avx2", "onednn": "release_linear_weight"}


class PackedWeight:
    """A weight [out, in] packed by `kernels` (oneDNN's blocked layout, our AMX blocks or our AVX2
    panels), held by its handle and released with the object."""

    def __init__(self, weight: torch.Tensor, kernels: str = "auto"):
        self.out_features = weight.shape[0]
        self.kernels = resolve(kernels, weight.dtype)
        self.handle = getattr(torch.ops.sluice_cpu, _PACK[self.kernels])(weight)

    def __del__(self):
        try:
            getattr(torch.ops.sluice_cpu, _RELEASE[self.kernels])(self.handle)
        except (RuntimeError, AttributeError):  # the interpreter is shutting down
            pass


def linear(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] -> [..., out], as `F.linear(x, dense_weight, bias)`."""
    if weight.kernels == "amx":
        return torch.ops.sluice_cpu.dense_amx_linear(x, weight.handle, weight.out_features, bias)
    if weight.kernels == "avx2":
        return torch.ops.sluice_cpu.dense_avx2_linear(x, weight.handle, weight.out_features, bias)
    return torch.ops.sluice_cpu.packed_linear(x, weight.handle, weight.out_features, bias)
