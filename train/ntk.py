"""The paper's NTK analysis (Section 5): few-shot kernel logistic regression on the empirical NTK.

    python -m train.ntk --model MODEL --task sst2 --k 16 --seeds 5 --subsets full,row1,column1,lora1

For each seed s (0 .. seeds-1) it samples k training examples per class, computes the NTK of
each parameter subset on them (`rocoft_jax.ntk`), fits kernel logistic regression with lambda
chosen on a held-out quarter of the k-shot set (`rocoft_jax.ntk.klr`), and classifies the dev set
(the first eval split). f(x) is prompt-based for models with a masked-LM head (template and
label words from configs/ntk/<task>.yaml), else a readout on the pooled output fixed at init
(`--head`; `--pooling auto` follows a sentence-transformers dir's Pooling config). Writes to
--output-dir: ntk_results.json (subset -> accuracy_mean, accuracy_std, and for subsets other
than full distance_p1, distance_p2, means over seeds), ntk_results.md (mean (std)),
ntk_run.json (the options, the pooling used, and sizes), heatmaps.png, spectrum.png and
kernels.npz (seed 0). Options are declared and checked with `train.options`, as train.run's;
bad input exits with code 2 and one line.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

from train import ntk_report, strict_json, third_party
from train import options as opt
from train.errors import ConfigError, UserError
from train.ntk_config import GROUPS, NTKConfig, check
from train.ntk_model import load_model


def parse_args(argv) -> NTKConfig:
    """The checked options of a `train.ntk` command line; bad input raises `ConfigError`."""
    parser = opt.new_parser("python -m train.ntk", __doc__)
    opt.add_arguments(parser, NTKConfig, GROUPS)
    return NTKConfig(**opt.validate(NTKConfig, opt.given(parser.parse_args(argv), NTKConfig)))


def sample_kshot(labels: np.ndarray, k: int, num_classes: int, seed: int) -> np.ndarray:
    """Row ids of k examples per class, grouped by class (so kernels come out ordered by class)."""
    rng = np.random.default_rng(seed)
    rows = []
    for cls in range(num_classes):
        pool = np.flatnonzero(labels == cls)
        if len(pool) < k:
            raise ConfigError(f"--k {k}: class {cls} has only {len(pool)} training examples")
        rows.append(np.sort(rng.choice(pool, k, replace=False)))
    return np.concatenate(rows)


def _trim(batch: dict, length: int) -> dict:
    return {k: v[:, :length] if v.ndim == 2 else v for k, v in batch.items()}


def _take(batch: dict, rows) -> dict:
    return {k: v[rows] for k, v in batch.items()}


def run(config: NTKConfig) -> dict:
    plan = check(config)
    spec = plan.spec
    from tqdm.auto import tqdm

    from rocoft_jax import ntk
    from rocoft_jax.ntk import klr
    from rocoft_jax.ntk import metrics as ntk_metrics
    from train import input_pipeline as pipeline
    from train.glue import load_task

    out = Path(config.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"--output-dir {out}: cannot create it ({err.strerror})") from err
    data = load_task(spec.name, config.data_dir)
    train, dev = data["train"], data[spec.eval_splits[0]]
    if config.limit_eval:
        dev = {key: values[: config.limit_eval] for key, values in dev.items()}
    train_labels, dev_labels = np.asarray(train["label"]), np.asarray(dev["label"])
    kshot = [sample_kshot(train_labels, config.k, spec.num_labels, seed) for seed in range(config.seeds)]
    used = np.unique(np.concatenate(kshot))

    forward, params, encode = load_model(config, spec)
    x_used, x_dev = encode(pipeline.select(train, used)), encode(dev)
    longest = max(int(x["attention_mask"].sum(1).max()) for x in (x_used, x_dev))
    length = pipeline.fit_bucket(pipeline.bucket_lengths(config.max_length), longest)
    x_used, x_dev = _trim(x_used, length), _trim(x_dev, length)
    for name in plan.subsets:  # e.g. a rank above a kernel's size: fail before any work
        try:
            ntk.make_subset(name, params, forward, strategy=config.strategy)
        except ValueError as err:
            raise ConfigError(f"--subsets {name}: {err}") from None
    where = {int(r): i for i, r in enumerate(used)}
    c_out = 1 if spec.num_labels == 2 else spec.num_labels
    lora_alpha = config.lora_alpha or None

    records = {
        name: {"accuracies": [], "lambdas": [], "kernel_seconds": [], "d1": [], "d2": []} for name in plan.subsets
    }
    num_params = {}
    for seed in tqdm(range(config.seeds), desc=f"ntk {spec.name} k={config.k}", dynamic_ncols=True):
        x = _take(x_used, [where[int(r)] for r in kshot[seed]])
        y = train_labels[kshot[seed]]
        f0_train = f0_dev = None
        kernels = {}
        for name in plan.subsets:
            subset = ntk.make_subset(name, params, forward, seed=seed, strategy=config.strategy, lora_alpha=lora_alpha)
            num_params[name] = subset.num_params
            start = time.perf_counter()
            k = ntk.kernel(subset, x, max_bytes=plan.max_bytes, chunk_size=config.chunk_size, progress=True)
            records[name]["kernel_seconds"].append(time.perf_counter() - start)
            kernels[name] = k
            scale = float(np.trace(k)) / len(k) or 1.0  # lambdas are relative to a unit mean diagonal
            if config.init_output and f0_train is None:
                f0_train = ntk.outputs(subset, x, chunk_size=config.chunk_size)
            lam, _ = klr.select_lambda(
                k / scale, y, plan.lambdas, num_outputs=c_out, fraction=config.holdout, seed=seed, offset=f0_train
            )
            fit = klr.fit(k / scale, y, lam, num_outputs=c_out, offset=f0_train)
            outputs = ntk.predict(
                subset,
                x,
                fit.alpha / scale,
                x_dev,
                max_bytes=plan.max_bytes,
                chunk_size=config.chunk_size,
                jvp_chunk_size=config.eval_chunk_size,
                progress=True,
            )
            if config.init_output:
                f0_dev = ntk.outputs(subset, x_dev, chunk_size=config.eval_chunk_size) if f0_dev is None else f0_dev
                outputs = outputs + f0_dev
            records[name]["accuracies"].append(float(np.mean(klr.predict(outputs) == dev_labels)))
            records[name]["lambdas"].append(lam)
        if "full" in kernels:
            for name in plan.subsets:
                if name != "full":
                    records[name]["d1"].append(ntk_metrics.relative_distance(kernels[name], kernels["full"], 1))
                    records[name]["d2"].append(ntk_metrics.relative_distance(kernels[name], kernels["full"], 2))
        if seed == 0:
            ntk_report.write_pictures(out, kernels, y, c_out, spec.name, config.k)

    results = ntk_report.summarize(records, num_params)
    (out / "ntk_results.json").write_text(strict_json.dumps(results, indent=2) + "\n")
    (out / "ntk_results.md").write_text(ntk_report.markdown(results, config, spec.name, len(dev_labels)))
    run_info = {
        **dataclasses.asdict(config),
        "max_bytes": plan.max_bytes,
        "num_outputs": c_out,
        "num_dev": len(dev_labels),
        "eval_split": spec.eval_splits[0],
        "sequence_length": length,
        "head": type(forward).__name__,
        "pooling": getattr(forward, "pooling", None),
    }
    (out / "ntk_run.json").write_text(strict_json.dumps(run_info, indent=2) + "\n")
    print(ntk_report.markdown(results, config, spec.name, len(dev_labels)))
    return results


def main(argv=None) -> int:
    third_party.quiet()
    try:
        run(parse_args(argv))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
