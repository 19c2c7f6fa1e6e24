"""`rocoft_jax.adapters`: adapter files round-trip bit for bit, merge as `merge` does, refuse other bases and
damaged files in one line, and their peft form reproduces the update.

References: `rocoft_jax.merge` of the trainable tree the adapter was made from (the merged export's code),
and for peft the dense update ``W - W0`` of the merged kernel rebuilt with numpy in PyTorch's (d_out, d_in)
layout. Logits against a trained model and against peft on PyTorch are in tests/train/test_adapter_*.py.
"""

from __future__ import annotations

import functools
import json

import chex
import jax
import numpy as np
import pytest
from conftest import (
    tiny_gpt2,
    tiny_llama,
    tiny_roberta,
)

import rocoft_jax
from rocoft_jax import adapters
from rocoft_jax import tree as tree_lib


def trained(params, rank, mode, seed=0, scale=0.3, **kwargs):
    """``(adapter, trainable, frozen, mask)``: a selection whose values moved by N(0, scale) noise, as training
    moves them."""
    mask = rocoft_jax.mask_params(params, rank, mode, strategy="random", seed=seed, **kwargs)
    trainable, frozen = rocoft_jax.split(params, mask)
    rng = np.random.default_rng(seed + 100)
    trainable = jax.tree.map(lambda v: v + scale * rng.normal(size=v.shape).astype(np.float32), trainable)
    adapter = adapters.from_trainable(
        trainable, mask, base_fingerprint=adapters.fingerprint(frozen), base_model="tiny", extra={"task": "t"}
    )
    return adapter, trainable, frozen, mask


@pytest.fixture(scope="module")
def roberta_adapter(tmp_path_factory):
    """A row adapter of the tiny RoBERTa with its head and targeted biases, saved and read back."""
    _, params = tiny_roberta()
    adapter, trainable, frozen, mask = trained(params, 2, "row", train_bias=True)
    directory = adapters.save_adapter(adapter, tmp_path_factory.mktemp("adapter") / "a")
    return adapters.load_adapter(directory), trainable, frozen, mask, directory


def test_files_hold_only_the_trained_values_and_read_back_bit_for_bit(roberta_adapter):
    loaded, trainable, _, mask, directory = roberta_adapter
    assert sorted(p.name for p in directory.iterdir()) == [adapters.CONFIG_FILE, adapters.WEIGHTS_FILE]
    config = json.loads((directory / adapters.CONFIG_FILE).read_text())
    assert (config["family"], config["mode"], config["rank"], config["extra"]) == ("bert", "row", 2, {"task": "t"})
    chex.assert_trees_all_equal(loaded.trainable(), trainable)  # bit for bit, fp32
    assert {p: i.tolist() for p, i in loaded.indices.items()} == {p: i.tolist() for p, i in mask.indices.items()}
    trained_bytes = sum(np.asarray(v).nbytes for v in jax.tree.leaves(trainable))
    index_bytes = sum(i.size * 4 for i in mask.indices.values())
    # the weights file is the trained values, their indices and a header: no frozen weight
    size = (directory / adapters.WEIGHTS_FILE).stat().st_size
    assert trained_bytes + index_bytes <= size < trained_bytes + index_bytes + 20_000


def test_merge_and_efficient_path_equal_the_trained_model(roberta_adapter):
    """`merge_adapter` gives the merged export's params bit for bit, `apply_adapter` the trained tree and mask
    (tests/train/test_adapter_cli.py runs both against a trained model's logits)."""
    loaded, trainable, frozen, mask, _ = roberta_adapter
    _, params = tiny_roberta()
    chex.assert_trees_all_equal(adapters.merge_adapter(params, loaded), rocoft_jax.merge(trainable, frozen, mask))
    got_trainable, got_frozen, got_mask = adapters.apply_adapter(params, loaded)
    chex.assert_trees_all_equal(got_trainable, trainable)
    chex.assert_trees_all_equal(got_frozen, frozen)
    assert got_mask.label_of == mask.label_of and got_mask.indices.keys() == mask.indices.keys()


@functools.cache
def random_entries():
    """``(adapter, trainable, frozen, mask)`` of random entries of the tiny RoBERTa (flat indices)."""
    return trained(tiny_roberta()[1], 0.01, "random")


@pytest.mark.parametrize("factory, mode", [(tiny_gpt2, "column"), (tiny_llama, "row"), (tiny_roberta, "random")])
def test_other_layouts_merge_bit_for_bit(tmp_path, factory, mode):
    """GPT-2's (d_out, d_in) Conv1D kernels, a Llama, and random entries (flat indices, no low-rank form)."""
    _, params = factory()
    adapter, trainable, frozen, mask = random_entries() if mode == "random" else trained(params, 3, mode)
    loaded = adapters.load_adapter(adapters.save_adapter(adapter, tmp_path / "a"))
    chex.assert_trees_all_equal(adapters.merge_adapter(params, loaded), rocoft_jax.merge(trainable, frozen, mask))


