"""Registry of supported architectures, keyed by `config.architectures[0]`.

Each entry names the module (under shard.models) and class that implement it; the module is
imported only when a checkpoint asks for it.
"""

import importlib

from torch import nn
from transformers import PretrainedConfig

from shard import dist
from shard.quantization import Quantization

REGISTRY: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen3ForCausalLM": ("llama", "LlamaForCausalLM"),
    "MixtralForCausalLM": ("mixtral", "MixtralForCausalLM"),
    "Qwen2MoeForCausalLM": ("qwen_moe", "QwenMoeForCausalLM"),
    "Qwen3MoeForCausalLM": ("qwen_moe", "QwenMoeForCausalLM"),
    "Gemma2ForCausalLM": ("gemma2", "Gemma2ForCausalLM"),
    "Gemma3ForCausalLM": ("gemma3", "Gemma3ForCausalLM"),
    "Phi3ForCausalLM": ("phi3", "Phi3ForCausalLM"),
    "GPTNeoXForCausalLM": ("gpt_neox", "GPTNeoXForCausalLM"),
    "FalconForCausalLM": ("falcon", "FalconForCausalLM"),
    "GPTBigCodeForCausalLM": ("gpt_bigcode", "GPTBigCodeForCausalLM"),
    "Starcoder2ForCausalLM": ("starcoder2", "Starcoder2ForCausalLM"),
    "BloomForCausalLM": ("bloom", "BloomForCausalLM"),
    "T5ForConditionalGeneration": ("t5", "T5ForConditionalGeneration"),
}


def build_model(config: PretrainedConfig, quant: Quantization) -> nn.Module:
    arch = (config.architectures or ["?"])[0]
    if arch not in REGISTRY:
        raise ValueError(f"unsupported architecture {arch!r}; supported: {', '.join(sorted(REGISTRY))}")
    _check_divisible(config)
    module, cls = REGISTRY[arch]
    return getattr(importlib.import_module(f"shard.models.{module}"), cls)(config, quant)


def _check_divisible(config: PretrainedConfig) -> None:
    """Fail early, naming the numbers, when the heads cannot be split over the shards.

    A model with fewer KV heads than ranks (multi-query attention) replicates them instead."""
    tp = dist.tp_size()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    for name, value in (("num_attention_heads", heads), ("num_key_value_heads", kv_heads)):
        if value % tp and not (name == "num_key_value_heads" and tp % value == 0):
            raise ValueError(f"{config.architectures[0]} has {name}={value}, which does not divide by --num-shard {tp}")
