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
kernels.npz (seed 0).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

from train import models
from train.config import _bool
from train.errors import ConfigError
from train.errors import DataError
from train.glue import get_task

HEADS = ("auto", "readout", "prompt")


@dataclasses.dataclass
class NTKConfig:
    model: str = "tiny"
    task: str = "demo"
    k: int = 16
    seeds: int = 5
    subsets: str = "full,row1,column1,lora1"
    output_dir: str = "runs/ntk"
    data_dir: str | None = None
    head: str = "auto"
    prompt_config: str | None = None
    pooling: str = "auto"
    readout_seed: int = 0
    strategy: str = "first"
    lora_alpha: float = 0.0
    max_length: int = 128
    limit_eval: int = 0
    max_bytes: str = "1G"
    chunk_size: int = 16
    eval_chunk_size: int = 64
    lambdas: str = "1e-5,1e-4,1e-3,1e-2,1e-1,1"
    holdout: float = 0.25
    init_output: bool = False


HELP = {
    "model": "HF hub id or local model dir; 'tiny' is a random-init 2-layer RoBERTa for the offline demo",
    "task": "cola, sst2, mrpc, qqp, mnli, qnli, rte, or demo (generated offline); STS-B is regression: not supported",
    "k": "training examples per class in each seed's few-shot set (>= 2: some are held out to pick lambda)",
    "seeds": "number of few-shot samples (seeds 0 .. N-1)",
    "subsets": "comma-separated parameter subsets: full, bitfit, row<r>, column<r>, lora<r>",
    "output_dir": "where ntk_results.json/.md, ntk_run.json, heatmaps.png, spectrum.png and kernels.npz go",
    "data_dir": "local GLUE folder (download_glue_data.py layout) or HF parquet files; default: the hub",
    "head": "f(x): prompt (label words' logits at the mask; needs an MLM head), readout (fixed linear readout "
            "on the pooled output), or auto (prompt when the checkpoint is a *ForMaskedLM)",
    "prompt_config": "YAML with 'template' and 'label_words' (default configs/ntk/<task>.yaml)",
    "pooling": "readout input: pooler (HF's pooled output), mean (mean of the last hidden states), or auto "
               "(mean when the model dir's sentence-transformers Pooling config averages the tokens, as "
               "all-MiniLM-L6-v2's does; else the pooler)",
    "readout_seed": "seed of the fixed readout (shared by every few-shot seed and subset)",
    "strategy": "rows/columns of row<r>/column<r>: first (the paper's default) or random (seeded per seed)",
    "lora_alpha": "LoRA alpha of lora<r>; 0 means 2r (the kernel's scale does not affect accuracy or distances)",
    "max_length": "tokens per example; every batch is padded to one length bucket up to this",
    "limit_eval": "evaluate on only the first N dev examples (0 = the whole dev set)",
    "max_bytes": "bound on the per-example gradients held at once while computing a kernel, e.g. 512M, 2G",
    "chunk_size": "examples per vmapped gradient computation",
    "eval_chunk_size": "dev examples per forward-mode (JVP) batch, for subsets too large for an explicit cross kernel",
    "lambdas": "comma-separated L2 strengths tried for kernel logistic regression (kernel scaled to unit mean diagonal)",
    "holdout": "fraction of each class's k examples held out to choose lambda",
    "init_output": "add the model's outputs at init to the kernel predictor (the linearized model) (true|false)",
}


def parse_bytes(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)i?B?\s*", str(text), flags=re.I)
    if not match:
        raise ConfigError(f"--max-bytes {text!r}: give a number of bytes, e.g. 1073741824, 512M or 2G")
    return int(float(match.group(1)) * 1024 ** " KMG".index(match.group(2).upper() or " "))


