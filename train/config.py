"""The options of `train.run`: each declared once, then resolved as defaults < a YAML file < flags.

``--task rte`` reads ``configs/glue/rte.yaml`` unless ``--config`` names another file; a file may
extend a base file (`train.config_files`). `resolve` checks every value, wherever it came from,
before any work starts: a bad one is a one-line `ConfigError` naming the flag, the value and the
valid range.

``rank`` is the rows or columns per kernel. With ``--mode random`` each entry is trained with
``probability``; ``--rank p`` stands for ``--probability p`` there when given as a flag without
``--probability``, or when set by a file that also sets random mode but no probability.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path
from typing import Any

import yaml

from train import config_files
from train import options as opt
from train.errors import ConfigError
from train.options import above, at_least, between, option
from train.tasks import lookup

GROUPS = ("model and method", "optimization", "data", "evaluation", "checkpoints and run control", "distributed")
MODEL, OPTIM, DATA, EVAL, RUN, DIST = GROUPS
# The choices below are the library's own (rocoft_jax.mask.MODES, rocoft_jax.selection.STRATEGIES,
# train.methods, train.models.DTYPES, rocoft_jax.sharding.AXES); written out so parsing imports no JAX.
METHODS = ("rocoft", "full", "lora", "bitfit")
MODES = ("row", "column", "random")
STRATEGIES = ("first", "random", "max", "min", "mixed")
WANDA_STRATEGIES = ("max", "min", "mixed")
DTYPES = ("fp32", "bf16")
LR_SCHEDULES = ("cosine", "linear", "constant")
ATTENTION = ("auto", "plain", "xla", "cudnn", "cudnn-lengths")
REMAT = ("auto", "none", "full", "dots")
MESH_AXES = ("data", "fsdp", "tensor")
MAX_TOKENS = 2**20  # more positions than any model holds; a larger length overflows the padding arrays
TOKENS_NOTE = "room for the special tokens and some text, within any model's positions"
ON_NONFINITE = ("stop", "skip")  # train.nonfinite.POLICIES


def check_mesh(text: str) -> None:
    """The syntax of ``--mesh`` (whether it fits the devices is checked once they are known)."""
    seen = set()
    for part in filter(None, text.split(",")):
        name, _, size = part.partition("=")
        if name not in MESH_AXES or not size.isdigit() or int(size) < 1:
            raise ValueError(
                f"bad entry {part!r}; write e.g. data=2,fsdp=2,tensor=2 with axes "
                f"{', '.join(MESH_AXES)}, each of size at least 1"
            )
        if name in seen:
            raise ValueError(f"axis {name} is given twice")
        seen.add(name)


def check_directory(text: str) -> None:
    """A directory to write to is named: an empty one would write into the current directory unasked."""
    if not text.strip():
        raise ValueError("must name a directory")


@dataclasses.dataclass
class TrainConfig:
    """Every option of `train.run`. A field is a YAML key and a flag (``batch_size``: ``--batch-size``);
    the field order is config.yaml's key order. Built in code, a config is not checked: call `check`."""

    model: str = option(
        "tiny",
        "HF hub id or local model dir (flax_model.msgpack, model.safetensors or pytorch_model.bin); "
        "'tiny' is a random-init 2-layer RoBERTa for the offline demo",
        group=MODEL,
    )
    task: str = option(
        "demo",
        "cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, or demo (generated offline); or an LLM task, "
        "trained as a causal LM and scored by generation: boolq, piqa, siqa, hellaswag, winogrande, arc-e, arc-c, "
        "obqa, multiarith, gsm8k, addsub, singleeq, svamp, aqua; or extractive question answering: squad (v1.1), "
        "squad_v2 (HF Flax *ForQuestionAnswering: BERT, RoBERTa, XLM-R, ELECTRA, DistilBERT, BART; DeBERTa-v3, "
        "the paper's QA model, has no Flax class); or abstractive summarization, trained as a seq2seq LM and "
        "scored by ROUGE: xsum, cnn_dailymail (BART, mBART, Pegasus, Marian, Blenderbot)",
        group=MODEL,
    )
    method: str = option(
        "rocoft", "rocoft (rows/columns), full, lora, or bitfit (biases + head)", group=MODEL, choices=METHODS
    )
    mode: str = option(
        "row",
        "row (output units, Flax kernel[:, i]), column (input features, kernel[i, :]) or "
        "random entries (see --probability)",
        group=MODEL,
        choices=MODES,
    )
    strategy: str = option(
        "first",
        "rows/columns to train: first, random, or Wanda-scored max, min, mixed",
        group=MODEL,
        choices=STRATEGIES,
    )
    rank: int | float = option(
        3,
        "rows/columns per kernel (--mode row or column); with --mode random, an alias of --probability",
        group=MODEL,
        kind=opt.NUMBER,
    )
    probability: float | None = option(
        None,
        "--mode random: the probability p that each kernel entry is trained",
        group=MODEL,
        kind=float,
        range=between(0, 1, low_open=True),
    )
    lora_rank: int = option(8, "LoRA rank (method lora)", group=MODEL, range=at_least(1))
    lora_alpha: float = option(16.0, "LoRA alpha (method lora)", group=MODEL, range=above(0))
    adapter: str | None = option(
        None,
        "start from an adapter dir (python -m train.export --format adapter): its method, selection, slices "
        "and trained leaves replace --method/--mode/--rank/--strategy; --model must be its base",
        group=MODEL,
    )
    lr: float = option(2e-3, "peak learning rate", group=OPTIM, range=above(0))
    epochs: float = option(3, "training epochs (ignored when --max-steps > 0)", group=OPTIM, kind=float, range=above(0))
    max_steps: int = option(0, "total optimizer steps; 0 = from --epochs", group=OPTIM, range=at_least(0))
    batch_size: int = option(32, "global batch size, divisible by the device count", group=OPTIM, range=at_least(1))
    max_length: int = option(
        128,
        "tokens per example; shorter ones are padded so the step never recompiles",
        group=DATA,
        range=between(8, MAX_TOKENS),
        note=TOKENS_NOTE,
    )
    bucket: bool = option(
        True,
        "trim each batch's padding to a length bucket (GLUE: chosen from the data; other tasks: powers of two); "
        "false pads every batch to --max-length",
        group=DATA,
    )
    warmup_steps: int = option(100, "linear warmup steps", group=OPTIM, range=at_least(0))
    weight_decay: float = option(
        0.0,
        "AdamW decoupled weight decay (biases and norms of fully trained leaves are exempt)",
        group=OPTIM,
        range=at_least(0),
    )
    max_grad_norm: float = option(1.0, "global gradient-norm clip; 0 disables", group=OPTIM, range=at_least(0))
    lr_schedule: str = option("cosine", "cosine, linear or constant after warmup", group=OPTIM, choices=LR_SCHEDULES)
    dropout: float = option(
        0.1, "hidden and attention dropout of the model", group=OPTIM, range=between(0, 1, high_open=True)
    )
    train_bias: bool = option(False, "also train the biases of the targeted layers", group=MODEL)
    seed: int = option(
        0, "seeds selection, head init, data order and dropout", group=OPTIM, range=between(0, 2**32 - 1)
    )
    dtype: str = option(
        "fp32",
        "fp32, or bf16 (frozen weights and compute in bf16; trained values stay fp32)",
        group=MODEL,
        choices=DTYPES,
    )
    attention: str = option(
        "auto",
        "auto (cuDNN fused attention on GPUs, padding as key lengths; HF's own elsewhere), plain, xla, "
        "cudnn or cudnn-lengths; an encoder's active attention dropout runs in Pallas kernels on GPUs, a "
        "decoder's in HF's attention",
        group=MODEL,
        choices=ATTENTION,
    )
    calibration_batches: int = option(
        8, "training batches that score rows/columns for the Wanda strategies", group=MODEL, range=at_least(1)
    )
    grad_accum: int = option(
        1,
        "LLM and summarization tasks: micro-batches of --batch-size rows per optimizer step, accumulated "
        "inside the step (equal to one batch of grad_accum * batch_size rows)",
        group=OPTIM,
        range=at_least(1),
    )
    remat: str = option(
        "auto",
        "recompute each decoder layer in the backward pass: none, full, dots "
        "(Llama/Mistral/Gemma only; see rocoft_jax.fast.remat), or auto (dots for those families "
        "from 6B parameters, else none)",
        group=MODEL,
        choices=REMAT,
    )
    train_file: str | None = option(
        None,
        "LLM tasks: training JSON in the LLM-Adapters format (e.g. "
        "commonsense_170k.json, math_10k.json); default: the task's train.json under "
        "--data-dir",
        group=DATA,
    )
    cutoff: int = option(
        256,
        "LLM tasks: tokens per training example (LLM-Adapters' cutoff_len); longer ones are cut, without EOS",
        group=DATA,
        range=between(8, MAX_TOKENS),
        note=TOKENS_NOTE,
    )
    train_on_inputs: bool = option(
        True,
        "LLM tasks: loss over the whole prompt and response (true, "
        "LLM-Adapters' default) or over the response only (false)",
        group=DATA,
    )
    num_beams: int = option(
        1,
        "LLM and summarization tasks: beams of the beam search that generates answers (1 = greedy; "
        "LLM-Adapters uses 4, BART 6 on XSum and 4 on CNN/DailyMail)",
        group=EVAL,
        range=at_least(1),
    )
    max_new_tokens: int = option(
        0,
        "LLM and summarization tasks: tokens generated per answer; 0 = the task's (32 commonsense, 256 math, "
        "62 xsum, 142 cnn_dailymail)",
        group=EVAL,
        range=at_least(0),
    )
    eval_batch_size: int = option(
        0,
        "LLM and summarization tasks: prompts generated per batch, divisible by the device count; 0 = --batch-size",
        group=EVAL,
        range=at_least(0),
    )
    label_smoothing: float = option(
        0.1,
        "summarization: label smoothing of the summary tokens' loss (BART's recipe: 0.1)",
        group=OPTIM,
        kind=float,
        range=between(0, 1, high_open=True),
    )
    max_source_length: int = option(
        1024,
        "summarization: document tokens per example, EOS included; longer documents are cut",
        group=DATA,
        range=between(8, MAX_TOKENS),
        note=TOKENS_NOTE,
    )
    max_target_length: int = option(
        128,
        "summarization: summary tokens per training example, EOS included; longer summaries are cut",
        group=DATA,
        range=between(8, MAX_TOKENS),
        note=TOKENS_NOTE,
    )
    text_column: str | None = option(
        None, "summarization: the documents' column (default: document for xsum, article for cnn_dailymail)", group=DATA
    )
    summary_column: str | None = option(
        None,
        "summarization: the summaries' column (default: summary for xsum, highlights for cnn_dailymail)",
        group=DATA,
    )
    eval_split: str = option(
        "test", "summarization: the split scored by ROUGE", group=EVAL, choices=("validation", "test")
    )
    min_new_tokens: int = option(
        0, "summarization: tokens generated before a summary may end (EOS)", group=EVAL, range=at_least(0)
    )
    length_penalty: float = option(
        1.0,
        "summarization: beam search ranks a finished beam by its log-probability / length ** length_penalty",
        group=EVAL,
        kind=float,
    )
    no_repeat_ngram_size: int = option(
        0, "summarization: no n-gram of this many tokens is generated twice (0 = off)", group=EVAL, range=at_least(0)
    )
    doc_stride: int = option(
        128,
        "SQuAD: tokens shared by consecutive windows of a context longer than --max-length; less than the "
        "context tokens a window holds",
        group=DATA,
        range=at_least(0),
    )
    n_best: int = option(
        20, "SQuAD: highest start and end logits per window that form candidate spans", group=EVAL, range=at_least(1)
    )
    max_answer_length: int = option(30, "SQuAD: longest answer span, in tokens", group=EVAL, range=at_least(1))
    null_threshold: float = option(
        0.0,
        "SQuAD v2.0: predict no answer when the null score exceeds the best span's score by more than this",
        group=EVAL,
        kind=float,
    )
    output_dir: str = option(
        "runs/default",
        "where results.json, metrics.jsonl, config.yaml, curves.png and checkpoints/ go",
        group=RUN,
        check=check_directory,
    )
    data_dir: str | None = option(
        None,
        "local GLUE folder (download_glue_data.py layout) or HF parquet files; "
        "default: the hub. LLM tasks: LLM-Adapters' dataset/ folder (required: the test "
        "set comes from DIR/<task>/test.json). Summarization: train, validation and test .jsonl, .csv or "
        ".parquet files. SQuAD: the official train-v1.1.json/dev-v1.1.json or "
        "train-v2.0.json/dev-v2.0.json, or HF parquet files",
        group=DATA,
    )
    limit_train: int = option(0, "use only the first N training examples (0 = all)", group=DATA, range=at_least(0))
    limit_eval: int = option(
        0,
        "evaluate on only the first N examples of each eval split (0 = all)",
        group=EVAL,
        range=at_least(0),
        aliases=("--eval-limit",),
    )
    eval_every: int = option(
        0, "evaluate every N steps; 0 = every epoch (LLM tasks: only at the end)", group=EVAL, range=at_least(0)
    )
    log_every: int = option(10, "write a train line to metrics.jsonl every N steps", group=RUN, range=at_least(1))
    save_every: int = option(
        0,
        "save a checkpoint every N steps (one is always saved at the end); 0 = only at the end",
        group=RUN,
        range=at_least(0),
    )
    resume: bool = option(False, "continue from the latest checkpoint in --output-dir", group=RUN)
    eval_only: bool = option(
        False, "evaluate without training (with --adapter, as does an explicit --max-steps 0)", group=RUN
    )
    on_nonfinite: str = option(
        "stop",
        "a step whose loss or gradient norm is NaN or infinite: stop (exit code 3; checkpoints never hold "
        "such values) or skip its update (counted in metrics.jsonl and results.json)",
        group=RUN,
        choices=ON_NONFINITE,
    )
    max_nonfinite: int = option(
        10,
        "--on-nonfinite skip: consecutive skipped steps that stop the run (exit code 3)",
        group=RUN,
        range=at_least(1),
    )
    compile_cache: str = option(
        "auto",
        "JAX's persistent compilation cache, so a rerun skips compiling: a directory, off, or auto "
        "($ROCOFT_COMPILE_CACHE if set, else $XDG_CACHE_HOME/rocoft_jax/jax-compile-cache, ~/.cache by default)",
        group=RUN,
        check=check_directory,
    )
    mesh: str = option(
        "",
        "device mesh, e.g. data=2,fsdp=2,tensor=2; unnamed axes are 1 and data takes the "
        "rest; empty: every device on data",
        group=DIST,
        check=check_mesh,
    )
    print_sharding: bool = option(False, "print the PartitionSpec of every param", group=DIST)
    coordinator_address: str | None = option(
        None,
        "host:port of process 0 for a multi-process run outside SLURM/MPI (or ROCOFT_COORDINATOR_ADDRESS)",
        group=DIST,
    )
    num_processes: int = option(
        0,
        "number of processes of a multi-process run (or ROCOFT_NUM_PROCESSES); 0 = from the environment",
        group=DIST,
        range=at_least(0),
    )
    process_id: int = option(
        -1,
        "this process's index in a multi-process run (or ROCOFT_PROCESS_ID); -1 = from the environment",
        group=DIST,
        range=at_least(-1),
    )
    heartbeat_timeout: int = option(
        60, "seconds after which a silent process counts as dead and the others abort", group=DIST, range=at_least(1)
    )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def total_steps(self, per_epoch: int) -> int:
        """The run's optimizer steps: 0 with --eval-only, else --max-steps, else --epochs of ``per_epoch``."""
        if self.eval_only:
            return 0
        return self.max_steps or max(1, math.ceil(self.epochs * per_epoch))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config`` and one flag per `TrainConfig` option, in help groups; parse, then `resolve`."""
    parser.add_argument(
        "--config",
        help="YAML file of options (may name a 'base: FILE' it extends); default: the task's file under configs/",
    )
    opt.add_arguments(parser, TrainConfig, GROUPS)


def make_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The parser of `train.run`; a parse error raises `ConfigError`."""
    parser = opt.new_parser("python -m train.run", description)
    add_arguments(parser)
    return parser


