"""`ShardConfig`: a shard's one config; its flags (configflags) and the launcher's forwarding derive from it.

Standard library only: the launcher imports it for the flags it passes on."""

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path


def default_cache_dir() -> Path:
    """Where compiled kernels and graphs live unless told otherwise: $XDG_CACHE_HOME/sluice."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sluice"


def gigabytes(text: str) -> int:
    """ "1.5" -> bytes in 1.5 GiB."""
    return int(float(text) * (1 << 30))


def batch_sizes(text: str) -> tuple[int, ...]:
    """ "1,2,4" -> (1, 2, 4); "0" -> ()."""
    try:
        sizes = tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated batch sizes, got {text!r}") from None
    if sizes == (0,):
        return ()
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive (or 0 alone), got {text!r}")
    return sizes


CUDA_GRAPH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True, slots=True)
class ShardConfig:
    """Everything one shard process needs; built only by shard/cli.py. Fields with a "help" are flags
    (see configflags); "forward": the launcher accepts the flag and passes it on."""

    model_dir: Path = field(metadata={"flag": "--model-id", "help": "model directory (config.json + safetensors)"})
    rank: int = field(default=0, metadata={"help": "this shard's tensor-parallel rank"})
    world_size: int = field(default=1, metadata={"help": "tensor-parallel ranks"})
    master_addr: str = field(default="127.0.0.1", metadata={"help": "rank 0's address for the collectives"})
    master_port: int = field(default=29500, metadata={"help": "rank 0's port for the collectives"})
    uds_path: str = field(default="/tmp/sluice-shard", metadata={"help": "listen on {uds-path}-{rank}"})
    port: int | None = field(default=None, metadata={"help": "listen on TCP instead of a unix socket"})
    host: str = field(default="127.0.0.1", metadata={"help": "TCP address to bind with --port"})
    device: str = field(default="auto", metadata={"help": "torch device (auto: cuda:{rank} with CUDA, else cpu)"})
    dtype: str = field(  # "auto": bfloat16 on CUDA (float16 if the model says so) and on CPUs with native
        # bfloat16 (AVX512-BF16 or AMX), float32 on other CPUs
        default="auto",
        metadata={
            "choices": ("auto", "float32", "float16", "bfloat16"),
            "help": "weights and activations (auto: bfloat16 where the hardware has it, else float32)",
            "forward": True,
        },
    )
    block_size: int = field(default=16, metadata={"help": "tokens per KV block", "forward": True})
    cuda_memory_fraction: float = field(
        default=0.9,
        metadata={"help": "fraction of GPU memory for weights, activations and KV cache", "forward": True},
    )
    cpu_kv_cache_bytes: int = field(
        default=4 << 30,
        metadata={
            "flag": "--cpu-kv-cache-gb",
            "type": gigabytes,
            "help": "KV cache size on CPU in GiB (default: 4)",
            "forward": True,
        },
    )
    cpu_gemm: str = field(  # CPU linear layers: "onednn" (weights packed at load) or "aten" (F.linear, MKL)
        default="onednn",
        metadata={
            "choices": ("onednn", "aten"),
            "help": "CPU linear layers: oneDNN with weights packed at load, or F.linear (MKL)",
        },
    )
    enforce_eager: bool = field(  # run the model eagerly; otherwise its forward is compiled on CPU
        default=False,
        metadata={"help": "run the model eagerly: no compiled forward (CPU), no CUDA graphs", "forward": True},
    )
    cuda_graphs: tuple[int, ...] = field(  # decode batch sizes captured on CUDA; () with enforce_eager
        default=CUDA_GRAPH_SIZES,
        metadata={
            "type": batch_sizes,
            "help": "decode batch sizes captured as CUDA graphs, comma-separated (0: none)",
            "forward": True,
        },
    )
    compile_cache_dir: Path = field(
        default_factory=default_cache_dir,
        metadata={"help": "compiled CPU kernels and Inductor graphs, reused across restarts", "forward": True},
    )
    otlp_endpoint: str | None = field(
        default=None, metadata={"help": "OTLP/gRPC endpoint for traces (none: no tracing)", "forward": True}
    )
    otlp_service_name: str = field(
        default="sluice", metadata={"help": "service name of the traces (.router, .shard appended)", "forward": True}
    )
    watermark_gamma: float = field(default=0.5, metadata={"help": "watermark green-list fraction", "forward": True})
    watermark_delta: float = field(default=2.0, metadata={"help": "watermark logit bias", "forward": True})
    json_output: bool = field(default=False, metadata={"help": "log one JSON object per line"})

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block size must be a power of two, got {self.block_size}")
        if self.cpu_gemm not in ("onednn", "aten"):
            raise ValueError(f"cpu_gemm must be 'onednn' or 'aten', got {self.cpu_gemm!r}")
        if not 0 < self.cuda_memory_fraction <= 1:
            raise ValueError(f"--cuda-memory-fraction must be in (0, 1], got {self.cuda_memory_fraction}")
        if self.enforce_eager:
            object.__setattr__(self, "cuda_graphs", ())  # frozen: set once, here

    @property
    def address(self) -> str:
        """The gRPC address this shard listens on."""
        return f"{self.host}:{self.port}" if self.port else f"unix://{self.uds_path}-{self.rank}"
