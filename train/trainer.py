"""`train_and_evaluate`: one fine-tuning run, from config to results.json, as setup, loop and finish.

Data flows one way: config -> job (`train.tasks`) -> model and method (selection) -> state and compiled
steps -> loop -> checkpoints and reports. `setup` raises every error a user can fix before the first step.
`train.loop` runs the steps; after each one its periodic actions run in order: progress (metrics.jsonl train
lines and the bar), evaluation, the SIGTERM stop (save a checkpoint, exit) and periodic checkpoints. `finish`
evaluates, saves the last checkpoint and writes results.json and curves.png; a run that ends on a non-finite
step (`train.nonfinite`) writes no results.json and removes one an earlier finish left, so results.json in an
output dir always means the run there finished. The trainer asks the job for
everything task-specific (batches, evaluation, extra results), never the task's name or the job's class.
A library ValueError about an option reaches the user as a `ConfigError`, through `config_errors`.

The batch of step s depends only on (seed, s) and dropout on fold_in(rng, s), so a resumed run replays an
uninterrupted one exactly. Only process 0 prints and writes reports; every process saves checkpoints.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, NamedTuple

import jax
from jax.sharding import NamedSharding
from tqdm.auto import tqdm

import rocoft_jax
from rocoft_jax import sharding
from train import adapters, compile_cache, compile_prefetch, distributed, nonfinite, reporting, strict_json, tasks
from train import checkpoint as ckpt
from train import input_pipeline as pipeline
from train import loop as loop_lib
from train import methods as methods_lib
from train import step as step_lib
from train import timing as timing_lib
from train.config import WANDA_STRATEGIES, TrainConfig
from train.config import save as save_config
from train.errors import ConfigError, NonFiniteError, UserError
from train.tasks.base import EvalContext, Job


@contextlib.contextmanager
def config_errors(flag: str = ""):
    """Reports a library's ValueError raised inside as a `ConfigError` (prefixed with ``flag``, if given).

    The library validates its own arguments with ValueError; here those arguments are the user's options, so
    the CLI prints them as one-line errors. A `UserError` passes through unchanged.
    """
    try:
        yield
    except UserError:
        raise
    except ValueError as err:
        raise ConfigError(f"{flag}: {err}" if flag else str(err)) from err


def prepare_output_dir(config: TrainConfig) -> Path:
    """--output-dir, created and checked writable; it holds checkpoints exactly when --resume is given."""
    out = Path(config.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write_test.{os.getpid()}"  # one per process: several may share the dir
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"--output-dir {out} is not writable ({err.strerror}); choose another directory") from err
    has_ckpt = (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir())
    if has_ckpt and not config.resume:
        raise ConfigError(
            f"{out} already holds checkpoints; pass --resume to continue that run, or choose a new --output-dir"
        )
    if config.resume and not has_ckpt:
        raise ConfigError(f"--resume: no checkpoint in {out / 'checkpoints'}; drop --resume to start fresh")
    return out


def make_mesh(config: TrainConfig):
    """The device mesh of --mesh; both batch sizes must split evenly over the devices."""
    n_devices = jax.device_count()
    for flag, size in (("--batch-size", config.batch_size), ("--eval-batch-size", config.eval_batch_size)):
        if size % n_devices:
            raise ConfigError(
                f"{flag} {size} is not divisible by the {n_devices} devices; use a multiple of {n_devices}"
            )
    with config_errors("--mesh"):
        return sharding.make_mesh(sharding.parse_mesh(config.mesh, n_devices))


def selection_rank(config: TrainConfig):
    """The mask's ``rank``: rows/columns per kernel, or in mode "random" the probability of each entry."""
    random = config.mode == "random" and config.probability is not None
    return config.probability if random else config.rank


