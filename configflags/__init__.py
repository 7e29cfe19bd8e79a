"""Command-line flags derived from a process's frozen config dataclass (standard library only).

A field declared with `flag` is a flag, e.g. `max_batch_size: int = flag(256, "requests per step", forward=True)`.
The arguments of `flag` (help to forward are kept under the same names in the field's metadata):

- default: the field's default; with none (nor a default_factory) the field is required.
- help: the flag's help text.
- option: the flag, when not `--` and the field's name with dashes (`model_dir` is "--model-id").
- type: the text of the flag -> the field's value ("GB -> bytes", "1,2,4 -> (1, 2, 4)"). Otherwise the
  annotation decides: int, float, str, Path; `X | None` as X; a bool defaulting to False is a switch,
  any other bool takes true/false; `tuple[X, ...]` is repeatable, one X each time.
- choices: the values allowed.
- cli_default: the flag's default where the field has none, for a value cli.py resolves after parsing;
  a field with neither default is a required flag.
- env: the environment variable that gives the flag's default, when not the option in upper case
  (MAX_BATCH_SIZE). The launcher's parser (`env=True`) gives every flag its variable; the children's
  read only the variables named here, since they inherit the launcher's environment.
- forward: the launcher accepts the flag and passes it on to the process when given.
- any other keyword (default_factory, repr): passed on to `dataclasses.field`.

Environment variables are read when the parser is built, never at import time.
"""

import argparse
import dataclasses
import os
import typing
from collections.abc import Callable, Iterable
from dataclasses import MISSING
from typing import Any, TypeVar

Config = TypeVar("Config")


def flag(
    default: Any = MISSING,
    help: str = "",
    *,
    option: str | None = None,
    type: Callable[[str], Any] | None = None,
    choices: Iterable[Any] | None = None,
    cli_default: Any = MISSING,
    env: str | None = None,
    forward: bool = False,
    **field_args: Any,
) -> Any:
    """A config field that is a command-line flag (see above); `field_args` go to `dataclasses.field`."""
    metadata = dict(
        help=help, option=option, type=type, choices=choices, cli_default=cli_default, env=env, forward=forward
    )
    return dataclasses.field(default=default, metadata=metadata, **field_args)


def parse_bool(text: str) -> bool:
    """'true', '1', 'yes', 'on' -> True; 'false', '0', 'no', 'off' -> False (any case); else an argparse error."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


@dataclasses.dataclass(frozen=True)
class Flag:
    """A config field declared with `flag`, seen as a command-line flag."""

    field: dataclasses.Field
    option: str  # "--max-batch-size"
    kind: str  # "value"; "switch": takes no value, sets True; "append": repeatable, one item each time
    type: Callable[[str], Any]  # the text of the value (of one item for "append") -> the field's value

    @property
    def dest(self) -> str:
        """The attribute of the parsed namespace, shared by flags of the same name in different configs."""
        return self.option.removeprefix("--").replace("-", "_")

    @property
    def forward(self) -> bool:
        """Whether the launcher accepts this flag and passes it on."""
        return self.field.metadata["forward"]

    def env(self, every: bool) -> str | None:
        """The environment variable giving this flag's default: always when `every`, else only one named."""
        return self.field.metadata["env"] or (self.dest.upper() if every else None)

    def default(self) -> Any:
        """The flag's default in its own process's parser (MISSING: required); a factory is called now."""
        f = self.field
        if f.metadata["cli_default"] is not MISSING:
            return f.metadata["cli_default"]
        return f.default_factory() if f.default_factory is not MISSING else f.default


