"""Fused variants of the sliced matmul for the fast paths: layers that share an input, and a layer after GELU.

Both plug into `rocoft_jax.sliced` through its seam (`active_slice`,
`mark_used`, `finish_layer` and the forward/backward building blocks) and run
only under `rocoft_jax.sliced_kernels`; anything else runs the layers one by
one through their usual interceptors.

- `dense_sharing_input`: layers that read one input and train rows (attention's
  q, k and v) run as one op, whose backward pass forms all their slice gradients
  from one product, reading the input once instead of once per layer.
- `dense_after_gelu`: the layer after a BERT-family MLP's GELU runs as one op with
  it (single Hopper GPU): its backward pass applies GELU's slope inside the
  input-gradient matmul (`rocoft_jax.fast.gelu_matmul`), so that product is never
  written out and read back.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.dtypes import promote_dtype

from rocoft_jax import sliced
from rocoft_jax.fast import gelu as gelu_lib
from rocoft_jax.fast import gelu_matmul
from rocoft_jax.mask import KernelSlice
from rocoft_jax.slices import put_slice, take_slice


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _rows_sharing_input(xs, kernels, values, specs, precision):
    return tuple(sliced.sliced_product(xs[0], k, v, s, precision) for k, v, s in zip(kernels, values, specs))


def _rows_sharing_input_fwd(xs, kernels, values, specs, precision):
    ys, residuals = zip(
        *(sliced.forward_with_residuals(xs[0], k, v, s, precision) for k, v, s in zip(kernels, values, specs))
    )
    return ys, (xs[0], kernels, values, tuple(merged for *_, merged in residuals))


def _rows_sharing_input_bwd(specs, precision, residuals, dys):
    x, kernels, values, merged = residuals
    picked = [take_slice(dy, s, axis=-1) for dy, s in zip(dys, specs)]
    # One input gradient per reference: autodiff adds those of a shared one.
    dxs = tuple(
        sliced.input_grad(dy, p, k, v, s, precision, m).astype(x.dtype)
        for dy, p, k, v, s, m in zip(dys, picked, kernels, values, specs, merged)
    )
    # Every slice gradient from one product: x is read once instead of once per layer.
    together = sliced.token_product(x, jnp.concatenate(picked, axis=-1), precision)
    parts = jnp.split(together, np.cumsum([len(s.indices) for s in specs])[:-1], axis=-1)
    dvalues = tuple(sliced.laid_out(d, s).astype(v.dtype) for d, s, v in zip(parts, specs, values))
    return dxs, tuple(None for _ in kernels), dvalues


_rows_sharing_input.defvjp(_rows_sharing_input_fwd, _rows_sharing_input_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _after_gelu(h, kernel, values, spec: KernelSlice, precision):
    return sliced.sliced_product(gelu_lib.gelu(h), kernel, values, spec, precision)


def _after_gelu_fwd(h, kernel, values, spec, precision):
    g, slope = gelu_lib.gelu_and_slope(h)
    merged = put_slice(kernel, values, spec)
    return sliced.forward(g, kernel, values, spec, precision, merged), (g, slope, values, merged)


def _after_gelu_bwd(spec: KernelSlice, precision, residuals, dy):
    g, slope, values, merged = residuals
    _, dvalues = sliced.slice_grad(g, dy, values, spec, precision)
    return gelu_matmul.scaled_input_grad(dy, merged, slope, precision), None, dvalues


_after_gelu.defvjp(_after_gelu_fwd, _after_gelu_bwd)


def _shares_rows(modules, entries) -> bool:
    """Whether these Dense layers can run as one: all train rows, in one dtype and precision."""
    return (
        len(modules) > 1
        and all(type(m) is nn.Dense for m in modules)
        and all(spec.axis == spec.out_axis == 1 for _, spec in entries)
        and len({(m.dtype, m.precision, m.get_variable("params", "kernel").dtype) for m in modules}) == 1
    )


def dense_sharing_input(modules, xs) -> list:
    """``[module(x) for module, x in zip(modules, xs)]`` for Dense layers that read the same input
    (q, k and v), given as one reference per layer (`rocoft_jax.fast.layer_norm.branch`).

    Under `sliced_kernels`, where all of them train rows, one custom VJP runs
    them, so the backward pass reads the input once for all their slice gradients
    (``x^T [dy_1[..., idx_1], dy_2[..., idx_2], ...]``) instead of once per layer.
    Anything else runs the layers one by one, through their usual interceptors.
    """
    entries = [sliced.active_slice(m) for m in modules]
    if (
        any(e is None for e in entries)
        or any(m.is_initializing() for m in modules)
        or not _shares_rows(modules, entries)
    ):
        return [m(x) for m, x in zip(modules, xs)]
    values, specs = zip(*entries)
    kernels = [m.get_variable("params", "kernel") for m in modules]
    promoted = [promote_dtype(x, kernel, dtype=modules[0].dtype) for x, kernel in zip(xs, kernels)]
    xs, kernels = zip(*promoted)
    ys = _rows_sharing_input(xs, kernels, values, specs, modules[0].precision)
    sliced.mark_used(modules)
    return [sliced.finish_layer(module, y) for module, y in zip(modules, ys)]


def fuses_after_gelu(module, x, mesh=None) -> bool:
    """Whether `dense_after_gelu` runs ``module`` (a Dense layer fed by GELU) as one op with the GELU.

    ``x`` is any activation with the layer's token axes (all but the last).
    It does on a single Hopper GPU (`rocoft_jax.fast.gelu_matmul.available`), under `sliced_kernels`, for a
    layer that trains rows or columns and would build its merged kernel anyway (`sliced.merges`): the fused
    backward pass multiplies by the slope inside the input-gradient matmul, which needs one kernel.
    """
    entry = sliced.active_slice(module)
    if entry is None or type(module) is not nn.Dense or module.is_initializing() or entry[1].axis is None:
        return False
    return (
        (mesh is None or mesh.size == 1)
        and gelu_matmul.available()
        and sliced.merges(x, module.get_variable("params", "kernel"), entry[1])
    )


def dense_after_gelu(module, h):
    """``module(GELU(h))`` as one op, where `fuses_after_gelu` said so.

    Its backward pass keeps GELU'(h) from the forward pass (`rocoft_jax.fast.gelu.gelu_and_slope`) and
    returns ``dh = (dy @ W^T) * GELU'(h)`` from one matmul (`rocoft_jax.fast.gelu_matmul`), so
    ``dy @ W^T`` is never written out and read back; the slice's gradient is the usual one.
    """
    values, spec = sliced.active_slice(module)
    h, kernel = promote_dtype(h, module.get_variable("params", "kernel"), dtype=module.dtype)
    y = _after_gelu(h, kernel, values, spec, module.precision)
    sliced.mark_used([module])
    return sliced.finish_layer(module, y)
