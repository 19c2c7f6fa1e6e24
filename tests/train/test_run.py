"""train.run end to end on the offline demo: files users read, errors users hit, resume, export."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import numpy as np
import pytest
import yaml
from conftest import assert_one_line_error, cpu_env, run_results

from train import checkpoint as ckpt
from train import run

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"
# A short demo run: 60 steps of the tiny model; enough to exercise everything.
SHORT = ["--max-steps", "60", "--eval-every", "30", "--log-every", "10", "--limit-eval", "128"]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "train.run", *args]


def run_ok(tmp_path: Path, *args: str) -> Path:
    out = tmp_path / "run"
    assert run.main([*SHORT, "--output-dir", str(out), *args]) == 0
    return out


def test_offline_default_reaches_well_above_chance(tmp_path):
    """`python -m train.run` with no arguments: the demo config, all the files, a real result."""
    out = tmp_path / "default"
    assert run.main(["--output-dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert {"task", "model", "method", "mode", "rank", "num_trainable", "steps", "metrics"} <= set(results)
    assert results["task"] == "demo" and results["method"] == "rocoft" and results["rank"] == 3
    assert results["metrics"]["accuracy"] > 0.85
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_lines = [r for r in lines if "loss" in r]
    eval_lines = [r for r in lines if "accuracy" in r]
    assert train_lines and all({"step", "loss"} <= set(r) for r in train_lines)
    assert len(eval_lines) == 8  # one per epoch
    assert eval_lines[-1]["step"] == results["steps"]
    assert yaml.safe_load((out / "config.yaml").read_text())["epochs"] == 8
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_flags_override_the_task_config_and_a_finished_run_needs_resume(tmp_path, capsys):
    out = run_ok(tmp_path, "--rank", "2", "--mode", "column", "--lr", "1e-3")
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert (config["rank"], config["mode"], config["lr"], config["max_length"]) == (2, "column", 1e-3, 32)
    # The same output dir again, without --resume: refused before anything in it is touched.
    results = (out / "results.json").read_bytes()
    capsys.readouterr()
    assert run.main([*SHORT, "--output-dir", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (out / "results.json").read_bytes() == results
    pytest.importorskip("tensorboardX")
    events = list((out / "tb").glob("events.out.tfevents.*"))  # TensorBoard logs beside metrics.jsonl
    assert events and events[0].stat().st_size > 200  # the scalars were flushed, not just the file header


@pytest.mark.parametrize(
    "method", [pytest.param("full", marks=pytest.mark.slow), "lora", pytest.param("bitfit", marks=pytest.mark.slow)]
)  # full, bitfit: -m slow
def test_baselines_run_in_the_same_harness(tmp_path, method):
    out = run_ok(tmp_path, "--method", method)
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == method and results["steps"] == 60
    assert 0.0 <= results["metrics"]["accuracy"] <= 1.0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task", "mnli2"], "unknown task 'mnli2'"),
        (["--model", "./no/such/model"], "no such directory"),
        (["--task", "rte", "--model", "tiny", "--data-dir", "/nonexistent"], "train.tsv"),
        (["--rank", "500"], "choose rank <= 64"),
        (["--rank", "0"], "rank must be a positive integer"),
        (["--mode", "diagonal"], "unknown mode 'diagonal'"),
        (["--strategy", "best"], "unknown strategy 'best'"),
        (["--output-dir", "/etc/hostname/sub"], "is not writable"),
        (["--config", "/nonexistent.yaml"], "no such file"),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(tmp_path, capsys, args, message):
    argv = ["--output-dir", str(tmp_path / "o"), *args]
    assert run.main(argv) == 2
    assert_one_line_error(capsys, message)


def test_batch_not_divisible_by_devices(tmp_path):
    env = cpu_env(3)
    proc = subprocess.run(
        cli("--batch-size", "32", "--max-steps", "2", "--output-dir", str(tmp_path / "o")),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "not divisible by the 3 devices" in proc.stderr


def final_trainable(out: Path):
    meta, trainable = ckpt.load(out / "checkpoints")
    return meta, trainable


def wait_for(predicate, proc, timeout=240):
    start = time.time()
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - start < timeout, "timed out waiting for the run"
        time.sleep(0.2)


def run_on_cpu(*args: str) -> None:
    """``train.run`` in a subprocess on the CPU, as the interrupted runs below: bit-identical results need one
    platform (GPUs sum in orders of their own, and their autotuner picks kernels per process)."""
    proc = subprocess.run(cli(*args), cwd=REPO, env=cpu_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted 60-step run with periodic saves."""
    out = tmp_path_factory.mktemp("ref") / "run"
    run_on_cpu(*SHORT, "--save-every", "20", "--output-dir", str(out))
    return out


