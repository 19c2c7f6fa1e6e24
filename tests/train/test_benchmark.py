"""The FLOPs benchmark compiles the real train steps; RoCoFT must skip the weight gradient."""

import json
import subprocess
import sys
from pathlib import Path

from train import models

REPO = Path(__file__).resolve().parents[2]


def test_rocoft_step_flops_are_about_two_thirds_of_full_fine_tuning(tmp_path):
    # roberta-base's layers, two of them: the ratio is a per-layer one (0.64 here), and compiles quicker.
    models.preset_config("roberta-base", num_hidden_layers=2).save_pretrained(tmp_path)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.step",
            "--model",
            str(tmp_path),
            "--batch-size",
            "8",
            "--seq-len",
            "128",
            "--flops",
            "--json",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"rocoft_step_flops", "full_step_flops", "ratio"} <= set(out)
    assert out["ratio"] == out["rocoft_step_flops"] / out["full_step_flops"]
    # Forward + input gradient is 2/3 of forward + input + weight gradients; attention adds a little.
    assert 0.6 < out["ratio"] <= 0.72
