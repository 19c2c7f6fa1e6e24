"""Numpy metrics against scikit-learn and scipy, and the per-task result names."""

import numpy as np
import pytest

from train import metrics
from train.glue import GLUE_TASKS, get_task

RNG = np.random.default_rng(0)
CLASSES = [RNG.integers(0, 2, 200) for _ in range(2)] + [RNG.integers(0, 3, 200) for _ in range(2)]


@pytest.mark.parametrize(
    "pred, true", [(CLASSES[0], CLASSES[1]), (CLASSES[1], CLASSES[1]), (1 - CLASSES[0], CLASSES[0])]
)
def test_binary_metrics_match_sklearn(pred, true):
    skm = pytest.importorskip("sklearn.metrics")
    assert metrics.accuracy(pred, true) == pytest.approx(skm.accuracy_score(true, pred), abs=1e-12)
    assert metrics.f1_binary(pred, true) == pytest.approx(skm.f1_score(true, pred), abs=1e-12)
    assert metrics.matthews_correlation(pred, true) == pytest.approx(skm.matthews_corrcoef(true, pred), abs=1e-12)


def test_multiclass_matthews_matches_sklearn():
    skm = pytest.importorskip("sklearn.metrics")
    assert metrics.matthews_correlation(CLASSES[2], CLASSES[3]) == pytest.approx(
        skm.matthews_corrcoef(CLASSES[3], CLASSES[2]), abs=1e-12
    )


def test_degenerate_cases_are_zero_not_nan():
    ones, zeros = np.ones(5, int), np.zeros(5, int)
    assert metrics.matthews_correlation(ones, CLASSES[0][:5]) == 0.0
    assert metrics.f1_binary(zeros, zeros) == 0.0
    assert metrics.pearson(np.ones(5), np.arange(5.0)) == 0.0


@pytest.mark.parametrize("ties", [False, True])
def test_correlations_match_scipy(ties):
    stats = pytest.importorskip("scipy.stats")
    x, y = RNG.normal(size=300), RNG.normal(size=300)
    y = y + x
    if ties:  # STS-B scores repeat a lot, and rounded predictions tie too
        x, y = np.round(x, 1), np.round(y * 2) / 2
    assert metrics.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-10)
    assert metrics.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-10)
    np.testing.assert_allclose(metrics.rank_average(x), stats.rankdata(x))


@pytest.mark.parametrize("name", GLUE_TASKS)
def test_compute_metrics_names_and_types(name):
    spec = get_task(name)
    labels = RNG.uniform(0, 5, 50) if spec.is_regression else RNG.integers(0, spec.num_labels, 50)
    result = metrics.compute_metrics(spec, labels, labels, split=spec.eval_splits[0])
    assert set(result) == {m for m in spec.metric_names if not m.endswith("_mm")}
    assert all(type(v) is float and v == pytest.approx(1.0) for v in result.values())


def test_mnli_mismatched_metric_name():
    spec = get_task("mnli")
    both = {}
    for split in spec.eval_splits:
        both.update(metrics.compute_metrics(spec, [0, 1, 2, 2], [0, 1, 2, 1], split=split))
    assert both == {"accuracy": 0.75, "accuracy_mm": 0.75}
    assert set(both) == set(spec.metric_names)


def test_logits_are_argmaxed_and_padding_dropped():
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [5.0, 0.0], [0.0, 9.0]])
    labels, weights = np.array([0, 1, 1, 0]), np.array([1, 1, 1, 0], np.float32)
    assert metrics.compute_metrics(get_task("sst2"), logits, labels) == {"accuracy": 0.5}
    assert metrics.compute_metrics(get_task("sst2"), logits, labels, weights) == {"accuracy": pytest.approx(2 / 3)}
    stsb = metrics.compute_metrics(get_task("stsb"), np.array([[1.0], [2.0], [3.5]]), np.array([1.0, 2.0, 3.0]))
    assert stsb["spearman"] == pytest.approx(1.0) and 0.9 < stsb["pearson"] < 1.0
