"""Orbax checkpoints of what training changes, and nothing else.

A step directory holds the train state (trainable slices and leaves, optimizer
state, step, RNG) and JSON metadata: the base model and a fingerprint of its
frozen weights, the method and its selection, the config, and the data
position. Frozen weights are never written. Restoring checks the metadata
first, so a checkpoint is never silently applied to another base model or
selection.

What ``--resume`` (`restore_latest`) does with a faulty checkpoint directory;
none of these prints a traceback or starts afresh:

- An unfinished save (orbax's ``<step>.orbax-checkpoint-tmp-*`` directory, left
  by a process killed while writing) never was a checkpoint: it is removed with
  a one-line warning and the run resumes from the newest complete step.
- A damaged step (a file missing, truncated or unparseable, or metadata without
  its required fields) is moved aside to ``<step>.damaged`` with a one-line
  warning, and the next older step is tried. Moving it keeps the files for
  inspection and frees the step number, which orbax refuses to save over. With
  no readable step left, a `CheckpointError` (exit code 2).
- A readable step whose metadata does not match this run (format version, base
  weights, method, selection) is a `CheckpointError` naming the field: an older
  step of the same directory was written by the same run, so falling back
  cannot help, and training on would mix two runs.

`load` (for export) falls back on nothing: it reads the newest complete step
or fails with one line, so an export is never silently an older model.
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from rocoft_jax.adapters import fingerprint as fingerprint  # the base check that adapters repeat
from train import distributed
from train.errors import CheckpointError

FORMAT_VERSION = 1
TMP_MARK = ".orbax-checkpoint-tmp"  # orbax writes a step under this suffix and renames it when complete
# Metadata fields every step holds, with their types; a step lacking one is damaged, not another run's.
META_FIELDS = {"format_version": int, "model": str, "fingerprint": str, "selection": dict, "config": dict}


class DamagedCheckpoint(CheckpointError):
    """A step directory that cannot be read back; an older step may still be complete."""


def manager(directory: Path, max_to_keep: int = 2) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=False, create=True)
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(Path(directory).absolute(), options=options, item_handlers=handlers)


def save(mgr: ocp.CheckpointManager, step: int, state, meta: dict[str, Any]) -> None:
    """Writes one step; returns once it is complete on disk."""
    meta = {"format_version": FORMAT_VERSION, **meta}
    mgr.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(_on_host(_as_tree(state))), meta=ocp.args.JsonSave(meta)),
        force=True,
    )
    mgr.wait_until_finished()


def _on_host(tree):
    """``tree`` as numpy arrays in one transfer where this process holds all of it (else as it is).

    orbax's cost per array dominates a RoCoFT state of many small slices, and it writes numpy arrays in about
    half the time of jax.Arrays (876 float32 arrays of 3x1024 on 2 CPU cores: 0.6 s against 1.3 s). A restore
    lays them out from its target as before; a state spread over processes stays as it is.
    """
    if all(getattr(x, "is_fully_addressable", True) for x in jax.tree.leaves(tree)):
        return jax.device_get(tree)  # numpy arrays, 0-d ones included
    return tree


def _as_tree(state) -> dict:
    return {"trainable": state.trainable, "opt_state": state.opt_state, "step": state.step, "rng": state.rng}


def read_meta(mgr: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    """The metadata of ``step``; `DamagedCheckpoint` if it is unreadable or lacks a field of `META_FIELDS`."""
    try:
        meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as err:  # orbax raises many types for a damaged directory
        raise DamagedCheckpoint(_damaged(mgr, step, err)) from err
    bad = [k for k, kind in META_FIELDS.items() if not isinstance(meta, dict) or not isinstance(meta.get(k), kind)]
    if bad:
        raise DamagedCheckpoint(f"checkpoint {_step_dir(mgr, step)} has metadata without a valid {', '.join(bad)}")
    return meta


def _step_dir(mgr, step: int) -> Path:
    return Path(str(mgr.directory)) / str(step)


def _damaged(mgr, step: int, err: BaseException) -> str:
    _quiet_abandoned_reads()
    while err.__cause__ or err.__context__:  # the innermost error names the file (orbax wraps tensorstore's)
        err = err.__cause__ or err.__context__
    first = (str(err).strip().splitlines() or [""])[0][:200]
    return f"checkpoint {_step_dir(mgr, step)} is corrupt or incomplete ({type(err).__name__}: {first})"


def _quiet_abandoned_reads() -> None:
    """Keeps a failed read to its one line: drops the echoes of orbax's reads that the failure abandoned.

    When one array of a damaged step fails, orbax closes its event loop while tensorstore still completes the
    other reads; their callbacks then raise "Event loop is closed" in tensorstore's threads, and orbax's read
    coroutines and tasks are collected with their errors unretrieved: Python and asyncio would print each as a
    traceback after the error. Only those are dropped, and only once a read has failed.
    """
    asyncio_log = logging.getLogger("asyncio")
    if _unretrieved_task not in asyncio_log.filters:
        asyncio_log.addFilter(_unretrieved_task)
    previous = sys.unraisablehook
    if getattr(previous, "quiets_abandoned_reads", False):
        return

    def hook(unraisable):
        exc, code = unraisable.exc_value, getattr(unraisable.object, "cr_code", None)
        closed_loop = isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"
        if not (closed_loop or (code is not None and "orbax" in code.co_filename)):
            previous(unraisable)

    hook.quiets_abandoned_reads = True
    sys.unraisablehook = hook


def _unretrieved_task(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Task exception was never retrieved")


def check_compatible(meta: dict[str, Any], expected: dict[str, Any], where: Path | str = "") -> None:
    """Raises `CheckpointError` naming the first field where checkpoint ``where`` differs from this run."""
    name = f"checkpoint {where}" if where else "checkpoint"
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{name} has format {meta.get('format_version')}, not {FORMAT_VERSION}; "
            "resume it with the rocoft_jax version that wrote it, or use a new --output-dir"
        )
    if meta["fingerprint"] != expected["fingerprint"]:
        raise CheckpointError(
            f"{name} was trained on other base weights ({meta['model']}, fingerprint {meta['fingerprint']}) "
            f"than this run's {expected['model']} (fingerprint {expected['fingerprint']}); "
            f"resume with --model {meta['model']} and the same --dtype, or use a new --output-dir"
        )
    for key in ("method", "mode", "rank", "strategy", "lora_rank", "task", "kernels"):
        if meta["selection"].get(key) != expected["selection"].get(key):
            raise CheckpointError(
                f"{name} has {key}={meta['selection'].get(key)!r} but this run asks for "
                f"{expected['selection'].get(key)!r}; pass the checkpoint's value or use a new --output-dir"
            )
    same_draw = meta["selection"].get("seed") == expected["selection"].get("seed")
    if meta["selection"].get("indices") != expected["selection"].get("indices") or not same_draw:
        raise CheckpointError(
            f"{name} selected other rows/columns than this run (different --seed, strategy "
            "or calibration); pass the checkpoint's settings or use a new --output-dir"
        )


def restore(mgr: ocp.CheckpointManager, step: int, like_state):
    """The train state saved at ``step``, laid out (shapes, dtypes, shardings) like ``like_state``."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _as_tree(like_state))
    try:
        tree = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    except Exception as err:
        raise DamagedCheckpoint(_damaged(mgr, step, err)) from err
    return like_state.replace(**tree)


