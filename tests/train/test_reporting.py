"""`train.reporting`: the TensorBoard writer loads without PyTorch (or, lacking tensorboardX, ahead of the run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cpu_env

REPO = Path(__file__).resolve().parents[2]


def last_line(script: str, out: Path):
    """The JSON last line that ``script`` prints, run in a fresh interpreter with ``out`` as its argument."""
    proc = subprocess.run(
        [sys.executable, "-c", script, str(out)], cwd=REPO, env=cpu_env(), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.splitlines()[-1])


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
    assert last_line(WARM_UP_THEN_TORCH, tmp_path) == {"tensorboardX": True, "torch": False, "torch_works": True}
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 80  # the header and the scalar


WARM_UP_WITHOUT_TENSORBOARDX = """
import importlib.abc, json, sys
from pathlib import Path

class NoTensorboardX(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "tensorboardX":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NoTensorboardX())
from train import reporting
reporting.warm_up().join()
warmed = "torch.utils.tensorboard" in sys.modules
log = reporting.MetricsLog(Path(sys.argv[1]))
writer = type(log.tb).__module__ if log.tb else None
log.write({"step": 1, "loss": 0.5})
log.close()
print(json.dumps({"warmed": warmed, "writer": writer}))
"""


def test_without_tensorboardx_the_warm_up_imports_pytorchs_writer_instead(tmp_path):
    """PyTorch's writer imports torch (2-3 s with CUDA's libraries): where it is the one there is, the warm-up
    thread imports it, so the first step does not wait for it; the events still reach disk."""
    pytest.importorskip("torch.utils.tensorboard")
    assert last_line(WARM_UP_WITHOUT_TENSORBOARDX, tmp_path) == {
        "warmed": True,
        "writer": "torch.utils.tensorboard.writer",
    }
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
