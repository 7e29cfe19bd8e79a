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

import configflags
from launcher.config import LaunchConfig, visible_gpus
from launcher.process import ChildFailed, StopRequested, Supervisor
from router.config import RouterConfig
from shard.config import ShardConfig

log = logging.getLogger("launcher")


def parse_args(argv: list[str] | None = None) -> LaunchConfig:
    """The launcher's config from its flags or their environment variables, with the argv of the router's and
    the shards' forwarded flags (RouterConfig's and ShardConfig's fields marked "forward") that were given."""
    p = argparse.ArgumentParser(
        prog="sluice-launcher", description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    configflags.add_arguments(p, LaunchConfig, env=True)
    shared = configflags.add_arguments(p, RouterConfig, "router (passed on if given)", forwarding=True, env=True)
    configflags.add_arguments(p, ShardConfig, "shards (passed on if given)", forwarding=True, env=True, skip=shared)
    a = p.parse_args(argv)
    num_shard = a.num_shard or (1 if a.sharded is False else max(visible_gpus(), 1))
    if a.sharded is not None and a.sharded != (num_shard > 1):
        sharded = "true" if a.sharded else "false"
        raise SystemExit(f"--sharded {sharded} contradicts {num_shard} shard(s) (--num-shard or the visible GPUs)")
    return configflags.build(
        LaunchConfig,
        a,
        p,
        model_id=a.model_id.resolve(),
        num_shard=num_shard,
        router_args=tuple(configflags.forward(RouterConfig, a)),
        shard_args=tuple(configflags.forward(ShardConfig, a)),
    )


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
        if supervisor.stopping:
            log.warning("received %s again: the router ends its requests now", signal.Signals(signum).name)
            supervisor.hurried = True
            return
        log.info("received %s: draining (a second one ends the requests in flight now)", signal.Signals(signum).name)
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
    except TimeoutError as e:
        log.error("%s", e)
        code = 1
    except StopRequested:
        code = 0
    finally:
        supervisor.shutdown(failed=code != 0)
    log.info("exiting with code %d", code)
    sys.exit(code)
