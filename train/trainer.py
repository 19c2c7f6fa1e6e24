"""`train_and_evaluate`: one fine-tuning run, from config to results.json.

Data flows one way: config -> data and model -> method (selection) -> state
-> steps -> checkpoints and reports. The batch of step s depends only on
(seed, s) and dropout on fold_in(rng, s), so a resumed run replays exactly.
A job supplies what differs between task kinds (batches, calibration,
evaluation): `GlueJob` here for GLUE and the demo, `train.llm.LlmJob` for
the LLM tasks; the loop, checkpoints and sharding are shared.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import NamedSharding
from tqdm.auto import tqdm

import rocoft_jax
from rocoft_jax import sharding
from train import checkpoint as ckpt
from train import distributed
from train import input_pipeline as pipeline
from train import llm
from train import methods as methods_lib
from train import models, reporting, step as step_lib
from train.config import TrainConfig, is_llm_task, save as save_config
from train.errors import ConfigError
from train.demo_task import make_demo_tokenizer
from train.glue import TaskSpec, get_task, load_task
from train.metrics import compute_metrics


def prepare_output_dir(config: TrainConfig) -> Path:
    out = Path(config.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write_test.{os.getpid()}"  # one per process: several may share the dir
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"--output-dir {out} is not writable ({err.strerror}); choose another directory") from err
    has_ckpt = (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir())
    if has_ckpt and not config.resume:
        raise ConfigError(f"{out} already holds checkpoints; pass --resume to continue that run, "
                          "or choose a new --output-dir")
    if config.resume and not has_ckpt:
        raise ConfigError(f"--resume: no checkpoint in {out / 'checkpoints'}; drop --resume to start fresh")
    return out


def load_model_and_tokenizer(config: TrainConfig):
    """``(model, params, tokenizer)``; 'tiny' is random-init with the demo tokenizer; LLM tasks load a causal LM."""
    if is_llm_task(config.task):
        return llm.load_model_and_tokenizer(config)
    spec = get_task(config.task)
    if config.model == "tiny":
        overrides = {"num_labels": spec.num_labels, "hidden_dropout_prob": config.dropout,
                     "attention_probs_dropout_prob": config.dropout}
        model_cfg = models.preset_config("tiny", **overrides)
        model, params = models.random_model(model_cfg, "sequence-classification", config.dtype, config.seed)
        return model, params, make_demo_tokenizer(model_max_length=model_cfg.max_position_embeddings - 2)
    from transformers import AutoTokenizer

    model, params = models.load_pretrained(config.model, "sequence-classification", config.dtype,
                                           num_labels=spec.num_labels, **_dropout_overrides(config))
    return model, params, AutoTokenizer.from_pretrained(config.model, use_fast=True)


def _dropout_overrides(config: TrainConfig) -> dict[str, float]:
    return models.dropout_overrides(models.load_config(config.model), config.dropout)


def load_splits(config: TrainConfig, spec: TaskSpec) -> dict[str, dict[str, list]]:
    """Raw columns of every split, cut to --limit-train / --limit-eval."""
    data = load_task(spec.name, config.data_dir)
    for split, columns in data.items():
        limit = config.limit_train if split == "train" else config.limit_eval
        if limit:
            data[split] = {k: v[:limit] for k, v in columns.items()}
    return data


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
        self.buckets = (pipeline.bucket_lengths(config.max_length)
                        if config.bucket and jax.process_count() == 1 else None)

    def local(self, columns, rows) -> dict[str, np.ndarray]:
        """Tokenized rows on the host (also used for calibration)."""
        batch = pipeline.encode(self.tokenizer, pipeline.select(columns, rows), self.spec.text_keys,
                                self.config.max_length)
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


def build_method(config: TrainConfig, model, params, job) -> methods_lib.Method:
    def calibrate(kernel_paths):
        return rocoft_jax.activation_norms(model, params, job.calibration_batches(), kernel_paths)

    try:
        return methods_lib.build_method(
            config.method, params, rank=config.rank, mode=config.mode, strategy=config.strategy, seed=config.seed,
            train_bias=config.train_bias, lora_rank=config.lora_rank, lora_alpha=config.lora_alpha,
            calibrate=calibrate)
    except ValueError as err:
        raise ConfigError(str(err)) from err


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
        metrics.update(compute_metrics(spec, np.concatenate(logits), np.concatenate(targets),
                                       np.concatenate(weights), split=split))
    return metrics


class EvalContext(NamedTuple):
    """What a job's evaluation may use: the model, method, compiled eval step and output dir."""

    model: Any
    method: methods_lib.Method
    eval_fn: Any
    output_dir: Path


