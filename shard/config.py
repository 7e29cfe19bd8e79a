"""`ShardConfig`: a shard's one config; its flags (configflags) and the launcher's forwarding derive from it.

Standard library only, as configflags is: the launcher imports it for the flags it passes on."""

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from configflags import flag


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
CPU_GEMM_KERNELS = ("auto", "onednn", "amx", "avx2", "aten")  # shard/kernels/cpu_gemm.py


@dataclass(frozen=True, slots=True)
class ShardConfig:
    """Everything one shard process needs; built only by shard/cli.py. Its `flag` fields are its flags
    (see configflags); forward=True: the launcher accepts the flag and passes it on."""

    model_dir: Path = flag(help="model directory (config.json + safetensors)", option="--model-id")
    rank: int = flag(0, "this shard's tensor-parallel rank")
    world_size: int = flag(1, "tensor-parallel ranks")
    master_addr: str = flag("127.0.0.1", "rank 0's address for the collectives")
    master_port: int = flag(29500, "rank 0's port for the collectives")
    uds_path: str = flag("/tmp/sluice-shard", "listen on {uds-path}-{rank}")
    port: int | None = flag(None, "listen on TCP instead of a unix socket")
    host: str = flag("127.0.0.1", "TCP address to bind with --port")
    device: str = flag("auto", "torch device (auto: cuda:{rank} with CUDA, else cpu)")
    # auto: bfloat16 on CUDA (float16 if the model says so) and on CPUs with AVX512-BF16 or AMX
    dtype: str = flag(
        "auto",
        "weights and activations (auto: bfloat16 where the hardware has it, else float32)",
        choices=("auto", "float32", "float16", "bfloat16"),
        forward=True,
    )
    quantize: str | None = flag(
        None,
        "quantize the weights at load (int8: weight-only, int8-dynamic: W8A8, fp8, bitsandbytes, "
        "bitsandbytes-nf4, bitsandbytes-fp4), or name the checkpoint's own format (gptq, awq, "
        "compressed-tensors, fp8), which is otherwise read from its config.json",
        choices=(
            "int8",
            "int8-dynamic",
            "fp8",
            "bitsandbytes",
            "bitsandbytes-nf4",
            "bitsandbytes-fp4",
            "gptq",
            "awq",
            "compressed-tensors",
        ),
        forward=True,
    )
    block_size: int = flag(16, "tokens per KV block", forward=True)
    cuda_memory_fraction: float = flag(
        0.9, "fraction of GPU memory for weights, activations and KV cache", forward=True
    )
    cpu_kv_cache_bytes: int = flag(
        4 << 30, "KV cache size on CPU in GiB (default: 4)", option="--cpu-kv-cache-gb", type=gigabytes, forward=True
    )
    cpu_gemm: str = flag(
        "auto",
        "CPU linear layers, weights packed at load: oneDNN, our AMX kernels (bfloat16 weights) or our AVX2 "
        "ones (auto: AMX for bfloat16 weights on CPUs with AMX, AVX2 on CPUs without AVX-512, oneDNN "
        "elsewhere); aten: F.linear (MKL)",
        choices=CPU_GEMM_KERNELS,
        forward=True,
    )
    enforce_eager: bool = flag(False, "run the model eagerly: no compiled forward (CPU), no CUDA graphs", forward=True)
    cuda_graphs: tuple[int, ...] = flag(
        CUDA_GRAPH_SIZES,
        "decode batch sizes captured as CUDA graphs, comma-separated (0: none)",
        type=batch_sizes,
        forward=True,
    )
    compile_cache_dir: Path = flag(
        help="compiled CPU kernels and Inductor graphs, reused across restarts",
        default_factory=default_cache_dir,
        forward=True,
    )
    otlp_endpoint: str | None = flag(None, "OTLP/gRPC endpoint for traces (none: no tracing)", forward=True)
    otlp_service_name: str = flag("sluice", "service name of the traces (.router, .shard appended)", forward=True)
    watermark_gamma: float = flag(0.5, "watermark green-list fraction", forward=True)
    watermark_delta: float = flag(2.0, "watermark logit bias", forward=True)
    json_output: bool = flag(False, "log one JSON object per line")

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block size must be a power of two, got {self.block_size}")
        if self.cpu_gemm not in CPU_GEMM_KERNELS:
            raise ValueError(f"cpu_gemm must be one of {', '.join(CPU_GEMM_KERNELS)}, got {self.cpu_gemm!r}")
        if not 0 < self.cuda_memory_fraction <= 1:
            raise ValueError(f"--cuda-memory-fraction must be in (0, 1], got {self.cuda_memory_fraction}")
        if self.enforce_eager:
            object.__setattr__(self, "cuda_graphs", ())  # frozen: set once, here

    @property
    def address(self) -> str:
        """The gRPC address this shard listens on."""
        return f"{self.host}:{self.port}" if self.port else f"unix://{self.uds_path}-{self.rank}"
