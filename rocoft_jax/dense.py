"""The sliced matmul: a Dense layer that runs on its frozen kernel with a trained slice.

Forward, it computes ``x @ W`` with ``W = W0`` except the selected rows or
columns, which are the slice S. Its custom VJP returns only

    dx = dy @ W^T
    dS = x^T dy[..., idx]          (rows: output units idx)
    dS = x[..., idx]^T dy          (columns: input features idx)

and no cotangent for W0, so a step never forms the d_in x d_out weight
gradient: about 2/3 of the FLOPs of full fine-tuning. Plain autodiff of
``W0.at[:, idx].set(S)`` would form it and then slice it (NOTES.md, "the
weight-gradient trap").

Where the layer sees few tokens for its size (LLMs), W itself is never built
either: both products run on W0 and the slice enters as rank-r terms. Rows
overwrite the r selected outputs with ``x @ S`` and add
``dy[..., idx] @ (S - W0[:, idx])^T`` to dx; columns add
``x[..., idx] @ (S - W0[idx])`` to y and overwrite dx's r selected features.
With many tokens (encoder training batches) the merged kernel is cheaper (`_merges`):
it is built once (`put_slice`) and kept for the backward pass.

Layers that read one input and train rows (attention's q, k and v) run as one
op (`dense_sharing_input`), whose backward pass forms all their slice
gradients from one product, reading the input once instead of once per layer:
one H200, roberta-large T=512, 52.5 -> 52.4 ms per step.

The layer after a BERT-family MLP's GELU can run as one op with it
(`dense_after_gelu`, on a Hopper GPU): its backward pass applies GELU's slope
inside the input-gradient matmul (`rocoft_jax.gelu_matmul`), so that product
is never written out and read back. One H100, roberta-large T=512: 55.9 ->
55.0 ms per step.

`sliced_kernels` applies this to HF Flax models unchanged, by intercepting
``nn.Dense`` (and GPT-2's ``FlaxConv1D``) calls whose kernel path is selected.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Callable, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.dtypes import promote_dtype
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from rocoft_jax import gelu as gelu_lib, gelu_matmul, targets as targets_lib
from rocoft_jax.mask import ROCOFT, KernelSlice, RoCoFTMask
from rocoft_jax.slices import put_slice, take_slice

# Name of every sliced layer's output, for ``jax.checkpoint`` policies (`rocoft_jax.remat`).
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


def _merges(x, kernel, spec: KernelSlice) -> bool:
    """Whether a differentiated call builds the merged kernel rather than add rank-r corrections.

    The corrections cost about one activation-sized pass (N x d_other for N
    tokens) where a merge costs a weight-sized one (d_in x d_out), and XLA keeps
    merged copies alive into the backward pass. So merge only with many more
    tokens than the kernel's far side: roberta-large at 16k tokens merges (the
    corrections measured 4.5 ms slower per step), Llama-2-7B at 4k tokens does
    not (12 GiB less peak memory, 3 % faster). Where it merges, the merged
    kernel is small next to the activations and is kept for the backward pass.
    """
    if spec.axis is None:  # random entries have no slice structure
        return True
    tokens = math.prod(x.shape[:-1])
    return tokens > 2 * kernel.shape[1 - spec.axis]


def _forward(x, kernel, values, spec: KernelSlice, precision, merged=None):
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
def _sliced(x, kernel, values, spec: KernelSlice, precision):
    # Not differentiated (evaluation, generation): no merged kernels, whose copies XLA may hoist and
    # hold at once (as the 7B training step did: 12 GiB); the corrections cost one extra activation pass.
    merged = put_slice(kernel, values, spec) if spec.axis is None else None
    return _forward(x, kernel, values, spec, precision, merged)


def _sliced_fwd(x, kernel, values, spec, precision):
    merged = put_slice(kernel, values, spec) if _merges(x, kernel, spec) else None
    y = _forward(x, kernel, values, spec, precision, merged)
    return y, (x, kernel, values, merged)


def _input_grad(dy, picked, kernel, values, spec: KernelSlice, precision, merged):
    """``dy @ W^T``, on the merged kernel when there is one, else on the frozen one plus rank-r terms."""
    out_axis = spec.out_axis
    if merged is not None:
        return _matmul_t(dy, merged, out_axis, precision)
    if spec.axis == out_axis:  # rows: a rank-r correction through the selected outputs
        return _matmul_t(dy, kernel, out_axis, precision) + _matmul_t(picked, _delta(kernel, values, spec), out_axis,
                                                                       precision)
    # columns: the selected input features' gradients come from the slice alone
    return _matmul_t(dy, kernel, out_axis, precision).at[..., spec.indices].set(
        _matmul_t(dy, values.astype(kernel.dtype), out_axis, precision))


def _token_product(lhs, rhs, precision):
    """``lhs^T rhs`` summed over every token (all axes but the last)."""
    batch_dims = tuple(range(lhs.ndim - 1))
    return lax.dot_general(lhs, rhs, ((batch_dims, batch_dims), ((), ())), precision=precision)


def _laid_out(dvalues, spec: KernelSlice):
    """A (d_in, r) or (r, d_out) slice gradient in the kernel's layout."""
    return dvalues.T if spec.out_axis == 0 else dvalues