def parse_args(argv) -> NTKConfig:
    parser = argparse.ArgumentParser(prog="python -m train.ntk", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for field in dataclasses.fields(NTKConfig):
        kind = {bool: _bool, int: int, float: float}.get(type(field.default), str)
        parser.add_argument("--" + field.name.replace("_", "-"), type=kind, default=field.default,
                            nargs="?" if kind is _bool else None, const=True if kind is _bool else None,
                            help=f"{HELP[field.name]} (default: {field.default})")
    return NTKConfig(**vars(parser.parse_args(argv)))


@dataclasses.dataclass(frozen=True)
class Plan:
    """The validated options."""

    spec: object
    subsets: tuple[str, ...]
    max_bytes: int
    lambdas: tuple[float, ...]


def check(config: NTKConfig) -> Plan:
    """Every option that can be checked before loading data or a model."""
    from rocoft_jax import ntk

    spec = get_task(config.task)
    if spec.is_regression:
        raise ConfigError(f"--task {spec.name} is a regression task; kernel logistic regression needs classes")
    subsets = tuple(s.strip() for s in config.subsets.split(",") if s.strip())
    if not subsets:
        raise ConfigError(f"--subsets: name at least one of {ntk.SUBSET_NAMES}")
    for name in subsets:
        try:
            ntk.parse_subset(name)
        except ValueError as err:
            raise ConfigError(f"--subsets: {err}") from None
    if len(set(subsets)) != len(subsets):
        raise ConfigError(f"--subsets {config.subsets}: a subset is named twice")
    for flag, value, low in (("k", config.k, 2), ("seeds", config.seeds, 1), ("max-length", config.max_length, 8),
                             ("chunk-size", config.chunk_size, 1), ("eval-chunk-size", config.eval_chunk_size, 1),
                             ("limit-eval", config.limit_eval, 0)):
        if value < low:
            raise ConfigError(f"--{flag} {value}: must be at least {low}" + (
                " (some of each class's examples are held out to choose lambda)" if flag == "k" else ""))
    if config.head not in HEADS:
        raise ConfigError(f"--head {config.head}: choose one of {', '.join(HEADS)}")
    if config.pooling not in ("auto", "pooler", "mean"):
        raise ConfigError(f"--pooling {config.pooling}: choose auto, pooler or mean")
    if config.strategy not in ("first", "random"):
        raise ConfigError(f"--strategy {config.strategy}: choose first or random (Wanda scores need calibration)")
    if not 0.0 < config.holdout < 1.0:
        raise ConfigError(f"--holdout {config.holdout}: must be in (0, 1)")
    try:
        lambdas = tuple(float(v) for v in config.lambdas.split(","))
    except ValueError:
        lambdas = ()
    if not lambdas or min(lambdas) <= 0:
        raise ConfigError(f"--lambdas {config.lambdas}: give positive numbers separated by commas")
    return Plan(spec, subsets, parse_bytes(config.max_bytes), lambdas)


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


def checkpoint_pooling(model: str) -> str:
    """What --pooling auto reads out: "mean" when ``model`` is a dir whose sentence-transformers Pooling
    module (modules.json, else 1_Pooling/) averages the tokens, else "pooler" (hub ids, plain dirs, and
    CLS pooling, for which the pooler is our nearest option)."""
    root = Path(model)
    path = root / "1_Pooling"
    if (root / "modules.json").is_file():
        pooling = [m["path"] for m in json.loads((root / "modules.json").read_text())
                   if m.get("type", "").endswith(".Pooling")]
        path = root / pooling[0] if pooling else None
    if path is None or not (path / "config.json").is_file():
        return "pooler"
    return "mean" if json.loads((path / "config.json").read_text()).get("pooling_mode_mean_tokens") else "pooler"


def load_model(config: NTKConfig, spec):
    """``(forward, params, encode)``: f of the chosen head, and a function encoding raw columns."""
    from rocoft_jax.ntk import forwards as ntk_forwards
    from train import input_pipeline as pipeline
    from train import prompts

    if config.model == "tiny":
        from train.demo_task import make_demo_tokenizer

        prompt_head = config.head == "prompt"
        model_cfg = models.preset_config("tiny", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        model, params = models.random_model(model_cfg, "masked-lm" if prompt_head else "base")
        tokenizer = make_demo_tokenizer(model_max_length=model_cfg.max_position_embeddings - 2)
    else:
        from transformers import AutoTokenizer

        model_cfg = models.load_config(config.model)
        masked_lm = any(a.endswith("ForMaskedLM") for a in (model_cfg.architectures or []))
        prompt_head = config.head == "prompt" or (config.head == "auto" and masked_lm)
        model, params = models.load_pretrained(config.model, "masked-lm" if prompt_head else "base")
        tokenizer = AutoTokenizer.from_pretrained(config.model, use_fast=True)
    if prompt_head:
        prompt = prompts.load_prompt(spec.name, config.prompt_config)
        if len(prompt.label_words) != spec.num_labels:
            raise ConfigError(f"{spec.name} has {spec.num_labels} classes but the prompt {len(prompt.label_words)} "
                              "label words")
        forward = ntk_forwards.PromptForward(model, prompts.label_word_ids(tokenizer, prompt.label_words))
        return forward, params, lambda cols: prompts.encode_prompts(tokenizer, cols, spec.text_keys, prompt,
                                                                    config.max_length)
    readout = ntk_forwards.init_readout(model.config.hidden_size, spec.num_labels, config.readout_seed)
    pooling = config.pooling
    if pooling == "auto":
        pooling = "pooler" if config.model == "tiny" else checkpoint_pooling(config.model)
        print(f"--pooling auto: reading out {pooling}")
    forward = ntk_forwards.ReadoutForward(model, readout, pooling)

    def encode(cols):
        enc = pipeline.encode(tokenizer, cols, spec.text_keys, config.max_length)
        enc.pop("labels")
        return enc

    return forward, params, encode


def _trim(batch: dict, length: int) -> dict:
    return {k: v[:, :length] if v.ndim == 2 else v for k, v in batch.items()}


def _take(batch: dict, rows) -> dict:
    return {k: v[rows] for k, v in batch.items()}


def run(config: NTKConfig) -> dict:
    plan = check(config)
    spec = plan.spec
    from tqdm.auto import tqdm

    from rocoft_jax import ntk
    from rocoft_jax.ntk import klr, metrics as ntk_metrics
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

    records = {name: {"accuracies": [], "lambdas": [], "kernel_seconds": [], "d1": [], "d2": []}
               for name in plan.subsets}
    num_params = {}
    for seed in tqdm(range(config.seeds), desc=f"ntk {spec.name} k={config.k}", dynamic_ncols=True):
        x = _take(x_used, [where[int(r)] for r in kshot[seed]])
        y = train_labels[kshot[seed]]
        f0_train = f0_dev = None
        kernels = {}
        for name in plan.subsets:
            subset = ntk.make_subset(name, params, forward, seed=seed, strategy=config.strategy,
                                     lora_alpha=lora_alpha)
            num_params[name] = subset.num_params
            start = time.perf_counter()
            k = ntk.kernel(subset, x, max_bytes=plan.max_bytes, chunk_size=config.chunk_size, progress=True)
            records[name]["kernel_seconds"].append(time.perf_counter() - start)
            kernels[name] = k
            scale = float(np.trace(k)) / len(k) or 1.0  # lambdas are relative to a unit mean diagonal
            if config.init_output and f0_train is None:
                f0_train = ntk.outputs(subset, x, chunk_size=config.chunk_size)
            lam, _ = klr.select_lambda(k / scale, y, plan.lambdas, num_outputs=c_out, fraction=config.holdout,
                                       seed=seed, offset=f0_train)
            fit = klr.fit(k / scale, y, lam, num_outputs=c_out, offset=f0_train)
            outputs = ntk.predict(subset, x, fit.alpha / scale, x_dev, max_bytes=plan.max_bytes,
                                  chunk_size=config.chunk_size, jvp_chunk_size=config.eval_chunk_size, progress=True)
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
            _pictures(out, kernels, y, c_out, spec.name, config.k)

    results = _summarize(records, num_params)
    (out / "ntk_results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "ntk_results.md").write_text(_markdown(results, config, spec.name, len(dev_labels)))
    run_info = {**dataclasses.asdict(config), "max_bytes": plan.max_bytes, "num_outputs": c_out,
                "num_dev": len(dev_labels), "eval_split": spec.eval_splits[0], "sequence_length": length,
                "head": type(forward).__name__, "pooling": getattr(forward, "pooling", None)}
    (out / "ntk_run.json").write_text(json.dumps(run_info, indent=2) + "\n")
    print(_markdown(results, config, spec.name, len(dev_labels)))
    return results


def _pictures(out: Path, kernels: dict, y, c_out: int, task: str, k: int) -> None:
    from rocoft_jax.ntk import metrics as ntk_metrics

    title = f"{task}, k={k}, seed 0"
    ntk_metrics.plot_heatmaps(kernels, y, out / "heatmaps.png", num_outputs=c_out, title=title)
    ntk_metrics.plot_spectra({n: ntk_metrics.spectrum(kv) for n, kv in kernels.items()}, out / "spectrum.png",
                             title=title)
    np.savez(out / "kernels.npz", labels=y, **kernels)


def _summarize(records: dict, num_params: dict) -> dict:
    results = {}
    for name, rec in records.items():
        acc = np.asarray(rec["accuracies"])
        entry = {"accuracy_mean": float(acc.mean()), "accuracy_std": float(acc.std()),
                 "accuracies": rec["accuracies"], "num_params": num_params[name], "lambdas": rec["lambdas"],
                 "kernel_seconds": float(np.mean(rec["kernel_seconds"]))}
        if rec["d1"]:
            entry.update(distance_p1=float(np.mean(rec["d1"])), distance_p2=float(np.mean(rec["d2"])),
                         distance_p1_std=float(np.std(rec["d1"])), distance_p2_std=float(np.std(rec["d2"])))
        results[name] = entry
    return results


def _markdown(results: dict, config: NTKConfig, task: str, num_dev: int) -> str:
    lines = [f"NTK analysis: {task}, model {config.model}, k={config.k} per class, {config.seeds} seed(s), "
             f"{num_dev} dev examples. Mean (std) over seeds; distances to the full-parameter kernel.", "",
             "| subset | parameters | accuracy (%) | distance p=1 | distance p=2 |", "|---|---|---|---|---|"]
    for name, r in results.items():
        dist = [f"{r[f'distance_p{p}']:.3f} ({r[f'distance_p{p}_std']:.3f})" if f"distance_p{p}" in r else "-"
                for p in (1, 2)]
        lines.append(f"| {name} | {r['num_params']:,} | {100 * r['accuracy_mean']:.1f} "
                     f"({100 * r['accuracy_std']:.1f}) | {dist[0]} | {dist[1]} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    try:
        run(parse_args(argv))
    except (ConfigError, DataError, models.ModelError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
