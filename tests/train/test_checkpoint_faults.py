"""A damaged checkpoint directory: --resume falls back to the last complete step with one warning, or exits 2.

Each case damages a copy of one real run's newest checkpoint the way a crash or a bad disk would, then resumes.
A fallback must still finish bit-identical to the run that was never damaged.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import chex
import pytest
from conftest import assert_one_line_error, run_results

from train import checkpoint as ckpt
from train import export, run

# 40 steps of the demo with checkpoints at 20 and 40: the newest is damaged, the older one is complete.
ARGS = [
    *("--max-steps", "40", "--save-every", "20", "--log-every", "10"),
    *("--eval-every", "1000", "--limit-eval", "32", "--limit-train", "256"),
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults") / "run"
    assert run.main([*ARGS, "--output-dir", str(out)]) == 0
    return out


def unfinished_save(step: Path) -> None:
    """As after kill -9 during a save: orbax's temporary directory, never renamed, without its commit files."""
    (step / "_CHECKPOINT_METADATA").unlink()
    (step / "commit_success.txt").unlink()
    step.rename(step.with_name(f"{step.name}.orbax-checkpoint-tmp-1796497564"))


def missing_metadata(step: Path) -> None:
    """A step directory whose array metadata and finalization record are missing."""
    (step / "state" / "_METADATA").unlink()
    (step / "_CHECKPOINT_METADATA").unlink()


def truncated_arrays(step: Path) -> None:
    for f in (step / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":  # OCDBT data files: the arrays' bytes
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def edit_meta(step: Path, edit) -> None:
    path = step / "meta" / "metadata"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def damaged_copy(tmp_path: Path, reference: Path, damage, steps=(40,)) -> Path:
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    for step in steps:
        damage(out / "checkpoints" / str(step))
    return out


@pytest.mark.parametrize(
    "damage, warning",
    [
        (unfinished_save, "a save that never finished"),
        pytest.param(missing_metadata, "is corrupt or incomplete", marks=pytest.mark.slow),  # as truncated-arrays
        (truncated_arrays, "is corrupt or incomplete"),
        pytest.param(  # -m slow: CI time on 2 cores
            lambda step: edit_meta(step, lambda m: m.pop("fingerprint")),
            "metadata without a valid fingerprint",
            marks=pytest.mark.slow,
        ),
    ],
    ids=["unfinished-save", "missing-metadata", "truncated-arrays", "metadata-without-field"],
)
def test_damaged_newest_step_falls_back_with_one_warning(tmp_path, reference, capsys, damage, warning):
    out = damaged_copy(tmp_path, reference, damage)
    assert run.main([*ARGS, "--output-dir", str(out), "--resume"]) == 0
    captured = capsys.readouterr()
    assert "resumed from step 20" in captured.out
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warning in warnings[0] and str(out / "checkpoints" / "40") in warnings[0]
    assert "Traceback" not in captured.err
    # The damaged files are kept aside (an unfinished save is removed); training redid steps 21-40 exactly.
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == (["20", "40"] if damage is unfinished_save else ["20", "40", "40.damaged"])
    meta, trainable = ckpt.load(out / "checkpoints")
    assert meta["data_position"]["step"] == 40
    chex.assert_trees_all_equal(trainable, ckpt.load(reference / "checkpoints")[1])
    assert run_results(out) == run_results(reference)


def test_metadata_of_another_run_is_an_error(tmp_path, reference, capsys):
    out = damaged_copy(tmp_path, reference, lambda step: edit_meta(step, lambda m: m["selection"].update(rank=2)))
    assert run.main([*ARGS, "--output-dir", str(out), "--resume"]) == 2
    assert_one_line_error(capsys, f"checkpoint {out / 'checkpoints' / '40'} has rank=2 but this run asks for 3")
    assert sorted(os.listdir(out / "checkpoints")) == ["20", "40"]  # nothing moved: the user decides


def test_no_complete_step_is_an_error_not_a_fresh_start(tmp_path, reference, capsys):
    out = damaged_copy(tmp_path, reference, truncated_arrays, steps=(20, 40))
    assert run.main([*ARGS, "--output-dir", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(("error:", "warning:"))]
    assert len(lines) == 2 and lines[0].startswith("warning:") and "falling back to step 20" in lines[0]
    assert "no earlier step" in lines[1] and "Traceback" not in err
    assert (out / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()  # nothing ran


def test_export_of_a_damaged_checkpoint_is_one_line(tmp_path, reference, capsys):
    out = damaged_copy(tmp_path, reference, truncated_arrays)
    assert export.main(["--checkpoint", str(out), "--out", str(tmp_path / "exported")]) == 2
    assert_one_line_error(capsys, f"checkpoint {out / 'checkpoints' / '40'} is corrupt or incomplete")
    assert not (tmp_path / "exported").exists()
