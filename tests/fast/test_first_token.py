"""`first_token_only` against HF's own forward pass: same logits and slice gradients, less work."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers as tf
from conftest import (
    FAMILY_MODELS,
    NO_DROPOUT,
    _concrete,
    assert_trees_close,
    classification_batch,
    fast_jit,
    tiny_llama,
)

import rocoft_jax
import rocoft_jax.fast

CLASSIFIERS = ("bert", "roberta", "xlm-roberta", "electra")


@functools.cache
def tiny(name, **overrides):
    """A 2-layer sequence classifier of the family, fp32, with 3 labels."""
    config_cls, model_cls, kwargs, *_ = FAMILY_MODELS[name]
    config = config_cls(**{**kwargs, **NO_DROPOUT, "num_labels": 3, "bos_token_id": 0, "eos_token_id": 2, **overrides})
    return _concrete(model_cls, config, seed=0)


def logits_fn(model, mask, batch, fast: bool, **kwargs):
    """``trainable -> logits`` through RoCoFT's sliced kernels, with or without `first_token_only`."""

    def logits(trainable, frozen):
        params = rocoft_jax.with_trained_leaves(frozen, trainable)
        with rocoft_jax.sliced_kernels(trainable, mask):
            if not fast:
                return model(batch["input_ids"], attention_mask=batch["attention_mask"], params=params, **kwargs).logits
            with rocoft_jax.fast.first_token_only(model) as counts:
                out = model(batch["input_ids"], attention_mask=batch["attention_mask"], params=params, **kwargs)
            logits.counts = dict(counts)
            return out.logits

    return logits


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_logits_and_slice_gradients_match_the_whole_layer(name):
    """Padded rows included: the first token's attention row still sees only real keys."""
    model, params = tiny(name)
    mask = rocoft_jax.mask_params(params, 2, "row", family="bert")
    trainable, frozen = rocoft_jax.split(params, mask)
    batch = classification_batch(model.config)
    fast, plain = (logits_fn(model, mask, batch, f) for f in (True, False))

    assert_trees_close(fast_jit(fast)(trainable, frozen), fast_jit(plain)(trainable, frozen), atol=1e-5)
    assert fast.counts == {"first_token": 1}
    grads = [fast_jit(jax.grad(lambda t, fn=fn: jnp.sum(jnp.sin(fn(t, frozen)))))(trainable) for fn in (fast, plain)]
    assert_trees_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_the_step_does_less_work():
    """The last of 2 layers runs its queries, output projection and MLP for one token a row: the
    compiled gradient program has under 3/4 of the FLOPs (measured 0.62)."""
    model, params = tiny("roberta")
    mask = rocoft_jax.mask_params(params, 2, "row", family="bert")
    trainable, frozen = rocoft_jax.split(params, mask)
    batch = classification_batch(model.config)

    def flops(fn):
        grad = jax.jit(jax.grad(lambda t: jnp.sum(fn(t, frozen))))
        return grad.lower(trainable).compile().cost_analysis()["flops"]

    fast, plain = (flops(logits_fn(model, mask, batch, f)) for f in (True, False))
    assert fast < 0.75 * plain


@pytest.mark.parametrize(  # jax's older threefry (column, False) under -m slow: CI time on 2 cores
    "mode, partitionable", [("row", True), pytest.param("column", False, marks=pytest.mark.slow)]
)
def test_dropout_draws_hf_masks(mode, partitionable):
    """In training, the last layer's attention and hidden dropout keep token 0's entries of the masks HF
    draws over every token: same logits and slice gradients as HF's whole layer, which differ from
    the deterministic ones. With jax's older, non-partitionable threefry those entries are not what a
    one-token draw would give."""
    model, params = tiny("roberta", hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.3)
    mask = rocoft_jax.mask_params(params, 2, mode, family="bert")
    trainable, frozen = rocoft_jax.split(params, mask)
    batch = classification_batch(model.config)
    train = {"train": True, "dropout_rng": jax.random.PRNGKey(1)}
    fast, plain = (logits_fn(model, mask, batch, f, **train) for f in (True, False))

    with jax.threefry_partitionable(partitionable):
        out = fast_jit(fast)(trainable, frozen)
        assert fast.counts == {"first_token": 1}
        assert_trees_close(out, fast_jit(plain)(trainable, frozen), atol=1e-5)
        assert np.abs(out - fast_jit(logits_fn(model, mask, batch, False))(trainable, frozen)).max() > 1e-2
        grads = [
            fast_jit(jax.grad(lambda t, fn=fn: jnp.sum(jnp.sin(fn(t, frozen)))))(trainable) for fn in (fast, plain)
        ]
    assert_trees_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_falls_back_to_the_whole_layer_for_output_attentions():
    model, params = tiny("roberta")
    mask = rocoft_jax.mask_params(params, 2, "row", family="bert")
    trainable, frozen = rocoft_jax.split(params, mask)
    attentions = logits_fn(model, mask, classification_batch(model.config), True, output_attentions=True)
    attentions(trainable, frozen)
    assert attentions.counts == {"fallback:output_attentions": 1}


def test_with_hf_gradient_checkpointing():
    model, params = tiny("bert")
    checkpointed = tf.FlaxBertForSequenceClassification(model.config, _do_init=False, gradient_checkpointing=True)
    mask = rocoft_jax.mask_params(params, 2, "column", family="bert")
    trainable, frozen = rocoft_jax.split(params, mask)
    batch = classification_batch(model.config)
    fast = logits_fn(checkpointed, mask, batch, True)
    assert_trees_close(
        fast_jit(fast)(trainable, frozen), logits_fn(model, mask, batch, False)(trainable, frozen), atol=1e-5
    )
    assert fast.counts == {"first_token": 1}


def test_refuses_a_model_that_reads_every_token():
    model, _ = tiny_llama()
    with pytest.raises(ValueError, match="needs a head that reads token 0 alone.*FlaxLlamaForCausalLM"):
        with rocoft_jax.fast.first_token_only(model):
            pass
