"""train.compile_prefetch: a rerun's cached programs load ahead of their lowering, and a guess never changes one."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import compile_cache, compile_prefetch


@pytest.fixture
def cache(tmp_path):
    """A fresh persistent compilation cache for this test; the suite's setting (off) comes back after it."""
    previous = compile_cache.resolve("auto")
    path = compile_cache.configure(str(tmp_path / "cache"))
    jax.clear_caches()
    yield path
    jax.clear_caches()
    compile_cache.configure(str(previous) if previous is not None else compile_cache.OFF)


def product(x):
    return jnp.tanh(x @ x.T).sum(axis=0)


def difference(x):
    return jnp.cos(x - x.T).sum(axis=1)


def compiled_value(fn, x, recipe, cache_dir):
    """``fn(x)`` compiled under a `Prefetch` of ``recipe``, the in-memory caches cleared first (as a new process
    starts); returns the value and the prefetch, after saving its index and waiting for its loads (they run on
    in the background, so its counts are final only then)."""
    jax.clear_caches()
    prefetch = compile_prefetch.Prefetch(cache_dir, recipe).start()
    try:
        value = np.asarray(jax.jit(fn).lower(x).compile()(x))
        prefetch.save()
        return value, prefetch.wait()
    finally:
        prefetch.close()


def test_a_rerun_takes_its_program_from_the_prefetch(cache):
    x = jnp.arange(12.0).reshape(3, 4) / 10
    first, cold = compiled_value(product, x, "recipe", cache)
    assert cold.used == 0 and cold.loaded == 0  # nothing remembered yet
    index = json.loads((cache / compile_prefetch.INDEX_NAME).read_text())
    assert list(index) == ["recipe"] and len(index["recipe"]) == 1
    again, warm = compiled_value(product, x, "recipe", cache)
    assert warm.loaded == 1 and warm.used == 1
    np.testing.assert_array_equal(again, first)
    np.testing.assert_allclose(first, np.tanh(np.asarray(x) @ np.asarray(x).T).sum(axis=0), rtol=1e-6)


def test_a_wrong_guess_prefetches_but_never_replaces_the_program(cache):
    """The recipe's remembered entry is another function's executable: it is loaded, never handed over."""
    x = jnp.arange(9.0).reshape(3, 3) / 10
    compiled_value(product, x, "recipe", cache)
    value, prefetch = compiled_value(difference, x, "recipe", cache)
    assert prefetch.loaded == 1 and prefetch.used == 0
    np.testing.assert_allclose(value, np.cos(np.asarray(x) - np.asarray(x).T).sum(axis=1), rtol=1e-6)
    # The index now remembers what the recipe asked for last.
    _, again = compiled_value(difference, x, "recipe", cache)
    assert again.used == 1


def test_a_damaged_index_or_a_missing_entry_falls_back_to_compiling(cache):
    x = jnp.ones((2, 5))
    expected, _ = compiled_value(product, x, "recipe", cache)
    for entry in cache.glob("*-cache"):
        entry.unlink()  # the index points at entries that are gone
    value, prefetch = compiled_value(product, x, "recipe", cache)
    assert prefetch.loaded == 0 and prefetch.used == 0
    np.testing.assert_array_equal(value, expected)
    index = json.loads((cache / compile_prefetch.INDEX_NAME).read_text())
    for entry in index["recipe"]:
        entry["devices"] = [10_000]  # another machine's device
    (cache / compile_prefetch.INDEX_NAME).write_text(json.dumps(index))
    value, prefetch = compiled_value(product, x, "recipe", cache)
    assert prefetch.loaded == 0 and prefetch.used == 0
    np.testing.assert_array_equal(value, expected)
    index["recipe"][0]["devices"] = 7  # hand-edited into nonsense: the recipe's entries are ignored
    (cache / compile_prefetch.INDEX_NAME).write_text(json.dumps(index))
    value, prefetch = compiled_value(product, x, "recipe", cache)
    assert prefetch.loaded == 0
    np.testing.assert_array_equal(value, expected)
    (cache / compile_prefetch.INDEX_NAME).write_text("{not json")
    value, prefetch = compiled_value(product, x, "recipe", cache)
    assert prefetch.used == 0
    np.testing.assert_array_equal(value, expected)
    assert list(json.loads((cache / compile_prefetch.INDEX_NAME).read_text())) == ["recipe"]  # rewritten whole


def test_the_recipe_key_ignores_where_outputs_go_but_not_what_shapes_a_program():
    base = {"model": "tiny", "batch_size": 32, "output_dir": "a", "log_every": 10}
    same = compile_prefetch.recipe_key(base)
    assert compile_prefetch.recipe_key({**base, "output_dir": "b", "log_every": 1}) == same
    assert compile_prefetch.recipe_key({**base, "batch_size": 16}) != same
    assert compile_prefetch.recipe_key({**base, "model": "other"}) != same


def test_the_index_keeps_the_newest_recipes(cache, monkeypatch):
    monkeypatch.setattr(compile_prefetch, "MAX_RECIPES", 2)
    x = jnp.ones((2, 2))
    for recipe in ("a", "b", "c"):
        compiled_value(product, x, recipe, cache)
    assert list(json.loads((cache / compile_prefetch.INDEX_NAME).read_text())) == ["b", "c"]
