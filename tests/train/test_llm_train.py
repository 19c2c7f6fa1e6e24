"""Causal-LM fine-tuning and evaluation by generation (train.tasks.llm, train.generate) on the real LLM-Adapters files.

Models are the random-init tiny presets with the offline byte tokenizer; results are compared with references
written here: the one-batch step, an uncached decoding loop over the training forward pass, and a single-device run.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import chex
import jax
import numpy as np
import optax
import pytest
import yaml
from conftest import assert_one_line_error, cpu_env

from rocoft_jax import sharding
from train import checkpoint as ckpt
from train import generate, methods, run, step, tasks, timing
from train.byte_tokenizer import BOS_ID, EOS_ID, make_byte_tokenizer
from train.config import TrainConfig
from train.llm_data import format_eval_prompt, format_train_prompt, get_task, load_records
from train.tasks import llm

REPO = Path(__file__).resolve().parents[2]
DATASET = REPO.parent / "shared" / "data" / "llm-adapters" / "dataset"
FAMILIES = ("llama", "mistral", "gemma", "gptj", "bloom", "opt", "gpt2")


@pytest.fixture(scope="module")
def dataset() -> Path:
    if not (DATASET / "boolq" / "train.json").is_file() or not (DATASET / "gsm8k" / "test.json").is_file():
        pytest.skip(f"{DATASET} is absent (real data lives beside the repo)")
    return DATASET


def llm_config(dataset: Path, **overrides) -> TrainConfig:
    """A small fp32 run without dropout: batches of 4, 256-token cutoff (the byte tokenizer reads the
    template's first 140 bytes before any instruction), one padded length so the step compiles once."""
    values = dict(
        model="tiny-llama",
        task="boolq",
        data_dir=str(dataset),
        batch_size=4,
        cutoff=256,
        bucket=False,
        dropout=0.0,
        strategy="random",
        train_bias=True,
    )
    return TrainConfig(**{**values, **overrides})


def one_device():
    return sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])


def batch_sharding():
    return jax.sharding.NamedSharding(one_device(), sharding.BATCH)


def compiled(config: TrainConfig, tx, grad_accum: int = 1):
    """``(model, method, tokenizer, state, frozen, shardings, train_fn)`` as train.run builds them, one device."""
    model, params, tokenizer = tasks.load_model_and_tokenizer(config)
    method = methods.build_method(
        "rocoft", params, rank=3, mode="row", strategy=config.strategy, train_bias=config.train_bias
    )
    trainable, frozen = method.split(params)
    state, shardings = step.init_sharded_state(trainable, tx, 0, one_device(), method.mask.family, frozen)
    train_fn, _ = step.compile_steps(model, method, tx, "causal-lm", shardings, donate=False, grad_accum=grad_accum)
    return model, method, tokenizer, state, frozen, shardings, train_fn


def job_for(config: TrainConfig, tokenizer) -> llm.LlmJob:
    job = llm.LlmJob(config)
    job.prepare(tokenizer, batch_sharding())
    return job


# ---------------------------------------------------------------- training


@pytest.mark.parametrize(  # Llama and GPT-2 (Conv1D) by default; every family under -m slow
    "family", [f if f in ("llama", "gpt2") else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES]
)
def test_every_family_learns_on_real_boolq_and_gsm8k(dataset, family):
    config = llm_config(dataset, model=f"tiny-{family}")
    tx, _ = step.make_optimizer(1e-2, 100, 0, 0.0, "constant", 1.0)
    _, method, tokenizer, state, frozen, _, train_fn = compiled(config, tx)
    assert method.mask.family == {"mistral": "llama", "gemma": "llama"}.get(family, family)
    curves = {}
    for task, train_file in (("boolq", None), ("gsm8k", str(dataset / "gsm8k" / "test.json"))):
        job = job_for(dataclasses.replace(config, task=task, train_file=train_file), tokenizer)
        trained, losses = state, []
        for s in range(8):
            trained, metrics = train_fn(trained, frozen, job.train_batch(s))
            losses.append(float(metrics["loss"]))
        assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.05, (task, losses)
        curves[task] = losses
    assert curves["boolq"] != curves["gsm8k"]  # each file's own text reached the model


