"""Many adapters, one base: batches whose rows each run their own adapter.

`stack` checks N adapters (`rocoft_jax.adapters.Adapter`) against one copy of the base params and stacks
what they trained, layer by layer; `mixed_layers` then runs a model on a batch with ``adapter_ids`` (B,)
saying which adapter each row uses. Each row is computed as its adapter's merged model would compute it,
without building any merged kernel:

- rows (output units ``idx``): the row's selected outputs are ``x @ S`` from its adapter's slice, the others
  ``x @ W0`` (one elementwise select, which XLA fuses with the layer's bias add);
- columns (input features ``idx``): a per-row rank-r correction ``x[..., idx] @ (S - W0[idx])``, as r
  broadcast multiply-adds fused the same way;
- leaves trained in full (task heads, targeted biases): a layer whose kernel some adapter trains runs all N
  kernels on its (small) input and keeps each row's own; a trained bias is gathered per row. Heads of
  different sizes (e.g. 2 and 3 labels) are zero-padded to the largest; `MixedAdapters.num_outputs` tells
  each adapter's size.

`logits` (encoders' classification or regression heads, or any model's logits) and `generate` (greedy
decoding through HF's KV cache) wrap this in compiled programs that take the stacked arrays as arguments.
Adapters of different families or bases, random-entry adapters, and trained leaves other than Dense or
Conv1D kernels and biases are refused with a one-line ValueError.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.dtypes import promote_dtype
from jax import lax

from rocoft_jax import families as families_lib
from rocoft_jax import tree as tree_lib
from rocoft_jax.adapters import Adapter, check_base
from rocoft_jax.sliced import intercept_kernels


class LayerPlan(NamedTuple):
    """What the adapters change in one layer (static: it shapes the compiled program)."""

    path: tuple[str, ...]  # the module path
    out_axis: int  # 1 for Dense (d_in, d_out) kernels, 0 for GPT-2's Conv1D (d_out, d_in)
    rows: bool  # some adapter trains rows of its kernel
    columns: bool  # some adapter trains columns
    kernel: bool  # some adapter trains the whole kernel (a head): every adapter's kernel is stacked
    bias: bool  # the bias differs between adapters: stacked
    d_out: int = 0  # the base kernel's output units


@dataclasses.dataclass(frozen=True, eq=False)
class MixedAdapters:
    """N adapters of one base, stacked per layer. ``arrays`` is a pytree (pass it to jitted code as an argument).

    Per layer (module path), canonical (d_in, d_out) layout, fp32:
    ``row_values`` (d_in, N * R), adapter n's slice in columns [n * R, n * R + r_n), in the kernel's dtype;
    ``row_slot`` (N, d_out) int32, the slice column of each output unit an adapter trains, else -1;
    ``col_index`` (N, C) int32, ``col_delta`` (N, C, d_out) = S - W0[idx];
    ``kernel`` (N, d_in, d_out_max) and ``bias`` (N, d_out_max) for leaves trained in full.
    """

    names: tuple[str, ...]
    family: str | None
    plan: tuple[LayerPlan, ...]
    arrays: dict[str, dict[str, jax.Array]]
    num_outputs: tuple[int, ...] | None  # each adapter's output size of the zero-padded head, if heads differ

    def index(self, name: str) -> int:
        if name not in self.names:
            raise ValueError(f"no adapter named {name!r}; these are: {', '.join(self.names)}")
        return self.names.index(name)


def _canonical(values: np.ndarray, out_axis: int) -> np.ndarray:
    """A kernel or slice in (d_in, d_out) layout: Dense kernels already are, Conv1D ones are transposed."""
    return values if out_axis == 1 else values.T


def _f32(x) -> np.ndarray:
    return np.asarray(jax.device_get(x)).astype(np.float32)


def stack(params, adapters: Mapping[str, Adapter] | Sequence[Adapter]) -> MixedAdapters:
    """Checks every adapter against ``params`` (family, shapes, fingerprint) and stacks them in order.

    ``adapters`` maps names to adapters (a sequence is named by position). Raises ValueError for adapters
    of different families or bases, random entries, or trained leaves that are not Dense/Conv1D kernels or
    biases.
    """
    if not isinstance(adapters, Mapping):
        adapters = {str(i): a for i, a in enumerate(adapters)}
    if not adapters:
        raise ValueError("stack needs at least one adapter")
    names = tuple(adapters)
    families = {name: a.family for name, a in adapters.items()}
    if len(set(families.values())) > 1:
        listed = ", ".join(f"{n}: {f}" for n, f in families.items())
        raise ValueError(f"adapters of different families cannot share a batch ({listed}); one base model per batch")
    for name, adapter in adapters.items():
        if adapter.config["method"] == "rocoft" and adapter.mode not in ("row", "column"):
            raise ValueError(
                f"adapter {name} trains random entries, which have no row or column form; merge it "
                "(rocoft_jax.adapters.merge_adapter) and run it on its own"
            )
    adapters = {name: a if a.source else dataclasses.replace(a, source=name) for name, a in adapters.items()}
    masks = {name: check_base(adapter, params, head_shapes=False) for name, adapter in adapters.items()}
    flat = tree_lib.flatten(params)
    layers: dict[str, dict[str, Any]] = {}
    for name, adapter in adapters.items():
        for path, spec in masks[name].slices.items():
            module = path[: -len("/kernel")]
            kind = "rows" if spec.axis == spec.out_axis else "columns"
            layers.setdefault(module, {"out_axis": spec.out_axis})[kind] = True
        for path in adapter.trained:
            module, leaf = path.rsplit("/", 1)
            if leaf not in ("kernel", "bias"):
                raise ValueError(
                    f"adapter {name} trains {path}; mixed batches take trained kernels and biases of Dense "
                    "layers only: merge this adapter and run it on its own"
                )
            layers.setdefault(module, {})[leaf] = True
    family = next(iter(families.values()))
    out_axis = families_lib.get_family(family).out_axis if family else 1
    plan, arrays, num_outputs = [], {}, None
    for module, what in sorted(layers.items()):
        if what.get("kernel") and (what.get("rows") or what.get("columns")):
            raise ValueError(f"{module} is sliced by one adapter and trained in full by another; stack cannot mix them")
        layer = LayerPlan(
            tuple(module.split("/")),
            what.get("out_axis", out_axis),  # a layer with whole leaves only has the family's layout
            bool(what.get("rows")),
            bool(what.get("columns")),
            bool(what.get("kernel")),
            bool(what.get("kernel") or what.get("bias")),
            int(flat[module + "/kernel"].shape[what.get("out_axis", out_axis)]) if module + "/kernel" in flat else 0,
        )
        entry, sizes = _stack_layer(layer, module, adapters, masks, flat)
        if sizes is not None and len(set(sizes)) > 1:
            if num_outputs is not None:
                raise ValueError(f"adapters' trained layers differ in output size at {module} and another layer")
            num_outputs = sizes
        plan.append(layer)
        arrays[module] = entry
    return MixedAdapters(names, family, tuple(plan), arrays, num_outputs)


def _stack_layer(layer: LayerPlan, module: str, adapters, masks, flat):
    """``(arrays, output sizes)`` of one layer."""
    n = len(adapters)
    kernel_leaf = flat[module + "/kernel"]  # stays on its device: a 7B model's kernels would not fit a host copy
    d_in = kernel_leaf.shape[1 - layer.out_axis]
    entry: dict[str, jax.Array] = {}
    sizes = None
    if layer.rows or layer.columns:
        slices = []
        for name, adapter in adapters.items():
            spec = masks[name].slices.get(module + "/kernel")
            value = None if spec is None else _canonical(np.asarray(adapter.slices[module + "/kernel"]), layer.out_axis)
            slices.append((spec, value))
        if layer.rows:
            width = max(len(s.indices) for s, _ in slices if s is not None and s.axis == s.out_axis)
            values = np.zeros((d_in, n, width), np.float32)
            slot = np.full((n, layer.d_out), -1, np.int32)
            for i, (spec, value) in enumerate(slices):
                if spec is not None and spec.axis == spec.out_axis:
                    k = len(spec.indices)
                    values[:, i, :k] = value
                    slot[i, np.asarray(spec.indices)] = np.arange(k)
            # Slices in the kernel's dtype, as the merged kernel holds them.
            flat_values = jnp.asarray(values.reshape(d_in, n * width)).astype(kernel_leaf.dtype)
            entry.update(row_values=flat_values, row_slot=jnp.asarray(slot))
        if layer.columns:
            width = max(len(s.indices) for s, _ in slices if s is not None and s.axis != s.out_axis)
            index = np.zeros((n, width), np.int32)
            delta = np.zeros((n, width, kernel_leaf.shape[layer.out_axis]), np.float32)
            for i, (spec, value) in enumerate(slices):
                if spec is not None and spec.axis != spec.out_axis:
                    idx = np.asarray(spec.indices)
                    index[i, : len(idx)] = idx
                    merged = _f32(jnp.asarray(value).astype(kernel_leaf.dtype))
                    base_rows = _canonical(_f32(jnp.take(kernel_leaf, idx, axis=1 - layer.out_axis)), layer.out_axis)
                    delta[i, : len(idx)] = merged - base_rows  # padding adds zero
            entry.update(col_index=jnp.asarray(index), col_delta=jnp.asarray(delta))
    if layer.kernel or layer.bias:
        kernels, biases = [], []
        for adapter in adapters.values():
            kernel = adapter.trained.get(module + "/kernel")
            kernel = _canonical(_f32(kernel_leaf) if kernel is None else np.asarray(kernel), layer.out_axis)
            bias = adapter.trained.get(module + "/bias", flat.get(module + "/bias"))
            bias = np.zeros(kernel.shape[1], np.float32) if bias is None else _f32(bias)
            if kernel.shape[0] != d_in or bias.shape != (kernel.shape[1],):
                raise ValueError(f"adapters' trained {module} does not take the base's {d_in} inputs")
            kernels.append(kernel)
            biases.append(bias)
        sizes = tuple(k.shape[1] for k in kernels)
        width = max(sizes)
        if layer.kernel:
            stacked = np.zeros((n, d_in, width), np.float32)
            for i, k in enumerate(kernels):
                stacked[i, :, : k.shape[1]] = k
            entry["kernel"] = jnp.asarray(stacked)
        elif len(set(sizes)) > 1:
            raise ValueError(f"adapters' trained biases of {module} differ in size")
        stacked = np.zeros((n, width), np.float32)
        for i, b in enumerate(biases):
            stacked[i, : b.shape[0]] = b
        entry["bias"] = jnp.asarray(stacked)
    return entry, sizes


_UNROLL = 8  # up to this many slice rows or columns per layer, corrections are unrolled elementwise ops


def _broadcast(values, ndim: int):
    """(B, last) per-row values broadcast over the middle axes of a (B, ..., last) activation."""
    return values.reshape(values.shape[:1] + (1,) * (ndim - 2) + values.shape[1:])


def per_row(layer: LayerPlan, arrays, ids) -> dict[str, jax.Array]:
    """One layer's stacked arrays gathered for each batch row (``ids``: (B,) adapter per row).

    Done once per call, outside any decoding loop, so each generated token reads only its rows' values.
    Rows get ``row_slot`` (B, d_out): the slice column feeding each output unit, or -1 for the base's (the
    selected outputs are then elementwise selects that XLA fuses into the layer's bias add, not a scatter
    pass over the whole output), and ``row_columns`` (B, R): where the row's slice outputs sit among
    every adapter's.
    """
    out = {}
    if layer.rows:
        width = arrays["row_values"].shape[1] // arrays["row_slot"].shape[0]
        out["row_slot"] = arrays["row_slot"][ids]
        out["row_values"] = arrays["row_values"]
        out["row_columns"] = ids[:, None] * width + jnp.arange(width, dtype=jnp.int32)[None, :]
    if layer.columns:
        out["col_index"], out["col_delta"] = arrays["col_index"][ids], arrays["col_delta"][ids]
    if layer.kernel:
        out["kernel"] = arrays["kernel"]  # every adapter's kernel: each row keeps its own output below
        out["ids"] = ids
    if layer.bias:
        out["bias"] = arrays["bias"][ids]
    return out


def _mixed_call(module, x, layer: LayerPlan, rows: dict[str, jax.Array]):
    """One layer for a batch whose row b runs its own adapter (``rows``: `per_row`'s arrays)."""
    precision = module.precision
    if layer.kernel:  # every adapter's kernel on this small input (a head), then each row's own
        x, kernel = promote_dtype(x, rows["kernel"], dtype=module.dtype)
        every = jnp.einsum("...i,nio->...no", x, kernel, precision=precision)
        where = rows["ids"].reshape(rows["ids"].shape + (1,) * (every.ndim - 1))
        y = jnp.take_along_axis(every, where, axis=-2)[..., 0, :]
    else:
        x, kernel = promote_dtype(x, module.get_variable("params", "kernel"), dtype=module.dtype)
        in_axis = 1 - layer.out_axis
        y = lax.dot_general(x, kernel, (((x.ndim - 1,), (in_axis,)), ((), ())), precision=precision)
        if layer.rows:
            every = jnp.einsum("...i,ir->...r", x, rows["row_values"].astype(x.dtype), precision=precision)
            new = jnp.take_along_axis(every, _broadcast(rows["row_columns"], every.ndim), axis=-1)  # (B, ..., R)
            slot = _broadcast(rows["row_slot"], y.ndim)
            if new.shape[-1] <= _UNROLL:  # R selects: elementwise, fused with the layer's bias add
                for r in range(new.shape[-1]):
                    y = jnp.where(slot == r, new[..., r : r + 1], y)
            else:
                picked = jnp.take_along_axis(new, jnp.broadcast_to(jnp.maximum(slot, 0), y.shape), axis=-1)
                y = jnp.where(slot >= 0, picked, y)
        if layer.columns:
            index = rows["col_index"]
            picked = jnp.take_along_axis(x, _broadcast(index, x.ndim), axis=-1)  # (B, ..., C)
            delta = rows["col_delta"].astype(x.dtype)
            if index.shape[1] <= _UNROLL:
                # A rank-C correction as C broadcast multiply-adds: one elementwise fusion with the output,
                # not a batched matmul whose (B, ..., d_out) result takes its own pass over memory.
                for c in range(index.shape[1]):
                    y = y + picked[..., c : c + 1] * _broadcast(delta[:, c], y.ndim)
            else:
                y = y + jnp.einsum("b...c,bco->b...o", picked, delta, precision=precision)
    if layer.bias:
        return y + _broadcast(rows["bias"], y.ndim).astype(y.dtype)
    if module.has_variable("params", "bias"):
        return y + jnp.asarray(module.get_variable("params", "bias"), y.dtype)
    return y


def mixed_layers(plan: Sequence[LayerPlan], arrays, adapter_ids):
    """Context in which the planned layers run per row: row b with adapter ``adapter_ids[b]``.

    Use it inside your own jitted function with ``mixed.plan`` and ``mixed.arrays`` (passed as an argument),
    calling the model on the base params. Each row's values are gathered on entry (`per_row`).
    """
    calls = {}
    for layer in plan:
        rows = per_row(layer, arrays["/".join(layer.path)], adapter_ids)
        calls[layer.path] = functools.partial(_layer_call, layer=layer, rows=rows)
    return intercept_kernels(calls)


def _layer_call(module, x, original, *, layer, rows):
    return _mixed_call(module, x, layer, rows)


def _check_ids(mixed: MixedAdapters, adapter_ids, batch: int) -> jax.Array:
    ids = np.asarray(adapter_ids)
    if ids.shape != (batch,) or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"adapter_ids must be {batch} integers, one per row; got shape {ids.shape}")
    if ids.size and not 0 <= ids.min() <= ids.max() < len(mixed.names):
        raise ValueError(f"adapter_ids must lie in [0, {len(mixed.names)}); got {ids.min()}..{ids.max()}")
    return jnp.asarray(ids, jnp.int32)


