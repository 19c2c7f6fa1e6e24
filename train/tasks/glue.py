"""The GLUE tasks of `train.run`: sequence classification (STS-B: regression), scored from the logits.

`GlueJob` reads a task's splits (`train.glue`: the hub, GLUE TSV folders or parquet files), tokenizes each
step's rows (`Batches`) and evaluates every dev split with the trainer's compiled eval step, each example
exactly once across processes (`train.metrics`). The model is an HF Flax sequence classifier with the task's
number of labels; ``--model tiny`` is a random-init preset read with the demo's word-level tokenizer, so any
task runs offline once its data is on disk. GLUE evaluates every epoch by default.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from train import distributed, models
from train import input_pipeline as pipeline
from train.config import TrainConfig
from train.errors import ConfigError
from train.glue import TaskSpec, get_task, load_glue
from train.metrics import compute_metrics
from train.tasks.base import EvalContext

STEPS_PER_BUCKET = 50  # the run's steps per length bucket, at most: fewer buckets in short runs


class Batches:
    """Each split tokenized once (`pipeline.Encoded`); global batches of its rows, assembled per step.

    With one process, padding is cut to a length bucket (`pipeline.choose_buckets` over the first epoch's
    batches and the eval batches), and a train batch left with no padding drops its mask
    (`pipeline.drop_full_mask`: attention runs unmasked, in a second variant of the step); with several,
    every batch is padded to --max-length and keeps its mask, so all processes agree on the batch without
    talking to each other. Eval batches are built once and stay on the device across evaluations.
    """

    def __init__(self, config: TrainConfig, spec: TaskSpec, tokenizer, batch_sharding, splits: dict[str, dict]):
        self.config, self.spec, self.sharding = config, spec, batch_sharding
        self.encoded = {
            name: pipeline.encode_ragged(tokenizer, columns, spec.text_keys, config.max_length)
            for name, columns in splits.items()
        }
        self.num_train = len(self.encoded["train"].labels)
        self.buckets = self._choose_buckets() if config.bucket and jax.process_count() == 1 else None
        self._eval: dict[str, list] = {}

    def _choose_buckets(self) -> tuple[int, ...]:
        config, lengths = self.config, self.encoded["train"].lengths
        per_epoch = pipeline.steps_per_epoch(self.num_train, config.batch_size)
        rows = pipeline.epoch_permutation(self.num_train, config.seed, 0)[: per_epoch * config.batch_size]
        longest = list(lengths[rows].reshape(per_epoch, -1).max(axis=1))
        for split in self.spec.eval_splits:
            eval_lengths = self.encoded[split].lengths
            longest += [int(eval_lengths[r].max()) for r, _ in pipeline.eval_rows(len(eval_lengths), config.batch_size)]
        # A bucket costs a compile of each step program; in a short run it cannot pay for itself.
        limit = max(1, min(8, config.total_steps(per_epoch) // STEPS_PER_BUCKET))
        return pipeline.choose_buckets(longest, config.max_length, limit=limit)

    def local(self, split: str, rows) -> dict[str, np.ndarray]:
        """Rows ``rows`` of ``split`` on the host, cut to their bucket (also used for calibration)."""
        encoded = self.encoded[split]
        length = pipeline.fit_bucket(self.buckets, int(encoded.lengths[rows].max())) if self.buckets else None
        return encoded.batch(rows, length)

    def host(self, split: str, global_rows, train: bool = False) -> dict[str, np.ndarray]:
        """This process's rows of a global batch; a ``train`` batch may drop an all-ones mask."""
        mine = pipeline.shard_for_process(global_rows, jax.process_index(), jax.process_count())
        batch = self.local(split, mine)
        return pipeline.drop_full_mask(batch, jax.process_count()) if train else batch

    def make(self, split: str, global_rows, train: bool = False) -> dict[str, jax.Array]:
        """The global batch of ``global_rows`` of ``split`` (see the class doc for ``train``)."""
        return distributed.batch_to_global(self.host(split, global_rows, train), self.sharding, len(global_rows))

    def train_rows(self, step: int) -> np.ndarray:
        return pipeline.train_batch_indices(self.num_train, self.config.batch_size, self.config.seed, step)

    def train(self, step: int) -> dict[str, jax.Array]:
        return self.make("train", self.train_rows(step), train=True)

    def eval_batches(self, split: str) -> list[tuple[dict[str, jax.Array], np.ndarray, np.ndarray]]:
        """``(batch, rows, weights)`` of every eval batch of ``split``, built on the first call and kept."""
        if split not in self._eval:
            self._eval[split] = [
                (self.make(split, rows), rows, weights)
                for rows, weights in pipeline.eval_rows(len(self.encoded[split].labels), self.config.batch_size)
            ]
        return self._eval[split]

    def planned(self, total_steps: int) -> tuple[list[dict], list[dict]]:
        """``(train, eval)``: one global batch of ``jax.ShapeDtypeStruct`` per distinct shape the run's
        ``total_steps`` train steps and its evaluations will feed the steps."""
        config = self.config
        if jax.process_count() > 1:  # every batch is padded to --max-length and keeps its mask
            steps = range(min(total_steps, 1))
        else:  # without buckets, a batch whose rows all fill --max-length drops its mask: a second shape
            lengths = self.encoded["train"].lengths
            buckets = self.buckets or (config.max_length,)
            steps = pipeline.steps_by_shape(lengths, config.batch_size, config.seed, total_steps, buckets)
        train = (self.host("train", self.train_rows(step), train=True) for step in steps)
        evals = (
            self.host(split, rows)
            for split in self.spec.eval_splits
            for rows, _ in pipeline.eval_rows(len(self.encoded[split].labels), config.batch_size)
        )
        return pipeline.distinct_shapes(train, config.batch_size), pipeline.distinct_shapes(evals, config.batch_size)


