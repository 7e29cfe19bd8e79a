import os
from dataclasses import dataclass, field
from pathlib import Path


def default_cache_dir() -> Path:
    """Where compiled kernels and graphs live unless told otherwise: $XDG_CACHE_HOME/sluice."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sluice"


CUDA_GRAPH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True, slots=True)
class ShardConfig:
    """Everything one shard process needs; built only by shard/cli.py."""

    model_dir: Path
    rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    uds_path: str = "/tmp/sluice-shard"  # listens on f"{uds_path}-{rank}" unless `port` is set
    port: int | None = None
    host: str = "127.0.0.1"
    device: str = "auto"  # "auto": cuda:{rank} when CUDA is available, else cpu
    dtype: str = "auto"  # "auto": bfloat16 on CUDA (float16 if the model says so) and on CPUs with native
    # bfloat16 (AVX512-BF16 or AMX), float32 on other CPUs
    block_size: int = 16
    cuda_memory_fraction: float = 0.9
    cpu_kv_cache_bytes: int = 4 << 30
    cpu_gemm: str = "onednn"  # CPU linear layers: "onednn" (weights packed at load) or "aten" (F.linear, MKL)
    enforce_eager: bool = False  # run the model eagerly; otherwise its forward is compiled on CPU
    cuda_graphs: tuple[int, ...] = CUDA_GRAPH_SIZES  # decode batch sizes captured on CUDA
    compile_cache_dir: Path = field(default_factory=default_cache_dir)  # compiled kernels and graphs
    otlp_endpoint: str | None = None
    otlp_service_name: str = "sluice"
    watermark_gamma: float = 0.5
    watermark_delta: float = 2.0

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block size must be a power of two, got {self.block_size}")
        if self.cpu_gemm not in ("onednn", "aten"):
            raise ValueError(f"cpu_gemm must be 'onednn' or 'aten', got {self.cpu_gemm!r}")
        if not 0 < self.cuda_memory_fraction <= 1:
            raise ValueError(f"--cuda-memory-fraction must be in (0, 1], got {self.cuda_memory_fraction}")

    @property
    def address(self) -> str:
        """The gRPC address this shard listens on."""
        return f"{self.host}:{self.port}" if self.port else f"unix://{self.uds_path}-{self.rank}"
