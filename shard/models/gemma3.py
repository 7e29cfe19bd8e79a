"""Gemma 3's text model (Gemma3ForCausalLM): Gemma 2 (gemma2.py) with q and k normalized per
head, and local layers rotating by a table of their own (rope_parameters["sliding_attention"],
from rope_local_base_freq) while global ones use rope_parameters["full_attention"] (rope_theta,
possibly scaled). No attention soft-capping."""

from transformers import PretrainedConfig

from shard.models.gemma2 import GemmaForCausalLM, rotary_embedding
from shard.quantization import Quantization


class Gemma3ForCausalLM(GemmaForCausalLM):
    """Gemma 3 (text): q/k norms, local and global rotary tables."""

    def __init__(self, config: PretrainedConfig, quant: Quantization):
        if config.attn_logit_softcapping is not None:  # transformers' Gemma 3 does not apply it either
            raise ValueError("Gemma3ForCausalLM: attn_logit_softcapping is not supported")
        params = config.rope_parameters
        super().__init__(
            config,
            quant,
            rotary_embedding(config, params["full_attention"], "full_attention"),
            rotary_embedding(config, params["sliding_attention"], "sliding_attention"),
            softcap=None,
            qk_norm=True,
        )