def setup(config: TrainConfig, timing: timing_lib.Timing | None = None) -> loop_lib.Run:
    """Everything before the first step: compilation cache, job, output dir, mesh, model, method, compiled steps,
    restored state.

    Where the selection needs no weight values (no Wanda strategy, no --adapter), the step programs are lowered
    from the params' layout and compile while the weights load (`compile_early`); an input refused meanwhile
    (a damaged checkpoint, a resume that does not match) is reported at once.
    ``timing`` (a new `train.timing.Timing` if None) counts each phase (`train.timing.PHASES`) and goes on in
    the `Run`.
    """
    timing = timing if timing is not None else timing_lib.Timing()
    compile_cache.configure(config.compile_cache)
    main = distributed.is_main()
    if main:
        reporting.warm_up()
    with timing.phase("setup"):  # mostly importing the task's modules (transformers' Flax models)
        adapter = adapters.read(config.adapter) if config.adapter else None
        if adapter is not None:  # the adapter's method and selection, so config.yaml and results.json tell them
            config = adapters.with_selection(config, adapter)
        job = tasks.make_job(config)
        out = prepare_output_dir(config)
        mesh = make_mesh(config)
    with timing.phase("model_load"):  # the model and its params' layout; the weights load below
        source = job.model_source(config)
    with timing.phase("data"):
        job.prepare(source.tokenizer, NamedSharding(mesh, sharding.BATCH))
    per_epoch = pipeline.steps_per_epoch(job.num_train, job.examples_per_step)
    total_steps = config.total_steps(per_epoch)
    tx, schedule = step_lib.make_optimizer(
        config.lr, total_steps, config.warmup_steps, config.weight_decay, config.lr_schedule, config.max_grad_norm
    )
    early = None
    if adapter is None and config.strategy not in WANDA_STRATEGIES:
        early = compile_early(config, job, source, tx, mesh, timing, total_steps)
    with timing.phase("model_load"):
        params = source.load()
    model = source.model
    with timing.phase("selection"):
        if early is not None:
            method, remat, start_values = early.method, early.remat, None
        else:
            if adapter is not None:
                method, start_values = adapters.start(adapter, params, config.model)
            else:
                method, start_values = build_method(config, model, params, job), None
            remat = resolve_remat(config, model, params)
            if main:
                print(f"{config.method}: {method.mask.summary()}")
        trainable, frozen = method.split(params)
        del params
        trainable = start_values or trainable
        with config_errors(f"--mesh {config.mesh}"):
            state, shardings = step_lib.init_sharded_state(trainable, tx, config.seed, mesh, method.mask.family, frozen)
        frozen = distributed.to_global(frozen, shardings.frozen)
    if early is not None and not early.fits(state, frozen):  # never seen; the arrays are the truth
        early = None
    if early is not None:
        train_fn, eval_fn = early.train_fn, early.eval_fn
    else:
        train_fn, eval_fn = compile_steps(config, job, model, method, tx, shardings, remat, timing)
    if config.print_sharding and main:
        print_sharding(state, frozen, shardings)
    with timing.phase("checkpointing"):  # the fingerprint (the base weights' identity) is a small program
        meta = {
            "model": config.model,
            "fingerprint": ckpt.fingerprint(frozen),
            "config": config.to_dict(),
            "selection": {**method.describe(), "task": job.name},
            "process_count": jax.process_count(),
        }
        checkpoints = ckpt.manager(out / "checkpoints")
        state, resume_step = restore(config, checkpoints, meta, state)
    pending = early.compiles if early is not None else None
    compile_planned(job, state, frozen, train_fn, eval_fn, timing, total_steps, pending)  # waits past every check
    counts = ckpt.read_meta(checkpoints, resume_step).get("nonfinite") if resume_step is not None else None
    guard = nonfinite.Guard(config.on_nonfinite, config.max_nonfinite, checkpoints, counts)
    if main:
        save_config(config, out / "config.yaml")
    with timing.phase("reporting"):  # the TensorBoard writer: waits for the warm-up thread's import of it
        log = reporting.MetricsLog(out, resume_step, enabled=main)
    return loop_lib.Run(
        config,
        job,
        out,
        method,
        per_epoch,
        total_steps,
        on_host(schedule),
        state,
        frozen,
        train_fn,
        EvalContext(model, method, eval_fn, out),
        checkpoints,
        meta,
        log,
        guard,
        timing,
    )


def on_host(schedule):
    """``schedule`` (an optax schedule) evaluated on the CPU: the loop's lr readings never queue device work."""
    cpu = jax.local_devices(backend="cpu")[0]

    def lr(step: int) -> float:
        with jax.default_device(cpu):
            return float(schedule(step))

    return lr


def resolve_remat(config: TrainConfig, model, params):
    """The `--remat` policy for ``model`` (its size read from ``params``, arrays or shapes)."""
    with config_errors():
        return methods_lib.resolve_remat(
            config.remat, model.config.model_type, sum(x.size for x in jax.tree.leaves(params))
        )


