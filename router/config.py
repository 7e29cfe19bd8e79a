from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """Everything the router process needs; built only by router/cli.py."""

    model_dir: Path
    shard_addresses: tuple[str, ...]
    model_id: str = ""  # the name /info and /v1/models report; defaults to the directory name
    hostname: str = "0.0.0.0"
    port: int = 3000
    max_concurrent_requests: int = 128
    max_best_of: int = 2
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_client_batch_size: int = 4
    max_input_tokens: int | None = None  # None: derived from the model (TGI's defaults)
    max_total_tokens: int | None = None
    max_batch_prefill_tokens: int | None = None
    max_batch_size: int = 256
    prefix_caching: bool = True
    overlap_steps: bool = True  # schedule and send step N+1 while the shards compute step N
    max_batch_total_tokens: int | None = None  # cap on the KV pool in tokens; None: what warmup finds
    waiting_served_ratio: float = 0.0
    max_waiting_tokens: int = 20
    max_prefill_slowdown: float = 2.0  # see SchedulerConfig
    long_prompt_tokens: int = 512  # see SchedulerConfig
    payload_limit: int = 2_000_000
    api_key: str | None = None  # required as `Authorization: Bearer <key>` on generation routes
    cors_allow_origins: tuple[str, ...] = ()  # empty: any origin
    otlp_endpoint: str | None = None  # OTLP/gRPC endpoint for traces; None: no tracing
    otlp_service_name: str = "sluice"
    shard_connect_timeout_s: float = 300.0
    step_timeout_s: float | None = 120.0  # a step taking longer fails its requests; None: wait forever
    graceful_termination_timeout_s: float = 90.0  # in-flight requests may finish within this after SIGTERM

    def __post_init__(self):
        if not self.shard_addresses:
            raise ValueError("at least one shard address is required")
        if self.waiting_served_ratio < 0 or self.max_waiting_tokens < 1:
            raise ValueError("--waiting-served-ratio must be >= 0 and --max-waiting-tokens >= 1")
        if self.max_prefill_slowdown != 0 and self.max_prefill_slowdown <= 1:
            raise ValueError(f"--max-prefill-slowdown must be 0 (off) or above 1, got {self.max_prefill_slowdown}")
        if self.max_concurrent_requests < 1 or self.max_batch_size < 1:
            raise ValueError("--max-concurrent-requests and --max-batch-size must be at least 1")
        if (
            self.max_input_tokens is not None
            and self.max_total_tokens is not None
            and self.max_input_tokens >= self.max_total_tokens
        ):
            raise ValueError(
                f"--max-input-tokens ({self.max_input_tokens}) must be < --max-total-tokens ({self.max_total_tokens})"
            )
