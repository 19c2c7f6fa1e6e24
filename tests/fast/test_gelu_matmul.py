"""The GELU-fused output layer (`rocoft_jax.fast.gelu_matmul`, `fused_dense.dense_after_gelu`, `fast_gelu`).

The Hopper kernel itself runs only on an H100/H200 (`test_kernel_matches_xla_on_hopper`); here on CPU
its lowering is checked, and the fused op's custom VJP runs with XLA computing ``(dy @ W^T) * s``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_trees_close
from test_attention import make_batch, tiny

import rocoft_jax
import rocoft_jax.fast
from rocoft_jax.fast import fused_dense, gelu_matmul
from rocoft_jax.mask import KernelSlice

MOSAIC = "custom_call @mosaic_gpu"  # the kernel's custom call


def operands(m, k, n, dtype=jnp.bfloat16):
    rng = np.random.default_rng(0)
    dy, w, s = (jnp.asarray(rng.normal(size=shape), dtype) for shape in ((m, k), (n, k), (m, n)))
    return dy, w, s


def test_xla_path_is_the_scaled_transposed_product():
    dy, w, s = operands(6, 8, 10, jnp.float32)
    expected = (np.asarray(dy, np.float64) @ np.asarray(w, np.float64).T) * np.asarray(s, np.float64)
    ours = gelu_matmul.scaled_input_grad(dy, w, s, precision=jax.lax.Precision.HIGHEST)  # no TF32 on GPUs
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


def test_kernel_lowers_for_cuda_and_rejects_shapes_it_cannot_tile():
    dy, w, s = operands(512, 128, 256)
    text = jax.jit(gelu_matmul.matmul_t_scale).trace(dy, w, s).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count(MOSAIC) == 1
    with pytest.raises(ValueError, match="M divisible by 256"):
        gelu_matmul.matmul_t_scale(*operands(100, 128, 256))


def test_unavailable_without_a_hopper_gpu_or_on_an_older_jax(monkeypatch):
    device = lambda platform, capability: (
        lambda *_: [type("D", (), {"platform": platform, "compute_capability": capability})()]
    )
    for platform, capability in (("cpu", None), ("gpu", "8.0")):  # a CPU; an A100
        monkeypatch.setattr(jax, "devices", device(platform, capability))
        assert not gelu_matmul.available()
    monkeypatch.setattr(jax, "devices", device("gpu", "9.0"))
    assert gelu_matmul.available()
    monkeypatch.setattr(gelu_matmul, "MIN_JAX", (99, 0))
    assert not gelu_matmul.available()


@pytest.mark.skipif(not gelu_matmul.available(), reason="needs a Hopper GPU")
def test_kernel_matches_xla_on_hopper():
    dy, w, s = operands(16384, 1024, 4096)
    ours = np.asarray(gelu_matmul.matmul_t_scale(dy, w, s), np.float32)
    exact = np.asarray(
        gelu_matmul.scaled_input_grad(
            dy.astype(jnp.float32), w.astype(jnp.float32), s.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
        )
    )
    np.testing.assert_allclose(ours, exact, rtol=2**-7, atol=1e-2)


def test_fused_op_lowers_one_kernel_where_available(monkeypatch):
    monkeypatch.setattr(gelu_matmul, "available", lambda: True)
    spec = KernelSlice((256, 128), 1, 1, np.array([0, 5, 9]))
    h, kernel, values = jnp.ones((2, 256, 256), jnp.bfloat16), jnp.ones((256, 128), jnp.bfloat16), jnp.ones((256, 3))

    def lowered(h):
        loss = lambda h, v: jnp.sum(fused_dense._after_gelu(h, kernel, v, spec, None).astype(jnp.float32))
        return jax.jit(jax.grad(loss, argnums=(0, 1))).trace(h, values).lower(lowering_platforms=("cuda",)).as_text()

    assert lowered(h).count(MOSAIC) == 1
    assert lowered(jnp.ones((2, 100, 256), jnp.bfloat16)).count(MOSAIC) == 0  # 200 tokens: XLA


@pytest.mark.parametrize(
    "mode, train",
    [pytest.param("row", True, marks=pytest.mark.slow), ("column", False)],  # row: -m slow
)
def test_model_keeps_logits_and_slice_gradients(monkeypatch, mode, train):
    """RoBERTa with every MLP fused (as on a Hopper GPU) against HF's own path, fp32; in training its
    dropout draws the same masks."""
    monkeypatch.setattr(gelu_matmul, "available", lambda: True)
    model, params = tiny("roberta")
    mask = rocoft_jax.mask_params(params, 2, mode, family="bert")
    trainable, frozen = rocoft_jax.split(params, mask)
    ids, attention_mask = make_batch(lengths=(32, 20, 25, 32, 16), seq=32)  # 160 tokens > 2 x 64: merged kernels
    kwargs = {"train": True, "dropout_rng": jax.random.PRNGKey(3)} if train else {}

    def logits(trainable, fast):
        params = rocoft_jax.with_trained_leaves(frozen, trainable)
        with rocoft_jax.sliced_kernels(trainable, mask):
            if not fast:
                return model(ids, attention_mask=attention_mask, params=params, **kwargs).logits
            with rocoft_jax.fast.fast_gelu() as counts:
                out = model(ids, attention_mask=attention_mask, params=params, **kwargs).logits
            assert counts["gelu+dense"] == counts["gelu"] == model.config.num_hidden_layers
            return out

    logits = jax.jit(logits, static_argnums=1)  # one program each: op by op is slow on a CPU
    fused = logits(trainable, True)
    assert np.isfinite(fused).all()
    np.testing.assert_allclose(fused, logits(trainable, False), atol=1e-5)
    grads = [jax.jit(jax.grad(lambda t, f=f: jnp.sum(jnp.sin(logits(t, f)))))(trainable) for f in (True, False)]
    assert_trees_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