def restore_latest(mgr: ocp.CheckpointManager, like_state, expected: dict[str, Any]) -> tuple[Any, int]:
    """``(state, step)`` of the newest complete step, once its metadata matches ``expected`` (this run's).

    Faults are handled as the module docstring says. Every process reads and decides alike; several processes
    also agree through one collective per step tried, since a truncated shard may be read by one process only.
    Process 0 alone removes and moves directories.
    """
    directory = Path(str(mgr.directory))
    for tmp in unfinished_saves(directory):
        _warn(f"removed {tmp}, a save that never finished (its process was killed while writing)")
        if distributed.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
    steps = sorted(mgr.all_steps(), reverse=True)
    if not steps:
        raise CheckpointError(
            f"no complete checkpoint in {directory}; drop --resume and use a new --output-dir to start afresh"
        )
    for i, step in enumerate(steps):
        damage, state = None, None
        try:
            check_compatible(read_meta(mgr, step), expected, _step_dir(mgr, step))
            state = restore(mgr, step, like_state)
        except DamagedCheckpoint as err:
            damage = err
        if not distributed.any_process(damage is not None):
            return state, step
        reason = damage or f"checkpoint {_step_dir(mgr, step)} is incomplete on another process"
        if i + 1 == len(steps):
            raise CheckpointError(
                f"{reason}, and no earlier step in {directory} is complete; "
                "delete that step directory and drop --resume to start afresh, or use a new --output-dir"
            )
        aside = _move_aside(_step_dir(mgr, step))
        _warn(f"{reason}; moved it to {aside.name} and falling back to step {steps[i + 1]}")
        mgr.reload()  # the manager lists steps from a cache; the moved one must leave it
    raise AssertionError("unreachable")


def unfinished_saves(directory: Path) -> list[Path]:
    """orbax's temporary step directories in ``directory``: saves that never completed."""
    return sorted(p for p in Path(directory).iterdir() if TMP_MARK in p.name) if Path(directory).is_dir() else []


def _move_aside(path: Path) -> Path:
    aside = path.with_name(f"{path.name}.damaged")
    n = 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.damaged-{n}")
    if distributed.is_main():
        path.rename(aside)
    distributed.barrier(f"moved_{path.name}")
    return aside


def _warn(message: str) -> None:
    if distributed.is_main():
        print(f"warning: {message}", file=sys.stderr, flush=True)


def load(directory: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(meta, trainable)`` of the newest complete step in ``directory``, without a model; for export and tests.

    A damaged newest step is a `CheckpointError`, never a fallback: an export must be the model the user expects.
    """
    mgr = manager(directory)
    step = mgr.latest_step()
    if step is None:
        raise CheckpointError(f"no checkpoint in {directory}; pass OUTPUT_DIR/checkpoints of a train.run")
    for tmp in unfinished_saves(Path(directory)):
        _warn(f"ignoring {tmp}, a save that never finished; reading step {step}")
    advice = "; delete that step directory to use the one before it, or pass another run"
    try:
        meta = read_meta(mgr, step)
    except DamagedCheckpoint as err:
        raise CheckpointError(f"{err}{advice}") from err
    try:
        # Onto this process's first device, whatever mesh or process count saved it.
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), mgr.item_metadata(step)["state"]
        )
        tree = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    except Exception as err:
        raise CheckpointError(_damaged(mgr, step, err) + advice) from err
    return meta, tree["trainable"]