def flags(cls: type) -> list[Flag]:
    """The flags of config dataclass `cls`, in field order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue
        hint = hints[f.name]
        if type(None) in typing.get_args(hint):  # X | None
            hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
        if f.metadata["type"]:
            kind, parse = "value", f.metadata["type"]
        elif hint is bool:
            kind, parse = ("switch" if f.default is False else "value"), parse_bool
        elif typing.get_origin(hint) is tuple:
            kind, parse = "append", typing.get_args(hint)[0]
        else:
            kind, parse = "value", hint
        out.append(Flag(f, f.metadata["option"] or "--" + f.name.replace("_", "-"), kind, parse))
    return out


def add_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    title: str | None = None,
    *,
    forwarding: bool = False,
    env: bool = False,
    skip: Iterable[str] = (),
) -> list[str]:
    """Add the flags of `cls` to `parser` (in a group named `title`, if given); return their dests.

    forwarding: the launcher's view of a child's config: only its "forward" flags, unset unless given, each
    value checked with the child's own type but kept as the text given, for `forward` to pass on.
    env: every flag defaults to its environment variable (the launcher's parser).
    skip: dests already added, e.g. by the other child's config (`--otlp-endpoint` goes to both)."""
    group = parser.add_argument_group(title) if title else parser
    added = []
    for flag in flags(cls):
        if (forwarding and not flag.forward) or flag.dest in skip:
            continue
        kwargs: dict[str, Any] = {"dest": flag.dest, "help": flag.field.metadata["help"]}
        if flag.kind == "switch":
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = _as_given(flag.type) if forwarding else flag.type
            kwargs["choices"] = flag.field.metadata["choices"]
            if flag.kind == "append":
                kwargs["action"] = "append"
        name = flag.env(every=env)
        text = os.environ.get(name) if name else None
        if text:
            default = _from_env(parser, flag, name, text, kwargs.get("type"))
        elif forwarding:
            default = argparse.SUPPRESS  # not given: not in the namespace, nor passed on
        else:
            default = flag.default()
            if default is MISSING:
                default, kwargs["required"] = None, True
            elif flag.kind == "append" and default is not None:
                default = list(default)  # argparse appends the given items to a copy of this
        group.add_argument(flag.option, default=default, **kwargs)
        added.append(flag.dest)
    return added


def build(
    cls: type[Config], namespace: argparse.Namespace, parser: argparse.ArgumentParser, **overrides: Any
) -> Config:
    """The config `cls` from a namespace parsed with its flags and `overrides` (fields resolved by the caller).
    The config's own checks (ValueError) are reported as `parser`'s usage errors."""
    values = {}
    for flag in flags(cls):
        value = getattr(namespace, flag.dest)
        values[flag.field.name] = tuple(value) if isinstance(value, list) else value
    try:
        return cls(**(values | overrides))
    except ValueError as e:
        parser.error(str(e))


def forward(cls: type, namespace: argparse.Namespace) -> list[str]:
    """The argv that passes on the forwarded flags of `cls` given in `namespace` (parsed with `forwarding=True`);
    a flag not given is left out, so that the child's default applies."""
    argv = []
    for flag in flags(cls):
        value = getattr(namespace, flag.dest, None) if flag.forward else None
        if flag.kind == "switch":
            argv += [flag.option] if value else []
        elif value is not None:
            for item in value if flag.kind == "append" else [value]:
                argv += [flag.option, item]
    return argv


def _as_given(parse: Callable[[str], Any]) -> Callable[[str], str]:
    """`parse` as a check that returns the text itself: the launcher passes on what it was given."""

    def check(text: str) -> str:
        parse(text)
        return text

    check.__name__ = getattr(parse, "__name__", "value")  # argparse's "invalid int value: 'x'" names it
    return check


def _from_env(parser: argparse.ArgumentParser, flag: Flag, name: str, text: str, parse: Callable | None) -> Any:
    """A default from environment variable `name`. A value's text is converted by argparse itself, as a
    string default is; a switch's, or a repeatable flag's comma-separated items, here."""
    if flag.kind == "value":
        return text
    try:
        return parse_bool(text) if flag.kind == "switch" else [parse(item) for item in text.split(",")]
    except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
        parser.error(f"${name}: {e}")
