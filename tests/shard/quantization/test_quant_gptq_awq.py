"""GPTQ and AWQ checkpoints: our dequantized weights and logits against the checkpoints' own arithmetic.

The checkpoints are written by tests/shard/quantization/writers.py with the packing loops of AutoGPTQ and
AutoAWQ (not with our unpacking reversed); the writer also computes every dequantized weight (q - z) * s
from the integers and scales it packed, and loads those weights into transformers' LlamaForCausalLM.

Tolerances: the dequantized weights must be equal exactly: both sides compute (q - z) * s in float32, an
integer of at most 5 bits times a float16 scale, which float32 represents exactly. The logits then come
from the same float32 weights through two implementations (our paged attention and oneDNN GEMMs against
transformers' eager attention and MKL), so they differ by float32 summation order only: 1e-4 absolute, the
tolerance of tests/shard/test_model_parity.py, on logits of magnitude ~2.
"""

import numpy as np
import pytest
import torch

from shard.quantization import int4
from tests.shard.quantization import writers as W

ATOL = 1e-4


def _check_weights(model_dir, model) -> None:
    ours = W.shard_model(model_dir)
    for i in range(model.config.num_hidden_layers):
        for name, expected in W.merged_weights(model, i).items():
            torch.testing.assert_close(ours.model.layers[i].get_submodule(name).weight, expected, rtol=0, atol=0)


def test_unpacking_inverts_the_tools_packing():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (64, 96), generator=g)
    packed = W.gptq_tensors(q, torch.ones(1, 96), q[:1], torch.zeros(64, dtype=torch.int64), v1=False)
    assert torch.equal(int4.unpack(packed["qweight"], 0).long(), q)  # GPTQ: 8 inputs per word
    assert torch.equal(int4.unpack(packed["qzeros"], 1).long(), q[:1])  # GPTQ zeros: 8 outputs per word
    awq = torch.from_numpy(W.awq_pack(q.numpy()).view(np.int32))
    assert torch.equal(int4.unpack_awq(awq, 1).long(), q)  # AWQ: 8 interleaved outputs per word
    assert not torch.equal(int4.unpack(awq, 1).long(), q)  # (the interleaving matters)


# name: (checkpoint, whether to compare logits too: the dequantized weights decide them, so two cases suffice)
GPTQ_CASES = {
    "v1-asym-g32": (dict(group_size=32, sym=False, v1=True), True),
    "v2-sym-g64": (dict(group_size=64, sym=True, v1=False), False),
    "act-order-g32": (dict(group_size=32, desc_act=True), True),
    "per-channel": (dict(group_size=-1), False),
}


@pytest.mark.parametrize("case", list(GPTQ_CASES))
def test_gptq_weights_and_logits_match_the_dequantized_model(case):
    kw, logits = GPTQ_CASES[case]
    model_dir, model = W.cached("gptq", **kw)
    _check_weights(model_dir, model)
    if logits:
        torch.testing.assert_close(W.cached_logits(model_dir), W.hf_logits(model), rtol=0, atol=ATOL)


def test_awq_weights_and_logits_match_the_dequantized_model():
    model_dir, model = W.cached("awq", group_size=32)
    _check_weights(model_dir, model)
    torch.testing.assert_close(W.cached_logits(model_dir), W.hf_logits(model), rtol=0, atol=ATOL)


def test_dequantized_layers_are_packed_for_onednn():
    """On CPU a 4-bit checkpoint serves as fast as the unquantized model: every linear is oneDNN-packed."""
    from shard.config import ShardConfig
    from shard.kernels import cpu_native
    from shard.runner import ModelRunner

    model_dir, _ = W.cached("awq", group_size=32)
    runner = ModelRunner(ShardConfig(model_dir=model_dir, device="cpu", dtype="float32", enforce_eager=True))
    assert runner.quantization.name == "awq" and runner.quantization.pre_quantized
    layers = [m for m in runner.model.modules() if hasattr(m, "quant_method")]
    assert len(layers) == 8
    for layer in layers:
        assert not any(n in layer._parameters for n in ("qweight", "qzeros", "scales"))  # released
        if torch.backends.mkldnn.is_available() and cpu_native.is_loaded():
            assert layer.packed_weight is not None
