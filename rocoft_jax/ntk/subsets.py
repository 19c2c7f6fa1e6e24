"""Parameter subsets S of the empirical NTK: which leaves are differentiated, and how f runs from them.

"full" is every parameter; "row<r>"/"column<r>" the RoCoFT slices with the same selection as
`mask_params` (nothing else trained), routed through the sliced matmul so a VJP yields slice
gradients only; "lora<r>" LoRA adapters at peft's init on the same kernels; "bitfit" the biases.
Each subset carries two equal functions: one for reverse mode, and one forward mode accepts
(custom VJPs have no JVP, so it writes the slices into their kernels).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from rocoft_jax import families as families_lib
from rocoft_jax import lora as lora_lib
from rocoft_jax import tree as tree_lib
from rocoft_jax.mask import ROCOFT, TRAIN, RoCoFTMask, mask_leaves, mask_params
from rocoft_jax.sliced import sliced_kernels
from rocoft_jax.slices import merge, split

SUBSET_NAMES = "full, bitfit, row<r>, column<r>, lora<r>"
_SUBSET = re.compile(r"^(full|bitfit|(row|column|lora)([1-9]\d*))$")


def parse_subset(name: str) -> tuple[str, int]:
    """``"row3"`` -> ``("row", 3)``; ``"full"`` -> ``("full", 0)``."""
    match = _SUBSET.match(name)
    if not match:
        raise ValueError(f"unknown parameter subset {name!r}; choose from {SUBSET_NAMES} (r >= 1)")
    return (match.group(1), 0) if match.group(2) is None else (match.group(2), int(match.group(3)))


@dataclasses.dataclass(frozen=True, eq=False)
class Subset:
    """A parameter subset S: the leaves differentiated (``theta``) and how f runs from them.

    ``apply(theta, consts, batch)`` returns the ``(B, C)`` outputs; ``apply_jvp`` is the same
    function in a form forward-mode autodiff accepts. Both are hashable and compare equal
    across rebuilds of the same subset, so compiled programs are reused (e.g. across seeds).
    """

    name: str
    theta: Any
    consts: Any
    apply: Callable
    apply_jvp: Callable

    @property
    def num_params(self) -> int:
        return sum(int(np.size(x)) for x in jax.tree.leaves(self.theta))


def _overlay(base, top):
    """``base`` with the leaves of ``top`` added or replaced (nested dicts)."""
    flat = tree_lib.flatten(base) if base else {}
    flat.update(tree_lib.flatten(top) if top else {})
    return tree_lib.unflatten(flat)


@dataclasses.dataclass(frozen=True)
class _Plain:
    """full and bitfit: the differentiated leaves sit in the params themselves."""

    forward: Callable

    def __call__(self, theta, consts, batch):
        return self.forward(_overlay(consts, theta), batch)


@dataclasses.dataclass(frozen=True)
class _Sliced:
    """row/column: slices through the sliced matmul, or written into the kernels (``merged``)."""

    forward: Callable
    key: tuple
    merged: bool
    mask: RoCoFTMask = dataclasses.field(compare=False, hash=False)

    def __call__(self, theta, consts, batch):
        if self.merged:
            return self.forward(merge({ROCOFT: theta}, consts, self.mask), batch)
        with sliced_kernels(theta, self.mask):
            return self.forward(consts, batch)


@dataclasses.dataclass(frozen=True)
class _Lora:
    forward: Callable
    alpha: float
    rank: int

    def __call__(self, theta, consts, batch):
        with lora_lib.lora_kernels(theta, self.alpha, self.rank):
            return self.forward(consts, batch)


@dataclasses.dataclass(frozen=True)
class _Restricted:
    """``apply`` of a subset with only ``paths`` differentiated; the other leaves ride in consts."""

    apply: Callable
    paths: tuple[str, ...]

    def __call__(self, theta, consts, batch):
        rest, base = consts
        return self.apply(_overlay(rest, theta), base, batch)


def make_subset(
    name: str,
    params,
    forward: Callable,
    *,
    seed: int = 0,
    targets=None,
    strategy: str = "first",
    lora_alpha: float | None = None,
    family: str | None = None,
) -> Subset:
    """The subset ``name`` (see `parse_subset`) of ``params`` for ``forward(params, batch) -> (B, C)``.

    Rows/columns come from `mask_params` (``targets``, ``strategy``, ``seed``, ``family`` as
    there) with nothing else trained; LoRA adapters sit on the same kernels at peft's init,
    seeded by ``seed``, with ``lora_alpha`` (default ``2 * r``).
    """
    kind, rank = parse_subset(name)
    if kind == "full":
        return Subset(name, params, {}, _Plain(forward), _Plain(forward))
    if kind == "bitfit":
        mask = mask_leaves(params, (r"(^|/)bias$",), name="bitfit")
        trainable, frozen = split(params, mask, dtype=None)
        return Subset(name, trainable[TRAIN], frozen, _Plain(forward), _Plain(forward))
    mask = mask_params(
        params,
        rank if kind != "lora" else 1,
        kind if kind != "lora" else "row",
        targets=targets,
        strategy=strategy if kind != "lora" else "first",
        seed=seed,
        train=(),
        family=family,
    )
    if kind == "lora":
        out_axis = families_lib.get_family(mask.family).out_axis if mask.family else 1
        theta = lora_lib.init_lora(params, list(mask.slices), rank, jax.random.PRNGKey(seed), out_axis)
        apply = _Lora(forward, float(lora_alpha if lora_alpha is not None else 2 * rank), rank)
        return Subset(name, theta, params, apply, apply)
    trainable, frozen = split(params, mask, dtype=None)
    key = (kind, rank, tuple((p, s.axis, tuple(s.indices.tolist())) for p, s in mask.slices.items()))
    return Subset(
        name, trainable[ROCOFT], frozen, _Sliced(forward, key, False, mask), _Sliced(forward, key, True, mask)
    )


def restrict(subset: Subset, paths) -> Subset:
    """``subset`` with only the leaves at ``paths`` ("/"-joined) differentiated.

    Kernels of disjoint restrictions add up to the kernel of their union.
    """
    flat = tree_lib.flatten(subset.theta)
    chosen = [p for p in flat if p in set(paths)]
    unknown = sorted(set(paths) - set(flat))
    if unknown:
        raise ValueError(f"{unknown[0]!r} is not a leaf of subset {subset.name!r}")
    rest = tree_lib.unflatten({p: v for p, v in flat.items() if p not in set(chosen)})
    theta = tree_lib.unflatten({p: flat[p] for p in chosen})
    return Subset(
        f"{subset.name}[{len(chosen)} leaves]",
        theta,
        (rest, subset.consts),
        _Restricted(subset.apply, tuple(chosen)),
        _Restricted(subset.apply_jvp, tuple(chosen)),
    )