def parse(argv=None, description: str | None = None) -> TrainConfig:
    """The checked config of a `train.run` command line."""
    return resolve(make_parser(description).parse_args(argv))


def resolve(args: argparse.Namespace) -> TrainConfig:
    """Defaults < config file < flags, every value checked; raises `ConfigError` (or `DataError` for a task)."""
    flags = opt.given(args, TrainConfig)
    task = flags.get("task", TrainConfig.task)
    path = Path(args.config) if getattr(args, "config", None) else config_files.default_config_file(str(task))
    if path is not None and not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    values, where = config_files.load_file(path, TrainConfig) if path is not None else ({}, {})
    file_mode = values.get("mode")
    values.update(flags)
    for name in flags:
        where.pop(name, None)
    values = opt.validate(TrainConfig, values, where)
    # --rank p means --probability p in random mode, unless the probability comes from a source as specific
    if values.get("mode", TrainConfig.mode) == "random" and "rank" in values:
        if "rank" in flags:
            alias = "probability" not in flags
        else:  # a file's rank is its probability only when the file chose random mode too
            alias = "probability" not in values and file_mode == "random"
        if alias:
            spec = opt.specs(TrainConfig)["probability"]
            if values["rank"] not in spec.range:
                raise opt.fail(
                    "rank",
                    values["rank"],
                    f"with --mode random, --rank is the probability p; must be {spec.range} (or give --probability)",
                    where.get("rank"),
                )
            values["probability"] = float(values["rank"])
    if values.get("adapter") and "max_steps" in flags and values.get("max_steps") == 0:
        values["eval_only"] = True  # an explicit --max-steps 0 with --adapter evaluates the adapter as saved
    config = TrainConfig(**values)
    check(config, where)
    return config


