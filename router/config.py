"""`RouterConfig`: the router's one config; its flags (configflags) and the launcher's forwarding derive from it.

Standard library only, as configflags is: the launcher imports it for the flags it passes on."""

from dataclasses import dataclass
from pathlib import Path

from configflags import flag


def seconds_or_none(text: str) -> float | None:
    """ "120" -> 120.0; "0" -> None (no limit)."""
    return float(text) or None


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """Everything the router process needs; built only by router/cli.py. Its `flag` fields are its flags
    (see configflags); forward=True: the launcher accepts the flag and passes it on."""

    model_dir: Path = flag(help="model directory (tokenizer files)", option="--model-id")
    shard_addresses: tuple[str, ...] = flag(
        help="gRPC address of a shard, once per rank in rank order (unix:///path or host:port)", option="--shard"
    )
    model_id: str = ""  # the name /info and /v1/models report; defaults to the directory name
    hostname: str = flag("0.0.0.0", "address to listen on")
    port: int = flag(3000, "port to listen on")
    max_concurrent_requests: int = flag(128, "requests in flight before answering 429", forward=True)
    max_best_of: int = flag(2, "largest best_of a request may ask for", forward=True)
    max_stop_sequences: int = flag(4, "most stop sequences per request", forward=True)
    max_top_n_tokens: int = flag(5, "largest top_n_tokens a request may ask for", forward=True)
    max_client_batch_size: int = flag(4, "prompts per /v1/completions request", forward=True)
    # None: derived from the model (TGI's defaults)
    max_input_tokens: int | None = flag(None, "longest prompt in tokens", forward=True)
    max_total_tokens: int | None = flag(None, "longest prompt + generation in tokens", forward=True)
    max_batch_prefill_tokens: int | None = flag(None, "prompt tokens computed per step", forward=True)
    max_batch_size: int = flag(256, "requests per step", forward=True)
    prefix_caching: bool = flag(True, "reuse the KV blocks of shared prompt prefixes (true/false)", forward=True)
    overlap_steps: bool = flag(
        True, "prepare the next step while the shards compute the current one (true/false)", forward=True
    )
    max_batch_total_tokens: int | None = flag(
        None, "cap on the KV cache in tokens (default: what memory allows)", forward=True
    )
    # admission and chunked prefill: see SchedulerConfig
    waiting_served_ratio: float = flag(
        0.0, "while requests run, admit new ones once this fraction of them wait", forward=True
    )
    max_waiting_tokens: int = flag(20, "...or after this many steps without admission", forward=True)
    max_prefill_slowdown: float = flag(
        2.0,
        "while requests decode, a long prompt's chunks may make a step at most this many times as long (0: off)",
        forward=True,
    )
    long_prompt_tokens: int = flag(
        512,
        "prompts longer than this are chunked under --max-prefill-slowdown; shorter ones go in whole",
        forward=True,
    )
    payload_limit: int = flag(2_000_000, "largest request body in bytes", forward=True)
    api_key: str | None = flag(
        None,
        "require `Authorization: Bearer KEY` on generation routes (default: $API_KEY, which keeps it out of argv)",
        env="API_KEY",
        repr=False,
    )
    cors_allow_origins: tuple[str, ...] = flag(
        (), "allowed CORS origin (repeatable; none: any)", option="--cors-allow-origin", forward=True
    )
    otlp_endpoint: str | None = flag(None, "OTLP/gRPC endpoint for traces (none: no tracing)", forward=True)
    otlp_service_name: str = flag("sluice", "service name of the traces (.router, .shard appended)", forward=True)
    shard_connect_timeout_s: float = 300.0  # for the shards to listen, at startup and after a restart
    await_shard_restart: bool = flag(  # the launcher sets it with --shard-restarts
        False,
        "when the shards are lost, keep their requests and wait for the launcher to restart them, then resume",
    )
    step_timeout_s: float | None = flag(
        120.0,
        "seconds a step may take before its requests fail (0: no limit)",
        option="--step-timeout",
        type=seconds_or_none,
        forward=True,
    )
    graceful_termination_timeout_s: float = flag(  # the launcher passes its own
        90.0, "seconds in-flight requests may take to finish after SIGTERM", option="--graceful-termination-timeout"
    )
    json_output: bool = flag(False, "log one JSON object per line")

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
