"""The train and eval steps, shared by every method, the trainer and the benchmarks.

Only the trainable tree is differentiated; the frozen tree is an argument (never
closed over, so XLA does not constant-fold the weights). Dropout keys are
``fold_in(rng, step)``, so a resumed run draws the same masks. Each step reports
whether its loss and gradient norm are finite (on the device: reading the flag is
the host's choice, `train.nonfinite`), and can skip the update of a step that is not.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rocoft_jax import sharding
from train.methods import Method

LOSSES = ("classification", "regression", "causal-lm", "span", "seq2seq-lm")
IGNORE_INDEX = -100  # a seq2seq-lm label left out of the loss (target padding)


class TrainState(struct.PyTreeNode):
    step: jax.Array
    trainable: Any
    opt_state: Any
    rng: jax.Array


def _decays(path, leaf) -> bool:
    """Weight decay skips biases and norm scales of fully trained leaves, as HF's Trainer does."""
    name = str(getattr(path[-1], "key", path[-1]))
    return path[0].key != "train" or name not in ("bias", "scale") and "LayerNorm" not in str(path)


def make_optimizer(
    lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    schedule: str = "cosine",
    max_grad_norm: float = 0.0,
):
    """AdamW (torch defaults) with linear warmup then cosine or linear decay to 0.

    Returns ``(optimizer, schedule_fn)``.
    """
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    if schedule == "cosine":
        sched = optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, max(total_steps, 1), 0.0)
    elif schedule == "linear":
        sched = optax.join_schedules(
            [
                optax.linear_schedule(0.0, lr, warmup_steps),
                optax.linear_schedule(lr, 0.0, max(total_steps - warmup_steps, 1)),
            ],
            [warmup_steps],
        )
    elif schedule == "constant":
        sched = optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup_steps), optax.constant_schedule(lr)], [warmup_steps]
        )
    else:
        raise ValueError(f"unknown lr schedule {schedule!r}; choose cosine, linear or constant")
    decay_mask = lambda tree: jax.tree_util.tree_map_with_path(_decays, tree)
    tx = optax.adamw(sched, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay, mask=decay_mask)
    # Clipping or not, the state has one structure (both keep an empty state), so a run may resume with
    # another --max-grad-norm, e.g. after it diverged.
    clip = optax.clip_by_global_norm(max_grad_norm) if max_grad_norm > 0 else optax.identity()
    return optax.chain(clip, tx), sched


def loss_sum(logits, batch, kind: str):
    """``(summed loss, count)`` over real examples (or, for causal LM, over real target tokens).

    A causal-LM token t is a target when ``loss_mask[t]`` (else ``attention_mask[t]``) is set, or always when
    the batch has neither (no padding); it is predicted from the tokens before it. A span (extractive QA)
    loss is the mean of the start and end positions' cross-entropies, as HF's QA heads compute it, with the
    softmax over the real tokens (``attention_mask``), so padding, and the length bucket, never changes it;
    ``logits`` are (B, T, 2) start and end logits (`train.methods.output_logits`).
    A seq2seq-lm (encoder-decoder) logit t predicts ``labels[t]`` (the decoder read the labels shifted right);
    labels of ``IGNORE_INDEX`` are padding. Each example's ``label_smoothing`` entry eps, when the batch has
    one, smooths its tokens' losses as torch's ``cross_entropy(label_smoothing=eps)``:
    ``(1 - eps) * NLL + eps * mean over the vocabulary of -log p``.
    """
    if kind == "classification":
        losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["labels"])
        return jnp.sum(losses), jnp.float32(losses.size)
    if kind == "regression":
        return jnp.sum((logits[..., 0].astype(jnp.float32) - batch["labels"]) ** 2), jnp.float32(logits.shape[0])
    if kind == "causal-lm":
        weights = batch.get("loss_mask", batch.get("attention_mask"))
        per_token = optax.softmax_cross_entropy_with_integer_labels(
            logits[:, :-1].astype(jnp.float32), batch["input_ids"][:, 1:]
        )
        if weights is None:
            return jnp.sum(per_token), jnp.float32(per_token.size)
        weights = weights[:, 1:].astype(jnp.float32)
        return jnp.sum(per_token * weights), jnp.sum(weights)
    if kind == "span":
        logits = logits.astype(jnp.float32)
        if "attention_mask" in batch:
            logits = jnp.where(batch["attention_mask"][..., None] > 0, logits, jnp.finfo(jnp.float32).min)
        start = optax.softmax_cross_entropy_with_integer_labels(logits[..., 0], batch["start_positions"])
        end = optax.softmax_cross_entropy_with_integer_labels(logits[..., 1], batch["end_positions"])
        return jnp.sum(start + end) / 2, jnp.float32(start.size)
    if kind == "seq2seq-lm":
        labels = batch["labels"]
        weights = (labels != IGNORE_INDEX).astype(jnp.float32)
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        per_token = -jnp.take_along_axis(log_probs, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
        if "label_smoothing" in batch:
            eps = batch["label_smoothing"].astype(jnp.float32)[:, None]
            per_token = (1 - eps) * per_token - eps * jnp.mean(log_probs, axis=-1)
        return jnp.sum(per_token * weights), jnp.sum(weights)
    raise ValueError(f"unknown loss {kind!r}; choose one of {LOSSES}")


def init_state(trainable, tx, seed: int) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32), trainable=trainable, opt_state=tx.init(trainable), rng=jax.random.PRNGKey(seed)
    )


