"""GPT-NeoX (GPT-NeoX-20B, Pythia, RedPajama-INCITE, ...) built from tensor-parallel layers.

LayerNorm, a GELU MLP with biases, q/k/v fused per head, rotary embedding over the first
`partial_rotary_factor` (rotary_pct) of each head, and, with `use_parallel_residual`, attention and
MLP both reading the layer's input: x + attn(ln1(x)) + mlp(ln2(x)).
"""

import torch
from torch import nn
from transformers import PretrainedConfig

from shard.layers.activation import GELU
from shard.layers.attention import Attention
from shard.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from shard.layers.linear import ColumnParallelLinear, FusedQKVParallelLinear, RowParallelLinear
from shard.layers.norm import LayerNorm
from shard.layers.rotary import apply_partial_rotary, rotary_from_config
from shard.quantization import Quantization


class GPTNeoXAttention(nn.Module):
    """This rank's heads: fused q/k/v (per-head layout), partial rotary, paged attention, dense."""

    def __init__(self, config: PretrainedConfig, layer_index: int, quant: Quantization):
        super().__init__()
        heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
        self.query_key_value = FusedQKVParallelLinear(
            config.hidden_size, head_dim, heads, heads, "per_head", config.attention_bias, quant.linear_method()
        )
        self.num_heads, self.head_dim = self.query_key_value.num_heads, head_dim
        self.dense = RowParallelLinear(
            config.hidden_size, config.hidden_size, config.attention_bias, quant.linear_method()
        )
        self.attn = Attention(self.num_heads, self.num_heads, head_dim, head_dim**-0.5, layer_index)

    def forward(self, cos_sin, hidden: torch.Tensor) -> torch.Tensor:
        """cos_sin: RotaryEmbedding.cos_sin of this step's positions; hidden [T, hidden] -> [T, hidden]."""
        qkv = self.query_key_value(hidden)
        size = self.num_heads * self.head_dim
        qk = qkv[:, : 2 * size].view(-1, 2 * self.num_heads, self.head_dim)  # [T, 2H, D]
        v = qkv[:, 2 * size :].view(-1, self.num_heads, self.head_dim)  # [T, H, D]
        q, k = apply_partial_rotary(qk, cos_sin).split([self.num_heads, self.num_heads], dim=1)
        return self.dense(self.attn(q, k, v))


class GPTNeoXMLP(nn.Module):
    """dense_h_to_4h, GELU, dense_4h_to_h, with biases."""

    def __init__(self, config: PretrainedConfig, quant: Quantization):
        super().__init__()
        self.dense_h_to_4h = ColumnParallelLinear(
            config.hidden_size, config.intermediate_size, True, quant.linear_method()
        )
        self.dense_4h_to_h = RowParallelLinear(
            config.intermediate_size, config.hidden_size, True, quant.linear_method()
        )
        self.act = GELU(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class GPTNeoXLayer(nn.Module):
    """One block, its residual parallel or sequential as `use_parallel_residual` says."""

    def __init__(self, config: PretrainedConfig, layer_index: int, quant: Quantization):
        super().__init__()
        self.use_parallel_residual = config.use_parallel_residual
        self.input_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.attention = GPTNeoXAttention(config, layer_index, quant)
        self.mlp = GPTNeoXMLP(config, quant)

    def forward(self, cos_sin, hidden: torch.Tensor) -> torch.Tensor:
        attn = self.attention(cos_sin, self.input_layernorm(hidden))
        if self.use_parallel_residual:
            return self.mlp(self.post_attention_layernorm(hidden)) + attn + hidden
        hidden = attn + hidden
        return self.mlp(self.post_attention_layernorm(hidden)) + hidden


class GPTNeoXModel(nn.Module):
    def __init__(self, config: PretrainedConfig, quant: Quantization):
        super().__init__()
        self.rotary = rotary_from_config(config)
        self.embed_in = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GPTNeoXLayer(config, i, quant) for i in range(config.num_hidden_layers))
        self.final_layer_norm = LayerNorm(config.hidden_size, config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_in(input_ids)
        cos_sin = self.rotary.cos_sin(positions, hidden.dtype)
        for layer in self.layers:
            hidden = layer(cos_sin, hidden)
        return self.final_layer_norm(hidden)


class GPTNeoXForCausalLM(nn.Module):
    """GPT-NeoX with its LM head (`embed_out`, as its checkpoints name it)."""

    unused_checkpoint_tensors = (".attention.bias", ".attention.masked_bias")  # older checkpoints' mask buffers

    def __init__(self, config: PretrainedConfig, quant: Quantization):
        super().__init__()
        self.gpt_neox = GPTNeoXModel(config, quant)
        self.embed_out = ParallelLMHead(config.vocab_size, config.hidden_size, quant.head_method())
        self.tie_word_embeddings = config.tie_word_embeddings
        if self.tie_word_embeddings:
            self.embed_out.weight = self.gpt_neox.embed_in.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions [T] -> hidden states [T, hidden]."""
        return self.gpt_neox(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """[N, hidden] -> [N, vocab] float32 on rank 0, None on other ranks."""
        logits = self.embed_out(hidden)
        return None if logits is None else logits.float()
