"""T5 (T5, T5 v1.1, Flan-T5, mT5's architecture) built from tensor-parallel layers: an encoder-decoder.

The encoder runs once per request, when the shard receives it (`encode`): bidirectional attention
over the request's input with T5's bucketed relative position bias, dense and unpaged, since only
its output is kept, as every decoder layer's cross-attention K/V in the request's encoder blocks.
The decoder then runs like a decoder-only model over the paged cache (`forward`): causal
self-attention with the relative bias as the kernels' `position_bias` feature (one table by
distance, computed by the first layer and shared by all, as T5 does) and cross-attention over the
encoder blocks. T5 does not scale attention scores; with `scale_decoder_outputs` (T5 1.0's tied
head) the decoder output is scaled by d_model ** -0.5 before the LM head. Module names follow the
checkpoint's, so the loader needs no mapping.
"""

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.activations import ACT2FN
from transformers.models.t5.modeling_t5 import T5Attention as _HFT5Attention

from shard import dist
from shard.layers.attention import Attention
from shard.layers.cross_attention import CrossAttention
from shard.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from shard.layers.linear import ColumnParallelLinear, RowParallelLinear
from shard.layers.norm import RMSNorm
from shard.quantization import Quantization


class RelativePositionBias(nn.Module):
    """T5's learned bias per (distance bucket, head); this rank holds its heads' columns."""

    def __init__(self, config: PretrainedConfig, bidirectional: bool):
        super().__init__()
        self.num_buckets, self.max_distance = (
            config.relative_attention_num_buckets,
            config.relative_attention_max_distance,
        )
        self.bidirectional = bidirectional
        self.num_heads = config.num_heads // dist.tp_size()
        self.weight = nn.Parameter(torch.empty(self.num_buckets, self.num_heads), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        # The decoder's table by distance: beyond max_distance every distance shares the last bucket.
        distances = torch.arange(self.max_distance + 1)
        self.register_buffer("_distance_buckets", self._bucket(-distances), persistent=False)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        first = dist.tp_rank() * self.num_heads
        param.data.copy_(loaded[:, first : first + self.num_heads])

    def _bucket(self, relative_position: torch.Tensor) -> torch.Tensor:
        """Key position minus query position -> T5's bucket (its own function, from transformers)."""
        return _HFT5Attention._relative_position_bucket(
            relative_position, self.bidirectional, self.num_buckets, self.max_distance
        )

    def table(self) -> torch.Tensor:
        """[heads, max_distance + 1] float32: the causal bias by distance (query minus key position),
        the last entry serving every longer distance: the kernels' `position_bias`."""
        return self.weight[self._distance_buckets].t().float().contiguous()

    def dense(self, length: int) -> torch.Tensor:
        """[heads, length, length] float32: the bias between every two of `length` positions."""
        positions = torch.arange(length, device=self.weight.device)
        return self.weight[self._bucket(positions[None, :] - positions[:, None])].permute(2, 0, 1).float()


class _Projections(nn.Module):
    """q, k, v (column-parallel over heads) and o (row-parallel), no biases."""

    def __init__(self, config: PretrainedConfig, quant: Quantization):
        super().__init__()
        inner = config.num_heads * config.d_kv
        self.num_heads, self.head_dim = config.num_heads // dist.tp_size(), config.d_kv
        self.q, self.k, self.v = (
            ColumnParallelLinear(config.d_model, inner, False, quant.linear_method()) for _ in range(3)
        )
        self.o = RowParallelLinear(inner, config.d_model, False, quant.linear_method())

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """[T, heads * D] -> [T, heads, D]."""
        return x.view(x.shape[0], self.num_heads, self.head_dim)


class EncoderSelfAttention(_Projections):
    def __init__(self, config: PretrainedConfig, quant: Quantization, has_bias: bool):
        super().__init__(config, quant)
        if has_bias:
            self.relative_attention_bias = RelativePositionBias(config, bidirectional=True)

    def forward(self, hidden: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """hidden [S, d_model] (one request's input), bias [heads, S, S] -> [S, d_model]."""
        q, k, v = (self.heads(p(hidden)).transpose(0, 1) for p in (self.q, self.k, self.v))  # [heads, S, D]
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)
        return self.o(out.transpose(0, 1).reshape(hidden.shape[0], -1))


class DecoderSelfAttention(_Projections):
    def __init__(self, config: PretrainedConfig, quant: Quantization, layer_index: int, has_bias: bool):
        super().__init__(config, quant)
        if has_bias:
            self.relative_attention_bias = RelativePositionBias(config, bidirectional=False)
        self.attn = Attention(self.num_heads, self.num_heads, self.head_dim, 1.0, layer_index)

    def forward(self, hidden: torch.Tensor, position_bias: torch.Tensor) -> torch.Tensor:
        """hidden [T, d_model], position_bias [heads, L] (RelativePositionBias.table) -> [T, d_model]."""
        q, k, v = (self.heads(p(hidden)) for p in (self.q, self.k, self.v))
        return self.o(self.attn(q, k, v, position_bias=position_bias))


class EncDecAttention(_Projections):
    def __init__(self, config: PretrainedConfig, quant: Quantization, layer_index: int):
        super().__init__(config, quant)
        self.attn = CrossAttention(1.0, layer_index)

    def store(self, encoder_output: torch.Tensor, slots: torch.Tensor) -> None:
        """encoder_output [S, d_model] of one request: its K/V into `slots` [S] of its encoder blocks."""
        self.attn.store(self.heads(self.k(encoder_output)), self.heads(self.v(encoder_output)), slots)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [T, d_model] -> [T, d_model]."""
        return self.o(self.attn(self.heads(self.q(hidden))))


class DenseActDense(nn.Module):
    """wi (or gated: wi_0 through the activation times wi_1), then wo; named as T5's checkpoints name
    the module (DenseReluDense) whatever its activation."""

    def __init__(self, config: PretrainedConfig, quant: Quantization):
        super().__init__()
        d, ff = config.d_model, config.d_ff
        self.gated = config.is_gated_act
        if self.gated:
            self.wi_0 = ColumnParallelLinear(d, ff, False, quant.linear_method())
            self.wi_1 = ColumnParallelLinear(d, ff, False, quant.linear_method())
        else:
            self.wi = ColumnParallelLinear(d, ff, False, quant.linear_method())
        self.wo = RowParallelLinear(ff, d, False, quant.linear_method())
        self.act = ACT2FN[config.dense_act_fn]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[T, d_model] -> [T, d_model]."""
        hidden = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        return self.wo(hidden)


class _Sublayer(nn.Module):
    """Pre-norm sublayer: x + f(layer_norm(x)), f named as in the checkpoint."""

    def __init__(self, config: PretrainedConfig, name: str, module: nn.Module):
        super().__init__()
        self.name = name
        self.add_module(name, module)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, hidden: torch.Tensor, *args) -> torch.Tensor:
        return hidden + getattr(self, self.name)(self.layer_norm(hidden), *args)