def train_step(
    state: TrainState,
    frozen,
    batch,
    *,
    model,
    method: Method,
    tx,
    loss_kind: str,
    attention: str = "plain",
    remat: str | None = None,
    grad_accum: int = 1,
    mesh=None,
    skip_nonfinite: bool = False,
):
    """One optimizer step on the trainable tree. Returns ``(state, {"loss", "grad_norm", "finite"})``.

    ``finite`` (a bool scalar) says the loss and the gradient norm are finite. With ``skip_nonfinite`` it
    also requires the updated trainable values to be, and a step that is not keeps the trainable and
    optimizer state as they were (its schedule count too); the step counter advances either way, so the
    batch of each step, and a resume, stay as in any other run. That select costs one pass over the
    trainable state, which is why it is optional.

    With ``grad_accum`` N > 1 every batch array is (B, N, ...): N micro-batches of B rows, run one after
    another by a ``lax.scan`` so activations are held for one micro-batch only. Summed losses, gradients
    of the sums and target counts are accumulated and divided once at the end, so the step equals one
    step on the N * B rows (up to rounding): micro-batches with more target tokens weigh more.
    """
    dropout_rng = jax.random.fold_in(state.rng, state.step)

    def summed(trainable, micro, rng):
        logits = method.apply(
            model, trainable, frozen, micro, dropout_rng=rng, train=True, attention=attention, remat=remat, mesh=mesh
        )
        return loss_sum(logits, micro, loss_kind)

    if grad_accum == 1:

        def loss_fn(trainable):
            total, count = summed(trainable, batch, dropout_rng)
            return total / jnp.maximum(count, 1.0)

        loss, grads = jax.value_and_grad(loss_fn)(state.trainable)
    else:
        micro_batches = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), batch)  # (N, B, ...), B stays sharded
        grad_of_sum = jax.value_and_grad(summed, has_aux=True)

        def accumulate(carry, xs):
            micro, i = xs
            (total, count), grads = grad_of_sum(state.trainable, micro, jax.random.fold_in(dropout_rng, i))
            return jax.tree.map(jnp.add, carry, (total, count, grads)), None

        zeros = (jnp.float32(0), jnp.float32(0), jax.tree.map(jnp.zeros_like, state.trainable))
        (total, count, grads), _ = jax.lax.scan(accumulate, zeros, (micro_batches, jnp.arange(grad_accum)))
        count = jnp.maximum(count, 1.0)
        loss, grads = total / count, jax.tree.map(lambda g: g / count, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    one_device = mesh is None or mesh.size == 1
    grad_norm = global_norm(grads, concatenate=one_device)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if skip_nonfinite:
        finite = finite & all_finite(trainable)
        trainable, opt_state = jax.tree.map(
            lambda new, old: jnp.where(finite, new, old), (trainable, opt_state), (state.trainable, state.opt_state)
        )
    new_state = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state)
    return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite}


def all_finite(tree) -> jax.Array:
    """Whether every floating-point entry of ``tree`` is finite (a bool scalar; True for no such leaf)."""
    flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)


CONCAT_NORM_MAX = 2**26  # elements: slices, adapters and heads, not full fine-tuning's leaves


