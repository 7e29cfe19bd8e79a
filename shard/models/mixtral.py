"""Mixtral: Mistral's attention and a sparse mixture-of-experts block as every layer's feed-forward
(softmax router, top-k experts with their weights renormalized to sum to 1)."""

from transformers import PretrainedConfig

from shard.layers.moe import FusedMoE, expert_checkpoint_mapping
from shard.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from shard.quantization import Quantization


def _decoder_layer(config: PretrainedConfig, layer_index: int, quant: Quantization) -> LlamaDecoderLayer:
    moe = FusedMoE(
        config.hidden_size,
        config.intermediate_size,
        config.num_local_experts,
        config.num_experts_per_tok,
        renormalize=True,
        quant=quant,
    )
    return LlamaDecoderLayer(config, layer_index, quant, mlp=moe)


class MixtralForCausalLM(LlamaForCausalLM):
    decoder_layer = _decoder_layer

    def __init__(self, config: PretrainedConfig, quant: Quantization):
        if config.hidden_act != "silu":
            raise ValueError(f"Mixtral with hidden_act={config.hidden_act!r} is not supported (only 'silu')")
        super().__init__(config, quant)
        # Checkpoints call the block `block_sparse_moe` (ours is Llama's `mlp`) and an expert's gate,
        # down and up projections w1, w2, w3. The expert entries come first (see expert_checkpoint_mapping).
        self.packed_modules_mapping = {
            **expert_checkpoint_mapping(config.num_local_experts, "block_sparse_moe", "mlp", ("w1", "w3", "w2")),
            "block_sparse_moe.gate": ("mlp.gate", None),
            **LlamaForCausalLM.packed_modules_mapping,
        }
