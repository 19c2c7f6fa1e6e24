"""`rocoft_jax.mixed`: a batch mixing adapters of one base equals, row by row, each adapter's merged model.

The reference for each row is the plain HF model run on `merge_adapter`'s params for that row's adapter (no
mixed-batch code). Adapters differ in mode (rows, columns), rank, indices, trained biases and heads (sizes
2 and 3). Under ``-m slow``: GPT-2's (d_out, d_in) Conv1D layout, and greedy generation through the KV
cache, token for token (train.serve's test covers a mixed encoder batch by default too).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import transformers as tf
from conftest import (
    classification_batch,
    fast_jit,
    gpt2_config,
    lm_batch,
    roberta_config,
    tiny_gpt2,
    tiny_llama,
    tiny_roberta,
)
from test_adapters import random_entries, trained

from rocoft_jax import adapters, mixed
from rocoft_jax import tree as tree_lib


def with_head(params, labels: int, seed: int = 9):
    """The same base with a classifier head for ``labels`` labels (what the base loads as for another task)."""
    flat = tree_lib.flatten(params)
    rng = np.random.default_rng(seed)
    flat["classifier/out_proj/kernel"] = rng.normal(0, 0.1, (32, labels)).astype(np.float32)
    flat["classifier/out_proj/bias"] = np.zeros(labels, np.float32)
    return tree_lib.unflatten(flat)


def base_for(params, two_labels: bool):
    return with_head(params, 2) if two_labels else params


@pytest.fixture(scope="module")
def roberta_set():
    _, params = tiny_roberta()
    return {
        "rows": trained(params, 2, "row", seed=1)[0],
        "columns+bias": trained(params, 3, "column", seed=2, train_bias=True)[0],
        "rows/2 labels": trained(with_head(params, 2), 1, "row", seed=3)[0],
        "columns/base head": trained(params, 2, "column", seed=4, train=())[0],
    }


@pytest.mark.parametrize("unroll", [8, 1], ids=["fused selects", "gathers"])
def test_encoder_rows_equal_each_adapters_merged_model(roberta_set, unroll, monkeypatch):
    """Both forms of the per-row corrections: unrolled elementwise (up to `mixed._UNROLL` slices) and the
    gather/einsum form wider layers take."""
    monkeypatch.setattr(mixed, "_UNROLL", unroll)
    mixed._logits_program.cache_clear()  # the form is chosen when the program is traced
    model, params = tiny_roberta()
    stacked = mixed.stack(params, roberta_set)
    assert stacked.num_outputs == (3, 3, 2, 3)
    batch = classification_batch(roberta_config(), batch=8)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    ids = np.array([0, 1, 2, 3, 3, 2, 1, 0])
    got = np.asarray(mixed.logits(model, params, stacked, inputs, ids))
    two_labels = tf.FlaxRobertaForSequenceClassification(roberta_config(num_labels=2), _do_init=False)
    forward = {m: fast_jit(lambda p, m=m: m(**inputs, params=p).logits) for m in (model, two_labels)}
    rows_model = None
    for k, (name, adapter) in enumerate(roberta_set.items()):
        two = name == "rows/2 labels"
        expected = np.asarray(
            forward[two_labels if two else model](adapters.merge_adapter(base_for(params, two), adapter))
        )
        n = stacked.num_outputs[k]
        np.testing.assert_allclose(got[ids == k, :n], expected[ids == k], atol=1e-5, err_msg=name)
        assert not got[ids == k, n:].any()  # a smaller head is zero-padded
        if k == 0:
            rows_model = expected
        elif not two:  # the rows of another adapter would come out otherwise under the first one
            assert np.abs(expected[ids == k] - rows_model[ids == k]).max() > 1e-3


@pytest.mark.slow
def test_conv1d_layout_rows_and_columns():
    model, params = tiny_gpt2()
    named = {
        "rows": trained(params, 2, "row", seed=1, train_bias=True)[0],
        "columns": trained(params, 3, "column", seed=2)[0],
    }
    stacked = mixed.stack(params, named)
    batch = lm_batch(gpt2_config(), batch=4)
    ids = np.array([0, 1, 1, 0])
    got = np.asarray(mixed.logits(model, params, stacked, batch, ids))
    forward = fast_jit(lambda p: model(**batch, params=p).logits)
    for k, adapter in enumerate(named.values()):
        expected = np.asarray(forward(adapters.merge_adapter(params, adapter)))
        np.testing.assert_allclose(got[ids == k], expected[ids == k], atol=1e-5)


@pytest.mark.slow
def test_greedy_generation_is_each_adapters_token_for_token():
    from transformers import GenerationConfig

    model, params = tiny_llama()
    named = {
        "rows": trained(params, 2, "row", seed=1, scale=1.0)[0],
        "columns": trained(params, 3, "column", seed=2, scale=1.0)[0],
        "rows again": trained(params, 1, "row", seed=5, scale=1.0)[0],
    }
    stacked = mixed.stack(params, named)
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, 64, (6, 5)).astype(np.int32)
    attention = np.ones_like(prompts)
    prompts[1, :2], attention[1, :2] = 0, 0  # left padding
    ids = np.array([0, 1, 2, 2, 1, 0])
    got = np.asarray(mixed.generate(model, params, stacked, prompts, attention, ids, max_new_tokens=6, pad_token_id=0))
    config = GenerationConfig(max_new_tokens=6, num_beams=1, do_sample=False, pad_token_id=0)
    generate = jax.jit(
        lambda p: model.generate(prompts, generation_config=config, attention_mask=attention, params=p).sequences
    )
    continuations = []
    for k, adapter in enumerate(named.values()):
        expected = np.asarray(generate(adapters.merge_adapter(params, adapter)))[:, prompts.shape[1] :]
        np.testing.assert_array_equal(got[ids == k], expected[ids == k])
        continuations.append(expected[0].tolist())
    assert len({tuple(c) for c in continuations}) == 3  # each adapter generates its own text


def test_bad_mixes_are_one_line_errors(roberta_set):
    _, params = tiny_roberta()
    llama_adapter = trained(tiny_llama()[1], 2, "row")[0]
    cases = [
        ({"a": roberta_set["rows"], "b": llama_adapter}, "different families"),
        ({"a": roberta_set["rows"], "r": random_entries()[0]}, "random entries"),
        ({"a": roberta_set["rows"], "other": trained(tiny_roberta(seed=1)[1], 2, "row")[0]}, "other base weights"),
    ]
    for named, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            mixed.stack(params, named)
        assert "\n" not in str(err.value)
    stacked = mixed.stack(params, {"a": roberta_set["rows"]})
    batch = classification_batch(roberta_config(), batch=2)
    with pytest.raises(ValueError, match=r"adapter_ids must lie in \[0, 1\)"):
        mixed.logits(tiny_roberta()[0], params, stacked, {"input_ids": batch["input_ids"]}, [0, 1])
