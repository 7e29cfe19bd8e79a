"""Linear layers on CPU through oneDNN with weights packed once at load.

`F.linear` on CPU calls MKL, which on AMD processors takes a generic code path: on this
project's EPYC (AVX-512) oneDNN with a prepacked weight runs the model's matmuls 2-3.5x
faster (batch 1 to 1024, float32, same results within float32 rounding). The ops are
PyTorch's own (`torch.ops.mkldnn`, the ones Inductor emits for frozen CPU linears).

A packed weight is an opaque oneDNN tensor, which a compiled graph cannot take as an input, so
it lives in the C++ kernels (csrc/cpu_linear.cpp) under an integer handle and the graph calls
`sluice_cpu::packed_linear(x, handle, ...)`. Packing needs those kernels built; without them
(no C++ compiler) the layers keep `F.linear`.
"""

import torch

from shard.kernels import cpu_native

_DTYPES = (torch.float32, torch.bfloat16)


def available(weight: torch.Tensor) -> bool:
    """Whether `weight` can be packed: a CPU float32/bfloat16 matrix, oneDNN and our kernels present,
    and for bfloat16 a CPU oneDNN runs it on (AVX-512BW/VL/DQ or AVX-NE-CONVERT; on AVX2 alone it
    refuses to pack, and the layer keeps `F.linear`)."""
    return (
        weight.device.type == "cpu"
        and weight.dtype in _DTYPES
        and weight.dim() == 2
        and torch.backends.mkldnn.is_available()
        and cpu_native.is_loaded()
        and (weight.dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported())
    )


class PackedWeight:
    """A weight [out, in] in oneDNN's blocked layout (for any batch size), held by its handle."""

    def __init__(self, weight: torch.Tensor):
        self.out_features = weight.shape[0]
        self.handle = torch.ops.sluice_cpu.pack_linear_weight(weight)

    def __del__(self):
        try:
            torch.ops.sluice_cpu.release_linear_weight(self.handle)
        except (RuntimeError, AttributeError):  # the interpreter is shutting down
            pass


def linear(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] -> [..., out], as `F.linear(x, dense_weight, bias)`."""
    return torch.ops.sluice_cpu.packed_linear(x, weight.handle, weight.out_features, bias)
