"""`train.reporting`: the TensorBoard writer loads without PyTorch, and PyTorch stays importable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cpu_env

REPO = Path(__file__).resolve().parents[2]

WARM_UP_THEN_TORCH = """
import json, sys
from pathlib import Path
from train import reporting
reporting.warm_up().join()
loaded = {name: name in sys.modules for name in ("tensorboardX", "torch")}
log = reporting.MetricsLog(Path(sys.argv[1]))
log.write({"step": 1, "loss": 0.5})
log.close()
import torch  # the refusal was the warm-up import's alone
print(json.dumps({**loaded, "torch_works": torch.ones(2).sum().item() == 2.0}))
"""


def test_tensorboard_writer_loads_without_pytorch_which_stays_importable(tmp_path):
    """tensorboardX imports PyTorch, when installed, only to accept torch tensors: 2 s of a run on 2 CPU cores,
    GIL-bound beside the main thread's imports. The warm-up loads tensorboardX without it; the events still
    reach disk, and the main thread imports PyTorch as usual afterwards."""
    pytest.importorskip("tensorboardX")
    pytest.importorskip("torch")
    proc = subprocess.run(
        [sys.executable, "-c", WARM_UP_THEN_TORCH, str(tmp_path)],
        cwd=REPO,
        env=cpu_env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == {"tensorboardX": True, "torch": False, "torch_works": True}
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 80  # the header and the scalar
