"""The core stands alone: ``import rocoft_jax`` loads no fast path, no NTK code and no GPU kernel
framework, and the core API trains a model exactly without them. Library tests do not use `train`.

Each check runs in a fresh interpreter: this test process has long since imported everything.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import cpu_env

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
# Names the core must not load; flax itself imports private jax._src.pallas modules, which are not these.
FORBIDDEN = ("rocoft_jax.fast", "rocoft_jax.ntk", "jax.experimental.pallas", "jax.experimental.mosaic")

LOADED = textwrap.dedent("""
    import json, sys
    FORBIDDEN = tuple(sys.argv[1].split(","))

    def forbidden_modules():
        return sorted(m for m in sys.modules if m.startswith(FORBIDDEN))
""")

IMPORT_ONLY = LOADED + textwrap.dedent("""
    import importlib
    importlib.import_module(sys.argv[2])
    print(json.dumps({"loaded": forbidden_modules()}))
""")

# One step of the core API on a tiny RoBERTa classifier, against a reference built with numpy only:
# SGD on full params with the gradient multiplied by a 0/1 mask rebuilt from mask.indices.
CORE_STEP = LOADED + textwrap.dedent("""
    import rocoft_jax
    after_import = forbidden_modules()

    import jax, jax.numpy as jnp, numpy as np, optax
    import transformers as tf
    from flax import traverse_util

    config = tf.RobertaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=64, max_position_embeddings=24, type_vocab_size=1, pad_token_id=1,
                              num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                              initializer_range=0.2)
    model = tf.FlaxRobertaForSequenceClassification(config, _do_init=False)  # HF's own init runs op by op: slow
    params = jax.jit(model.init_weights, static_argnums=1)(jax.random.PRNGKey(0), (1, 10))
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 64, (4, 10)).astype(np.int32)
    attention = np.ones_like(ids)
    attention[1, 7:] = 0
    labels = np.array([0, 1, 2, 1], np.int32)

    def loss_of(logits):
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    mask = rocoft_jax.mask_params(params, 2, "row")
    trainable, frozen = rocoft_jax.split(params, mask)

    def efficient_loss(trainable):
        with rocoft_jax.sliced_kernels(trainable, mask):
            full = rocoft_jax.with_trained_leaves(frozen, trainable)
            return loss_of(model(ids, attention_mask=attention, params=full).logits)

    full_grad = jax.jit(jax.grad(lambda p: loss_of(model(ids, attention_mask=attention, params=p).logits)))(params)
    lr = 0.5
    # (a) efficient: gradients of the slices and head only, a plain SGD step on them, merged back.
    grads = jax.jit(jax.grad(efficient_loss))(trainable)
    trained = jax.tree.map(lambda t, g: t - lr * g, trainable, grads)
    efficient = rocoft_jax.merge(trained, frozen, mask)
    # (b) drop-in: rocoft_jax.masked under multi_transform on full params and full gradients.
    tx = optax.multi_transform({rocoft_jax.ROCOFT: rocoft_jax.masked(optax.sgd(lr), mask),
                                rocoft_jax.TRAIN: optax.sgd(lr), rocoft_jax.FROZEN: optax.set_to_zero()},
                               mask.labels)
    updates, _ = tx.update(full_grad, tx.init(params), params)
    dropin = optax.apply_updates(params, updates)
    # (c) dense reference.
    flat_params = traverse_util.flatten_dict(params, sep="/")
    flat_grad = traverse_util.flatten_dict(full_grad, sep="/")
    reference, live = {}, {}
    for path, value in flat_params.items():
        m = np.zeros(value.shape, np.float32)
        if path in mask.indices:
            m[:, np.asarray(mask.indices[path])] = 1.0  # Dense kernels (d_in, d_out): rows are kernel[:, i]
        elif mask.label_of[path] == rocoft_jax.TRAIN:
            m[...] = 1.0
        reference[path] = np.asarray(value) - lr * np.asarray(flat_grad[path]) * m
        live[path] = m

    def gap(tree):
        flat = traverse_util.flatten_dict(tree, sep="/")
        assert flat.keys() == reference.keys()
        return max(float(np.abs(np.asarray(flat[p], np.float32) - reference[p]).max()) for p in reference)

    moved = max(float(np.abs(reference[p] - np.asarray(flat_params[p]))[live[p] > 0].max(initial=0.0))
                for p in reference)
    print(json.dumps({"after_import": after_import, "after_use": forbidden_modules(), "moved": moved,
                      "efficient_gap": gap(efficient), "dropin_gap": gap(dropin),
                      "slices": len(mask.slices), "finite": all(np.isfinite(r).all() for r in reference.values())}))
""")


def _run(script: str, *args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", script, ",".join(FORBIDDEN), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=cpu_env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_core_imports_no_fast_path_ntk_or_kernel_framework_and_trains_exactly():
    result = _run(CORE_STEP)
    assert result["after_import"] == [], result["after_import"]
    assert result["after_use"] == [], result["after_use"]
    assert result["slices"] == 12 and result["finite"]
    assert result["moved"] > 1e-3  # the reference really trained, well beyond the tolerance
    assert result["efficient_gap"] < 1e-6, result
    assert result["dropin_gap"] < 1e-6, result


def test_the_check_sees_the_fast_paths_when_they_are_imported():
    """The same check in a process that imports the fast paths finds them: it can fail."""
    loaded = _run(IMPORT_ONLY, "rocoft_jax.fast")["loaded"]
    assert "rocoft_jax.fast" in loaded and any(m.startswith("jax.experimental.") for m in loaded)


def test_library_tests_do_not_import_train():
    pattern = re.compile(r"^\s*(from\s+train(\.\w+)*\s+import|import\s+train\b)", re.MULTILINE)
    offenders = [
        str(path.relative_to(TESTS))
        for folder in ("core", "fast", "ntk")
        for path in sorted((TESTS / folder).rglob("*.py"))
        if pattern.search(path.read_text())
    ]
    assert offenders == []
