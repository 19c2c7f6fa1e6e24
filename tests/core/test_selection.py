"""Choosing rows and columns: Wanda scores S_ij = |W_ij| * ||X_j||_2 and the activation norms behind them.

A hand-built one-layer model makes the right answer obvious; on a tiny RoBERTa
the norms are recomputed independently from the model's own hidden states and
captured intermediates, with padding left out.
"""

import functools

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import classification_batch, flat, tiny_gpt2, tiny_roberta
from transformers.models.roberta.modeling_flax_roberta import (
    create_position_ids_from_input_ids,
)

import rocoft_jax

# ---------------------------------------------------------------- a model whose answer is obvious
#
# kernel[j, i] = c_j * a_i (Flax layout: j = input feature = paper column, i = output unit = paper row),
# and the j-th input feature has norm b_j. Then
#   row i scores    a_i * sum_j c_j b_j   -> ordered by a:       a   = [3, 1, 5, 2, 4]
#   column j scores c_j b_j * sum_i a_i   -> ordered by c * b:   c*b = [.4, 1.5, 2, 3, 5, 10]
# while by weights alone the columns would rank the other way round (c is decreasing).
A = np.array([3.0, 1.0, 5.0, 2.0, 4.0])
C = np.array([4.0, 3.0, 2.0, 1.0, 0.5, 0.25])
B = np.array([0.1, 0.5, 1.0, 3.0, 10.0, 40.0])


class OneDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(len(A), name="proj")(x)


def one_dense_model(x, attention_mask=None, params=None):
    return OneDense().apply({"params": params}, x)


def _one_dense():
    params = {"proj": {"kernel": jnp.asarray(np.outer(C, A), jnp.float32), "bias": jnp.zeros(len(A))}}
    # Sequence 0: token j carries b_j on feature j, then one padding token; sequence 1 is all padding.
    # Padding tokens hold huge values that must not count.
    x = np.full((2, len(B) + 1, len(B)), 1000.0, np.float32)
    x[0, : len(B)] = np.diag(B)
    attention_mask = np.zeros((2, len(B) + 1), np.int32)
    attention_mask[0, : len(B)] = 1
    return params, {"x": x, "attention_mask": attention_mask, "labels": np.zeros(2, np.int32)}


WANDA = [
    # (name, mode, strategy, rank, expected indices)
    ("row-max", "row", "max", 2, [2, 4]),
    ("row-min", "row", "min", 2, [1, 3]),
    ("row-mixed", "row", "mixed", 3, [1, 2, 4]),  # half rounded up from the top, the rest from the bottom
    ("column-max", "column", "max", 2, [4, 5]),
    ("column-min", "column", "min", 2, [0, 1]),
    ("column-mixed", "column", "mixed", 3, [0, 4, 5]),
    ("column-mixed-even", "column", "mixed", 4, [0, 1, 4, 5]),
    ("column-max-all", "column", "max", 6, [0, 1, 2, 3, 4, 5]),
]


@pytest.mark.parametrize("name, mode, strategy, rank, expected", WANDA, ids=[w[0] for w in WANDA])
def test_wanda_picks_the_obvious_rows_and_columns(name, mode, strategy, rank, expected):
    params, batch = _one_dense()
    norms = rocoft_jax.activation_norms(one_dense_model, params, [batch], ["proj/kernel"])
    np.testing.assert_allclose(norms["proj/kernel"], B, rtol=1e-6)
    mask = rocoft_jax.mask_params(
        params, rank, mode, targets=[r"^proj/kernel$"], train=(), strategy=strategy, calibration=norms
    )
    np.testing.assert_array_equal(mask.indices["proj/kernel"], expected)
    assert mask.indices["proj/kernel"].dtype == np.int32


def test_wanda_scores_need_the_activations():
    """Without the activations (all norms equal) the columns rank by weight alone: the opposite answer."""
    params, _ = _one_dense()
    flat_norms = {"proj/kernel": np.ones(len(B), np.float32)}
    mask = rocoft_jax.mask_params(
        params, 2, "column", targets=[r"^proj/kernel$"], train=(), strategy="max", calibration=flat_norms
    )
    np.testing.assert_array_equal(mask.indices["proj/kernel"], [0, 1])


# ---------------------------------------------------------------- Wanda on real layouts, against numpy


def _numpy_wanda(kernel, norms, mode, out_axis, strategy, rank):
    w = np.abs(np.asarray(kernel, np.float64))
    w = w if out_axis == 1 else w.T  # now (d_in, d_out)
    s = w * np.asarray(norms, np.float64)[:, None]
    scores = s.sum(axis=0) if mode == "row" else s.sum(axis=1)
    order = np.argsort(-scores, kind="stable")
    return np.sort(order[:rank] if strategy == "max" else order[::-1][:rank])