class GlueJob:
    """A GLUE task or the demo: classification (or STS-B regression) batches, dev metrics from the logits."""

    eval_each_epoch = True

    def __init__(self, config: TrainConfig):
        if config.grad_accum != 1:
            raise ConfigError("--grad-accum applies to the LLM tasks; for GLUE raise --batch-size instead")
        self.config, self.spec = config, get_task(config.task)
        self.name, self.metric_names = self.spec.name, self.spec.metric_names
        self.loss_kind = "regression" if self.spec.is_regression else "classification"
        self.examples_per_step = config.batch_size

    def prepare(self, tokenizer, batch_sharding: NamedSharding) -> None:
        self.data = load_splits(self.config, self.spec)
        self.columns = self.data["train"]
        self.num_train = len(self.columns["label"])
        self.batches = Batches(self.config, self.spec, tokenizer, batch_sharding)

    def train_batch(self, step: int) -> dict[str, jax.Array]:
        return self.batches.train(self.columns, step)

    def calibration_batches(self):
        config = self.config
        for s in range(config.calibration_batches):
            yield self.batches.local(
                self.columns, pipeline.train_batch_indices(self.num_train, config.batch_size, config.seed, s))

    def evaluate(self, context: EvalContext, trainable, frozen) -> dict[str, float]:
        return evaluate(context.eval_fn, trainable, frozen, self.data, self.batches, self.spec, self.config)

    def results(self) -> dict[str, Any]:
        return {}


def make_job(config: TrainConfig):
    """The job of ``config.task``; an unknown task is an error listing every task."""
    return llm.LlmJob(config) if is_llm_task(config.task) else GlueJob(config)


class _StopFlag:
    """Set by SIGTERM; the loop saves a checkpoint and exits at the next step boundary."""

    def __init__(self):
        self.set = False
        self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.set = True

    def restore(self):
        signal.signal(signal.SIGTERM, self.previous)


def print_sharding(state, frozen, shardings) -> None:
    """Every param's PartitionSpec, to debug a mesh."""
    from rocoft_jax.tree import flat_paths

    for tree, where in ((frozen, shardings.frozen), (state.trainable, shardings.state.trainable)):
        specs = flat_paths(jax.tree.map(lambda s: s.spec, where))
        for path, leaf in flat_paths(tree).items():
            print(f"{path:<80} {str(tuple(leaf.shape)):<16} {specs[path]}")


