import torch
from torch import nn


class SiluAndMul(nn.Module):
    """[T, 2 * I] (gate then up) -> [T, I]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return nn.functional.silu(gate) * up


class GeluAndMul(nn.Module):
    """GeGLU: [T, 2 * I] (gate then up) -> gelu(gate) * up [T, I]; `approximate` is torch's:
    "tanh" (Gemma's gelu_pytorch_tanh) or "none" (the exact erf form)."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return nn.functional.gelu(gate, approximate=self.approximate) * up


class GELU(nn.Module):
    """GELU by its name in transformers' configs: "gelu" is the exact (erf) form; "gelu_new",
    "gelu_fast" and "gelu_pytorch_tanh" (and BLOOM's gelu) its tanh approximation."""

    APPROXIMATIONS = {"gelu": "none", "gelu_new": "tanh", "gelu_fast": "tanh", "gelu_pytorch_tanh": "tanh"}

    def __init__(self, name: str):
        super().__init__()
        if name not in self.APPROXIMATIONS:
            raise ValueError(f"unsupported activation {name!r}; supported: {', '.join(self.APPROXIMATIONS)}")
        self.approximate = self.APPROXIMATIONS[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(x, approximate=self.approximate)
