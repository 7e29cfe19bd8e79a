"""GPTBigCode (StarCoder, SantaCoder, WizardCoder, ...) built from tensor-parallel layers.

GPT-2's block (LayerNorm, GELU MLP, biases everywhere) with learned absolute position embeddings
(wpe) and, with `multi_query`, one KV head shared by all heads: under tensor parallelism each rank
keeps a copy of it (QKVParallelLinear's replication).
"""

import torch
from torch import nn
from transformers import PretrainedConfig

from shard.layers.activation import GELU
from shard.layers.attention import Attention
from shard.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from shard.layers.linear import ColumnParallelLinear, FusedQKVParallelLinear, RowParallelLinear
from shard.layers.norm import LayerNorm
from shard.quantization import Quantization


class GPTBigCodeAttention(nn.Module):
    """This rank's heads: fused c_attn (q then the KV head with multi_query, else per head), c_proj."""

    def __init__(self, config: PretrainedConfig, layer_index: int, quant: Quantization):
        super().__init__()
        h, heads = config.hidden_size, config.num_attention_heads
        head_dim = h // heads
        kv_heads, layout = (1, "qkv") if config.multi_query else (heads, "per_head")
        self.c_attn = FusedQKVParallelLinear(h, head_dim, heads, kv_heads, layout, True, quant.linear_method())
        self.num_heads, self.num_kv_heads, self.head_dim = self.c_attn.num_heads, self.c_attn.num_kv_heads, head_dim
        self.c_proj = RowParallelLinear(h, h, True, quant.linear_method())
        scale = head_dim**-0.5 if config.scale_attn_weights else 1.0
        self.attn = Attention(self.num_heads, self.num_kv_heads, head_dim, scale, layer_index)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [T, hidden] -> [T, hidden]."""
        q, k, v = self.c_attn(hidden).split(
            [self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.num_kv_heads * self.head_dim],
            dim=-1,
        )
        q = q.view(-1, self.num_heads, self.head_dim)  # [T, Hq, D]
        k, v = k.view(-1, self.num_kv_heads, self.head_dim), v.view(-1, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        return self.c_proj(self.attn(q, k, v))


class GPTBigCodeMLP(nn.Module):
    """c_fc, the activation, c_proj."""

    def __init__(self, config: PretrainedConfig, quant: Quantization):
        super().__init__()
        inner = config.n_inner or 4 * config.hidden_size
        self.c_fc = ColumnParallelLinear(config.hidden_size, inner, True, quant.linear_method())
        self.c_proj = RowParallelLinear(inner, config.hidden_size, True, quant.linear_method())
        self.act = GELU(config.activation_function)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPTBigCodeBlock(nn.Module):
    """ln_1, attention, residual; ln_2, MLP, residual."""

    def __init__(self, config: PretrainedConfig, layer_index: int, quant: Quantization):
        super().__init__()
        self.ln_1 = LayerNorm(config.hidden_size, config.layer_norm_epsilon)
        self.attn = GPTBigCodeAttention(config, layer_index, quant)
        self.ln_2 = LayerNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mlp = GPTBigCodeMLP(config, quant)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None):
        if residual is None:
            residual, hidden = hidden, self.ln_1(hidden)
        else:
            hidden, residual = self.ln_1(hidden, residual)
        hidden, residual = self.ln_2(self.attn(hidden), residual)
        return self.mlp(hidden), residual


class GPTBigCodeModel(nn.Module):
    def __init__(self, config: PretrainedConfig, quant: Quantization):
        super().__init__()
        self.wte = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)  # every rank holds all of it
        self.wpe.weight.requires_grad_(False)
        self.h = nn.ModuleList(GPTBigCodeBlock(config, i, quant) for i in range(config.num_hidden_layers))
        self.ln_f = LayerNorm(config.hidden_size, config.layer_norm_epsilon)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden, residual = self.wte(input_ids) + self.wpe(positions), None
        for layer in self.h:
            hidden, residual = layer(hidden, residual)
        hidden, _ = self.ln_f(hidden, residual)
        return hidden


class GPTBigCodeForCausalLM(nn.Module):
    """GPTBigCode with its LM head (tied to the token embedding unless the config says otherwise)."""

    def __init__(self, config: PretrainedConfig, quant: Quantization):
        super().__init__()
        if config.add_cross_attention:
            raise ValueError(
                "GPTBigCode with cross-attention (add_cross_attention) is an encoder-decoder: not supported"
            )
        self.transformer = GPTBigCodeModel(config, quant)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant.head_method())
        self.tie_word_embeddings = config.tie_word_embeddings
        if self.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions [T] -> hidden states [T, hidden]."""
        return self.transformer(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """[N, hidden] -> [N, vocab] float32 on rank 0, None on other ranks."""
        logits = self.lm_head(hidden)
        return None if logits is None else logits.float()