@pytest.mark.parametrize("model_name, out_axis", [("roberta", 1), ("gpt2", 0)])
@pytest.mark.parametrize("mode", ["row", "column"])
@pytest.mark.parametrize("strategy", ["max", "min"])
def test_wanda_indices_match_numpy_scores(model_name, out_axis, mode, strategy):
    _, params = (tiny_roberta if model_name == "roberta" else tiny_gpt2)()
    kernels = rocoft_jax.mask_params(params, 1, mode).slices  # the family's targets
    rng = np.random.default_rng(0)
    calibration = {
        p: rng.uniform(0.1, 10.0, spec.shape[1 - out_axis]).astype(np.float32) for p, spec in kernels.items()
    }
    mask = rocoft_jax.mask_params(params, 3, mode, strategy=strategy, calibration=calibration)
    leaves = flat(params)
    for path, idx in mask.indices.items():
        np.testing.assert_array_equal(
            idx, _numpy_wanda(leaves[path], calibration[path], mode, out_axis, strategy, 3), err_msg=path
        )


# ---------------------------------------------------------------- activation norms of a real model


def _independent_norms(model, params, batches, layer):
    """||X_j|| of the inputs of layer ``layer``'s six kernels, from hidden states and captured intermediates."""
    sums, sums_with_padding = {}, {}
    for batch in batches:
        ids, am = batch["input_ids"], batch["attention_mask"]
        pos = create_position_ids_from_input_ids(ids, model.config.pad_token_id)
        out, state = model.module.apply(
            {"params": params},
            ids,
            am,
            np.zeros_like(ids),
            pos,
            None,
            deterministic=True,
            output_hidden_states=True,
            capture_intermediates=True,
            mutable=["intermediates"],
        )
        hidden = out.hidden_states[layer]  # the layer's input
        captured = state["intermediates"]["roberta"]["encoder"]["layer"][str(layer)]
        inputs = {
            "attention/self/query": hidden,
            "attention/self/key": hidden,
            "attention/self/value": hidden,
            "attention/output/dense": captured["attention"]["self"]["__call__"][0][0],
            "intermediate/dense": captured["attention"]["__call__"][0][0],
            "output/dense": captured["intermediate"]["__call__"][0],
        }
        for name, x in inputs.items():
            x = np.asarray(x, np.float64)
            key = f"roberta/encoder/layer/{layer}/{name}/kernel"
            sums[key] = sums.get(key, 0.0) + (x[am.astype(bool)] ** 2).sum(axis=0)
            sums_with_padding[key] = sums_with_padding.get(key, 0.0) + (x.reshape(-1, x.shape[-1]) ** 2).sum(axis=0)
    return ({k: np.sqrt(v) for k, v in sums.items()}, {k: np.sqrt(v) for k, v in sums_with_padding.items()})


@functools.cache
def _roberta_norms():
    """(library norms of all targeted kernels, independent norms, independent norms counting padding)."""
    model, params = tiny_roberta()
    batches = [classification_batch(model.config, seed=s, batch=4, seq=10) for s in (1, 2)]
    assert all((b["attention_mask"] == 0).any() for b in batches)
    expected, with_padding = {}, {}
    for layer in (0, 1):
        e, w = _independent_norms(model, params, batches, layer)
        expected.update(e)
        with_padding.update(w)
    paths = list(rocoft_jax.mask_params(params, 1).slices)
    assert set(paths) == set(expected)
    return rocoft_jax.activation_norms(model, params, batches, paths), expected, with_padding


@pytest.mark.parametrize("layer", [0, 1])
def test_activation_norms_match_an_independent_forward(layer):
    norms, expected, with_padding = _roberta_norms()
    assert set(norms) == set(expected)
    for path in (p for p in expected if f"/layer/{layer}/" in p):
        assert norms[path].shape == expected[path].shape and norms[path].dtype == np.float32
        np.testing.assert_allclose(norms[path], expected[path], rtol=1e-5, err_msg=path)
        # Padding positions carry real activations here, so counting them would change the answer.
        assert np.abs(with_padding[path] - expected[path]).max() > 1e-3 * np.abs(expected[path]).max(), path


def test_wanda_mask_from_real_calibration_matches_numpy():
    _, params = tiny_roberta()
    norms, _, _ = _roberta_norms()
    mask = rocoft_jax.mask_params(params, 4, "row", strategy="max", calibration=norms)
    leaves = flat(params)
    for path in norms:
        np.testing.assert_array_equal(mask.indices[path], _numpy_wanda(leaves[path], norms[path], "row", 1, "max", 4))


# ---------------------------------------------------------------- errors


def test_calibration_norms_of_the_wrong_length():
    params, _ = _one_dense()
    with pytest.raises(ValueError, match=r"calibration norms have shape \(5,\), expected \(6,\): one norm per input"):
        rocoft_jax.mask_params(
            params,
            1,
            "row",
            targets=[r"^proj/kernel$"],
            train=(),
            strategy="max",
            calibration={"proj/kernel": np.ones(5)},
        )


def test_activation_norms_of_a_layer_that_never_runs():
    params, batch = _one_dense()
    with pytest.raises(ValueError, match=r"no activations were seen for \['other/kernel'\]"):
        rocoft_jax.activation_norms(one_dense_model, params, [batch], ["proj/kernel", "other/kernel"])
    with pytest.raises(ValueError, match=r"no calibration batches were given"):
        rocoft_jax.activation_norms(one_dense_model, params, [], ["proj/kernel"])
