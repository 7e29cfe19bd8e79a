"""`sluice-launcher`: start one shard per device and the router, and supervise them.

Every flag can also be given as its upper-case environment variable (MODEL_ID, NUM_SHARD...).
"""

import argparse
import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from pythonjsonlogger.json import JsonFormatter

from launcher.config import LaunchConfig, visible_gpus
from launcher.process import ChildFailed, Supervisor

log = logging.getLogger("launcher")

# Flags forwarded verbatim to one child: (flag, type, help).
ROUTER_FLAGS = [
    ("--max-concurrent-requests", int, "requests in flight before answering 429"),
    ("--max-best-of", int, "largest best_of a request may ask for"),
    ("--max-stop-sequences", int, "most stop sequences per request"),
    ("--max-top-n-tokens", int, "largest top_n_tokens a request may ask for"),
    ("--max-input-tokens", int, "longest prompt in tokens"),
    ("--max-total-tokens", int, "longest prompt + generation in tokens"),
    ("--max-batch-prefill-tokens", int, "prompt tokens computed per step"),
    ("--max-batch-size", int, "requests per step"),
    ("--max-batch-total-tokens", int, "cap on the KV cache in tokens (default: what memory allows)"),
    ("--waiting-served-ratio", float, "while requests run, admit new ones once this fraction of them wait"),
    ("--max-waiting-tokens", int, "...or after this many steps without admission"),
    ("--max-prefill-slowdown", float, "while requests decode, long prompts may slow a step at most this much (0: off)"),
    ("--long-prompt-tokens", int, "prompts longer than this are chunked under --max-prefill-slowdown"),
    ("--prefix-caching", str, "reuse the KV blocks of shared prompt prefixes (true/false)"),
    ("--overlap-steps", str, "prepare the next step while the shards compute the current one (true/false)"),
    ("--payload-limit", int, "largest request body in bytes"),
    ("--max-client-batch-size", int, "prompts per /v1/completions request"),
    ("--step-timeout", float, "seconds a step may take before its requests fail (0: no limit)"),
    ("--cors-allow-origin", str, "allowed CORS origin (repeatable; none: any)"),
]
SHARD_FLAGS = [
    ("--cuda-memory-fraction", float, "fraction of GPU memory for weights, activations and KV cache"),
    ("--cpu-kv-cache-gb", float, "KV cache size on CPU"),
    ("--block-size", int, "tokens per KV block"),
    ("--watermark-gamma", float, "watermark green-list fraction"),
    ("--watermark-delta", float, "watermark logit bias"),
    ("--enforce-eager", bool, "run the model eagerly: no compiled forward (CPU), no CUDA graphs"),
    ("--cuda-graphs", str, "decode batch sizes captured as CUDA graphs, comma-separated (0: none)"),
]


def _env(flag: str, default=None):
    return os.environ.get(flag.lstrip("-").replace("-", "_").upper(), default)


