"""`rocoft_jax.fast.dropout_attention` against materialized attention, and inside BERT against HF's dropout (CPU:
the Pallas kernels run in interpret mode)."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers as tf
from conftest import _concrete, assert_trees_close, classification_batch, fast_jit

import rocoft_jax
import rocoft_jax.fast
from rocoft_jax.fast import dropout_attention as dropout_lib

REPO = Path(__file__).resolve().parents[2]


def operands(b=2, t=128, h=2, d=16, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(0), 5)
    q, k, v, do = (jax.random.normal(key, (b, t, h, d), dtype) for key in ks[:4])
    lengths = np.where(np.arange(b) % 2, t - 38, t)[:, None]  # odd rows right-padded
    keys = jnp.asarray(np.arange(t)[None, :] < lengths, jnp.int32)
    drop = (jax.random.bernoulli(ks[4], 0.8, (t, t)) / 0.8).astype(dtype)
    return q, k, v, do, keys, drop


def test_kernels_match_materialized_attention():
    q, k, v, do, keys, drop = operands()
    scale = q.shape[-1] ** -0.5
    kernel = lambda q, k, v: dropout_lib.dropout_attention(q, k, v, keys, drop, scale, True)
    reference = lambda q, k, v: dropout_lib.reference(q, k, v, keys, drop, scale)
    (out, vjp), (expected, vjp_ref) = jax.vjp(kernel, q, k, v), jax.vjp(reference, q, k, v)
    assert_trees_close(out, expected, atol=1e-5)
    assert_trees_close(vjp(do), vjp_ref(do), atol=1e-5)


def test_both_passes_lower_to_one_triton_kernel_each_for_cuda():
    q, k, v, do, keys, drop = operands(d=64, dtype=jnp.bfloat16)
    step = jax.jit(
        jax.grad(
            lambda q, k, v: jnp.sum(dropout_lib.dropout_attention(q, k, v, keys, drop, 0.125).astype(jnp.float32)),
            argnums=(0, 1, 2),
        )
    )
    assert step.trace(q, k, v).lower(lowering_platforms=("cuda",)).as_text().count("__gpu$xla.gpu.triton") == 2


@pytest.mark.parametrize("mode", ["row", pytest.param("column", marks=pytest.mark.slow)])  # column: -m slow
def test_bert_training_draws_hf_dropout_in_the_kernels(monkeypatch, mode):
    """Every layer's attention dropout runs in the kernels (as on a GPU) with the mask HF draws: same
    logits and slice gradients as HF's own attention, padded rows included."""
    monkeypatch.setattr(dropout_lib, "available", lambda: True)
    config = tf.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=34,
        num_labels=3,
        attention_probs_dropout_prob=0.3,
        hidden_dropout_prob=0.1,
        bos_token_id=0,
        eos_token_id=2,
    )
    model, params = _concrete(tf.FlaxBertForSequenceClassification, config, seed=0)
    mask = rocoft_jax.mask_params(params, 2, mode, family="bert")
    trainable, frozen = rocoft_jax.split(params, mask)
    batch = classification_batch(config, seq=32)
    counts = {}

    def logits(trainable, fused, train=True):
        params = rocoft_jax.with_trained_leaves(frozen, trainable)
        kwargs = {"train": True, "dropout_rng": jax.random.PRNGKey(7)} if train else {}
        with rocoft_jax.sliced_kernels(trainable, mask):
            if not fused:
                return model(batch["input_ids"], attention_mask=batch["attention_mask"], params=params, **kwargs).logits
            with rocoft_jax.fast.fused_attention("cudnn") as c:
                out = model(batch["input_ids"], attention_mask=batch["attention_mask"], params=params, **kwargs)
            counts.update(c)
            return out.logits

    jitted = fast_jit(logits, static_argnums=(1, 2))
    out = jitted(trainable, True)
    assert counts == {"fused:dropout": config.num_hidden_layers}
    assert_trees_close(out, jitted(trainable, False), atol=1e-5)
    assert np.abs(out - jitted(trainable, False, False)).max() > 1e-2  # dropout is on
    grads = [fast_jit(jax.grad(lambda t, f=f: jnp.sum(jnp.sin(logits(t, f)))))(trainable) for f in (True, False)]
    assert_trees_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not dropout_lib.available(), reason="needs a CUDA GPU")
def test_kernels_match_materialized_attention_on_a_gpu():
    """bf16 at roberta-large's head shape against the fp32 reference: within bf16 rounding."""
    q, k, v, do, keys, drop = operands(b=4, t=256, h=4, d=64, dtype=jnp.bfloat16)
    kernel = lambda q, k, v: dropout_lib.dropout_attention(q, k, v, keys, drop, 0.125)
    as32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
    reference = lambda q, k, v: dropout_lib.reference(q, k, v, keys, drop.astype(jnp.float32), 0.125)
    (out, vjp), (expected, vjp_ref) = jax.vjp(kernel, q, k, v), jax.vjp(reference, *as32[:3])
    assert_trees_close(out.astype(jnp.float32), expected, atol=2e-2)
    for got, want in zip(vjp(do), vjp_ref(as32[3])):
        assert_trees_close(got.astype(jnp.float32), want, atol=3e-2 * float(jnp.abs(want).max()))


SHARDED = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", 4)
    sys.path.insert(0, "tests")
    import jax.numpy as jnp, numpy as np, transformers as tf
    import rocoft_jax
    from conftest import _concrete, classification_batch
    from rocoft_jax import sharding
    from rocoft_jax.fast import dropout_attention as dropout_lib
    dropout_lib.available = lambda: True
    config = tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=34, num_labels=3, bos_token_id=0,
                           eos_token_id=2, attention_probs_dropout_prob=0.3, hidden_dropout_prob=0.1)
    model, params = _concrete(tf.FlaxBertForSequenceClassification, config, seed=0)
    batch = classification_batch(config, seq=32)
    mesh = sharding.make_mesh(sharding.parse_mesh("data=2,tensor=2", 4))

    def logits(params, fused):
        kwargs = dict(attention_mask=batch["attention_mask"], params=params, train=True,
                      dropout_rng=jax.random.PRNGKey(7))
        if not fused:
            return model(batch["input_ids"], **kwargs).logits
        with rocoft_jax.fast.fused_attention("cudnn", mesh=mesh) as counts:
            out = model(batch["input_ids"], **kwargs).logits
        assert dict(counts) == {"fused:dropout": 2}, counts
        return out

    loss = lambda p, fused: jnp.sum(jnp.sin(logits(p, fused)))
    step = jax.jit(jax.value_and_grad(loss), static_argnums=1, compiler_options={"xla_backend_optimization_level": 0})
    fused, plain = (step(params, f) for f in (True, False))
    grad_diff = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(fused[1]), jax.tree.leaves(plain[1])))
    print(json.dumps({"loss": [float(fused[0]), float(plain[0])], "grad_diff": grad_diff}))
""")


@pytest.mark.slow  # CI time on 2 cores; test_sharding trains under a mesh by default
def test_kernels_run_per_shard_under_a_data_and_tensor_mesh():
    """data=2 x tensor=2 on 4 CPU devices: each device's rows and heads, same loss and gradients as HF."""
    proc = subprocess.run([sys.executable, "-c", SHARDED], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(*out["loss"], rtol=1e-6)
    assert out["grad_diff"] < 1e-5