def check(config: TrainConfig, where: dict[str, str] | None = None) -> None:
    """Every option's type and range, the checks that tie options together, and the task name;
    ``where[name]`` is the file a value came from. Raises `ConfigError`, or `DataError` for the task."""
    where = where or {}
    opt.validate(TrainConfig, config.to_dict(), where)
    lookup(config.task)
    if config.adapter is not None and not Path(config.adapter).is_dir():
        raise opt.fail(
            "adapter",
            config.adapter,
            "no such directory; pass one written by train.export --format adapter",
            where.get("adapter"),
        )
    if config.eval_only and config.resume:
        raise ConfigError("--eval-only trains nothing, so there is nothing to --resume; drop one of them")
    if config.mode == "random":
        if config.method == "rocoft" and config.probability is None:
            raise ConfigError(
                "--mode random needs --probability p in (0, 1], the chance that each kernel entry is trained"
            )
        if config.strategy in WANDA_STRATEGIES:
            raise opt.fail(
                "strategy",
                config.strategy,
                "mode random draws entries at random; Wanda strategies need --mode row or column",
                where.get("strategy"),
            )
    elif isinstance(config.rank, bool) or not isinstance(config.rank, int) or config.rank < 1:
        raise opt.fail(
            "rank",
            config.rank,
            f"rank must be a positive integer (the {config.mode}s trained per kernel)",
            where.get("rank"),
        )


def save(config: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
