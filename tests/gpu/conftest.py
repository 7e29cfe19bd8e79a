"""The GPU tests: every module here is marked `gpu` (tests/conftest.py skips them, with the reason,
without CUDA, and keeps gpu tests in this directory alone).

They run on the lent GPU machine through `make gpu-check`, which builds random-weight models in
production shapes and names their directory in SLUICE_GPU_MODELS.
"""

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def gpu_models() -> Path:
    """Directory of the check's models: smollm2-135m/ and qwen3-0.6b/, bf16 random weights."""
    path = os.environ.get("SLUICE_GPU_MODELS")
    if not path:
        pytest.fail("SLUICE_GPU_MODELS is unset: run the gpu tests through `make gpu-check`")
    return Path(path)
