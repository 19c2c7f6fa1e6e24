"""A rerun's cached programs, loaded while the run still traces them.

JAX finds a program in its persistent compilation cache (`train.compile_cache`) by a key over the lowered
program, so a rerun first traces and lowers each step program (seconds, for a large model) and only then starts
loading its executable from the cache (more seconds, inside XLA). `Prefetch` remembers, per recipe (`recipe_key`),
the cache entries its programs used; a rerun of the recipe starts loading those entries on threads of their own
as soon as it starts, while it sets up, reads the weights and lowers the steps. When JAX's compile path then asks
its cache for a key, an executable prefetched under that exact key, with the same compile options and devices,
is handed over; anything else (a changed recipe or JAX, an evicted entry, an unreadable index) falls through to
JAX's own read. A guess can cost time, never change a program: the key JAX computes from the real lowering
decides.

The index is a JSON file in the cache directory (`INDEX_NAME`), at most `MAX_RECIPES` recipes of at most
`MAX_PROGRAMS` entries each. Multi-process runs do not prefetch. The hook sits on a private JAX function
(``jax._src.compiler._cache_read``); where it is missing or lacks the parameters it needs, nothing is prefetched.
"""

from __future__ import annotations

import base64
import hashlib
import inspect
import json
import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax

INDEX_NAME = "rocoft-prefetch-index.json"
MAX_RECIPES = 128
MAX_PROGRAMS = 64
# Options that never change a compiled program: where outputs go, how often to log, and this machinery's own.
RUN_ONLY = ("output_dir", "compile_cache", "print_sharding", "log_every", "heartbeat_timeout")
USED_EVENT = "/rocoft_jax/compile_prefetch/used"  # a JAX monitoring event per program handed over

logger = logging.getLogger(__name__)
_lock = threading.Lock()
_active: Prefetch | None = None
_installed: bool | None = None  # None: not tried yet; False: this JAX has no hook point


def begin(cache_dir: Path | None, config: dict[str, Any]) -> Prefetch | None:
    """A started `Prefetch` for a run of ``config`` with its compilation cache in ``cache_dir``, or None where
    there is no cache or the run has several processes."""
    if cache_dir is None or jax.process_count() > 1:
        return None
    return Prefetch(cache_dir, recipe_key(config)).start()


def recipe_key(config: dict[str, Any]) -> str:
    """A hash of what shapes a run's programs: its options less `RUN_ONLY`, the JAX version and the devices."""
    devices = [(d.platform, d.device_kind, d.id) for d in jax.devices()]
    payload = {k: v for k, v in config.items() if k not in RUN_ONLY}
    payload.update(jax=jax.__version__, devices=devices, xla_flags=os.environ.get("XLA_FLAGS", ""))
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