def parse_args(argv: list[str] | None = None) -> LaunchConfig:
    p = argparse.ArgumentParser(
        prog="sluice-launcher", description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    g = p.add_argument_group("model and devices")
    g.add_argument("--model-id", type=Path, default=_env("--model-id", "models/SmolLM2-135M-Instruct"))
    g.add_argument(
        "--sharded",
        choices=["true", "false"],
        default=_env("--sharded"),
        help="false forces one shard; true requires more than one",
    )
    g.add_argument(
        "--num-shard",
        type=int,
        default=_env("--num-shard"),
        help="tensor-parallel ranks (default: visible GPUs, else 1 on CPU)",
    )
    g.add_argument("--dtype", default=_env("--dtype", "auto"), choices=["auto", "float32", "float16", "bfloat16"])
    g = p.add_argument_group("network")
    g.add_argument("--hostname", default=_env("--hostname", "0.0.0.0"))
    g.add_argument("--port", type=int, default=int(_env("--port", 3000)))
    g.add_argument("--shard-uds-path", default=_env("--shard-uds-path", "/tmp/sluice-shard"))
    g.add_argument("--master-addr", default=_env("--master-addr", "127.0.0.1"))
    g.add_argument("--master-port", type=int, default=int(_env("--master-port", 29500)))
    g = p.add_argument_group("lifecycle and logs")
    g.add_argument(
        "--graceful-termination-timeout", type=float, default=float(_env("--graceful-termination-timeout", 90))
    )
    g.add_argument("--json-output", action="store_true", default=_env("--json-output", "") not in ("", "0", "false"))
    g.add_argument("--otlp-endpoint", default=_env("--otlp-endpoint"), help="OTLP/gRPC endpoint for traces")
    g.add_argument("--otlp-service-name", default=_env("--otlp-service-name", "sluice"))
    router = p.add_argument_group("batching and validation limits (router)")
    for flag, kind, help_text in ROUTER_FLAGS:
        if flag == "--cors-allow-origin":
            origins = _env(flag)
            router.add_argument(flag, action="append", default=origins.split(",") if origins else None, help=help_text)
        else:
            router.add_argument(flag, type=kind, default=_env(flag), help=help_text)
    router.add_argument("--api-key", default=_env("--api-key"), help="require `Authorization: Bearer KEY`")
    shard = p.add_argument_group("shard runtime")
    for flag, kind, help_text in SHARD_FLAGS:
        if kind is bool:
            shard.add_argument(
                flag, action="store_true", default=_env(flag, "") not in ("", "0", "false"), help=help_text
            )
        else:
            shard.add_argument(flag, type=kind, default=_env(flag), help=help_text)
    shard.add_argument(
        "--compile-cache-dir",
        type=Path,
        default=Path(_env("--compile-cache-dir") or _default_cache_dir()),
        help="compiled kernels and graphs, kept across restarts",
    )
    a = p.parse_args(argv)

    def forwarded(flags):
        out = []
        for flag, kind, _ in flags:
            value = getattr(a, flag.lstrip("-").replace("-", "_"))
            if kind is bool:
                out += [flag] if value else []
                continue
            for item in value if isinstance(value, list) else [] if value is None else [value]:
                out += [flag, str(kind(item))]
        return tuple(out)

    num_shard = int(a.num_shard or (1 if a.sharded == "false" else max(visible_gpus(), 1)))
    if (a.sharded == "true" and num_shard < 2) or (a.sharded == "false" and num_shard > 1):
        raise SystemExit(f"--sharded {a.sharded} contradicts {num_shard} shard(s) (--num-shard or the visible GPUs)")
    return LaunchConfig(
        model_id=a.model_id.resolve(),
        num_shard=num_shard,
        port=a.port,
        hostname=a.hostname,
        shard_uds_path=a.shard_uds_path,
        master_addr=a.master_addr,
        master_port=a.master_port,
        dtype=a.dtype,
        json_output=a.json_output,
        graceful_termination_timeout_s=a.graceful_termination_timeout,
        api_key=a.api_key,
        router_args=forwarded(ROUTER_FLAGS) + _otlp_args(a),
        shard_args=forwarded(SHARD_FLAGS) + ("--compile-cache-dir", str(a.compile_cache_dir)) + _otlp_args(a),
    )


def _default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/sluice, as the shard's own default."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sluice"


def _otlp_args(a: argparse.Namespace) -> tuple[str, ...]:
    if not a.otlp_endpoint:
        return ()
    return ("--otlp-endpoint", a.otlp_endpoint, "--otlp-service-name", a.otlp_service_name)


def _check_port_free(hostname: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((hostname, port))
        except OSError as e:
            raise SystemExit(f"port {port} on {hostname} is not available: {e.strerror}") from None


def _check_sockets_free(config: LaunchConfig) -> None:
    """A shard socket path in use by a live server is a conflict; a stale file is removed by the shard."""
    for rank in range(config.num_shard):
        path = config.shard_address(rank).removeprefix("unix://")
        if not os.path.exists(path):
            continue
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            if s.connect_ex(path) == 0:
                raise SystemExit(f"{path} is in use by another shard; choose another --shard-uds-path")


def _model_dir(model_id: Path) -> Path:
    """A model directory as given, or the directory a .gguf file converts into (once)."""
    if model_id.suffix != ".gguf":
        return model_id
    out = model_id.with_suffix("")
    log.info("converting %s into %s (once)", model_id, out)
    done = subprocess.run([sys.executable, "-m", "shard.convert", "--gguf", str(model_id), "--out", str(out)])
    if done.returncode:
        raise SystemExit(f"converting {model_id} failed (exit code {done.returncode})")
    return out


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter(
            "%(asctime)s %(levelname)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level"},
            static_fields={"process": "launcher"},
        )
        if config.json_output
        else logging.Formatter("%(asctime)s %(levelname)s launcher: %(message)s")
    )
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    config = dataclasses.replace(config, model_id=_model_dir(config.model_id))
    if not (config.model_id / "config.json").exists():
        raise SystemExit(f"{config.model_id} is not a model directory (no config.json); run `make model`")
    _check_port_free(config.hostname, config.port)
    _check_sockets_free(config)
    log.info("model %s, %d shard(s), port %d", config.model_id, config.num_shard, config.port)
    supervisor = Supervisor(config)

    def request_stop(signum, frame):
        log.info("received %s: draining", signal.Signals(signum).name)
        supervisor.stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    code = 0
    try:
        supervisor.start()
        code = supervisor.supervise()
    except ChildFailed as e:
        log.error("%s during startup", e)
        code = 1
    except (KeyboardInterrupt, TimeoutError) as e:
        code = 1 if isinstance(e, TimeoutError) else 0
        if code:
            log.error("%s", e)
    finally:
        supervisor.shutdown()
    sys.exit(code)