def _slice_grad(x, dy, values, spec: KernelSlice, precision):
    """``(picked, dS)``: the selected outputs' dy (rows) or features of x (columns), and the slice's gradient."""
    rows = spec.axis == spec.out_axis
    picked = take_slice(dy if rows else x, spec, axis=-1)
    dvalues = _token_product(x, picked, precision) if rows else _token_product(picked, dy, precision)
    return picked, _laid_out(dvalues, spec).astype(values.dtype)


def _sliced_bwd(spec: KernelSlice, precision, residuals, dy):
    x, kernel, values, merged = residuals
    if spec.axis is None:  # random entries: no slice structure, so the full gradient is formed
        dx = _matmul_t(dy, merged, spec.out_axis, precision)
        full = _token_product(x, dy, precision)
        dvalues = jnp.ravel(full if spec.out_axis == 1 else full.T)[spec.indices]
        return dx.astype(x.dtype), None, dvalues.astype(values.dtype)
    picked, dvalues = _slice_grad(x, dy, values, spec, precision)
    dx = _input_grad(dy, picked, kernel, values, spec, precision, merged)
    return dx.astype(x.dtype), None, dvalues


_sliced.defvjp(_sliced_fwd, _sliced_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _sliced_rows_sharing_input(xs, kernels, values, specs, precision):
    return tuple(_sliced(xs[0], k, v, s, precision) for k, v, s in zip(kernels, values, specs))


def _sliced_rows_sharing_input_fwd(xs, kernels, values, specs, precision):
    ys, residuals = zip(*(_sliced_fwd(xs[0], k, v, s, precision) for k, v, s in zip(kernels, values, specs)))
    return ys, (xs[0], kernels, values, tuple(merged for *_, merged in residuals))


def _sliced_rows_sharing_input_bwd(specs, precision, residuals, dys):
    x, kernels, values, merged = residuals
    picked = [take_slice(dy, s, axis=-1) for dy, s in zip(dys, specs)]
    # One input gradient per reference: autodiff adds those of a shared one.
    dxs = tuple(_input_grad(dy, p, k, v, s, precision, m).astype(x.dtype)
                for dy, p, k, v, s, m in zip(dys, picked, kernels, values, specs, merged))
    # Every slice gradient from one product: x is read once instead of once per layer.
    together = _token_product(x, jnp.concatenate(picked, axis=-1), precision)
    parts = jnp.split(together, np.cumsum([len(s.indices) for s in specs])[:-1], axis=-1)
    dvalues = tuple(_laid_out(d, s).astype(v.dtype) for d, s, v in zip(parts, specs, values))
    return dxs, tuple(None for _ in kernels), dvalues


_sliced_rows_sharing_input.defvjp(_sliced_rows_sharing_input_fwd, _sliced_rows_sharing_input_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _sliced_after_gelu(h, kernel, values, spec: KernelSlice, precision):
    return _sliced(gelu_lib.gelu(h), kernel, values, spec, precision)


def _sliced_after_gelu_fwd(h, kernel, values, spec, precision):
    g, slope = gelu_lib.gelu_and_slope(h)
    merged = put_slice(kernel, values, spec)
    return _forward(g, kernel, values, spec, precision, merged), (g, slope, values, merged)


def _sliced_after_gelu_bwd(spec: KernelSlice, precision, residuals, dy):
    g, slope, values, merged = residuals
    _, dvalues = _slice_grad(g, dy, values, spec, precision)
    return gelu_matmul.scaled_input_grad(dy, merged, slope, precision), None, dvalues


_sliced_after_gelu.defvjp(_sliced_after_gelu_fwd, _sliced_after_gelu_bwd)


def sliced_matmul(x, kernel, values, spec: KernelSlice, dtype=None, precision=None):
    """``x @ W`` where W is ``kernel`` with the slice ``spec`` replaced by ``values``.

    ``kernel`` is laid out with its output axis at ``spec.out_axis``. The
    product runs in ``dtype`` (default: the promoted dtype of x and kernel);
    gradients flow to ``x`` and ``values`` only.
    """
    x, kernel = promote_dtype(x, kernel, dtype=dtype)
    return _sliced(x, kernel, values, spec, precision)


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
        raise ValueError(f"{type(module).__name__} at {'/'.join(module.path)} has output axis {out_axis}, "
                         f"but the mask assumed {spec.out_axis}; rebuild the mask with the right family")
    kernel = module.get_variable("params", kernel_name)
    return _finish(module, sliced_matmul(x, kernel, values, spec, dtype=module.dtype, precision=module.precision))


def _finish(module, y):
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

    def interceptor(next_fun, args, kwargs, context):
        if (context.method_name == "__call__" and _module_kernel_layout(context.module) is not None
                and not context.module.is_initializing()):
            path = tuple(context.module.path)
            fn = calls.get(path)
            if fn is not None:
                seen.add(path)
                return fn(context.module, *args, lambda x: next_fun(x, **kwargs))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
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
    values = targets_lib.flatten(trainable.get(ROCOFT, trainable))
    missing = set(mask.slices) - set(values)
    if missing:
        raise ValueError(f"no trained slice for {sorted(missing)[0]!r}; pass the trainable tree from split()")
    slices = {tuple(path.split("/")[:-1]): (values[path], spec) for path, spec in mask.slices.items()}
    calls = {module_path: lambda module, x, _, v=v, s=s: _sliced_call(module, x, v, s)
             for module_path, (v, s) in slices.items()}
    return _activate(slices, calls)


class _Active(NamedTuple):
    slices: dict  # module path -> (trained values, KernelSlice)
    seen: set  # module paths used, shared with `intercept_kernels`


# The innermost active `sliced_kernels` context, for the layers that run as one op (`_entry`).
_ACTIVE: contextvars.ContextVar[_Active | None] = contextvars.ContextVar("rocoft_jax_sliced_kernels", default=None)


@contextlib.contextmanager
def _activate(slices, calls):
    with intercept_kernels(calls) as seen:
        token = _ACTIVE.set(_Active(slices, seen))
        try:
            yield
        finally:
            _ACTIVE.reset(token)


def _entry(module):
    """``(trained values, KernelSlice)`` of ``module`` in the innermost `sliced_kernels` context, or None."""
    active = _ACTIVE.get()
    return None if active is None else active.slices.get(tuple(module.path))


def _mark_used(modules) -> None:
    """Records layers run outside their interceptor, for `intercept_kernels`' check that every slice was used."""
    _ACTIVE.get().seen.update(tuple(m.path) for m in modules)


def _shares_rows(modules, entries) -> bool:
    """Whether these Dense layers can run as one: all train rows, in one dtype and precision."""
    return (len(modules) > 1 and all(type(m) is nn.Dense for m in modules)
            and all(spec.axis == spec.out_axis == 1 for _, spec in entries)
            and len({(m.dtype, m.precision, m.get_variable("params", "kernel").dtype) for m in modules}) == 1)


def dense_sharing_input(modules, xs) -> list:
    """``[module(x) for module, x in zip(modules, xs)]`` for Dense layers that read the same input
    (q, k and v), given as one reference per layer (`rocoft_jax.layer_norm.branch`).

    Under `sliced_kernels`, where all of them train rows, one custom VJP runs
    them, so the backward pass reads the input once for all their slice gradients
    (``x^T [dy_1[..., idx_1], dy_2[..., idx_2], ...]``) instead of once per layer.
    Anything else runs the layers one by one, through their usual interceptors.
    """
    entries = [_entry(m) for m in modules]
    if any(e is None for e in entries) or any(m.is_initializing() for m in modules) \
            or not _shares_rows(modules, entries):
        return [m(x) for m, x in zip(modules, xs)]
    values, specs = zip(*entries)
    kernels = [m.get_variable("params", "kernel") for m in modules]
    promoted = [promote_dtype(x, kernel, dtype=modules[0].dtype) for x, kernel in zip(xs, kernels)]
    xs, kernels = zip(*promoted)
    ys = _sliced_rows_sharing_input(xs, kernels, values, specs, modules[0].precision)
    _mark_used(modules)
    return [_finish(module, y) for module, y in zip(modules, ys)]


def fuses_after_gelu(module, x, mesh=None) -> bool:
    """Whether `dense_after_gelu` runs ``module`` (a Dense layer fed by GELU) as one op with the GELU.

    ``x`` is any activation with the layer's token axes (all but the last).
    It does on a single Hopper GPU (`rocoft_jax.gelu_matmul.available`), under `sliced_kernels`, for a
    layer that trains rows or columns and would build its merged kernel anyway (`_merges`): the fused
    backward pass multiplies by the slope inside the input-gradient matmul, which needs one kernel.
    """
    entry = _entry(module)
    if entry is None or type(module) is not nn.Dense or module.is_initializing() or entry[1].axis is None:
        return False
    return ((mesh is None or mesh.size == 1) and gelu_matmul.available()
            and _merges(x, module.get_variable("params", "kernel"), entry[1]))


def dense_after_gelu(module, h):
    """``module(GELU(h))`` as one op, where `fuses_after_gelu` said so.

    Its backward pass keeps GELU'(h) from the forward pass (`rocoft_jax.gelu.gelu_and_slope`) and
    returns ``dh = (dy @ W^T) * GELU'(h)`` from one matmul (`rocoft_jax.gelu_matmul`), so
    ``dy @ W^T`` is never written out and read back; the slice's gradient is the usual one.
    """
    values, spec = _entry(module)
    h, kernel = promote_dtype(h, module.get_variable("params", "kernel"), dtype=module.dtype)
    y = _sliced_after_gelu(h, kernel, values, spec, module.precision)
    _mark_used([module])
    return _finish(module, y)
