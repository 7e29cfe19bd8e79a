"""`make gpu-kit`: what the GPU machine lacks, prepared here, into `.whl/` and `.gpukit/` (ignored).

The lent GPU machine (Python 3.12, torch, Triton, transformers, aiohttp, grpcio...; no network)
receives the working tree plus the paths a device call carries. This gathers:
- `.whl/`: cp312 manylinux wheels of the packages its image lacks (opentelemetry,
  python-json-logger, pytest-asyncio) and of protobuf and grpcio at the versions our generated
  code was made with (its own may be older), at the versions this venv runs;
- `.gpukit/tokenizer/`: the bundled model's tokenizer and config (no weights: the check builds
  random-weight models from configs there);
- the protobuf code, generated here by `make proto` (router/pb, shard/pb), so grpcio-tools is not
  needed there.
It fails if the tree that travels would exceed the 64 MiB a device call carries.
"""

import argparse
import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CARRY_LIMIT = 64 << 20
WHEELS = [
    "opentelemetry-api",
    "opentelemetry-sdk",
    "opentelemetry-semantic-conventions",
    "opentelemetry-exporter-otlp-proto-grpc",
    "opentelemetry-exporter-otlp-proto-common",
    "opentelemetry-exporter-otlp-common",
    "opentelemetry-proto",
    "googleapis-common-protos",
    "python-json-logger",
    "pytest-asyncio",
    "protobuf",
    "grpcio",
    "llguidance",  # grammars (router validation, shard masks)
    "pydantic",  # the router's HTTP protocols
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
]
# pip matches manylinux tags exactly: the ones these packages publish.
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34)] + ["manylinux2014_x86_64", "any"]
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json"]
CARRIED = [".whl", ".gpukit", "router/pb", "shard/pb"]  # what a device call names in `carry`


def download_wheels(dest: Path) -> list[Path]:
    """The WHEELS at this venv's versions, alone in `dest` (two versions of one stop the install there)."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(dest), *pins]
    subprocess.run(cmd, check=True)
    return sorted(dest.glob("*.whl"))


def tracked_bytes() -> int:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / f.decode()).stat().st_size for f in files if f and (ROOT / f.decode()).is_file())


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct")
    p.add_argument("--out", type=Path, default=ROOT / ".gpukit")
    p.add_argument("--wheels", type=Path, default=ROOT / ".whl")
    a = p.parse_args(argv)
    wheels = download_wheels(a.wheels)
    tokenizer = a.out / "tokenizer"
    tokenizer.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy(a.model_dir / name, tokenizer / name)
    for pb in ("router/pb/shard_pb2.py", "shard/pb/shard_pb2.py"):
        if not (ROOT / pb).exists():
            raise SystemExit(f"{pb} is missing: run `make proto` first")
    carried = sum(tree_bytes(ROOT / c) for c in CARRIED)
    total = carried + tracked_bytes()
    print(f"gpu-kit: {len(wheels)} wheels in {a.wheels}; tokenizer in {tokenizer}")
    print(f"carried {carried / 2**20:.1f} MiB + tracked tree = {total / 2**20:.1f} MiB of {CARRY_LIMIT >> 20} MiB")
    if total > CARRY_LIMIT:
        raise SystemExit("gpu-kit: over the device call's limit")


if __name__ == "__main__":
    main()
