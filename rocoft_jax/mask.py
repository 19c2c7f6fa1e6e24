"""`mask_params`: label every parameter "rocoft", "train" or "frozen".

The result carries the chosen indices of each RoCoFT kernel, so the labels plug
into `optax.multi_transform` while `rocoft_jax.masked`, `split` and the sliced
forward pass know exactly which rows or columns are live.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from rocoft_jax import families as families_lib
from rocoft_jax import selection
from rocoft_jax import tree as tree_lib

MODES = ("row", "column", "random")
ROCOFT, TRAIN, FROZEN = "rocoft", "train", "frozen"


@dataclasses.dataclass(frozen=True)
class KernelSlice:
    """The trained part of one kernel.

    ``axis`` is the kernel axis that ``indices`` run along (None: flat entry
    indices, for mode "random"); ``out_axis`` is the kernel's output axis.
    """

    shape: tuple[int, ...]
    axis: int | None
    out_axis: int
    indices: np.ndarray

    def __post_init__(self):
        # The slice's gathers clip instead of filling out-of-bounds rows (`take_slice`): check here.
        bound = math.prod(self.shape) if self.axis is None else self.shape[self.axis]
        if self.indices.size and not 0 <= int(self.indices.min()) <= int(self.indices.max()) < bound:
            raise ValueError(
                f"selected indices {int(self.indices.min())}..{int(self.indices.max())} do not fit a "
                f"kernel of shape {self.shape}; was the selection made for a different base model?"
            )

    @property
    def size(self) -> int:
        if self.axis is None:
            return int(self.indices.size)
        return int(self.indices.size * self.shape[1 - self.axis])

    @property
    def slice_shape(self) -> tuple[int, ...]:
        if self.axis is None:
            return (int(self.indices.size),)
        shape = list(self.shape)
        shape[self.axis] = int(self.indices.size)
        return tuple(shape)


@dataclasses.dataclass(frozen=True, eq=False)
class RoCoFTMask:
    """What `mask_params` chose. ``labels`` mirrors the params pytree."""

    labels: Any
    slices: Mapping[str, KernelSlice]
    label_of: Mapping[str, str]
    mode: str
    rank: float
    strategy: str
    family: str | None
    num_total: int
    num_trainable: int
    seed: int = 0

    @property
    def indices(self) -> dict[str, np.ndarray]:
        """Kernel path -> sorted int32 indices of its trained rows/columns (flat entries in mode "random")."""
        return {path: s.indices for path, s in self.slices.items()}

    def summary(self) -> str:
        pct = 100.0 * self.num_trainable / max(self.num_total, 1)
        return f"trainable params: {self.num_trainable:,} || all params: {self.num_total:,} || trainable%: {pct:.4f}"

    def print_trainable_parameters(self) -> None:
        print(self.summary())

    def __str__(self) -> str:
        return (
            f"RoCoFTMask(mode={self.mode}, rank={self.rank}, strategy={self.strategy}, "
            f"kernels={len(self.slices)}; {self.summary()})"
        )

    def describe(self) -> dict[str, Any]:
        """JSON-ready record of the selection, for checkpoints and exports.

        Mode "random" records the seed and kernel order instead of its
        (possibly millions of) entry indices; `mask_from_description` redraws them.
        """
        random = self.mode == "random"
        return {
            "mode": self.mode,
            "rank": self.rank,
            "strategy": self.strategy,
            "family": self.family,
            "seed": self.seed,
            "num_trainable": self.num_trainable,
            "train": sorted(p for p, lab in self.label_of.items() if lab == TRAIN),
            "kernels": list(self.slices),
            "indices": None if random else {p: s.indices.tolist() for p, s in self.slices.items()},
        }


def _build(params, leaves: dict[str, Any], slices: dict[str, KernelSlice], full, **record) -> RoCoFTMask:
    """The mask of ``params`` with ``slices`` labelled "rocoft" and the paths in ``full`` "train"."""
    full = set(full)
    label_of = {p: ROCOFT if p in slices else TRAIN if p in full else FROZEN for p in leaves}
    labels = jax.tree_util.tree_map_with_path(lambda kp, _: label_of[tree_lib.path_str(kp)], params)
    return RoCoFTMask(
        labels=labels,
        slices=slices,
        label_of=label_of,
        num_total=sum(math.prod(np.shape(v)) for v in leaves.values()),
        num_trainable=sum(s.size for s in slices.values()) + sum(math.prod(np.shape(leaves[p])) for p in full),
        **record,
    )


def _check_rank(mode: str, rank, kernels: dict[str, Any], axis_of: dict[str, int]) -> None:
    if mode == "random":
        if not isinstance(rank, (int, float)) or not 0.0 < float(rank) <= 1.0:
            raise ValueError(f"mode 'random' takes rank=p, a probability in (0, 1]; got {rank!r}")
        return
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"rank must be a positive integer number of {mode}s; got {rank!r}")
    for path, kernel in kernels.items():
        dim = kernel.shape[axis_of[path]]
        if rank > dim:
            raise ValueError(
                f"rank {rank} exceeds the {dim} {mode}s of {path} (shape {tuple(kernel.shape)}); choose rank <= {dim}"
            )


def mask_params(
    params,
    rank,
    mode: str = "row",
    *,
    targets: Sequence[str] | None = None,
    strategy: str = "first",
    seed: int = 0,
    calibration: Mapping[str, Any] | None = None,
    train: Sequence[str] | None = None,
    train_bias: bool = False,
    family: str | None = None,
) -> RoCoFTMask:
    """Selects r rows (output units) or r columns (input features) of each target kernel.

    Args:
      params: any Flax params pytree (HF ``model.params``, dicts, FrozenDicts,
        concrete arrays or ``jax.ShapeDtypeStruct``).
      rank: rows/columns per kernel; for ``mode="random"`` the probability p.
      mode: "row" (paper row i = Flax ``kernel[:, i]``), "column" (paper column
        j = Flax ``kernel[j, :]``) or "random" (entries kept with probability p).
      targets: regexes over "/"-joined kernel paths; default: the family record's (`rocoft_jax.families`).
      strategy: "first", "random" (seeded), or Wanda "max", "min", "mixed".
      seed: seeds "random" strategy and mode.
      calibration: kernel path -> input-activation norms, for Wanda strategies
        (see `activation_norms`).
      train: regexes of leaves trained in full; default: the family's
        classification head. ``()`` trains only the slices.
      train_bias: also train in full the bias of every target layer.
      family: force a family from `families.FAMILIES` instead of detecting it.

    Returns:
      A `RoCoFTMask`; ``mask.labels`` feeds ``optax.multi_transform``.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
    if strategy not in selection.STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of: {', '.join(selection.STRATEGIES)}")
    if mode == "random" and strategy in selection.WANDA_STRATEGIES:
        raise ValueError(f"mode 'random' picks entries at random; strategy {strategy!r} needs mode 'row' or 'column'")

    leaves = tree_lib.flat_paths(params)
    if family is not None:
        fam = families_lib.get_family(family)
    elif targets is None:
        fam = families_lib.detect_family(leaves)
    else:  # explicit targets: the family only supplies the kernel layout and the default head
        try:
            fam = families_lib.detect_family(leaves)
        except ValueError:
            fam = None
    out_axis = fam.out_axis if fam else 1

    kernel_paths = [p for p, leaf in leaves.items() if len(np.shape(leaf)) == 2]
    target_patterns = tuple(targets) if targets is not None else fam.targets
    chosen = families_lib.match_paths(kernel_paths, target_patterns, "target", strict=targets is not None)
    if not chosen:
        raise ValueError(f"no kernel matches the targets {list(target_patterns)}")
    kernels = {p: leaves[p] for p in chosen}
    axis_of = {p: (out_axis if mode == "row" else 1 - out_axis) for p in kernels}
    _check_rank(mode, rank, kernels, axis_of)

    if strategy in selection.WANDA_STRATEGIES:
        absent = [p for p in kernels if calibration is None or p not in calibration]
        if absent:
            raise ValueError(
                f"strategy {strategy!r} scores rows/columns by input activations, but calibration= lacks "
                f"{absent[0]!r}; compute it with rocoft_jax.activation_norms(model, params, batches, kernel_paths)"
            )

    rng = np.random.default_rng(seed)
    slices: dict[str, KernelSlice] = {}
    for path, kernel in kernels.items():
        shape = tuple(int(d) for d in kernel.shape)
        if mode == "random":
            idx = selection.select_entries(shape, float(rank), rng)
            slices[path] = KernelSlice(shape, None, out_axis, idx)
            continue
        axis = axis_of[path]
        scores = None
        if strategy in selection.WANDA_STRATEGIES:
            scores = selection.wanda_scores(kernel, calibration[path], axis, out_axis)
        idx = selection.select_indices(shape[axis], int(rank), strategy, rng, scores)
        slices[path] = KernelSlice(shape, axis, out_axis, idx)

    rest = [p for p in leaves if p not in slices]
    head = fam.head if fam else ()
    full = families_lib.match_paths(
        rest, tuple(train) if train is not None else head, "train", strict=train is not None
    )
    if train_bias:  # layers without a bias (Llama) simply have none to train
        biases = tuple("^" + re.escape(p[: -len("kernel")]) + "bias$" for p in kernels)
        trained = set(full) | set(families_lib.match_paths(rest, biases, "bias", strict=False))
        full = [p for p in rest if p in trained]

    return _build(
        params,
        leaves,
        slices,
        full,
        mode=mode,
        rank=rank,
        strategy=strategy,
        family=fam.name if fam else None,
        seed=seed,
    )


