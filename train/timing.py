"""Where a run's wall time goes: seconds per phase and per compiled step program, for results.json's ``timing``.

Phases are exclusive: a phase entered inside another (a compile inside the loop, an evaluation inside it) is
counted in its own phase only, so the phases and ``other`` add up to ``total``. The step programs (the train
and eval step of each batch shape) are compiled ahead of their first call by `StepPrograms`, under the
``compile`` phase and a program label, so a first step never hides a compile. JAX's monitoring events count
every XLA compilation of the run and the persistent compilation cache's hits and misses (`train.compile_cache`).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
from jax import monitoring

from train.compile_prefetch import USED_EVENT as PREFETCH_EVENT  # a cache hit loaded ahead of its lowering

PHASES = (
    "setup",
    "model_load",
    "data",
    "selection",
    "compile",
    "train_steps",
    "evaluation",
    "checkpointing",
    "reporting",
)
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # an XLA compile or a persistent-cache load
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
CACHE_MISS_EVENT = "/jax/compilation_cache/cache_misses"  # compiled and written to the persistent cache


class Timing:
    """Seconds per phase (`PHASES`), step-program compiles and JAX's compile events, from creation to `to_dict`.

    Listens to JAX's monitoring events until `close`; events of other threads of the process count too.
    """

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.programs: dict[str, dict[str, float]] = {}
        self.backend = {"count": 0, "seconds": 0.0}
        self.cache = {"hits": 0, "misses": 0, "prefetched": 0}
        self.on_compile: Callable[[str | None], None] | None = None  # told a program's label, then None
        self._stack: list[float] = []  # time spent in nested phases, one entry per open phase
        self._lock = threading.Lock()  # compiles and JAX's events may come from several threads
        monitoring.register_event_duration_secs_listener(self._duration)
        monitoring.register_event_listener(self._event)
        self._listening = True

    def _duration(self, event: str, seconds: float, **kwargs) -> None:
        if event == BACKEND_COMPILE_EVENT:
            with self._lock:
                self.backend["count"] += 1
                self.backend["seconds"] += seconds

    def _event(self, event: str, **kwargs) -> None:
        with self._lock:
            if event == CACHE_HIT_EVENT:
                self.cache["hits"] += 1
            elif event == CACHE_MISS_EVENT:
                self.cache["misses"] += 1
            elif event == PREFETCH_EVENT:
                self.cache["prefetched"] += 1

    @contextlib.contextmanager
    def phase(self, name: str):
        """Counts the time inside, less that of phases nested in it, as ``name``."""
        start = time.perf_counter()
        self._stack.append(0.0)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            nested = self._stack.pop()
            self.seconds[name] += elapsed - nested
            if self._stack:
                self._stack[-1] += elapsed

    @contextlib.contextmanager
    def compiling(self, label: str):
        """The ``compile`` phase of one program, counted under ``label``; `on_compile` hears of it."""
        if self.on_compile is not None:
            self.on_compile(label)
        start = time.perf_counter()
        try:
            with self.phase("compile"):
                yield
        finally:
            self.record_program(label, time.perf_counter() - start)
            if self.on_compile is not None:
                self.on_compile(None)

    def record_program(self, label: str, seconds: float) -> None:
        """One compile of ``label`` that took ``seconds`` (thread-safe)."""
        with self._lock:
            entry = self.programs.setdefault(label, {"count": 0, "seconds": 0.0})
            entry["count"] += 1
            entry["seconds"] += seconds

    def close(self) -> None:
        """Stops listening to JAX's events (the counts so far stay)."""
        if self._listening:
            monitoring.unregister_event_duration_listener(self._duration)
            monitoring.unregister_event_listener(self._event)
            self._listening = False

    def to_dict(self) -> dict[str, Any]:
        """results.json's ``timing``: seconds (rounded to ms) per phase, ``other`` and ``total``, and ``compile``."""
        total = time.perf_counter() - self.start
        phases = {name: round(s, 3) for name, s in self.seconds.items() if name != "compile"}
        compile_info = {
            "count": sum(int(p["count"]) for p in self.programs.values()),
            "seconds": round(self.seconds["compile"], 3),
            "programs": {
                k: {"count": int(p["count"]), "seconds": round(p["seconds"], 3)} for k, p in self.programs.items()
            },
            "backend_compiles": {"count": self.backend["count"], "seconds": round(self.backend["seconds"], 3)},
            "cache_hits": self.cache["hits"],
            "cache_misses": self.cache["misses"],
            "cache_prefetched": self.cache["prefetched"],
        }
        other = total - sum(self.seconds.values())
        return {**phases, "compile": compile_info, "other": round(max(other, 0.0), 3), "total": round(total, 3)}


