"""The trainer's step, optimizer, loss and methods (`train.step`, `train.methods`) on tiny models.

The core's own equivalences (efficient, drop-in and dense paths) are in tests/core;
these check the code the CLI adds on top: its optimizer state, its step on every
family, its gradient norm and loss, and its method construction.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    FAMILY_MODELS,
    abstract_params,
    assert_trees_close,
    fast_jit,
    flat,
    full_forward,
    num_elements,
    tiny_roberta,
)

from rocoft_jax import families
from train import models
from train import step as step_lib
from train.methods import build_method


def _float_and_int_leaves(state):
    leaves = jax.tree_util.tree_leaves(state)
    floats = [x for x in leaves if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)]
    ints = [x for x in leaves if jnp.issubdtype(jnp.asarray(x).dtype, jnp.integer)]
    assert len(floats) + len(ints) == len(leaves)
    return floats, ints


@pytest.mark.parametrize("mode", ["row", "column"])
def test_trainer_state_is_two_adam_moments_of_the_trainable_tree(mode):
    _, params = tiny_roberta()
    method = build_method("rocoft", params, rank=2, mode=mode)
    trainable, frozen = method.split(params)
    tx, _ = step_lib.make_optimizer(1e-3, 10, weight_decay=0.01)
    state = step_lib.init_state(trainable, tx, seed=0)
    floats, ints = _float_and_int_leaves(state.opt_state)
    head = 32 * 32 + 32 + 32 * 3 + 3
    assert method.mask.num_trainable == num_elements(trainable) == 2 * 2 * (32 * 5 + 64) + head
    assert sum(x.size for x in floats) == 2 * method.mask.num_trainable
    assert all(np.ndim(x) == 0 for x in ints)
    # The frozen tree keeps every leaf except the fully trained head, kernels included.
    assert set(flat(frozen)) == {p for p in flat(params) if not p.startswith("classifier/")}


# ---------------------------------------------------------------- the trainer's path on every family


@pytest.mark.parametrize("name", list(FAMILY_MODELS))
def test_trainer_step_traces_on_every_family(name):
    """`build_method` + `Method.apply` + `train_step` on each family of the table (shapes only, nothing runs)."""
    config_cls, model_cls, kw, *_ = FAMILY_MODELS[name]
    config = config_cls(**kw)
    model, shapes = abstract_params(model_cls, config)
    method = build_method("rocoft", shapes, rank=1, mode="row")
    tx, _ = step_lib.make_optimizer(1e-3, 10)
    ids = np.full((2, 8), 5, np.int32)
    ids[:, -1] = config.eos_token_id if config.eos_token_id is not None else 5
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": np.zeros(2, np.int32)}
    kind = "classification" if "SequenceClassification" in model_cls.__name__ else "causal-lm"

    def one_step(params):
        trainable, frozen = method.split(params)
        state = step_lib.init_state(trainable, tx, seed=0)
        return step_lib.train_step(state, frozen, batch, model=model, method=method, tx=tx, loss_kind=kind)

    state, metrics = jax.eval_shape(one_step, shapes)
    assert metrics["loss"].shape == () and num_elements(state.trainable) == method.mask.num_trainable


@pytest.mark.parametrize(
    "concat_max, concatenate",
    [(step_lib.CONCAT_NORM_MAX, True), (0, True), (step_lib.CONCAT_NORM_MAX, False)],
    ids=["concatenated", "too-large", "sharded"],
)
def test_global_norm_matches_numpy_on_mixed_leaves(monkeypatch, concat_max, concatenate):
    monkeypatch.setattr(step_lib, "CONCAT_NORM_MAX", concat_max)
    rng = np.random.default_rng(0)
    tree = {
        "a": rng.normal(size=(7, 3)).astype(np.float32),
        "b": {"c": rng.normal(size=(5,)).astype(np.float32), "d": rng.normal(size=(2, 2, 2)).astype(jnp.bfloat16)},
    }
    expected = np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(tree)))
    norm = jax.jit(step_lib.global_norm, static_argnums=1)(tree, concatenate)
    np.testing.assert_allclose(float(norm), expected, rtol=1e-6)


def test_causal_lm_loss_without_a_mask_targets_every_token():
    """A batch without "attention_mask" (no padding) weighs every next token, as an all-ones mask does."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 6, 11)).astype(np.float32)
    ids = rng.integers(0, 11, (2, 6)).astype(np.int32)
    total, count = step_lib.loss_sum(logits, {"input_ids": ids}, "causal-lm")
    masked = step_lib.loss_sum(logits, {"input_ids": ids, "attention_mask": np.ones_like(ids)}, "causal-lm")
    log_probs = logits - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    expected = -np.take_along_axis(log_probs[:, :-1], ids[:, 1:, None], axis=-1).sum()
    assert float(count) == float(masked[1]) == 10
    np.testing.assert_allclose(float(total), expected, rtol=1e-6)
    np.testing.assert_allclose(float(total), float(masked[0]), rtol=1e-6)


