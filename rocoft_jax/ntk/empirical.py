"""The empirical neural tangent kernel of a parameter subset, computed in bounded memory.

``K(x, x') = <grad_S f(x), grad_S f(x')>`` (Malladi et al., 2023; RoCoFT, Section 5) for a
parameter subset S (`ntk.subsets`: full, row<r>, column<r>, lora<r>, bitfit) and outputs f
(`ntk.forwards`: prompt-based label words, or a fixed readout).

* Outputs. ``f`` maps a batch to ``(B, C)``. Two classes give one output, the logit
  difference. With C > 1 the kernel is the block kernel
  ``K[(i, a), (j, b)] = <grad f_a(x_i), grad f_b(x_j)>``, returned as an ``(n*C, m*C)``
  matrix with row ``i*C + a``: the NTK of the vector-valued model, whose kernel machine is
  the linearized model itself.
* Memory. Per-example gradients of the whole model are never formed at once. The leaves
  of S are packed into groups; a chunk of examples gets its group gradients from one
  vmapped ``jacrev``, and at most ``max_bytes`` of such gradients are alive at a time.
  The gradient inner product is a sum over parameters, so group kernels add up to K.
* RoCoFT slices run through the sliced matmul, whose VJP yields only the slice gradient
  (the selected rows/columns of the kernel gradient) without forming the full one.
* Predictions ``K(X_new, X) @ alpha`` (`predict`): small subsets form the cross kernel,
  reusing the compiled gradients; large ones need no cross kernel, as ``v = J^T alpha`` is
  one VJP over X and ``J_new v`` one JVP over X_new (`tangent`, `linearized`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from rocoft_jax import tree as tree_lib
from rocoft_jax.ntk.subsets import SUBSET_NAMES, Subset, make_subset, parse_subset, restrict

__all__ = [
    "DEFAULT_MAX_BYTES",
    "SUBSET_NAMES",
    "Subset",
    "kernel",
    "kernel_apply",
    "linearized",
    "make_subset",
    "num_examples",
    "num_outputs",
    "outputs",
    "parse_subset",
    "plan_groups",
    "predict",
    "restrict",
    "tangent",
]

DEFAULT_MAX_BYTES = 1 << 30


# ---------------------------------------------------------------- the kernel


def _outputs(apply, theta, consts, batch):
    out = apply(theta, consts, batch)
    return out.reshape(out.shape[0], -1)


@functools.partial(jax.jit, static_argnums=0)
def _example_grads(apply, theta, consts, batch):
    """Leaves ``(c, C, *leaf.shape)``: the gradient of each output of each example."""

    def one(example):
        single = jax.tree.map(lambda a: a[None], example)
        return jax.jacrev(lambda t: _outputs(apply, t, consts, single)[0])(theta)

    return jax.vmap(one)(batch)


@jax.jit
def _gram(ga, gb):
    """``(ca*C, cb*C)`` inner products of two chunks of flattened gradients."""

    def rows(g):
        return g.reshape(g.shape[0] * g.shape[1], -1)

    pairs = zip(jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True)
    return sum(
        jnp.dot(rows(a), rows(b).T, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
        for a, b in pairs
    )


def num_examples(batch) -> int:
    sizes = {int(np.shape(v)[0]) for v in jax.tree.leaves(batch)}
    if len(sizes) != 1:
        raise ValueError(f"batch arrays disagree on the number of examples: {sorted(sizes)}")
    return sizes.pop()


def _chunks(batch, n: int, size: int):
    """``(start, valid, chunk)`` with every chunk padded to ``size`` rows by repeating the last row."""
    for start in range(0, n, size):
        rows = np.minimum(np.arange(start, start + size), n - 1)
        yield start, min(size, n - start), jax.tree.map(lambda a, rows=rows: np.asarray(a)[rows], batch)


def num_outputs(subset: Subset, batch) -> int:
    one = jax.tree.map(lambda a: np.asarray(a)[:1], batch)
    return int(
        np.prod(jax.eval_shape(functools.partial(_outputs, subset.apply), subset.theta, subset.consts, one).shape[1:])
    )


def plan_groups(example_bytes: dict[str, int], hold: int, max_bytes: int) -> list[list[str]]:
    """Packs leaves, in order, into groups whose gradients for ``hold`` examples fit ``max_bytes``.

    ``example_bytes`` maps each leaf to the bytes of one example's gradient (all outputs).
    A leaf too large for that stands alone and is then computed in blocks.
    """
    limit = max_bytes // max(hold, 1)
    groups: list[list[str]] = []
    size = 0
    for path, nbytes in example_bytes.items():
        if 2 * nbytes > max_bytes:
            raise ValueError(
                f"max_bytes={max_bytes} cannot hold the gradients of two examples for {path} "
                f"({nbytes} bytes each); raise max_bytes to at least {2 * nbytes}"
            )
        if groups and size + nbytes <= limit:
            groups[-1].append(path)
            size += nbytes
        else:
            groups.append([path])
            size = nbytes
    return groups


def kernel(
    subset: Subset, x1, x2=None, *, max_bytes: int = DEFAULT_MAX_BYTES, chunk_size: int = 16, progress: bool = False
) -> np.ndarray:
    """The ``(n1*C, n2*C)`` empirical NTK of ``subset`` between batches ``x1`` and ``x2`` (default x1).

    Batches are dicts of arrays with a leading example axis. At most ``max_bytes`` of
    per-example gradients are held at once (activations of a chunk of ``chunk_size``
    examples come on top). Leaves are grouped so that one group's gradients for all of
    ``x2`` (plus one chunk of ``x1`` unless x2 is x1) fit; each group then costs one pass
    over the examples. A leaf too large for that is done in blocks of chunks, recomputing
    gradients of ``x2``'s chunks for each chunk of ``x1``.
    """
    symmetric = x2 is None
    x2 = x1 if symmetric else x2
    n1, n2 = num_examples(x1), num_examples(x2)
    c_out = num_outputs(subset, x1)
    flat = tree_lib.flatten(subset.theta)
    per_example = {p: c_out * int(np.size(v)) * np.dtype(v.dtype).itemsize for p, v in flat.items()}
    chunk = max(1, min(chunk_size, max(n1, n2)))
    hold = -(-n2 // chunk) * chunk + (0 if symmetric else chunk)  # all of x2 (padded), plus a chunk of x1
    groups = plan_groups(per_example, hold, max_bytes)
    out = np.zeros((n1 * c_out, n2 * c_out), np.float64)
    bar = tqdm(
        total=n1 * len(groups),
        unit="ex",
        desc=f"kernel {subset.name} ({len(groups)} groups)",
        disable=not progress,
        leave=False,
    )
    for paths in groups:
        sub = subset if len(groups) == 1 else restrict(subset, paths)
        cap = max_bytes // sum(per_example[p] for p in paths)
        cached = cap >= hold
        size = chunk if cached else max(1, min(chunk, cap // 2))
        _accumulate(out, sub, x1, x2, n1, n2, size, c_out, cached, symmetric, bar.update)
    bar.close()
    if symmetric:
        out = np.triu(out) + np.triu(out, 1).T
    return out


def _accumulate(out, sub: Subset, x1, x2, n1, n2, size, c_out, cached, symmetric, done):
    """Adds one group's kernel into ``out``; with ``symmetric`` only the upper block triangle.

    ``done(k)`` is told when k more rows of ``x1`` are finished.
    """

    def grads(chunk):
        return _example_grads(sub.apply, sub.theta, sub.consts, chunk)

    def add(a0, va, ga, b0, vb, gb):
        block = np.asarray(_gram(ga, gb), np.float64)[: va * c_out, : vb * c_out]
        out[a0 * c_out : (a0 + va) * c_out, b0 * c_out : (b0 + vb) * c_out] += block

    inner = [(b0, vb, grads(ch)) for b0, vb, ch in _chunks(x2, n2, size)] if cached else None
    for a0, va, chunk_a in _chunks(x1, n1, size):
        ga = inner[a0 // size][2] if (cached and symmetric) else grads(chunk_a)
        for b0, vb, chunk_b in _chunks(x2, n2, size):
            if symmetric and b0 < a0:
                continue
            gb = inner[b0 // size][2] if cached else ga if (symmetric and b0 == a0) else grads(chunk_b)
            add(a0, va, ga, b0, vb, gb)
        done(va)


# ---------------------------------------------------------------- kernel-vector products


@functools.partial(jax.jit, static_argnums=0)
def _pullback(apply, theta, consts, batch, cotangent):
    _, pull = jax.vjp(lambda t: _outputs(apply, t, consts, batch), theta)
    return pull(cotangent)[0]


@functools.partial(jax.jit, static_argnums=0)
def _pushforward(apply, theta, consts, batch, v):
    return jax.jvp(lambda t: _outputs(apply, t, consts, batch), (theta,), (v,))


def tangent(subset: Subset, x, alpha, *, chunk_size: int = 16):
    """``v = sum_{i,a} alpha[i, a] grad f_a(x_i)``, shaped like ``subset.theta``.

    ``alpha`` is ``(n, C)`` or flat ``(n*C,)`` in the kernel's row order.
    """
    n = num_examples(x)
    alpha = np.asarray(alpha, np.float32).reshape(n, -1)
    v = None
    for start, valid, chunk in _chunks(x, n, chunk_size):
        cot = np.zeros((chunk_size, alpha.shape[1]), np.float32)
        cot[:valid] = alpha[start : start + valid]
        part = _pullback(subset.apply, subset.theta, subset.consts, chunk, cot)
        v = part if v is None else jax.tree.map(jnp.add, v, part)
    return v


def linearized(subset: Subset, v, x, *, chunk_size: int = 64, progress: bool = False):
    """``(f(x), J(x) v)`` as numpy ``(m, C)`` arrays: outputs at init and the kernel-vector product."""
    m = num_examples(x)
    f0, df = [], []
    bar = tqdm(total=m, desc=f"predict {subset.name}", disable=not progress, leave=False)
    for _, valid, chunk in _chunks(x, m, min(chunk_size, m)):
        out, dout = _pushforward(subset.apply_jvp, subset.theta, subset.consts, chunk, v)
        f0.append(np.asarray(out)[:valid])
        df.append(np.asarray(dout)[:valid])
        bar.update(valid)
    bar.close()
    return np.concatenate(f0), np.concatenate(df)


def outputs(subset: Subset, x, *, chunk_size: int = 64) -> np.ndarray:
    """f(x) at the subset's starting point, ``(m, C)``."""
    return linearized(subset, jax.tree.map(jnp.zeros_like, subset.theta), x, chunk_size=chunk_size)[0]


