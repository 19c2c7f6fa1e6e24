"""JAX's persistent compilation cache for `train.run` (``--compile-cache``): a rerun of a recipe loads its
compiled programs instead of compiling them again.

``--compile-cache`` is a directory, ``off``, or ``auto`` (the default): ``$ROCOFT_COMPILE_CACHE`` when set (a
directory or ``off``), else ``$XDG_CACHE_HOME/rocoft_jax/jax-compile-cache`` (``~/.cache`` when XDG_CACHE_HOME
is unset). Every program is cached, however small or quick to compile. A cache entry is trusted code: do not
point the cache at a directory others can write. The processes of a multi-process run may share one
directory; an entry that cannot be read is compiled again (JAX warns).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

from train.errors import ConfigError

ENV = "ROCOFT_COMPILE_CACHE"
OFF = "off"
AUTO = "auto"


def default_dir() -> Path:
    """``$XDG_CACHE_HOME/rocoft_jax/jax-compile-cache``, with ``~/.cache`` for an unset or empty XDG_CACHE_HOME."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rocoft_jax" / "jax-compile-cache"


def resolve(setting: str) -> Path | None:
    """The cache directory of a ``--compile-cache`` value, or None for off."""
    if setting == AUTO:
        setting = os.environ.get(ENV, "").strip() or str(default_dir())
    if setting.lower() == OFF:
        return None
    return Path(setting).expanduser()


def configure(setting: str) -> Path | None:
    """Points JAX's persistent compilation cache at ``resolve(setting)`` (None: turns it off); returns the dir.

    Takes effect for every later compilation of this process, also after an earlier call chose another dir.
    A directory that cannot be created or written is a `ConfigError`.
    """
    path = resolve(setting)
    if path is not None:
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f".write_test.{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            source = f" (from ${ENV})" if setting == AUTO and os.environ.get(ENV, "").strip() else ""
            raise ConfigError(
                f"--compile-cache {path}{source} is not writable ({err.strerror}); "
                "choose another directory, or pass --compile-cache off"
            ) from err
    wanted = (str(path.absolute()) if path is not None else None, path is not None)
    current = (jax.config.jax_compilation_cache_dir, jax.config.jax_enable_compilation_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    if wanted != current:
        from jax.experimental.compilation_cache import compilation_cache

        jax.config.update("jax_compilation_cache_dir", wanted[0])
        jax.config.update("jax_enable_compilation_cache", wanted[1])
        compilation_cache.reset_cache()  # JAX opens its cache once; the next compile opens this one
    return path
