"""`masked`: run an optax transformation on the selected slices of full-size kernels.

This is the drop-in for code that keeps full params and full gradients: give
it the "rocoft" label in ``optax.multi_transform``. Its state is allocated for
the slices only (Adam keeps 2 x slice scalars), and its updates are exactly
zero outside the slices. Decoupled weight decay sees the slice values, as
torch AdamW does on the paper's trainable rows.

The trainer does not use it: it differentiates the slices directly
(`split` + `sliced_kernels`), which also avoids forming full weight gradients.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rocoft_jax import tree as tree_lib
from rocoft_jax.mask import RoCoFTMask
from rocoft_jax.slices import put_slice, take_slice


class MaskedSlicesState(NamedTuple):
    """State of `masked`: the inner transformation's state over the slices."""

    inner_state: Any


def masked(inner: optax.GradientTransformation, mask: RoCoFTMask) -> optax.GradientTransformation:
    """Applies ``inner`` to the selected rows/columns of each RoCoFT kernel only.

    Args:
      inner: the optimizer of the slices, e.g. ``optax.adamw(2e-3)``.
      mask: from `mask_params`; leaves reaching this transformation must be
        RoCoFT kernels (use it under the "rocoft" label of ``mask.labels``).

    Returns:
      A ``GradientTransformation`` taking full-size kernels and gradients and
      returning full-size updates that are zero outside the slices.

    Example:
      >>> tx = optax.multi_transform(
      ...     {"rocoft": masked(optax.adamw(2e-3), mask),
      ...      "train": optax.adamw(1e-3), "frozen": optax.set_to_zero()},
      ...     mask.labels)  # doctest: +SKIP
    """

    def spec_of(keypath):
        path = tree_lib.path_str(keypath)
        spec = mask.slices.get(path)
        if spec is None:
            raise ValueError(
                f"rocoft_jax.masked received {path!r}, which is not a selected kernel of the mask; "
                "give masked() only the leaves labelled 'rocoft' (optax.multi_transform(..., mask.labels))"
            )
        return spec

    def gather(tree):
        return jax.tree_util.tree_map_with_path(lambda kp, x: take_slice(x, spec_of(kp)), tree)

    def init_fn(params):
        return MaskedSlicesState(inner.init(gather(params)))

    def update_fn(updates, state, params=None):
        slice_params = None if params is None else gather(params)
        slice_updates, inner_state = inner.update(gather(updates), state.inner_state, slice_params)

        def scatter(keypath, full, values):
            return put_slice(jnp.zeros_like(full), values, spec_of(keypath))

        full_updates = jax.tree_util.tree_map_with_path(scatter, updates, slice_updates)
        return full_updates, MaskedSlicesState(inner_state)

    return optax.GradientTransformation(init_fn, update_fn)