def kernel_apply(subset: Subset, x, alpha, x_new, *, chunk_size: int = 16):
    """``K(x_new, x) @ alpha`` as ``(m, C)``, without forming the cross kernel."""
    return linearized(subset, tangent(subset, x, alpha, chunk_size=chunk_size), x_new, chunk_size=chunk_size)[1]


def predict(
    subset: Subset,
    x,
    alpha,
    x_new,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    chunk_size: int = 16,
    jvp_chunk_size: int = 64,
    explicit_limit: int = 1 << 20,
    progress: bool = False,
) -> np.ndarray:
    """``K(x_new, x) @ alpha`` as ``(m, C)``, by the cheaper of two exact routes.

    Subsets with at most ``explicit_limit`` parameters (times outputs) form the cross kernel
    with `kernel`, reusing its compiled per-example gradients: no new program to compile.
    Larger ones take `kernel_apply`'s VJP and JVPs, which never hold per-example gradients.
    """
    n = num_examples(x)
    alpha = np.asarray(alpha, np.float64).reshape(-1)
    c_out = len(alpha) // n
    if subset.num_params * c_out <= explicit_limit:
        cross = kernel(subset, x_new, x, max_bytes=max_bytes, chunk_size=chunk_size, progress=progress)
        return (cross @ alpha).reshape(-1, c_out)
    v = tangent(subset, x, alpha, chunk_size=chunk_size)
    return linearized(subset, v, x_new, chunk_size=jvp_chunk_size, progress=progress)[1]