def test_response_only_loss_covers_exactly_the_response_tokens(dataset):
    """In the (B, N, T) batch the step sees: prompt tokens are out of the loss, response and EOS in."""
    config = llm_config(dataset, train_on_inputs=False, cutoff=512, grad_accum=2, bucket=True)
    tokenizer = make_byte_tokenizer()
    job = job_for(config, tokenizer)
    rows = job.step_rows(0)
    batch = jax.tree.map(np.asarray, job.train_batch(0))
    assert batch["input_ids"].shape == (4, 2, 512)  # the bucket holding the longest of the 8 examples
    response_tokens = 0
    for index, ids, attention, loss_mask in zip(
        rows.reshape(-1), *(batch[k].reshape(8, -1) for k in ("input_ids", "attention_mask", "loss_mask"))
    ):
        record = job.train_records[index]
        prompt = len(tokenizer(format_train_prompt({**record, "output": ""}))["input_ids"])
        length = int(attention.sum())
        assert ids[length - 1] == EOS_ID and (attention[:length] == 1).all() and (attention[length:] == 0).all()
        positions = np.arange(len(ids))
        np.testing.assert_array_equal(loss_mask, (positions >= prompt) & (positions < length))
        assert tokenizer.decode(ids[loss_mask == 1], skip_special_tokens=True) == record["output"]
        response_tokens += length - prompt
    # The step's loss counts exactly those tokens (each predicted from the tokens before it).
    logits = np.zeros((*batch["input_ids"].shape, 1), np.float32)
    micro = {k: v.swapaxes(0, 1) for k, v in batch.items()}
    counts = [float(step.loss_sum(logits[:, j], {k: v[j] for k, v in micro.items()}, "causal-lm")[1]) for j in range(2)]
    assert sum(counts) == response_tokens
    whole_job = job_for(dataclasses.replace(config, train_on_inputs=True), tokenizer)
    whole = jax.tree.map(np.asarray, whole_job.train_batch(0))
    np.testing.assert_array_equal(whole["loss_mask"], whole["attention_mask"])


def test_grad_accumulation_equals_one_big_batch(dataset):
    """3 micro-batches of 2 rows give the step of one 6-row batch; plain SGD so values show any gradient error."""
    config = llm_config(dataset, grad_accum=3, batch_size=2, cutoff=512, bucket=True)
    tx = optax.sgd(1.0)
    model, method, tokenizer, state, frozen, shardings, accum_fn = compiled(config, tx, grad_accum=3)
    big_fn, _ = step.compile_steps(model, method, tx, "causal-lm", shardings, donate=False)
    batch = jax.tree.map(np.asarray, job_for(config, tokenizer).train_batch(0))
    counts = batch["loss_mask"][:, :, 1:].sum(axis=(0, 2))
    assert len(set(counts.tolist())) > 1  # unequal micro-batches: a mean of means would differ
    flat = {k: v.swapaxes(0, 1).reshape(6, -1) for k, v in batch.items()}
    accum_state, accum = accum_fn(state, frozen, batch)
    big_state, big = big_fn(state, frozen, flat)
    np.testing.assert_allclose(float(accum["loss"]), float(big["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(accum["grad_norm"]), float(big["grad_norm"]), rtol=1e-5)
    chex.assert_trees_all_close(
        jax.tree.map(np.asarray, accum_state.trainable), jax.tree.map(np.asarray, big_state.trainable), atol=1e-6
    )
    moved = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).max(), big_state.trainable, state.trainable)
    assert max(jax.tree.leaves(moved)) > 1e-3


def shape_key(batch) -> tuple:
    return tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items()))


def test_planned_batches_are_the_shapes_of_every_train_batch(dataset):
    """2.5 epochs of real ARC-Easy at 1 x 2 rows, buckets 512 and 600: the planned shapes are those of the
    train batches (bucket, and whether the mask is dropped), each once."""
    config = llm_config(dataset, task="arc-e", cutoff=600, bucket=True, batch_size=1, grad_accum=2, limit_train=200)
    job = job_for(config, make_byte_tokenizer())
    steps = 250
    train, evals = job.planned_batches(steps)
    assert evals == [] and all(isinstance(v, jax.ShapeDtypeStruct) for b in train for v in b.values())
    assert len({shape_key(b) for b in train}) == len(train)
    assert {shape_key(job.train_batch(s)) for s in range(steps)} == {shape_key(b) for b in train}
    labels = {timing.describe(b) for b in train}
    assert {"1x2x512", "1x2x600", "1x2x600 no mask"} <= labels, labels
    assert job.planned_batches(0) == ([], [])


def test_planned_batches_of_several_processes_are_one_shape(dataset, monkeypatch):
    """With several processes (faked here: process 0 of 2) every batch is padded to --cutoff and keeps its
    mask, so the plan is one global batch of that shape."""
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    config = llm_config(dataset, task="arc-e", cutoff=600, bucket=True, batch_size=4, grad_accum=2, limit_train=200)
    job = job_for(config, make_byte_tokenizer())
    train, evals = job.planned_batches(100)
    assert evals == [] and [shape_key(b) for b in train] == [
        shape_key({k: np.zeros((4, 2, 600), np.int32) for k in ("input_ids", "attention_mask", "loss_mask")})
    ]
    assert job.host(0)["input_ids"].shape == (2, 2, 600)  # this process's half of the rows


