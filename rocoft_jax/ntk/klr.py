"""Kernel logistic regression: the classifier that Section 5 puts on an NTK.

    minimize over alpha   (1/n) sum_i loss(y_i, f_i) + (lam / 2) alpha^T K alpha,
    f = K alpha (+ f0)    (rows of f: examples; columns: the C outputs of the kernel)

With one output (two classes) the loss is the logistic loss of the logit difference; with
C > 1 it is the softmax cross-entropy over the C outputs of the block kernel (`rocoft_jax.ntk`).
The problem is convex in alpha. It is solved exactly by Newton's method with backtracking in
the coordinates ``w = S^{1/2} U^T alpha`` of the eigenbasis ``K = U S U^T`` (K's null space
changes neither f nor the penalty), where it is an L2-regularised logistic regression on the
features ``U S^{1/2}`` and strongly convex: the objective falls at every iteration.
``lam`` is chosen on a held-out part of the training examples (`select_lambda`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

DEFAULT_LAMBDAS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


@dataclasses.dataclass(frozen=True)
class KLRFit:
    """``alpha`` is ``(n*C,)`` in the kernel's row order; ``objective`` has one value per iterate."""

    alpha: np.ndarray
    lam: float
    num_outputs: int
    objective: np.ndarray
    converged: bool


def _loss_terms(f: np.ndarray, labels: np.ndarray):
    """Mean loss, its gradient wrt f and the per-example Hessian blocks wrt f, all / n."""
    n, c = f.shape
    if c == 1:
        s = 2.0 * labels - 1.0
        z = s * f[:, 0]
        loss = np.logaddexp(0.0, -z).mean()
        sig = 0.5 * (1.0 + np.tanh(0.5 * z))  # sigmoid(z), stable
        grad = (-(1.0 - sig) * s)[:, None] / n
        hess = (sig * (1.0 - sig))[:, None, None] / n
        return loss, grad, hess
    shifted = f - f.max(axis=1, keepdims=True)
    logz = np.log(np.exp(shifted).sum(axis=1))
    p = np.exp(shifted - logz[:, None])
    loss = (logz - shifted[np.arange(n), labels]).mean()
    onehot = np.eye(c)[labels]
    hess = (np.einsum("na,ab->nab", p, np.eye(c)) - np.einsum("na,nb->nab", p, p)) / n
    return loss, (p - onehot) / n, hess


def fit(
    kernel, labels, lam: float, *, num_outputs: int = 1, offset=None, max_iter: int = 100, tol: float = 1e-10
) -> KLRFit:
    """Minimises the objective above for ``kernel`` ``(n*C, n*C)`` and integer ``labels`` ``(n,)``.

    ``offset`` (``(n, C)``, optional) is f0, the outputs at init, for the linearized model.
    """
    k = np.asarray(kernel, np.float64)
    labels = np.asarray(labels, np.int64)
    n, c = len(labels), num_outputs
    if k.shape != (n * c, n * c):
        raise ValueError(f"kernel is {k.shape}; {n} examples with {c} outputs need {(n * c, n * c)}")
    if lam <= 0:
        raise ValueError(f"lam must be positive; got {lam}")
    f0 = np.zeros((n, c)) if offset is None else np.asarray(offset, np.float64).reshape(n, c)
    s, u = np.linalg.eigh((k + k.T) / 2)
    keep = s > max(s.max(), 0.0) * 1e-12
    root = np.sqrt(s[keep])
    phi = u[:, keep] * root  # (n*C, r): f = phi w
    blocks = phi.reshape(n, c, -1)

    def objective(w):
        f = f0 + (phi @ w).reshape(n, c)
        loss, g, h = _loss_terms(f, labels)
        return loss + 0.5 * lam * w @ w, g, h

    w = np.zeros(phi.shape[1])
    value, g_f, h_f = objective(w)
    history, converged = [value], False
    for _ in range(max_iter):
        grad = phi.T @ g_f.reshape(-1) + lam * w
        if np.abs(grad).max() < tol:
            converged = True
            break
        hess = np.einsum("nar,nab,nbs->rs", blocks, h_f, blocks) + lam * np.eye(len(w))
        step = -np.linalg.solve(hess, grad)
        t, slope = 1.0, grad @ step
        while True:
            candidate = objective(w + t * step)
            if candidate[0] <= value + 1e-4 * t * slope or t < 1e-10:
                break
            t *= 0.5
        if candidate[0] > value:  # no decrease left at machine precision
            converged = True
            break
        w, (value, g_f, h_f) = w + t * step, candidate
        history.append(value)
        if history[-2] - value <= tol * max(1.0, abs(value)):
            converged = True
            break
    alpha = u[:, keep] @ (w / root)
    return KLRFit(alpha, float(lam), c, np.asarray(history), converged)


