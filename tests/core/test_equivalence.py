"""The three ways to train RoCoFT slices agree, and frozen entries never move.

(a) efficient: `split` + `sliced_kernels`, gradients of the trainable tree only;
(b) drop-in: `masked(inner, mask)` under ``optax.multi_transform`` on full params
    and full gradients;
(c) dense reference: the plain optimizer on full params, with gradients and
    updates multiplied by a 0/1 element mask rebuilt from ``mask.indices`` with
    numpy (conftest.dense_mask), no library code.

All in fp32 with dropout off, over 5 steps on 5 different batches.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import (
    assert_trees_close,
    assert_unchanged_outside,
    causal_lm_loss,
    classification_batch,
    classification_loss,
    efficient_forward,
    element_masks,
    fast_jit,
    flat,
    full_forward,
    lm_batch,
    tiny_gpt2,
    tiny_llama,
    tiny_roberta,
)
from flax import traverse_util

import rocoft_jax

STEPS = 5

# name -> (factory, batch maker, loss, out_axis of the kernels, leaves trained in full by default)
MODELS = {
    "roberta": (tiny_roberta, classification_batch, classification_loss, 1, ("classifier/",)),
    "llama": (tiny_llama, lm_batch, causal_lm_loss, 1, ()),
    "gpt2": (tiny_gpt2, lm_batch, causal_lm_loss, 0, ()),
}
OPTIMIZERS = {
    "sgd": lambda: optax.sgd(0.5),
    "adamw": lambda: optax.adamw(3e-3, weight_decay=0.1),
}
ALL_PATHS = ("efficient", "masked", "dense")
CASES = [
    # (model, mode, rank, optimizer)
    ("roberta", "row", 2, "sgd"),
    ("roberta", "row", 2, "adamw"),
    ("roberta", "column", 3, "sgd"),
    ("roberta", "column", 3, "adamw"),
    ("roberta", "random", 0.1, "sgd"),  # random entries: (b) vs (c) only
    ("roberta", "random", 0.1, "adamw"),
    ("llama", "row", 2, "adamw"),
    ("gpt2", "row", 2, "adamw"),
    ("gpt2", "column", 2, "sgd"),
]


@functools.cache
def _setup(model_name):
    factory, make_batch, loss, out_axis, train_prefixes = MODELS[model_name]
    model, params = factory()
    batches = [make_batch(model.config, seed=k) for k in range(STEPS)]
    full_grad = fast_jit(jax.grad(lambda p, b: loss(full_forward(model, p, b), b)))
    return model, params, batches, loss, out_axis, train_prefixes, full_grad


@functools.cache
def _mask_and_grad(model_name, mode, rank):
    model, params, _, loss, *_ = _setup(model_name)
    mask = rocoft_jax.mask_params(params, rank, mode)
    grad = fast_jit(jax.grad(lambda tr, fr, b: loss(efficient_forward(model, tr, fr, mask, b), b)))
    return mask, grad


def _run_efficient(model_name, mode, rank, make_tx):
    _, params, batches, *_ = _setup(model_name)
    mask, grad = _mask_and_grad(model_name, mode, rank)
    trainable, frozen = rocoft_jax.split(params, mask)
    tx = make_tx()
    state, step = tx.init(trainable), fast_jit(_step(tx))
    for batch in batches:
        trainable, state = step(trainable, state, grad(trainable, frozen, batch))
    return rocoft_jax.merge(trainable, frozen, mask)


def _run_masked(model_name, mode, rank, make_tx):
    _, params, batches, *_, full_grad = _setup(model_name)
    mask, _ = _mask_and_grad(model_name, mode, rank)
    tx = optax.multi_transform(
        {"rocoft": rocoft_jax.masked(make_tx(), mask), "train": make_tx(), "frozen": optax.set_to_zero()}, mask.labels
    )
    state, step = tx.init(params), fast_jit(_step(tx))
    for batch in batches:
        params, state = step(params, state, full_grad(params, batch))
    return params


def _run_dense(model_name, mode, rank, make_tx):
    _, params, batches, _, out_axis, train_prefixes, full_grad = _setup(model_name)
    mask, _ = _mask_and_grad(model_name, mode, rank)
    masks = element_masks(params, mask, mode, out_axis, train_prefixes)
    masks = traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in masks.items()}, sep="/")
    apply_mask = lambda tree: jax.tree.map(lambda x, m: x * m, tree, masks)
    tx = make_tx()
    state, step = tx.init(params), fast_jit(_step(tx, apply_mask))
    for batch in batches:
        params, state = step(params, state, full_grad(params, batch))
    return params


def _step(tx, apply_mask=lambda tree: tree):
    """One optimizer step; ``apply_mask`` multiplies gradients and updates (the dense reference)."""

    def step(params, state, grads):
        updates, state = tx.update(apply_mask(grads), state, params)
        return optax.apply_updates(params, apply_mask(updates)), state

    return step


RUNNERS = {"efficient": _run_efficient, "masked": _run_masked, "dense": _run_dense}


@pytest.mark.parametrize("model_name, mode, rank, opt", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_three_paths_agree(model_name, mode, rank, opt):
    _, start, _, _, out_axis, train_prefixes, _ = _setup(model_name)
    mask, _ = _mask_and_grad(model_name, mode, rank)
    masks = element_masks(start, mask, mode, out_axis, train_prefixes)
    paths = ALL_PATHS if mode != "random" else ("masked", "dense")
    results = {name: RUNNERS[name](model_name, mode, rank, OPTIMIZERS[opt]) for name in paths}

    for params in results.values():
        assert_unchanged_outside(params, start, masks)
    # The reference really trained: the live entries moved well beyond the tolerance.
    moved = max(
        np.abs(v - flat(start)[k])[masks[k] > 0].max(initial=0.0)
        for k, v in flat(results["dense"]).items()
        if masks[k].any()
    )
    assert moved > 1e-3
    for name in paths[:-1]:
        assert_trees_close(results[name], results["dense"], atol=1e-6)


# ---------------------------------------------------------------- optimizer state is slice-sized


def _float_and_int_leaves(state):
    leaves = jax.tree_util.tree_leaves(state)
    floats = [x for x in leaves if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)]
    ints = [x for x in leaves if jnp.issubdtype(jnp.asarray(x).dtype, jnp.integer)]
    assert len(floats) + len(ints) == len(leaves)
    return floats, ints


@pytest.mark.parametrize("mode, rank", [("row", 2), ("column", 3), ("random", 0.1)])
def test_adam_state_holds_two_scalars_per_trained_entry(mode, rank):
    _, params = tiny_roberta()
    mask = rocoft_jax.mask_params(params, rank, mode, train=())
    slice_scalars = mask.num_trainable
    assert slice_scalars == sum(s.size for s in mask.slices.values())

    tx = optax.multi_transform(
        {"rocoft": rocoft_jax.masked(optax.adam(1e-3), mask), "frozen": optax.set_to_zero()}, mask.labels
    )
    floats, ints = _float_and_int_leaves(tx.init(params))
    assert sum(x.size for x in floats) == 2 * slice_scalars
    assert ints and all(np.ndim(x) == 0 for x in ints)  # step counts only

    trainable, _ = rocoft_jax.split(params, mask)
    floats, ints = _float_and_int_leaves(optax.adam(1e-3).init(trainable))
    assert sum(x.size for x in floats) == 2 * slice_scalars
    assert ints and all(np.ndim(x) == 0 for x in ints)


# ---------------------------------------------------------------- bf16 frozen weights, fp32 slice masters


@pytest.mark.parametrize("mode", ["row", "column"])
def test_bf16_frozen_weights_keep_updates_below_bf16_resolution(mode):
    model, params32 = tiny_roberta()  # the model computes in fp32; only the stored weights are bf16
    mask = rocoft_jax.mask_params(params32, 2, mode, train=())
    ones = element_masks(params32, mask, mode, out_axis=1)
    # Slices start at exactly 1.0, where bf16's spacing is 2**-7: one 1e-5 step is far below it.
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _with_ones(flat(params32), ones))
    trainable, frozen = rocoft_jax.split(params16, mask)
    assert {x.dtype for x in jax.tree.leaves(trainable)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(frozen)} == {jnp.dtype(jnp.bfloat16)}

    steps, lr = 300, 1e-5
    tx = optax.sgd(lr)
    grads = jax.tree.map(lambda x: -jnp.ones_like(x), trainable)  # each step adds exactly lr

    @fast_jit
    def run(tree):
        def body(_, t):
            updates, _ = tx.update(grads, tx.init(t), t)
            return optax.apply_updates(t, updates)

        return jax.lax.fori_loop(0, steps, body, tree)

    trained = run(trainable)
    for leaf in jax.tree.leaves(trained["rocoft"]):
        np.testing.assert_allclose(np.asarray(leaf), 1.0 + steps * lr, atol=2e-5)
    # The same steps on bf16 masters are all lost: this is what the fp32 copies are for.
    bf16_master = run(rocoft_jax.split(params16, mask, dtype=None)[0])
    assert all(np.all(np.asarray(x, np.float32) == 1.0) for x in jax.tree.leaves(bf16_master["rocoft"]))

    batch = classification_batch(model.config, seed=0)
    logits = efficient_forward(model, trained, frozen, mask, batch)
    to32 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float32), tree)
    reference = full_forward(model, rocoft_jax.merge(trained, to32(frozen), mask), batch)
    before = full_forward(model, to32(params16), batch)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(reference), atol=1e-5, rtol=0)
    assert np.abs(np.asarray(reference) - np.asarray(before)).max() > 1e-4  # 10x the tolerance


def _with_ones(flat_params, ones):
    """Params with every selected entry set to 1.0."""
    out = {k: jnp.asarray(np.where(ones[k] > 0, 1.0, v), v.dtype) for k, v in flat_params.items()}
    return traverse_util.unflatten_dict(out, sep="/")


# ---------------------------------------------------------------- split and merge

ROUND_TRIPS = [
    # (model, mode, rank, dtype of the params)
    ("roberta", "row", 2, "float32"),
    ("roberta", "row", 2, "bfloat16"),
    ("roberta", "column", 3, "float32"),
    ("roberta", "random", 0.1, "float32"),
    ("gpt2", "row", 2, "bfloat16"),
    ("gpt2", "column", 2, "float32"),
    ("llama", "column", 1, "float32"),
]


@pytest.mark.parametrize("model_name, mode, rank, dtype", ROUND_TRIPS, ids=["-".join(map(str, r)) for r in ROUND_TRIPS])
def test_split_then_merge_gives_back_the_params(model_name, mode, rank, dtype):
    _, params, _, _, out_axis, train_prefixes, _ = _setup(model_name)
    params = jax.tree.map(lambda x: x.astype(dtype), params)
    mask = rocoft_jax.mask_params(params, rank, mode)
    trainable, frozen = rocoft_jax.split(params, mask)
    # Slices hold exactly the selected entries, in the kernel's layout (fp32 masters).
    masks = element_masks(params, mask, mode, out_axis)
    for path, values in flat(trainable["rocoft"]).items():
        kernel = flat(params)[path].astype(np.float32)
        assert values.dtype == np.float32
        if mode == "random":
            np.testing.assert_array_equal(values, kernel.reshape(-1)[masks[path].reshape(-1) > 0])
        else:
            idx = mask.indices[path]
            expected = kernel[:, idx] if (mode == "row") == (out_axis == 1) else kernel[idx]
            np.testing.assert_array_equal(values, expected)
    assert set(flat(trainable["train"])) == {p for p in flat(params) if p.startswith(train_prefixes or ("\0",))}
    merged = rocoft_jax.merge(trainable, frozen, mask)
    assert_unchanged_outside(
        jax.tree.map(lambda x: x.astype(dtype), merged), params, {p: np.zeros(v.shape) for p, v in flat(params).items()}
    )
    assert all(flat(merged)[p].dtype == np.dtype(dtype) for p in mask.slices)  # kernels keep their dtype


def test_merge_accepts_numpy_params():
    """Params restored with flax.serialization.msgpack_restore (or built with numpy) are numpy arrays."""
    from flax import serialization

    _, params = tiny_roberta()
    restored = serialization.msgpack_restore(serialization.to_bytes(params))
    assert isinstance(jax.tree.leaves(restored)[0], np.ndarray)
    mask = rocoft_jax.mask_params(restored, 2, "row")
    trainable, frozen = rocoft_jax.split(restored, mask)
    assert_trees_close(rocoft_jax.merge(trainable, frozen, mask), params, atol=0)


def test_merge_rejects_a_trainable_tree_of_another_mask():
    _, params = tiny_roberta()
    mask = rocoft_jax.mask_params(params, 2, "row")
    trainable, frozen = rocoft_jax.split(params, mask)
    with pytest.raises(
        ValueError, match=r"trainable tree lacks 'classifier/dense/bias'; it does not belong to this mask"
    ):
        rocoft_jax.merge({"rocoft": trainable["rocoft"], "train": {}}, frozen, mask)