def test_train_run_compiles_every_step_program_once_before_the_loop(dataset, tmp_path, first_use_compiles):
    """A run whose steps meet several shapes: results.json counts each train-step program once, each compiled
    ahead of the loop (`StepPrograms.compile`, the compile at first use, never runs), and they are the planned
    shapes."""
    out = tmp_path / "run"
    args = ["--model", "tiny-llama", "--task", "arc-e", "--cutoff", "600", "--batch-size", "1", "--grad-accum", "2"]
    args += ["--max-steps", "12", "--limit-train", "200", "--num-beams", "1", "--eval-limit", "1"]
    results, _ = run_llm(dataset, out, *args, "--max-new-tokens", "2", "--eval-batch-size", "1")
    assert first_use_compiles == []
    programs = results["timing"]["compile"]["programs"]
    assert results["timing"]["compile"]["count"] == len(programs) > 1
    assert all(p["count"] == 1 for p in programs.values())
    config = TrainConfig(**yaml.safe_load((out / "config.yaml").read_text()))
    planned, _ = job_for(config, make_byte_tokenizer()).planned_batches(12)
    assert set(programs) == {f"train_step {timing.describe(b)}" for b in planned}


# ---------------------------------------------------------------- generation


def test_eval_prompts_never_see_the_reference_output():
    tokenizer = make_byte_tokenizer()
    records = [
        {
            "instruction": "Is it so?\n\nAnswer format: true/false",
            "input": "",
            "output": "SECRET-ANSWER",
            "answer": "true",
        }
    ]
    (ids,) = generate.encode_prompts(tokenizer, records)
    assert ids[0] == BOS_ID
    assert tokenizer.decode(ids, skip_special_tokens=True) == format_eval_prompt(records[0]["instruction"])
    assert "SECRET" not in tokenizer.decode(ids)


