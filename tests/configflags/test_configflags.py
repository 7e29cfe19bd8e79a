"""configflags on a config of its own: each kind of flag, variables, building, passing on."""

import argparse
import ast
import sys
from dataclasses import MISSING, dataclass
from pathlib import Path

import pytest

import configflags
from configflags import flag

REPO = Path(__file__).resolve().parents[2]


def _double(text: str) -> int:
    return 2 * int(text)


@dataclass(frozen=True)
class Config:
    path: Path = flag(help="required: no default", option="--dir")
    resolved: int = flag(help="resolved after parsing", cli_default=None)
    count: int = flag(1, "a value", forward=True)
    limit: int | None = flag(None, "X | None is X", forward=True)
    doubled: int = flag(2, "a type of its own", type=_double, forward=True)
    eager: bool = flag(False, "a switch", forward=True)
    caching: bool = flag(True, "true/false", forward=True)
    origins: tuple[str, ...] = flag((), "repeatable", option="--origin", forward=True)
    mode: str = flag("a", "choices", choices=("a", "b"))
    key: str | None = flag(None, "a variable of its own", env="THE_KEY")
    internal: float = 0.5  # not a flag

    def __post_init__(self):
        if self.count < 0:
            raise ValueError("count must be >= 0")


def parse(argv: list[str], **kw) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    p = argparse.ArgumentParser()
    configflags.add_arguments(p, Config, **kw)
    return p, p.parse_args(argv)


@pytest.fixture(autouse=True)
def no_variables(monkeypatch):
    for name in ("COUNT", "EAGER", "ORIGIN", "THE_KEY", "KEY", "DIR"):
        monkeypatch.delenv(name, raising=False)


def test_kinds_follow_the_annotations():
    kinds = {f.field.name: (f.option, f.kind, f.type) for f in configflags.flags(Config)}
    assert kinds == {
        "path": ("--dir", "value", Path),
        "resolved": ("--resolved", "value", int),
        "count": ("--count", "value", int),
        "limit": ("--limit", "value", int),
        "doubled": ("--doubled", "value", _double),
        "eager": ("--eager", "switch", configflags.parse_bool),
        "caching": ("--caching", "value", configflags.parse_bool),
        "origins": ("--origin", "append", str),
        "mode": ("--mode", "value", str),
        "key": ("--key", "value", str),
    }


def test_build_gives_the_defaults_and_the_values_given():
    p, a = parse(["--dir", "d"])
    assert configflags.build(Config, a, p, resolved=7) == Config(Path("d"), 7)
    argv = ["--dir", "d", "--count", "3", "--limit", "4", "--doubled", "5", "--eager", "--caching", "off"]
    p, a = parse([*argv, "--origin", "x", "--origin", "y", "--mode", "b", "--key", "k", "--resolved", "1"])
    assert configflags.build(Config, a, p) == Config(Path("d"), 1, 3, 4, 10, True, False, ("x", "y"), "b", "k")


def test_variables_are_read_when_the_parser_is_built(monkeypatch):
    monkeypatch.setenv("COUNT", "5")
    monkeypatch.setenv("THE_KEY", "k")
    assert (parse(["--dir", "d"])[1].count, parse(["--dir", "d"])[1].key) == (1, "k")  # only the one named
    monkeypatch.setenv("EAGER", "yes")
    monkeypatch.setenv("ORIGIN", "x,y")
    monkeypatch.setenv("DIR", "d")  # a required flag's variable is enough
    a = parse([], env=True)[1]
    assert (a.count, a.eager, a.origin, a.key, a.dir) == (5, True, ["x", "y"], "k", Path("d"))
    assert parse(["--count", "6"], env=True)[1].count == 6  # a flag wins over its variable


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--count", "x"], {}, "argument --count: invalid int value: 'x'"),
        (["--caching", "maybe"], {}, "argument --caching: expected true or false, got 'maybe'"),
        (["--mode", "c"], {}, "argument --mode: invalid choice: 'c'"),
        ([], {"COUNT": "x"}, "argument --count: invalid int value: 'x'"),
        ([], {"EAGER": "maybe"}, "$EAGER: expected true or false, got 'maybe'"),
        (["--count", "-1"], {}, "count must be >= 0"),
    ],
)
def test_bad_values_are_usage_errors(argv, env, message, monkeypatch, capsys):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exited:
        p, a = parse(["--dir", "d", *argv], env=True)
        configflags.build(Config, a, p, resolved=1)
    assert exited.value.code == 2 and message in capsys.readouterr().err


def test_forwarding_passes_on_what_was_given_as_given(monkeypatch):
    monkeypatch.setenv("ORIGIN", "x,y")
    p = argparse.ArgumentParser()
    assert configflags.add_arguments(p, Config, forwarding=True, env=True, skip=["limit"]) == [
        "count", "doubled", "eager", "caching", "origin",
    ]  # fmt: skip
    assert configflags.forward(Config, p.parse_args([])) == ["--origin", "x", "--origin", "y"]
    a = p.parse_args(["--doubled", "05", "--eager", "--caching", "no", "--origin", "z"])
    assert configflags.forward(Config, a) == [
        "--doubled", "05", "--eager", "--caching", "no", "--origin", "x", "--origin", "y", "--origin", "z",
    ]  # fmt: skip
    with pytest.raises(SystemExit):
        p.parse_args(["--doubled", "x"])  # checked with the type, though passed on as text


def test_flag_passes_the_field_arguments_on():
    f = flag(help="a secret made fresh", default_factory=list, repr=False)
    assert (f.default, f.default_factory, f.repr, f.metadata["help"]) == (MISSING, list, False, "a secret made fresh")


@pytest.mark.parametrize("path", ["configflags/__init__.py", "router/config.py", "shard/config.py"])
def test_imports_only_the_standard_library(path):
    """The launcher imports configflags and both configs: they must not bring in either side's dependencies
    (the configs import configflags)."""
    for node in ast.walk(ast.parse((REPO / path).read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom):
            names = [node.module or ""] if node.level == 0 else ["relative"]
        for name in names:
            assert name.split(".")[0] in {*sys.stdlib_module_names, "configflags"}, f"{path} imports {name}"
