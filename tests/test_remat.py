"""`remat_layers`: Llama-family layers recomputed in the backward pass, with unchanged gradients."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
from transformers import FlaxLlamaForCausalLM, LlamaConfig

import rocoft_jax


def test_remat_layers_keeps_gradients_and_checkpoints_each_layer():
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = FlaxLlamaForCausalLM(config, seed=0)
    mask = rocoft_jax.mask_params(model.params, 3)
    trainable, frozen = rocoft_jax.split(model.params, mask)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 16)), jnp.int32)

    def loss(trainable, remat):
        with rocoft_jax.remat_layers() if remat else contextlib.nullcontext(), \
                rocoft_jax.sliced_kernels(trainable, mask):
            logits = model(ids, params=rocoft_jax.with_trained_leaves(frozen, trainable)).logits
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

    plain = jax.grad(loss)(trainable, False)
    rematted = jax.grad(loss)(trainable, True)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(rematted)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    jaxpr = str(jax.make_jaxpr(jax.grad(loss), static_argnums=1)(trainable, True))
    assert jaxpr.count("checkpoint[") + jaxpr.count("remat") >= config.num_hidden_layers
    assert "checkpoint[" not in str(jax.make_jaxpr(jax.grad(loss), static_argnums=1)(trainable, False))
