"""Choosing which rows or columns of a kernel to train.

The paper trains the first r rows/columns by default. Its ablation scores them
Wanda-style, S_ij = |W_ij| * ||X_j||_2 with W in the PyTorch (d_out, d_in)
layout and X_j the j-th input feature of that very layer on calibration data:
a row's score sums over inputs, a column's over outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rocoft_jax.intercept import replace_calls

STRATEGIES = ("first", "random", "max", "min", "mixed")
WANDA_STRATEGIES = ("max", "min", "mixed")


def wanda_scores(kernel, in_norms, axis: int, out_axis: int) -> np.ndarray:
    """Wanda score of each index along ``axis`` of a kernel.

    ``in_norms`` holds ||X_j||_2 for the kernel's input features (length d_in).
    """
    in_axis = 1 - out_axis
    norms = jnp.asarray(in_norms, jnp.float32)
    if norms.shape != (kernel.shape[in_axis],):
        raise ValueError(
            f"calibration norms have shape {norms.shape}, expected ({kernel.shape[in_axis]},): "
            "one norm per input feature of the layer"
        )
    s = jnp.abs(jnp.asarray(kernel, jnp.float32)) * jnp.expand_dims(norms, out_axis)
    return np.asarray(s.sum(axis=1 - axis))


def select_indices(dim: int, rank: int, strategy: str, rng: np.random.Generator, scores=None) -> np.ndarray:
    """Sorted int32 indices of ``rank`` of ``dim`` rows or columns."""
    if strategy == "first":
        chosen = np.arange(rank)
    elif strategy == "random":
        chosen = rng.choice(dim, size=rank, replace=False)
    else:
        order = np.argsort(-np.asarray(scores), kind="stable")  # highest score first
        if strategy == "max":
            chosen = order[:rank]
        elif strategy == "min":
            chosen = order[::-1][:rank]
        else:  # mixed: half (rounded up) from the top, the rest from the bottom
            top = order[: (rank + 1) // 2]
            rest = [i for i in order[::-1] if i not in set(top)][: rank - len(top)]
            chosen = np.concatenate([top, np.asarray(rest, dtype=order.dtype)])
    return np.sort(np.asarray(chosen, dtype=np.int32))


def select_entries(shape: tuple[int, ...], p: float, rng: np.random.Generator) -> np.ndarray:
    """Sorted flat indices of entries kept with probability ``p`` (the paper's random ablation)."""
    keep = rng.random(int(np.prod(shape))) < p
    return np.flatnonzero(keep).astype(np.int32)


def activation_norms(
    model: Callable[..., Any],
    params,
    batches: Iterable[Mapping[str, Any]],
    kernel_paths: Iterable[str],
) -> dict[str, np.ndarray]:
    """||X_j||_2 of every input feature of the given kernels' layers.

    Runs ``model(**batch, params=params)`` (an HF Flax model, or any callable
    with that signature) and intercepts each Dense whose kernel path is in
    ``kernel_paths``, so X is that layer's real input. Padding positions,
    marked by ``attention_mask``, are left out. Returns a dict from kernel path
    to norms, ready for ``mask_params(..., calibration=)``.
    """
    wanted = set(kernel_paths)

    @jax.jit
    def sums_of_squares(params, batch):
        out: dict[str, jax.Array] = {}
        token_mask = batch.get("attention_mask")

        def record(module, args, kwargs, call_original):
            key = "/".join((*module.path, "kernel"))
            x = jnp.asarray(args[0], jnp.float32)
            if token_mask is not None and x.shape[:2] == token_mask.shape:
                x = x * token_mask[..., None]
            out[key] = out.get(key, 0.0) + jnp.sum(x * x, axis=tuple(range(x.ndim - 1)))
            return call_original(*args, **kwargs)

        with replace_calls(lambda module: "/".join((*module.path, "kernel")) in wanted, record):
            model(**batch, params=params)
        return out

    totals: dict[str, np.ndarray] = {}
    for batch in batches:
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "weights")}
        for key, value in sums_of_squares(params, inputs).items():
            totals[key] = totals.get(key, 0.0) + np.asarray(value, np.float64)
    missing = wanted - set(totals)
    if missing:
        raise ValueError(
            f"no activations were seen for {sorted(missing)[:3]}: the model never called those layers, "
            "or no calibration batches were given"
        )
    return {k: np.sqrt(v).astype(np.float32) for k, v in totals.items()}
