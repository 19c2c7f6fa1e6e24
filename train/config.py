"""The run configuration: defaults, then a YAML file, then command-line flags.

``--task rte`` picks up ``configs/glue/rte.yaml`` (``--task boolq``:
``configs/llm/boolq.yaml``) unless ``--config`` names another file; flags given
on the command line override the file.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import yaml
from train.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"



@dataclasses.dataclass
class TrainConfig:
    # what to train
    model: str = "tiny"
    task: str = "demo"
    method: str = "rocoft"
    mode: str = "row"
    strategy: str = "first"
    rank: float = 3
    lora_rank: int = 8
    lora_alpha: float = 16.0
    # optimization
    lr: float = 2e-3
    epochs: float = 3
    max_steps: int = 0
    batch_size: int = 32
    max_length: int = 128
    bucket: bool = True
    warmup_steps: int = 100
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lr_schedule: str = "cosine"
    dropout: float = 0.1
    train_bias: bool = False
    seed: int = 0
    dtype: str = "fp32"
    attention: str = "auto"
    calibration_batches: int = 8
    grad_accum: int = 1
    remat: str = "auto"
    # LLM tasks (LLM-Adapters data, causal LM, evaluation by generation)
    train_file: str | None = None
    cutoff: int = 256
    train_on_inputs: bool = True
    num_beams: int = 1
    max_new_tokens: int = 0
    eval_batch_size: int = 0
    # run control
    output_dir: str = "runs/default"
    data_dir: str | None = None
    limit_train: int = 0
    limit_eval: int = 0
    eval_every: int = 0
    log_every: int = 10
    save_every: int = 0
    resume: bool = False
    # devices and processes
    mesh: str = ""
    print_sharding: bool = False
    coordinator_address: str | None = None
    num_processes: int = 0
    process_id: int = -1
    heartbeat_timeout: int = 60

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


HELP = {
    "model": "HF hub id or local model dir (flax_model.msgpack, model.safetensors or pytorch_model.bin); "
             "'tiny' is a random-init 2-layer RoBERTa for the offline demo",
    "task": "cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, or demo (generated offline); or an LLM task, trained "
            "as a causal LM and scored by generation: boolq, piqa, siqa, hellaswag, winogrande, arc-e, arc-c, obqa, "
            "multiarith, gsm8k, addsub, singleeq, svamp, aqua",
    "method": "rocoft (rows/columns), full, lora, or bitfit (biases + head)",
    "mode": "row (output units, Flax kernel[:, i]), column (input features, kernel[i, :]) or random entries",
    "strategy": "rows/columns to train: first, random, or Wanda-scored max, min, mixed",
    "rank": "rows/columns per kernel; for --mode random, the probability p in (0, 1]",
    "lora_rank": "LoRA rank (method lora)",
    "lora_alpha": "LoRA alpha (method lora)",
    "lr": "peak learning rate",
    "epochs": "training epochs (ignored when --max-steps > 0)",
    "max_steps": "total optimizer steps; 0 = from --epochs",
    "batch_size": "global batch size, divisible by the device count",
    "max_length": "tokens per example; shorter ones are padded so the step never recompiles",
    "bucket": "trim each batch's padding to a power-of-two length bucket (true|false); "
              "false pads every batch to --max-length",
    "warmup_steps": "linear warmup steps",
    "weight_decay": "AdamW decoupled weight decay (biases and norms of fully trained leaves are exempt)",
    "max_grad_norm": "global gradient-norm clip; 0 disables",
    "lr_schedule": "cosine, linear or constant after warmup",
    "dropout": "hidden and attention dropout of the model",
    "train_bias": "also train the biases of the targeted layers (true|false)",
    "seed": "seeds selection, head init, data order and dropout",
    "dtype": "fp32, or bf16 (frozen weights and compute in bf16; trained values stay fp32)",
    "attention": "auto (cuDNN fused attention on GPUs, padding as key lengths; HF's own elsewhere), plain, "
                 "xla, cudnn or cudnn-lengths; an encoder's active attention dropout runs in Pallas kernels on "
                 "GPUs, a decoder's in HF's attention",
    "calibration_batches": "training batches used to score rows/columns for Wanda strategies",
    "grad_accum": "LLM tasks: micro-batches of --batch-size rows per optimizer step, accumulated inside the step "
                  "(equal to one batch of grad_accum * batch_size rows)",
    "remat": "recompute each decoder layer in the backward pass: none, full, dots (Llama/Mistral/Gemma only; see "
             "rocoft_jax.fast.remat), or auto (dots for those families from 6B parameters, else none)",
    "train_file": "LLM tasks: training JSON in the LLM-Adapters format (e.g. commonsense_170k.json, math_10k.json); "
                  "default: the task's train.json under --data-dir",
    "cutoff": "LLM tasks: tokens per training example (LLM-Adapters' cutoff_len); longer ones are cut, without EOS",
    "train_on_inputs": "LLM tasks: loss over the whole prompt and response (true, LLM-Adapters' default) or over "
                       "the response only (false)",
    "num_beams": "LLM tasks: beams of the beam search that generates answers (1 = greedy; LLM-Adapters uses 4)",
    "max_new_tokens": "LLM tasks: tokens generated per answer; 0 = the task's (32 commonsense, 256 math)",
    "eval_batch_size": "LLM tasks: prompts generated per batch, divisible by the device count; 0 = --batch-size",
    "output_dir": "where results.json, metrics.jsonl, config.yaml, curves.png and checkpoints/ go",
    "data_dir": "local GLUE folder (download_glue_data.py layout) or HF parquet files; default: the hub. "
                "LLM tasks: LLM-Adapters' dataset/ folder (required: the test set comes from DIR/<task>/test.json)",
    "limit_train": "use only the first N training examples (0 = all)",
    "limit_eval": "evaluate on only the first N examples of each eval split (0 = all); alias --eval-limit",
    "eval_every": "evaluate every N steps; 0 = every epoch (LLM tasks: only at the end)",
    "log_every": "write a train line to metrics.jsonl every N steps",
    "save_every": "save a checkpoint every N steps (one is always saved at the end); 0 = only at the end",
    "resume": "continue from the latest checkpoint in --output-dir (true|false)",
    "mesh": "device mesh, e.g. data=2,fsdp=2,tensor=2; unnamed axes are 1 and data takes the rest "
            "(default: every device on data)",
    "print_sharding": "print the PartitionSpec of every param (true|false)",
    "coordinator_address": "host:port of process 0 for a multi-process run outside SLURM/MPI "
                           "(or ROCOFT_COORDINATOR_ADDRESS)",
    "num_processes": "number of processes of a multi-process run (or ROCOFT_NUM_PROCESSES)",
    "process_id": "this process's index in a multi-process run (or ROCOFT_PROCESS_ID)",
    "heartbeat_timeout": "seconds after which a silent process counts as dead and the others abort",
}


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per config field; defaults are None so we know which were given."""
    parser.add_argument("--config", help="YAML file of options; default configs/glue/<task>.yaml if it exists")
    for field in dataclasses.fields(TrainConfig):
        kind = {bool: _bool, int: int, float: float}.get(type(field.default), str)
        if field.name == "rank":
            kind = float
        flags = ["--" + field.name.replace("_", "-")] + (["--eval-limit"] if field.name == "limit_eval" else [])
        default = field.default
        parser.add_argument(*flags, type=kind, default=None, nargs="?" if kind is _bool else None,
                            const=True if kind is _bool else None,
                            help=f"{HELP[field.name]} (default: {default})")


