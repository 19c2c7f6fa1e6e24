"""Command-line options declared once, with their default, help, type, valid range and help group.

A CLI's config is a dataclass whose fields are made with `option`. From it:

- `add_arguments` adds one flag per field to a parser, in the field's help group. Flags parse to
  raw strings with ``None`` defaults, so the caller knows which were given. On a `new_parser` a
  parse error raises `ConfigError` rather than printing argparse's usage.
- `validate` converts every value, whether it came from a flag, a YAML file or code, to its type
  and checks its range, choices and syntax. A bad value raises `ConfigError` with one line naming
  the flag, the value (and the file it came from) and what is valid.
- `load_yaml` reads a YAML mapping; a syntax error names the file, line and column.

`train.run` and `train.ntk` declare their options with this module; checks that tie several
options together stay with the CLI that owns them.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from train.errors import ConfigError

NUMBER = "number"  # an int when the text is integral, else a float (e.g. --rank 3, --rank 0.01)
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


@dataclasses.dataclass(frozen=True)
class Range:
    """An interval of valid numbers; an open end excludes its bound, a missing one is unbounded."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, x: float) -> bool:
        if self.low is not None and (x <= self.low if self.low_open else x < self.low):
            return False
        return self.high is None or (x < self.high if self.high_open else x <= self.high)

    def __str__(self) -> str:
        low, high = _bound(self.low), _bound(self.high)
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"greater than {low}" if self.low_open else f"at least {low}"
        return f"less than {high}" if self.high_open else f"at most {high}"


def _bound(x: float | None) -> str:
    """A bound as written: integers in full (a seed's 4294967295, not 4.29497e+09)."""
    if x is None:
        return ""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def at_least(low: float) -> Range:
    return Range(low=low)


def above(low: float) -> Range:
    return Range(low=low, low_open=True)