# rotary + GQA, learned positions, ALiBi, and a rocoft_jax.faithful class (Mistral)
@pytest.mark.parametrize(  # bloom (ALiBi) and mistral (sliding window) under -m slow: CI time on 2 cores
    "family",
    ["llama", "gpt2", pytest.param("bloom", marks=pytest.mark.slow), pytest.param("mistral", marks=pytest.mark.slow)],
)
def test_greedy_generation_equals_uncached_decoding_of_the_trained_model(dataset, tmp_path, family):
    """Left padding, the KV cache and the sliced layers against argmax over the plain model on merged weights."""
    config = llm_config(dataset, model=f"tiny-{family}")
    model, params, tokenizer = tasks.load_model_and_tokenizer(config)
    params = jax.tree.map(lambda x: 10 * x if x.ndim == 2 else x, params)  # spread the logits: no near-ties
    method = methods.build_method("rocoft", params, rank=3, mode="row", strategy="random", train_bias=True)
    trainable, frozen = method.split(params)
    keys = iter(jax.random.split(jax.random.PRNGKey(1), len(jax.tree.leaves(trainable))))
    trainable = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(next(keys), x.shape), trainable)
    new_tokens = 5
    generator = generate.Generator(
        model,
        method,
        tokenizer,
        get_task("boolq"),
        max_new_tokens=new_tokens,
        num_beams=1,
        batch_size=2,
        batch_sharding=batch_sharding(),
    )
    records = load_records(dataset / "boolq" / "test.json")[:3]
    prompts = generate.encode_prompts(tokenizer, records)
    assert len({len(p) for p in prompts}) == 3  # a batch mixes prompt lengths: real left padding
    _, stats = generator.evaluate(trainable, frozen, records, tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [line["index"] for line in lines] == [0, 1, 2]  # the batch-filling repeat is not scored

    width = max(map(len, prompts)) + new_tokens
    merged = method.merge(trainable, frozen)
    forward = jax.jit(lambda ids, mask: model(ids, attention_mask=mask, params=merged).logits)
    generated = 0
    for prompt, line in zip(prompts, lines):
        sequence = list(prompt)
        while len(sequence) < len(prompt) + new_tokens and sequence[-1] != EOS_ID:
            ids, mask = np.zeros((1, width), np.int32), np.zeros((1, width), np.int32)
            ids[0, : len(sequence)], mask[0, : len(sequence)] = sequence, 1
            sequence.append(int(np.argmax(forward(ids, mask)[0, len(sequence) - 1])))
        reference = [t for t in sequence[len(prompt) :] if t != EOS_ID]
        assert line["generation"] == tokenizer.decode(reference, skip_special_tokens=True)
        generated += len(reference)
    assert stats["generated_tokens"] == generated


# ---------------------------------------------------------------- python -m train.run


def run_llm(dataset: Path, out: Path, *args: str) -> tuple[dict, list[dict]]:
    assert run.main(["--data-dir", str(dataset), "--output-dir", str(out), "--log-every", "1", *args]) == 0
    return read_outputs(out)


def read_outputs(out: Path) -> tuple[dict, list[dict]]:
    """A finished run's results.json and its predictions.jsonl lines."""
    results = json.loads((out / "results.json").read_text())
    return results, [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def check_predictions(results: dict, lines: list[dict], records: list[dict]) -> None:
    """One line per test example, in order, scored as llm_data scores it; results.json holds their accuracy."""
    from train.llm_data import is_correct

    assert [line["index"] for line in lines] == list(range(len(records)))
    for line, record in zip(lines, records):
        assert set(line) == {"index", "instruction", "generation", "prediction", "answer", "correct"}
        assert (line["instruction"], line["answer"]) == (record["instruction"], record["answer"])
        prediction = float("inf") if line["prediction"] is None else line["prediction"]
        assert line["correct"] == is_correct(results["task"], prediction, record["answer"])
    assert results["metrics"]["accuracy"] == sum(line["correct"] for line in lines) / len(lines)
    assert results["eval_examples"] == len(lines) == results["generation"]["examples"]


def test_train_run_end_to_end_with_beam_search_on_math(dataset, tmp_path):
    """configs/llm/gsm8k.yaml (bf16 frozen weights, accumulation) with remat, trained on gsm8k's test.json, then
    answered by 3-beam search and read as numbers."""
    out = tmp_path / "gsm8k"
    results, lines = run_llm(
        dataset,
        out,
        "--model",
        "tiny-llama",
        "--task",
        "gsm8k",
        "--train-file",
        str(dataset / "gsm8k" / "test.json"),
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--remat",
        "full",
        "--num-beams",
        "3",
        "--eval-limit",
        "2",
        "--eval-batch-size",
        "2",
        "--max-new-tokens",
        "4",
    )
    check_predictions(results, lines, load_records(dataset / "gsm8k" / "test.json")[:2])
    assert all(line["prediction"] is None or isinstance(line["prediction"], float) for line in lines)
    assert (results["task"], results["steps"], results["num_beams"], results["max_new_tokens"]) == ("gsm8k", 2, 3, 4)
    assert results["train_file"] == str(dataset / "gsm8k" / "test.json")
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert (config["lr"], config["grad_accum"], config["dtype"], config["cutoff"]) == (1e-3, 2, "bf16", 256)
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses)) and min(losses) > 0
    meta, trainable = ckpt.load(out / "checkpoints")
    assert meta["selection"]["task"] == "gsm8k"
    assert {leaf.dtype for leaf in jax.tree.leaves(trainable)} == {np.dtype("float32")}  # fp32 over bf16 weights
    assert (out / "curves.png").is_file()


@pytest.mark.slow  # tests/train/test_sharding.py checks a sharded tiny-llama step in the default suite
def test_sharded_llm_run_equals_single_device(dataset, tmp_path):
    """The same train.run on 1 device and on an 8-device data=2,fsdp=2,tensor=2 mesh: losses, slices, answers."""
    args = [
        "--model",
        "tiny-llama",
        "--task",
        "boolq",
        "--dtype",
        "fp32",
        "--dropout",
        "0",
        "--batch-size",
        "8",
        "--grad-accum",
        "2",
        "--max-steps",
        "2",
        "--num-beams",
        "1",
        "--eval-limit",
        "8",
        "--eval-batch-size",
        "8",
        "--max-new-tokens",
        "4",
    ]

    def launch(name: str, devices: int, *extra: str) -> subprocess.Popen:
        command = [
            sys.executable,
            "-m",
            "train.run",
            "--data-dir",
            str(dataset),
            "--output-dir",
            str(tmp_path / name),
            "--log-every",
            "1",
            *args,
            *extra,
        ]
        return subprocess.Popen(
            command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cpu_env(devices)
        )

    # Both at once, each in a process of its own CPU devices: a process's device count is fixed at start, and a
    # GPU would sum in orders of its own.
    runs = {"single": launch("single", 1), "sharded": launch("sharded", 8, "--mesh", "data=2,fsdp=2,tensor=2")}
    for name, proc in runs.items():
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name}: {err[-3000:]}"
    check_predictions(
        *read_outputs(tmp_path / "single"), load_records(dataset / "boolq" / "test.json")[:8]
    )  # greedy, commonsense

    def losses(name):
        return [
            r["loss"]
            for r in map(json.loads, (tmp_path / name / "metrics.jsonl").read_text().splitlines())
            if "loss" in r
        ]

    np.testing.assert_allclose(losses("sharded"), losses("single"), atol=1e-5)
    chex.assert_trees_all_close(
        ckpt.load(tmp_path / "sharded" / "checkpoints")[1], ckpt.load(tmp_path / "single" / "checkpoints")[1], atol=1e-5
    )
    answers = {
        name: [line["generation"] for line in read_outputs(tmp_path / name)[1]] for name in ("single", "sharded")
    }
    assert answers["sharded"] == answers["single"] and len(answers["single"]) == 8