def test_another_base_is_refused(roberta_adapter):
    loaded = roberta_adapter[0]
    with pytest.raises(ValueError, match="other base weights") as err:
        adapters.check_base(loaded, tiny_roberta(seed=1)[1])  # same shapes, other weights
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="is for a bert model .* but these params are a llama"):
        adapters.check_base(loaded, tiny_llama()[1])
    flat = tree_lib.flatten(tiny_roberta()[1])
    flat["classifier/out_proj/kernel"] = np.zeros((32, 2), np.float32)
    with pytest.raises(ValueError, match=r"num_labels"):
        adapters.apply_adapter(tree_lib.unflatten(flat), loaded)


def _corrupt(directory, how):
    config_path, weights = directory / adapters.CONFIG_FILE, directory / adapters.WEIGHTS_FILE
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif how == "flipped":
        data = bytearray(weights.read_bytes())
        data[-5] ^= 0x10
        weights.write_bytes(bytes(data))
    elif how == "missing":
        weights.unlink()
    elif how == "not json":
        config_path.write_text("{")
    elif how == "no fingerprint":
        config = json.loads(config_path.read_text())
        del config["base_fingerprint"]
        config_path.write_text(json.dumps(config))
    elif how == "peft":
        config_path.write_text(json.dumps({"peft_type": "LORA"}))


@pytest.mark.parametrize(
    "how, message",
    [
        ("truncated", "does not match the checksum"),
        ("flipped", "does not match the checksum"),
        ("missing", "does not exist"),
        ("not json", "is not valid JSON"),
        ("no fingerprint", "lacks a valid base_fingerprint"),
        ("peft", "a peft adapter"),
    ],
)
def test_damaged_files_are_one_line_errors(roberta_adapter, tmp_path, how, message):
    directory = adapters.save_adapter(roberta_adapter[0], tmp_path / "a")
    _corrupt(directory, how)
    with pytest.raises(ValueError, match=message) as err:
        adapters.load_adapter(directory)
    assert "\n" not in str(err.value)


def _torch_layout(kernel, out_axis):
    """A kernel as PyTorch's (d_out, d_in) weight."""
    return np.asarray(kernel, np.float64).T if out_axis == 1 else np.asarray(kernel, np.float64)


@pytest.mark.parametrize("factory, mode", [(tiny_roberta, "row"), (tiny_roberta, "column"), (tiny_gpt2, "row")])
def test_peft_lora_weights_are_the_update(factory, mode):
    """B @ A is the merged kernel minus the base kernel (PyTorch layout), zero outside the selection; scale 1."""
    _, params = factory()
    adapter, trainable, frozen, mask = trained(params, 3, mode, train_bias=True)
    config, tensors = adapters.to_peft(adapter, params)
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == 3
    assert config["fan_in_fan_out"] == (factory is tiny_gpt2) and config["bias"] == "lora_only"
    merged = tree_lib.flatten(rocoft_jax.merge(trainable, frozen, mask))
    base = tree_lib.flatten(params)
    assert len(config["target_modules"]) == len(mask.slices)
    for path, spec in mask.slices.items():
        module = path[: -len("/kernel")].replace("/", ".")
        assert module in config["target_modules"]
        a = tensors[f"base_model.model.{module}.lora_A.weight"].astype(np.float64)
        b = tensors[f"base_model.model.{module}.lora_B.weight"].astype(np.float64)
        assert a.shape[0] == b.shape[1] == 3
        delta = _torch_layout(merged[path], spec.out_axis) - _torch_layout(base[path], spec.out_axis)
        np.testing.assert_allclose(b @ a, delta, atol=1e-6)
        outside = np.ones_like(delta, bool)
        if mode == "row":
            outside[spec.indices, :] = False
        else:
            outside[:, spec.indices] = False
        assert not (b @ a)[outside].any()
        bias = tensors[f"base_model.model.{module}.base_layer.bias"]
        np.testing.assert_array_equal(bias, np.asarray(merged[path[: -len("kernel")] + "bias"]))
    if factory is tiny_roberta:
        assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"]
        head = tensors["base_model.model.classifier.out_proj.weight"]
        np.testing.assert_array_equal(head, np.asarray(merged["classifier/out_proj/kernel"]).T)


def test_peft_refuses_what_lora_cannot_express():
    _, params = tiny_roberta()
    with pytest.raises(ValueError, match="random entries have no low-rank form"):
        adapters.to_peft(random_entries()[0], params)
    with pytest.raises(ValueError, match="method 'lora' has none of its own"):
        _, trainable, frozen, mask = trained(params, 2, "row")
        adapters.from_trainable(trainable, mask, base_fingerprint="0", base_model="tiny", method="lora")