def between(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Range:
    return Range(low, high, low_open, high_open)


@dataclasses.dataclass(frozen=True)
class Spec:
    """What `option` records about a field; ``check(value)`` raises ValueError(problem) for bad syntax."""

    help: str
    group: str
    kind: Any  # bool, int, float, str or NUMBER
    range: Range | None = None
    choices: tuple[str, ...] | None = None
    aliases: tuple[str, ...] = ()
    check: Callable[[Any], None] | None = None
    note: str = ""  # why the range is what it is, appended to a range error
    optional: bool = False  # None ("not set") is valid: the default is None


def option(
    default,
    help: str,
    *,
    group: str,
    kind=None,
    range: Range | None = None,
    choices=None,
    aliases: tuple[str, ...] = (),
    check=None,
    note: str = "",
):
    """A dataclass field declaring one option. ``kind`` defaults to the default's type; ``None`` is
    always a valid value of an option whose default is ``None`` (it means "not set")."""
    if kind is None:
        kind = type(default) if default is not None else str
    choices = tuple(choices) if choices else None
    spec = Spec(help, group, kind, range, choices, tuple(aliases), check, note, optional=default is None)
    return dataclasses.field(default=default, metadata={"option": spec})


def flag(name: str) -> str:
    """The command-line spelling of a field: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def specs(cls) -> dict[str, Spec]:
    """Field name -> `Spec` of every option of the config class ``cls``, in field order."""
    return {f.name: f.metadata["option"] for f in dataclasses.fields(cls) if "option" in f.metadata}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit code 2 through the caller, as every other bad input
        raise ConfigError(f"{message}; see {self.prog} --help")


def new_parser(prog: str, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser whose errors (unknown flag, missing value) raise a one-line `ConfigError`."""
    return _Parser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_arguments(parser: argparse.ArgumentParser, cls, groups: tuple[str, ...]) -> None:
    """One flag per option of ``cls`` (default None: the caller sees which were given), in help groups."""
    sections = {title: parser.add_argument_group(title) for title in groups}
    for name, spec in specs(cls).items():
        default = next(f.default for f in dataclasses.fields(cls) if f.name == name)
        bits = ([] if default is None else [f"default: {shown(default)}"]) + ([str(spec.range)] if spec.range else [])
        extra = dict(nargs="?", const="true", metavar="{true,false}") if spec.kind is bool else {}
        if spec.choices:
            extra["metavar"] = "{" + ",".join(spec.choices) + "}"
        help = f"{spec.help} ({'; '.join(bits)})" if bits else spec.help
        sections[spec.group].add_argument(flag(name), *spec.aliases, dest=name, default=None, help=help, **extra)


def given(args: argparse.Namespace, cls) -> dict[str, Any]:
    """The options given on the command line (the others are None)."""
    return {name: getattr(args, name) for name in specs(cls) if getattr(args, name, None) is not None}


def shown(value) -> str:
    """A value as the user would type it, quoted when it would read ambiguously."""
    if isinstance(value, str):
        return value if value and not any(c.isspace() for c in value) else repr(value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def fail(name: str, value, problem: str, where: str | None = None) -> ConfigError:
    """The error of one bad value: ``--flag value (in FILE): problem``."""
    origin = f" (in {where})" if where else ""
    return ConfigError(f"{flag(name)} {shown(value)}{origin}: {problem}")


def _convert(spec: Spec, value):
    """``value`` as ``spec.kind``; raises ValueError(problem)."""
    kind = spec.kind
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise ValueError("must be true or false")
    if kind in (int, float, NUMBER):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError("must be a number")
        if isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                raise ValueError("must be " + ("an integer" if kind is int else "a number")) from None
            value = int(number) if kind is not float and number.is_integer() else number
        if not math.isfinite(value):
            raise ValueError("must be a finite number" + (f" {spec.range}" if spec.range else ""))
        if kind is int:
            if not float(value).is_integer():
                raise ValueError("must be an integer")
            return int(value)
        return value  # a YAML int stays an int: config.yaml and results.json show it as written
    if isinstance(value, (dict, list)):
        raise ValueError("must be a single value, not a list or mapping")
    return str(value)


def check_value(name: str, spec: Spec, value, where: str | None = None):
    """``value`` converted to the option's type; raises `ConfigError` when it is invalid."""
    if value is None:  # a YAML key without a value (``lr:``) or ``null``
        if spec.optional:
            return None
        need = (f" {spec.range}" if spec.range else "") + (f"; choose {_one_of(spec.choices)}" if spec.choices else "")
        raise fail(name, "null", f"needs a value{need}", where)
    try:
        converted = _convert(spec, value)
    except ValueError as err:
        raise fail(name, value, str(err), where) from None
    if spec.range is not None and converted not in spec.range:
        raise fail(name, value, f"must be {spec.range}" + (f" ({spec.note})" if spec.note else ""), where)
    if spec.choices is not None and converted not in spec.choices:
        raise fail(
            name, value, f"unknown {name.replace('_', ' ')} {converted!r}; choose {_one_of(spec.choices)}", where
        )
    if spec.check is not None:
        try:
            spec.check(converted)
        except ValueError as err:
            raise fail(name, value, str(err), where) from None
    return converted


def validate(cls, values: dict[str, Any], where: dict[str, str] | None = None) -> dict[str, Any]:
    """Every option of ``values`` checked and converted; ``where[name]`` is the file a value came from."""
    known = specs(cls)
    where = where or {}
    return {name: check_value(name, known[name], value, where.get(name)) for name, value in values.items()}


def load_yaml(path: Path) -> dict[str, Any]:
    """The mapping in the YAML file ``path``; a missing file or bad syntax is a one-line `ConfigError`."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot be read ({err})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}{at}: YAML syntax error: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a mapping of option: value, not a {type(data).__name__}")
    return data


def _one_of(choices) -> str:
    return ", ".join(choices[:-1]) + " or " + choices[-1] if len(choices) > 1 else choices[0]
