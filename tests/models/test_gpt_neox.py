"""GPT-NeoX against transformers: partial rotary, fused per-head q/k/v (sliced over two ranks),
parallel and sequential residual, greedy tokens over HTTP."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from shard import quantization
from shard.loader import load_weights
from shard.models import build_model
from tests.models import harness
from tests.shard.quantization import writers

ARCH = "GPTNeoXForCausalLM"
CONFIG = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    rotary_pct=0.5,
    max_position_embeddings=256,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return harness.write_checkpoint(tmp_path_factory.mktemp("neox"), ARCH, **CONFIG)


def test_prefill_and_decode_match_transformers(model_dir):
    harness.check_prefill_and_decode(model_dir, compiled=True)


def test_sequential_residual_matches_transformers(tmp_path):
    """use_parallel_residual=False, gelu_new and no attention biases."""
    config = dict(CONFIG, use_parallel_residual=False, hidden_act="gelu_new", attention_bias=False)
    harness.check_prefill_and_decode(
        harness.write_checkpoint(tmp_path, ARCH, seed=1, **config), prompt_lens=(21, 40), decode_steps=2
    )


def test_chunked_prefill_reads_the_cached_prefix(model_dir):
    harness.check_chunked_prefill(model_dir)


def test_two_ranks_match_one(model_dir):
    harness.check_tensor_parallel(model_dir)


def test_greedy_over_http_matches_generate(tmp_path):
    harness.check_http_greedy(harness.with_bundled_tokenizer(tmp_path, ARCH, **CONFIG))


def test_attention_mask_buffers_of_older_checkpoints_are_skipped(model_dir, tmp_path):
    """Pythia's checkpoints also hold each layer's causal mask (attention.bias, attention.masked_bias)."""
    tensors = load_file(model_dir / "model.safetensors")
    tensors["gpt_neox.layers.0.attention.bias"] = torch.ones(1, 1, 8, 8, dtype=torch.bool).tril()
    tensors["gpt_neox.layers.0.attention.masked_bias"] = torch.tensor(-1e9)
    save_file(tensors, tmp_path / "model.safetensors")
    target = quantization.Target(torch.device("cpu"), torch.float32, cpu_gemm="aten")
    model = build_model(AutoConfig.from_pretrained(model_dir), quantization.none(target))
    load_weights(model, tmp_path)
    loaded = model.gpt_neox.layers[0].attention.dense.weight
    assert torch.equal(loaded, tensors["gpt_neox.layers.0.attention.dense.weight"])


def test_awq_checkpoint_matches_transformers_on_its_dequantized_weights(tmp_path):
    """4-bit AWQ packs 8 values to an int32 along the outputs: the per-head fused q/k/v is reordered
    in packed units, and the logits are transformers' on the dequantized weights."""
    config = dict(CONFIG, hidden_size=128, intermediate_size=256)  # heads of 32: 4 packed words each
    model = harness.hf_model(harness.write_checkpoint(tmp_path / "dense", ARCH, std=0.1, **config))
    tensors = {"embed_out.weight" if k == "lm_head.weight" else k: v for k, v in model.state_dict().items()}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            q, scales, zeros, g_idx = writers.quantize_int4(module.weight.detach(), 32, sym=False)
            del tensors[f"{name}.weight"]
            tensors.update({f"{name}.{k}": v for k, v in writers.awq_tensors(q, scales, zeros).items()})
            with torch.no_grad():
                module.weight.copy_(writers.dequantize_int4(q, scales, zeros, g_idx))
    awq = dict(quant_method="awq", bits=4, group_size=32, zero_point=True, version="gemm")
    out = writers.save_checkpoint(tmp_path / "awq", model, tensors, awq)
    torch.testing.assert_close(writers.shard_logits(out), writers.hf_logits(model), atol=harness.ATOL, rtol=0)