class Prefetch:
    """Prefetching for one run: `start` loads the recipe's remembered entries, `save` remembers this run's.

    Counts in ``used`` the programs it handed over and in ``loaded`` the entries it loaded.
    """

    def __init__(self, cache_dir: Path, recipe: str):
        self.index_path = Path(cache_dir) / INDEX_NAME
        self.recipe = recipe
        self.used = 0
        self.loaded = 0
        self._pending: dict[str, tuple[dict[str, Any], Future]] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._seen: dict[str, dict[str, Any]] = {}

    def start(self) -> Prefetch:
        """Starts loading the recipe's remembered entries (if any) and hooks JAX's cache reads; returns self."""
        global _active
        if not _install():
            return self
        backend = jax.devices()[0].client
        by_id = {d.id: d for d in backend.local_devices()}
        entries = [
            e for e in _read_index(self.index_path).get(self.recipe, []) if all(i in by_id for i in e["devices"] or ())
        ]
        if entries:  # entries for devices this process lacks (another machine's, say) are skipped
            pool = ThreadPoolExecutor(min(len(entries), os.cpu_count() or 1), thread_name_prefix="prefetch")
            for entry in entries:
                self._pending[entry["key"]] = (entry, pool.submit(self._load, entry, backend, by_id))
            pool.shutdown(wait=False)  # its threads finish their loads; the interpreter joins them at exit
            self._pool = pool
        with _lock:
            _active = self
        return self

    def _load(self, entry: dict[str, Any], backend, by_id):
        from jax._src import compilation_cache
        from jax._src.lib import xla_client

        options = xla_client.CompileOptions.ParseFromString(base64.b64decode(entry["options"]))
        extra = {}
        if "executable_devices" in inspect.signature(compilation_cache.get_executable_and_time).parameters:
            extra["executable_devices"] = xla_client.DeviceList(tuple(by_id[i] for i in entry["devices"] or ()))
        executable, seconds = compilation_cache.get_executable_and_time(entry["key"], options, backend, **extra)
        if executable is not None:
            with _lock:
                self.loaded += 1
        return executable, seconds

    def take(self, cache_key: str, compile_options, executable_devices):
        """The executable prefetched under ``cache_key`` with these options and devices, or None; remembers the
        request for `save`."""
        record = {
            "key": cache_key,
            "options": base64.b64encode(compile_options.SerializeAsString()).decode(),
            "devices": None if executable_devices is None else [d.id for d in executable_devices],
        }
        with _lock:
            if len(self._seen) < MAX_PROGRAMS:
                self._seen.setdefault(cache_key, record)
            entry, future = self._pending.pop(cache_key, (None, None))
        if entry is None or entry["options"] != record["options"] or entry["devices"] != record["devices"]:
            return None
        try:
            executable, seconds = future.result()
        except Exception as err:  # an unreadable entry: JAX's own read will say so, or compile it again
            logger.debug("prefetch of %s failed: %s", cache_key, err)
            return None
        if executable is None:
            return None
        with _lock:
            self.used += 1
        jax.monitoring.record_event(USED_EVENT)
        return executable, seconds

    def save(self) -> None:
        """Remembers the entries this run's compiles asked for under its recipe (atomically; errors are ignored:
        the index only ever saves time)."""
        with _lock:
            seen = list(self._seen.values())
        if not seen:
            return
        index = _read_index(self.index_path)
        index.pop(self.recipe, None)
        index[self.recipe] = seen  # last, as the newest
        while len(index) > MAX_RECIPES:
            index.pop(next(iter(index)))
        tmp = self.index_path.with_name(f"{INDEX_NAME}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(index))
            os.replace(tmp, self.index_path)
        except OSError as err:
            logger.debug("prefetch index not written: %s", err)

    def wait(self) -> Prefetch:
        """Blocks until every load `start` began has finished (failed loads included), so that ``loaded`` is
        final; returns self. A run never needs this: a load nobody asks for runs on in the background."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        return self

    def close(self) -> None:
        """Unhooks this run and drops the prefetched executables never handed over (they hold device memory
        until then); loads still running finish on their threads and are dropped."""
        global _active
        with _lock:
            if _active is self:
                _active = None
            self._pending.clear()


def _read_index(path: Path) -> dict[str, list[dict[str, Any]]]:
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(index, dict):
        return {}

    def valid(e) -> bool:
        if not (isinstance(e, dict) and isinstance(e.get("key"), str) and isinstance(e.get("options"), str)):
            return False
        devices = e.get("devices")
        return devices is None or (isinstance(devices, list) and all(isinstance(i, int) for i in devices))

    return {k: v for k, v in index.items() if isinstance(v, list) and all(valid(e) for e in v)}


def _install() -> bool:
    """Wraps JAX's persistent-cache read so that the active `Prefetch` can answer it; False where it cannot.

    The wrapper binds the call to the original's signature (JAX has added parameters over versions) and leaves
    a call with host callbacks, which JAX never caches, to the original.
    """
    global _installed
    with _lock:
        if _installed is not None:
            return _installed
        try:
            from jax._src import compilation_cache, compiler

            original = compiler._cache_read
            signature = inspect.signature(original)
            loader = inspect.signature(compilation_cache.get_executable_and_time).parameters
            _installed = {"cache_key", "compile_options", "backend"} <= signature.parameters.keys() and (
                "executable_devices" in signature.parameters or "executable_devices" not in loader
            )
        except (ImportError, AttributeError, TypeError, ValueError):
            _installed = False
        if not _installed:
            logger.debug("this JAX has no persistent-cache read to hook: nothing is prefetched")
            return False

        def _cache_read(*args, **kwargs):
            prefetch = _active
            if prefetch is not None:
                try:
                    call = signature.bind(*args, **kwargs).arguments
                except TypeError:
                    call = None
                if call is not None and not call.get("host_callbacks"):
                    hit = prefetch.take(call["cache_key"], call["compile_options"], call.get("executable_devices"))
                    if hit is not None:
                        return hit
            return original(*args, **kwargs)

        compiler._cache_read = _cache_read
        return True
