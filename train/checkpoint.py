"""Orbax checkpoints of what training changes, and nothing else.

A step directory holds the train state (trainable slices and leaves, optimizer
state, step, RNG) and JSON metadata: the base model and a fingerprint of its
frozen weights, the method and its selection, the config, and the data
position. Frozen weights are never written. Restoring checks the metadata
first, so a checkpoint is never silently applied to another base model or
selection.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp

from rocoft_jax import tree as tree_lib
from train.errors import CheckpointError

FORMAT_VERSION = 1


def fingerprint(frozen) -> str:
    """A hash of the frozen weights' paths, shapes and sampled values.

    Samples (the first and 64 strided entries of each leaf, rounded to bf16)
    keep it cheap for 7B models and independent of dtype and sharding.
    """
    digest = hashlib.sha256()
    for path, leaf in sorted(tree_lib.flatten(frozen).items()):
        flat = leaf.reshape(-1)
        stride = max(flat.shape[0] // 64, 1)
        sample = np.concatenate(
            [np.asarray(jax.device_get(flat[:64])), np.asarray(jax.device_get(flat[::stride][:64]))]
        )
        digest.update(f"{path}:{tuple(leaf.shape)}".encode())
        digest.update(sample.astype(np.float32).astype(ml_dtypes.bfloat16).tobytes())
    return digest.hexdigest()[:16]


def manager(directory: Path, max_to_keep: int = 2) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=False, create=True)
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(Path(directory).absolute(), options=options, item_handlers=handlers)


def save(mgr: ocp.CheckpointManager, step: int, state, meta: dict[str, Any]) -> None:
    """Writes one step; returns once it is complete on disk."""
    meta = {"format_version": FORMAT_VERSION, **meta}
    mgr.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(_as_tree(state)), meta=ocp.args.JsonSave(meta)),
        force=True,
    )
    mgr.wait_until_finished()


def _as_tree(state) -> dict:
    return {"trainable": state.trainable, "opt_state": state.opt_state, "step": state.step, "rng": state.rng}


def read_meta(mgr: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    try:
        return mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as err:  # orbax raises many types for a damaged directory
        raise CheckpointError(_damaged(mgr, step, err)) from err


def _damaged(mgr, step: int, err: Exception) -> str:
    where = Path(str(mgr.directory)) / str(step)
    return (
        f"checkpoint {where} is corrupt or incomplete ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
        f"delete that step directory to resume from an earlier one, or start a new --output-dir"
    )


def check_compatible(meta: dict[str, Any], expected: dict[str, Any]) -> None:
    """Raises `CheckpointError` naming the first field where a checkpoint differs from this run."""
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint format {meta.get('format_version')} is not {FORMAT_VERSION}")
    if meta["fingerprint"] != expected["fingerprint"]:
        raise CheckpointError(
            f"checkpoint was trained on other base weights ({meta['model']}, fingerprint {meta['fingerprint']}) "
            f"than this run's {expected['model']} (fingerprint {expected['fingerprint']}); "
            f"resume with --model {meta['model']} and the same --dtype, or use a new --output-dir"
        )
    for key in ("method", "mode", "rank", "strategy", "lora_rank", "task", "kernels"):
        if meta["selection"].get(key) != expected["selection"].get(key):
            raise CheckpointError(
                f"checkpoint has {key}={meta['selection'].get(key)!r} but this run asks for "
                f"{expected['selection'].get(key)!r}; pass the checkpoint's value or use a new --output-dir"
            )
    same_draw = meta["selection"].get("seed") == expected["selection"].get("seed")
    if meta["selection"].get("indices") != expected["selection"].get("indices") or not same_draw:
        raise CheckpointError(
            "checkpoint selected other rows/columns than this run (different --seed, strategy "
            "or calibration); pass the checkpoint's settings or use a new --output-dir"
        )


def restore(mgr: ocp.CheckpointManager, step: int, like_state):
    """The train state saved at ``step``, laid out (shapes, dtypes, shardings) like ``like_state``."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _as_tree(like_state))
    try:
        tree = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    except Exception as err:
        raise CheckpointError(_damaged(mgr, step, err)) from err
    return like_state.replace(**tree)


def load(directory: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(meta, trainable)`` of the latest checkpoint in ``directory``, without a model; for export and tests."""
    mgr = manager(directory)
    step = mgr.latest_step()
    if step is None:
        raise CheckpointError(f"no checkpoint in {directory}; pass OUTPUT_DIR/checkpoints of a train.run")
    meta = read_meta(mgr, step)
    try:
        # Onto this process's first device, whatever mesh or process count saved it.
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), mgr.item_metadata(step)["state"]
        )
        tree = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    except Exception as err:
        raise CheckpointError(_damaged(mgr, step, err)) from err
    return meta, tree["trainable"]