def evaluate(eval_fn, trainable, frozen, batches: Batches, spec: TaskSpec) -> dict:
    """Metrics over every example of each eval split exactly once, across processes.

    The batches' logits stay on the device until the split's last batch is queued: one wait per split.
    """
    metrics: dict[str, float] = {}
    for split in spec.eval_splits:
        labels = batches.encoded[split].labels
        queued = [(eval_fn(trainable, frozen, batch), rows, w) for batch, rows, w in batches.eval_batches(split)]
        logits = np.concatenate([np.asarray(out) for out, _, _ in queued])
        targets = np.concatenate([labels[rows] for _, rows, _ in queued])
        weights = np.concatenate([w for _, _, w in queued])
        metrics.update(compute_metrics(spec, logits, targets, weights, split=split))
    return metrics


class GlueJob:
    """A GLUE task: classification (or STS-B regression) batches, dev metrics from the logits."""

    eval_each_epoch = True
    compiles_eval_step = True

    def __init__(self, config: TrainConfig):
        if config.grad_accum != 1:
            raise ConfigError("--grad-accum applies to the LLM tasks; for GLUE raise --batch-size instead")
        self.config, self.spec = config, get_task(config.task)
        self.name, self.metric_names = self.spec.name, self.spec.metric_names
        self.loss_kind = "regression" if self.spec.is_regression else "classification"
        self.examples_per_step = config.batch_size

    @classmethod
    def model_source(cls, config: TrainConfig) -> models.ModelSource:
        """A sequence classifier; 'tiny' is random-init with the demo tokenizer."""
        spec = get_task(config.task)
        if config.model == "tiny":
            from train.tasks.demo import make_demo_tokenizer  # the demo module builds on this one

            overrides = {
                "num_labels": spec.num_labels,
                "hidden_dropout_prob": config.dropout,
                "attention_probs_dropout_prob": config.dropout,
            }
            model_cfg = models.preset_config("tiny", **overrides)
            model, params = models.random_model(model_cfg, "sequence-classification", config.dtype, config.seed)
            tokenizer = make_demo_tokenizer(model_max_length=model_cfg.max_position_embeddings - 2)
            return models.ModelSource.of(model, params, tokenizer)
        from transformers import AutoTokenizer

        dropout = models.dropout_overrides(models.load_config(config.model), config.dropout)
        tokenizer = AutoTokenizer.from_pretrained(config.model, use_fast=True)
        return models.pretrained_source(
            config.model, "sequence-classification", config.dtype, tokenizer, num_labels=spec.num_labels, **dropout
        )

    def read_splits(self) -> dict[str, dict[str, list]]:
        """Raw columns of the train and eval splits."""
        return load_glue(self.spec.name, self.config.data_dir)

    def prepare(self, tokenizer, batch_sharding: NamedSharding) -> None:
        """Reads every split, cut to --limit-train / --limit-eval, and tokenizes each once."""
        data = self.read_splits()
        for split, columns in data.items():
            limit = self.config.limit_train if split == "train" else self.config.limit_eval
            if limit:
                data[split] = {k: v[:limit] for k, v in columns.items()}
        self.batches = Batches(self.config, self.spec, tokenizer, batch_sharding, data)
        self.num_train = self.batches.num_train

    def train_batch(self, step: int) -> dict[str, jax.Array]:
        return self.batches.train(step)

    def planned_batches(self, total_steps: int) -> tuple[list[dict], list[dict]]:
        return self.batches.planned(total_steps)

    def calibration_batches(self):
        for s in range(self.config.calibration_batches):
            yield self.batches.local("train", self.batches.train_rows(s))

    def evaluate(self, context: EvalContext, trainable, frozen) -> dict[str, float]:
        return evaluate(context.eval_fn, trainable, frozen, self.batches, self.spec)

    def results(self) -> dict[str, Any]:
        return {}
