"""Adapters through the CLI: ``train.export --format adapter|peft``, ``train.run --adapter`` and ``train.serve``.

One short demo run (rows r=3, head and biases trained) on a tiny base saved as an HF dir, so PyTorch and
peft can load the base too. References: the merged export's ``flax_model.msgpack`` and ``model.safetensors``
(bit for bit and within 1e-6), the trained model's logits through ``train.export.load_trained`` (the
checkpoint), and peft's ``PeftModel`` on PyTorch transformers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import assert_one_line_error, fast_jit, write_tiny_model_dir
from flax import serialization
from flax.traverse_util import flatten_dict
from safetensors.numpy import load_file, save_file

import rocoft_jax
from rocoft_jax import adapters
from train import export, models, run, serve
from train.tasks.demo import make_demo_tokenizer

TEXTS = ["good happy river", "bad cold dark sad tree", "the cat sees a dog", "gloomy calm kind road"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """The 'tiny' preset's random RoBERTa as an HF dir: Flax and PyTorch weights, the demo tokenizer."""
    directory = tmp_path_factory.mktemp("base") / "tiny"
    params = write_tiny_model_dir(directory)
    save_file(export.torch_state_dict(params), str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


@pytest.fixture(scope="module")
def trained_run(base_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    args = ["--model", str(base_dir), "--max-steps", "6", "--batch-size", "16", "--limit-eval", "32"]
    assert run.main([*args, "--output-dir", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory) -> dict[str, Path]:
    """The run exported in each format."""
    root = tmp_path_factory.mktemp("exported")
    for fmt in export.FORMATS:
        assert export.main(["--checkpoint", str(trained_run), "--out", str(root / fmt), "--format", fmt]) == 0
    return {fmt: root / fmt for fmt in export.FORMATS}


def trained_logits(trained_run):
    """The trained model's logits on TEXTS, from the checkpoint (no export involved)."""
    model, method, trainable, frozen, tokenizer, _ = export.load_trained(trained_run)
    enc = tokenizer(TEXTS, padding="max_length", max_length=16, return_tensors="np")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    logits = fast_jit(lambda t, f: method.apply(model, t, f, batch))(trainable, frozen)
    return batch, np.asarray(logits), (model, frozen, trainable)


def test_adapter_merges_into_the_merged_export_bit_for_bit(trained_run, exported):
    loaded = adapters.load_adapter(exported["adapter"])
    assert (loaded.mode, loaded.config["rank"], loaded.family) == ("row", 3, "bert")
    assert any(p.endswith("/bias") for p in loaded.trained) and any(p.startswith("classifier/") for p in loaded.trained)
    batch, expected, (model, frozen, trainable) = trained_logits(trained_run)
    params = rocoft_jax.with_trained_leaves(frozen, trainable)  # the base; the adapter replaces its trained leaves
    merged = adapters.merge_adapter(params, loaded)
    reference = serialization.msgpack_restore((exported["merged"] / "flax_model.msgpack").read_bytes())
    ours, theirs = flatten_dict(merged, sep="/"), flatten_dict(reference, sep="/")
    assert ours.keys() == theirs.keys()
    for path in ours:
        np.testing.assert_array_equal(np.asarray(ours[path]), theirs[path], err_msg=path)
    trainable_, frozen_, mask = adapters.apply_adapter(params, loaded)

    def efficient(trainable, frozen):
        with rocoft_jax.sliced_kernels(trainable, mask):
            return model(**batch, params=rocoft_jax.with_trained_leaves(frozen, trainable)).logits

    np.testing.assert_allclose(np.asarray(fast_jit(efficient)(trainable_, frozen_)), expected, atol=1e-6)
    adapter_bytes = adapters.num_bytes(exported["adapter"])
    assert adapter_bytes * 2 < (exported["merged"] / "model.safetensors").stat().st_size


def test_run_evaluates_an_adapter_as_the_run_did(base_dir, trained_run, exported, tmp_path):
    out = tmp_path / "eval"
    args = ["--model", str(base_dir), "--adapter", str(exported["adapter"]), "--max-steps", "0", "--limit-eval", "32"]
    assert run.main([*args, "--mode", "column", "--output-dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    original = json.loads((trained_run / "results.json").read_text())
    assert results["steps"] == 0 and results["mode"] == "row"  # the adapter's selection, whatever the flags
    assert results["metrics"] == original["metrics"]
    assert results["num_trainable"] == original["num_trainable"]


def test_bad_adapters_are_one_line_errors(trained_run, exported, tmp_path, capsys):
    common = ["--max-steps", "0", "--limit-eval", "8", "--output-dir"]
    assert run.main(["--adapter", str(exported["adapter"]), "--seed", "1", *common, str(tmp_path / "a")]) == 2
    assert_one_line_error(capsys, "other base weights")  # 'tiny' with seed 1 is another random base
    damaged = tmp_path / "damaged"
    shutil.copytree(exported["adapter"], damaged)
    (damaged / adapters.WEIGHTS_FILE).write_bytes((damaged / adapters.WEIGHTS_FILE).read_bytes()[:-9])
    assert run.main(["--adapter", str(damaged), *common, str(tmp_path / "b")]) == 2
    assert_one_line_error(capsys, "corrupt or was changed")
    assert run.main(["--adapter", str(tmp_path / "none"), *common, str(tmp_path / "c")]) == 2
    assert_one_line_error(capsys, "--adapter")
    assert run.main(["--adapter", str(exported["peft"]), *common, str(tmp_path / "d")]) == 2
    assert_one_line_error(capsys, "a peft adapter")


def test_peft_export_gives_the_trained_logits_in_pytorch(base_dir, trained_run, exported):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification

    config = json.loads((exported["peft"] / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["bias"]) == ("LORA", 3, 3, "lora_only")
    batch, expected, _ = trained_logits(trained_run)
    base = AutoModelForSequenceClassification.from_pretrained(base_dir).eval()
    peft_model = peft.PeftModel.from_pretrained(base, exported["peft"]).eval()
    with torch.no_grad():
        got = peft_model(**{k: torch.as_tensor(v) for k, v in batch.items()}).logits.numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)
    merged = peft_model.merge_and_unload().state_dict()
    reference = load_file(exported["merged"] / "model.safetensors")
    for name, value in reference.items():
        np.testing.assert_allclose(merged[name].numpy(), value, atol=1e-6, err_msg=name)


def test_serve_mixes_adapters_in_a_batch(base_dir, trained_run, exported, tmp_path, capsys):
    """Rows of two adapters (the run's rows, and columns made here) in each batch, against merged models."""
    model, params = models.load_pretrained(str(base_dir), "sequence-classification")
    tokenizer = make_demo_tokenizer()
    first = adapters.load_adapter(exported["adapter"])
    mask = rocoft_jax.mask_params(params, 2, "column", strategy="random", seed=3)
    columns_tree, columns_frozen = rocoft_jax.split(params, mask)
    rng = np.random.default_rng(0)
    columns_tree = jax.tree.map(lambda v: v + 0.3 * rng.normal(size=v.shape).astype(np.float32), columns_tree)
    second = adapters.from_trainable(
        columns_tree,
        mask,
        base_fingerprint=adapters.fingerprint(columns_frozen),
        base_model=first.config["base_model"],
        extra=first.config["extra"],
    )
    adapters.save_adapter(second, tmp_path / "columns")
    requests = tmp_path / "requests.jsonl"
    tasks = ["rows", "columns", "columns", "rows", "rows"]
    requests.write_text("".join(json.dumps({"task": t, "text": x}) + "\n" for t, x in zip(tasks, TEXTS + TEXTS[:1])))
    out = tmp_path / "out.jsonl"
    argv = ["--adapter", f"rows={exported['adapter']}", "--adapter", f"columns={tmp_path / 'columns'}"]
    assert (
        serve.main([*argv, "--input", str(requests), "--output", str(out), "--batch-size", "4", "--max-length", "16"])
        == 0
    )
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["task"] for line in lines] == tasks
    forward = fast_jit(lambda p, ids, mask: model(input_ids=ids, attention_mask=mask, params=p).logits)
    for name, adapter in (("rows", first), ("columns", second)):
        rows = [i for i, t in enumerate(tasks) if t == name]
        texts = [(TEXTS + TEXTS[:1])[i] for i in rows]
        enc = tokenizer(texts, padding="max_length", max_length=16, return_tensors="np")
        merged = adapters.merge_adapter(params, adapter)
        expected = np.asarray(forward(merged, enc["input_ids"], enc["attention_mask"]))
        got = np.array([lines[i]["logits"] for i in rows])
        np.testing.assert_allclose(got, expected, atol=1e-5)
        assert [lines[i]["prediction"] for i in rows] == expected.argmax(-1).tolist()
    requests.write_text(json.dumps({"task": "nope", "text": "good"}) + "\n")
    assert serve.main([*argv, "--input", str(requests)]) == 2
    assert_one_line_error(capsys, "'task' is 'nope'")


@pytest.mark.slow
def test_serve_generates_with_mixed_causal_lm_adapters(tmp_path):
    """Greedy generation of two tiny-Llama adapters (rows, columns) mixed in each batch, against each adapter's
    merged model generating alone."""
    from transformers import GenerationConfig

    from train import generate as generate_lib
    from train import tasks
    from train.config import TrainConfig
    from train.input_pipeline import bucket_lengths, fit_bucket

    recorded = {"model": "tiny-llama", "task": "boolq", "dtype": "fp32", "dropout": 0.0, "seed": 0}
    model, params, tokenizer = tasks.load_model_and_tokenizer(TrainConfig(**recorded))
    named = {}
    for name, mode, rank in (("rows", "row", 2), ("columns", "column", 3)):
        mask = rocoft_jax.mask_params(params, rank, mode, strategy="random", seed=rank)
        trainable, frozen = rocoft_jax.split(params, mask)
        rng = np.random.default_rng(rank)
        trainable = jax.tree.map(lambda v, rng=rng: v + 0.5 * rng.normal(size=v.shape).astype(np.float32), trainable)
        named[name] = adapters.from_trainable(
            trainable,
            mask,
            base_fingerprint=adapters.fingerprint(frozen),
            base_model="tiny-llama",
            extra={"config": recorded},
        )
        adapters.save_adapter(named[name], tmp_path / name)
    prompts = ["Is the sky blue?", "Is water dry???", "Do cats purr???", "Are fish birds?", "Is snow white?"]
    tasks_of = ["rows", "columns", "rows", "columns", "columns"]
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps({"task": t, "prompt": p}) + "\n" for t, p in zip(tasks_of, prompts)))
    out = tmp_path / "out.jsonl"
    argv = ["--adapter", f"rows={tmp_path / 'rows'}", "--adapter", f"columns={tmp_path / 'columns'}"]
    argv += ["--input", str(requests), "--output", str(out), "--batch-size", "4", "--max-new-tokens", "6"]
    assert serve.main(argv) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    encoded = tokenizer(prompts)["input_ids"]
    length = fit_bucket(bucket_lengths(len(encoded[0])), len(encoded[0]))  # the prompts have one length
    pad = tokenizer.pad_token_id
    config = GenerationConfig(
        max_new_tokens=6, num_beams=1, do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad
    )
    run_alone = jax.jit(
        lambda p, ids, mask: model.generate(ids, generation_config=config, attention_mask=mask, params=p).sequences
    )
    generations = set()
    for i, (task, prompt) in enumerate(zip(tasks_of, encoded)):
        batch = generate_lib.left_pad([prompt], length, pad)
        merged = adapters.merge_adapter(params, named[task])
        new = np.asarray(run_alone(merged, batch["input_ids"], batch["attention_mask"]))[0, length:].tolist()
        if tokenizer.eos_token_id in new:
            new = new[: new.index(tokenizer.eos_token_id)]
        assert lines[i] == {"task": task, "generation": tokenizer.decode(new, skip_special_tokens=True)}
        generations.add(lines[i]["generation"])
    assert len(generations) > 1
