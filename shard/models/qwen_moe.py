"""Qwen2-MoE and Qwen3-MoE: Qwen2's / Qwen3's attention, and as feed-forward a sparse
mixture-of-experts block (plus, in Qwen2-MoE, a shared expert behind a sigmoid gate) in the layers
the config makes sparse, a dense MLP in the others (`mlp_only_layers`, `decoder_sparse_step`).
The router's top-k weights are renormalized if `norm_topk_prob`."""

from transformers import PretrainedConfig

from shard.layers.moe import FusedMoE, expert_checkpoint_mapping
from shard.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from shard.quantization import Quantization


def _is_sparse(config: PretrainedConfig, layer_index: int) -> bool:
    """transformers' rule (Qwen2MoeDecoderLayer, Qwen3MoeDecoderLayer)."""
    return (
        layer_index not in config.mlp_only_layers
        and config.num_experts > 0
        and (layer_index + 1) % config.decoder_sparse_step == 0
    )


def _decoder_layer(config: PretrainedConfig, layer_index: int, quant: Quantization) -> LlamaDecoderLayer:
    if not _is_sparse(config, layer_index):
        return LlamaDecoderLayer(config, layer_index, quant)
    moe = FusedMoE(
        config.hidden_size,
        config.moe_intermediate_size,
        config.num_experts,
        config.num_experts_per_tok,
        renormalize=config.norm_topk_prob,
        quant=quant,
        shared_expert_intermediate_size=getattr(config, "shared_expert_intermediate_size", 0),
    )
    return LlamaDecoderLayer(config, layer_index, quant, mlp=moe)


class QwenMoeForCausalLM(LlamaForCausalLM):
    decoder_layer = _decoder_layer

    def __init__(self, config: PretrainedConfig, quant: Quantization):
        if config.hidden_act != "silu":
            raise ValueError(f"{config.architectures[0]} with hidden_act={config.hidden_act!r} is not supported")
        super().__init__(config, quant)
        # The expert entries come first (see expert_checkpoint_mapping); the shared expert and the
        # dense layers' MLPs load through Llama's gate_proj/up_proj entries.
        self.packed_modules_mapping = {
            **expert_checkpoint_mapping(config.num_experts, "mlp", "mlp", ("gate_proj", "up_proj", "down_proj")),
            **LlamaForCausalLM.packed_modules_mapping,
        }
