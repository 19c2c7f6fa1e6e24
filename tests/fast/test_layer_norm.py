"""`rocoft_jax.fast.layer_norm` against flax's ``nn.LayerNorm`` of the sum, and its Pallas kernels against XLA."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers as tf
from conftest import abstract_params, assert_trees_close, classification_loss, roberta_config

from rocoft_jax.fast import fast_paths
from rocoft_jax.fast import layer_norm as ln_lib


def operands(shape=(2, 8, 256), dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(0), 5)
    x, residual, dy = (jax.random.normal(k, shape, dtype) for k in ks[:3])
    scale = (1 + 0.1 * jax.random.normal(ks[3], shape[-1:])).astype(dtype)
    bias = (0.1 * jax.random.normal(ks[4], shape[-1:])).astype(dtype)
    return x, residual, dy, scale, bias


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matches_flax_layer_norm_of_the_sum(dtype):
    """Values and the gradients of both inputs, the scale and the bias (full fine-tuning trains them)."""
    x, residual, dy, scale, bias = operands(dtype=dtype)
    flax_ln = nn.LayerNorm(epsilon=1e-5, dtype=dtype)
    reference = lambda x, r, s, b: flax_ln.apply({"params": {"scale": s, "bias": b}}, x + r)
    ours = lambda x, r, s, b: ln_lib.add_layer_norm(x, r, s, b, 1e-5, dtype)
    (y, vjp), (expected, vjp_ref) = (jax.vjp(f, x, residual, scale, bias) for f in (ours, reference))
    assert y.dtype == expected.dtype == dtype
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    assert_trees_close(y.astype(jnp.float32), expected.astype(jnp.float32), atol=tol)
    grads = [jax.tree.map(lambda g: g.astype(jnp.float32), v(dy)) for v in (vjp, vjp_ref)]
    assert_trees_close(grads[0], grads[1], atol=tol * (1 if dtype == jnp.float32 else 10), rtol=tol)


def test_kernels_match_the_xla_formula():
    x, residual, dy, scale, bias = (a.reshape(-1, a.shape[-1]) if a.ndim == 3 else a for a in operands())
    forward = ln_lib._forward_pallas(x, residual, scale, bias, 1e-5, jnp.float32, interpret=True)
    expected = ln_lib._forward_xla(x, residual, scale, bias, 1e-5, jnp.float32)
    assert_trees_close(forward, expected, atol=1e-6)
    y, summed, mean, rstd = expected
    assert_trees_close(
        ln_lib._input_grad_pallas([dy], summed, mean, rstd, scale, interpret=True),
        ln_lib._input_grad_xla(dy, summed, mean, rstd, scale),
        atol=1e-6,
    )


def test_cuda_lowering_runs_one_kernel_each_way_for_power_of_two_features():
    def lowered(shape, single_device=True):
        x, residual, _, scale, bias = operands(shape, jnp.bfloat16)
        loss = lambda x, r: jnp.sum(
            ln_lib.add_layer_norm(x, r, scale, bias, 1e-5, jnp.bfloat16, single_device).astype(jnp.float32)
        )
        step = jax.jit(jax.grad(loss, argnums=(0, 1)))
        return step.trace(x, residual).lower(lowering_platforms=("cuda",)).as_text().count("__gpu$xla.gpu.triton")

    assert lowered((2, 8, 1024)) == 2
    assert lowered((2, 8, 768)) == 0  # roberta-base's width: XLA
    assert lowered((2, 8, 1024), single_device=False) == 0


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")
@pytest.mark.parametrize("params_dtype", [jnp.bfloat16, jnp.float32])  # fp32: full fine-tuning's masters
def test_kernels_match_the_xla_formula_on_a_gpu(params_dtype):
    x, residual, dy, scale, bias = operands((4, 256, 1024), jnp.bfloat16)
    scale, bias = scale.astype(params_dtype), bias.astype(params_dtype)
    ours = lambda x, r, s, b: ln_lib.add_layer_norm(x, r, s, b, 1e-5, jnp.bfloat16)
    xla = lambda x, r, s, b: ln_lib.add_layer_norm(x, r, s, b, 1e-5, jnp.bfloat16, False)
    (y, vjp), (expected, vjp_ref) = (jax.vjp(f, x, residual, scale, bias) for f in (ours, xla))
    as32 = lambda t: jax.tree.map(lambda a: a.astype(jnp.float32), t)
    assert_trees_close(as32(y), as32(expected), atol=3e-2)
    assert_trees_close(as32(vjp(dy)), as32(vjp_ref(dy)), atol=5e-2, rtol=1e-3)


def test_copies_take_their_consumers_gradients_apart_and_add_them():
    """Three consumers of one output, as q, k, v and the residual read a layer's input: the same
    values and gradients as flax's LayerNorm read three times; the kernel adds the gradients itself."""
    x, residual, dy, scale, bias = operands()
    consumers = lambda a, b, c: jnp.sum(jnp.sin(a)) + jnp.sum(b * b) + jnp.sum(c * dy)
    flax_ln = nn.LayerNorm(epsilon=1e-5)
    reference = lambda x, r, s, b: consumers(*[flax_ln.apply({"params": {"scale": s, "bias": b}}, x + r)] * 3)
    ours = lambda x, r, s, b: consumers(*ln_lib.add_layer_norm_copies(x, r, s, b, 1e-5, jnp.float32, True, 3))
    (value, grads), (expected, expected_grads) = (
        jax.value_and_grad(f, argnums=(0, 1, 2, 3))(x, residual, scale, bias) for f in (ours, reference)
    )
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    assert_trees_close(grads, expected_grads, atol=1e-4, rtol=1e-5)
    _, summed, mean, rstd = ln_lib._forward_xla(
        *(a.reshape(-1, 256) for a in (x, residual)), scale, bias, 1e-5, jnp.float32
    )
    dys = [jax.random.normal(jax.random.key(i), summed.shape) for i in range(4)]
    assert_trees_close(
        ln_lib._input_grad_pallas(dys, summed, mean, rstd, scale, interpret=True),
        ln_lib._input_grad_xla(sum(dys), summed, mean, rstd, scale),
        atol=1e-5,
    )


