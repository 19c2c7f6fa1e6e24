"""Exact GELU for BERT-family MLPs, with a cheaper forward and a recomputing backward.

HF Flax's BERT-family intermediate layers apply ``jax.nn.gelu(approximate=False)``,
which evaluates ``erfc`` in fp32 and keeps fp32 intermediates for the backward
pass; at roberta-large's shape that forward costs more than the matmul before it.
`gelu` saves only its input and recomputes the derivative inside the backward's
one elementwise pass.

On CUDA GPUs each pass is one Pallas (Triton) kernel over the flattened
activations. It evaluates the normal CDF by Zelen and Severo's formula 26.2.17
(Abramowitz and Stegun; absolute error below 7.5e-8, so GELU and its slope
stay within 5e-7 of the erf form in fp32) from one ``exp`` and one reciprocal
square root, where XLA's ``erf`` is a rational function with a full division.
Under a mesh the kernel runs on each device's shard. `gelu_and_slope` also
writes the slope GELU'(h), for `rocoft_jax.fast.fused_dense.dense_after_gelu`.

Falls back to XLA through ``erf`` (the same function) off CUDA and for sizes the
kernel's block does not divide. `rocoft_jax.fast.mlp.fast_gelu` applies it to
BERT-family models. Measurements: docs/performance.md.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from rocoft_jax import sharding

_SQRT_HALF = float(np.sqrt(0.5))
_INV_SQRT_2PI = float(1 / np.sqrt(2 * np.pi))
_ZS_P = 0.2316419  # Zelen and Severo's 26.2.17: t = 1 / (1 + p|x|)
_ZS_B = (0.319381530, -0.356563782, 1.781477937, -1.821255978, 1.330274429)
BLOCK = 2048  # elements per kernel instance: the fastest of 1024-4096 on H200


def _pdf(x):
    return _INV_SQRT_2PI * jnp.exp(-0.5 * x * x)


def _cdf_pdf_erf(x):
    return 0.5 * (1.0 + lax.erf(x * _SQRT_HALF)), _pdf(x)


def _cdf_pdf_zs(x):
    pdf = _pdf(x)
    root = lax.rsqrt(1.0 + _ZS_P * jnp.abs(x))
    t = root * root
    b = _ZS_B
    tail = pdf * (t * (b[0] + t * (b[1] + t * (b[2] + t * (b[3] + t * b[4])))))  # 1 - Phi(|x|)
    return jnp.where(x >= 0, 1.0 - tail, tail), pdf


def _value(x, _, cdf_pdf):
    xf = x.astype(jnp.float32)
    return (xf * cdf_pdf(xf)[0]).astype(x.dtype)


def _grad(x, dy, cdf_pdf):
    xf = x.astype(jnp.float32)
    cdf, pdf = cdf_pdf(xf)
    return (dy.astype(jnp.float32) * (cdf + xf * pdf)).astype(x.dtype)


def _value_and_slope(x, _, cdf_pdf):
    xf = x.astype(jnp.float32)
    cdf, pdf = cdf_pdf(xf)
    return (xf * cdf).astype(x.dtype), (cdf + xf * pdf).astype(x.dtype)


# Jitted with its configuration static: the calls of every layer share one traced and lowered kernel.
@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("outputs", "interpret"))
def pallas_elementwise(fn, x, dy=None, *, outputs: int = 1, interpret: bool = False):
    """``fn(x, dy, _cdf_pdf_zs)`` as one Pallas kernel over the flattened arrays (size divisible by BLOCK).

    ``fn`` returns one array, or a tuple of ``outputs`` arrays shaped like ``x``.
    """
    operands = [a.reshape(-1) for a in (x, dy) if a is not None]

    def kernel(*refs):
        inputs, outs = refs[: len(operands)], refs[len(operands) :]
        values = [r[...] for r in inputs]
        results = fn(values[0], values[1] if len(values) > 1 else None, _cdf_pdf_zs)
        for ref, result in zip(outs, results if outputs > 1 else (results,)):
            ref[...] = result

    spec = pl.BlockSpec((BLOCK,), lambda i: (i,))
    shape = jax.ShapeDtypeStruct(operands[0].shape, x.dtype)
    params = None if interpret else pl_triton.CompilerParams(num_warps=4, num_stages=1)
    out = pl.pallas_call(
        kernel,
        out_shape=(shape,) * outputs if outputs > 1 else shape,
        grid=(operands[0].size // BLOCK,),
        in_specs=[spec] * len(operands),
        out_specs=(spec,) * outputs if outputs > 1 else spec,
        interpret=interpret,
        compiler_params=params,
    )(*operands)
    return tuple(o.reshape(x.shape) for o in out) if outputs > 1 else out.reshape(x.shape)


def _elementwise(fn, mesh, x, dy=None, outputs: int = 1):
    """``fn`` through a Pallas kernel on CUDA GPUs (per device under a mesh), else through XLA and erf.

    ``outputs`` > 1 only without a mesh.
    """
    xla = lambda x, dy=None: fn(x, dy, _cdf_pdf_erf)

    def local(x, dy=None):
        if x.size % BLOCK:
            return xla(x, dy)
        return lax.platform_dependent(
            x, dy, cuda=lambda x, dy: pallas_elementwise(fn, x, dy, outputs=outputs), default=xla
        )

    if mesh is None or mesh.size == 1:
        return local(x, dy)
    # A Pallas call has no partitioning rule: run it on each device's shard of the activations.
    spec = sharding.activation_spec(mesh, x.shape)
    args = (x,) if dy is None else (x, dy)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec,) * len(args), out_specs=spec, check_vma=False)(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def gelu(x, mesh=None):
    """``x * Phi(x)``, computed in fp32 and returned in ``x``'s dtype.

    ``mesh``: the mesh the jitted step runs on, if any (the GPU kernel then runs per shard).
    """
    return _elementwise(_value, mesh, x)


def _gelu_fwd(x, mesh):
    return gelu(x, mesh), x


def _gelu_bwd(mesh, x, dy):
    return (_elementwise(_grad, mesh, x, dy),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


def gelu_and_slope(x):
    """``(GELU(x), GELU'(x))`` from one pass, on one device, for a backward pass that applies the slope
    inside a matmul (`rocoft_jax.fast.fused_dense.dense_after_gelu`). Not differentiable itself."""
    return _elementwise(_value_and_slope, None, x, outputs=2)
