"""Registry of supported architectures, keyed by `config.architectures[0]`."""

from torch import nn
from transformers import PretrainedConfig

from shard import dist
from shard.models import llama
from shard.quantization import Quantization

REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": llama.LlamaForCausalLM,
    "MistralForCausalLM": llama.LlamaForCausalLM,
    "Qwen2ForCausalLM": llama.LlamaForCausalLM,
    "Qwen3ForCausalLM": llama.LlamaForCausalLM,
}


def build_model(config: PretrainedConfig, quant: Quantization) -> nn.Module:
    arch = (config.architectures or ["?"])[0]
    if arch not in REGISTRY:
        raise ValueError(f"unsupported architecture {arch!r}; supported: {', '.join(sorted(REGISTRY))}")
    _check_divisible(config)
    return REGISTRY[arch](config, quant)


def _check_divisible(config: PretrainedConfig) -> None:
    """Fail early, naming the numbers, when the heads cannot be split over the shards."""
    tp = dist.tp_size()
    for name in ("num_attention_heads", "num_key_value_heads"):
        if getattr(config, name) % tp:
            raise ValueError(
                f"{config.architectures[0]} has {name}={getattr(config, name)}, "
                f"which does not divide by --num-shard {tp}"
            )
