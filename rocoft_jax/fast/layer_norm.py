"""BERT-family residual LayerNorms, ``LayerNorm(x + residual)``, as one pass each way on NVIDIA GPUs.

The BERT family's attention output and MLP output layers end in
``LayerNorm(hidden + residual)``, which XLA runs each way as a reduction and an
elementwise pass that both read the inputs. `add_layer_norm` is that LayerNorm with
flax's numerics (fp32 statistics, ``var = E[x^2] - E[x]^2`` clipped at 0), whose
forward and backward passes are one Pallas (Triton) kernel each. The scale and
bias gradients, which only full fine-tuning needs, come from XLA reductions that
are dropped where unused.

A LayerNorm's output feeds several ops (the next layer's q, k and v projections and
its residual), and autodiff adds their input gradients before any custom backward
pass sees them: XLA writes that sum and the kernel reads it back. Within
`branching`, `residual_layer_norm` hands each consumer named in ``branches`` its own
reference to the output (`branch`), so the backward kernel receives the gradients
apart and adds them as it reads them: the attention block's LayerNorm reads two
gradients, the MLP's four.

Falls back to XLA computing the same formula off CUDA, on a mesh of several devices
(the kernels have no partitioning rule) and for feature sizes that are not powers of
two of at least 128; outside `branching`, `branch` returns its input unchanged.
Measurements: docs/performance.md.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

WARPS_FORWARD, WARPS_BACKWARD = 4, 4  # one row a program: the fastest of 1-16 rows and 1-8 warps on one H100


def _forward_xla(x, residual, scale, bias, epsilon, dtype):
    """``(y, x + residual, mean, rstd)`` over the last axis, with flax's fp32 statistics."""
    summed = x + residual
    x32 = summed.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1)
    rstd = lax.rsqrt(jnp.maximum(jnp.mean(x32 * x32, axis=-1) - mean * mean, 0.0) + epsilon)
    y = (x32 - mean[..., None]) * (rstd[..., None] * scale.astype(jnp.float32)) + bias.astype(jnp.float32)
    return y.astype(dtype), summed, mean, rstd


def _input_grad_xla(dy, summed, mean, rstd, scale):
    xhat = (summed.astype(jnp.float32) - mean[..., None]) * rstd[..., None]
    g = dy.astype(jnp.float32) * scale.astype(jnp.float32)
    inner = g - jnp.mean(g, axis=-1, keepdims=True) - xhat * jnp.mean(g * xhat, axis=-1, keepdims=True)
    return (rstd[..., None] * inner).astype(summed.dtype)


def _forward_kernel(x_ref, r_ref, s_ref, b_ref, y_ref, sum_ref, mean_ref, rstd_ref, *, epsilon):
    y_ref[...], sum_ref[...], mean_ref[...], rstd_ref[...] = _forward_xla(
        x_ref[...], r_ref[...], s_ref[...], b_ref[...], epsilon, y_ref.dtype
    )


def _backward_kernel(*refs):
    """dx for the sum of the output gradients in the leading refs."""
    *dy_refs, sum_ref, mean_ref, rstd_ref, s_ref, dx_ref = refs
    dy = sum(r[...].astype(jnp.float32) for r in dy_refs)
    dx_ref[...] = _input_grad_xla(dy, sum_ref[...], mean_ref[...], rstd_ref[...], s_ref[...])


def _blocks(d):
    """One program per row: the row of (N, D) operands, the whole (D,) scale and bias, the row's statistic."""
    return (
        pl.BlockSpec((1, d), lambda i: (i, 0)),
        pl.BlockSpec((d,), lambda i: (0,)),
        pl.BlockSpec((1,), lambda i: (i,)),
    )


# Jitted with its configuration static: the calls of every layer share one traced and lowered kernel.
@functools.partial(jax.jit, static_argnames=("epsilon", "dtype", "interpret"))
def _forward_pallas(x, residual, scale, bias, epsilon, dtype, interpret=False):
    n, d = x.shape
    row, vector, stat = _blocks(d)
    shapes = [
        jax.ShapeDtypeStruct((n, d), dtype),
        jax.ShapeDtypeStruct((n, d), x.dtype),
        jax.ShapeDtypeStruct((n,), jnp.float32),
        jax.ShapeDtypeStruct((n,), jnp.float32),
    ]
    return pl.pallas_call(
        functools.partial(_forward_kernel, epsilon=epsilon),
        grid=(n,),
        in_specs=[row, row, vector, vector],
        out_specs=[row, row, stat, stat],
        out_shape=shapes,
        interpret=interpret,
        name="rocoft_add_layer_norm_fwd",
        compiler_params=None if interpret else pl_triton.CompilerParams(num_warps=WARPS_FORWARD, num_stages=1),
    )(x, residual, scale, bias)


@functools.partial(jax.jit, static_argnames=("interpret",))
def _input_grad_pallas(dys, summed, mean, rstd, scale, interpret=False):
    n, d = summed.shape
    row, vector, stat = _blocks(d)
    return pl.pallas_call(
        _backward_kernel,
        grid=(n,),
        in_specs=[row] * (len(dys) + 1) + [stat, stat, vector],
        out_specs=row,
        out_shape=jax.ShapeDtypeStruct((n, d), summed.dtype),
        interpret=interpret,
        name="rocoft_add_layer_norm_bwd",
        compiler_params=None if interpret else pl_triton.CompilerParams(num_warps=WARPS_BACKWARD, num_stages=1),
    )(*dys, summed, mean, rstd, scale)


