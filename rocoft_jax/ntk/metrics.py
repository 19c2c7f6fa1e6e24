"""How close a subset's NTK is to the full one: Table 5's distance, the spectrum figure, heatmaps.

Norms are entrywise: ``||K||_1 = sum |K_ij|`` and ``||K||_2`` the Frobenius norm, so the
relative distance ``||K_S/||K_S||_p - K/||K||_p||_p`` compares the kernels' shapes and
ignores their scales; it lies in [0, 2] and is 0 iff K_S is a positive multiple of K.
matplotlib is imported only to draw.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np


def _norm(k: np.ndarray, p: int) -> float:
    return float(np.abs(k).sum()) if p == 1 else float(np.sqrt((k * k).sum()))


def relative_distance(k_subset, k_full, p: int = 2) -> float:
    """``||K_S/||K_S||_p - K/||K||_p||_p`` with entrywise p-norms, p = 1 or 2."""
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2; got {p}")
    a, b = np.asarray(k_subset, np.float64), np.asarray(k_full, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"kernels differ in shape: {a.shape} vs {b.shape}")
    return _norm(a / _norm(a, p) - b / _norm(b, p), p)


def spectrum(k) -> np.ndarray:
    """Eigenvalues in decreasing order, divided by the largest (the paper's rescaling)."""
    values = np.linalg.eigvalsh((np.asarray(k, np.float64) + np.asarray(k, np.float64).T) / 2)[::-1]
    return values / values[0]


def class_order(labels, num_outputs: int = 1) -> np.ndarray:
    """Kernel rows ordered by the class of their example (stable), outputs kept together."""
    rows = np.argsort(np.asarray(labels), kind="stable")
    return (rows[:, None] * num_outputs + np.arange(num_outputs)).reshape(-1)


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def plot_heatmaps(kernels: Mapping[str, np.ndarray], labels, path, *, num_outputs: int = 1, title: str = "") -> Path:
    """One heatmap per kernel, rows and columns ordered by class (lines between classes).

    Each kernel is divided by its largest absolute entry and drawn over its own range, so
    the structure shows even when a constant part dominates.
    """
    plt = _pyplot()
    order = class_order(labels, num_outputs)
    fig, axes = plt.subplots(1, len(kernels), figsize=(3.6 * len(kernels), 3.2), squeeze=False)
    bounds = np.flatnonzero(np.diff(np.sort(np.asarray(labels)))) + 1
    for ax, (name, k) in zip(axes[0], kernels.items()):
        k = np.asarray(k)[np.ix_(order, order)]
        image = ax.imshow(k / np.abs(k).max(), cmap="viridis", interpolation="nearest")
        for b in bounds * num_outputs - 0.5:
            ax.axhline(b, color="w", lw=0.8)
            ax.axvline(b, color="w", lw=0.8)
        ax.set_title(f"K ({name}) / max")
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_spectra(spectra: Mapping[str, np.ndarray], path, *, title: str = "") -> Path:
    """Rescaled eigenvalues (largest = 1) against their index, log scale, one line per subset."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, values in spectra.items():
        values = np.asarray(values)
        ax.semilogy(np.arange(1, len(values) + 1), np.clip(values, 1e-12, None), marker=".", label=name)
    ax.set_xlabel("eigenvalue index")
    ax.set_ylabel("eigenvalue / largest")
    ax.legend()
    if title:
        ax.set_title(title)
    return _save(fig, path)
