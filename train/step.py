"""The train and eval steps, shared by every method, the trainer and the benchmarks.

Only the trainable tree is differentiated; the frozen tree is an argument (never
closed over, so XLA does not constant-fold the weights). Dropout keys are
``fold_in(rng, step)``, so a resumed run draws the same masks.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec as P

from rocoft_jax import sharding
from train.methods import Method

LOSSES = ("classification", "regression", "causal-lm")


class TrainState(struct.PyTreeNode):
    step: jax.Array
    trainable: Any
    opt_state: Any
    rng: jax.Array


def _decays(path, leaf) -> bool:
    """Weight decay skips biases and norm scales of fully trained leaves, as HF's Trainer does."""
    name = str(getattr(path[-1], "key", path[-1]))
    return path[0].key != "train" or name not in ("bias", "scale") and "LayerNorm" not in str(path)


def make_optimizer(lr: float, total_steps: int, warmup_steps: int = 0, weight_decay: float = 0.0,
                   schedule: str = "cosine", max_grad_norm: float = 0.0):
    """AdamW (torch defaults) with linear warmup then cosine or linear decay to 0.

    Returns ``(optimizer, schedule_fn)``.
    """
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    if schedule == "cosine":
        sched = optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, max(total_steps, 1), 0.0)
    elif schedule == "linear":
        sched = optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup_steps),
             optax.linear_schedule(lr, 0.0, max(total_steps - warmup_steps, 1))], [warmup_steps])
    elif schedule == "constant":
        sched = optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), optax.constant_schedule(lr)],
                                     [warmup_steps])
    else:
        raise ValueError(f"unknown lr schedule {schedule!r}; choose cosine, linear or constant")
    decay_mask = lambda tree: jax.tree_util.tree_map_with_path(_decays, tree)
    tx = optax.adamw(sched, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay, mask=decay_mask)
    if max_grad_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(max_grad_norm), tx)
    return tx, sched


def compute_loss(logits, batch, kind: str):
    """Mean loss over real examples (or, for causal LM, over real target tokens)."""
    if kind == "classification":
        return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["labels"]).mean()
    if kind == "regression":
        return jnp.mean((logits[..., 0].astype(jnp.float32) - batch["labels"]) ** 2)
    if kind == "causal-lm":
        weights = batch.get("loss_mask", batch["attention_mask"])[:, 1:].astype(jnp.float32)
        per_token = optax.softmax_cross_entropy_with_integer_labels(
            logits[:, :-1].astype(jnp.float32), batch["input_ids"][:, 1:])
        return jnp.sum(per_token * weights) / jnp.maximum(jnp.sum(weights), 1.0)
    raise ValueError(f"unknown loss {kind!r}; choose one of {LOSSES}")


def init_state(trainable, tx, seed: int) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, opt_state=tx.init(trainable),
                      rng=jax.random.PRNGKey(seed))


def train_step(state: TrainState, frozen, batch, *, model, method: Method, tx, loss_kind: str,
               attention: str = "plain", remat: str | None = None):
    """One optimizer step on the trainable tree. Returns ``(state, {"loss", "grad_norm"})``."""
    dropout_rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(trainable):
        logits = method.apply(model, trainable, frozen, batch, dropout_rng=dropout_rng, train=True,
                              attention=attention, remat=remat)
        return compute_loss(logits, batch, loss_kind)

    loss, grads = jax.value_and_grad(loss_fn)(state.trainable)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    new_state = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state)
    return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}


def eval_step(trainable, frozen, batch, *, model, method: Method, attention: str = "plain"):
    """fp32 logits of a batch, dropout off."""
    return method.apply(model, trainable, frozen, batch, train=False, attention=attention).astype(jnp.float32)


class StepShardings(NamedTuple):
    state: Any
    frozen: Any
    batch: NamedSharding
    replicated: NamedSharding


def step_shardings(mesh, family: str | None, state, frozen) -> StepShardings:
    """Where the state, frozen weights and batches live on ``mesh`` (see `rocoft_jax.sharding`)."""
    return StepShardings(sharding.shardings(state, family, mesh), sharding.shardings(frozen, family, mesh),
                         NamedSharding(mesh, sharding.BATCH), NamedSharding(mesh, P()))


def compile_steps(model, method: Method, tx, loss_kind: str, shardings: StepShardings, donate: bool = True,
                  attention: str = "plain", remat: str | None = None):
    """The jitted, sharded ``(train_step, eval_step)``: the only place steps are jitted.

    The train state's buffers are donated; metrics and eval logits come back
    replicated, so every process can read them.
    """
    sh = shardings
    train_fn = jax.jit(
        functools.partial(train_step, model=model, method=method, tx=tx, loss_kind=loss_kind, attention=attention,
                          remat=remat),
        in_shardings=(sh.state, sh.frozen, sh.batch), out_shardings=(sh.state, sh.replicated),
        donate_argnums=(0,) if donate else ())
    eval_fn = jax.jit(functools.partial(eval_step, model=model, method=method, attention=attention),
                      in_shardings=(sh.state.trainable, sh.frozen, sh.batch), out_shardings=sh.replicated)
    return train_fn, eval_fn


def init_sharded_state(trainable, tx, seed: int, mesh, family: str | None, frozen):
    """The initial train state created directly in its sharded layout, plus all step shardings."""
    abstract = jax.eval_shape(lambda t: init_state(t, tx, seed), trainable)
    sh = step_shardings(mesh, family, abstract, frozen)
    state = jax.jit(lambda t: init_state(t, tx, seed), in_shardings=(sh.state.trainable,),
                    out_shardings=sh.state)(trainable)
    return state, sh
