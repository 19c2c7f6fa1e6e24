"""The sliced matmul: a Dense layer that runs on its frozen kernel with a trained slice.

Forward, it computes ``x @ W`` with ``W = W0`` except the selected rows or
columns, which are the slice S. Its custom VJP returns only

    dx = dy @ W^T
    dS = x^T dy[..., idx]          (rows: output units idx)
    dS = x[..., idx]^T dy          (columns: input features idx)

and no cotangent for W0, so a step never forms the d_in x d_out weight
gradient: about 2/3 of the FLOPs of full fine-tuning. Plain autodiff of
``W0.at[:, idx].set(S)`` would form it and then slice it (docs/design.md, "the
weight-gradient trap").

Where the layer sees few tokens for its size (LLMs), W itself is never built
either: both products run on W0 and the slice enters as rank-r terms. Rows
overwrite the r selected outputs with ``x @ S`` and add
``dy[..., idx] @ (S - W0[:, idx])^T`` to dx; columns add
``x[..., idx] @ (S - W0[idx])`` to y and overwrite dx's r selected features.
With many tokens (encoder training batches) the merged kernel is cheaper (`merges`):
it is built once (`put_slice`) and kept for the backward pass.

The fast paths (`rocoft_jax.fast`) run some layers as fused ops of their own.
They reach the active slices through a small seam, and nothing here imports them:
`active_slice` (a layer's trained values and slice under `sliced_kernels`),
`mark_used` (for the check that every slice was used), `finish_layer`, and the
forward/backward building blocks `forward`, `forward_with_residuals`,
`input_grad`, `slice_grad`, `token_product`, `laid_out` and `merges`.

`sliced_kernels` applies this to HF Flax models unchanged, by intercepting
``nn.Dense`` (and GPT-2's ``FlaxConv1D``) calls whose kernel path is selected.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from rocoft_jax import tree as tree_lib
from rocoft_jax.intercept import replace_calls
from rocoft_jax.mask import ROCOFT, KernelSlice, RoCoFTMask
from rocoft_jax.slices import put_slice, take_slice

# Name of every sliced layer's output, for ``jax.checkpoint`` policies (`rocoft_jax.fast.remat`).
CHECKPOINT_NAME = "rocoft_jax/sliced_dense"


def _matmul(x, kernel, in_axis: int, precision):
    """``x @ kernel`` over x's last axis and the kernel's ``in_axis``."""
    return lax.dot_general(x, kernel, (((x.ndim - 1,), (in_axis,)), ((), ())), precision=precision)


def _matmul_t(dy, kernel, out_axis: int, precision):
    """``dy @ kernel^T``: dy's last axis against the kernel's ``out_axis``."""
    return lax.dot_general(dy, kernel, (((dy.ndim - 1,), (out_axis,)), ((), ())), precision=precision)


def _delta(kernel, values, spec: KernelSlice):
    """The slice minus the frozen entries it replaces, in the kernel's dtype."""
    frozen = take_slice(kernel, spec)
    return (values.astype(jnp.float32) - frozen.astype(jnp.float32)).astype(kernel.dtype)


def merges(x, kernel, spec: KernelSlice) -> bool:
    """Whether a differentiated call builds the merged kernel rather than add rank-r corrections.

    The corrections cost about one activation-sized pass (N x d_other for N
    tokens) where a merge costs a weight-sized one (d_in x d_out), and XLA keeps
    merged copies alive into the backward pass. So merge only with many more
    tokens than the kernel's far side: an encoder training batch (roberta-large
    at 16k tokens) merges, an LLM batch (Llama-2-7B at 4k tokens) does not; both
    choices were measured (docs/performance.md, the Llama-2-7B section). Where it
    merges, the merged kernel is small next to the activations and is kept for
    the backward pass.
    """
    if spec.axis is None:  # random entries have no slice structure
        return True
    tokens = math.prod(x.shape[:-1])
    return tokens > 2 * kernel.shape[1 - spec.axis]


