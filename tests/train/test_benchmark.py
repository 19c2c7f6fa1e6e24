"""The FLOPs benchmark compiles the real train steps; RoCoFT must skip the weight gradient."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from train import models

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # the jaxpr tests of tests/core check the missing weight gradient in the default suite
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


def test_peers_are_compiled_and_eager_and_ratios_name_the_fastest():
    """The default peers include torch.compile'd ones and LoRA on every target; the headline ratio is
    against whichever peer was fastest, with its name."""
    from benchmarks import step

    assert step.peer_args("lora-all+compile") == ["--peer", "lora", "--lora-targets", "all", "--compile"]
    assert {"algorithm1+compile", "lora+compile", "lora-all+compile"} <= set(step.PEERS)
    rows = [
        {"method": "jax-rocoft", "step_ms": 50.0, "tokens_per_s": 200.0, "peak_gib": 10.0},
        {"method": "torch-algorithm1", "step_ms": 74.0, "tokens_per_s": 135.0, "peak_gib": 13.0},
        {"method": "torch-lora+compile", "step_ms": 62.5, "tokens_per_s": 160.0, "peak_gib": 9.0},
        {"method": "torch-lora-all+compile", "error": "failed"},
    ]
    ratios = step._ratios(rows)
    assert ratios["fastest_peer"] == "torch-lora+compile"
    assert ratios["rocoft_over_fastest_peer_time"] == 0.8
    assert ratios["rocoft_over_fastest_peer_tokens"] == 1.25
    assert ratios["rocoft_minus_fastest_peer_peak_gib"] == 1.0
    assert ratios["rocoft_over_torch-algorithm1_time"] == 50.0 / 74.0


@pytest.mark.slow
@pytest.mark.parametrize(
    "args", [["--model", "tiny", "--profile"], ["--model", "tiny-llama", "--generate", "--new-tokens", "3"]]
)
def test_mixed_adapter_benchmark_reports_both_throughputs(args):
    """A CPU smoke run of `benchmarks.mixed_adapters` (the numbers that matter come from a GPU)."""
    from benchmarks import mixed_adapters

    common = ["--batch-size", "4", "--seq-len", "8", "--adapters", "3", "--steps", "1", "--dtype", "fp32", "--json"]
    result = mixed_adapters.main([*args, *common])
    assert result["mixed_ms"] > 0 and result["merged_ms"] > 0
    assert result["mixed_over_merged_throughput"] > 0
    assert (
        result["pipelined_mixed_over_merged_throughput"] == result["pipelined_merged_ms"] / result["pipelined_mixed_ms"]
    )
    if "--profile" in args:  # a CPU backend records no device kernels; the host dispatch is timed
        assert result["mixed_profile"]["dispatch_ms"] > 0 and result["merged_profile"]["kernels"] == 0


@pytest.mark.slow  # CI time on 2 cores; a benchmark's own test
def test_load_benchmark_writes_a_checkpoint_that_loads_whole(capsys):
    """The random checkpoint is in the hub's PyTorch layout: the load refuses a missing weight or a wrong shape,
    so a finished load of every byte of the model's bf16 params means the layout is the model's."""
    import jax
    import numpy as np

    from benchmarks import load_time

    assert load_time.main(["--shape", "tiny-llama", "--repeat", "1"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    layout = models.unbound_model(models.preset_config("tiny-llama"), "causal-lm", "bf16", remat=False)
    assert report["bytes"] == sum(int(np.prod(x.shape)) * 2 for x in jax.tree.leaves(layout.params_shape_tree))
    assert len(report["seconds"]) == 1 and report["seconds"][0] > 0 and "cpu" in report["device"].lower()


@pytest.mark.slow  # CI time on 2 cores; a benchmark's own test
def test_trace_run_summarizes_the_compiles_of_a_whole_run(tmp_path):
    """The traced run finishes as train.run does, and the summary names XLA's compile of its train step."""
    from conftest import cpu_env

    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.trace_run", "--trace-dir", str(tmp_path / "trace"), "--top", "50", "--"]
        + ["--max-steps", "1", "--output-dir", str(out), "--compile-cache", "off"],
        cwd=REPO,
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "results.json").is_file()
    summary = proc.stdout[proc.stdout.index("host events") :]
    assert "backend_compile" in summary and "jit_train_step" in summary, summary[:3000]
    assert list((tmp_path / "trace").glob("**/*.trace.json.gz"))
