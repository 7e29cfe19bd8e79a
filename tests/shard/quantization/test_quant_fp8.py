"""FP8 checkpoints (quant_method fp8), served dequantized on CPU; `--quantize fp8` (CUDA only).

The checkpoints hold torch's own float8_e4m3fn cast of each weight divided by its scale. transformers loads
the block-wise and the transformers-style per-tensor ones itself (it dequantizes FP8 on a machine without a
GPU), so they are compared with it; the AutoFP8-style one (`weight_scale`, static `input_scale`) with the
writer's dequantized weights. Weights must be equal exactly (an e4m3 value times a float32 scale, in float32
on both sides), logits within 1e-4 (float32 summation order; see test_quant_gptq_awq.py).
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from shard.quantization import Target, resolve
from tests.shard.quantization import writers as W


def _check_weights(model_dir, reference) -> None:
    ours = W.shard_model(model_dir)
    for i in range(reference.config.num_hidden_layers):
        for name, expected in W.merged_weights(reference, i).items():
            torch.testing.assert_close(ours.model.layers[i].get_submodule(name).weight, expected, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["block-32x32", "per-tensor-scale-inv"])
def test_fp8_checkpoint_matches_transformers(case):
    kw = dict(block=(32, 32)) if case.startswith("block") else dict(scale_name="weight_scale_inv")
    model_dir, _ = W.cached("fp8", **kw)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    _check_weights(model_dir, hf)
    torch.testing.assert_close(W.cached_logits(model_dir), W.hf_logits(hf), rtol=0, atol=1e-4)


def test_autofp8_checkpoint_with_static_input_scales():
    """Per-tensor `weight_scale` (0-dim), one per projection of merged q/k/v and gate/up, and `input_scale`."""
    model_dir, model = W.cached("fp8", static_input=True)
    _check_weights(model_dir, model)
    torch.testing.assert_close(W.cached_logits(model_dir), W.hf_logits(model), rtol=0, atol=1e-4)


def test_quantize_fp8_is_refused_without_an_fp8_gpu():
    from transformers import LlamaConfig

    config = LlamaConfig(**W.TINY)
    with pytest.raises(ValueError, match="--quantize fp8 needs a CUDA GPU with FP8 support"):
        resolve("fp8", config, Target(torch.device("cpu"), torch.float32))
    if not torch.cuda.is_available():  # a CUDA target without an FP8 GPU (here: none at all): the reason
        with pytest.raises(ValueError, match="--quantize fp8 cannot run on cuda: CUDA is not available"):
            resolve("fp8", config, Target(torch.device("cuda"), torch.bfloat16))
