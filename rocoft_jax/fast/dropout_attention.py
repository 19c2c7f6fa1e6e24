"""Flash attention with HF's attention dropout, for BERT-family self-attention in training.

HF Flax's encoder attention drops attention weights with one (T, S) mask shared by
every batch row and head (``broadcast_dropout=True``), drawn from the module's
"dropout" RNG. cuDNN's fused kernel draws masks of its own, never that one. This
module runs the same attention as one Pallas (Triton) kernel each way and applies
the caller's (T, S) dropout multiplier (0, or 1 / keep probability) inside it:

    out = (softmax(q k^T / sqrt(d) + key mask) * drop) v

so `rocoft_jax.fast.fused_attention` stays fused, and exact, under dropout.

Contract: non-causal self-attention with a (B, S) key mask; fp16, bf16 or fp32;
power-of-two head dims from 16 to 128 and lengths the block divides (`supported`);
NVIDIA GPUs only (`available`). Elsewhere the caller runs HF's own attention.

The kernels are jax's ``jax.experimental.pallas.ops.gpu.attention`` (Apache 2.0;
itself after the Triton fused-attention tutorial), reduced to the non-causal case
and changed in two ways: a (B, S) key mask replaces segment ids, and the backward
pass applies the multiplier to ``dO V^T`` and to the probabilities that form dV.
``delta = rowsum(dO * out)`` stays exact, since ``out`` already holds the dropped
probabilities. Measurements: docs/performance.md.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

BLOCK = 64  # query and key block of every kernel: the fastest of 32-128 on one H100 at T=512
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)
_LOG2E = math.log2(math.e)


def available() -> bool:
    """Whether the kernels can run here: an NVIDIA GPU (Pallas lowers them through Triton)."""
    return jax.default_backend() == "gpu" and "NVIDIA" in jax.devices()[0].device_kind.upper()


def supported(shape, dtype) -> bool:
    """Whether the kernels take (B, T, heads, head_dim) self-attention inputs of ``shape`` and ``dtype``:
    a length the block divides and a power-of-two head dim from 16 to 128."""
    t, d = shape[1], shape[-1]
    return t % min(BLOCK, t) == 0 and d in (16, 32, 64, 128) and dtype in (jnp.bfloat16, jnp.float16, jnp.float32)


def _logits(q, k, keep_ref, k_slice, sm_scale):
    """Base-2 logits of a block, masked keys at a large negative value (HF adds the dtype's minimum)."""
    qk = pl_triton.dot(q, k.T) * (sm_scale * _LOG2E)
    if keep_ref is not None:
        qk = jnp.where(keep_ref[k_slice][None, :] != 0, qk, _MASKED)
    return qk


def _forward_kernel(q_ref, k_ref, v_ref, keep_ref, drop_ref, o_ref, lse_ref, *, sm_scale, block):
    start_q = pl.program_id(0)
    q_slice = pl.ds(start_q * block, block)
    q = q_ref[...]

    def body(start_k, carry):
        o, m, l = carry
        k_slice = pl.ds(start_k * block, block)
        qk = _logits(q, k_ref[k_slice, :], keep_ref, k_slice, sm_scale)
        m_next = jnp.maximum(m, jnp.max(qk, axis=-1))
        correction = jnp.exp2(m - m_next)
        p = jnp.exp2(qk - m_next[:, None])
        dropped = p * drop_ref[q_slice, k_slice].astype(jnp.float32)
        v = v_ref[k_slice, :]
        o = correction[:, None] * o + pl_triton.dot(dropped.astype(v.dtype), v)
        return o, m_next, correction * l + p.sum(axis=-1)

    init = (
        jnp.zeros(q.shape, jnp.float32),
        jnp.full((block,), -jnp.inf, jnp.float32),
        jnp.zeros((block,), jnp.float32),
    )
    o, m, l = lax.fori_loop(0, k_ref.shape[0] // block, body, init)
    lse_ref[...] = m + jnp.log2(l)
    o_ref[...] = (o / l[:, None]).astype(o_ref.dtype)


def _backward_kernel(
    q_ref, k_ref, v_ref, keep_ref, drop_ref, do_ref, lse_ref, delta_ref, dq_ref, dk_ref, dv_ref, *, sm_scale, block
):
    """dK and dV for key block i, then dQ for query block i (one program does both)."""
    index = pl.program_id(2)
    k_slice = pl.ds(index * block, block)
    k, v = k_ref[k_slice, :], v_ref[k_slice, :]

    def dkdv(start_q, carry):
        dv, dk = carry
        q_slice = pl.ds(start_q * block, block)
        q, do = q_ref[q_slice, :], do_ref[q_slice, :]
        p = jnp.exp2(_logits(q, k, keep_ref, k_slice, sm_scale) - lse_ref[q_slice][:, None])
        drop = drop_ref[q_slice, k_slice].astype(jnp.float32)
        dv = dv + pl_triton.dot((p * drop).astype(do.dtype).T, do)
        ds = p * (pl_triton.dot(do, v.T) * drop - delta_ref[q_slice][:, None]) * sm_scale
        return dv, dk + pl_triton.dot(ds.astype(q.dtype).T, q)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dv, dk = lax.fori_loop(0, q_ref.shape[0] // block, dkdv, (zeros, zeros))
    dv_ref[...] = dv.astype(dv_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)

    q_slice = pl.ds(index * block, block)
    q, do = q_ref[q_slice, :], do_ref[q_slice, :]
    lse, delta = lse_ref[q_slice], delta_ref[q_slice]

    def dq(start_k, acc):
        k_slice = pl.ds(start_k * block, block)
        k, v = k_ref[k_slice, :], v_ref[k_slice, :]
        p = jnp.exp2(_logits(q, k, keep_ref, k_slice, sm_scale) - lse[:, None])
        drop = drop_ref[q_slice, k_slice].astype(jnp.float32)
        ds = p * (pl_triton.dot(do, v.T) * drop - delta[:, None]) * sm_scale
        return acc + pl_triton.dot(ds.astype(k.dtype), k)

    dq_ref[...] = lax.fori_loop(0, k_ref.shape[0] // block, dq, jnp.zeros(q.shape, jnp.float32)).astype(dq_ref.dtype)


def _specs(t, d, keep):
    """Block specs over grid (batch, head, block index) of q/k/v/do, the key mask and the dropout multiplier."""
    whole = pl.BlockSpec((None, t, None, d), lambda i, j, _: (i, 0, j, 0))
    keep_spec = None if keep is None else pl.BlockSpec((None, t), lambda i, j, _: (i, 0))
    return whole, keep_spec, pl.BlockSpec((t, t), lambda i, j, _: (0, 0))


# Jitted with its configuration static: the calls of every layer share one traced and lowered kernel.
@functools.partial(jax.jit, static_argnames=("sm_scale", "interpret"))
def _forward(q, k, v, keep, drop, sm_scale, interpret):
    b, t, h, d = q.shape
    block = min(BLOCK, t)
    whole, keep_spec, drop_spec = _specs(t, d, keep)
    remap = lambda spec: (
        None if spec is None else pl.BlockSpec(spec.block_shape, lambda i, j, k, m=spec.index_map: m(j, k, i))
    )
    q_spec = pl.BlockSpec((None, block, None, d), lambda i, j, k: (j, i, k, 0))
    return pl.pallas_call(
        functools.partial(_forward_kernel, sm_scale=sm_scale, block=block),
        grid=(t // block, b, h),
        in_specs=[q_spec, remap(whole), remap(whole), remap(keep_spec), remap(drop_spec)],
        out_specs=[q_spec, pl.BlockSpec((None, None, block), lambda i, j, k: (j, k, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, t), jnp.float32)],
        compiler_params=None if interpret else pl_triton.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="rocoft_dropout_attention_fwd",
    )(q, k, v, keep, drop)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def dropout_attention(q, k, v, keep, drop, sm_scale: float, interpret: bool = False):
    """Self-attention of (B, T, heads, head_dim) ``q``, ``k``, ``v`` with dropout on its weights.

    ``keep``: (B, T) key mask (nonzero: attend), or None. ``drop``: (T, T) multiplier of the
    weights, shared by every row and head (HF's ``broadcast_dropout``). Gradients flow to q, k, v.
    """
    return _forward(q, k, v, keep, drop, sm_scale, interpret)[0]


def _fwd(q, k, v, keep, drop, sm_scale, interpret):
    out, lse = _forward(q, k, v, keep, drop, sm_scale, interpret)
    return out, (q, k, v, keep, drop, out, lse)


def _bwd(sm_scale, interpret, residuals, do):
    q, k, v, keep, drop, out, lse = residuals
    return (*_backward(q, k, v, keep, drop, out, lse, do, sm_scale, interpret), None, None)


@functools.partial(jax.jit, static_argnames=("sm_scale", "interpret"))
def _backward(q, k, v, keep, drop, out, lse, do, sm_scale, interpret):
    b, t, h, d = q.shape
    block = min(BLOCK, t)
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), do.astype(jnp.float32))
    whole, keep_spec, drop_spec = _specs(t, d, keep)
    rows = pl.BlockSpec((None, None, t), lambda i, j, _: (i, j, 0))
    out_block = pl.BlockSpec((None, block, None, d), lambda i, j, k: (i, k, j, 0))
    dq, dk, dv = pl.pallas_call(
        functools.partial(_backward_kernel, sm_scale=sm_scale, block=block),
        grid=(b, h, t // block),
        in_specs=[whole, whole, whole, keep_spec, drop_spec, whole, rows, rows],
        out_specs=[out_block] * 3,
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)],
        compiler_params=None if interpret else pl_triton.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="rocoft_dropout_attention_bwd",
    )(q, k, v, keep, drop, do, lse, delta)
    return dq, dk, dv


dropout_attention.defvjp(_fwd, _bwd)


def reference(q, k, v, keep, drop, sm_scale: float):
    """The same attention through XLA, materializing the weights (as HF does), for tests."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * sm_scale
    if keep is not None:
        logits = jnp.where(keep[:, None, None, :] != 0, logits, _MASKED)
    weights = jax.nn.softmax(logits, axis=-1) * drop.astype(jnp.float32)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v.astype(jnp.float32)).astype(q.dtype)
