"""The flags the launcher passes on: derived from the fields of RouterConfig and ShardConfig marked "forward"."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import configflags
from launcher.cli import parse_args
from router.cli import parse_args as router_parse_args
from router.config import RouterConfig
from shard.cli import parse_args as shard_parse_args
from shard.config import ShardConfig

CHILDREN = {  # config: (its process's parser, the launcher's argv for it, the flags it requires)
    RouterConfig: (router_parse_args, lambda c: c.router_argv(), ["--model-id", "m", "--shard", "unix:///s"]),
    ShardConfig: (shard_parse_args, lambda c: c.shard_argv(0), ["--model-id", "m"]),
}
FORWARDED = [(cls, flag) for cls in CHILDREN for flag in configflags.flags(cls) if flag.forward]
SAMPLES = {  # for a flag of its own type, or where sample() would break the config's checks or choices
    "--block-size": "32",
    "--cpu-kv-cache-gb": "0.5",
    "--cpu-gemm": "aten",
    "--cuda-memory-fraction": "0.5",
    "--dtype": "float16",
    "--quantize": "int8",
    "--cuda-graphs": "8,1",
    "--step-timeout": "0",
}


def sample(flag: configflags.Flag) -> list[str]:
    """Texts for `flag` that make a value other than the child's default (a switch takes none)."""
    if flag.option in SAMPLES:
        return [SAMPLES[flag.option]]
    if flag.kind == "switch":
        return []
    if flag.type is configflags.parse_bool:
        return [str(not flag.default()).lower()]
    text = {int: "3", float: "3.5", str: "sample", Path: "/tmp/sample"}[flag.type]
    return [text, text + "0"] if flag.kind == "append" else [text]


@pytest.mark.parametrize("via", ["flag", "env"])
@pytest.mark.parametrize(("cls", "flag"), FORWARDED, ids=[f"{c.__name__}{f.option}" for c, f in FORWARDED])
def test_a_forwarded_flag_reaches_the_child_and_parses_back(cls, flag, via, monkeypatch):
    """The launcher accepts every forwarded field, as a flag or as its variable, and passes it on; the child's own
    parser reads it back to what the flag gives when told directly, not to its default. A flag passed on that
    the child does not know fails here, in the child's parse."""
    texts = sample(flag)
    given = [flag.option] if flag.kind == "switch" else [arg for text in texts for arg in (flag.option, text)]
    if via == "env":
        monkeypatch.setenv(flag.env(every=True), ",".join(texts) or "true")
    config = parse_args(given if via == "flag" else [])
    child_parse_args, child_argv, required = CHILDREN[cls]
    argv = child_argv(config)[3:]  # after `python -m router|shard`
    assert all(text in argv for text in texts), "passed on as given"
    received = getattr(child_parse_args(argv), flag.field.name)
    assert received == getattr(child_parse_args(required + given), flag.field.name)
    assert received != getattr(child_parse_args(required), flag.field.name)


def test_flags_not_given_are_not_passed_on():
    config = parse_args([])
    assert config.router_args == () and config.shard_args == ()
    router = router_parse_args(config.router_argv()[3:])
    assert router == RouterConfig(
        model_dir=config.model_id, shard_addresses=(config.shard_address(0),), model_id=config.model_id.name
    )
    shard = shard_parse_args(config.shard_argv(0)[3:])
    assert shard == ShardConfig(model_dir=config.model_id, uds_path=config.shard_uds_path)


def test_a_flag_of_both_children_means_the_same_to_both():
    """--otlp-endpoint and --otlp-service-name: one launcher flag, passed on to the router and the shards."""
    router = {f.dest: f for f in configflags.flags(RouterConfig) if f.forward}
    shared = [(router[f.dest], f) for f in configflags.flags(ShardConfig) if f.forward and f.dest in router]
    assert {r.option for r, _ in shared} == {"--otlp-endpoint", "--otlp-service-name"}
    for r, s in shared:
        assert (r.kind, r.type, r.default(), dict(r.field.metadata)) == (
            s.kind,
            s.type,
            s.default(),
            dict(s.field.metadata),
        )
    config = parse_args(["--otlp-endpoint", "http://collector:4317"])
    assert "http://collector:4317" in config.router_args and "http://collector:4317" in config.shard_args


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--max-batch-size", "x"], {}, "argument --max-batch-size: invalid int value: 'x'"),
        (["--prefix-caching", "maybe"], {}, "expected true or false, got 'maybe'"),
        (["--dtype", "float8"], {}, "argument --dtype: invalid choice: 'float8'"),
        (["--cuda-graphs", "4,-1"], {}, "batch sizes must be positive"),
        (["--cpu-kv-cache-gb", "lots"], {}, "invalid gigabytes value: 'lots'"),
        (["--step-timeout", "soon"], {}, "invalid seconds_or_none value: 'soon'"),
        (["--no-such-flag", "1"], {}, "unrecognized arguments: --no-such-flag 1"),
        (["--num-shard", "-1"], {}, "--num-shard must be at least 1"),
        ([], {"MAX_BATCH_SIZE": "x"}, "argument --max-batch-size: invalid int value: 'x'"),
        ([], {"ENFORCE_EAGER": "maybe"}, "$ENFORCE_EAGER: expected true or false, got 'maybe'"),
        ([], {"SHARDED": "perhaps"}, "expected true or false, got 'perhaps'"),
    ],
)
def test_bad_values_are_usage_errors_of_the_launcher(argv, env, message, monkeypatch, capsys):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exited:
        parse_args(argv)
    assert exited.value.code == 2 and message in capsys.readouterr().err


def test_the_api_key_reaches_the_router_in_its_environment_only(monkeypatch):
    config = parse_args(["--api-key", "zq-secret"])
    assert "zq-secret" not in " ".join(config.router_argv()) and "zq-secret" not in repr(config)
    monkeypatch.setenv("API_KEY", config.router_env()["API_KEY"])
    assert router_parse_args(config.router_argv()[3:]).api_key == "zq-secret"


def test_the_launcher_loads_neither_side():
    """Of the router and the shard it loads only the standard-library configs (and their packages' empty
    __init__); import-linter sees imports, not what a process loads."""
    code = "import json, sys, launcher.cli; print(json.dumps(sorted(sys.modules)))"
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    sides = [m for m in loaded if m.split(".")[0] in ("router", "shard")]
    assert sides == ["router", "router.config", "shard", "shard.config"]
    assert not {"torch", "aiohttp", "grpc", "transformers", "pydantic", "numpy"} & {m.split(".")[0] for m in loaded}
