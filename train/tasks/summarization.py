"""The summarization tasks of `train.run`: XSum and CNN/DailyMail on an encoder-decoder LM, scored by ROUGE.

``python -m train.run --model facebook/bart-large --task xsum`` (or ``cnn_dailymail``) fine-tunes an HF Flax
``*ForConditionalGeneration`` (BART and the families that share its modules, `rocoft_jax.families`' "bart"
record: mBART, Pegasus, Marian, Blenderbot; T5 does not run on jax >= 0.10 and is refused) with the
teacher-forced next-token loss on the summary (`train.step.loss_sum`, kind "seq2seq-lm", label-smoothed by
--label-smoothing), then summarizes the --eval-split by beam search through the method's own layers (the
sliced matmul for RoCoFT: no merged copy of the weights) and scores the summaries with ROUGE-1/2/L/Lsum
(`train.rouge`). `SummarizationJob` is the trainer's `Job` for them; data and batches are
`train.summarization_data`'s.

The train split is tokenized once, in `SummarizationJob.prepare` (`summarization_data.encode_pairs`). With one
process a step's sources and targets are each padded to the smallest power-of-two bucket holding their longest
row (up to --max-source-length and --max-target-length), and a step whose sources have no padding drops their
attention mask; with several, rows are padded to those maxima, so all processes agree on the batch without
talking. Every example's lengths being known, the job plans each step shape of the run ahead
(`SummarizationJob.planned_batches`), so all compile before the loop. With --grad-accum N the arrays are
(B, N, ...), as for the LLM tasks. Generation is costly, so by default the job evaluates only after the last
step. ``--model tiny-bart`` is a random-init 2+2-layer BART read with the offline byte tokenizer
(`train.byte_tokenizer`).
"""

from __future__ import annotations

import copy
import importlib.util
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm
from transformers.generation.flax_logits_process import FlaxLogitsProcessor, FlaxLogitsProcessorList

import rocoft_jax
from rocoft_jax import families
from train import distributed, models, strict_json
from train import input_pipeline as pipeline
from train.byte_tokenizer import make_byte_tokenizer
from train.config import TrainConfig
from train.errors import ConfigError, ModelError
from train.rouge import ROUGE_TYPES, rouge_scores
from train.summarization_data import Seq2SeqLayout, encode, encode_pairs, get_task, load_split
from train.tasks.base import MicroBatchedRows

PREDICTIONS_FILE = "predictions.jsonl"
SEQ2SEQ_TYPES = families.model_types("seq2seq")
T5_TYPES = ("t5", "mt5", "longt5", "umt5")
MODEL_INPUTS = ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask")
_SUPPORTED = "a BART, mBART, Pegasus, Marian or Blenderbot checkpoint (e.g. facebook/bart-large) or --model tiny-bart"


def model_config(config: TrainConfig):
    """The HF config of --model, which must be a seq2seq LM this task trains; read before any weights load."""
    base = models.preset_config(config.model) if config.model in models.PRESETS else models.load_config(config.model)
    kind = base.model_type
    if kind in T5_TYPES:
        raise ModelError(
            f"--model {config.model} is a {kind} model, and transformers' Flax T5 does not run on jax >= 0.10 "
            f"(it calls jnp.clip(a_max=), which jax removed); use {_SUPPORTED}"
        )
    if kind not in SEQ2SEQ_TYPES:
        raise ModelError(
            f"--task {config.task} trains a seq2seq LM, and --model {config.model} is a {kind} model without an "
            f"HF Flax seq2seq class here; use {_SUPPORTED}"
        )
    return base


def dropout_overrides(base, rate: float) -> dict[str, float]:
    """--dropout for every dropout rate of the model, BART's activation dropout too."""
    extra = {"activation_dropout": rate} if hasattr(base, "activation_dropout") else {}
    return {**models.dropout_overrides(base, rate), **extra}


