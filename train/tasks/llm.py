"""The LLM tasks of `train.run`: causal-LM fine-tuning on LLM-Adapters data, scored by generation.

``python -m train.run --task boolq`` (or any `llm_data.TASKS` name) trains an HF Flax causal LM with the
next-token loss on an LLM-Adapters JSON file, then answers the task's test set (`train.generate`, which
compiles its own programs: the trainer's eval step is unused). `LlmJob` is the trainer's `Job` for them.

The training file is tokenized once, in `LlmJob.prepare`, as LLM-Adapters' finetune.py does
(`llm_data.tokenize_records`, which equals `llm_data.tokenize_example` per record: the training template,
--cutoff, EOS; with --train-on-inputs false the prompt tokens are left out of the loss through ``loss_mask``),
and each step's rows are right-padded, as the fused GPU attention requires. With one process a step's rows are
padded to the smallest power-of-two bucket holding its longest example, and a step with no padding left drops
its attention mask (`input_pipeline.drop_full_mask`: attention runs unmasked, in a second variant of the step);
with several, rows are padded to --cutoff and keep the mask, so all processes agree on the batch without
talking. Every example's length being known, the job plans each step shape of the run ahead
(`LlmJob.planned_batches`), so all compile before the loop. With --grad-accum N the arrays are (B, N, T): N
micro-batches of --batch-size rows, accumulated inside the jitted step (`train.step.train_step`). Generation is
costly, so by default the job evaluates only after the last step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from train import distributed, generate, models
from train import input_pipeline as pipeline
from train.byte_tokenizer import make_byte_tokenizer
from train.config import TrainConfig
from train.errors import ConfigError, DataError, ModelError
from train.llm_data import find_file, get_task, load_records, tokenize_records
from train.tasks.base import MicroBatchedRows

MODEL_INPUTS = ("input_ids", "attention_mask")


def train_file(config: TrainConfig) -> Path:
    """--train-file, else the task's train.json under --data-dir; a missing one names the files that exist."""
    if config.train_file:
        path = Path(config.train_file).expanduser()
        if not path.is_file():
            raise DataError(
                f"--train-file {path} does not exist; pass an LLM-Adapters JSON file (a list of "
                "instruction/input/output/answer records)"
            )
        return path
    task = get_task(config.task)
    folder = Path(_data_dir(config)) / task.folder
    path = folder / "train.json"
    if not path.is_file():
        found = sorted(p.name for p in folder.glob("*.json")) if folder.is_dir() else []
        held = f"{folder} holds {', '.join(found)}" if found else f"{folder} holds no JSON file"
        raise DataError(
            f"no training file for {task.name}: {held}; pass --train-file FILE (any LLM-Adapters "
            "JSON, e.g. commonsense_170k.json or math_10k.json)"
        )
    return path


def _data_dir(config: TrainConfig) -> str:
    if not config.data_dir:
        folder = get_task(config.task).folder
        raise ConfigError(
            f"--task {config.task} needs --data-dir: LLM-Adapters' dataset/ folder, whose "
            f"{folder}/test.json is the test set (and {folder}/train.json the default training file)"
        )
    return config.data_dir