@pytest.mark.parametrize("how", ["sigterm", pytest.param("kill9", marks=pytest.mark.slow)])  # kill9: -m slow
def test_interrupted_run_resumes_bit_identically(tmp_path, reference_run, how):
    out = tmp_path / "run"
    args = [*SHORT, "--save-every", "20", "--output-dir", str(out)]
    proc = subprocess.Popen(
        cli(*args), cwd=REPO, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    done = out / "checkpoints" / "20" / "commit_success.txt"
    if how == "sigterm":
        wait_for(lambda: (out / "metrics.jsonl").exists() and '"step": 20' in (out / "metrics.jsonl").read_text(), proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode != 0 and "rerun with --resume" in err
    else:
        wait_for(done.exists, proc)
        proc.kill()
        proc.wait()
    saved = ckpt.manager(out / "checkpoints").latest_step()
    assert 20 <= saved < 60
    run_on_cpu(*args, "--resume")
    meta, resumed = final_trainable(out)
    _, expected = final_trainable(reference_run)
    assert meta["data_position"]["step"] == 60
    chex.assert_trees_all_equal(resumed, expected)
    assert run_results(out) == run_results(reference_run)


def test_checkpoint_holds_only_trained_values(reference_run):
    mgr = ckpt.manager(reference_run / "checkpoints")
    meta, trainable = final_trainable(reference_run)
    saved_paths = {
        "/".join(str(getattr(k, "key", k)) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(trainable)
    }
    assert all(p.startswith(("rocoft/", "train/")) for p in saved_paths)
    assert not any("embeddings" in p or "LayerNorm" in p for p in saved_paths)
    # The rocoft slices are (64, 3) / (128, 3) row blocks, never whole kernels.
    query = trainable["rocoft"]["roberta"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"]
    assert query.shape == (64, 3)
    assert meta["selection"]["indices"]["roberta/encoder/layer/0/attention/self/query/kernel"] == [0, 1, 2]
    # On disk: orbax's tree metadata names the slices, and no file mentions a frozen leaf.
    state_dir = reference_run / "checkpoints" / "60" / "state"
    assert "rocoft" in (state_dir / "_METADATA").read_text()
    blobs = b"".join(f.read_bytes() for f in state_dir.rglob("*") if f.is_file())
    for frozen_name in (b"word_embeddings", b"position_embeddings", b"LayerNorm"):
        assert frozen_name not in blobs
    assert mgr.latest_step() == 60 and set(mgr.all_steps()) == {40, 60}  # max_to_keep=2


def test_resume_refuses_other_rank_or_base_model(tmp_path, reference_run, capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(reference_run, out)
    assert run.main([*SHORT, "--output-dir", str(out), "--resume", "--rank", "2"]) == 2
    assert "rank=3" in capsys.readouterr().err
    assert run.main([*SHORT, "--output-dir", str(out), "--resume", "--seed", "1"]) == 2
    assert "other base weights" in capsys.readouterr().err  # seed 1 initialises another tiny model


def test_resume_refuses_corrupt_checkpoint(tmp_path, reference_run, capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(reference_run, out)
    shutil.rmtree(out / "checkpoints" / "40")  # nothing to fall back to (test_checkpoint_faults.py falls back)
    state_dir = out / "checkpoints" / "60" / "state"
    for f in state_dir.rglob("*"):
        if f.is_file() and f.stat().st_size > 1000:
            f.write_bytes(b"\0" * 16)
    assert run.main([*SHORT, "--output-dir", str(out), "--resume", "--max-steps", "80"]) == 2
    err = capsys.readouterr().err
    assert "corrupt or incomplete" in err and "delete that step directory" in err


def test_export_loads_in_flax_and_pytorch_with_the_trained_logits(tmp_path, reference_run):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForSequenceClassification, FlaxAutoModelForSequenceClassification

    from train import export

    out = tmp_path / "exported"
    proc = subprocess.run(
        [sys.executable, "-m", "train.export", "--checkpoint", str(reference_run), "--out", str(out)],
        cwd=REPO,
        env=cpu_env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-2000:]  # transformers' Flax notice is dropped
    model, method, trainable, frozen, tokenizer, _ = export.load_trained(reference_run)
    enc = tokenizer(
        ["good happy river", "bad cold dark sad tree"], padding="max_length", max_length=16, return_tensors="np"
    )
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    expected = np.asarray(method.apply(model, trainable, frozen, batch))

    flax_model = FlaxAutoModelForSequenceClassification.from_pretrained(out)
    np.testing.assert_allclose(np.asarray(flax_model(**batch).logits), expected, atol=1e-5)
    torch_model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        got = torch_model(**{k: torch.as_tensor(v) for k, v in batch.items()}).logits.numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)


@pytest.mark.parametrize(
    "weights",
    ["flax_model.msgpack", pytest.param("pytorch_model.bin", marks=pytest.mark.slow)],  # .bin: -m slow
)
def test_trains_from_a_local_dir_of_either_weight_format(tmp_path, reference_run, weights):
    """A local --model dir may hold Flax msgpack weights, or PyTorch .bin weights (converted via from_pt); the
    .bin dir trains through the CLI, which tells transformers not to import PyTorch (`run.without_torch`)."""
    pytest.importorskip("torch")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from train import export

    exported = tmp_path / "exported"
    assert export.main(["--checkpoint", str(reference_run), "--out", str(exported)]) == 0
    model_dir = exported
    if weights == "pytorch_model.bin":
        model_dir = tmp_path / "pt"
        torch_model = AutoModelForSequenceClassification.from_pretrained(exported)
        torch_model.save_pretrained(model_dir, safe_serialization=False)
        AutoTokenizer.from_pretrained(exported).save_pretrained(model_dir)
        assert (model_dir / "pytorch_model.bin").is_file() and not (model_dir / "model.safetensors").exists()
    out = tmp_path / "run"
    args = ["--model", str(model_dir), "--max-steps", "4", "--limit-eval", "64", "--output-dir", str(out)]
    if weights == "pytorch_model.bin":
        env = {k: v for k, v in cpu_env().items() if k != "USE_TORCH"}
        proc = subprocess.run(
            [sys.executable, "-m", "train.run", *args], cwd=REPO, env=env, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
    else:
        assert run.main(args) == 0
    assert json.loads((out / "results.json").read_text())["model"] == str(model_dir)