def describe(batch: Mapping[str, Any]) -> str:
    """A batch's shape as a program label: ``32x64`` (of input_ids, else the first array), ``no mask`` when the
    batch has input_ids but no attention_mask (`train.input_pipeline.drop_full_mask`), and a seq2seq batch's
    decoder shape: ``16x1024, decoder 16x128``."""
    arrays = dict(batch)
    first = arrays.get("input_ids", next(iter(arrays.values()), None))
    label = _shape(first) + (" no mask" if "input_ids" in arrays and "attention_mask" not in arrays else "")
    return label + (f", decoder {_shape(arrays['decoder_input_ids'])}" if "decoder_input_ids" in arrays else "")


def _shape(array) -> str:
    return "x".join(str(d) for d in getattr(array, "shape", ()))


def _key(batch) -> tuple:
    return tuple((path, tuple(x.shape), str(x.dtype)) for path, x in jax.tree_util.tree_leaves_with_path(batch))


class StepPrograms:
    """A jitted step (``fn(..., batch)``) compiled once per batch shape, ahead of its first call.

    ``__call__`` runs the program of the batch's shape, compiling it first (timed as ``"<name> <shape>"``) when
    it is new; `compile` does so without running, from arrays or ``jax.ShapeDtypeStruct``s. ``lower`` is the
    jitted function's, for callers that compile it themselves.
    """

    def __init__(self, jitted, name: str, timing: Timing):
        self.jitted, self.name, self.timing = jitted, name, timing
        self.programs: dict[tuple, Any] = {}

    def compile(self, *args) -> Any:
        key = _key(args[-1])
        if key not in self.programs:
            with self.timing.compiling(f"{self.name} {describe(args[-1])}"):
                self.programs[key] = self.jitted.lower(*args).compile()
        return self.programs[key]

    def lower(self, *args):
        return self.jitted.lower(*args)

    def __call__(self, *args):
        program = self.programs.get(_key(args[-1]))
        if program is None:
            program = self.compile(*args)
        return program(*args)


class Compiles:
    """Step programs lowered and compiling in the background (`start_compiles`); `wait` installs them."""

    def __init__(self, timing: Timing, todo: list, futures: list):
        self.timing, self.todo, self.futures = timing, todo, futures

    def holds(self, programs: StepPrograms, args) -> bool:
        """Whether one of these compiles is ``programs``' for the batch shape of ``args``."""
        return any(p is programs and _key(a[-1]) == _key(args[-1]) for p, a in self.todo)

    def wait(self, progress=None) -> int:
        """Waits for every compile (the ``compile`` phase), installs the programs in their `StepPrograms`, and
        returns how many there were; ``progress`` (e.g. a tqdm bar) is updated once per program."""
        with self.timing.phase("compile"):
            for (programs, args), future in zip(self.todo, self.futures):
                programs.programs[_key(args[-1])] = future.result()
                if progress is not None:
                    progress.update(1)
        return len(self.todo)


def start_compiles(work: Sequence[tuple[StepPrograms, tuple]], timing: Timing) -> Compiles:
    """Lowers each ``(programs, args)`` not compiled yet and starts its compile; returns without waiting.

    ``args`` may be arrays or ``jax.ShapeDtypeStruct``s. Tracing holds the GIL, so lowering runs on this
    thread (the ``compile`` phase); XLA's compiles release it and run on a pool of up to one thread per core
    (a persistent-cache hit is a load), while this thread goes on, e.g. to read the weights. A run
    refused meanwhile prints its error at once, and the interpreter exits once they end: XLA aborts the
    process if it exits under a running compile. Each program's own compile seconds go under its label.
    """
    todo, keys = [], set()
    for programs, args in work:
        shape = _key(args[-1])
        if shape not in programs.programs and (id(programs), shape) not in keys:
            keys.add((id(programs), shape))
            todo.append((programs, args))

    def build(label, lowered):
        start = time.perf_counter()
        try:
            return lowered.compile()
        finally:
            timing.record_program(label, time.perf_counter() - start)

    # The pool's threads are joined when the interpreter exits, as XLA needs; shutdown(wait=False) lets this
    # thread go on while they work.
    pool = ThreadPoolExecutor(max(1, min(len(todo), os.cpu_count() or 1)), thread_name_prefix="compile")
    with timing.phase("compile"):
        futures = [
            pool.submit(build, f"{programs.name} {describe(args[-1])}", programs.jitted.lower(*args))
            for programs, args in todo
        ]
    pool.shutdown(wait=False)
    return Compiles(timing, todo, futures)


def compile_ahead(work: Sequence[tuple[StepPrograms, tuple]], timing: Timing, progress=None) -> int:
    """Compiles each ``(programs, args)`` not compiled yet, side by side (`start_compiles`), and waits for them.

    The wall time is the ``compile`` phase; ``progress`` is updated once per finished program. Returns how
    many programs were compiled.
    """
    return start_compiles(work, timing).wait(progress)
