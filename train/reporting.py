"""What a run shows and leaves behind: metrics.jsonl, the eval table, curves.png, TensorBoard.

The file names and keys are a public contract: train lines carry ``step`` and
``loss``; eval lines carry ``step`` and the task's metric names. Every line is
strict JSON: a non-finite value is ``null`` with ``<key>_nonfinite`` beside it
(`train.strict_json`).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import json
import math
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

from train import strict_json

METRICS_FILE = "metrics.jsonl"


WARM_UP_THREAD = "reporting-warm-up"


def _silent_in_warm_up(show):
    """``warnings.showwarning`` that drops what the warm-up thread's imports warn of and shows the rest."""

    def showwarning(*args, **kwargs):
        if threading.current_thread().name != WARM_UP_THREAD:
            show(*args, **kwargs)

    showwarning.silences_warm_up = True
    return showwarning


def warm_up() -> threading.Thread:
    """Imports matplotlib's pyplot (which builds its font cache on a fresh machine: seconds to tens of
    seconds) and the TensorBoard writer (`summary_writer_class`) on a daemon thread, so those costs overlap
    loading and compiling instead of the first step or the run's end.

    The thread prints nothing: its exceptions are dropped, and so are its imports' warnings (tensorboardX's
    requests warns on stderr when PySocks is missing), so a run refused meanwhile still prints one line.
    Warnings filters are process-wide, so the thread's are dropped where they are shown instead.
    """
    if not getattr(warnings.showwarning, "silences_warm_up", False):
        warnings.showwarning = _silent_in_warm_up(warnings.showwarning)

    def load():
        # Only a head start: the main thread's own imports report any real problem, and an import cut short
        # by the interpreter's exit (a run refused early) must print nothing.
        with contextlib.suppress(Exception):
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot  # noqa: F401

            summary_writer_class()

    thread = threading.Thread(target=load, name=WARM_UP_THREAD, daemon=True)
    thread.start()
    return thread


class MetricsLog:
    """Appends JSON lines; on resume it first drops lines past the resumed step. `close` flushes TensorBoard."""

    def __init__(self, output_dir: Path, resume_step: int | None = None, enabled: bool = True):
        self.path = Path(output_dir) / METRICS_FILE
        self.enabled = enabled
        self.tb = _tensorboard_writer(Path(output_dir) / "tb") if enabled else None
        if not enabled:
            return
        kept = []
        if resume_step is not None and self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= resume_step
            ]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(strict_json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        """Flushes and closes the TensorBoard writer (its own thread writes events meanwhile)."""
        if self.tb is not None:
            self.tb.close()
            self.tb = None

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


class _TorchRefused(importlib.abc.MetaPathFinder):
    """Refuses ``torch`` to the imports of a thread inside `import_tensorboardx`; other threads import it."""

    refusing = threading.local()

    def find_spec(self, name, path=None, target=None):
        if getattr(self.refusing, "on", False) and name.partition(".")[0] == "torch":
            raise ModuleNotFoundError(f"No module named {name!r} (train.reporting imports tensorboardX alone)")
        return None


_TORCH_REFUSED = _TorchRefused()


def import_tensorboardx():
    """``tensorboardX``, imported without PyTorch where PyTorch is not loaded yet.

    tensorboardX imports torch, when installed, only to accept torch tensors, which runs never pass: 2 s of
    imports on 2 CPU cores (more with CUDA's libraries), and on the warm-up thread they hold the GIL against the
    main thread's imports. The refusal is this thread's alone and lasts for this import, so a torch import
    elsewhere (HF's conversion of a ``pytorch_model.bin``) proceeds; a torch already loaded is used as it is.
    """
    if _TORCH_REFUSED not in sys.meta_path:
        sys.meta_path.insert(0, _TORCH_REFUSED)
    _TORCH_REFUSED.refusing.on = True
    try:
        return importlib.import_module("tensorboardX")
    finally:
        _TORCH_REFUSED.refusing.on = False


def summary_writer_class():
    """tensorboardX's ``SummaryWriter`` (a dependency; imported without PyTorch), else PyTorch's, else None.

    PyTorch's writer imports torch, seconds with CUDA's libraries, so the warm-up thread imports whichever
    this returns, not only tensorboardX: the first step must not wait for it.
    """
    for load in (import_tensorboardx, lambda: importlib.import_module("torch.utils.tensorboard")):
        try:
            return load().SummaryWriter
        except ImportError:
            continue
    return None


def _tensorboard_writer(logdir: Path):
    """A SummaryWriter if tensorboardX or PyTorch's tensorboard is installed, else None."""
    writer_cls = summary_writer_class()
    return None if writer_cls is None else writer_cls(str(logdir), flush_secs=10)  # its thread writes


def eval_table(step: int, metrics: dict[str, float]) -> str:
    """A small two-column table of one evaluation."""
    width = max(len(k) for k in metrics) if metrics else 6
    lines = [f"eval @ step {step}", f"  {'metric':<{width}}  value", f"  {'-' * width}  ------"]
    lines += [f"  {name:<{width}}  {value:.4f}" for name, value in metrics.items()]
    return "\n".join(lines)


def plot_curves(records: list[dict[str, Any]], metric_names: tuple[str, ...], path: Path) -> None:
    """Loss and eval metrics against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r]
    evals = [r for r in records if any(m in r for m in metric_names)]
    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_loss.plot([r["step"] for r in train], [_number(r["loss"]) for r in train], color="tab:blue")
    ax_loss.set(xlabel="step", ylabel="train loss", title="training loss")
    for name in metric_names:
        points = [(r["step"], _number(r[name])) for r in evals if name in r]
        if points:
            ax_eval.plot(*zip(*points), marker="o", label=name)
    ax_eval.set(xlabel="step", ylabel="metric", title="dev metrics")
    if evals:
        ax_eval.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _number(value) -> float:
    """A logged value for a plot: a non-finite one is ``null`` in metrics.jsonl and a gap in the curve."""
    return math.nan if value is None else value
