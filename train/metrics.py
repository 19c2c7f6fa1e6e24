"""GLUE metrics in plain numpy.

The trainer must not need scikit-learn or scipy at run time, so the five GLUE
metrics are written here and checked against those libraries in the tests.
All values are python floats; accuracy and F1 are fractions, not percentages.
"""

from __future__ import annotations

import numpy as np

from train.glue import TaskSpec, metric_suffix


def accuracy(predictions, labels) -> float:
    """Fraction of predictions equal to labels."""
    return float(np.mean(np.asarray(predictions) == np.asarray(labels)))


def f1_binary(predictions, labels) -> float:
    """F1 of the positive class 1; 0.0 when there are no true or predicted positives."""
    pred, true = np.asarray(predictions) == 1, np.asarray(labels) == 1
    tp = np.sum(pred & true)
    denom = np.sum(pred) + np.sum(true)
    return float(2 * tp / denom) if denom else 0.0


def matthews_correlation(predictions, labels) -> float:
    """Matthews correlation (multiclass form, as sklearn); 0.0 when undefined."""
    pred, true = np.asarray(predictions), np.asarray(labels)
    classes = np.union1d(pred, true)
    p = np.array([np.sum(pred == c) for c in classes], dtype=np.float64)
    t = np.array([np.sum(true == c) for c in classes], dtype=np.float64)
    n, correct = float(len(true)), float(np.sum(pred == true))
    denom = np.sqrt((n * n - p @ p) * (n * n - t @ t))
    return float((correct * n - p @ t) / denom) if denom else 0.0


def pearson(predictions, labels) -> float:
    """Pearson correlation; 0.0 when either side is constant."""
    x = np.asarray(predictions, dtype=np.float64) - np.mean(predictions)
    y = np.asarray(labels, dtype=np.float64) - np.mean(labels)
    denom = np.sqrt((x @ x) * (y @ y))
    return float(x @ y / denom) if denom else 0.0


def rank_average(values) -> np.ndarray:
    """1-based ranks, ties sharing their average rank (scipy's ``rankdata``)."""
    values = np.asarray(values)
    order = np.argsort(values, kind="stable")
    sorted_vals = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1]])
    ends = np.r_[starts[1:], len(values)]
    group_rank = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(group_rank, ends - starts)
    return ranks


def spearman(predictions, labels) -> float:
    """Spearman correlation: Pearson of the tie-averaged ranks."""
    return pearson(rank_average(predictions), rank_average(labels))


_METRICS = {
    "accuracy": accuracy,
    "f1": f1_binary,
    "matthews_correlation": matthews_correlation,
    "pearson": pearson,
    "spearman": spearman,
}


def compute_metrics(spec: TaskSpec, predictions, labels, weights=None, split: str = "validation") -> dict[str, float]:
    """The task's metrics on one eval split, named as in ``spec.metric_names``.

    ``predictions`` are class ids, or logits of shape ``(n, num_labels)``
    (argmax is taken; regression squeezes ``(n, 1)``). Rows whose ``weights``
    are 0 are eval padding and are dropped. Evaluate each of
    ``spec.eval_splits`` separately: the split's ``metric_suffix`` is appended,
    so MNLI's ``validation_mismatched`` yields ``accuracy_mm``.
    """
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.ndim == 2:
        predictions = predictions[:, 0] if spec.is_regression else np.argmax(predictions, axis=-1)
    if weights is not None:
        keep = np.asarray(weights) > 0
        predictions, labels = predictions[keep], labels[keep]
    suffix = metric_suffix(split)
    base_names = [m for m in spec.metric_names if m in _METRICS]  # drops suffixed names such as accuracy_mm
    return {m + suffix: _METRICS[m](predictions, labels) for m in base_names}
