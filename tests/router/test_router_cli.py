"""sluice-router's flags, derived from RouterConfig."""

from pathlib import Path

import pytest

from router.cli import parse_args
from router.config import RouterConfig

REQUIRED = ["--model-id", "models/m", "--shard", "unix:///s-0"]


@pytest.fixture(autouse=True)
def no_api_key(monkeypatch):
    monkeypatch.delenv("API_KEY", raising=False)


def test_defaults_are_the_configs():
    assert parse_args(REQUIRED) == RouterConfig(
        model_dir=Path("models/m"), shard_addresses=("unix:///s-0",), model_id="m"
    )


def test_repeatable_flags_keep_their_order():
    origins = ["--cors-allow-origin", "https://a", "--cors-allow-origin", "https://b"]
    config = parse_args([*REQUIRED, "--shard", "unix:///s-1", *origins])
    assert config.shard_addresses == ("unix:///s-0", "unix:///s-1")
    assert config.cors_allow_origins == ("https://a", "https://b")


@pytest.mark.parametrize(
    ("text", "value"), [("false", False), ("0", False), ("off", False), ("TRUE", True), ("yes", True)]
)
def test_true_false_flags(text, value):
    assert parse_args([*REQUIRED, "--prefix-caching", text]).prefix_caching is value


def test_a_step_timeout_of_zero_is_no_limit():
    assert parse_args([*REQUIRED, "--step-timeout", "0"]).step_timeout_s is None
    assert parse_args([*REQUIRED, "--step-timeout", "5"]).step_timeout_s == 5.0


def test_the_api_key_comes_from_its_variable_at_parse_time_and_a_flag_wins(monkeypatch):
    monkeypatch.setenv("API_KEY", "from-env")
    assert parse_args(REQUIRED).api_key == "from-env"
    assert parse_args([*REQUIRED, "--api-key", "from-flag"]).api_key == "from-flag"
    assert "from-env" not in repr(parse_args(REQUIRED))


def test_no_other_variable_is_read(monkeypatch):
    """The router inherits the launcher's environment, whose variables (PORT, HOSTNAME...) are the launcher's."""
    for name, value in {"PORT": "1", "HOSTNAME": "pod-7", "MAX_BATCH_SIZE": "7", "JSON_OUTPUT": "1"}.items():
        monkeypatch.setenv(name, value)
    config = parse_args(REQUIRED)
    assert (config.port, config.hostname, config.max_batch_size, config.json_output) == (3000, "0.0.0.0", 256, False)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model-id", "m"], "the following arguments are required: --shard"),
        ([*REQUIRED, "--prefix-caching", "maybe"], "expected true or false, got 'maybe'"),
        ([*REQUIRED, "--max-input-tokens", "9", "--max-total-tokens", "5"], "--max-input-tokens (9) must be <"),
    ],
)
def test_bad_flags_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        parse_args(argv)
    assert exited.value.code == 2 and message in capsys.readouterr().err
