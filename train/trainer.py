"""`train_and_evaluate`: one fine-tuning run, from config to results.json.

Data flows one way: config -> data and model -> method (selection) -> state
-> steps -> checkpoints and reports. The batch of step s depends only on
(seed, s) and dropout on fold_in(rng, s), so a resumed run replays exactly.
"""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import rocoft_jax
from train import checkpoint as ckpt
from train import input_pipeline as pipeline
from train import methods as methods_lib
from train import models, reporting, step as step_lib
from train.config import ConfigError, TrainConfig, save as save_config
from train.demo_task import make_demo_tokenizer
from train.glue import TaskSpec, get_task, load_task
from train.metrics import compute_metrics

DROPOUT_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout")


def prepare_output_dir(config: TrainConfig) -> Path:
    out = Path(config.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
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


def load_model_and_tokenizer(config: TrainConfig, spec: TaskSpec):
    """``(model, params, tokenizer)``; 'tiny' is random-init with the demo tokenizer."""
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
    from transformers import AutoConfig

    try:
        base = AutoConfig.from_pretrained(config.model)
    except OSError as err:
        raise models.ModelError(f"cannot load the config of --model {config.model} ({str(err).splitlines()[0]}); "
                                "give a local model dir or a reachable hub id") from err
    return {k: config.dropout for k in DROPOUT_KEYS if hasattr(base, k)}


def encode_splits(config: TrainConfig, spec: TaskSpec, tokenizer) -> dict[str, dict[str, np.ndarray]]:
    data = load_task(spec.name, config.data_dir)
    encoded = {}
    for split, columns in data.items():
        limit = config.limit_train if split == "train" else config.limit_eval
        if limit:
            columns = {k: v[:limit] for k, v in columns.items()}
        encoded[split] = pipeline.encode(tokenizer, columns, spec.text_keys, config.max_length)
    return encoded


def build_method(config: TrainConfig, model, params, train_data) -> methods_lib.Method:
    def calibrate(kernel_paths):
        batches = (pipeline.take(train_data, pipeline.train_batch_indices(
            len(train_data["labels"]), config.batch_size, config.seed, s)) for s in range(config.calibration_batches))
        return rocoft_jax.activation_norms(model, params, batches, kernel_paths)

    try:
        return methods_lib.build_method(
            config.method, params, rank=config.rank, mode=config.mode, strategy=config.strategy, seed=config.seed,
            train_bias=config.train_bias, lora_rank=config.lora_rank, lora_alpha=config.lora_alpha,
            calibrate=calibrate)
    except ValueError as err:
        raise ConfigError(str(err)) from err


def evaluate(eval_fn, state, frozen, encoded, spec: TaskSpec, config: TrainConfig) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for split in spec.eval_splits:
        logits, labels, weights = [], [], []
        for batch in pipeline.eval_batches(encoded[split], config.batch_size):
            logits.append(np.asarray(eval_fn(state.trainable, frozen, _device(batch, config))))
            labels.append(batch["labels"])
            weights.append(batch["weights"])
        metrics.update(compute_metrics(spec, np.concatenate(logits), np.concatenate(labels),
                                       np.concatenate(weights), split=split))
    return metrics


def _device(batch: dict[str, np.ndarray], config: TrainConfig) -> dict[str, jax.Array]:
    if config.bucket:
        batch = pipeline.trim_to_bucket(batch, pipeline.bucket_lengths(config.max_length))
    return {k: jnp.asarray(v) for k, v in batch.items()}


class _StopFlag:
    """Set by SIGTERM; the loop saves a checkpoint and exits at the next step boundary."""

    def __init__(self):
        self.set = False
        self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.set = True

    def restore(self):
        signal.signal(signal.SIGTERM, self.previous)


def train_and_evaluate(config: TrainConfig) -> dict[str, Any]:
    """Runs the whole job and returns what results.json holds."""
    spec = get_task(config.task)
    out = prepare_output_dir(config)
    model, params, tokenizer = load_model_and_tokenizer(config, spec)
    encoded = encode_splits(config, spec, tokenizer)
    train_data = encoded["train"]
    n_devices = jax.device_count()
    if config.batch_size % n_devices:
        raise ConfigError(f"--batch-size {config.batch_size} is not divisible by the {n_devices} devices; "
                          f"use a multiple of {n_devices}")
    method = build_method(config, model, params, train_data)
    print(f"{config.method}: {method.mask.summary()}")
    trainable, frozen = method.split(params)
    del params

    per_epoch = pipeline.steps_per_epoch(len(train_data["labels"]), config.batch_size)
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * per_epoch))
    eval_every = config.eval_every or per_epoch
    tx, schedule = step_lib.make_optimizer(config.lr, total_steps, config.warmup_steps, config.weight_decay,
                                           config.lr_schedule, config.max_grad_norm)
    loss_kind = "regression" if spec.is_regression else "classification"
    state = step_lib.init_state(trainable, tx, config.seed)
    train_fn, eval_fn = step_lib.compile_steps(model, method, tx, loss_kind)

    mgr = ckpt.manager(out / "checkpoints")
    meta = {"model": config.model, "fingerprint": ckpt.fingerprint(frozen), "config": config.to_dict(),
            "selection": {**method.describe(), "task": spec.name}}
    resume_step = None
    if config.resume:
        resume_step = mgr.latest_step()
        ckpt.check_compatible(ckpt.read_meta(mgr, resume_step), meta)
        state = ckpt.restore(mgr, resume_step, state)
        print(f"resumed from step {resume_step}")
    save_config(config, out / "config.yaml")
    log = reporting.MetricsLog(out, resume_step)

    def save(step: int) -> None:
        ckpt.save(mgr, step, state, {**meta, "data_position": {"step": step, "epoch": step / per_epoch}})

    start = int(state.step)
    stop = _StopFlag()
    metrics: dict[str, float] = {}
    pending: list[tuple[int, Any]] = []
    bar = tqdm(total=total_steps, initial=start, desc=f"{spec.name}/{config.method}", dynamic_ncols=True)
    t_last, n_last = time.perf_counter(), start
    try:
        for step in range(start, total_steps):
            idx = pipeline.train_batch_indices(len(train_data["labels"]), config.batch_size, config.seed, step)
            state, step_metrics = train_fn(state, frozen, _device(pipeline.take(train_data, idx), config))
            pending.append((step + 1, step_metrics["loss"]))
            done = step + 1
            if done % config.log_every == 0 or done == total_steps:
                now = time.perf_counter()
                losses = [(s, float(l)) for s, l in pending]
                pending.clear()
                lr = float(schedule(done - 1))
                for s, loss in losses:
                    if s % config.log_every == 0 or s == total_steps:
                        log.write({"step": s, "loss": loss, "lr": float(schedule(s - 1))})
                rate = (done - n_last) * config.batch_size / max(now - t_last, 1e-9)
                bar.set_postfix(loss=f"{losses[-1][1]:.4f}", lr=f"{lr:.2e}", ex_s=f"{rate:.0f}")
                t_last, n_last = now, done
            bar.update(1)
            if done % eval_every == 0 and done != total_steps:
                metrics = evaluate(eval_fn, state, frozen, encoded, spec, config)
                log.write({"step": done, **metrics})
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

    metrics = evaluate(eval_fn, state, frozen, encoded, spec, config)
    log.write({"step": total_steps, **metrics})
    print(reporting.eval_table(total_steps, metrics))
    save(total_steps)
    results = {"task": spec.name, "model": config.model, "method": config.method, "mode": config.mode,
               "rank": config.rank, "strategy": config.strategy, "num_trainable": method.mask.num_trainable,
               "num_total": method.mask.num_total, "steps": total_steps, "metrics": metrics}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    reporting.plot_curves(log.records(), spec.metric_names, out / "curves.png")
    return results