@functools.lru_cache(maxsize=16)
def _logits_program(model, plan):
    def run(arrays, params, inputs, ids):
        with mixed_layers(plan, arrays, ids):
            out = model(**inputs, params=params)
        return out.logits

    return jax.jit(run)


def logits(model, params, mixed: MixedAdapters, inputs: Mapping[str, Any], adapter_ids) -> jax.Array:
    """The model's logits with row b run by adapter ``adapter_ids[b]``; ``params`` are the base params.

    A head whose size differs between adapters comes zero-padded: keep ``[:mixed.num_outputs[id]]``.
    """
    inputs = {k: jnp.asarray(v) for k, v in inputs.items()}
    ids = _check_ids(mixed, adapter_ids, next(iter(inputs.values())).shape[0])
    return _logits_program(model, mixed.plan)(mixed.arrays, params, inputs, ids)


@functools.lru_cache(maxsize=16)
def _generate_program(model, plan, max_new_tokens: int, eos_token_id, pad_token_id):
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        num_beams=1,
        do_sample=False,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )

    def run(arrays, params, input_ids, attention_mask, ids):
        with mixed_layers(plan, arrays, ids):
            out = model.generate(input_ids, generation_config=config, attention_mask=attention_mask, params=params)
        return out.sequences[:, input_ids.shape[1] :]

    return jax.jit(run)


def generate(
    model,
    params,
    mixed: MixedAdapters,
    input_ids,
    attention_mask,
    adapter_ids,
    *,
    max_new_tokens: int,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> jax.Array:
    """Greedy continuations (B, max_new_tokens) of left-padded prompts, row b by adapter ``adapter_ids[b]``.

    Runs HF Flax ``generate`` with its KV cache on the base params; after EOS a row holds ``pad_token_id``.
    """
    input_ids = jnp.asarray(input_ids)
    ids = _check_ids(mixed, adapter_ids, input_ids.shape[0])
    program = _generate_program(model, mixed.plan, int(max_new_tokens), eos_token_id, pad_token_id)
    return program(mixed.arrays, params, input_ids, jnp.asarray(attention_mask), ids)