def train_and_evaluate(config: TrainConfig) -> dict[str, Any]:
    """Runs the whole job and returns what results.json holds (on every process)."""
    main = distributed.is_main()
    job = make_job(config)
    out = prepare_output_dir(config)
    n_devices = jax.device_count()
    for flag, size in (("--batch-size", config.batch_size), ("--eval-batch-size", config.eval_batch_size)):
        if size % n_devices:
            raise ConfigError(f"{flag} {size} is not divisible by the {n_devices} devices; "
                              f"use a multiple of {n_devices}")
    try:
        mesh = sharding.make_mesh(sharding.parse_mesh(config.mesh, n_devices))
    except ValueError as err:
        raise ConfigError(f"--mesh: {err}") from err
    model, params, tokenizer = load_model_and_tokenizer(config)
    job.prepare(tokenizer, NamedSharding(mesh, sharding.BATCH))
    method = build_method(config, model, params, job)
    if main:
        print(f"{config.method}: {method.mask.summary()}")
    try:
        remat = methods_lib.resolve_remat(config.remat, model.config.model_type,
                                          sum(x.size for x in jax.tree.leaves(params)))
    except ValueError as err:
        raise ConfigError(str(err)) from err
    trainable, frozen = method.split(params)
    del params
    fingerprint = ckpt.fingerprint(frozen)

    per_epoch = pipeline.steps_per_epoch(job.num_train, job.examples_per_step)
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * per_epoch))
    eval_every = config.eval_every or (per_epoch if job.eval_each_epoch else 0)
    tx, schedule = step_lib.make_optimizer(config.lr, total_steps, config.warmup_steps, config.weight_decay,
                                           config.lr_schedule, config.max_grad_norm)
    family = method.mask.family
    try:
        state, shardings = step_lib.init_sharded_state(trainable, tx, config.seed, mesh, family, frozen)
    except ValueError as err:
        raise ConfigError(f"--mesh {config.mesh}: {err}") from err
    frozen = distributed.to_global(frozen, shardings.frozen)
    try:
        attention = methods_lib.resolve_attention(config.attention)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    train_fn, eval_fn = step_lib.compile_steps(model, method, tx, job.loss_kind, shardings, attention=attention,
                                               remat=remat, grad_accum=config.grad_accum)
    if jax.process_count() > 1:  # every batch has one shape: compile now, then meet before any collective
        example = job.train_batch(0)
        train_fn = train_fn.lower(state, frozen, example).compile()
        if isinstance(job, GlueJob):  # LLM tasks evaluate by generation, compiled in train.generate
            eval_fn = eval_fn.lower(state.trainable, frozen, example).compile()
        distributed.barrier("compiled")
    context = EvalContext(model, method, eval_fn, out)
    if config.print_sharding and main:
        print_sharding(state, frozen, shardings)

    mgr = ckpt.manager(out / "checkpoints")
    meta = {"model": config.model, "fingerprint": fingerprint, "config": config.to_dict(),
            "selection": {**method.describe(), "task": job.name}, "process_count": jax.process_count()}
    resume_step = None
    if config.resume:
        resume_step = mgr.latest_step()
        ckpt.check_compatible(ckpt.read_meta(mgr, resume_step), meta)
        state = ckpt.restore(mgr, resume_step, state)
        if main:
            print(f"resumed from step {resume_step}")
    if main:
        save_config(config, out / "config.yaml")
    log = reporting.MetricsLog(out, resume_step, enabled=main)

    def save(step: int) -> None:
        ckpt.save(mgr, step, state, {**meta, "data_position": {"step": step, "epoch": step / per_epoch}})

    start = int(state.step)
    stop = _StopFlag()
    metrics: dict[str, float] = {}
    pending: list[tuple[int, Any]] = []
    bar = tqdm(total=total_steps, initial=start, desc=f"{job.name}/{config.method}", dynamic_ncols=True,
               disable=not main)
    t_last, n_last = time.perf_counter(), start
    try:
        for step in range(start, total_steps):
            state, step_metrics = train_fn(state, frozen, job.train_batch(step))
            pending.append((step + 1, step_metrics["loss"]))
            done = step + 1
            if done % config.log_every == 0 or done == total_steps:
                now = time.perf_counter()
                losses = [(s, float(l)) for s, l in pending]
                pending.clear()
                for s, loss in losses:
                    if s % config.log_every == 0 or s == total_steps:
                        log.write({"step": s, "loss": loss, "lr": float(schedule(s - 1))})
                rate = (done - n_last) * job.examples_per_step / max(now - t_last, 1e-9)
                bar.set_postfix(loss=f"{losses[-1][1]:.4f}", lr=f"{float(schedule(done - 1)):.2e}",
                                ex_s=f"{rate:.0f}")
                t_last, n_last = now, done
            bar.update(1)
            if eval_every and done % eval_every == 0 and done != total_steps:
                metrics = job.evaluate(context, state.trainable, frozen)
                log.write({"step": done, **metrics})
                if main:
                    bar.write(reporting.eval_table(done, metrics))
            if stop.set:
                save(done)
                bar.close()
                raise SystemExit(f"SIGTERM: saved a checkpoint at step {done} in {out / 'checkpoints'}; "
                                 "rerun with --resume to continue")
            if config.save_every and done % config.save_every == 0 and done != total_steps:
                save(done)
    finally:
        stop.restore()
        bar.close()

    metrics = job.evaluate(context, state.trainable, frozen)
    log.write({"step": total_steps, **metrics})
    save(total_steps)
    results = {"task": job.name, "model": config.model, "method": config.method, "mode": config.mode,
               "rank": config.rank, "strategy": config.strategy, "num_trainable": method.mask.num_trainable,
               "num_total": method.mask.num_total, "steps": total_steps, "metrics": metrics, **job.results()}
    if main:
        print(reporting.eval_table(total_steps, metrics))
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        reporting.plot_curves(log.records(), job.metric_names, out / "curves.png")
    return results
