"""Phi-3 (mini, medium) and Phi-3.5-mini built from tensor-parallel layers.

A Llama whose checkpoint fuses q, k and v into one tensor (qkv_proj) and gate and up into another
(gate_up_proj): each rank reads its heads' rows of the q, k and v parts and its slice of each
half. Positions rotate by LongRoPE where rope_parameters say so (LongRotaryEmbedding, which
explains where it can differ from transformers), over the first partial_rotary_factor of each
head (Phi-4-mini, which keeps this architecture, rotates 3/4), and every layer attends over
config.sliding_window when it is set below max_position_embeddings.
"""

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from shard import dist
from shard.layers.activation import SiluAndMul
from shard.layers.attention import Attention
from shard.layers.embed_head import ParallelLMHead
from shard.layers.linear import FusedQKVParallelLinear, MergedColumnParallelLinear, RowParallelLinear
from shard.layers.norm import RMSNorm
from shard.layers.rotary import (
    LongRotaryEmbedding,
    RotaryEmbedding,
    apply_partial_rotary,
    apply_rotary,
    rotary_from_config,
)
from shard.models.llama import LlamaModel, PreNormDecoderLayer
from shard.quantization import Quantization


def _head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _check_config(config: PretrainedConfig) -> None:
    """Fail at load, naming the option, on what this model does not implement."""
    if config.hidden_act != "silu":
        raise ValueError(f"Phi3ForCausalLM: hidden_act {config.hidden_act!r} is not supported (silu only)")


def _sliding_window(config: PretrainedConfig) -> int | None:
    """config.sliding_window where it can bite (Phi-3-mini-4k: 2047). Phi-3.5 and the 128k models
    set one past max_position_embeddings, where it never does: their layers attend in full, which
    keeps the kernels' fast path."""
    window = config.sliding_window
    return window if window and window < config.max_position_embeddings else None


def _rotary(config: PretrainedConfig) -> RotaryEmbedding:
    params = config.rope_parameters
    if params["rope_type"] != "longrope":
        return rotary_from_config(config)
    longrope = ROPE_INIT_FUNCTIONS["longrope"]  # device None: the device the model is built on
    original = params["original_max_position_embeddings"]
    short_inv_freq, scaling = longrope(config, None)
    long_inv_freq, _ = longrope(config, None, seq_len=original + 1)
    return LongRotaryEmbedding(short_inv_freq, long_inv_freq, original, config.max_position_embeddings, scaling)


class FusedGateUpParallelLinear(MergedColumnParallelLinear):
    """Gate and up projections loaded from one checkpoint tensor holding the gate's output
    features, then the up's (gate_up_proj): each rank reads its slice of each half."""

    def __init__(self, in_features: int, intermediate_size: int, quant=None):
        super().__init__(in_features, [intermediate_size] * 2, False, quant)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        d = param.dims.output_dim
        if d is None:  # the same for both halves: a per-tensor scale, act-order g_idx
            for half in (0, 1):
                super().weight_loader(param, loaded, half)
            return
        size = self.shape.output_sizes[0] // param.dims.factor(d)  # per half, on this rank
        index = [slice(None)] * param.dim()
        for half in (0, 1):
            start = (half * dist.tp_size() + dist.tp_rank()) * size
            index[d] = slice(start, start + size)
            param.data.narrow(d, half * size, size).copy_(loaded[tuple(index)])


class Phi3Attention(nn.Module):
    """This rank's heads of one attention layer, q/k/v from the fused qkv_proj."""

    def __init__(self, config: PretrainedConfig, layer_index: int, quant: Quantization):
        super().__init__()
        head_dim = _head_dim(config)
        self.qkv_proj = FusedQKVParallelLinear(
            config.hidden_size,
            head_dim,
            config.num_attention_heads,
            config.num_key_value_heads,
            layout="qkv",
            quant=quant.linear_method(),
        )
        self.num_heads, self.num_kv_heads, self.head_dim = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, head_dim
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * head_dim, config.hidden_size, False, quant.linear_method()
        )
        self.attn = Attention(
            self.num_heads, self.num_kv_heads, head_dim, head_dim**-0.5, layer_index, _sliding_window(config)
        )
        partial = config.rope_parameters.get("partial_rotary_factor", 1.0) != 1.0
        self.rotate = apply_partial_rotary if partial else apply_rotary

    def forward(self, cos_sin, hidden: torch.Tensor) -> torch.Tensor:
        """cos_sin: RotaryEmbedding.cos_sin of this step's positions; hidden [T, hidden]."""
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        qkv = self.qkv_proj(hidden)
        qk = qkv[:, : q_size + kv_size].view(-1, self.num_heads + self.num_kv_heads, self.head_dim)  # [T, Hq+Hkv, D]
        v = qkv[:, q_size + kv_size :].view(-1, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        q, k = self.rotate(qk, cos_sin).split([self.num_heads, self.num_kv_heads], dim=1)
        return self.o_proj(self.attn(q, k, v))


class Phi3MLP(nn.Module):
    """SwiGLU feed-forward from the fused gate_up_proj."""

    def __init__(self, config: PretrainedConfig, quant: Quantization):
        super().__init__()
        self.gate_up_proj = FusedGateUpParallelLinear(
            config.hidden_size, config.intermediate_size, quant.linear_method()
        )
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, False, quant.linear_method())
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class Phi3DecoderLayer(PreNormDecoderLayer):
    """Pre-norm attention then feed-forward."""

    def __init__(self, config: PretrainedConfig, layer_index: int, quant: Quantization):
        super().__init__()
        self.self_attn = Phi3Attention(config, layer_index, quant)
        self.mlp = Phi3MLP(config, quant)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Phi3ForCausalLM(nn.Module):
    """Phi-3: the checkpoint's fused qkv_proj and gate_up_proj load into layers of those names
    (no packed_modules_mapping: each tensor fills its whole parameter)."""

    def __init__(self, config: PretrainedConfig, quant: Quantization):
        super().__init__()
        _check_config(config)
        self.model = LlamaModel(config, quant, Phi3DecoderLayer, rotary=_rotary(config))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant.head_method())
        self.tie_word_embeddings = config.tie_word_embeddings
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions [T] -> hidden states [T, hidden]."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """[N, hidden] -> [N, vocab] float32 on rank 0, None on other ranks."""
        logits = self.lm_head(hidden)
        return None if logits is None else logits.float()
