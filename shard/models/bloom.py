"""BLOOM built from tensor-parallel layers.

No position embedding: ALiBi biases each head's scores by its slope times the key's distance. A
LayerNorm after the word embeddings, q/k/v fused per head, LayerNorm and a GELU (tanh
approximation) MLP with biases; `apply_residual_connection_post_layernorm` takes the residual
after the norm. (`pretraining_tp` with `slow_but_exact` only orders transformers' sums by its
training shards: the same products, summed in another order.)
"""

import torch
from torch import nn
from transformers import PretrainedConfig

from shard.layers.activation import GELU
from shard.layers.attention import Attention, alibi_slopes
from shard.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from shard.layers.linear import ColumnParallelLinear, FusedQKVParallelLinear, RowParallelLinear
from shard.layers.norm import LayerNorm
from shard.quantization import Quantization


class BloomAttention(nn.Module):
    """This rank's heads: fused q/k/v (per-head layout), ALiBi attention, dense."""

    def __init__(self, config: PretrainedConfig, layer_index: int, quant: Quantization):
        super().__init__()
        h, heads = config.hidden_size, config.num_attention_heads
        head_dim = h // heads
        self.query_key_value = FusedQKVParallelLinear(
            h, head_dim, heads, heads, "per_head", True, quant.linear_method()
        )
        self.num_heads, self.head_dim = self.query_key_value.num_heads, head_dim
        self.dense = RowParallelLinear(h, h, True, quant.linear_method())
        self.attn = Attention(
            self.num_heads, self.num_heads, head_dim, head_dim**-0.5, layer_index, alibi_slopes=alibi_slopes(heads)
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [T, hidden] -> [T, hidden]."""
        q, k, v = self.query_key_value(hidden).view(-1, 3 * self.num_heads, self.head_dim).chunk(3, dim=1)
        return self.dense(self.attn(q, k, v))  # q, k, v [T, H, D] each


class BloomMLP(nn.Module):
    """dense_h_to_4h, GELU (tanh approximation), dense_4h_to_h."""

    def __init__(self, config: PretrainedConfig, quant: Quantization):
        super().__init__()
        h = config.hidden_size
        self.dense_h_to_4h = ColumnParallelLinear(h, 4 * h, True, quant.linear_method())
        self.dense_4h_to_h = RowParallelLinear(4 * h, h, True, quant.linear_method())
        self.act = GELU("gelu_pytorch_tanh")  # BLOOM's bloom_gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class BloomBlock(nn.Module):
    """input_layernorm, attention, residual; post_attention_layernorm, MLP, residual."""

    def __init__(self, config: PretrainedConfig, layer_index: int, quant: Quantization):
        super().__init__()
        h, eps = config.hidden_size, config.layer_norm_epsilon
        self.residual_after_norm = config.apply_residual_connection_post_layernorm
        self.input_layernorm = LayerNorm(h, eps)
        self.self_attention = BloomAttention(config, layer_index, quant)
        self.post_attention_layernorm = LayerNorm(h, eps)
        self.mlp = BloomMLP(config, quant)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        normed = self.input_layernorm(hidden)
        hidden = self.self_attention(normed) + (normed if self.residual_after_norm else hidden)
        normed = self.post_attention_layernorm(hidden)
        return self.mlp(normed) + (normed if self.residual_after_norm else hidden)


class BloomModel(nn.Module):
    def __init__(self, config: PretrainedConfig, quant: Quantization):
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.word_embeddings_layernorm = LayerNorm(config.hidden_size, config.layer_norm_epsilon)
        self.h = nn.ModuleList(BloomBlock(config, i, quant) for i in range(config.num_hidden_layers))
        self.ln_f = LayerNorm(config.hidden_size, config.layer_norm_epsilon)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.word_embeddings_layernorm(self.word_embeddings(input_ids))
        for layer in self.h:
            hidden = layer(hidden)
        return self.ln_f(hidden)


class BloomForCausalLM(nn.Module):
    """BLOOM with its LM head (tied to the embedding unless the config says otherwise)."""

    base_model_prefix = "transformer"  # BigScience's checkpoints name their tensors without it

    def __init__(self, config: PretrainedConfig, quant: Quantization):
        super().__init__()
        self.transformer = BloomModel(config, quant)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant.head_method())
        self.tie_word_embeddings = config.tie_word_embeddings
        if self.tie_word_embeddings:
            self.lm_head.weight = self.transformer.word_embeddings.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions [T] -> hidden states [T, hidden]; ALiBi reads positions from the cache."""
        return self.transformer(input_ids)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """[N, hidden] -> [N, vocab] float32 on rank 0, None on other ranks."""
        logits = self.lm_head(hidden)
        return None if logits is None else logits.float()
