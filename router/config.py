"""`RouterConfig`: the router's one config; its flags (configflags) and the launcher's forwarding derive from it.

Standard library only: the launcher imports it for the flags it passes on."""

from dataclasses import dataclass, field
from pathlib import Path


def seconds_or_none(text: str) -> float | None:
    """ "120" -> 120.0; "0" -> None (no limit)."""
    return float(text) or None


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """Everything the router process needs; built only by router/cli.py. Fields with a "help" are flags
    (see configflags); "forward": the launcher accepts the flag and passes it on."""

    model_dir: Path = field(metadata={"flag": "--model-id", "help": "model directory (tokenizer files)"})
    shard_addresses: tuple[str, ...] = field(
        metadata={
            "flag": "--shard",
            "help": "gRPC address of a shard, once per rank in rank order (unix:///path or host:port)",
        }
    )
    model_id: str = ""  # the name /info and /v1/models report; defaults to the directory name
    hostname: str = field(default="0.0.0.0", metadata={"help": "address to listen on"})
    port: int = field(default=3000, metadata={"help": "port to listen on"})
    max_concurrent_requests: int = field(
        default=128, metadata={"help": "requests in flight before answering 429", "forward": True}
    )
    max_best_of: int = field(default=2, metadata={"help": "largest best_of a request may ask for", "forward": True})
    max_stop_sequences: int = field(default=4, metadata={"help": "most stop sequences per request", "forward": True})
    max_top_n_tokens: int = field(
        default=5, metadata={"help": "largest top_n_tokens a request may ask for", "forward": True}
    )
    max_client_batch_size: int = field(
        default=4, metadata={"help": "prompts per /v1/completions request", "forward": True}
    )
    # None: derived from the model (TGI's defaults)
    max_input_tokens: int | None = field(default=None, metadata={"help": "longest prompt in tokens", "forward": True})
    max_total_tokens: int | None = field(
        default=None, metadata={"help": "longest prompt + generation in tokens", "forward": True}
    )
    max_batch_prefill_tokens: int | None = field(
        default=None, metadata={"help": "prompt tokens computed per step", "forward": True}
    )
    max_batch_size: int = field(default=256, metadata={"help": "requests per step", "forward": True})
    prefix_caching: bool = field(
        default=True, metadata={"help": "reuse the KV blocks of shared prompt prefixes (true/false)", "forward": True}
    )
    overlap_steps: bool = field(  # schedule and send step N+1 while the shards compute step N
        default=True,
        metadata={
            "help": "prepare the next step while the shards compute the current one (true/false)",
            "forward": True,
        },
    )
    max_batch_total_tokens: int | None = field(  # None: what warmup finds
        default=None,
        metadata={"help": "cap on the KV cache in tokens (default: what memory allows)", "forward": True},
    )
    waiting_served_ratio: float = field(  # see SchedulerConfig
        default=0.0,
        metadata={"help": "while requests run, admit new ones once this fraction of them wait", "forward": True},
    )
    max_waiting_tokens: int = field(
        default=20, metadata={"help": "...or after this many steps without admission", "forward": True}
    )
    max_prefill_slowdown: float = field(  # see SchedulerConfig
        default=2.0,
        metadata={
            "help": "while requests decode, a long prompt's chunks may make a step at most this many times as long"
            " (0: off)",
            "forward": True,
        },
    )
    long_prompt_tokens: int = field(  # see SchedulerConfig
        default=512,
        metadata={
            "help": "prompts longer than this are chunked under --max-prefill-slowdown; shorter ones go in whole",
            "forward": True,
        },
    )
    payload_limit: int = field(default=2_000_000, metadata={"help": "largest request body in bytes", "forward": True})
    api_key: str | None = field(  # the launcher passes it in the router's environment, never in argv
        default=None,
        repr=False,
        metadata={
            "help": "require `Authorization: Bearer KEY` on generation routes (default: $API_KEY, which keeps it"
            " out of argv)",
            "env": "API_KEY",
        },
    )
    cors_allow_origins: tuple[str, ...] = field(  # empty: any origin
        default=(),
        metadata={
            "flag": "--cors-allow-origin",
            "help": "allowed CORS origin (repeatable; none: any)",
            "forward": True,
        },
    )
    otlp_endpoint: str | None = field(
        default=None, metadata={"help": "OTLP/gRPC endpoint for traces (none: no tracing)", "forward": True}
    )
    otlp_service_name: str = field(
        default="sluice", metadata={"help": "service name of the traces (.router, .shard appended)", "forward": True}
    )
    shard_connect_timeout_s: float = 300.0
    step_timeout_s: float | None = field(  # a step taking longer fails its requests; None: wait forever
        default=120.0,
        metadata={
            "flag": "--step-timeout",
            "type": seconds_or_none,
            "help": "seconds a step may take before its requests fail (0: no limit)",
            "forward": True,
        },
    )
    graceful_termination_timeout_s: float = field(  # the launcher passes its own
        default=90.0,
        metadata={
            "flag": "--graceful-termination-timeout",
            "help": "seconds in-flight requests may take to finish after SIGTERM",
        },
    )
    json_output: bool = field(default=False, metadata={"help": "log one JSON object per line"})

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
