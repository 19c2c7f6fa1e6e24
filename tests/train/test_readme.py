"""The README's code is executed as written: users copy it."""

import re
from pathlib import Path

import jax
import numpy as np

README = Path(__file__).resolve().parents[2] / "README.md"


def python_blocks() -> list[str]:
    """The Python blocks of "In your own JAX code", which run offline as written (the adapter section's
    sketches need trained adapters and hub weights; tests/train/test_adapter_*.py run their equivalents)."""
    section = README.read_text().split("### In your own JAX code", 1)[1].split("\n### ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_snippets_run_and_train_only_the_slices():
    blocks = python_blocks()
    assert len(blocks) == 2
    namespace: dict = {}
    exec(blocks[0], namespace)  # masked() under optax.multi_transform on full params
    mask, before, after = namespace["mask"], namespace["model"].params, namespace["params"]
    for path, spec in mask.slices.items():
        keys = path.split("/")
        old, new = before, after
        for k in keys:
            old, new = old[k], new[k]
        changed = np.asarray(old != new)
        outside = np.ones(changed.shape, bool)
        outside[:, spec.indices] = False  # row mode: Flax kernel[:, i]
        assert not changed[outside].any(), path
        assert changed[~outside].any(), path
    exec(blocks[1], namespace)  # the efficient path
    grads, full = namespace["grads"], namespace["full_params"]
    query = grads["rocoft"]["roberta"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"]
    assert query.shape == (32, 3)
    assert jax.tree.structure(full) == jax.tree.structure(before)