class SummarizationJob(MicroBatchedRows):
    """XSum or CNN/DailyMail for the trainer's loop: seq2seq batches, and ROUGE of generated summaries."""

    loss_kind = "seq2seq-lm"
    metric_names = (*ROUGE_TYPES, "gen_len")
    eval_each_epoch = False  # generation is costly: by default only after the last step
    compiles_eval_step = False  # `Summarizer` compiles its own programs

    def __init__(self, config: TrainConfig):
        self.config, self.task = config, get_task(config.task)
        self.name = self.task.name
        if importlib.util.find_spec("rouge_score") is None:
            raise ConfigError(f"--task {self.name} is scored by Google's rouge-score package; pip install rouge-score")
        self.max_new_tokens = config.max_new_tokens or self.task.max_new_tokens
        if config.min_new_tokens > self.max_new_tokens:
            raise ConfigError(
                f"--min-new-tokens {config.min_new_tokens} exceeds the {self.max_new_tokens} tokens generated "
                "at most; lower it or raise --max-new-tokens"
            )
        base = model_config(config)
        limit = getattr(base, "max_position_embeddings", None)
        for flag, tokens in (
            ("--max-source-length", config.max_source_length),
            ("--max-target-length", config.max_target_length),
            ("--max-new-tokens", self.max_new_tokens + 1),  # the decoder also reads its start token
        ):
            if limit is not None and tokens > limit:
                raise ConfigError(
                    f"{flag} asks for {tokens} positions, but --model {config.model} has {limit}; lower it"
                )
        start = base.decoder_start_token_id
        if base.pad_token_id is None or (start is None and base.model_type != "mbart"):
            raise ModelError(f"--model {config.model}: its config names no pad or decoder start token id")
        self.layout = Seq2SeqLayout(base.pad_token_id, start, base.model_type == "mbart", config.label_smoothing)
        self.splits = self.read_splits() if config.data_dir is not None else None  # bad files fail before the model
        self.examples_per_step = config.batch_size * config.grad_accum
        self.summarizer: Summarizer | None = None
        self.generation_stats: dict[str, Any] = {}

    @classmethod
    def model_source(cls, config: TrainConfig) -> models.ModelSource:
        """A seq2seq LM; presets are random-init with the byte tokenizer."""
        base = model_config(config)
        overrides = dropout_overrides(base, config.dropout)
        if config.model in models.PRESETS:
            model_config_ = models.preset_config(config.model, **overrides)
            model, params = models.random_model_fast(model_config_, "seq2seq-lm", config.dtype, config.seed)
            tokenizer = make_byte_tokenizer(model_max_length=model_config_.max_position_embeddings)
            return models.ModelSource.of(model, params, tokenizer)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(config.model, use_fast=True)
        return models.pretrained_source(config.model, "seq2seq-lm", config.dtype, tokenizer, **overrides)

    def read_splits(self) -> tuple[list[dict], list[dict]]:
        """The train and --eval-split examples, cut to --limit-train / --limit-eval."""
        config = self.config
        columns = (config.text_column, config.summary_column)
        train = load_split(self.task, "train", config.data_dir, *columns)[: config.limit_train or None]
        evaluated = load_split(self.task, config.eval_split, config.data_dir, *columns)[: config.limit_eval or None]
        return train, evaluated

    def prepare(self, tokenizer, batch_sharding: NamedSharding) -> None:
        """Reads the splits from the hub (files in --data-dir were read when the job was made) and tokenizes the
        train split once (a progress bar for large splits)."""
        config = self.config
        self.tokenizer, self.sharding = tokenizer, batch_sharding
        self.train_records, self.eval_records = self.splits or self.read_splits()
        self.splits = None
        self.num_train = len(self.train_records)
        progress = distributed.is_main() and self.num_train >= pipeline.BAR_ROWS
        self.pairs = encode_pairs(
            tokenizer,
            self.train_records,
            config.max_source_length,
            config.max_target_length,
            self.layout.pad_id,
            progress=progress,
        )
        one = config.bucket and jax.process_count() == 1
        self.source_buckets = pipeline.bucket_lengths(config.max_source_length) if one else None
        self.target_buckets = pipeline.bucket_lengths(config.max_target_length) if one else None

    def local(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Tokenized, right-padded examples of ``rows`` (any shape), as arrays of shape ``rows.shape + (T,)``."""
        config = self.config
        flat = rows.reshape(-1)
        source_length, target_length = config.max_source_length, config.max_target_length
        if self.source_buckets:
            source_length = pipeline.fit_bucket(self.source_buckets, int(self.pairs.sources.lengths[flat].max()))
            target_length = pipeline.fit_bucket(self.target_buckets, int(self.pairs.targets.lengths[flat].max()))
        batch = self.pairs.batch(flat, source_length, target_length, self.layout)
        return {k: v.reshape(*rows.shape, *v.shape[1:]) for k, v in batch.items()}

    def shape_lengths(self):
        config = self.config
        lengths = [self.pairs.sources.lengths, self.pairs.targets.lengths]
        return lengths, [
            self.source_buckets or (config.max_source_length,),
            self.target_buckets or (config.max_target_length,),
        ]

    def calibration_batches(self):
        """Model inputs of the first --calibration-batches batches, for Wanda-scored selection.

        `rocoft_jax.activation_norms` leaves out the tokens that ``attention_mask`` (the source's) marks as
        padding wherever an activation has the source's shape, so the decoder arrays get one more column when
        their length would equal the source's: decoder activations are never masked with the source's mask
        (their padding counts in the decoder layers' norms).
        """
        config = self.config
        for step in range(config.calibration_batches):
            batch = self.local(pipeline.train_batch_indices(self.num_train, config.batch_size, config.seed, step))
            if batch["decoder_input_ids"].shape[1] == batch["input_ids"].shape[1]:
                for key, pad in (("decoder_input_ids", self.layout.pad_id), ("decoder_attention_mask", 0)):
                    batch[key] = np.pad(batch[key], ((0, 0), (0, 1)), constant_values=pad)
            yield {k: batch[k] for k in MODEL_INPUTS}

    def generation_config(self, model):
        """The model's own generation config (decoder start, forced BOS/EOS) with this run's search options."""
        config = self.config
        generation = copy.deepcopy(model.generation_config)
        generation.update(
            max_new_tokens=self.max_new_tokens,
            max_length=None,
            min_length=config.min_new_tokens + 1 if config.min_new_tokens else 0,  # + the decoder start token
            num_beams=config.num_beams,
            length_penalty=config.length_penalty,
            no_repeat_ngram_size=0,  # `NoRepeatNGram` instead: transformers' Flax one fails on jax >= 0.10
            early_stopping=True,  # BART's recipes: a beam search ends once num_beams summaries are finished
            do_sample=False,
            num_return_sequences=1,
        )
        return generation

    def evaluate(self, context, trainable, frozen) -> dict[str, float]:
        """ROUGE of the --eval-split's generated summaries, and their mean length; process 0 writes
        predictions.jsonl."""
        config = self.config
        if self.summarizer is None:
            self.summarizer = Summarizer(
                context.model,
                context.method,
                self.generation_config(context.model),
                batch_size=config.eval_batch_size or config.batch_size,
                batch_sharding=self.sharding,
                pad_id=self.layout.pad_id,
                no_repeat_ngram_size=config.no_repeat_ngram_size,
            )
            self.eval_sources = encode(
                self.tokenizer, [r["document"] for r in self.eval_records], config.max_source_length
            )
        buckets = pipeline.bucket_lengths(config.max_source_length)
        tokens, self.generation_stats = self.summarizer.summarize(
            trainable, frozen, self.eval_sources, buckets if self.source_buckets else buckets[-1:], self.name
        )
        generations = [self.tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]
        references = [r["summary"] for r in self.eval_records]
        metrics = {**rouge_scores(references, generations), "gen_len": float(np.mean([len(t) for t in tokens]))}
        if distributed.is_main():
            lines = [
                {"id": r["id"], "reference": r["summary"], "generation": g}
                for r, g in zip(self.eval_records, generations)
            ]
            with open(Path(context.output_dir) / PREDICTIONS_FILE, "w", encoding="utf-8") as f:
                f.writelines(strict_json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
        return metrics

    def results(self) -> dict[str, Any]:
        """What results.json adds for a summarization task."""
        config = self.config
        return {
            "eval_split": config.eval_split,
            "eval_examples": len(self.eval_records),
            "num_beams": config.num_beams,
            "max_new_tokens": self.max_new_tokens,
            "min_new_tokens": config.min_new_tokens,
            "length_penalty": config.length_penalty,
            "no_repeat_ngram_size": config.no_repeat_ngram_size,
            "generation": self.generation_stats,
        }


class Summarizer:
    """Generates summaries with one model and method; compiled programs persist across evaluations.

    Each process feeds its rows of every global batch of right-padded sources and receives all summaries.
    Sources are padded to a power-of-two bucket, so ``generate`` compiles once per bucket; with several
    processes only the largest bucket is used, so all agree on one shape, compiled before they meet.
    """

    def __init__(self, model, method, generation_config, *, batch_size, batch_sharding, pad_id, no_repeat_ngram_size=0):
        self.model, self.method, self.generation_config = model, method, generation_config
        processors = [NoRepeatNGram(no_repeat_ngram_size)] if no_repeat_ngram_size else []
        self.logits_processor = FlaxLogitsProcessorList(processors)
        self.batch_size, self.batch_sharding, self.pad_id = batch_size, batch_sharding, pad_id
        eos = generation_config.eos_token_id
        self.eos_ids = set(eos) if isinstance(eos, (list, tuple)) else {eos}
        replicated = NamedSharding(batch_sharding.mesh, PartitionSpec())
        self._generate = jax.jit(self._summaries, out_shardings=replicated)
        self._compiled: dict[int, Any] = {}
        self.compile_seconds = 0.0

    def _summaries(self, trainable, frozen, input_ids, attention_mask):
        """The generated tokens of each source, after the decoder's start token; pad after EOS."""
        with self.method.layers(trainable):
            out = self.model.generate(
                input_ids,
                generation_config=self.generation_config,
                attention_mask=attention_mask,
                params=rocoft_jax.with_trained_leaves(frozen, trainable),
                logits_processor=self.logits_processor,
            )
        return out.sequences[:, 1:]

    def _compiled_for(self, *args):
        length = args[2].shape[1]
        if length not in self._compiled:
            start = time.perf_counter()
            self._compiled[length] = self._generate.lower(*args).compile()
            self.compile_seconds += time.perf_counter() - start
            distributed.barrier(f"summarize_{length}")
        return self._compiled[length]

    def summarize(self, trainable, frozen, sources: list[list[int]], buckets, name: str):
        """``(tokens, stats)``: each source's summary tokens before EOS, and generation statistics."""
        summaries: list[list[int]] = []
        start, compiling = time.perf_counter(), self.compile_seconds
        bar = tqdm(
            total=len(sources),
            desc=f"summarize {name}",
            unit="ex",
            dynamic_ncols=True,
            disable=not distributed.is_main(),
        )
        for rows, weights in pipeline.eval_rows(len(sources), self.batch_size):
            length = pipeline.fit_bucket(buckets, max(len(sources[i]) for i in rows))
            mine = pipeline.shard_for_process(rows, jax.process_index(), jax.process_count())
            batch = distributed.batch_to_global(
                right_pad([sources[i] for i in mine], length, self.pad_id), self.batch_sharding, len(rows)
            )
            args = (trainable, frozen, batch["input_ids"], batch["attention_mask"])
            tokens = np.asarray(self._compiled_for(*args)(*args))
            for new in tokens[weights > 0].tolist():
                stop = next((i for i, t in enumerate(new) if t in self.eos_ids), len(new))
                summaries.append(new[:stop])
            bar.update(int(weights.sum()))
        bar.close()
        stats = {
            "examples": len(sources),
            "generated_tokens": sum(map(len, summaries)),
            "seconds": round(time.perf_counter() - start, 3),
            "compile_seconds": round(self.compile_seconds - compiling, 3),
        }
        return summaries, stats


class NoRepeatNGram(FlaxLogitsProcessor):
    """Bans every token that would complete an n-gram of ``size`` tokens already in the sequence.

    The rule of transformers' ``NoRepeatNGramLogitsProcessor`` (the decoder's start token counts). Its Flax
    version fails on jax >= 0.10 (a sparse gather in a mode jax's sparse module lacks); this one is dense: each
    earlier position i is compared with the last ``size - 1`` tokens, and a match bans the token at i + size - 1.
    """

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"an n-gram has at least 1 token; got {size}")
        self.size = size

    def __call__(self, input_ids, scores, cur_len):
        n, (rows, length) = self.size, input_ids.shape
        latest = jax.lax.dynamic_slice(input_ids, (0, jnp.maximum(cur_len - (n - 1), 0)), (rows, n - 1))
        # the n-gram at i lies inside the sequence so far; where it does, no shift below wraps around
        match = jnp.arange(length)[None, :] + n - 1 < cur_len
        for k in range(n - 1):
            match &= jnp.roll(input_ids, -k, axis=1) == latest[:, k : k + 1]
        completing = jnp.roll(input_ids, -(n - 1), axis=1)
        banned = (
            jnp.zeros(scores.shape, jnp.int32).at[jnp.arange(rows)[:, None], completing].max(match.astype(jnp.int32))
        )
        return jnp.where(banned > 0, -jnp.inf, scores)


def right_pad(rows: list[list[int]], length: int, pad_id: int) -> dict[str, np.ndarray]:
    """Token rows left-aligned in ``(len(rows), length)`` int32 arrays, as an encoder reads them."""
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for row, tokens in enumerate(rows):
        ids[row, : len(tokens)] = tokens
        mask[row, : len(tokens)] = 1
    return {"input_ids": ids, "attention_mask": mask}
