"""sluice-shard's flags, derived from ShardConfig."""

from pathlib import Path

import pytest

from shard.cli import parse_args
from shard.config import ShardConfig


def test_defaults_are_the_configs():
    assert parse_args(["--model-id", "m"]) == ShardConfig(model_dir=Path("m"))


def test_the_cache_directory_default_is_read_at_parse_time(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert parse_args(["--model-id", "m"]).compile_cache_dir == tmp_path / "sluice"


def test_flags_of_their_own_type():
    config = parse_args(["--model-id", "m", "--cpu-kv-cache-gb", "0.5", "--cuda-graphs", "8,1,2", "--enforce-eager"])
    assert config.cpu_kv_cache_bytes == 1 << 29
    assert config.cuda_graphs == ()  # --enforce-eager captures none
    assert parse_args(["--model-id", "m", "--cuda-graphs", "8,1,2"]).cuda_graphs == (1, 2, 8)


def test_no_variable_is_read(monkeypatch):
    """A shard inherits the launcher's environment: PORT would make it listen on TCP, RANK is only informative."""
    for name, value in {"PORT": "3000", "RANK": "1", "WORLD_SIZE": "2", "DTYPE": "float16"}.items():
        monkeypatch.setenv(name, value)
    config = parse_args(["--model-id", "m"])
    assert (config.port, config.rank, config.world_size, config.dtype) == (None, 0, 1, "auto")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--block-size", "3"], "block size must be a power of two, got 3"),
        (["--rank", "2", "--world-size", "2"], "rank 2 is outside world size 2"),
        (["--cpu-gemm", "blas"], "argument --cpu-gemm: invalid choice: 'blas'"),
    ],
)
def test_bad_flags_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        parse_args(["--model-id", "m", *argv])
    assert exited.value.code == 2 and message in capsys.readouterr().err
