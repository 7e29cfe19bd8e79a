"""`LaunchConfig` and the argv of every child, built in one place."""

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from configflags import flag


def visible_gpus() -> int:
    """GPUs this process may use, without importing torch."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    return len(list(Path("/dev").glob("nvidia[0-9]*")))


@dataclass(frozen=True, slots=True)
class LaunchConfig:
    """The launcher's flags (its `flag` fields, each also its upper-case environment variable; see configflags)
    and the argv of every child; built only by launcher/cli.py."""

    model_id: Path = flag(
        help="model directory, or a .gguf file (converted once)", cli_default="models/SmolLM2-135M-Instruct"
    )
    num_shard: int = flag(help="tensor-parallel ranks (default: visible GPUs, else 1 on CPU)", cli_default=None)
    sharded: bool | None = flag(None, "false forces one shard; true requires more than one")
    hostname: str = flag("0.0.0.0", "the router's address")
    port: int = flag(3000, "the router's port")
    shard_uds_path: str = flag("/tmp/sluice-shard", "the shards listen on {path}-{rank}")
    master_addr: str = flag("127.0.0.1", "rank 0's address for the collectives")
    master_port: int = flag(29500, "rank 0's port for the collectives")
    graceful_termination_timeout_s: float = flag(
        90.0, "seconds in-flight requests may take to finish after SIGTERM", option="--graceful-termination-timeout"
    )
    shard_restarts: int = flag(
        0,
        "when a shard dies, restart the whole shard group (every rank) up to this many times within "
        "--shard-restart-window; requests in flight resume where they were (0: a dead shard stops everything)",
    )
    shard_restart_window_s: float = flag(
        600.0, "seconds over which --shard-restarts are counted", option="--shard-restart-window"
    )
    json_output: bool = flag(False, "every process logs one JSON object per line")
    api_key: str | None = flag(  # given to the router in its environment, never argv
        None, "require `Authorization: Bearer KEY` on generation routes", repr=False
    )
    router_args: tuple[str, ...] = ()  # RouterConfig's forwarded flags, as given
    shard_args: tuple[str, ...] = ()  # ShardConfig's forwarded flags, as given

    def __post_init__(self):
        if self.num_shard < 1:
            raise ValueError(f"--num-shard must be at least 1, got {self.num_shard}")
        if self.shard_restarts < 0 or self.shard_restart_window_s <= 0:
            raise ValueError("--shard-restarts must be >= 0 and --shard-restart-window > 0")

    @property
    def local_address(self) -> str:
        """Where this machine reaches the router: the bound address, or loopback for a wildcard.
        (In a container HOSTNAME, and so --hostname, may be the pod's name, bound to its IP only.)"""
        return "127.0.0.1" if self.hostname in ("0.0.0.0", "::", "") else self.hostname

    def shard_address(self, rank: int) -> str:
        return f"unix://{self.shard_uds_path}-{rank}"

    def shard_argv(self, rank: int) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            "shard",
            "--model-id",
            str(self.model_id),
            "--rank",
            str(rank),
            "--world-size",
            str(self.num_shard),
            "--master-addr",
            self.master_addr,
            "--master-port",
            str(self.master_port),
            "--uds-path",
            self.shard_uds_path,
            *self.shard_args,
        ]
        return argv + ["--json-output"] if self.json_output else argv

    def router_argv(self) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            "router",
            "--graceful-termination-timeout",
            str(self.graceful_termination_timeout_s),
            "--model-id",
            str(self.model_id),
            "--hostname",
            self.hostname,
            "--port",
            str(self.port),
            *self.router_args,
        ]
        for rank in range(self.num_shard):
            argv += ["--shard", self.shard_address(rank)]
        if self.shard_restarts:  # lost shards come back: the router keeps their requests meanwhile
            argv.append("--await-shard-restart")
        return argv + ["--json-output"] if self.json_output else argv

    def router_env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.api_key:
            env["API_KEY"] = self.api_key
        return env

    def shard_env(self, rank: int, cpu_count: int) -> dict[str, str]:
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE=str(self.num_shard),
            MASTER_ADDR=self.master_addr,
            MASTER_PORT=str(self.master_port),
        )
        if visible_gpus() == 0:  # CPU shards share the cores instead of each taking all of them
            env.setdefault("OMP_NUM_THREADS", str(max(1, cpu_count // self.num_shard)))
        return env
