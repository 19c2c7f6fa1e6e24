"""rocoft_jax.ntk: the chunked empirical NTK against the explicit stacked Jacobian product.

The reference differentiates the *full* params with one ``jax.jacrev`` over all examples and
derives every subset's Jacobian from it independently of the library: slice gradients are the
selected rows/columns of the kernel gradients, LoRA's are ``s A^T dW`` (B's; A's are zero at
init), BitFit's the bias gradients.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_roberta

from rocoft_jax import ntk
from rocoft_jax import tree as tree_lib
from rocoft_jax.ntk import forwards as ntk_forwards


class MLP(nn.Module):
    outputs: int

    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Dense(8)(x))
        x = nn.tanh(nn.Dense(6)(x))
        return nn.Dense(self.outputs)(x)


MLP_TARGETS = (r"Dense_[01]/kernel$",)


@functools.cache
def mlp_setup(outputs: int, n: int = 5):
    model = MLP(outputs)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4)))["params"]
    x = {"x": np.random.default_rng(1).normal(size=(n, 4)).astype(np.float32)}

    def forward(p, batch):
        return ntk_forwards.class_outputs(model.apply({"params": p}, batch["x"]))

    return params, forward, x


@functools.cache
def roberta_setup(n: int = 5):
    model, params = tiny_roberta()
    rng = np.random.default_rng(2)
    ids = rng.integers(3, 96, (n, 7)).astype(np.int32)
    ids[:, 0], ids[:, -1] = 0, 2
    mask = np.ones_like(ids)
    ids[1, 5:], mask[1, 5:] = 1, 0  # one padded example

    def forward(p, batch):  # 3 labels: the block kernel
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], params=p).logits

    return params, forward, {"input_ids": ids, "attention_mask": mask}


@functools.cache
def full_jacobian(setup) -> dict:
    """Path -> (n, C, *leaf.shape): one jacrev of all outputs of all examples, stacked."""
    params, forward, x = setup()
    return tree_lib.flatten(jax.jit(jax.jacrev(lambda p: forward(p, x).reshape(ntk.num_examples(x), -1)))(params))


def reference_kernel(subset: ntk.Subset, full: dict) -> np.ndarray:
    """Explicit J J^T, with J of the subset derived from the full-params Jacobian."""
    kind, rank = ntk.parse_subset(subset.name)
    if kind == "full":
        rows = list(full.values())
    elif kind == "bitfit":
        rows = [g for p, g in full.items() if p.endswith("/bias")]
    elif kind in ("row", "column"):
        mask = subset.apply.mask
        # (n, C, d_in, d_out): paper row i is kernel[:, i], paper column j is kernel[j, :] (docs/design.md)
        axis = 3 if kind == "row" else 2
        rows = [jnp.take(full[p], s.indices, axis=axis) for p, s in mask.slices.items()]
    else:
        scale = subset.apply.alpha / subset.apply.rank
        adapters = tree_lib.flatten(subset.theta)
        rows = []
        for path in (p[: -len("/a")] for p in adapters if p.endswith("/a")):
            a, b = adapters[path + "/a"], adapters[path + "/b"]
            g = full[path + "/kernel"]  # (n, C, d_in, d_out)
            rows += [scale * jnp.einsum("ir,ncio->ncro", a, g), scale * jnp.einsum("ncio,ro->ncir", g, b)]
    j = np.concatenate([np.asarray(g, np.float64).reshape(g.shape[0] * g.shape[1], -1) for g in rows], axis=1)
    return j @ j.T


def assert_kernel_close(k, ref):
    assert k.shape == ref.shape
    np.testing.assert_allclose(k, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def mlp_binary():
    return mlp_setup(2)


def mlp_3class():
    return mlp_setup(3)


# (setup, subsets, targets, subsets also run in padded 2-example chunks and under a tight memory bound)
CASES = [
    ("mlp-binary", mlp_binary, ("full", "row1", "column2", "lora2", "bitfit"), MLP_TARGETS, ("full", "row1")),
    ("mlp-3class", mlp_3class, ("row2", "lora1"), MLP_TARGETS, ("lora1",)),
    ("roberta-3class", roberta_setup, ("full", "row1", "column1", "lora1", "bitfit"), None, ()),
]
SLOW_CASES = ("roberta-3class",)  # -m slow (CI time on 2 cores); the cross-kernel tests keep RoBERTa by default


@pytest.mark.parametrize(
    "setup, names, targets, chunked",
    [pytest.param(*c[1:], id=c[0], marks=[pytest.mark.slow] if c[0] in SLOW_CASES else []) for c in CASES],
)
def test_chunked_kernel_equals_the_stacked_jacobian_product(setup, names, targets, chunked):
    params, forward, x = setup()
    n = ntk.num_examples(x)
    for name in names:
        subset = ntk.make_subset(name, params, forward, targets=targets, seed=3)
        ref = reference_kernel(subset, full_jacobian(setup))
        c = ref.shape[0] // n
        assert ref.shape == (n * c, n * c) and np.abs(ref).max() > 0, name
        assert_kernel_close(ntk.kernel(subset, x), ref)  # one group, every example held
        if name in chunked:  # 2-example chunks (the last one padded), then a bound that forces groups and blocks
            assert_kernel_close(ntk.kernel(subset, x, chunk_size=2), ref)
            biggest = max(c * v.size * 4 for v in jax.tree.leaves(subset.theta))
            assert_kernel_close(ntk.kernel(subset, x, chunk_size=2, max_bytes=3 * biggest), ref)


def test_roberta_kernel_in_groups_and_blocks_under_a_tight_bound():
    """Embeddings too large to hold for all examples are done in blocks; the rest in groups."""
    params, forward, x = roberta_setup()
    full = ntk.make_subset("full", params, forward)
    paths = [
        "roberta/embeddings/word_embeddings/embedding",
        "roberta/encoder/layer/1/output/dense/kernel",
        "roberta/encoder/layer/1/output/dense/bias",
        "classifier/out_proj/bias",
    ]
    subset = ntk.restrict(full, paths)
    jac = full_jacobian(roberta_setup)
    rows = [np.asarray(jac[p], np.float64).reshape(15, -1) for p in paths]
    ref = sum(r @ r.T for r in rows)
    word = 3 * 96 * 32 * 4  # one example's gradient of the word embeddings, 3 outputs
    # 2-example chunks: all of x, 3 padded chunks = 6 examples held per group
    groups = ntk.plan_groups({p: 3 * np.size(tree_lib.flatten(params)[p]) * 4 for p in paths}, 6, 5 * word)
    assert [len(g) for g in groups] == [1, 3]  # 5 examples' embedding gradients fit, not 6: blocks
    assert_kernel_close(ntk.kernel(subset, x, chunk_size=2, max_bytes=5 * word), ref)


def test_small_memory_bound_splits_groups_and_blocks():
    params, forward, x = roberta_setup()
    subset = ntk.make_subset("full", params, forward)
    sizes = {p: 3 * v.size * 4 for p, v in tree_lib.flatten(params).items()}
    groups = ntk.plan_groups(sizes, 5 + 3, max(sizes.values()) * 4)
    assert len(groups) > 1 and sorted(sum(groups, [])) == sorted(sizes)  # a partition, in tree order
    assert sum(groups, []) == list(sizes)
    with pytest.raises(ValueError, match="raise max_bytes to at least"):
        ntk.kernel(subset, x, max_bytes=max(sizes.values()))


def test_group_kernels_add_up_to_the_kernel_of_their_union():
    params, forward, x = roberta_setup()
    subset = ntk.make_subset("full", params, forward)
    paths = list(tree_lib.flatten(params))
    parts = [paths[0::2], paths[1::2]]  # two interleaved, disjoint groups
    kernels = [ntk.kernel(ntk.restrict(subset, part), x) for part in parts]
    full = ntk.kernel(subset, x)
    np.testing.assert_allclose(kernels[0] + kernels[1], full, rtol=0, atol=1e-5 * np.abs(full).max())
    assert all(np.abs(k).max() > 1e-3 * np.abs(full).max() for k in kernels)  # each group contributes
    with pytest.raises(ValueError, match="is not a leaf"):
        ntk.restrict(subset, ["roberta/nope"])


@pytest.mark.parametrize("name", ["full", pytest.param("row1", marks=pytest.mark.slow)])  # row1: -m slow
def test_cross_kernels_and_predictions(name):
    """The cross kernel is a block of the joint one; both prediction routes give K(new, x) @ alpha."""
    params, forward, x = roberta_setup(n=6)
    train = {k: v[:4] for k, v in x.items()}
    new = {k: v[4:] for k, v in x.items()}
    subset = ntk.make_subset(name, params, forward, seed=1)
    joint = ntk.kernel(subset, x, chunk_size=3)  # every call here shares its compiled 3-example gradients
    cross = ntk.kernel(subset, new, train, chunk_size=3)
    np.testing.assert_allclose(cross, joint[4 * 3 :, : 4 * 3], rtol=0, atol=1e-5 * np.abs(joint).max())
    alpha = np.random.default_rng(0).normal(size=(4, 3))
    expected = (cross @ alpha.reshape(-1)).reshape(2, 3)
    tol = dict(rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    # VJP then JVP, never forming the cross kernel (through merged slices for row1)
    np.testing.assert_allclose(ntk.predict(subset, train, alpha, new, chunk_size=3, explicit_limit=0), expected, **tol)
    # the explicit cross kernel, for small subsets
    np.testing.assert_allclose(
        ntk.predict(subset, train, alpha, new, chunk_size=3, explicit_limit=10**9), expected, **tol
    )
    np.testing.assert_allclose(ntk.outputs(subset, new), np.asarray(forward(params, new)), rtol=1e-5, atol=1e-6)


def test_subsets_match_the_training_selection_and_reject_bad_names():
    params, forward, _ = roberta_setup()
    row = ntk.make_subset("row1", params, forward)
    # 2 layers x 6 kernels, one row (output unit) of each: d_in values per kernel
    expected = sum(s.shape[0] for s in row.apply.mask.slices.values())
    assert row.num_params == expected == 2 * (4 * 32 + 64 + 32)
    assert ntk.make_subset("row1", params, forward).apply == row.apply  # compiled code is reused
    for bad in ("row0", "rows1", "lora", "full1", "column-2"):
        with pytest.raises(ValueError, match="unknown parameter subset"):
            ntk.parse_subset(bad)