class LlmJob(MicroBatchedRows):
    """An LLM task for the trainer's loop: training batches, calibration batches and evaluation by generation."""

    loss_kind = "causal-lm"
    metric_names = ("accuracy",)
    eval_each_epoch = False  # generation is costly: by default only after the last step
    compiles_eval_step = False  # train.generate compiles its own programs

    def __init__(self, config: TrainConfig):
        for name, least in (("cutoff", 1), ("grad_accum", 1), ("num_beams", 1), ("max_new_tokens", 0)):
            if getattr(config, name) < least:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least {least}, got {getattr(config, name)}")
        self.config, self.task = config, get_task(config.task)
        self.name = self.task.name
        self.test_path = find_file(_data_dir(config), self.task.name, "test")
        self.train_path = train_file(config)
        self.max_new_tokens = config.max_new_tokens or self.task.max_new_tokens
        self.examples_per_step = config.batch_size * config.grad_accum
        self.generator = None

    @classmethod
    def model_source(cls, config: TrainConfig) -> models.ModelSource:
        """A causal LM; presets are random-init with the byte tokenizer."""
        if config.model in models.PRESETS:
            base = models.preset_config(config.model)
            if base.model_type not in models.CAUSAL_LM_TYPES:
                causal = ", ".join(
                    n for n in models.PRESETS if models.preset_config(n).model_type in models.CAUSAL_LM_TYPES
                )
                raise ModelError(
                    f"--task {config.task} trains a causal LM, and preset {config.model!r} is a "
                    f"{base.model_type} encoder; pass a hub id, a local model dir, or one of {causal}"
                )
            model_config = models.preset_config(config.model, **models.dropout_overrides(base, config.dropout))
            model, params = models.random_model_fast(model_config, "causal-lm", config.dtype, config.seed)
            return models.ModelSource.of(model, params, make_byte_tokenizer())
        from transformers import AutoTokenizer

        overrides = models.dropout_overrides(models.load_config(config.model), config.dropout)
        tokenizer = AutoTokenizer.from_pretrained(config.model, use_fast=True)
        return models.pretrained_source(config.model, "causal-lm", config.dtype, tokenizer, **overrides)

    def prepare(self, tokenizer, batch_sharding: NamedSharding) -> None:
        """Reads the training and test records (cut to --limit-train / --limit-eval) and tokenizes the training
        records once (a progress bar for large files)."""
        config = self.config
        self.tokenizer, self.sharding = tokenizer, batch_sharding
        self.train_records = load_records(self.train_path)[: config.limit_train or None]
        self.test_records = load_records(self.test_path)[: config.limit_eval or None]
        self.num_train = len(self.train_records)
        progress = distributed.is_main() and self.num_train >= pipeline.BAR_ROWS
        self.examples = tokenize_records(
            tokenizer, self.train_records, config.cutoff, train_on_inputs=config.train_on_inputs, progress=progress
        )
        self.buckets = pipeline.bucket_lengths(config.cutoff) if config.bucket and jax.process_count() == 1 else None

    def local(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Tokenized, right-padded examples of ``rows`` (any shape), as arrays of shape ``rows.shape + (T,)``."""
        flat = rows.reshape(-1)
        longest = int(self.examples.lengths[flat].max())
        length = pipeline.fit_bucket(self.buckets, longest) if self.buckets else self.config.cutoff
        return {k: v.reshape(*rows.shape, length) for k, v in self.examples.batch(flat, length).items()}

    def shape_lengths(self):
        return [self.examples.lengths], [self.buckets or (self.config.cutoff,)]

    def calibration_batches(self):
        """Model inputs of the first --calibration-batches micro-batches, for Wanda-scored selection."""
        config = self.config
        for step in range(config.calibration_batches):
            batch = self.local(pipeline.train_batch_indices(self.num_train, config.batch_size, config.seed, step))
            yield {k: batch[k] for k in MODEL_INPUTS}

    def evaluate(self, context, trainable, frozen) -> dict[str, float]:
        """Accuracy on the test records by generation; process 0 writes predictions.jsonl."""
        if self.generator is None:
            self.generator = generate.Generator(
                context.model,
                context.method,
                self.tokenizer,
                self.task,
                max_new_tokens=self.max_new_tokens,
                num_beams=self.config.num_beams,
                batch_size=self.config.eval_batch_size or self.config.batch_size,
                batch_sharding=self.sharding,
            )
        metrics, self.generation_stats = self.generator.evaluate(
            trainable, frozen, self.test_records, context.output_dir if distributed.is_main() else None
        )
        return metrics

    def results(self) -> dict[str, Any]:
        """What results.json adds for an LLM task."""
        return {
            "train_file": str(self.train_path),
            "test_file": str(self.test_path),
            "eval_examples": len(self.test_records),
            "num_beams": self.config.num_beams,
            "max_new_tokens": self.max_new_tokens,
            "generation": self.generation_stats,
        }
