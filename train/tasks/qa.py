"""Extractive question answering for `train.run`: SQuAD v1.1 (``--task squad``) and v2.0 (``--task squad_v2``).

`QaJob` reads the questions (`train.squad`: the hub, the official JSON files or parquet shards), cuts every
question and context into token windows once (``--max-length`` tokens, consecutive windows sharing
``--doc-stride``), and trains on the windows: an epoch is one pass over them, as in transformers' ``run_qa.py``.
The model is an HF Flax ``*ForQuestionAnswering`` whose span head ``qa_outputs`` is new and trained in full
(`rocoft_jax.families`); its start and end logits reach the loss stacked as (B, T, 2)
(`train.methods.output_logits`, loss "span" in `train.step.loss_sum`). ``--model tiny`` is a random-init
RoBERTa read with the demo's word-level tokenizer, for offline runs.

Evaluation runs the trainer's compiled eval step over every window of the dev split exactly once across
processes, finds each question's best span over its windows (`train.squad.postprocess`: ``--n-best``,
``--max-answer-length``, v2.0's ``--null-threshold``) and scores it by the official scripts' rules
(`train.squad_metric`): ``exact_match`` and ``f1`` in percent, v2.0 adds the ``has_ans_*`` and ``no_ans_*``
groups. Process 0 writes ``predictions.json`` (question id -> answer text, "" for no answer: the official
scripts' input). Batches are right-padded and, with one process, cut to a power-of-two length bucket; the
loss and the answers do not depend on the bucket. SQuAD evaluates every epoch by default, as GLUE does.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from train import distributed, models, squad, squad_metric, strict_json
from train import input_pipeline as pipeline
from train.config import TrainConfig
from train.errors import ConfigError, ModelError
from train.tasks.base import EvalContext

PREDICTIONS_FILE = "predictions.json"


def qa_model_types() -> tuple[str, ...]:
    """The ``model_type``s with an HF Flax question-answering class and a `rocoft_jax.families` record."""
    from transformers.models.auto.modeling_flax_auto import FLAX_MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES

    from rocoft_jax import families

    known = [t for kind in ("encoder", "seq2seq") for t in families.model_types(kind)]
    return tuple(t for t in known if t in FLAX_MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES)


def check_qa_model(model_config, name: str) -> None:
    """A `ModelError` unless ``model_config`` is of a model type `qa_model_types` lists."""
    supported = qa_model_types()
    if model_config.model_type not in supported:
        raise ModelError(
            f"--model {name} is a {model_config.model_type} model, which has no HF Flax question-answering "
            f"class rocoft_jax can train; use one of model types {', '.join(supported)} (DeBERTa-v3, the "
            "paper's QA model, has no Flax class)"
        )


class QaJob:
    """A SQuAD task: span-labelled token windows for training, EM and F1 of the dev answers for evaluation."""

    loss_kind = "span"
    eval_each_epoch = True
    compiles_eval_step = True

    def __init__(self, config: TrainConfig):
        if config.grad_accum != 1:
            raise ConfigError("--grad-accum applies to the LLM tasks; for SQuAD raise --batch-size instead")
        if config.doc_stride >= config.max_length:
            raise ConfigError(
                f"--doc-stride {config.doc_stride} must be less than --max-length {config.max_length}: it is the "
                "overlap of consecutive windows (the standard recipe: 128 of 384)"
            )
        self.config, self.task = config, squad.get_task(config.task)
        self.name, self.metric_names = self.task.name, self.task.metric_names
        self.examples_per_step = config.batch_size
        # Questions are read now, so bad data fails before any model loads; windows need the tokenizer.
        splits = squad.load_splits(self.task, config.data_dir)
        self.train_examples = splits["train"][: config.limit_train or None]
        self.eval_examples = splits["validation"][: config.limit_eval or None]

    @classmethod
    def model_source(cls, config: TrainConfig) -> models.ModelSource:
        """An HF Flax ``*ForQuestionAnswering``; 'tiny' is random-init with the demo tokenizer. A model type
        without a Flax QA class (or a family record) is a `ModelError`."""
        if config.model in models.PRESETS:
            check_qa_model(models.preset_config(config.model), config.model)
        if config.model == "tiny":
            from train.tasks.demo import make_demo_tokenizer

            overrides = {"hidden_dropout_prob": config.dropout, "attention_probs_dropout_prob": config.dropout}
            model_cfg = models.preset_config("tiny", **overrides)
            model, params = models.random_model(model_cfg, "question-answering", config.dtype, config.seed)
            tokenizer = make_demo_tokenizer(model_max_length=model_cfg.max_position_embeddings - 2)
            return models.ModelSource.of(model, params, tokenizer)
        from transformers import AutoTokenizer

        model_config = models.load_config(config.model)
        check_qa_model(model_config, config.model)
        dropout = models.dropout_overrides(model_config, config.dropout)
        tokenizer = AutoTokenizer.from_pretrained(config.model, use_fast=True)
        return models.pretrained_source(config.model, "question-answering", config.dtype, tokenizer, **dropout)

    def prepare(self, tokenizer, batch_sharding: NamedSharding) -> None:
        """Cuts the questions of both splits (read by the constructor, cut to --limit-train / --limit-eval)
        into windows."""
        config = self.config
        limit = getattr(tokenizer, "model_max_length", None)
        if limit is not None and limit < 10**6 and config.max_length > limit:
            raise ConfigError(
                f"--max-length {config.max_length} exceeds the {limit} tokens --model {config.model} takes; "
                f"pass --max-length {limit} or less"
            )
        self.train_features = squad.tokenize(
            tokenizer, self.train_examples, config.max_length, config.doc_stride, keep_offsets=False
        )
        self.eval_features = squad.tokenize(tokenizer, self.eval_examples, config.max_length, config.doc_stride)
        self.num_train = len(self.train_features)
        self.sharding = batch_sharding
        self.buckets = (
            pipeline.bucket_lengths(config.max_length) if config.bucket and jax.process_count() == 1 else None
        )

    def local(self, features: squad.Features, rows: np.ndarray, labels: bool = True) -> dict[str, np.ndarray]:
        """Windows ``rows`` on the host, padding cut to a bucket with one process."""
        batch = features.batch(rows, labels)
        return pipeline.trim_to_bucket(batch, self.buckets) if self.buckets else batch

    def host(self, features: squad.Features, global_rows: np.ndarray, train: bool) -> dict[str, np.ndarray]:
        """This process's windows of a global batch; a train batch without padding drops its mask."""
        mine = pipeline.shard_for_process(global_rows, jax.process_index(), jax.process_count())
        batch = self.local(features, mine, labels=train)
        return pipeline.drop_full_mask(batch, jax.process_count()) if train else batch

    def make(self, features: squad.Features, global_rows: np.ndarray, train: bool) -> dict[str, jax.Array]:
        """The global batch of windows ``global_rows`` (see `host`)."""
        return distributed.batch_to_global(self.host(features, global_rows, train), self.sharding, len(global_rows))

    def planned_batches(self, total_steps: int) -> tuple[list[dict], list[dict]]:
        """Every train and eval batch shape of ``total_steps`` steps and the evaluations."""
        config = self.config
        if self.buckets is None:
            steps = range(min(total_steps, 1))
        else:
            lengths = self.train_features.inputs["attention_mask"].sum(axis=1)
            steps = pipeline.steps_by_shape(lengths, config.batch_size, config.seed, total_steps, self.buckets)
        train = (self.host(self.train_features, self.train_rows(step), train=True) for step in steps)
        evals = (self.host(self.eval_features, rows, train=False) for rows, _ in self.eval_batch_rows())
        return pipeline.distinct_shapes(train, config.batch_size), pipeline.distinct_shapes(evals, config.batch_size)

    def eval_batch_rows(self):
        return pipeline.eval_rows(len(self.eval_features), self.config.batch_size)

    def train_rows(self, step: int) -> np.ndarray:
        return pipeline.train_batch_indices(self.num_train, self.config.batch_size, self.config.seed, step)

    def train_batch(self, step: int) -> dict[str, jax.Array]:
        return self.make(self.train_features, self.train_rows(step), train=True)

    def calibration_batches(self):
        config = self.config
        for s in range(config.calibration_batches):
            rows = pipeline.train_batch_indices(self.num_train, config.batch_size, config.seed, s)
            yield self.local(self.train_features, rows, labels=False)

    def span_logits(self, eval_fn, trainable, frozen) -> tuple[np.ndarray, np.ndarray]:
        """Start and end logits (N, L) of every dev window, each computed once across processes."""
        features = self.eval_features
        n, length = len(features), self.config.max_length
        start, end = np.full((n, length), -np.inf, np.float32), np.full((n, length), -np.inf, np.float32)
        for rows, weights in self.eval_batch_rows():
            logits = np.asarray(eval_fn(trainable, frozen, self.make(features, rows, train=False)))
            real = weights > 0
            start[rows[real], : logits.shape[1]] = logits[real, :, 0]
            end[rows[real], : logits.shape[1]] = logits[real, :, 1]
        return start, end

    def evaluate(self, context: EvalContext, trainable, frozen) -> dict[str, float]:
        """EM and F1 of the dev answers; process 0 writes predictions.json."""
        config = self.config
        start, end = self.span_logits(context.eval_fn, trainable, frozen)
        answers, _ = squad.postprocess(
            self.eval_examples,
            self.eval_features,
            start,
            end,
            self.task.version,
            n_best=config.n_best,
            max_answer_length=config.max_answer_length,
            null_threshold=config.null_threshold,
        )
        if distributed.is_main():
            (context.output_dir / PREDICTIONS_FILE).write_text(strict_json.dumps(answers, indent=2) + "\n")
        return squad_metric.squad_scores(answers, squad.references(self.eval_examples), self.task.version)

    def results(self) -> dict[str, Any]:
        """What results.json adds for SQuAD: the data's sizes and the answer search's options."""
        config = self.config
        extra = squad_metric.group_sizes(squad.references(self.eval_examples)) if self.task.version == 2 else {}
        return {
            "squad_version": "2.0" if self.task.version == 2 else "1.1",
            "train_examples": len(self.train_examples),
            "train_windows": len(self.train_features),
            "eval_examples": len(self.eval_examples),
            "eval_windows": len(self.eval_features),
            **extra,
            "max_length": config.max_length,
            "doc_stride": config.doc_stride,
            "n_best": config.n_best,
            "max_answer_length": config.max_answer_length,
            "null_threshold": config.null_threshold,
            "predictions_file": PREDICTIONS_FILE,
        }
