"""`--quantize` at load: each scheme's logits stay close to the full-precision model's, its weights
shrink, and a scheme the device or checkpoint cannot serve fails at startup with the reason."""

import pytest
import torch

from shard import quantization
from shard.config import ShardConfig, default_cache_dir
from shard.kernels import cpu_int8, cpu_native
from shard.quantization import QuantizationError, Target
from shard.runner import ModelRunner
from shard.sampler import SamplingParams
from shard.step import Batch, RequestState
from tests.conftest import make_tiny_model

CPU = Target(torch.device("cpu"), torch.float32)
cpu_native.load(default_cache_dir())


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"))


def _logits(model_dir, quantize: str | None) -> tuple[torch.Tensor, ModelRunner]:
    """Logits [40, vocab] of a 40-token prompt, float32, eager."""
    runner = ModelRunner(
        ShardConfig(model_dir=model_dir, device="cpu", dtype="float32", quantize=quantize, enforce_eager=True)
    )
    runner.warmup(64, 4, max_num_blocks=8)
    ids = torch.randint(2, 384, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    state = RequestState(0, ids, len(ids), 0, [1, 2, 3], SamplingParams())
    return runner.forward(Batch([state], [len(ids)]), sample_rows_override=torch.arange(40)), runner


@pytest.fixture(scope="module")
def dense(llama_dir):
    return _logits(llama_dir, None)


# Relative error of the logits each scheme may show on the tiny model's N(0, 0.2) weights:
# per-channel int8 rounds each weight by at most scale/2 (0.4% of the row's largest); W8A8 adds
# the same for activations; LLM.int8 keeps outliers in 16 bits; 4-bit formats round 16x coarser.
SCHEMES = {
    "int8": 0.02,
    "int8-dynamic": 0.04,
    "bitsandbytes": 0.04,
    "bitsandbytes-nf4": 0.25,
    "bitsandbytes-fp4": 0.35,
}


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_scheme_logits_stay_close_and_weights_shrink(llama_dir, dense, scheme):
    if scheme.startswith("bitsandbytes"):
        pytest.importorskip("bitsandbytes")
    if scheme == "int8-dynamic" and not cpu_int8.available(dynamic=True)[0]:
        with pytest.raises(QuantizationError, match="VNNI.*use --quantize int8"):  # this CPU has no VNNI
            _logits(llama_dir, scheme)
        return
    logits, runner = _logits(llama_dir, scheme)
    reference, dense_runner = dense
    error = ((logits - reference).norm() / reference.norm()).item()
    assert error < SCHEMES[scheme], f"{scheme}: relative logits error {error:.4f}"
    assert runner.quantization.name == scheme
    assert runner.weight_bytes < dense_runner.weight_bytes


def test_no_quantization_is_the_dense_model(dense):
    _, runner = dense
    assert runner.quantization.name is None and runner.quantization.describe() == "none"


def test_fp8_on_cpu_is_refused_with_the_reason(llama_dir):
    with pytest.raises(QuantizationError, match="(?i)fp8.*(cpu|compute capability)"):
        quantization.resolve("fp8", _config(llama_dir), CPU)


def test_a_checkpoint_format_without_its_checkpoint_is_refused(llama_dir):
    with pytest.raises(QuantizationError, match="quantization_config.*int8, int8-dynamic"):
        quantization.resolve("gptq", _config(llama_dir), CPU)


def test_an_unsupported_checkpoint_format_names_the_supported_ones(llama_dir):
    config = _config(llama_dir)
    config.quantization_config = {"quant_method": "exl2", "bits": 4}
    with pytest.raises(QuantizationError, match="'exl2'.*supported pre-quantized formats: .*gptq"):
        quantization.resolve(None, config, CPU)


def test_quantize_must_agree_with_the_checkpoint(llama_dir):
    config = _config(llama_dir)
    config.quantization_config = {"quant_method": "gptq", "bits": 4, "group_size": 32}
    with pytest.raises(QuantizationError, match="already quantized with gptq"):
        quantization.resolve("int8", config, CPU)


def _config(model_dir):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir)