def test_gpu_compiler_options_of_encoders_compile_and_change_no_numbers():
    """The GPU step options for BERT-family models (no dot merging) are valid XLA options; results are equal."""
    assert step_lib.compiler_options("bert", "gpu") and step_lib.compiler_options("bert", "cpu") is None
    assert step_lib.compiler_options("llama", "gpu") is None  # merged q/k/v matmuls have no biases to lose
    config = models.preset_config("tiny", num_labels=2)
    model, params = models.random_model(config, "sequence-classification", "fp32", seed=0)
    method = build_method("rocoft", params, rank=2, mode="row")
    trainable, frozen = method.split(params)
    tx, _ = step_lib.make_optimizer(1e-2, 10, 0, 0.0, "constant")
    rng = np.random.default_rng(0)
    batch = {
        "input_ids": rng.integers(3, config.vocab_size, (4, 16)).astype(np.int32),
        "attention_mask": np.ones((4, 16), np.int32),
        "labels": np.array([0, 1, 1, 0], np.int32),
    }
    step = functools.partial(step_lib.train_step, model=model, method=method, tx=tx, loss_kind="classification")
    results = []
    for options in (None, step_lib.compiler_options(method.mask.family, "gpu")):
        state, metrics = jax.jit(step, compiler_options=options)(step_lib.init_state(trainable, tx, 0), frozen, batch)
        results.append((float(metrics["loss"]), state.trainable))
    assert results[0][0] == results[1][0]
    assert_trees_close(results[0][1], results[1][1], rtol=1e-6, atol=1e-7)


def test_build_method_wanda_without_calibration():
    _, params = tiny_roberta()
    with pytest.raises(ValueError, match=r"strategy 'mixed' needs calibration batches"):
        build_method("rocoft", params, rank=1, strategy="mixed")


def test_causal_lm_types_come_from_the_family_records():
    assert models.CAUSAL_LM_TYPES == families.model_types("causal-lm")
    assert set(models.CAUSAL_LM_TYPES) == {"llama", "mistral", "gemma", "gptj", "bloom", "opt", "gpt2"}


@pytest.fixture
def count_fused_calls(monkeypatch):
    """The keyword arguments of each traced `jax.nn.dot_product_attention` call (which still runs)."""
    calls = []
    original = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *a, **k: calls.append(k) or original(*a, **k))
    return calls


def test_method_apply_runs_a_batch_without_mask_unmasked(count_fused_calls):
    """`Method.apply` tells the fused attention that a batch without "attention_mask" has no padding.

    The last layer runs HF's attention for token 0 alone (`rocoft_jax.fast.first_token_only`), so one
    layer fewer reaches the fused kernel."""
    model, params = tiny_roberta()
    method = build_method("rocoft", params, rank=2, mode="row")
    trainable, frozen = method.split(params)
    apply = fast_jit(lambda tr, fr, batch: method.apply(model, tr, fr, batch, attention="xla"))
    ids = np.random.default_rng(0).integers(3, model.config.vocab_size, (3, 8)).astype(np.int32)
    ones = np.ones_like(ids)
    masked = apply(trainable, frozen, {"input_ids": ids, "attention_mask": ones})
    fused_layers = model.config.num_hidden_layers - 1
    assert [k["mask"] is None for k in count_fused_calls] == [False] * fused_layers
    count_fused_calls.clear()
    unmasked = apply(trainable, frozen, {"input_ids": ids})
    assert [k["mask"] is None for k in count_fused_calls] == [True] * fused_layers
    assert_trees_close(unmasked, masked, atol=1e-5)
    reference = fast_jit(functools.partial(full_forward, model))(params, {"input_ids": ids, "attention_mask": ones})
    assert_trees_close(unmasked, reference, atol=1e-5)
