"""Load safetensors weights into a model whose parameters carry `weight_loader`s.

Each rank opens the files lazily and reads only its own slice of every tensor.
"""

from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn


def _default_loader(param: nn.Parameter, loaded, shard_id=None) -> None:
    param.data.copy_(loaded[:])


def load_weights(model: nn.Module, model_dir: Path) -> None:
    """Fill every parameter of `model` from `model_dir/*.safetensors`; fail on a missing one."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {model_dir}")
    params = dict(model.named_parameters())  # tied weights appear once
    packed = getattr(model, "packed_modules_mapping", {})
    loaded: set[tuple[str, object]] = set()  # (parameter, shard id)
    # Tensors some checkpoints hold that are no weights (GPT-NeoX's attention masks), by name suffix.
    unused = tuple(getattr(model, "unused_checkpoint_tensors", ()))
    # A base model's checkpoint (BLOOM's) names its tensors without the prefix of the model's parameters.
    prefix = getattr(model, "base_model_prefix", None)
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                if "rotary_emb.inv_freq" in name or name.endswith(unused):
                    continue
                target, shard_id = name, None
                for fragment, (packed_name, packed_id) in packed.items():
                    if f".{fragment}." in name:
                        target, shard_id = name.replace(fragment, packed_name), packed_id
                        break
                if target not in params and prefix and f"{prefix}.{target}" in params:
                    target = f"{prefix}.{target}"
                param = params.get(target)
                if param is None:
                    if name == "lm_head.weight" and getattr(model, "tie_word_embeddings", False):
                        continue
                    raise KeyError(f"checkpoint tensor {name} has no parameter in the model")
                loader = getattr(param, "weight_loader", _default_loader)
                with torch.no_grad():
                    loader(param, f.get_slice(name), shard_id) if shard_id is not None else loader(
                        param, f.get_slice(name)
                    )
                loaded.add((target, shard_id))
    # A merged parameter needs every projection's tensor; `optional` ones (a format's tensors that
    # some of its checkpoints omit) none.
    shard_ids = {}
    for packed_name, packed_id in packed.values():
        shard_ids.setdefault(f".{packed_name}.", []).append(packed_id)
    missing = [
        name if shard_id is None else f"{name} ({shard_id})"
        for name, param in params.items()
        if not getattr(param, "optional", False)
        for shard_id in next((ids for frag, ids in shard_ids.items() if frag in name), [None])
        if (name, shard_id) not in loaded
    ]
    if missing:
        raise KeyError(f"parameters missing from the checkpoint: {missing[:5]}")
