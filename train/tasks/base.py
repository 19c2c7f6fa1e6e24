"""The `Job` protocol: everything the trainer asks of a task, and nothing it may ask otherwise.

A job is made from the run's config, which it checks at once (bad task options fail before any model loads).
The trainer then calls, in order: `Job.model_source` (the model; its weights load later), `Job.prepare` (read
the data), `Job.planned_batches` (the shapes to compile ahead), and each step `Job.train_batch(step)`, whose
result depends only on (seed, step) so a resumed run replays exactly. Wanda
strategies draw `Job.calibration_batches`. `Job.evaluate` scores the trainable tree whenever the loop asks;
`Job.results` adds the job's own keys to results.json.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, Protocol

import jax
import numpy as np
from jax.sharding import NamedSharding

from train import distributed
from train import input_pipeline as pipeline


class EvalContext(NamedTuple):
    """What a job's evaluation may use: the model, method, compiled eval step and output dir."""

    model: Any
    method: Any  # train.methods.Method
    eval_fn: Any
    output_dir: Path


class Job(Protocol):
    """One task kind's data, loss and evaluation, as the trainer's loop consumes them."""

    name: str  # canonical task name, as results.json and the progress bar show it
    metric_names: tuple[str, ...]  # every metric `evaluate` returns; curves.png plots them
    loss_kind: str  # one of train.step.LOSSES
    examples_per_step: int  # examples in one optimizer step (throughput, steps per epoch)
    num_train: int  # training examples, known after `prepare`
    eval_each_epoch: ClassVar[bool]  # evaluate every epoch when --eval-every is 0, else only after the last step
    compiles_eval_step: ClassVar[bool]  # `evaluate` runs the trainer's eval step (ahead-of-time compiled
    # with several processes); False when the job compiles its own evaluation

    @classmethod
    def model_source(cls, config) -> Any:
        """The `train.models.ModelSource` (model, tokenizer, params' layout, and their loader) for this kind of
        task, without reading its data."""

    def prepare(self, tokenizer, batch_sharding: NamedSharding) -> None:
        """Reads the data (cut to --limit-train / --limit-eval); batches are laid out by ``batch_sharding``."""

    def train_batch(self, step: int) -> dict[str, jax.Array]:
        """The global batch of optimizer step ``step``, a function of (seed, step) alone."""

    def planned_batches(self, total_steps: int) -> tuple[list[Any], list[Any]] | None:
        """``(train, eval)``: one global batch (arrays or ``jax.ShapeDtypeStruct``s) per distinct shape that
        ``total_steps`` train steps and the trainer's eval step will meet, for compiling them all before the
        loop; None when the job cannot tell ahead (each shape then compiles at its first use)."""

    def calibration_batches(self) -> Iterator[dict[str, np.ndarray]]:
        """Host batches of model inputs for Wanda-scored selection."""

    def evaluate(self, context: EvalContext, trainable, frozen) -> dict[str, float]:
        """The task's metrics, identical on every process."""

    def results(self) -> dict[str, Any]:
        """What results.json adds for this kind of task."""


class MicroBatchedRows:
    """Train batches of a job whose examples are tokenized once: step s takes rows
    `input_pipeline.step_rows` of the train split ((B,), or (B, N) with --grad-accum N), padded per step by the
    job's ``local(rows)`` (arrays of shape ``rows.shape + (T,)``, lengths cut to a bucket).

    The job sets ``config``, ``num_train`` and ``sharding`` in `Job.prepare` and gives `shape_lengths`; this
    gives `step_rows`, `host`, `train_batch` and `planned_batches`.
    """

    def shape_lengths(self) -> tuple[Sequence[np.ndarray], Sequence[Sequence[int]]]:
        """``(lengths, buckets)``: each padded sequence's per-example token counts, and the lengths it is padded
        to (its buckets, or its one maximum)."""
        raise NotImplementedError

    def step_rows(self, step: int) -> np.ndarray:
        """Example indices of global step ``step``: (B,), or (B, N) whose column j is micro-batch j."""
        config = self.config
        return pipeline.step_rows(self.num_train, config.batch_size, config.grad_accum, config.seed, step)

    def host(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of step ``step``'s batch; with one process, a batch whose (source) rows have no
        padding drops its attention mask."""
        mine = pipeline.shard_for_process(self.step_rows(step), jax.process_index(), jax.process_count())
        return pipeline.drop_full_mask(self.local(mine), jax.process_count())

    def train_batch(self, step: int) -> dict[str, jax.Array]:
        return distributed.batch_to_global(self.host(step), self.sharding, self.config.batch_size)

    def planned_batches(self, total_steps: int) -> tuple[list[dict], list[dict]]:
        """One batch of ``jax.ShapeDtypeStruct``s per train-step shape of ``total_steps`` steps (every
        sequence's length, and whether the mask is dropped), found from the examples' lengths; no eval shapes
        (these jobs' generation compiles its own programs)."""
        config = self.config
        if jax.process_count() > 1:  # every batch is padded to the maxima and keeps its mask
            steps = range(min(total_steps, 1))
        else:
            lengths, buckets = self.shape_lengths()
            rows = config.batch_size * config.grad_accum  # a step's examples, whatever their layout
            steps = pipeline.steps_by_shapes(lengths, buckets, rows, config.seed, total_steps)
        return pipeline.distinct_shapes((self.host(step) for step in steps), config.batch_size), []