def is_llm_task(task: str) -> bool:
    """True for the LLM-Adapters eval sets, False for GLUE and demo; an unknown name is an error listing both."""
    from train import glue, llm_data  # the task registries decide the names

    try:
        glue.get_task(task)
        return False
    except glue.DataError:
        pass
    try:
        llm_data.get_task(task)
        return True
    except glue.DataError:
        raise glue.DataError(f"unknown task {task!r}; valid tasks: {', '.join(glue.TASKS)}, "
                             f"{', '.join(llm_data.TASKS)}") from None


def default_config_file(task: str) -> Path | None:
    from train import glue, llm_data

    folder, name = ("llm", llm_data.get_task(task).name) if is_llm_task(task) else ("glue", glue.get_task(task).name)
    for path in (CONFIG_DIR / folder / f"{name}.yaml", CONFIG_DIR / f"{name}.yaml"):
        if path.is_file():
            return path
    return None


def resolve(args: argparse.Namespace) -> TrainConfig:
    """Defaults < config file < flags."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if getattr(args, f.name, None) is not None}
    task = given.get("task", TrainConfig.task)
    path = Path(args.config) if args.config else default_config_file(task)
    values: dict[str, Any] = {}
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"--config {path}: no such file")
        values = yaml.safe_load(path.read_text()) or {}
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown keys {unknown}; valid keys: {sorted(known)}")
    values.update(given)
    config = TrainConfig(**values)
    if config.mode != "random" and float(config.rank).is_integer():
        config.rank = int(config.rank)
    return config


def save(config: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
