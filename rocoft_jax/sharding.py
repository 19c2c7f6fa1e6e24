"""Device meshes and partition rules for the frozen weights, the trainable tree and its optimizer state.

A mesh has three axes: ``data`` (pure data parallelism), ``fsdp`` (data
parallelism whose weights are also split across devices) and ``tensor``
(attention heads and MLP width split across devices). Axis types are Auto:
with Explicit axes HF Flax models fail at the embedding gather.

Frozen weights follow ordered ``(regex, PartitionSpec)`` rules over
"/"-joined paths, one rule set per family, derived from its record in
`rocoft_jax.families`; a path no rule matches is an error.
A dimension that its mesh axes do not divide is left unsplit on that axis.

RoCoFT slices, LoRA adapters and their optimizer state are replicated. They
are tiny (r x d per kernel), so replication costs little memory, keeps the
optimizer update free of collectives, and their gradients need one all-reduce
over the batch axes either way. Leaves trained in full (the head, or every
leaf under ``--method full``) follow the same rules as frozen weights, so full
fine-tuning still shards its weights and Adam state.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rocoft_jax import families
from rocoft_jax import tree as tree_lib

AXES = ("data", "fsdp", "tensor")
BATCH = P(("data", "fsdp"))

# Kernels are (d_in, d_out). "Column-parallel" layers split their output
# (heads, MLP width) over tensor; "row-parallel" ones split their input.
_COL = P("fsdp", "tensor")
_ROW = P("tensor", "fsdp")
_REPLICATED_TRAINED = ((r"(^|/)(rocoft|lora)/", P()),)
_COMMON_TAIL = (
    (r"(LayerNorm|layer_norm|layernorm|norm|ln_\w+|_ln)/(scale|bias)$", P()),
    (r"(^|/)(classifier|pooler|pre_classifier|classification_head|score|qa_outputs)/", P()),
)

_COL_BIAS = P("tensor")
# (B, T, heads, head_dim) activations entering attention: batch over data and fsdp, heads over tensor.
_HEADS = P(("data", "fsdp"), None, "tensor")


def layout_rules(layout: families.Sharding) -> tuple[tuple[str, P], ...]:
    """A family's ordered ``(regex, PartitionSpec)`` rules: ``layout.rules`` when given, else the
    Megatron layout, where ``layout.col`` layers split their output and ``layout.row`` layers their input."""
    if layout.rules:
        return layout.rules
    col, row = layout.col, layout.row
    return (
        (rf"({col})/kernel$", _COL),
        (rf"({col})/bias$", _COL_BIAS),
        (rf"({row})/kernel$", _ROW),
        (rf"({row})/bias$", P()),
        (rf"({layout.embeddings})/embedding$", P(None, "fsdp")),
        (r"(embed_positions|position_embeddings|wpe)/embedding$", P()),
        *layout.extra,
    )


# One rule set per family, from its record (`rocoft_jax.families`).
RULES: dict[str, tuple[tuple[str, P], ...]] = {f.name: layout_rules(f.sharding) for f in families.FAMILIES}


def parse_mesh(spec: str | None, num_devices: int) -> dict[str, int]:
    """``"data=2,fsdp=2,tensor=2"`` -> axis sizes; unnamed axes are 1, ``data`` takes what is left."""
    sizes = {"data": 0, "fsdp": 1, "tensor": 1}
    for part in filter(None, (spec or "").split(",")):
        name, _, value = part.partition("=")
        if name not in sizes or not value.isdigit() or int(value) < 1:
            raise ValueError(f"bad mesh entry {part!r}; write e.g. data=2,fsdp=2,tensor=2 with axes {AXES}")
        sizes[name] = int(value)
    rest = sizes["fsdp"] * sizes["tensor"]
    if sizes["data"] == 0:
        if num_devices % rest:
            raise ValueError(f"fsdp*tensor={rest} does not divide the {num_devices} devices")
        sizes["data"] = num_devices // rest
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(
            f"mesh {sizes} has {math.prod(sizes.values())} devices, but {num_devices} are available; "
            "make data*fsdp*tensor equal the device count"
        )
    return sizes


def make_mesh(sizes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = tuple(sizes[a] for a in AXES)
    return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=(AxisType.Auto,) * len(AXES))


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """``spec`` with every mesh axis that does not divide its dimension dropped."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept = tuple(a for a in names if dim % mesh.shape[a] == 0)
        kept = tuple(a for i, a in enumerate(kept) if dim % math.prod(mesh.shape[b] for b in kept[: i + 1]) == 0)
        fitted.append(kept[0] if len(kept) == 1 else (kept or None))
    return P(*fitted)


def heads_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """Where (B, T, heads, head_dim) queries, keys and values live on ``mesh``.

    Give queries the layout fitted to the keys' shape: GQA keys have fewer heads,
    and cuDNN's attention needs all three laid out alike.
    """
    return NamedSharding(mesh, _fit(_HEADS, shape, mesh))


def activation_spec(mesh: Mesh, shape: tuple[int, ...]) -> P:
    """Where (B, T, features) activations live: batch over data and fsdp, features over tensor.

    The layout of a column-parallel layer's output, for kernels that run per shard.
    """
    return _fit(P(("data", "fsdp"), *(None,) * (len(shape) - 2), "tensor"), shape, mesh)


def partition_specs(tree, family: str | None, mesh: Mesh):
    """A PartitionSpec per leaf of ``tree`` (params, trainable tree or optimizer state).

    Optimizer state paths end with their parameter's path, so the same rules
    place Adam's moments next to their weights.
    """
    if family not in RULES and mesh.shape["fsdp"] * mesh.shape["tensor"] > 1:
        raise ValueError(
            f"no partition rules for family {family!r} (rules exist for {', '.join(RULES)}); "
            "use a data-only mesh, or give the family a Sharding in rocoft_jax.families"
        )
    rules = [(re.compile(rx), spec) for rx, spec in _REPLICATED_TRAINED + RULES.get(family or "", ()) + _COMMON_TAIL]
    pure_data = mesh.shape["fsdp"] * mesh.shape["tensor"] == 1

    def spec_of(keypath, leaf):
        path, shape = tree_lib.path_str(keypath), tuple(np.shape(leaf))
        for rx, spec in rules:
            if rx.search(path):
                return _fit(spec, shape, mesh)
        if len(shape) <= 1 or pure_data:
            return P()  # biases, scalars and step counters are small: replicate
        raise ValueError(
            f"no partition rule matches {path!r} (shape {shape}) for family {family!r}; "
            f"add a (regex, PartitionSpec) rule to the {family!r} record's Sharding in rocoft_jax.families"
        )

    return jax.tree_util.tree_map_with_path(spec_of, tree)


def shardings(tree, family: str | None, mesh: Mesh):
    """NamedShardings for ``tree`` (see `partition_specs`)."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), partition_specs(tree, family, mesh))
