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


class Batches:
    """Tokenizes this process's rows of each global batch and assembles global arrays.

    Only this process's share is tokenized. With one process, padding is cut to
    a length bucket, and a train batch left with no padding drops its mask
    (`pipeline.drop_full_mask`: attention runs unmasked, in a second variant of
    the step); with several, every batch is padded to --max-length and keeps its
    mask, so all processes agree on the batch without talking to each other.
    """

    def __init__(self, config: TrainConfig, spec: TaskSpec, tokenizer, batch_sharding):
        self.config, self.spec, self.tokenizer, self.sharding = config, spec, tokenizer, batch_sharding
        self.buckets = (
            pipeline.bucket_lengths(config.max_length) if config.bucket and jax.process_count() == 1 else None
        )

    def local(self, columns, rows) -> dict[str, np.ndarray]:
        """Tokenized rows on the host (also used for calibration)."""
        batch = pipeline.encode(
            self.tokenizer, pipeline.select(columns, rows), self.spec.text_keys, self.config.max_length
        )
        return pipeline.trim_to_bucket(batch, self.buckets) if self.buckets else batch

    def make(self, columns, global_rows, train: bool = False) -> dict[str, jax.Array]:
        """The global batch of ``global_rows``; a ``train`` batch may drop an all-ones mask (see the class doc)."""
        mine = pipeline.shard_for_process(global_rows, jax.process_index(), jax.process_count())
        batch = self.local(columns, mine)
        if train:
            batch = pipeline.drop_full_mask(batch, jax.process_count())
        return distributed.batch_to_global(batch, self.sharding, len(global_rows))

    def train(self, columns, step: int) -> dict[str, jax.Array]:
        rows = pipeline.train_batch_indices(len(columns["label"]), self.config.batch_size, self.config.seed, step)
        return self.make(columns, rows, train=True)


def evaluate(eval_fn, trainable, frozen, data, batches: Batches, spec: TaskSpec, config: TrainConfig) -> dict:
    """Metrics over every example of each eval split exactly once, across processes."""
    metrics: dict[str, float] = {}
    for split in spec.eval_splits:
        columns = data[split]
        labels = np.asarray(columns["label"])
        logits, targets, weights = [], [], []
        for rows, w in pipeline.eval_rows(len(labels), config.batch_size):
            logits.append(np.asarray(eval_fn(trainable, frozen, batches.make(columns, rows))))
            targets.append(labels[rows])
            weights.append(w)
        metrics.update(
            compute_metrics(spec, np.concatenate(logits), np.concatenate(targets), np.concatenate(weights), split=split)
        )
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
    def load_model_and_tokenizer(cls, config: TrainConfig):
        """``(model, params, tokenizer)``: a sequence classifier; 'tiny' is random-init with the demo tokenizer."""
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
            return model, params, make_demo_tokenizer(model_max_length=model_cfg.max_position_embeddings - 2)
        from transformers import AutoTokenizer

        dropout = models.dropout_overrides(models.load_config(config.model), config.dropout)
        model, params = models.load_pretrained(
            config.model, "sequence-classification", config.dtype, num_labels=spec.num_labels, **dropout
        )
        return model, params, AutoTokenizer.from_pretrained(config.model, use_fast=True)

    def read_splits(self) -> dict[str, dict[str, list]]:
        """Raw columns of the train and eval splits."""
        return load_glue(self.spec.name, self.config.data_dir)

    def prepare(self, tokenizer, batch_sharding: NamedSharding) -> None:
        """Reads every split, cut to --limit-train / --limit-eval."""
        self.data = self.read_splits()
        for split, columns in self.data.items():
            limit = self.config.limit_train if split == "train" else self.config.limit_eval
            if limit:
                self.data[split] = {k: v[:limit] for k, v in columns.items()}
        self.columns = self.data["train"]
        self.num_train = len(self.columns["label"])
        self.batches = Batches(self.config, self.spec, tokenizer, batch_sharding)

    def train_batch(self, step: int) -> dict[str, jax.Array]:
        return self.batches.train(self.columns, step)

    def calibration_batches(self):
        config = self.config
        for s in range(config.calibration_batches):
            yield self.batches.local(
                self.columns, pipeline.train_batch_indices(self.num_train, config.batch_size, config.seed, s)
            )

    def evaluate(self, context: EvalContext, trainable, frozen) -> dict[str, float]:
        return evaluate(context.eval_fn, trainable, frozen, self.data, self.batches, self.spec, self.config)

    def results(self) -> dict[str, Any]:
        return {}
