"""What a run does on a step whose loss or gradient norm is NaN or infinite: stop, or skip the update.

Each train step returns a ``finite`` flag beside its loss (`train.step.train_step`); with ``--on-nonfinite
skip`` the step itself also leaves the trainable and optimizer state unchanged when the flag is false. The
flags stay on the device like the losses: `Guard.record` queues them after every step and `Guard.check`
reads them only where the host waits on the device anyway, at a metrics.jsonl line, an evaluation and a
checkpoint save. So a run never evaluates or saves past a bad step it has not seen. Before a save,
`Guard.check_state` also checks the state itself: an update can overflow to infinity even when the loss
and the gradients were finite, and no checkpoint may hold a non-finite value.

``stop`` raises `NonFiniteError` (exit code 3) on the first non-finite step; ``skip`` counts the skipped
steps (metrics.jsonl, results.json, the checkpoint's metadata, so a resume keeps counting) and raises on
the ``--max-nonfinite``-th consecutive one. The message names the step, the values and the last good
checkpoint, which is the latest one: every checkpoint passed these checks when it was written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax

from train import step as step_lib
from train.errors import NonFiniteError

POLICIES = ("stop", "skip")


class Guard:
    """The non-finite steps of one run: queued flags, the skip counts, and the error that ends the run."""

    def __init__(self, policy: str, limit: int, checkpoints, counts: dict[str, int] | None = None):
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; choose one of {POLICIES}")
        self.policy, self.limit, self.checkpoints = policy, limit, checkpoints
        counts = counts or {}
        self.skipped = int(counts.get("skipped", 0))
        self.consecutive = int(counts.get("consecutive", 0))
        self.pending: list[tuple[int, dict[str, jax.Array]]] = []
        self._state_finite = jax.jit(step_lib.all_finite)

    def record(self, step: int, metrics: dict[str, jax.Array]) -> None:
        """Queues the metrics of the step that made ``step`` steps done; nothing is read from the device."""
        self.pending.append((step, metrics))

    def poll(self) -> NonFiniteError | None:
        """Reads the queued flags in step order and updates the counts; the error that ends the run, or None."""
        pending, self.pending = self.pending, []
        flags = jax.device_get([metrics["finite"] for _, metrics in pending])
        for (step, metrics), finite in zip(pending, flags):
            if finite:
                self.consecutive = 0
                continue
            if self.policy == "stop":
                return self._error(f"training diverged at step {step}: {_values(metrics)}")
            self.skipped += 1
            self.consecutive += 1
            if self.consecutive >= self.limit:
                first = step - self.consecutive + 1
                return self._error(
                    f"training diverged: steps {first} to {step} were all non-finite and skipped "
                    f"(--max-nonfinite {self.limit}); at step {step}: {_values(metrics)}"
                )
        return None

    def check(self) -> None:
        """`poll`, raising its error."""
        error = self.poll()
        if error is not None:
            raise error

    def check_state(self, state, step: int) -> None:
        """`check`, then raises unless every trainable value and optimizer moment of ``state`` is finite."""
        self.check()
        if not bool(self._state_finite((state.trainable, state.opt_state))):
            raise self._error(
                f"training diverged at step {step}: the loss and gradients were finite but the updated "
                "trained values or optimizer moments are not (an update overflowed)"
            )

    def counts(self) -> dict[str, int]:
        """What a checkpoint keeps so that a resumed run goes on counting."""
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def line(self) -> dict[str, int]:
        """The keys a metrics.jsonl train line gains: the skipped steps so far, in skip mode only."""
        return {"skipped_steps": self.skipped} if self.policy == "skip" else {}

    def _error(self, what: str) -> NonFiniteError:
        step = self.checkpoints.latest_step()
        fixes = "a lower --lr or a --max-grad-norm" + (", or --on-nonfinite skip" if self.policy == "stop" else "")
        if step is None:
            good = f"none (--save-every N keeps periodic ones); rerun with {fixes}"
        else:
            good = f"{Path(str(self.checkpoints.directory)) / str(step)} (continue with --resume and {fixes})"
        return NonFiniteError(f"{what}. Last good checkpoint: {good}; no results.json was written")


def _values(metrics: dict[str, Any]) -> str:
    loss, grad_norm = (float(x) for x in jax.device_get((metrics["loss"], metrics["grad_norm"])))
    return f"loss {loss:g}, grad norm {grad_norm:g}"