def test_roberta_layer_norms_get_their_consumers_gradients_apart():
    """In a 3-layer RoBERTa under the fast paths, lowered for CUDA: each attention block's LayerNorm
    backward kernel reads the MLP's and the residual's gradients apart; the first layer's output
    LayerNorm, the second layer's q, k, v and residual gradients. The last layer runs for token 0
    (`first_token_only`) and reads its input as one, like the head."""
    config = roberta_config(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_hidden_layers=3)
    model, params = abstract_params(tf.FlaxRobertaForSequenceClassification, config)
    batch = {"input_ids": jnp.ones((2, 8), jnp.int32), "labels": jnp.zeros((2,), jnp.int32)}

    def loss(params):  # full fine-tuning: every leaf trained; no padding, so no mask reaches attention
        with fast_paths(model, "xla", unpadded=True):
            logits = model(batch["input_ids"], params=params, train=True).logits
        return classification_loss(logits, batch)

    grad = jax.jit(jax.grad(loss))
    assert "add_layer_norm_bwd" in grad.trace(params).lower(lowering_platforms=("cuda",)).as_text()
    # Each backward kernel call: its jitted wrapper's inputs are the gradients read, then 4 more operands.
    calls = [
        eqn for eqn in equations(jax.make_jaxpr(grad)(params).jaxpr) if eqn.params.get("name") == "_input_grad_pallas"
    ]
    gradients_read = sorted(len(eqn.invars) - 4 for eqn in calls)
    assert gradients_read == [1, 1, 2, 2, 2, 4]


def equations(jaxpr):
    """Every equation of ``jaxpr`` and of the jaxprs inside its equations (jit, cond branches, custom VJPs)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from equations(inner)