def global_norm(tree, concatenate: bool = True):
    """The l2 norm of all leaves, from one concatenated vector when they are small.

    Per-leaf sums of squares fuse into each leaf's optimizer update as a
    reduction, which keeps XLA from batching those ~150 tiny updates into a few
    kernels. Large trees keep the per-leaf form, and so do sharded steps
    (``concatenate=False``): on an 8-device CPU mesh the concatenated form
    changed the step's results.
    """
    leaves = [leaf.astype(jnp.float32) for leaf in jax.tree.leaves(tree)]
    if not concatenate or sum(leaf.size for leaf in leaves) > CONCAT_NORM_MAX:
        return optax.tree.norm(leaves)
    return jnp.linalg.norm(jnp.concatenate([jnp.ravel(leaf) for leaf in leaves]))


def eval_step(trainable, frozen, batch, *, model, method: Method, attention: str = "plain", mesh=None):
    """fp32 logits of a batch, dropout off."""
    return method.apply(model, trainable, frozen, batch, train=False, attention=attention, mesh=mesh).astype(
        jnp.float32
    )


class StepShardings(NamedTuple):
    state: Any
    frozen: Any
    batch: NamedSharding
    replicated: NamedSharding


def step_shardings(mesh, family: str | None, state, frozen) -> StepShardings:
    """Where the state, frozen weights and batches live on ``mesh`` (see `rocoft_jax.sharding`)."""
    return StepShardings(
        sharding.shardings(state, family, mesh),
        sharding.shardings(frozen, family, mesh),
        NamedSharding(mesh, sharding.BATCH),
        NamedSharding(mesh, P()),
    )


# XLA's dot merger joins the query and key projections (one input) into one matmul, and then adds
# their biases in two extra activation-sized passes instead of in the matmul: BERT-family steps on
# GPUs are faster with merging off (docs/performance.md).
_UNMERGED_FAMILIES = frozenset({"bert"})


def compiler_options(family: str | None, backend: str) -> dict | None:
    """XLA options for the steps of a model family on a backend (None: XLA's defaults)."""
    if family in _UNMERGED_FAMILIES and backend == "gpu":
        return {"xla_gpu_dot_merger_threshold_mb": 0}
    return None


def compile_steps(
    model,
    method: Method,
    tx,
    loss_kind: str,
    shardings: StepShardings,
    donate: bool = True,
    attention: str = "plain",
    remat: str | None = None,
    grad_accum: int = 1,
    skip_nonfinite: bool = False,
):
    """The jitted, sharded ``(train_step, eval_step)``: the only place steps are jitted.

    The train state's buffers are donated; metrics and eval logits come back
    replicated, so every process can read them. With ``grad_accum`` > 1 train
    batches are (B, grad_accum, ...), sharded over B like any batch. With
    ``skip_nonfinite`` a non-finite step leaves the state unchanged (`train_step`).
    """
    sh = shardings
    mesh = sh.batch.mesh
    options = compiler_options(method.mask.family, jax.default_backend())
    train_fn = jax.jit(
        functools.partial(
            train_step,
            model=model,
            method=method,
            tx=tx,
            loss_kind=loss_kind,
            attention=attention,
            remat=remat,
            grad_accum=grad_accum,
            mesh=mesh,
            skip_nonfinite=skip_nonfinite,
        ),
        in_shardings=(sh.state, sh.frozen, sh.batch),
        out_shardings=(sh.state, sh.replicated),
        donate_argnums=(0,) if donate else (),
        compiler_options=options,
    )
    eval_fn = jax.jit(
        functools.partial(eval_step, model=model, method=method, attention=attention, mesh=mesh),
        in_shardings=(sh.state.trainable, sh.frozen, sh.batch),
        out_shardings=sh.replicated,
        compiler_options=options,
    )
    return train_fn, eval_fn


def init_sharded_state(trainable, tx, seed: int, mesh, family: str | None, frozen):
    """The initial train state created directly in its sharded layout, plus all step shardings."""
    abstract = jax.eval_shape(lambda t: init_state(t, tx, seed), trainable)
    sh = step_shardings(mesh, family, abstract, frozen)
    state = jax.jit(lambda t: init_state(t, tx, seed), in_shardings=(sh.state.trainable,), out_shardings=sh.state)(
        trainable
    )
    return state, sh
