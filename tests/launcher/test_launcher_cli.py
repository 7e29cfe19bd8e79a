"""Launcher flags, environment variables and the checks made before anything starts."""

import socket
import subprocess
import sys

import pytest

from launcher.cli import parse_args


def test_every_flag_is_also_an_environment_variable(monkeypatch):
    monkeypatch.setenv("NUM_SHARD", "3")
    monkeypatch.setenv("MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("CORS_ALLOW_ORIGIN", "https://a,https://b")
    monkeypatch.setenv("API_KEY", "zq-secret")
    config = parse_args([])
    assert config.num_shard == 3 and config.api_key == "zq-secret"
    assert config.router_args == (
        "--max-batch-size", "7", "--cors-allow-origin", "https://a", "--cors-allow-origin", "https://b",
    )  # fmt: skip
    assert "zq-secret" not in " ".join(config.router_argv())


def test_sharded_contradicting_the_shard_count_is_refused():
    with pytest.raises(SystemExit, match="--sharded true contradicts 1 shard"):
        parse_args(["--sharded", "true", "--num-shard", "1"])
    assert parse_args(["--sharded", "false"]).num_shard == 1


def test_a_busy_port_is_reported_before_anything_starts(bundled_model_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "launcher", "--model-id", str(bundled_model_dir), "--hostname", "127.0.0.1",
             "--port", str(port)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert done.returncode != 0 and f"port {port} on 127.0.0.1 is not available" in done.stderr
    assert "starting shard" not in done.stderr


def test_a_missing_model_directory_is_reported(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "launcher", "--model-id", str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0 and "is not a model directory" in done.stderr


def test_cuda_graph_sizes_reach_the_shards_and_parse_there(monkeypatch):
    from shard.cli import parse_args as shard_args

    monkeypatch.setenv("CUDA_GRAPHS", "1,2,8")
    forwarded = parse_args([]).shard_args
    assert forwarded[forwarded.index("--cuda-graphs") + 1] == "1,2,8"
    assert shard_args(["--model-id", "m", "--cuda-graphs", "8,1,2"]).cuda_graphs == (1, 2, 8)
    assert shard_args(["--model-id", "m", "--cuda-graphs", "0"]).cuda_graphs == ()
    assert shard_args(["--model-id", "m", "--enforce-eager"]).cuda_graphs == ()
    assert shard_args(["--model-id", "m"]).cuda_graphs == (1, 2, 4, 8, 16, 32, 64, 128, 256)
    with pytest.raises(SystemExit):
        shard_args(["--model-id", "m", "--cuda-graphs", "4,-1"])


def test_shard_restarts_make_the_router_wait_for_lost_shards(monkeypatch):
    from router.cli import parse_args as router_args

    assert "--await-shard-restart" not in parse_args([]).router_argv()
    monkeypatch.setenv("SHARD_RESTART_WINDOW", "120")
    config = parse_args(["--shard-restarts", "3"])
    assert (config.shard_restarts, config.shard_restart_window_s) == (3, 120.0)
    assert router_args(config.router_argv()[3:]).await_shard_restart is True
    with pytest.raises(SystemExit):
        parse_args(["--shard-restarts", "-1"])


def test_the_restart_budget_counts_restarts_within_its_window():
    from launcher.process import RestartBudget

    budget = RestartBudget(2, window_s=60)
    assert [budget.take(t) for t in (0, 10, 20, 61, 75, 80)] == [True, True, False, True, True, False]
    assert not RestartBudget(0, window_s=60).take(0)


def test_a_dead_child_is_described_by_rank_and_signal_or_exit_code():
    from launcher.process import Child

    def child(returncode: int, rank: int | None) -> Child:
        process = subprocess.Popen([sys.executable, "-c", f"import os, sys; sys.exit({max(returncode, 0)})"])
        process.wait()
        process.returncode = returncode
        return Child("router" if rank is None else f"shard-{rank}", process, rank)

    shard = child(-9, 1)
    assert shard.describe_exit() == f"shard-1 (rank 1, pid {shard.process.pid}) was killed by SIGKILL"
    router = child(3, None)
    assert router.describe_exit() == f"router (pid {router.process.pid}) exited with code 3"