@pytest.mark.parametrize("args, message", [
    (["--task", "boolq2"], "unknown task 'boolq2'; valid tasks: cola, "),
    (["--task", "boolq"], "--task boolq needs --data-dir: LLM-Adapters' dataset/ folder"),
    (["--task", "gsm8k", "--data-dir", "DATA"], "no training file for gsm8k: DATA/gsm8k holds test.json; pass "
                                                "--train-file FILE"),
    (["--task", "boolq", "--data-dir", "DATA", "--train-file", "/no/such.json"], "--train-file /no/such.json does "
                                                                                  "not exist"),
    (["--task", "boolq", "--data-dir", "DATA", "--model", "tiny"], "preset 'tiny' is a roberta encoder"),
    (["--task", "boolq", "--data-dir", "DATA", "--model", "tiny-bloom", "--remat", "dots"],
     "--remat dots needs a Llama, Mistral or Gemma model"),
    (["--task", "rte", "--grad-accum", "2"], "--grad-accum applies to the LLM tasks"),
])  # fmt: skip
def test_bad_llm_input_gives_one_line_and_exit_2(dataset, tmp_path, capsys, args, message):
    args = [a.replace("DATA", str(dataset)) for a in args]
    assert run.main(["--output-dir", str(tmp_path / "o"), "--max-steps", "1", *args]) == 2
    assert_one_line_error(capsys, message.replace("DATA", str(dataset)))


# ---------------------------------------------------------------- configs, remat, tokenizer


TABLE_10 = {  # task group: lr, epochs, batch, grad accum, warmup
    ("boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc-e"): (2e-3, 2, 3, 3, 100),
    ("arc-c",): (2e-3, 4, 3, 3, 100),
    ("obqa",): (2e-3, 1, 3, 3, 100),
    ("multiarith", "gsm8k", "addsub", "singleeq", "svamp", "aqua"): (1e-3, 2, 8, 2, 500),
}


@pytest.mark.parametrize("tasks, row", TABLE_10.items())
def test_task_configs_are_table_10(tasks, row):
    import argparse

    from train import config as config_lib

    for task in tasks:
        parser = argparse.ArgumentParser()
        config_lib.add_arguments(parser)
        config = config_lib.resolve(parser.parse_args(["--task", task]))
        assert (config.lr, config.epochs, config.batch_size, config.grad_accum, config.warmup_steps) == row, task
        assert (
            config.rank,
            config.mode,
            config.strategy,
            config.lr_schedule,
            config.dropout,
            config.weight_decay,
            config.train_bias,
            config.cutoff,
            config.train_on_inputs,
        ) == (3, "row", "random", "cosine", 0.1, 0.0, True, 256, True)
        assert config.max_new_tokens == get_task(task).max_new_tokens and config.num_beams == 4


@pytest.mark.parametrize("name, model_type, params, policy", [
    ("auto", "llama", 6.7e9, "dots"), ("auto", "mistral", 7.2e9, "dots"), ("auto", "llama", 1.1e9, None),
    ("auto", "gptj", 6.0e9, None), ("none", "llama", 6.7e9, None), ("full", "gemma", 1e6, "full"),
])  # fmt: skip
def test_remat_auto_is_dots_for_large_llama_likes(name, model_type, params, policy):
    assert methods.resolve_remat(name, model_type, int(params)) == policy


def test_byte_tokenizer_is_lossless_and_llama_like():
    tokenizer = make_byte_tokenizer()
    text = "Below is\n\n                ### Response: héllo ✓ 1,250"
    ids = tokenizer(text)["input_ids"]
    assert ids == [BOS_ID, *text.encode("utf-8")]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id, len(tokenizer)) == (EOS_ID, 258, 259)
