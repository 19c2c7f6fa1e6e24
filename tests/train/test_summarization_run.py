"""`python -m train.run --task cnn_dailymail` end to end on real CNN/DailyMail articles, then `train.export`.

One short run of the ``tiny-bart`` preset (byte tokenizer) on ``../shared/data/cnn_dailymail`` serves every test
here: its output files, ROUGE against ``rouge_score`` called directly on predictions.jsonl, beam search through
the sliced layers against the plain HF model on the merged weights that `train.export` wrote (loaded by Flax's
``AutoModelForSeq2SeqLM``). Under ``-m slow``: greedy generation of the trained JAX model against the exported
model in Flax and in PyTorch, and the run on an 8-device data=2,fsdp=2,tensor=2 CPU mesh against the
one-device run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from train import run
from train.rouge import sentence_lines
from train.summarization_data import encode, get_task, load_split

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
CNN = SHARED_DATA / "cnn_dailymail"
EVAL, SOURCE, NEW, MIN_NEW, NO_REPEAT, BEAMS = 4, 64, 10, 2, 3, 2
RUN = [
    "--model", "tiny-bart", "--task", "cnn_dailymail", "--eval-split", "validation", "--dtype", "fp32",
    "--dropout", "0", "--max-steps", "24", "--batch-size", "4", "--lr", "2e-2", "--warmup-steps", "0",
    "--log-every", "4", "--max-source-length", str(SOURCE), "--max-target-length", "32", "--eval-limit", str(EVAL),
    "--eval-batch-size", str(EVAL), "--num-beams", str(BEAMS), "--max-new-tokens", str(NEW),
    "--min-new-tokens", str(MIN_NEW), "--no-repeat-ngram-size", str(NO_REPEAT),
]  # fmt: skip


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory) -> Path:
    if not (CNN / "train.jsonl").is_file():
        pytest.skip(f"{CNN} is absent (real data lives beside the repo)")
    out = tmp_path_factory.mktemp("cnn") / "run"
    assert run.main([*RUN, "--data-dir", str(CNN), "--output-dir", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def exported(cnn_run) -> Path:
    from train import export

    out = cnn_run.parent / "exported"
    assert export.main(["--checkpoint", str(cnn_run), "--out", str(out)]) == 0
    return out


def validation() -> list[dict]:
    return load_split(get_task("cnn_dailymail"), "validation", CNN)[:EVAL]


def predictions(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def test_run_writes_every_output_with_finite_rouge_and_a_falling_loss(cnn_run):
    results = json.loads((cnn_run / "results.json").read_text())
    metrics = results["metrics"]
    assert set(metrics) == {"rouge1", "rouge2", "rougeL", "rougeLsum", "gen_len"}
    assert all(math.isfinite(v) for v in metrics.values()) and 0 < metrics["gen_len"] <= NEW
    assert all(0 <= metrics[k] <= 1 for k in ("rouge1", "rouge2", "rougeL", "rougeLsum"))
    assert (results["task"], results["steps"], results["eval_split"], results["eval_examples"]) == (
        "cnn_dailymail",
        24,
        "validation",
        EVAL,
    )
    assert (results["num_beams"], results["max_new_tokens"], results["min_new_tokens"]) == (BEAMS, NEW, MIN_NEW)
    assert (results["length_penalty"], results["no_repeat_ngram_size"]) == (2.0, NO_REPEAT)  # the task's file
    assert results["generation"]["examples"] == EVAL
    lines = [json.loads(line) for line in (cnn_run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if "loss" in r]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.05, losses
    assert lines[-1]["step"] == 24 and lines[-1]["rouge1"] == metrics["rouge1"]
    config = yaml.safe_load((cnn_run / "config.yaml").read_text())
    assert (config["label_smoothing"], config["weight_decay"], config["train_bias"]) == (0.1, 0.01, True)
    assert (cnn_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any((cnn_run / "checkpoints").iterdir())


def test_rouge_of_the_predictions_is_rouge_score_called_directly(cnn_run):
    from rouge_score import rouge_scorer

    lines = predictions(cnn_run)
    records = validation()
    assert [set(line) for line in lines] == [{"id", "reference", "generation"}] * EVAL
    assert [(line["id"], line["reference"]) for line in lines] == [(r["id"], r["summary"]) for r in records]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    # one sentence per line for ROUGE-Lsum (the split rule has its own test in test_summarization_data.py)
    scores = [scorer.score(sentence_lines(line["reference"]), sentence_lines(line["generation"])) for line in lines]
    metrics = json.loads((cnn_run / "results.json").read_text())["metrics"]
    for name in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert metrics[name] == pytest.approx(np.mean([s[name].fmeasure for s in scores]), abs=1e-12)


def test_beam_search_through_the_sliced_layers_equals_the_plain_model_on_merged_weights(cnn_run, exported):
    """predictions.jsonl (beam search on frozen weights plus slices) against HF's own generate on the merged
    weights export wrote, with the same search options."""
    from transformers import FlaxAutoModelForSeq2SeqLM

    from train.tasks.summarization import right_pad

    model = FlaxAutoModelForSeq2SeqLM.from_pretrained(exported)
    tokenizer = load_tokenizer(exported)
    sources = encode(tokenizer, [r["document"] for r in validation()], SOURCE)
    batch = right_pad(sources, SOURCE, model.config.pad_token_id)
    options = dict(num_beams=BEAMS, max_new_tokens=NEW, min_length=MIN_NEW + 1, length_penalty=2.0, early_stopping=True)
    out = plain_generate(model, batch, **options)
    texts = [tokenizer.decode(cut(row[1:], tokenizer.eos_token_id), skip_special_tokens=True).strip() for row in out]
    assert texts == [line["generation"] for line in predictions(cnn_run)]


@pytest.mark.slow  # the LLM run test covers the trainer side; the planned shapes are tested in the data tests
def test_a_run_compiles_every_step_program_once_before_the_loop(tmp_path, first_use_compiles):
    """A run whose steps meet several target buckets: results.json counts each train-step program once, each
    compiled ahead of the loop (`StepPrograms.compile`, the compile at first use, never runs), and they are the
    planned shapes."""
    from train import timing
    from train.byte_tokenizer import make_byte_tokenizer
    from train.config import TrainConfig
    from train.tasks.summarization import SummarizationJob

    if not (CNN / "train.jsonl").is_file():
        pytest.skip(f"{CNN} is absent (real data lives beside the repo)")
    out = tmp_path / "run"
    args = [*RUN, "--max-steps", "6", "--batch-size", "2", "--max-target-length", "512", "--num-beams", "1"]
    assert run.main([*args, "--eval-limit", "1", "--data-dir", str(CNN), "--output-dir", str(out)]) == 0
    assert first_use_compiles == []
    results = json.loads((out / "results.json").read_text())
    programs = results["timing"]["compile"]["programs"]
    assert results["timing"]["compile"]["count"] == len(programs) > 1
    assert all(p["count"] == 1 for p in programs.values())
    job = SummarizationJob(TrainConfig(**yaml.safe_load((out / "config.yaml").read_text())))
    job.prepare(make_byte_tokenizer(), None)
    planned, _ = job.planned_batches(6)
    assert set(programs) == {f"train_step {timing.describe(b)}" for b in planned}


@pytest.mark.slow
def test_export_generates_the_trained_models_greedy_tokens_in_flax_and_pytorch(cnn_run, exported):
    """Greedy search of the trained JAX model (the job's `Summarizer`: frozen weights plus slices) against the
    exported model, loaded by Flax's and PyTorch's ``AutoModelForSeq2SeqLM``."""
    torch = pytest.importorskip("torch")
    import jax
    from transformers import AutoModelForSeq2SeqLM, FlaxAutoModelForSeq2SeqLM

    from rocoft_jax import sharding
    from train import export
    from train.config import TrainConfig
    from train.tasks.summarization import SummarizationJob, Summarizer, right_pad

    model, method, trainable, frozen, tokenizer, meta = export.load_trained(cnn_run)
    job = SummarizationJob(TrainConfig(**{**meta["config"], "num_beams": 1}))
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    summarizer = Summarizer(
        model,
        method,
        job.generation_config(model),
        batch_size=EVAL,
        batch_sharding=jax.sharding.NamedSharding(mesh, sharding.BATCH),
        pad_id=model.config.pad_token_id,
        no_repeat_ngram_size=NO_REPEAT,
    )
    sources = encode(tokenizer, [r["document"] for r in validation()], SOURCE)
    trained, _ = summarizer.summarize(trainable, frozen, sources, (SOURCE,), "cnn_dailymail")
    assert all(len(t) >= MIN_NEW for t in trained)

    eos = tokenizer.eos_token_id
    batch = right_pad(sources, SOURCE, model.config.pad_token_id)
    flax_model = FlaxAutoModelForSeq2SeqLM.from_pretrained(exported)
    out = plain_generate(flax_model, batch, num_beams=1, max_new_tokens=NEW, min_length=MIN_NEW + 1)
    assert [cut(row[1:], eos) for row in np.asarray(out)] == trained

    torch_model = AutoModelForSeq2SeqLM.from_pretrained(exported).eval()
    with torch.no_grad():
        out = torch_model.generate(
            input_ids=torch.from_numpy(batch["input_ids"]).long(),
            attention_mask=torch.from_numpy(batch["attention_mask"]).long(),
            num_beams=1,
            do_sample=False,
            max_new_tokens=NEW,
            min_new_tokens=MIN_NEW,
            no_repeat_ngram_size=NO_REPEAT,
        )
    assert [cut(row[1:], eos) for row in out.numpy()] == trained


@pytest.mark.slow
def test_sharded_summarization_run_equals_single_device(tmp_path):
    """The same run on 1 CPU device and on an 8-device data=2,fsdp=2,tensor=2 mesh (the frozen BART weights, its
    cross-attention and LM bias split by the family's rules): losses, slices and summaries agree."""
    import subprocess
    import sys

    import chex
    from conftest import cpu_env

    from train import checkpoint as ckpt

    if not (CNN / "train.jsonl").is_file():
        pytest.skip(f"{CNN} is absent (real data lives beside the repo)")
    # a flag given twice: the last one counts
    args = [*RUN, "--num-beams", "1", "--batch-size", "8", "--grad-accum", "2", "--max-steps", "8"]
    args += ["--eval-limit", "8", "--eval-batch-size", "8", "--data-dir", str(CNN)]

    def launch(name: str, devices: int, *extra: str) -> subprocess.Popen:
        command = [sys.executable, "-m", "train.run", *args, "--output-dir", str(tmp_path / name), *extra]
        repo = Path(__file__).resolve().parents[2]
        return subprocess.Popen(
            command, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cpu_env(devices)
        )

    runs = {"single": launch("single", 1), "sharded": launch("sharded", 8, "--mesh", "data=2,fsdp=2,tensor=2")}
    for name, proc in runs.items():
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"{name}: {err[-3000:]}"

    def losses(name):
        lines = map(json.loads, (tmp_path / name / "metrics.jsonl").read_text().splitlines())
        return [r["loss"] for r in lines if "loss" in r]

    np.testing.assert_allclose(losses("sharded"), losses("single"), atol=1e-5)
    chex.assert_trees_all_close(
        ckpt.load(tmp_path / "sharded" / "checkpoints")[1], ckpt.load(tmp_path / "single" / "checkpoints")[1], atol=1e-5
    )
    summaries = {name: [line["generation"] for line in predictions(tmp_path / name)] for name in runs}
    assert summaries["sharded"] == summaries["single"] and len(summaries["single"]) == 8


def plain_generate(model, batch, **options) -> np.ndarray:
    """HF Flax ``generate`` of ``model`` on its own params (jitted), with `NoRepeatNGram` as the job adds it."""
    from conftest import fast_jit

    from train.tasks.summarization import NoRepeatNGram

    def sequences(params, ids, mask):
        processors = [NoRepeatNGram(NO_REPEAT)]
        return model.generate(ids, attention_mask=mask, params=params, logits_processor=processors, **options).sequences

    return np.asarray(fast_jit(sequences)(model.params, batch["input_ids"], batch["attention_mask"]))


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def cut(tokens, eos: int) -> list[int]:
    tokens = [int(t) for t in tokens]
    return tokens[: tokens.index(eos)] if eos in tokens else tokens
