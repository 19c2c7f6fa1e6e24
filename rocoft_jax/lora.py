"""LoRA on the same target kernels, as a baseline in the same harness.

``W x`` becomes ``W x + (alpha / r) * B A x`` with A at peft's default init
(uniform in +-1/sqrt(d_in)) and B zero, so training starts from the base model.
The adapters live in the trainable tree as ``{"lora": {kernel path: {"a", "b"}}}``
and enter through the same layer interception as RoCoFT's slices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rocoft_jax import tree as tree_lib
from rocoft_jax.sliced import intercept_kernels

LORA = "lora"


def init_lora(params, kernel_paths, rank: int, rng, out_axis: int = 1, dtype=jnp.float32):
    """Adapters ``{"a": (d_in, r), "b": (r, d_out)}`` for each kernel path, nested like params."""
    leaves = tree_lib.flatten(params)
    adapters = {}
    keys = jax.random.split(rng, max(len(kernel_paths), 1))
    for key, path in zip(keys, kernel_paths):
        shape = leaves[path].shape
        d_in, d_out = shape[1 - out_axis], shape[out_axis]
        if not 1 <= rank <= min(d_in, d_out):
            raise ValueError(f"LoRA rank must be in [1, {min(d_in, d_out)}] for {path}; got {rank}")
        bound = 1.0 / jnp.sqrt(d_in)
        prefix = path[: -len("/kernel")]
        adapters[prefix + "/a"] = jax.random.uniform(key, (d_in, rank), dtype, -bound, bound)
        adapters[prefix + "/b"] = jnp.zeros((rank, d_out), dtype)
    return tree_lib.unflatten(adapters)


def _pairs(lora_tree):
    flat = tree_lib.flatten(lora_tree)
    return {p[: -len("/a")]: (flat[p], flat[p[:-2] + "/b"]) for p in flat if p.endswith("/a")}


def lora_kernels(lora_tree, alpha: float, rank: int):
    """Context in which each adapted layer adds ``(alpha / r) * x @ a @ b``."""
    scale = alpha / rank

    def call(module, x, original, a, b):
        y = original(x)
        return y + (scale * ((x.astype(a.dtype) @ a) @ b)).astype(y.dtype)

    calls = {
        tuple(prefix.split("/")): (lambda m, x, orig, a=a, b=b: call(m, x, orig, a, b))
        for prefix, (a, b) in _pairs(lora_tree).items()
    }
    return intercept_kernels(calls)


def merge_lora(params, lora_tree, alpha: float, rank: int, out_axis: int = 1):
    """Params with ``(alpha / r) * a @ b`` folded into each adapted kernel, for export."""
    flat = tree_lib.flatten(params)
    for prefix, (a, b) in _pairs(lora_tree).items():
        kernel = flat[prefix + "/kernel"]
        delta = (alpha / rank) * (a @ b)
        delta = delta if out_axis == 1 else delta.T
        flat[prefix + "/kernel"] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
    return tree_lib.unflatten(flat)
