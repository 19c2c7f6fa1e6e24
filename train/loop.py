"""The training loop: the steps, and the periodic actions that run after each one.

A `Run` holds what `train.trainer.setup` built and what the loop advances (the train state). After every
step the actions run in this order: `Progress` (metrics.jsonl train lines and the progress bar),
`Evaluate`, `StopOnSigterm` (save a checkpoint and exit at the step boundary) and `SaveCheckpoint`. Each
acts when its interval divides the step, except after the last step, which `train.trainer.finish` handles.
Adding a periodic action is one small class and one entry in `loop`. The run's `train.nonfinite.Guard` reads
the steps' finite flags before every train line, evaluation and save, and ends the run on a non-finite step.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from tqdm.auto import tqdm

from train import checkpoint as ckpt
from train import distributed, nonfinite, reporting
from train import methods as methods_lib
from train import step as step_lib
from train import timing as timing_lib
from train.config import TrainConfig
from train.tasks.base import EvalContext, Job


@dataclasses.dataclass
class Run:
    """One run in progress: what `train.trainer.setup` built, and what the loop and `finish` read and advance."""

    config: TrainConfig
    job: Job
    out: Path
    method: methods_lib.Method
    per_epoch: int
    total_steps: int
    schedule: Callable[[int], Any]
    state: step_lib.TrainState
    frozen: Any
    train_fn: Any
    context: EvalContext
    checkpoints: Any  # orbax CheckpointManager
    meta: dict[str, Any]
    log: reporting.MetricsLog
    guard: nonfinite.Guard
    timing: timing_lib.Timing = dataclasses.field(default_factory=timing_lib.Timing)

    def evaluate(self) -> dict[str, float]:
        self.guard.check()  # waits for the queued steps: their time is not the evaluation's
        with self.timing.phase("evaluation"):
            return self.job.evaluate(self.context, self.state.trainable, self.frozen)

    def save(self, step: int) -> None:
        self.guard.check_state(self.state, step)  # raises before a non-finite state reaches the disk
        data_position = {"step": step, "epoch": step / self.per_epoch}
        meta = {**self.meta, "data_position": data_position, "nonfinite": self.guard.counts()}
        with self.timing.phase("checkpointing"):
            ckpt.save(self.checkpoints, step, self.state, meta)


def due(interval: int, done: int, total: int) -> bool:
    """After every ``interval``-th step (0: never), except the last: `finish` handles that one."""
    return bool(interval) and done % interval == 0 and done != total


class Action:
    """A periodic action of the loop, called after each step; `close` runs when the loop ends, however."""

    def __call__(self, done: int, metrics: dict[str, jax.Array]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class Progress(Action):
    """Train lines in metrics.jsonl every --log-every steps and after the last; loss, lr and examples/s (compiles
    left out) on the bar.

    Losses and finite flags stay on the device until a line is due, so the host never waits on a step it
    could queue behind. The flags are read first: the line counts skipped steps, and after it is written a
    non-finite step ends the run (`train.nonfinite`).
    """

    def __init__(self, run: Run, bar, start: int):
        self.run, self.bar = run, bar
        self.pending: list[tuple[int, Any]] = []
        self.t_last, self.n_last = time.perf_counter(), start
        self.compiled_last = run.timing.seconds["compile"]  # compile time is not the steps': the rate skips it

    def __call__(self, done, metrics):
        run, every = self.run, self.run.config.log_every
        self.pending.append((done, metrics["loss"]))
        run.guard.record(done, metrics)
        if done % every == 0 or done == run.total_steps:
            now = time.perf_counter()
            failure = run.guard.poll()
            losses = [(s, float(loss)) for s, loss in self.pending]
            self.pending.clear()
            with run.timing.phase("reporting"):
                for s, loss in losses:
                    if s % every == 0 or s == run.total_steps:
                        line = {"step": s, "loss": loss, "lr": float(run.schedule(s - 1)), **run.guard.line()}
                        run.log.write(line)
            if failure is not None:
                raise failure
            compiled = run.timing.seconds["compile"]
            seconds = now - self.t_last - (compiled - self.compiled_last)
            rate = (done - self.n_last) * run.job.examples_per_step / max(seconds, 1e-9)
            self.bar.set_postfix(
                loss=f"{losses[-1][1]:.4f}", lr=f"{float(run.schedule(done - 1)):.2e}", ex_s=f"{rate:.0f}"
            )
            self.t_last, self.n_last, self.compiled_last = now, done, compiled
        self.bar.update(1)


class Evaluate(Action):
    """Evaluation every --eval-every steps; with 0, every epoch for jobs that ask for it."""

    def __init__(self, run: Run, bar):
        self.run, self.bar = run, bar
        self.every = run.config.eval_every or (run.per_epoch if run.job.eval_each_epoch else 0)

    def __call__(self, done, metrics):
        if due(self.every, done, self.run.total_steps):
            results = self.run.evaluate()
            with self.run.timing.phase("reporting"):
                self.run.log.write({"step": done, **results})
                if distributed.is_main():
                    self.bar.write(reporting.eval_table(done, results))


class StopOnSigterm(Action):
    """On SIGTERM, saves a checkpoint at a step boundary and exits; the handler is restored on close.

    With one process it stops at the next step boundary. Several processes must save the same step together
    (the save is collective), and a signal may reach only one of them, or reach them at different steps: so
    every --log-every steps they exchange their flags (one tiny collective, where `Progress` already waits for
    the step), and if any is set all save that step and exit together. After the last step `finish` saves
    and the run ends as usual.
    """

    def __init__(self, run: Run, bar):
        self.run, self.bar, self.stop = run, bar, False
        self.every = run.config.log_every if jax.process_count() > 1 else 1
        self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.stop = True

    def __call__(self, done, metrics):
        if due(self.every, done, self.run.total_steps) and distributed.any_process(self.stop):
            self.run.save(done)
            self.bar.close()
            distributed.barrier(f"stopped_{done}")  # leave together: none exits while another still saves
            raise SystemExit(
                f"SIGTERM: saved a checkpoint at step {done} in {self.run.out / 'checkpoints'}; "
                "rerun with --resume to continue"
            )

    def close(self):
        signal.signal(signal.SIGTERM, self.previous)


class SaveCheckpoint(Action):
    """A checkpoint every --save-every steps (the last step's is saved by `finish`)."""

    def __init__(self, run: Run):
        self.run = run

    def __call__(self, done, metrics):
        if due(self.run.config.save_every, done, self.run.total_steps):
            self.run.save(done)


def compile_status(bar) -> Callable[[str | None], None]:
    """Shows ``compiling <label>`` on the bar while a program compiles (a label), then its postfix again (None)."""
    saved: list[str] = []

    def show(label: str | None) -> None:
        if label is not None:
            saved.append(getattr(bar, "postfix", None) or "")  # a disabled bar has none
            bar.set_postfix_str(f"compiling {label}")
        else:
            bar.set_postfix_str(saved.pop() if saved else "")

    return show


def loop(run: Run) -> None:
    """The steps from the restored one to the last, each followed by the periodic actions in order.

    The loop's time is ``train_steps`` in `Run.timing`, less the phases nested in it (compiles, evaluations,
    checkpoints, reports). While a step program compiles, the bar says ``compiling <program>``.
    """
    start = int(run.state.step)
    bar = tqdm(
        total=run.total_steps,
        initial=start,
        desc=f"{run.job.name}/{run.config.method}",
        dynamic_ncols=True,
        disable=not distributed.is_main(),
    )
    actions = (Progress(run, bar, start), Evaluate(run, bar), StopOnSigterm(run, bar), SaveCheckpoint(run))
    run.timing.on_compile = compile_status(bar)
    try:
        with run.timing.phase("train_steps"):
            for step in range(start, run.total_steps):
                run.state, metrics = run.train_fn(run.state, run.frozen, run.job.train_batch(step))
                for action in actions:
                    action(step + 1, metrics)
            jax.block_until_ready(run.state)  # the last steps' time is theirs, not the final evaluation's
    finally:
        run.timing.on_compile = None
        for action in actions:
            action.close()
        bar.close()
