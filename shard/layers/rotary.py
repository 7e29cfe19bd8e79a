import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (rotate-half layout) from precomputed inverse frequencies.

    `cos_sin(positions)` is looked up once per forward and shared by every layer.
    """

    def __init__(self, inv_freq: torch.Tensor, max_positions: int, scaling: float = 1.0):
        super().__init__()
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq.float())  # [max_positions, head_dim / 2]
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos() * scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * scaling, persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> (cos, sin), each [T, 1, head_dim] in `dtype`."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)


class LongRotaryEmbedding(RotaryEmbedding):
    """LongRoPE (Phi-3): one table whose positions below `original_max_positions` rotate by
    `short_inv_freq` and the rest by `long_inv_freq`, all scaled by `scaling`.

    transformers picks one set per forward: the long factors for every position when the
    forward's largest position reaches `original_max_positions`, the short ones otherwise. A table
    indexed by position gives the same rotations for every sequence that fits in
    `original_max_positions`, and for its continuation past it when generated token by token
    (transformers' generate then keeps the prompt's cached keys rotated by the short factors and
    rotates each new token by the long ones, as here). It differs for a prompt longer than
    `original_max_positions`: transformers rotates all of it by the long factors, this table its
    first `original_max_positions` positions by the short ones. That buys a rotation that depends
    on the position alone, never on the batch or the rest of the sequence, so cached K/V and
    prefix-cache hits stay valid and CUDA graphs replay one table. (vLLM uses the long factors
    everywhere once its max_model_len exceeds `original_max_positions`: consistent for long
    prompts, but then never transformers' outputs for short ones.)
    """

    def __init__(
        self,
        short_inv_freq: torch.Tensor,
        long_inv_freq: torch.Tensor,
        original_max_positions: int,
        max_positions: int,
        scaling: float = 1.0,
    ):
        super().__init__(long_inv_freq, max_positions, scaling)
        n = min(original_max_positions, max_positions)
        short = RotaryEmbedding(short_inv_freq, n, scaling)
        self.cos[:n], self.sin[:n] = short.cos, short.sin


def apply_rotary(x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x [T, H, D] (q and k heads together) -> x rotated by its token's position."""
    cos, sin = cos_sin
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def apply_partial_rotary(x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x [T, H, D] -> x with its first cos_sin-width dimensions rotated as apply_rotary does and
    the rest passed through (GPT-NeoX's partial rotary)."""
    width = cos_sin[0].shape[-1]
    return torch.cat([apply_rotary(x[..., :width], cos_sin), x[..., width:]], dim=-1)


def rotary_from_config(config) -> RotaryEmbedding:
    """The rotary embedding of `config.rope_parameters` for heads of config.head_dim (else
    hidden_size / num_attention_heads): the default one or any of transformers' scaled kinds (its
    ROPE_INIT_FUNCTIONS), over the first `partial_rotary_factor` of each head's dimensions."""
    params = config.rope_parameters
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        inv_freq, scaling = 1.0 / params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim), 1.0
    else:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.get_default_device())
    return RotaryEmbedding(inv_freq, config.max_position_embeddings, scaling)
