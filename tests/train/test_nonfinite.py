"""Diverged runs: exit code 3 and one line, only finite checkpoints, no results.json, strict JSON files.

`--lr 1e30 --max-grad-norm 0` diverges on the demo deterministically: the warmup's first step has lr 0,
the second's update blows the slices up, so step 3's loss is NaN, and so is every later one.
"""

from __future__ import annotations

import functools
import json
import math
import subprocess
import sys
from pathlib import Path

import chex
import jax
import numpy as np
import pytest
from conftest import assert_one_line_error, cpu_env, tiny_roberta

from train import checkpoint as ckpt
from train import nonfinite, run, strict_json
from train import step as step_lib
from train.errors import NonFiniteError, UserError
from train.methods import build_method

REPO = Path(__file__).resolve().parents[2]
DIVERGES = ["--lr", "1e30", "--max-grad-norm", "0"]
SHORT = ["--max-steps", "6", "--limit-eval", "32", "--log-every", "1", "--save-every", "1"]


def train(out: Path, *args: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "train.run", *SHORT, "--output-dir", str(out), *args]
    return subprocess.run(argv, cwd=REPO, env=cpu_env(), capture_output=True, text=True)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one ``error:`` line a failed run ends its stderr with (the progress bar comes before it)."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and sum(line.startswith("error: ") for line in lines) == 1, lines[-3:]
    return lines[-1]


def _refuse(token: str):
    raise ValueError(f"not JSON: {token}")


def strict_lines(path: Path) -> list[dict]:
    """Every line of a JSON-lines file, parsed with NaN and Infinity refused."""
    return [json.loads(line, parse_constant=_refuse) for line in path.read_text().splitlines()]


def assert_finite(tree) -> None:
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(tree))


def test_stop_exits_3_keeps_the_last_good_checkpoint_and_resume_skips(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text('{"stale": true}\n')  # an earlier finish's results must not survive
    proc = train(out, *DIVERGES)
    assert proc.returncode == 3
    line = error_line(proc)
    assert "diverged at step 3" in line and "loss nan" in line and "grad norm nan" in line
    assert f"Last good checkpoint: {out / 'checkpoints' / '2'}" in line and "--resume" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["1", "2"]  # nothing from step 3 on
    meta, trainable = ckpt.load(out / "checkpoints")
    assert meta["data_position"]["step"] == 2
    assert_finite(trainable)
    assert not (out / "results.json").exists()
    lines = strict_lines(out / "metrics.jsonl")
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert math.isfinite(lines[1]["loss"]) and (lines[2]["loss"], lines[2]["loss_nonfinite"]) == (None, "nan")

    # --resume continues from it. Its slices are finite but already blown up (step 2's update made step 3's
    # NaN), so with --on-nonfinite skip every later step is skipped: counted, and fewer than --max-nonfinite.
    proc = train(out, "--resume", "--on-nonfinite", "skip")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text(), parse_constant=_refuse)
    assert results["steps"] == 6 and results["skipped_steps"] == 4
    train_lines = [r for r in strict_lines(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in train_lines] == [1, 2, 3, 4, 5, 6]
    assert [r["skipped_steps"] for r in train_lines[2:]] == [1, 2, 3, 4]
    chex.assert_trees_all_equal(ckpt.load(out / "checkpoints")[1], trainable)  # no update was applied


def test_skip_stops_after_max_nonfinite_consecutive_steps(tmp_path):
    out = tmp_path / "run"
    proc = train(out, *DIVERGES, "--on-nonfinite", "skip", "--max-nonfinite", "3")
    assert proc.returncode == 3
    line = error_line(proc)
    assert "steps 3 to 5 were all non-finite and skipped (--max-nonfinite 3)" in line
    assert f"Last good checkpoint: {out / 'checkpoints' / '4'}" in line
    # Skipped steps leave the state as it was (step 2's, finite): checkpoints 3 and 4 are written.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["3", "4"]
    meta, trainable = ckpt.load(out / "checkpoints")
    assert meta["nonfinite"] == {"skipped": 2, "consecutive": 2}
    assert_finite(trainable)
    assert not (out / "results.json").exists()
    lines = strict_lines(out / "metrics.jsonl")
    assert [(r["step"], r["skipped_steps"]) for r in lines] == [(1, 0), (2, 0), (3, 1), (4, 2), (5, 3)]
    assert all(r["loss"] is None and r["loss_nonfinite"] == "nan" for r in lines[2:])


def _step_setup():
    model, params = tiny_roberta()
    method = build_method("rocoft", params, rank=2, mode="row")
    trainable, frozen = method.split(params)
    tx, _ = step_lib.make_optimizer(1e-2, 10, 0, 0.0, "constant")
    rng = np.random.default_rng(0)
    batch = {
        "input_ids": rng.integers(3, model.config.vocab_size, (4, 8)).astype(np.int32),
        "attention_mask": np.ones((4, 8), np.int32),
        "labels": np.array([0.5, 1.0, -1.0, 0.0], np.float32),
    }
    return model, method, trainable, frozen, tx, batch


@pytest.mark.parametrize("skip", [False, True])
def test_step_reports_a_nonfinite_step_and_skip_leaves_the_state(skip):
    """A NaN label makes a NaN loss: skip mode keeps trainable and optimizer state, and the step counter advances."""
    model, method, trainable, frozen, tx, batch = _step_setup()
    step = jax.jit(
        functools.partial(
            step_lib.train_step, model=model, method=method, tx=tx, loss_kind="regression", skip_nonfinite=skip
        )
    )
    good, metrics = step(step_lib.init_state(trainable, tx, 0), frozen, batch)
    assert bool(metrics["finite"]) and int(good.step) == 1
    bad_batch = {**batch, "labels": np.array([0.5, np.nan, -1.0, 0.0], np.float32)}
    after, metrics = step(good, frozen, bad_batch)
    assert not bool(metrics["finite"]) and math.isnan(float(metrics["loss"]))
    assert int(after.step) == 2  # the data position advances either way
    if skip:
        assert trees_equal((after.trainable, after.opt_state, after.rng), (good.trainable, good.opt_state, good.rng))
        again, metrics = step(after, frozen, batch)  # the next finite step trains again
        assert bool(metrics["finite"]) and not trees_equal(again.trainable, good.trainable)
    else:
        assert not bool(step_lib.all_finite(after.trainable))  # why no such state may be saved


def trees_equal(a, b) -> bool:
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b)))


