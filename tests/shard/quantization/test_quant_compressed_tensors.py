"""compressed-tensors checkpoints made by the compressed_tensors library, read back by us and by transformers.

The library quantizes a random tiny Llama (min-max scales from its own calculate_qparams), packs it with its
compressor for the format and writes the config as llm-compressor does. transformers loads the same
directory with CompressedTensorsConfig(dequantize=True): the library's decompressors rebuild dense weights.
Ours must equal those weights exactly (both compute (q - zero) * scale, or q * scale, in float32 from float32
scales), and the logits must match within float32 summation order (1e-4, as tests/shard/test_model_parity.py).
Activations are not quantized on either side: on CPU we dequantize, as transformers does here.
"""

import pytest
import torch

pytest.importorskip("compressed_tensors")

from transformers import AutoModelForCausalLM, CompressedTensorsConfig  # noqa: E402

from tests.shard.quantization import writers as W  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")

# name: (weights, input activations, format); logits compared for some (the weights decide the rest)
SCHEMES = W.CT_SCHEMES
LOGITS = ("w4a16-asym-group", "w8a8-int8-static", "fp8-block")


@pytest.mark.parametrize("name", list(SCHEMES))
def test_weights_match_the_library_decompression(name):
    weights, inputs, fmt = SCHEMES[name]
    model_dir, _ = W.cached("ct", weights=weights, input_activations=inputs, fmt=fmt)
    hf = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
    ).eval()
    ours = W.shard_model(model_dir)
    dense = W.merged_weights(W.dense_model(), 0)["mlp.down_proj"]
    assert not torch.equal(ours.model.layers[0].mlp.down_proj.weight, dense)  # quantized, not the dense weight
    for i in range(hf.config.num_hidden_layers):
        for layer, expected in W.merged_weights(hf, i).items():
            got = ours.model.layers[i].get_submodule(layer).weight
            torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=lambda m, layer=layer: f"{layer}: {m}")
    if name in LOGITS:
        torch.testing.assert_close(W.cached_logits(model_dir), W.hf_logits(hf), rtol=0, atol=1e-4)


def test_w4a16_act_order_checkpoint():
    """actorder "group" (weight_g_idx): written by tests/shard/quantization/writers.py, as the library no longer
    writes it; checked against the writer's own dequantized weights."""
    model_dir, model = W.cached("ct-actorder", group_size=32)
    ours = W.shard_model(model_dir)
    for i in range(model.config.num_hidden_layers):
        for layer, expected in W.merged_weights(model, i).items():
            torch.testing.assert_close(ours.model.layers[i].get_submodule(layer).weight, expected, rtol=0, atol=0)
    torch.testing.assert_close(W.cached_logits(model_dir), W.hf_logits(model), rtol=0, atol=1e-4)
