"""Splitting params into a small trainable tree and the frozen rest, and merging back.

The trainable tree is ``{"rocoft": {...}, "train": {...}}``, both nested like
the params: under "rocoft" each selected kernel's leaf is its slice (rows:
``kernel[:, idx]``, columns: ``kernel[idx, :]`` for Flax Dense; flat entries
in mode "random"); under "train" sit the leaves trained in full. Gradients,
optimizer state, donation and checkpoints then all scale with the slices.
The frozen tree keeps every other leaf, including the selected kernels
unchanged: the sliced forward pass reads both (see `rocoft_jax.sliced`).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from rocoft_jax import tree as tree_lib
from rocoft_jax.mask import FROZEN, ROCOFT, TRAIN, KernelSlice, RoCoFTMask


def take_slice(kernel, spec: KernelSlice, axis: int | None = None):
    """The trained part of ``kernel``, or the entries of ``spec``'s indices along another array's ``axis``.

    `KernelSlice` checks its indices against the kernel, so the gathers clip,
    which XLA folds away for these constant indices, where ``jnp.take``'s
    default would select a fill value for out-of-bounds rows in every gather.
    """
    if spec.axis is None:
        return jnp.ravel(kernel)[spec.indices]
    return jnp.take(kernel, spec.indices, axis=spec.axis if axis is None else axis, mode="clip")


def put_slice(kernel, values, spec: KernelSlice):
    """``kernel`` with its trained part replaced by ``values`` (cast to the kernel's dtype).

    Rows and columns go in by one elementwise select over the kernel, which XLA
    fuses into one kernel; ``kernel.at[idx].set(values)`` would be a copy and a
    scatter in each of the two merges per layer and step, mostly launch cost
    (docs/performance.md).
    """
    kernel = jnp.asarray(kernel)  # numpy params, e.g. from msgpack_restore
    values = jnp.asarray(values, kernel.dtype)
    if spec.axis is None:
        return jnp.ravel(kernel).at[spec.indices].set(values).reshape(kernel.shape)
    size = kernel.shape[spec.axis]
    position = np.zeros(size, np.int32)  # where each row/column of the kernel sits in the slice
    position[spec.indices] = np.arange(len(spec.indices))
    selected = np.zeros(size, bool)
    selected[spec.indices] = True
    shape = [1] * kernel.ndim
    shape[spec.axis] = size
    return jnp.where(selected.reshape(shape), jnp.take(values, position, axis=spec.axis, mode="clip"), kernel)


def split(params, mask: RoCoFTMask, dtype=jnp.float32):
    """Returns ``(trainable, frozen)``.

    Trainable leaves are cast to ``dtype``: fp32 master copies by default, so
    updates below the resolution of bf16 frozen weights still accumulate.
    ``dtype=None`` keeps each leaf's own dtype.
    """
    cast = (lambda x: x) if dtype is None else (lambda x: jnp.asarray(x, dtype))
    rocoft, train, frozen = {}, {}, {}
    for path, leaf in tree_lib.flatten(params).items():
        label = mask.label_of.get(path)
        if label is None:
            raise ValueError(f"parameter {path!r} is not in the mask; was the mask built from other params?")
        if label == ROCOFT:
            rocoft[path] = cast(take_slice(leaf, mask.slices[path]))
        if label == TRAIN:
            train[path] = cast(leaf)
        else:
            frozen[path] = leaf
    unflat = tree_lib.unflatten
    return {ROCOFT: unflat(rocoft), TRAIN: unflat(train)}, unflat(frozen)


def with_trained_leaves(frozen, trainable):
    """The params the model runs with: frozen leaves plus the fully trained ones.

    Selected kernels stay at their frozen values here; their slices enter
    through the sliced matmul instead of being written back (docs/design.md, "The
    weight-gradient trap").
    """
    flat = tree_lib.flatten(frozen)
    flat.update(tree_lib.flatten(trainable.get(TRAIN, {})))
    return tree_lib.unflatten(flat)


def merge(trainable, frozen, mask: RoCoFTMask):
    """Full params with the slices written into their kernels, for export.

    Kernels keep their frozen dtype; fully trained leaves keep the dtype of
    the trainable tree.
    """
    flat = tree_lib.flatten(with_trained_leaves(frozen, trainable))
    for path, values in tree_lib.flatten(trainable.get(ROCOFT, {})).items():
        flat[path] = put_slice(flat[path], values, mask.slices[path])
    missing = [p for p, lab in mask.label_of.items() if lab != FROZEN and p not in flat]
    if missing:
        raise ValueError(f"trainable tree lacks {missing[0]!r}; it does not belong to this mask")
    return tree_lib.unflatten(flat)