def _uses_kernels(x, single_device: bool) -> bool:
    d = x.shape[-1]
    return single_device and d >= 128 and d & (d - 1) == 0


def _flat(fn, *arrays):
    """``fn`` on (N, D) views of (..., D) arrays; its (N, D) and (N,) results back in the leading shape."""
    lead = arrays[0].shape[:-1]
    out = fn(*(a.reshape(-1, a.shape[-1]) if a.shape[:-1] == lead else a.reshape(-1) for a in arrays))
    return jax.tree.map(lambda o: o.reshape(lead + o.shape[1:]), out)


def add_layer_norm(x, residual, scale, bias, epsilon: float, dtype, single_device: bool = True):
    """``LayerNorm(x + residual)`` over the last axis as flax computes it, returned in ``dtype``.

    ``single_device``: the step runs on one device, so the GPU kernels may run (they have no
    partitioning rule).
    """
    return add_layer_norm_copies(x, residual, scale, bias, epsilon, dtype, single_device, 1)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def add_layer_norm_copies(x, residual, scale, bias, epsilon: float, dtype, single_device: bool, copies: int):
    """`add_layer_norm`'s output ``copies`` times: its backward pass adds their gradients itself."""
    return (_forward(x, residual, scale, bias, epsilon, dtype, single_device)[0],) * copies


def _forward(x, residual, scale, bias, epsilon, dtype, single_device):
    xla = lambda x, r: _flat(lambda x, r: _forward_xla(x, r, scale, bias, epsilon, dtype), x, r)
    if not _uses_kernels(x, single_device):
        return xla(x, residual)
    pallas = lambda x, r: _flat(lambda x, r: _forward_pallas(x, r, scale, bias, epsilon, dtype), x, r)
    return lax.platform_dependent(x, residual, cuda=pallas, default=xla)


def _fwd(x, residual, scale, bias, epsilon, dtype, single_device, copies):
    # symbolic_zeros: the arguments come as CustomVJPPrimal (value, perturbed)
    scale, bias = scale.value, bias.value
    y, summed, mean, rstd = _forward(x.value, residual.value, scale, bias, epsilon, dtype, single_device)
    return (y,) * copies, (summed, mean, rstd, scale, bias)


def _bwd(epsilon, dtype, single_device, copies, residuals, dys):
    summed, mean, rstd, scale, bias = residuals
    dys = [dy for dy in dys if not isinstance(dy, SymbolicZero)]  # copies nothing read
    if not dys:
        return tuple(jnp.zeros_like(a) for a in (summed, summed, scale, bias))
    dy = sum(dy.astype(jnp.float32) for dy in dys)  # for XLA's dx and the scale and bias gradients
    xla = lambda s, m, r, *_: _input_grad_xla(dy, s, m, r, scale)
    if _uses_kernels(summed, single_device):
        pallas = lambda s, m, r, *dys: _flat(
            lambda s, m, r, *dys: _input_grad_pallas(dys, s, m, r, scale), s, m, r, *dys
        )
        dx = lax.platform_dependent(summed, mean, rstd, *dys, cuda=pallas, default=xla)
    else:
        dx = xla(summed, mean, rstd)
    # Only full fine-tuning trains the LayerNorm; elsewhere XLA drops these two reductions.
    xhat = (summed.astype(jnp.float32) - mean[..., None]) * rstd[..., None]
    axes = tuple(range(dy.ndim - 1))
    dscale = jnp.sum(dy * xhat, axis=axes).astype(scale.dtype)
    dbias = jnp.sum(dy, axis=axes).astype(bias.dtype)
    return dx, dx, dscale, dbias


add_layer_norm_copies.defvjp(_fwd, _bwd, symbolic_zeros=True)

# The active `branching` context's {id(output): (output, {consumer: reference})}; per thread.
_REGISTRY: contextvars.ContextVar[dict | None] = contextvars.ContextVar("rocoft_jax_layer_norm_branches", default=None)


@contextlib.contextmanager
def branching():
    """Context in which `residual_layer_norm` outputs carry a reference for each named consumer.

    Entered by the interceptors that call it; nested entries share the outermost one's registry,
    which holds tracers and is dropped on exit.
    """
    if _REGISTRY.get() is not None:
        yield
        return
    token = _REGISTRY.set({})
    try:
        yield
    finally:
        _REGISTRY.reset(token)


def branch(x, consumer: str):
    """The reference to ``x`` kept for ``consumer`` if ``x`` is a `residual_layer_norm` output that
    named it (each is handed out once), else ``x`` itself."""
    registry = _REGISTRY.get()
    entry = registry.get(id(x)) if registry is not None else None
    if entry is None or entry[0] is not x:
        return x
    return entry[1].pop(consumer, x)


def residual_layer_norm(layer_norm, x, residual, mesh=None, branches: tuple[str, ...] = ()):
    """``layer_norm(x + residual)`` for an HF flax ``nn.LayerNorm`` submodule (scale and bias over the
    last axis), through `add_layer_norm`; within `branching`, with a reference for each consumer in
    ``branches`` (`branch`)."""
    scale = layer_norm.get_variable("params", "scale")
    bias = layer_norm.get_variable("params", "bias")
    dtype = layer_norm.dtype or jnp.result_type(x, scale, bias)
    registry = _REGISTRY.get()
    branches = branches if registry is not None else ()
    y, *copies = add_layer_norm_copies(
        x, residual, scale, bias, layer_norm.epsilon, dtype, mesh is None or mesh.size == 1, 1 + len(branches)
    )
    if branches:
        registry[id(y)] = (y, dict(zip(branches, copies)))
    return y
