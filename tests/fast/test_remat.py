"""`remat_layers`: Llama-family layers recomputed in the backward pass, with unchanged gradients."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import _concrete
from transformers import FlaxLlamaForCausalLM, LlamaConfig

import rocoft_jax
import rocoft_jax.fast

CONFIG = LlamaConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


@pytest.fixture(scope="module")
def setup():
    model, params = _concrete(FlaxLlamaForCausalLM, CONFIG, seed=0)
    mask = rocoft_jax.mask_params(params, 3)
    trainable, frozen = rocoft_jax.split(params, mask)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 16)), jnp.int32)

    def loss(trainable, policy):
        with (
            rocoft_jax.fast.remat_layers(policy) if policy else contextlib.nullcontext(),
            rocoft_jax.fast.fused_attention("xla"),
            rocoft_jax.sliced_kernels(trainable, mask),
        ):
            logits = model(ids, params=rocoft_jax.with_trained_leaves(frozen, trainable)).logits
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

    return loss, trainable


def grad_flops(loss, trainable, policy) -> float:
    cost = jax.jit(jax.grad(loss), static_argnums=1).lower(trainable, policy).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


@pytest.mark.parametrize("policy", [pytest.param("full", marks=pytest.mark.slow), "dots"])  # full: -m slow
def test_remat_layers_keeps_gradients_and_checkpoints_each_layer(setup, policy):
    loss, trainable = setup
    grad = jax.jit(jax.grad(loss), static_argnums=1)  # one program each: op-by-op remat is slow on a CPU
    plain = grad(trainable, None)
    rematted = grad(trainable, policy)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(rematted)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    jaxpr = str(jax.make_jaxpr(jax.grad(loss), static_argnums=1)(trainable, policy))
    assert jaxpr.count("checkpoint[") + jaxpr.count("remat") >= CONFIG.num_hidden_layers
    assert "checkpoint[" not in str(jax.make_jaxpr(jax.grad(loss), static_argnums=1)(trainable, None))


def test_dots_policy_recomputes_no_projection(setup):
    """ "full" reruns every matmul of the forward; "dots" reuses the saved projection and attention outputs."""
    loss, trainable = setup
    plain, full, dots = (grad_flops(loss, trainable, p) for p in (None, "full", "dots"))
    assert full > 1.2 * plain
    assert dots < plain + 0.25 * (full - plain)


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="remat policy must be one of"):
        with rocoft_jax.fast.remat_layers("everything"):
            pass
