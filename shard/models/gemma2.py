"""Gemma 2 built from tensor-parallel layers; Gemma 3's text model (gemma3.py) is this with q/k
norms and a rotary table per layer type.

Against Llama: RMSNorm scales by (1 + weight), and each layer also normalizes the attention and
feed-forward outputs (four norms); the MLP is GeGLU; embeddings are scaled by sqrt(hidden_size)
in the model's dtype; layers are local (sliding window) or global as config.layer_types says;
scores are scaled by query_pre_attn_scalar**-0.5 and soft-capped at attn_logit_softcapping,
logits at final_logit_softcapping; the LM head is usually the embedding.
"""

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from shard.layers.activation import GeluAndMul
from shard.layers.attention import Attention
from shard.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from shard.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from shard.layers.norm import GemmaRMSNorm
from shard.layers.rotary import RotaryEmbedding, apply_rotary
from shard.quantization import Quantization

GELU_APPROXIMATIONS = {"gelu_pytorch_tanh": "tanh", "gelu": "none"}  # hidden_activation -> torch's gelu
LAYER_TYPES = ("sliding_attention", "full_attention")


def _head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _check_config(config: PretrainedConfig) -> None:
    """Fail at load, naming the option, on what these models do not implement."""
    arch = config.architectures[0]
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError(f"{arch}: use_bidirectional_attention is not supported (causal attention only)")
    if config.hidden_activation not in GELU_APPROXIMATIONS:
        raise ValueError(
            f"{arch}: hidden_activation {config.hidden_activation!r} is not supported; "
            f"supported: {', '.join(GELU_APPROXIMATIONS)}"
        )
    unknown = sorted(set(config.layer_types) - set(LAYER_TYPES))
    if unknown:
        raise ValueError(f"{arch}: layer_types {unknown} are not supported; supported: {', '.join(LAYER_TYPES)}")


def rotary_embedding(config: PretrainedConfig, params: dict, layer_type: str | None = None) -> RotaryEmbedding:
    """The rotary table `params` describe: config.rope_parameters, or (Gemma 3) its entry for
    `layer_type`. Rope types whose frequencies depend on the sequence (dynamic, longrope) fail."""
    rope_type = params.get("rope_type", "default")
    if rope_type in ("dynamic", "longrope"):
        raise ValueError(f"{config.architectures[0]}: rope_type {rope_type!r} is not supported")
    if rope_type == "default":
        dim = _head_dim(config)
        inv_freq = 1.0 / params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        scaling = 1.0
    else:  # device None: the device the model is built on
        kwargs = {} if layer_type is None else {"layer_type": layer_type}
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None, **kwargs)
    return RotaryEmbedding(inv_freq, config.max_position_embeddings, scaling)


