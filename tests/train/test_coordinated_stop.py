"""SIGTERM to one process of a two-process run: both save the same step, exit, and --resume finishes exactly.

The processes (one CPU device each, gloo collectives) exchange their stop flags every --log-every steps, so a
signal that reaches only one of them still stops both at one agreed step. Two devices sum a gradient in one
order whichever process holds them, so a two-process run resumed in one process with two devices must end
bit-identical to an uninterrupted one-process run.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import chex
import pytest
from conftest import cpu_env, run_results

from train import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[2]
# Enough steps that the signal lands mid-run; few evaluations, a small train set, one batch shape.
ARGS = [
    *("--max-steps", "150", "--log-every", "5", "--save-every", "0", "--eval-every", "1000"),
    *("--limit-train", "256", "--limit-eval", "32", "--batch-size", "16", "--bucket", "false"),
]


def train_run(*args: str) -> list[str]:
    return [sys.executable, "-m", "train.run", *ARGS, *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_pair(out: Path) -> list[subprocess.Popen]:
    address = f"127.0.0.1:{free_port()}"
    return [
        subprocess.Popen(
            train_run(
                *("--output-dir", str(out), "--coordinator-address", address, "--num-processes", "2"),
                *("--process-id", str(i), "--heartbeat-timeout", "20"),
            ),
            cwd=REPO,
            env=cpu_env(1),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]


def one_process(out: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        train_run("--output-dir", str(out), *args),
        cwd=REPO,
        env=cpu_env(2),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finished(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return out


def wait_for_first_train_line(out: Path, procs: list[subprocess.Popen], timeout: float = 300) -> None:
    start, metrics = time.time(), out / "metrics.jsonl"
    while not (metrics.exists() and '"loss"' in metrics.read_text()):
        for p in procs:
            assert p.poll() is None, p.communicate()[1][-3000:]
        assert time.time() - start < timeout, "timed out waiting for the first train line"
        time.sleep(0.05)


@pytest.mark.slow  # two processes, a minute on 2 cores
def test_sigterm_to_one_process_stops_both_at_one_step(tmp_path):
    out = tmp_path / "run"
    procs = launch_pair(out)
    wait_for_first_train_line(out, procs)
    procs[1].send_signal(signal.SIGTERM)  # the other process never gets a signal
    errs = [p.communicate(timeout=120)[1] for p in procs]
    saved = []
    for p, err in zip(procs, errs):
        assert p.returncode == 1, err[-3000:]
        found = re.findall(r"SIGTERM: saved a checkpoint at step (\d+) in .*; rerun with --resume to continue", err)
        assert len(found) == 1, err[-3000:]
        saved.append(int(found[0]))
        assert "Traceback" not in err
    step = saved[0]
    assert saved == [step, step] and step % 5 == 0 and 5 <= step < 150
    assert ckpt.manager(out / "checkpoints").all_steps() == [step]

    reference = tmp_path / "reference"
    resumed, uninterrupted = one_process(out, "--resume"), one_process(reference)  # side by side
    assert f"resumed from step {step}" in finished(resumed)
    finished(uninterrupted)
    meta, trainable = ckpt.load(out / "checkpoints")
    assert meta["data_position"]["step"] == 150 and meta["process_count"] == 1
    chex.assert_trees_all_equal(trainable, ckpt.load(reference / "checkpoints")[1])
    assert run_results(out) == run_results(reference)
