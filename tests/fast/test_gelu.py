"""`rocoft_jax.fast.gelu` against ``jax.nn.gelu(approximate=False)``, alone and in BERT-family models (CPU, fp32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_trees_close
from test_attention import make_batch, tiny

import rocoft_jax
import rocoft_jax.fast
from rocoft_jax.fast import gelu as gelu_lib
from rocoft_jax.fast.gelu import gelu


def reference(x):
    return jax.nn.gelu(x, approximate=False)


def test_values_and_derivative_match_the_exact_gelu():
    x = jnp.linspace(-12.0, 12.0, 20001, dtype=jnp.float32)
    np.testing.assert_allclose(gelu(x), reference(x), atol=1e-6, rtol=1e-6)
    ours, theirs = jax.vmap(jax.grad(gelu))(x), jax.vmap(jax.grad(reference))(x)
    np.testing.assert_allclose(ours, theirs, atol=1e-6, rtol=1e-6)


def test_gpu_kernel_matches_the_exact_gelu():
    """The Pallas kernel CUDA runs (Zelen-Severo CDF), executed by the Pallas interpreter here."""
    x = jnp.linspace(-12.0, 12.0, 10 * gelu_lib.BLOCK, dtype=jnp.float32)
    value = gelu_lib.pallas_elementwise(gelu_lib._value, x, interpret=True)
    slope = gelu_lib.pallas_elementwise(gelu_lib._grad, x, jnp.ones_like(x), interpret=True)
    np.testing.assert_allclose(value, reference(x), atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(slope, jax.vmap(jax.grad(reference))(x), atol=1e-6, rtol=1e-6)
    # The forward pass of the fused output layer writes both from one kernel.
    both = gelu_lib.pallas_elementwise(gelu_lib._value_and_slope, x, outputs=2, interpret=True)
    np.testing.assert_allclose(both[0], value, atol=0, rtol=0)
    np.testing.assert_allclose(both[1], slope, atol=0, rtol=0)
    np.testing.assert_allclose(gelu_lib.gelu_and_slope(x)[1], slope, atol=1e-6, rtol=1e-6)  # XLA on CPU
    # In bf16 it rounds like the erf form: at most one bf16 step apart.
    xb = jnp.asarray(np.random.default_rng(0).normal(0, 3, (4, gelu_lib.BLOCK)), jnp.bfloat16)
    ours = np.asarray(gelu_lib.pallas_elementwise(gelu_lib._value, xb, interpret=True), np.float32)
    np.testing.assert_allclose(ours, np.asarray(gelu(xb), np.float32), rtol=2**-7, atol=1e-6)


def test_cuda_lowering_runs_both_passes_as_kernels_and_odd_sizes_through_xla():
    both = jax.jit(jax.value_and_grad(lambda x: jnp.sum(gelu(x).astype(jnp.float32))))
    kernel = "__gpu$xla.gpu.triton"
    x = jnp.ones((4, gelu_lib.BLOCK), jnp.bfloat16)
    assert both.trace(x).lower(lowering_platforms=("cuda",)).as_text().count(kernel) == 2
    assert both.trace(x).lower(lowering_platforms=("cpu",)).as_text().count(kernel) == 0  # XLA and erf
    odd = jnp.ones((3, 5), jnp.bfloat16)
    assert both.trace(odd).lower(lowering_platforms=("cuda",)).as_text().count(kernel) == 0


def test_bf16_error_is_no_larger_than_hf_gelu_in_bf16():
    x = jnp.asarray(np.random.default_rng(0).normal(0, 3, 4096), jnp.bfloat16)
    assert gelu(x).dtype == jnp.bfloat16
    exact = np.asarray(reference(x.astype(jnp.float32)))
    ours, theirs = (np.abs(np.asarray(y, np.float32) - exact) for y in (gelu(x), reference(x)))
    assert ours.max() <= theirs.max()
    assert ours.mean() <= theirs.mean()


@pytest.mark.parametrize(
    "name",  # RoBERTa, XLM-R (RoBERTa's code) and ELECTRA (BERT's layers): under -m slow
    [
        "bert",
        pytest.param("roberta", marks=pytest.mark.slow),
        pytest.param("xlm-roberta", marks=pytest.mark.slow),
        pytest.param("electra", marks=pytest.mark.slow),
    ],
)
def test_models_keep_logits_and_slice_gradients(name):
    """Intercepted in every layer; logits and the slices' gradients equal HF's own path."""
    model, params = tiny(name)
    mask = rocoft_jax.mask_params(params, 2, family="bert")
    trainable, frozen = rocoft_jax.split(params, mask)
    ids, attention_mask = make_batch()

    def logits(trainable, fast):
        params = rocoft_jax.with_trained_leaves(frozen, trainable)
        with rocoft_jax.sliced_kernels(trainable, mask):
            if not fast:
                return model(ids, attention_mask=attention_mask, params=params).logits
            with rocoft_jax.fast.fast_gelu() as counts:
                out = model(ids, attention_mask=attention_mask, params=params).logits
            assert counts["gelu"] == model.config.num_hidden_layers
            return out

    logits = jax.jit(logits, static_argnums=1)  # one program each: op by op is slow on a CPU
    np.testing.assert_allclose(logits(trainable, True), logits(trainable, False), atol=1e-5)
    grads = [jax.jit(jax.grad(lambda t, f=f: jnp.sum(jnp.sin(logits(t, f)))))(trainable) for f in (True, False)]
    assert_trees_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_other_activations_are_left_alone():
    from transformers import BertConfig, FlaxBertForSequenceClassification

    model = FlaxBertForSequenceClassification(
        BertConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=64,
            hidden_act="gelu_new",
        ),
        seed=0,
    )
    with rocoft_jax.fast.fast_gelu() as counts:
        model(jnp.ones((1, 8), jnp.int32))
    assert counts["gelu"] == 0
