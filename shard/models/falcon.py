"""Falcon built from tensor-parallel layers, in both of its decoder architectures.

The new one (Falcon-40B/180B, `new_decoder_architecture`): grouped KV heads (`num_kv_heads`), q/k/v
fused per KV group, and attention and MLP reading the layer's input through norms of their own
(ln_attn, ln_mlp; one shared when `num_ln_in_parallel_attn` is 1). The old one (Falcon-7B, RW):
one KV head (`multi_query`) or one per head, attention and MLP in parallel from one
input_layernorm (`parallel_attn`) or in sequence with a post_attention_layernorm. Positions are
rotary, or ALiBi (`alibi`, Falcon-RW) with slopes divided by sqrt(head_dim) as transformers does.
"""

import torch
from torch import nn
from transformers import PretrainedConfig

from shard.layers.activation import GELU
from shard.layers.attention import Attention, alibi_slopes
from shard.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from shard.layers.linear import ColumnParallelLinear, FusedQKVParallelLinear, RowParallelLinear
from shard.layers.norm import LayerNorm
from shard.layers.rotary import apply_rotary, rotary_from_config
from shard.quantization import Quantization


def _two_norms(config: PretrainedConfig) -> bool:
    """Whether attention and MLP each have their own input norm (ln_attn, ln_mlp)."""
    return config.new_decoder_architecture and (config.num_ln_in_parallel_attn or 2) == 2


class FalconAttention(nn.Module):
    """This rank's heads: fused q/k/v in the architecture's layout, rotary or ALiBi, dense."""

    def __init__(self, config: PretrainedConfig, layer_index: int, quant: Quantization):
        super().__init__()
        heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
        if config.new_decoder_architecture:
            kv_heads, layout = config.num_kv_heads, "grouped"
        elif config.multi_query:
            kv_heads, layout = 1, "qkv"
        else:
            kv_heads, layout = heads, "per_head"
        self.query_key_value = FusedQKVParallelLinear(
            config.hidden_size, head_dim, heads, kv_heads, layout, config.bias, quant.linear_method()
        )
        self.num_heads, self.num_kv_heads = self.query_key_value.num_heads, self.query_key_value.num_kv_heads
        self.head_dim = head_dim
        self.dense = RowParallelLinear(config.hidden_size, config.hidden_size, config.bias, quant.linear_method())
        self.rotary = not config.alibi
        slopes = None if self.rotary else alibi_slopes(heads) * head_dim**-0.5
        self.attn = Attention(
            self.num_heads, self.num_kv_heads, head_dim, head_dim**-0.5, layer_index, alibi_slopes=slopes
        )

    def forward(self, cos_sin, hidden: torch.Tensor) -> torch.Tensor:
        """cos_sin: RotaryEmbedding.cos_sin of this step's positions (None with ALiBi);
        hidden [T, hidden] -> [T, hidden]."""
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        qkv = self.query_key_value(hidden)
        qk = qkv[:, : q_size + kv_size].view(-1, self.num_heads + self.num_kv_heads, self.head_dim)  # [T, Hq+Hkv, D]
        v = qkv[:, q_size + kv_size :].view(-1, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        if self.rotary:
            qk = apply_rotary(qk, cos_sin)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        return self.dense(self.attn(q, k, v))


class FalconMLP(nn.Module):
    """dense_h_to_4h, the activation, dense_4h_to_h."""

    def __init__(self, config: PretrainedConfig, quant: Quantization):
        super().__init__()
        h, ffn = config.hidden_size, config.ffn_hidden_size
        self.dense_h_to_4h = ColumnParallelLinear(h, ffn, config.bias, quant.linear_method())
        self.dense_4h_to_h = RowParallelLinear(ffn, h, config.bias, quant.linear_method())
        self.act = GELU(config.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class FalconDecoderLayer(nn.Module):
    """One block: attention and MLP in parallel (one or two input norms) or in sequence."""

    def __init__(self, config: PretrainedConfig, layer_index: int, quant: Quantization):
        super().__init__()
        h, eps = config.hidden_size, config.layer_norm_epsilon
        self.parallel_attn = config.parallel_attn
        self.two_norms = _two_norms(config)
        if self.two_norms:
            self.ln_attn, self.ln_mlp = LayerNorm(h, eps), LayerNorm(h, eps)
        else:
            self.input_layernorm = LayerNorm(h, eps)
        if not self.parallel_attn:
            self.post_attention_layernorm = LayerNorm(h, eps)
        self.self_attention = FalconAttention(config, layer_index, quant)
        self.mlp = FalconMLP(config, quant)

    def forward(self, cos_sin, hidden: torch.Tensor) -> torch.Tensor:
        if self.two_norms:
            attn_in, mlp_in = self.ln_attn(hidden), self.ln_mlp(hidden)
        else:
            attn_in = mlp_in = self.input_layernorm(hidden)
        attn = self.self_attention(cos_sin, attn_in)
        if self.parallel_attn:
            return (self.mlp(mlp_in) + attn) + hidden
        hidden = attn + hidden
        return self.mlp(self.post_attention_layernorm(hidden)) + hidden


class FalconModel(nn.Module):
    def __init__(self, config: PretrainedConfig, quant: Quantization):
        super().__init__()
        self.rotary = None if config.alibi else rotary_from_config(config)
        self.word_embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.h = nn.ModuleList(FalconDecoderLayer(config, i, quant) for i in range(config.num_hidden_layers))
        self.ln_f = LayerNorm(config.hidden_size, config.layer_norm_epsilon)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.word_embeddings(input_ids)
        cos_sin = None if self.rotary is None else self.rotary.cos_sin(positions, hidden.dtype)
        for layer in self.h:
            hidden = layer(cos_sin, hidden)
        return self.ln_f(hidden)


class FalconForCausalLM(nn.Module):
    """Falcon with its LM head (tied to the embedding unless the config says otherwise)."""

    def __init__(self, config: PretrainedConfig, quant: Quantization):
        super().__init__()
        if config.new_decoder_architecture and not config.parallel_attn:
            raise ValueError(
                "Falcon with new_decoder_architecture runs attention and MLP in parallel; parallel_attn=False is "
                "not supported (transformers cannot run it either)"
            )
        self.transformer = FalconModel(config, quant)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant.head_method())
        self.tie_word_embeddings = config.tie_word_embeddings
        if self.tie_word_embeddings:
            self.lm_head.weight = self.transformer.word_embeddings.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions [T] -> hidden states [T, hidden]."""
        return self.transformer(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """[N, hidden] -> [N, vocab] float32 on rank 0, None on other ranks."""
        logits = self.lm_head(hidden)
        return None if logits is None else logits.float()