def decision(kernel_cross, alpha, num_outputs: int = 1, offset=None) -> np.ndarray:
    """``(m, C)`` outputs ``K(X_new, X) alpha (+ f0)`` for the cross kernel ``(m*C, n*C)``."""
    f = (np.asarray(kernel_cross, np.float64) @ np.asarray(alpha, np.float64)).reshape(-1, num_outputs)
    return f if offset is None else f + np.asarray(offset, np.float64).reshape(f.shape)


def predict(outputs) -> np.ndarray:
    """Class ids of ``(m, C)`` outputs: the sign of a logit difference, else the argmax."""
    outputs = np.asarray(outputs)
    return (outputs[:, 0] > 0).astype(np.int64) if outputs.shape[1] == 1 else outputs.argmax(axis=1)


def mean_loss(outputs, labels) -> float:
    return float(_loss_terms(np.asarray(outputs, np.float64), np.asarray(labels, np.int64))[0])


def holdout_split(labels, fraction: float = 0.25, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(fit_rows, heldout_rows)``: ``max(1, round(fraction * k))`` of each class held out."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    fit_rows, held = [], []
    for cls in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == cls))
        if len(rows) < 2:
            raise ValueError(f"class {cls} has {len(rows)} example(s); holding some out needs at least 2")
        m = min(len(rows) - 1, max(1, round(fraction * len(rows))))
        held += list(rows[:m])
        fit_rows += list(rows[m:])
    return np.sort(fit_rows), np.sort(held)


def _rows(rows: np.ndarray, c: int) -> np.ndarray:
    return (rows[:, None] * c + np.arange(c)).reshape(-1)


def select_lambda(
    kernel, labels, lambdas=DEFAULT_LAMBDAS, *, num_outputs: int = 1, fraction: float = 0.25, seed: int = 0, offset=None
) -> tuple[float, dict[float, tuple[float, float]]]:
    """The lambda with the best held-out accuracy (ties: lower held-out loss, then larger lambda).

    Returns it and ``{lam: (accuracy, loss)}`` on the held-out examples.
    """
    k = np.asarray(kernel, np.float64)
    labels = np.asarray(labels, np.int64)
    c = num_outputs
    fit_rows, held = holdout_split(labels, fraction, seed)
    fr, hr = _rows(fit_rows, c), _rows(held, c)
    f0 = None if offset is None else np.asarray(offset, np.float64).reshape(len(labels), c)
    scores = {}
    for lam in lambdas:
        model = fit(
            k[np.ix_(fr, fr)], labels[fit_rows], lam, num_outputs=c, offset=None if f0 is None else f0[fit_rows]
        )
        out = decision(k[np.ix_(hr, fr)], model.alpha, c, None if f0 is None else f0[held])
        scores[float(lam)] = (float(np.mean(predict(out) == labels[held])), mean_loss(out, labels[held]))
    best = max(scores, key=lambda lam: (scores[lam][0], -scores[lam][1], lam))
    return best, scores
