"""Parameter trees addressed by "/"-joined paths, e.g. ``roberta/encoder/layer/0/attention/self/query/kernel``.

Every module of the library names leaves this way: masks, slices, sharding
rules and checkpoints all key on these strings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from flax import traverse_util


def path_str(keypath: Sequence[Any]) -> str:
    """Joins a jax key path or a tuple of names with "/"."""
    parts = []
    for k in keypath:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                k = getattr(k, attr)
                break
        parts.append(str(k))
    return "/".join(parts)


def flat_paths(params) -> dict[str, Any]:
    """Maps each leaf's "/"-joined path to the leaf, in tree order."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return {path_str(p): leaf for p, leaf in leaves}


def flatten(tree) -> dict[str, Any]:
    """Flattens a nested dict (or FrozenDict) to "/"-joined keys."""
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def unflatten(flat: dict[str, Any]) -> dict:
    """Inverse of `flatten`: nested plain dicts from "/"-joined keys."""
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