class GemmaAttention(nn.Module):
    """This rank's heads of one Gemma attention layer: local (config.sliding_window) or global
    as config.layer_types says, scores soft-capped at `softcap`; with `qk_norm` (Gemma 3), q and k
    are normalized per head before the rotation."""

    def __init__(
        self, config: PretrainedConfig, layer_index: int, quant: Quantization, softcap: float | None, qk_norm: bool
    ):
        super().__init__()
        head_dim = _head_dim(config)
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            head_dim,
            config.num_attention_heads,
            config.num_key_value_heads,
            bias=config.attention_bias,
            quant=quant.linear_method(),
        )
        self.num_heads, self.num_kv_heads, self.head_dim = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, head_dim
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * head_dim, config.hidden_size, config.attention_bias, quant.linear_method()
        )
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = GemmaRMSNorm(head_dim, config.rms_norm_eps)
            self.k_norm = GemmaRMSNorm(head_dim, config.rms_norm_eps)
        sliding = config.layer_types[layer_index] == "sliding_attention"
        self.attn = Attention(
            self.num_heads,
            self.num_kv_heads,
            head_dim,
            config.query_pre_attn_scalar**-0.5,
            layer_index,
            sliding_window=config.sliding_window if sliding else None,
            softcap=softcap,
        )

    def forward(self, cos_sin, hidden: torch.Tensor) -> torch.Tensor:
        """cos_sin: RotaryEmbedding.cos_sin of this step's positions; hidden [T, hidden]."""
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        qkv = self.qkv_proj(hidden)
        qk = qkv[:, : q_size + kv_size].view(-1, self.num_heads + self.num_kv_heads, self.head_dim)  # [T, Hq+Hkv, D]
        v = qkv[:, q_size + kv_size :].view(-1, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        if self.qk_norm:
            qk = torch.cat([self.q_norm(qk[:, : self.num_heads]), self.k_norm(qk[:, self.num_heads :])], dim=1)
        q, k = apply_rotary(qk, cos_sin).split([self.num_heads, self.num_kv_heads], dim=1)
        return self.o_proj(self.attn(q, k, v))


class GemmaMLP(nn.Module):
    """GeGLU feed-forward: down(gelu(gate(x)) * up(x))."""

    def __init__(self, config: PretrainedConfig, quant: Quantization):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [config.intermediate_size] * 2, False, quant.linear_method()
        )
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, False, quant.linear_method())
        self.act = GeluAndMul(GELU_APPROXIMATIONS[config.hidden_activation])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class GemmaDecoderLayer(nn.Module):
    """Attention and MLP, each between a norm of its input and a norm of its output."""

    def __init__(
        self, config: PretrainedConfig, layer_index: int, quant: Quantization, softcap: float | None, qk_norm: bool
    ):
        super().__init__()
        self.is_sliding = config.layer_types[layer_index] == "sliding_attention"
        self.self_attn = GemmaAttention(config, layer_index, quant, softcap, qk_norm)
        self.mlp = GemmaMLP(config, quant)
        eps = config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)

    def forward(self, cos_sin, hidden: torch.Tensor, residual: torch.Tensor | None):
        """hidden [T, hidden], residual [T, hidden] (None before the first layer) -> the pair after
        this layer; their sum is the residual stream."""
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.post_attention_layernorm(self.self_attn(cos_sin, hidden))
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class GemmaModel(nn.Module):
    """Embedding (scaled by sqrt(hidden_size)), layers, final norm. Global layers rotate by
    `rotary`; local ones by `local_rotary` where given (Gemma 3), else by `rotary` too."""

    def __init__(
        self,
        config: PretrainedConfig,
        quant: Quantization,
        rotary: RotaryEmbedding,
        local_rotary: RotaryEmbedding | None,
        softcap: float | None,
        qk_norm: bool,
    ):
        super().__init__()
        self.rotary, self.local_rotary = rotary, local_rotary
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        # In the model's dtype, as transformers multiplies (bf16 rounds sqrt(3072) = 55.43 to 55.5).
        self.register_buffer("normalizer", torch.tensor(config.hidden_size**0.5), persistent=False)
        self.layers = nn.ModuleList(
            GemmaDecoderLayer(config, i, quant, softcap, qk_norm) for i in range(config.num_hidden_layers)
        )
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids) * self.normalizer, None
        global_cos_sin = self.rotary.cos_sin(positions, hidden.dtype)
        local_cos_sin = (
            global_cos_sin if self.local_rotary is None else self.local_rotary.cos_sin(positions, hidden.dtype)
        )
        for layer in self.layers:
            hidden, residual = layer(local_cos_sin if layer.is_sliding else global_cos_sin, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class GemmaForCausalLM(nn.Module):
    """What Gemma 2 and Gemma 3 share; each passes its rotary tables, its attention soft-cap and
    whether it normalizes q and k."""

    # checkpoint name fragment -> (our parameter name fragment, shard id for its weight_loader)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(
        self,
        config: PretrainedConfig,
        quant: Quantization,
        rotary: RotaryEmbedding,
        local_rotary: RotaryEmbedding | None,
        softcap: float | None,
        qk_norm: bool,
    ):
        super().__init__()
        _check_config(config)
        self.model = GemmaModel(config, quant, rotary, local_rotary, softcap, qk_norm)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant.head_method())
        self.tie_word_embeddings = config.tie_word_embeddings
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.final_softcap = config.final_logit_softcapping

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions [T] -> hidden states [T, hidden]."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """[N, hidden] -> [N, vocab] float32 on rank 0 (soft-capped at final_logit_softcapping),
        None on other ranks."""
        logits = self.lm_head(hidden)
        if logits is None:
            return None
        logits = logits.float()
        if self.final_softcap:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits


class Gemma2ForCausalLM(GemmaForCausalLM):
    """Gemma 2: one rotary table for every layer, attention soft-capped at attn_logit_softcapping."""

    def __init__(self, config: PretrainedConfig, quant: Quantization):
        rotary = rotary_embedding(config, config.rope_parameters)
        super().__init__(config, quant, rotary, None, config.attn_logit_softcapping, qk_norm=False)