def test_skip_mode_changes_no_finite_step():
    model, method, trainable, frozen, tx, batch = _step_setup()
    results = []
    for skip in (False, True):
        step = functools.partial(
            step_lib.train_step, model=model, method=method, tx=tx, loss_kind="regression", skip_nonfinite=skip
        )
        results.append(jax.jit(step)(step_lib.init_state(trainable, tx, 0), frozen, batch)[0])
    assert trees_equal(*results)


class _NoCheckpoints:
    directory = "/nowhere"

    def latest_step(self):
        return None


def _flags(guard: nonfinite.Guard, flags: list[bool], start: int = 1) -> NonFiniteError | None:
    for i, ok in enumerate(flags):
        loss = np.float32(0.5 if ok else np.inf)
        guard.record(start + i, {"loss": loss, "grad_norm": np.float32(1.0), "finite": np.bool_(ok)})
    return guard.poll()


def test_guard_counts_skips_and_stops_on_the_consecutive_limit():
    guard = nonfinite.Guard("skip", 2, _NoCheckpoints())
    assert _flags(guard, [True, False, True, False]) is None
    assert guard.counts() == {"skipped": 2, "consecutive": 1} and guard.line() == {"skipped_steps": 2}
    error = _flags(guard, [False, True], start=5)
    assert isinstance(error, NonFiniteError) and not isinstance(error, UserError)
    assert "steps 4 to 5" in str(error) and "loss inf" in str(error) and "Last good checkpoint: none" in str(error)
    stop = nonfinite.Guard("stop", 10, _NoCheckpoints())
    assert stop.line() == {} and "at step 3" in str(_flags(stop, [True, True, False, False]))


def test_strict_json_writes_null_and_a_flag():
    record = {"step": 3, "loss": math.nan, "metrics": {"pearson": -math.inf, "acc": 0.5}, "curve": [1.0, math.inf]}
    text = strict_json.dumps(record)
    assert json.loads(text, parse_constant=_refuse) == {
        "step": 3,
        "loss": None,
        "loss_nonfinite": "nan",
        "metrics": {"pearson": None, "pearson_nonfinite": "-inf", "acc": 0.5},
        "curve": [1.0, None],
    }


@pytest.mark.parametrize(
    "args, message",
    [
        (["--on-nonfinite", "retry"], "--on-nonfinite retry: unknown on nonfinite 'retry'; choose stop or skip"),
        (["--max-nonfinite", "0"], "--max-nonfinite 0: must be at least 1"),
    ],
)
def test_bad_nonfinite_options_give_one_line_and_exit_2(tmp_path, capsys, args, message):
    assert run.main(["--output-dir", str(tmp_path / "o"), *args]) == 2
    assert_one_line_error(capsys, message)
