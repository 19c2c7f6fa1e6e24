"""The sliced matmul: a Dense layer that runs on its frozen kernel plus a trained slice.

For rows (output units ``idx``) the layer computes

    y = x @ W0,   y[..., idx] += x @ (S - W0[:, idx])

and for columns (input features ``idx``)

    y = x @ W0 + x[..., idx] @ (S - W0[idx, :]).

W0 is never differentiated, so reverse mode forms only the input gradient
``dy @ W^T`` and the r-sized slice gradient (``x^T dy[..., idx]`` for rows,
``x[..., idx]^T dy`` for columns): about 2/3 of the FLOPs of full fine-tuning.
Writing ``W0.at[:, idx].set(S)`` instead would make XLA form the whole
d_in x d_out weight gradient (NOTES.md, "the weight-gradient trap").

The correction uses ``S - W0[idx]`` computed in fp32, so with bf16 frozen
weights and fp32 slices the forward pass still sees updates far below bf16's
resolution of W0.

`sliced_kernels` applies this to HF Flax models unchanged, by intercepting
``nn.Dense`` (and GPT-2's ``FlaxConv1D``) calls whose kernel path is selected.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Mapping

import flax.linen as nn
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from jax import lax

from rocoft_jax import targets as targets_lib
from rocoft_jax.mask import ROCOFT, KernelSlice, RoCoFTMask
from rocoft_jax.slices import put_slice, take_slice


def _matmul(x, kernel, in_axis: int, precision):
    return lax.dot_general(x, kernel, (((x.ndim - 1,), (in_axis,)), ((), ())), precision=precision)


def sliced_matmul(x, kernel, values, spec: KernelSlice, dtype=None, precision=None):
    """``x @ W`` where W is ``kernel`` with the slice ``spec`` replaced by ``values``.

    ``kernel`` is laid out with its output axis at ``spec.out_axis``. The
    result is computed in ``dtype`` (default: the promoted dtype of x and kernel).
    """
    in_axis = 1 - spec.out_axis
    delta = jnp.asarray(values, jnp.float32) - jnp.asarray(take_slice(kernel, spec), jnp.float32)
    x, kernel = promote_dtype(x, kernel, dtype=dtype)
    delta = delta.astype(kernel.dtype)
    if spec.axis is None:
        # Random entries have no slice structure: this forms the full kernel gradient.
        zeros = jnp.zeros(kernel.shape, kernel.dtype)
        return _matmul(x, kernel + put_slice(zeros, delta, spec), in_axis, precision)
    y = _matmul(x, kernel, in_axis, precision)
    if spec.axis == spec.out_axis:  # rows: r output units
        return y.at[..., spec.indices].add(_matmul(x, delta, in_axis, precision))
    x_sel = jnp.take(x, spec.indices, axis=-1)  # columns: r input features
    return y + _matmul(x_sel, delta, in_axis, precision)


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
    y = sliced_matmul(x, kernel, values, spec, dtype=module.dtype, precision=module.precision)
    if module.has_variable("params", "bias"):
        y = y + jnp.asarray(module.get_variable("params", "bias"), y.dtype)
    return y


@contextlib.contextmanager
def intercept_kernels(calls: Mapping[tuple[str, ...], Callable]):
    """Replaces the ``__call__`` of the layers at the given module paths.

    ``calls`` maps a module path (the kernel path without "kernel") to
    ``fn(module, x, original_call) -> y``. Other modules run untouched.
    """

    seen: set[tuple[str, ...]] = set()

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and _module_kernel_layout(context.module) is not None:
            path = tuple(context.module.path)
            fn = calls.get(path)
            if fn is not None:
                seen.add(path)
                return fn(context.module, *args, lambda x: next_fun(x, **kwargs))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield
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
    calls = {}
    for path, spec in mask.slices.items():
        module_path = tuple(path.split("/")[:-1])
        calls[module_path] = lambda module, x, _, v=values[path], s=spec: _sliced_call(module, x, v, s)
    return intercept_kernels(calls)
