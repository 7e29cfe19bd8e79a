"""Shared fixtures: tiny random models written like real checkpoints, and the bundled model."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BUNDLED_MODEL = REPO / "models" / "SmolLM2-135M-Instruct"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Without CUDA the Triton kernels run under the interpreter, which must be chosen before anything
# imports triton (torch.compile does, in the tests of the compiled CPU forward).
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    for item in items:  # the attack suite: reduced in `make test`, full with `make soak`
        if "tests/reliability/" in item.nodeid:
            item.add_marker(pytest.mark.reliability)
        if ("gpu" in item.keywords) != item.nodeid.startswith("tests/gpu/"):
            raise pytest.UsageError(
                f"{item.nodeid}: gpu tests are marked `gpu` and live in tests/gpu/ (make gpu-check)"
            )
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device: runs on the GPU machine through `make gpu-check`")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


TINY_CONFIGS = {
    "llama": dict(
        architectures=["LlamaForCausalLM"],
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=384,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        rope_theta=10000.0,
    ),
    "qwen2": dict(
        architectures=["Qwen2ForCausalLM"],
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        vocab_size=384,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        rope_theta=1000000.0,
    ),
    "qwen3": dict(
        architectures=["Qwen3ForCausalLM"],
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=384,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        rope_theta=1000000.0,
    ),
}


def make_tiny_model(kind: str, out_dir: Path, seed: int = 0) -> Path:
    """Write a random `kind` model (config.json + model.safetensors) to `out_dir` in float32."""
    import torch
    import transformers

    arch = TINY_CONFIGS[kind]["architectures"][0]
    config_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    config = config_cls(**TINY_CONFIGS[kind], torch_dtype="float32", eos_token_id=1, bos_token_id=0)
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).float().eval()
    with torch.no_grad():  # random weights large enough that logits differ meaningfully
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


@pytest.fixture(scope="session", params=sorted(TINY_CONFIGS))
def tiny_model_dir(request, tmp_path_factory) -> Path:
    return make_tiny_model(request.param, tmp_path_factory.mktemp(f"tiny-{request.param}"))


@pytest.fixture(scope="session")
def bundled_model_dir() -> Path:
    if not (BUNDLED_MODEL / "model.safetensors").exists():
        pytest.fail(f"{BUNDLED_MODEL} is missing: run `make model`")
    return BUNDLED_MODEL
