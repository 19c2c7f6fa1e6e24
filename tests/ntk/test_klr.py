"""Kernel logistic regression (rocoft_jax.ntk.klr) and the NTK comparison metrics (rocoft_jax.ntk.metrics)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize

from rocoft_jax.ntk import klr
from rocoft_jax.ntk import metrics as ntk_metrics


def planted(n: int, seed: int, classes: int = 2, dim: int = 5):
    """Points around ``classes`` well separated centres; the linear kernel separates them."""
    rng = np.random.default_rng(seed)
    centres = 4.0 * np.random.default_rng(123).normal(size=(classes, dim))
    labels = np.arange(n) % classes
    return centres[labels] + rng.normal(size=(n, dim)), labels


def alpha_objective(alpha, k, labels, lam, c, offset=None):
    f = (k @ alpha).reshape(len(labels), c)
    return klr.mean_loss(f if offset is None else f + offset, labels) + 0.5 * lam * alpha @ k @ alpha


@pytest.mark.parametrize("classes", [2, 3])
def test_klr_recovers_a_planted_separable_problem(classes):
    c = 1 if classes == 2 else classes
    x, y = planted(40, 0, classes)
    x_test, y_test = planted(200, 1, classes)
    k = np.kron(x @ x.T, np.eye(c))  # block kernel of independent outputs
    model = klr.fit(k, y, 1e-3, num_outputs=c)
    assert model.converged
    train = klr.predict(klr.decision(k, model.alpha, c))
    test = klr.predict(klr.decision(np.kron(x_test @ x.T, np.eye(c)), model.alpha, c))
    assert np.array_equal(train, y)
    assert np.mean(test == y_test) >= 0.97


@pytest.mark.parametrize("classes, lam, with_offset", [(2, 1e-4, False), (2, 1e-1, True), (3, 1e-2, False)])
def test_klr_objective_decreases_monotonically_to_the_optimum(classes, lam, with_offset):
    c = 1 if classes == 2 else classes
    rng = np.random.default_rng(5)
    x, y = planted(24, 2, classes)
    x += 2.0 * rng.normal(size=x.shape)  # overlapping classes: a genuine trade-off
    k = np.kron(np.tanh(x @ x.T / 5.0) + 0.5 * (x @ x.T) / 5.0, np.eye(c))
    k = k @ k.T / len(k)  # PSD, rank-deficient (24*c rows from 5 features)
    offset = rng.normal(size=(24, c)) if with_offset else None
    model = klr.fit(k, y, lam, num_outputs=c, offset=offset)
    history = model.objective
    assert model.converged and len(history) >= 3
    assert np.all(np.diff(history) <= 1e-12 * np.abs(history[:-1]))
    assert history[-1] < history[0]
    # the reparametrised solution is optimal for the problem as stated in alpha
    value = alpha_objective(model.alpha, k, y, lam, c, offset)
    assert value == pytest.approx(history[-1], rel=1e-9)
    reference = minimize(
        alpha_objective,
        np.zeros(len(k)),
        args=(k, y, lam, c, offset),
        method="L-BFGS-B",
        options={"maxiter": 20000, "ftol": 1e-15, "gtol": 1e-12},
    )
    assert value <= reference.fun + 1e-8


def test_lambda_is_chosen_on_held_out_examples_of_each_class():
    y = np.repeat([0, 1, 2], 8)
    fit_rows, held = klr.holdout_split(y, 0.25, seed=0)
    assert set(fit_rows).isdisjoint(held) and sorted(np.r_[fit_rows, held]) == list(range(24))
    assert [np.sum(y[held] == c) for c in range(3)] == [2, 2, 2]
    x, labels = planted(24, 4, 3)
    k = np.kron(x @ x.T, np.eye(3))
    best, scores = klr.select_lambda(k, labels, (1e-3, 1e-1, 10.0), num_outputs=3)
    assert set(scores) == {1e-3, 1e-1, 10.0} and best in scores
    assert scores[best][0] == max(acc for acc, _ in scores.values()) == 1.0
    with pytest.raises(ValueError, match="at least 2"):
        klr.holdout_split([0, 0, 1], 0.25)


def test_relative_distance_uses_entrywise_norms():
    k = np.array([[2.0, 1.0], [1.0, 3.0]])
    assert ntk_metrics.relative_distance(7.5 * k, k, 1) == pytest.approx(0.0, abs=1e-15)
    assert ntk_metrics.relative_distance(7.5 * k, k, 2) == pytest.approx(0.0, abs=1e-15)
    a, b = np.diag([1.0, 0.0]), np.eye(2)
    assert ntk_metrics.relative_distance(a, b, 2) == pytest.approx(np.sqrt((1 - 2**-0.5) ** 2 + 0.5))
    assert ntk_metrics.relative_distance(a, b, 1) == pytest.approx(1.0)  # |1 - 1/2| + |0 - 1/2|
    assert ntk_metrics.relative_distance(-k, k, 2) == pytest.approx(2.0)


def test_spectrum_and_pictures(tmp_path):
    x, y = planted(12, 0)
    k = x @ x.T
    values = ntk_metrics.spectrum(k)
    assert values[0] == 1.0 and np.all(np.diff(values) <= 1e-12)
    np.testing.assert_allclose(values * np.linalg.eigvalsh(k).max(), np.sort(np.linalg.eigvalsh(k))[::-1])
    order = ntk_metrics.class_order(y)
    assert list(y[order]) == sorted(y)
    assert list(ntk_metrics.class_order([1, 0], num_outputs=2)) == [2, 3, 0, 1]
    heat = ntk_metrics.plot_heatmaps({"full": k, "row1": k + 1.0}, y, tmp_path / "heat.png")
    spec = ntk_metrics.plot_spectra({"full": values}, tmp_path / "spec.png")
    for path in (heat, spec):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000
