"""The Llama family (Llama, Mistral, Qwen2, Qwen3, SmolLM) built from tensor-parallel layers.

Differences between members are read from the config: Qwen2 has q/k/v biases, Qwen3
normalizes q and k per head, some models tie the LM head to the embedding, Mistral and some
Qwen2/Qwen3 layers attend over a sliding window.
"""

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from shard.layers.activation import SiluAndMul
from shard.layers.attention import Attention
from shard.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from shard.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from shard.layers.norm import RMSNorm
from shard.layers.rotary import RotaryEmbedding, apply_rotary
from shard.quantization import Quantization


def _head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _sliding_window(config: PretrainedConfig, layer_index: int) -> int | None:
    """The window of layer `layer_index` as transformers applies it: Mistral's (Mixtral's, Qwen3-MoE's)
    every layer has `sliding_window`; a Qwen2/Qwen3/Qwen2-MoE layer has it where `layer_types` says
    "sliding_attention" (the config fills layer_types from max_window_layers, and drops sliding_window
    unless use_sliding_window); Llama ignores the field."""
    window = getattr(config, "sliding_window", None)
    if config.model_type in ("mistral", "mixtral", "qwen3_moe"):
        return window
    if config.model_type in ("qwen2", "qwen3", "qwen2_moe") and config.layer_types[layer_index] == "sliding_attention":
        return window
    return None


def _rotary(config: PretrainedConfig) -> RotaryEmbedding:
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        dim, theta = _head_dim(config), params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        inv_freq, scaling = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim), 1.0
    else:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    return RotaryEmbedding(inv_freq, config.max_position_embeddings, scaling)


class LlamaAttention(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_index: int, quant: Quantization):
        super().__init__()
        head_dim = _head_dim(config)
        # Qwen2 always, Qwen2-MoE by its `qkv_bias`: biases on q/k/v and none on o.
        qkv_bias = getattr(config, "qkv_bias", config.model_type == "qwen2")
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            head_dim,
            config.num_attention_heads,
            config.num_key_value_heads,
            bias=qkv_bias or getattr(config, "attention_bias", False),
            quant=quant.linear_method(),
        )
        self.num_heads, self.num_kv_heads, self.head_dim = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, head_dim
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * head_dim,
            config.hidden_size,
            bias=getattr(config, "attention_bias", False) and not qkv_bias,
            quant=quant.linear_method(),
        )
        self.has_qk_norm = config.model_type in ("qwen3", "qwen3_moe")
        if self.has_qk_norm:
            self.q_norm = RMSNorm(head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(head_dim, config.rms_norm_eps)
        self.attn = Attention(
            self.num_heads,
            self.num_kv_heads,
            head_dim,
            head_dim**-0.5,
            layer_index,
            sliding_window=_sliding_window(config, layer_index),
        )

    def forward(self, cos_sin, hidden: torch.Tensor) -> torch.Tensor:
        """cos_sin: RotaryEmbedding.cos_sin of this step's positions; hidden [T, hidden]."""
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        qkv = self.qkv_proj(hidden)
        qk = qkv[:, : q_size + kv_size].view(-1, self.num_heads + self.num_kv_heads, self.head_dim)  # [T, Hq+Hkv, D]
        v = qkv[:, q_size + kv_size :].view(-1, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        if self.has_qk_norm:
            qk = torch.cat([self.q_norm(qk[:, : self.num_heads]), self.k_norm(qk[:, self.num_heads :])], dim=1)
        q, k = apply_rotary(qk, cos_sin).split([self.num_heads, self.num_kv_heads], dim=1)
        return self.o_proj(self.attn(q, k, v))


class LlamaMLP(nn.Module):
    def __init__(self, config: PretrainedConfig, quant: Quantization):
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [config.intermediate_size] * 2, bias, quant.linear_method()
        )
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias, quant.linear_method())
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class PreNormDecoderLayer(nn.Module):
    """Norm, attention, norm, MLP, with the residual add fused into the norms. Subclasses build
    `self_attn`, `mlp`, `input_layernorm` and `post_attention_layernorm`."""

    def forward(self, cos_sin, hidden: torch.Tensor, residual: torch.Tensor | None):
        """hidden [T, hidden], residual [T, hidden] (None before the first layer) -> the pair after
        this layer; their sum is the residual stream."""
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(cos_sin, hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaDecoderLayer(PreNormDecoderLayer):
    """Pre-norm attention then feed-forward: `mlp` (hidden [T, hidden] -> [T, hidden], summed over
    ranks), a dense LlamaMLP unless given (the MoE families pass their sparse blocks)."""

    def __init__(self, config: PretrainedConfig, layer_index: int, quant: Quantization, mlp: nn.Module | None = None):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_index, quant)
        self.mlp = LlamaMLP(config, quant) if mlp is None else mlp
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaModel(nn.Module):
    """Embedding, decoder layers sharing one rotary table, final norm: the body of Llama and of the
    families whose layers differ but whose model does not (`decoder_layer`, `rotary`, `norm`)."""

    def __init__(
        self,
        config: PretrainedConfig,
        quant: Quantization,
        decoder_layer=LlamaDecoderLayer,
        rotary: nn.Module | None = None,
        norm: nn.Module | None = None,
    ):
        super().__init__()
        self.rotary = rotary or _rotary(config)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(decoder_layer(config, i, quant) for i in range(config.num_hidden_layers))
        self.norm = norm or RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        cos_sin = self.rotary.cos_sin(positions, hidden.dtype)
        for layer in self.layers:
            hidden, residual = layer(cos_sin, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    # checkpoint name fragment -> (our parameter name fragment, shard id for its weight_loader)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    # (config, layer_index, quant) -> a layer with LlamaDecoderLayer's forward; the MoE families' differ
    decoder_layer = LlamaDecoderLayer

    def __init__(self, config: PretrainedConfig, quant: Quantization):
        super().__init__()
        self.model = LlamaModel(config, quant, type(self).decoder_layer)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant.head_method())
        self.tie_word_embeddings = getattr(config, "tie_word_embeddings", False)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions [T] -> hidden states [T, hidden]."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """[N, hidden] -> [N, vocab] float32 on rank 0, None on other ranks."""
        logits = self.lm_head(hidden)
        return None if logits is None else logits.float()