class EarlyCompiles(NamedTuple):
    """Step programs lowered from the params' layout before the weights load (`compile_early`)."""

    method: methods_lib.Method
    remat: str | None
    train_fn: timing_lib.StepPrograms
    eval_fn: Any
    compiles: timing_lib.Compiles
    abstract: Any  # (state, frozen) as jax.ShapeDtypeStructs with their shardings

    def fits(self, state, frozen) -> bool:
        """Whether the loaded ``(state, frozen)`` have the shapes, dtypes and shardings the programs were
        lowered for (else the trainer compiles again, from the arrays)."""
        layout = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), tree)
        return layout((state, frozen)) == layout(self.abstract)


def compile_early(config: TrainConfig, job: Job, source, tx, mesh, timing: timing_lib.Timing, total_steps: int):
    """Chooses the method's rows or columns from ``source``'s params layout (strategies that read no weight),
    lays out the state, and starts compiling the step programs of `Job.planned_batches` in the background:
    XLA compiles (or loads them from the persistent cache) while the weights load. Returns `EarlyCompiles`."""
    with timing.phase("selection"):
        abstract_params = source.abstract_params
        method = build_method(config, source.model, abstract_params, job)
        if distributed.is_main():
            print(f"{config.method}: {method.mask.summary()}")
        remat = resolve_remat(config, source.model, abstract_params)
        trainable, frozen = jax.eval_shape(method.split, abstract_params)
        state = jax.eval_shape(lambda t: step_lib.init_state(t, tx, config.seed), trainable)
        with config_errors(f"--mesh {config.mesh}"):
            shardings = step_lib.step_shardings(mesh, method.mask.family, state, frozen)
        place = lambda tree, where: jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, where
        )
        state, frozen = place(state, shardings.state), place(frozen, shardings.frozen)
    train_fn, eval_fn = compile_steps(config, job, source.model, method, tx, shardings, remat, timing)
    compiles = timing_lib.start_compiles(planned_work(job, state, frozen, train_fn, eval_fn, total_steps), timing)
    return EarlyCompiles(method, remat, train_fn, eval_fn, compiles, (state, frozen))


def build_method(config: TrainConfig, model, params, job: Job) -> methods_lib.Method:
    """The method of --method; Wanda strategies score rows/columns on the job's calibration batches."""

    def calibrate(kernel_paths):
        return rocoft_jax.activation_norms(model, params, job.calibration_batches(), kernel_paths)

    with config_errors():
        return methods_lib.build_method(
            config.method,
            params,
            rank=selection_rank(config),
            mode=config.mode,
            strategy=config.strategy,
            seed=config.seed,
            train_bias=config.train_bias,
            lora_rank=config.lora_rank,
            lora_alpha=config.lora_alpha,
            calibrate=calibrate,
        )


def compile_steps(config: TrainConfig, job: Job, model, method, tx, shardings, remat, timing: timing_lib.Timing):
    """``(train_fn, eval_fn)`` for ``shardings``, as `train.timing.StepPrograms` (compiled per batch shape,
    timed; see `compile_planned`)."""
    with config_errors():
        attention = methods_lib.resolve_attention(config.attention)
    train_fn, eval_fn = step_lib.compile_steps(
        model,
        method,
        tx,
        job.loss_kind,
        shardings,
        attention=attention,
        remat=remat,
        grad_accum=config.grad_accum,
        skip_nonfinite=config.on_nonfinite == "skip",
    )
    train_fn = timing_lib.StepPrograms(train_fn, "train_step", timing)
    if job.compiles_eval_step:
        eval_fn = timing_lib.StepPrograms(eval_fn, "eval_step", timing)
    return train_fn, eval_fn


def planned_work(job: Job, state, frozen, train_fn, eval_fn, total_steps: int) -> list:
    """``(programs, args)`` of every batch shape the job plans for ``total_steps`` steps and its evaluations
    (`Job.planned_batches`); none for a job that cannot tell its shapes ahead (each compiles at first use),
    except with several processes, which compile the train batches' one shape."""
    planned = job.planned_batches(total_steps)
    if planned is None and jax.process_count() > 1:  # every batch has one shape
        example = job.train_batch(0)
        planned = ([example] if total_steps else [], [example])
    if planned is None:
        return []
    train_batches, eval_batches = planned
    work = [(train_fn, (state, frozen, batch)) for batch in train_batches]
    if job.compiles_eval_step:
        work += [(eval_fn, (state.trainable, frozen, batch)) for batch in eval_batches]
    return work


