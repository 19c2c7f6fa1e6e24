"""Adapters on the CLI side: `train.run --adapter DIR` and the adapter a run's checkpoint becomes.

`read` loads an adapter directory (`rocoft_jax.adapters.load_adapter`), `with_selection` makes the run's
options tell the adapter's method and selection, and `start` checks the adapter against the loaded base model
(family, shapes, fingerprint) and returns the method with the adapter's values as the starting trainable tree.
`of_run` turns a restored checkpoint into an adapter for `train.export`. Every problem is a one-line
`CheckpointError` (exit code 2).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from rocoft_jax import adapters as adapters_lib
from train import methods as methods_lib
from train.config import TrainConfig
from train.errors import CheckpointError


def read(path: str | Path) -> adapters_lib.Adapter:
    """The adapter in ``path``; a missing, corrupt or inconsistent one is a `CheckpointError`."""
    try:
        return adapters_lib.load_adapter(path)
    except ValueError as err:
        raise CheckpointError(f"--adapter {path}: {err}") from err


def with_selection(config: TrainConfig, adapter: adapters_lib.Adapter) -> TrainConfig:
    """``config`` with the adapter's method, mode, rank, strategy and bias flag, so outputs report what runs."""
    record = adapter.config
    trained = adapter.config.get("extra", {}).get("config", {})
    changes: dict[str, Any] = {"method": record["method"], "strategy": record["strategy"]}
    if record["method"] == "rocoft":
        changes["mode"] = record["mode"]
        if record["mode"] == "random":
            changes["probability"] = float(record["rank"])
        else:
            changes["rank"] = int(record["rank"])
    if isinstance(trained.get("train_bias"), bool):
        changes["train_bias"] = trained["train_bias"]
    return dataclasses.replace(config, **changes)


def start(adapter: adapters_lib.Adapter, params, model_name: str):
    """``(method, trainable)``: the adapter's method on ``params``, and its values as the trainable tree.

    ``params`` must be the adapter's base: family, kernel shapes and fingerprint are checked.
    """
    try:
        mask = adapters_lib.check_base(adapter, params)
    except ValueError as err:
        base = adapter.config["base_model"]
        hint = "" if base == model_name else f"; pass --model {base} (for a random-init preset, its --seed too)"
        raise CheckpointError(f"--adapter {adapter.source}: {err}{hint}") from err
    description = {"method": adapter.config["method"], **mask.describe()}
    method = methods_lib.METHODS[adapter.config["method"]].restore(mask, description)
    return method, adapter.trainable()


def of_run(method: methods_lib.Method, trainable, meta: dict[str, Any], model) -> adapters_lib.Adapter:
    """The adapter of a restored run (`train.export.load_trained`); methods without one are a `CheckpointError`."""
    extra = {"task": meta["selection"].get("task"), "config": meta["config"]}
    num_labels = getattr(model.config, "num_labels", None)
    if num_labels is not None:
        extra["num_labels"] = int(num_labels)
    try:
        return adapters_lib.from_trainable(
            trainable,
            method.mask,
            base_fingerprint=meta["fingerprint"],
            base_model=meta["model"],
            method=method.name,
            extra=extra,
        )
    except ValueError as err:
        raise CheckpointError(str(err)) from err
