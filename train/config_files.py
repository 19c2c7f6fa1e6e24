"""The YAML config files of `train.run`: where a task's file is, and how a file extends a base.

A task's file is ``configs/<kind>/<name>.yaml`` (``configs/demo.yaml`` for the demo). A file may
start from another with ``base: FILE``, relative to itself and resolved recursively; its own keys
override the base's. A missing base, a cycle, a YAML syntax error (with file and line) or a key
that is not an option is a one-line `ConfigError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from train import options as opt
from train.errors import ConfigError
from train.tasks import lookup

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def default_config_file(task: str) -> Path | None:
    """The file of ``task``, or None if it has none; an unknown task is a `DataError` listing every task."""
    kind, name = lookup(task)
    path = CONFIG_DIR / "demo.yaml" if kind == "demo" else CONFIG_DIR / kind / f"{name}.yaml"
    return path if path.is_file() else None


def load_file(path: Path, cls, _chain: tuple[Path, ...] = ()) -> tuple[dict[str, Any], dict[str, str]]:
    """``(values, where)`` of a file of options of the config class ``cls``, its ``base`` files resolved;
    ``where[key]`` is the file that set the value. Values are as YAML read them, not yet checked."""
    path = Path(path)
    real = path.resolve()
    if real in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, real))
        raise ConfigError(f"{path}: its 'base' files form a cycle: {cycle}")
    data = opt.load_yaml(path)
    known = set(opt.specs(cls))
    unknown = sorted(set(data) - known - {"base"})
    if unknown:
        raise ConfigError(f"{path}: unknown keys {unknown}; valid keys: {sorted(known | {'base'})}")
    values, where = {}, {}
    if "base" in data:
        base = data.pop("base")
        if not isinstance(base, str) or not (path.parent / base).is_file():
            raise ConfigError(
                f"{path}: base {base!r} is not a file (looked for {path.parent / str(base)}); "
                "name a config file relative to this one"
            )
        values, where = load_file(path.parent / base, cls, (*_chain, real))
    values.update(data)
    where.update(dict.fromkeys(data, str(path)))
    return values, where