def compile_planned(
    job: Job, state, frozen, train_fn, eval_fn, timing: timing_lib.Timing, total_steps: int, pending=None
) -> None:
    """Compiles every batch shape the job plans (`planned_work`) that ``pending`` (`train.timing.Compiles`
    started early, if any) does not hold, concurrently, and waits for all, so the loop never stops to compile;
    a job that cannot tell its shapes ahead compiles each at first use. Several processes then meet, so none
    enters a collective while another still compiles."""
    work = planned_work(job, state, frozen, train_fn, eval_fn, total_steps)
    started = [pending] if pending is not None else []
    started.append(timing_lib.start_compiles([w for w in work if not any(c.holds(*w) for c in started)], timing))
    total = sum(len(c.todo) for c in started)
    with tqdm(total=total, desc="compiling step programs", disable=not distributed.is_main() or not total) as bar:
        for compiles in started:
            compiles.wait(bar)
    if jax.process_count() > 1:
        distributed.barrier("compiled")


def restore(config: TrainConfig, checkpoints, meta: dict[str, Any], state):
    """``(state, resume_step)``: with --resume the newest complete checkpoint, once its metadata matches this run.

    A damaged newest step falls back to an older one with a warning; `train.checkpoint` says which faults do.
    """
    if not config.resume:
        return state, None
    state, resume_step = ckpt.restore_latest(checkpoints, state, meta)
    if distributed.is_main():
        print(f"resumed from step {resume_step}")
    return state, resume_step


def print_sharding(state, frozen, shardings) -> None:
    """Every param's PartitionSpec, to debug a mesh."""
    from rocoft_jax.tree import flat_paths

    for tree, where in ((frozen, shardings.frozen), (state.trainable, shardings.state.trainable)):
        specs = flat_paths(jax.tree.map(lambda s: s.spec, where))
        for path, leaf in flat_paths(tree).items():
            print(f"{path:<80} {str(tuple(leaf.shape)):<16} {specs[path]}")


def finish(run: loop_lib.Run) -> dict[str, Any]:
    """The final evaluation and checkpoint; process 0 writes curves.png, then results.json. Returns the results.

    results.json's ``timing`` (`train.timing.Timing.to_dict`) is taken just before it is written.
    """
    config, total, timing = run.config, run.total_steps, run.timing
    metrics = run.evaluate()
    with timing.phase("reporting"):
        run.log.write({"step": total, **metrics})
    run.save(total)
    results = {
        "task": run.job.name,
        "model": config.model,
        "method": config.method,
        "mode": config.mode,
        "rank": selection_rank(config),
        "strategy": config.strategy,
        "num_trainable": run.method.mask.num_trainable,
        "num_total": run.method.mask.num_total,
        "steps": total,
        "metrics": metrics,
        **({"skipped_steps": run.guard.skipped} if config.on_nonfinite == "skip" else {}),
        **run.job.results(),
    }
    if distributed.is_main():
        with timing.phase("reporting"):
            print(reporting.eval_table(total, metrics))
            reporting.plot_curves(run.log.records(), run.job.metric_names, run.out / "curves.png")
            run.log.close()
    results["timing"] = timing.to_dict()
    timing.close()
    if distributed.is_main():
        (run.out / "results.json").write_text(strict_json.dumps(results, indent=2) + "\n")
    return results


def train_and_evaluate(config: TrainConfig) -> dict[str, Any]:
    """Runs the whole job and returns what results.json holds (on every process)."""
    timing = timing_lib.Timing()
    prefetch = None
    try:
        with timing.phase("setup"):  # a rerun starts loading its cached programs now (`train.compile_prefetch`)
            prefetch = compile_prefetch.begin(compile_cache.configure(config.compile_cache), config.to_dict())
        run = setup(config, timing)
        try:
            loop_lib.loop(run)
            results = finish(run)
        except NonFiniteError:
            if distributed.is_main():
                (run.out / "results.json").unlink(missing_ok=True)
            raise
        if prefetch is not None:
            prefetch.save()
        return results
    finally:
        if prefetch is not None:
            prefetch.close()
        timing.close()
