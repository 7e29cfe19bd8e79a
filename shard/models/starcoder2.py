"""StarCoder2 built from tensor-parallel layers.

Llama's attention (separate q/k/v, rotary, grouped KV heads) with biases (`use_bias`) and a sliding
window over the sequence when the config sets `sliding_window`; LayerNorm and a GELU MLP
(c_fc, c_proj) in place of RMSNorm and SwiGLU.
"""

import torch
from torch import nn
from transformers import PretrainedConfig

from shard.layers.activation import GELU
from shard.layers.attention import Attention
from shard.layers.embed_head import ParallelLMHead
from shard.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from shard.layers.norm import LayerNorm
from shard.layers.rotary import apply_rotary, rotary_from_config
from shard.models.llama import LlamaModel, PreNormDecoderLayer
from shard.quantization import Quantization


class Starcoder2Attention(nn.Module):
    """This rank's heads: q/k/v (merged), rotary, paged attention over the window, o_proj."""

    def __init__(self, config: PretrainedConfig, layer_index: int, quant: Quantization):
        super().__init__()
        h, heads = config.hidden_size, config.num_attention_heads
        head_dim = h // heads
        self.qkv_proj = QKVParallelLinear(
            h, head_dim, heads, config.num_key_value_heads, config.use_bias, quant.linear_method()
        )
        self.num_heads, self.num_kv_heads, self.head_dim = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, head_dim
        self.o_proj = RowParallelLinear(h, h, config.use_bias, quant.linear_method())
        self.attn = Attention(
            self.num_heads,
            self.num_kv_heads,
            head_dim,
            head_dim**-0.5,
            layer_index,
            sliding_window=config.sliding_window,
        )

    def forward(self, cos_sin, hidden: torch.Tensor) -> torch.Tensor:
        """cos_sin: RotaryEmbedding.cos_sin of this step's positions; hidden [T, hidden] -> [T, hidden]."""
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        qkv = self.qkv_proj(hidden)
        qk = qkv[:, : q_size + kv_size].view(-1, self.num_heads + self.num_kv_heads, self.head_dim)  # [T, Hq+Hkv, D]
        v = qkv[:, q_size + kv_size :].view(-1, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        q, k = apply_rotary(qk, cos_sin).split([self.num_heads, self.num_kv_heads], dim=1)
        return self.o_proj(self.attn(q, k, v))


class Starcoder2MLP(nn.Module):
    """c_fc, GELU, c_proj."""

    def __init__(self, config: PretrainedConfig, quant: Quantization):
        super().__init__()
        h, inner = config.hidden_size, config.intermediate_size
        self.c_fc = ColumnParallelLinear(h, inner, config.use_bias, quant.linear_method())
        self.c_proj = RowParallelLinear(inner, h, config.use_bias, quant.linear_method())
        self.act = GELU(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class Starcoder2DecoderLayer(PreNormDecoderLayer):
    """Pre-norm block: input_layernorm, attention, post_attention_layernorm, MLP."""

    def __init__(self, config: PretrainedConfig, layer_index: int, quant: Quantization):
        super().__init__()
        self.self_attn = Starcoder2Attention(config, layer_index, quant)
        self.mlp = Starcoder2MLP(config, quant)
        self.input_layernorm = LayerNorm(config.hidden_size, config.norm_epsilon)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, config.norm_epsilon)


class Starcoder2ForCausalLM(nn.Module):
    """StarCoder2 with its LM head (tied to the embedding unless the config says otherwise)."""

    # checkpoint name fragment -> (our parameter name fragment, shard id for its weight_loader)
    packed_modules_mapping = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v")}

    def __init__(self, config: PretrainedConfig, quant: Quantization):
        super().__init__()
        norm = LayerNorm(config.hidden_size, config.norm_epsilon)
        self.model = LlamaModel(config, quant, Starcoder2DecoderLayer, rotary_from_config(config), norm)
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