class EncoderBlock(nn.Module):
    def __init__(self, config: PretrainedConfig, quant: Quantization, index: int):
        super().__init__()
        self.layer = nn.ModuleList(
            [
                _Sublayer(config, "SelfAttention", EncoderSelfAttention(config, quant, has_bias=index == 0)),
                _Sublayer(config, "DenseReluDense", DenseActDense(config, quant)),
            ]
        )

    def forward(self, hidden: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.layer[1](self.layer[0](hidden, bias))


class DecoderBlock(nn.Module):
    def __init__(self, config: PretrainedConfig, quant: Quantization, index: int):
        super().__init__()
        self.layer = nn.ModuleList(
            [
                _Sublayer(config, "SelfAttention", DecoderSelfAttention(config, quant, index, has_bias=index == 0)),
                _Sublayer(config, "EncDecAttention", EncDecAttention(config, quant, index)),
                _Sublayer(config, "DenseReluDense", DenseActDense(config, quant)),
            ]
        )

    def forward(self, hidden: torch.Tensor, position_bias: torch.Tensor) -> torch.Tensor:
        return self.layer[2](self.layer[1](self.layer[0](hidden, position_bias)))


class T5Stack(nn.Module):
    def __init__(self, config: PretrainedConfig, quant: Quantization, block, num_blocks: int):
        super().__init__()
        self.block = nn.ModuleList(block(config, quant, i) for i in range(num_blocks))
        self.final_layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)

    def relative_attention_bias(self) -> RelativePositionBias:
        return self.block[0].layer[0].SelfAttention.relative_attention_bias


class T5ForConditionalGeneration(nn.Module):
    is_encoder_decoder = True
    # The embedding is `shared`; the copies some checkpoints also hold under these names are the same.
    unused_checkpoint_tensors = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")

    def __init__(self, config: PretrainedConfig, quant: Quantization):
        super().__init__()
        self.shared = VocabParallelEmbedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, quant, EncoderBlock, config.num_layers)
        self.decoder = T5Stack(config, quant, DecoderBlock, config.num_decoder_layers)
        # The head: the checkpoint's lm_head (T5 1.1 and Flan-T5 have their own), else the embedding,
        # as transformers does (T5 1.0 checkpoints, and every T5 that transformers 5 saves, have none).
        self.lm_head = ParallelLMHead(config.vocab_size, config.d_model, quant.head_method())
        self.lm_head.weight.optional = True
        load_head = self.lm_head.weight.weight_loader

        def load_own_head(param: nn.Parameter, loaded, shard_id=None) -> None:
            self.has_own_head = True
            load_head(param, loaded)

        self.lm_head.weight.weight_loader = load_own_head
        self.has_own_head = False
        self.output_scale = config.d_model**-0.5 if getattr(config, "scale_decoder_outputs", True) else 1.0

    def process_weights_after_loading(self) -> None:
        """Tie the head to the embedding when the checkpoint has no head of its own (runs before
        the head processes its weight: modules() yields the model first)."""
        if not self.has_own_head:
            self.lm_head.weight = self.shared.weight

    @torch.inference_mode()
    def encode(self, input_ids: torch.Tensor, slots: torch.Tensor) -> None:
        """One request's encoder input [S] -> every decoder layer's cross-attention K/V of its output,
        stored at `slots` [S] (int64) of the layer's cache (the forward context's)."""
        hidden = self.shared(input_ids)  # [S, d_model]
        bias = self.encoder.relative_attention_bias().dense(input_ids.shape[0])  # [heads, S, S]
        for block in self.encoder.block:
            hidden = block(hidden, bias)
        hidden = self.encoder.final_layer_norm(hidden)
        for block in self.decoder.block:
            block.layer[1].EncDecAttention.store(hidden, slots)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Decoder input_ids, positions [T] -> hidden states [T, d_model] (positions are implicit in
        the paged attention's sequence lengths: T5 has no position embeddings)."""
        hidden = self.shared(input_ids)
        position_bias = self.decoder.relative_attention_bias().table()  # [heads, max_distance + 1]
        for block in self.decoder.block:
            hidden = block(hidden, position_bias)
        return self.decoder.final_layer_norm(hidden) * self.output_scale

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """[N, d_model] -> [N, vocab] float32 on rank 0, None on other ranks."""
        logits = self.lm_head(hidden)
        return None if logits is None else logits.float()