def forward(x, kernel, values, spec: KernelSlice, precision, merged=None):
    """``x @ W``: on the ``merged`` kernel when given, else on the frozen one plus rank-r terms."""
    out_axis, in_axis = spec.out_axis, 1 - spec.out_axis
    if merged is not None:
        return _matmul(x, merged, in_axis, precision)
    y = _matmul(x, kernel, in_axis, precision)
    if spec.axis == out_axis:  # rows: the selected outputs come from the slice alone
        return y.at[..., spec.indices].set(_matmul(x, values.astype(kernel.dtype), in_axis, precision))
    # columns: a rank-r correction through the selected input features
    return y + _matmul(take_slice(x, spec, axis=-1), _delta(kernel, values, spec), in_axis, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def sliced_product(x, kernel, values, spec: KernelSlice, precision):
    # Not differentiated (evaluation, generation): no merged kernels, whose copies XLA may hoist and
    # hold at once (a second copy of every targeted weight at 7B); the corrections cost one extra activation pass.
    merged = put_slice(kernel, values, spec) if spec.axis is None else None
    return forward(x, kernel, values, spec, precision, merged)


def forward_with_residuals(x, kernel, values, spec, precision):
    merged = put_slice(kernel, values, spec) if merges(x, kernel, spec) else None
    y = forward(x, kernel, values, spec, precision, merged)
    return y, (x, kernel, values, merged)


def input_grad(dy, picked, kernel, values, spec: KernelSlice, precision, merged):
    """``dy @ W^T``, on the merged kernel when there is one, else on the frozen one plus rank-r terms."""
    out_axis = spec.out_axis
    if merged is not None:
        return _matmul_t(dy, merged, out_axis, precision)
    if spec.axis == out_axis:  # rows: a rank-r correction through the selected outputs
        return _matmul_t(dy, kernel, out_axis, precision) + _matmul_t(
            picked, _delta(kernel, values, spec), out_axis, precision
        )
    # columns: the selected input features' gradients come from the slice alone
    return (
        _matmul_t(dy, kernel, out_axis, precision)
        .at[..., spec.indices]
        .set(_matmul_t(dy, values.astype(kernel.dtype), out_axis, precision))
    )


def token_product(lhs, rhs, precision):
    """``lhs^T rhs`` summed over every token (all axes but the last)."""
    batch_dims = tuple(range(lhs.ndim - 1))
    return lax.dot_general(lhs, rhs, ((batch_dims, batch_dims), ((), ())), precision=precision)


def laid_out(dvalues, spec: KernelSlice):
    """A (d_in, r) or (r, d_out) slice gradient in the kernel's layout."""
    return dvalues.T if spec.out_axis == 0 else dvalues


def slice_grad(x, dy, values, spec: KernelSlice, precision):
    """``(picked, dS)``: the selected outputs' dy (rows) or features of x (columns), and the slice's gradient."""
    rows = spec.axis == spec.out_axis
    picked = take_slice(dy if rows else x, spec, axis=-1)
    dvalues = token_product(x, picked, precision) if rows else token_product(picked, dy, precision)
    return picked, laid_out(dvalues, spec).astype(values.dtype)


def _sliced_bwd(spec: KernelSlice, precision, residuals, dy):
    x, kernel, values, merged = residuals
    if spec.axis is None:  # random entries: no slice structure, so the full gradient is formed
        dx = _matmul_t(dy, merged, spec.out_axis, precision)
        full = token_product(x, dy, precision)
        dvalues = jnp.ravel(full if spec.out_axis == 1 else full.T)[spec.indices]
        return dx.astype(x.dtype), None, dvalues.astype(values.dtype)
    picked, dvalues = slice_grad(x, dy, values, spec, precision)
    dx = input_grad(dy, picked, kernel, values, spec, precision, merged)
    return dx.astype(x.dtype), None, dvalues


sliced_product.defvjp(forward_with_residuals, _sliced_bwd)


def sliced_matmul(x, kernel, values, spec: KernelSlice, dtype=None, precision=None):
    """``x @ W`` where W is ``kernel`` with the slice ``spec`` replaced by ``values``.

    ``kernel`` is laid out with its output axis at ``spec.out_axis``. The
    product runs in ``dtype`` (default: the promoted dtype of x and kernel);
    gradients flow to ``x`` and ``values`` only.
    """
    x, kernel = promote_dtype(x, kernel, dtype=dtype)
    return sliced_product(x, kernel, values, spec, precision)


def _module_kernel_layout(module) -> tuple[str, int] | None:
    """(kernel name, output axis) of the layer types we can slice."""
    if isinstance(module, nn.Dense):
        return "kernel", 1
    if type(module).__name__ == "FlaxConv1D":  # GPT-2 keeps kernels as (d_out, d_in)
        return "kernel", 0
    return None


def _sliced_call(module, x, values, spec: KernelSlice):
    kernel_name, out_axis = _module_kernel_layout(module)
    if out_axis != spec.out_axis:
        raise ValueError(
            f"{type(module).__name__} at {'/'.join(module.path)} has output axis {out_axis}, "
            f"but the mask assumed {spec.out_axis}; rebuild the mask with the right family"
        )
    kernel = module.get_variable("params", kernel_name)
    return finish_layer(module, sliced_matmul(x, kernel, values, spec, dtype=module.dtype, precision=module.precision))


def finish_layer(module, y):
    """A sliced layer's output: its bias added, named for remat policies."""
    if module.has_variable("params", "bias"):
        y = y + jnp.asarray(module.get_variable("params", "bias"), y.dtype)
    return checkpoint_name(y, CHECKPOINT_NAME)


@contextlib.contextmanager
def intercept_kernels(calls: Mapping[tuple[str, ...], Callable]):
    """Replaces the ``__call__`` of the layers at the given module paths.

    ``calls`` maps a module path (the kernel path without "kernel") to
    ``fn(module, x, original_call) -> y``. Other modules run untouched, and so do
    all while a model is being initialized (HF's ``init_cache`` initializes the
    model to shape its KV cache: there are no kernels to read yet). Yields the
    set of paths used so far, which others that run those layers add to.
    """

    seen: set[tuple[str, ...]] = set()

    def selected(module) -> bool:
        return (
            _module_kernel_layout(module) is not None and not module.is_initializing() and tuple(module.path) in calls
        )

    def replacement(module, args, kwargs, call_original):
        path = tuple(module.path)
        seen.add(path)
        return calls[path](module, *args, lambda x: call_original(x, **kwargs))

    with replace_calls(selected, replacement):
        yield seen
    if len(seen) < len(calls):
        # A selected kernel that no Dense call used would silently stay untrained.
        unused = sorted("/".join(p) for p in set(calls) - seen)
        raise ValueError(
            f"selected kernel {unused[0]}/kernel was not used by any nn.Dense or FlaxConv1D call in the "
            "forward pass; target only kernels of those layers"
        )


def sliced_kernels(trainable, mask: RoCoFTMask):
    """Context in which the model's selected layers use their trained slices.

    ``trainable`` is the tree from `split` (or just its "rocoft" part).
    """
    values = tree_lib.flatten(trainable.get(ROCOFT, trainable))
    missing = set(mask.slices) - set(values)
    if missing:
        raise ValueError(f"no trained slice for {sorted(missing)[0]!r}; pass the trainable tree from split()")
    slices = {tuple(path.split("/")[:-1]): (values[path], spec) for path, spec in mask.slices.items()}
    calls = {
        module_path: lambda module, x, _, v=v, s=s: _sliced_call(module, x, v, s)
        for module_path, (v, s) in slices.items()
    }
    return _activate(slices, calls)


class _Active(NamedTuple):
    slices: dict  # module path -> (trained values, KernelSlice)
    seen: set  # module paths used, shared with `intercept_kernels`


# The innermost active `sliced_kernels` context, for the layers that run as one op (`active_slice`).
_ACTIVE: contextvars.ContextVar[_Active | None] = contextvars.ContextVar("rocoft_jax_sliced_kernels", default=None)


@contextlib.contextmanager
def _activate(slices, calls):
    with intercept_kernels(calls) as seen:
        token = _ACTIVE.set(_Active(slices, seen))
        try:
            yield
        finally:
            _ACTIVE.reset(token)


def active_slice(module):
    """``(trained values, KernelSlice)`` of ``module`` in the innermost `sliced_kernels` context, or None."""
    active = _ACTIVE.get()
    return None if active is None else active.slices.get(tuple(module.path))


def mark_used(modules) -> None:
    """Records layers run outside their interceptor, for `intercept_kernels`' check that every slice was used."""
    _ACTIVE.get().seen.update(tuple(m.path) for m in modules)
