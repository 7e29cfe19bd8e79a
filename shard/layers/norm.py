import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Normalize x; with `residual`, normalize x + residual and also return that sum."""
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x


class GemmaRMSNorm(RMSNorm):
    """RMSNorm that scales by (1 + weight) in float32 before casting back (Gemma 2 and 3: their
    checkpoints store the weight centred on 0); fuses the residual add as RMSNorm does."""

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x * (1.0 + self.weight.float())).to(dtype)


class LayerNorm(nn.Module):
    """LayerNorm with a bias (GPT-NeoX, Falcon, GPTBigCode, StarCoder2, BLOOM); fuses the residual
    add as RMSNorm does."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(hidden_size), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Normalize x; with `residual`, normalize x + residual and also return that sum."""
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x