def mask_leaves(params, train: Sequence[str], *, name: str = "full", strict: bool = True) -> RoCoFTMask:
    """Labels whole leaves only: "train" where a ``train`` regex matches, else "frozen".

    The baselines use it: full fine-tuning is ``train=(".*",)``, BitFit is the
    biases plus the head. ``name`` is recorded as the mask's mode. With
    ``strict``, a pattern that matches nothing is an error.
    """
    leaves = tree_lib.flat_paths(params)
    full = families_lib.match_paths(leaves, tuple(train), "train", strict=strict)
    return _build(params, leaves, {}, full, mode=name, rank=0, strategy="none", family=None)


def mask_from_description(params, description: Mapping[str, Any]) -> RoCoFTMask:
    """Rebuilds a mask from `RoCoFTMask.describe()`, reusing its saved indices.

    Export and restore use it, so Wanda or random selections need no
    recalibration and cannot drift.
    """
    leaves = tree_lib.flat_paths(params)
    family = description.get("family")
    out_axis = families_lib.get_family(family).out_axis if family else 1
    mode = description["mode"]
    rng = np.random.default_rng(description["seed"])
    slices = {}
    for path in description["kernels"]:
        if path not in leaves:
            raise ValueError(f"saved selection names {path!r}, which these params lack: a different base model")
        shape = tuple(int(d) for d in np.shape(leaves[path]))
        if mode == "random":
            slices[path] = KernelSlice(shape, None, out_axis, selection.select_entries(shape, description["rank"], rng))
        else:
            axis = out_axis if mode == "row" else 1 - out_axis
            slices[path] = KernelSlice(shape, axis, out_axis, np.asarray(description["indices"][path], np.int32))
    return _build(
        params,
        leaves,
        slices,
        description["train"],
        mode=mode,
        rank=description["rank"],
        strategy=description["strategy"],
        family=family,
        seed=description["seed"],
    )
