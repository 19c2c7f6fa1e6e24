"""The options of `train.ntk`, declared with `train.options` as train.run's are, and their checks.

`check` validates a config (from flags or built in code) before any data or model is loaded and
returns the parsed `Plan`; every bad value is a one-line `ConfigError` naming the flag.
"""

from __future__ import annotations

import dataclasses
import re

from train import options as opt
from train.errors import ConfigError
from train.glue import get_task
from train.options import at_least, between, option

GROUPS = ("model and task", "parameter subsets", "kernel regression", "computation", "output")
MODEL, SUBSETS, KLR, COMPUTE, OUTPUT = GROUPS
HEADS = ("auto", "readout", "prompt")
POOLINGS = ("auto", "pooler", "mean")


def parse_bytes(text: str) -> int:
    """``"512M"`` -> 536870912; plain numbers are bytes, K/M/G are powers of 1024."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)i?B?\s*", str(text), flags=re.I)
    if not match:
        raise ConfigError(f"--max-bytes {opt.shown(text)}: give a number of bytes, e.g. 1073741824, 512M or 2G")
    return int(float(match.group(1)) * 1024 ** " KMG".index(match.group(2).upper() or " "))


def parse_subsets(text: str) -> tuple[str, ...]:
    """The comma-separated subset names, each valid and named once; raises ValueError(problem)."""
    from rocoft_jax import ntk

    subsets = tuple(s.strip() for s in text.split(",") if s.strip())
    if not subsets:
        raise ValueError(f"name at least one of {ntk.SUBSET_NAMES}")
    for name in subsets:
        ntk.parse_subset(name)
    if len(set(subsets)) != len(subsets):
        raise ValueError("a subset is named twice")
    return subsets


def parse_lambdas(text: str) -> tuple[float, ...]:
    """The comma-separated L2 strengths, each positive and finite; raises ValueError(problem)."""
    try:
        lambdas = tuple(float(v) for v in text.split(","))
    except ValueError:
        lambdas = ()
    if not lambdas or not all(0 < v < float("inf") for v in lambdas):
        raise ValueError("give positive numbers separated by commas")
    return lambdas


def _check_bytes(text: str) -> None:
    try:
        parse_bytes(text)
    except ConfigError:
        raise ValueError("give a number of bytes, e.g. 1073741824, 512M or 2G") from None


@dataclasses.dataclass
class NTKConfig:
    model: str = option(
        "tiny",
        "HF hub id or local model dir; 'tiny' is a random-init 2-layer RoBERTa for the offline demo",
        group=MODEL,
    )
    task: str = option(
        "demo",
        "cola, sst2, mrpc, qqp, mnli, qnli, rte, or demo (generated offline); STS-B is regression: not supported",
        group=MODEL,
    )
    k: int = option(
        16,
        "training examples per class in each seed's few-shot set",
        group=KLR,
        range=at_least(2),
        note="some of each class's examples are held out to choose lambda",
    )
    seeds: int = option(5, "number of few-shot samples (seeds 0 .. N-1)", group=KLR, range=at_least(1))
    subsets: str = option(
        "full,row1,column1,lora1",
        "comma-separated parameter subsets: full, bitfit, row<r>, column<r>, lora<r>",
        group=SUBSETS,
        check=parse_subsets,
    )
    output_dir: str = option(
        "runs/ntk",
        "where ntk_results.json/.md, ntk_run.json, heatmaps.png, spectrum.png and kernels.npz go",
        group=OUTPUT,
    )
    data_dir: str | None = option(
        None, "local GLUE folder (download_glue_data.py layout) or HF parquet files; default: the hub", group=MODEL
    )
    head: str = option(
        "auto",
        "f(x): prompt (label words' logits at the mask; needs an MLM head), readout "
        "(fixed linear readout on the pooled output), or auto (prompt when the checkpoint is a "
        "*ForMaskedLM)",
        group=MODEL,
        choices=HEADS,
    )
    prompt_config: str | None = option(
        None, "YAML with 'template' and 'label_words' (default configs/ntk/<task>.yaml)", group=MODEL
    )
    pooling: str = option(
        "auto",
        "readout input: pooler (HF's pooled output), mean (mean of the last hidden "
        "states), or auto (mean when the model dir's sentence-transformers Pooling config "
        "averages the tokens, as all-MiniLM-L6-v2's does; else the pooler)",
        group=MODEL,
        choices=POOLINGS,
    )
    readout_seed: int = option(
        0, "seed of the fixed readout (shared by every few-shot seed and subset)", group=MODEL, range=at_least(0)
    )
    strategy: str = option(
        "first",
        "rows/columns of row<r>/column<r>: first (the paper's default) or random "
        "(seeded per seed); Wanda scores need calibration, which this analysis does not run",
        group=SUBSETS,
        choices=("first", "random"),
    )
    lora_alpha: float = option(
        0.0,
        "LoRA alpha of lora<r>; 0 means 2r (the kernel's scale does not affect accuracy or distances)",
        group=SUBSETS,
        range=at_least(0),
    )
    max_length: int = option(
        128,
        "tokens per example; every batch is padded to one length bucket up to this",
        group=MODEL,
        range=at_least(8),
        note="room for the special tokens and some text",
    )
    limit_eval: int = option(
        0, "evaluate on only the first N dev examples (0 = the whole dev set)", group=KLR, range=at_least(0)
    )
    max_bytes: str = option(
        "1G",
        "bound on the per-example gradients held at once while computing a kernel, e.g. 512M, 2G",
        group=COMPUTE,
        check=_check_bytes,
    )
    chunk_size: int = option(16, "examples per vmapped gradient computation", group=COMPUTE, range=at_least(1))
    eval_chunk_size: int = option(
        64,
        "dev examples per forward-mode (JVP) batch, for subsets too large for an explicit cross kernel",
        group=COMPUTE,
        range=at_least(1),
    )
    lambdas: str = option(
        "1e-5,1e-4,1e-3,1e-2,1e-1,1",
        "comma-separated L2 strengths tried for kernel logistic regression (kernel scaled to unit mean diagonal)",
        group=KLR,
        check=parse_lambdas,
    )
    holdout: float = option(
        0.25,
        "fraction of each class's k examples held out to choose lambda",
        group=KLR,
        range=between(0, 1, low_open=True, high_open=True),
    )
    init_output: bool = option(
        False, "add the model's outputs at init to the kernel predictor (the linearized model)", group=KLR
    )


@dataclasses.dataclass(frozen=True)
class Plan:
    """The validated options."""

    spec: object
    subsets: tuple[str, ...]
    max_bytes: int
    lambdas: tuple[float, ...]


def check(config: NTKConfig) -> Plan:
    """Every option checked (also of a config built in code) before loading data or a model."""
    opt.validate(NTKConfig, dataclasses.asdict(config))
    spec = get_task(config.task)
    if spec.is_regression:
        raise ConfigError(f"--task {spec.name} is a regression task; kernel logistic regression needs classes")
    return Plan(spec, parse_subsets(config.subsets), parse_bytes(config.max_bytes), parse_lambdas(config.lambdas))
