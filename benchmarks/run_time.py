"""Benchmark of whole runs: one `train.run` recipe twice, on a cold then a warm compilation cache.

    python -m benchmarks.run_time                                   # the offline demo
    python -m benchmarks.run_time -- --model DIR --task rte --data-dir ../shared/data/glue --dtype bf16
    python -m benchmarks.run_time --shape bert-large-uncased --tokenizer MINILM_DIR -- --task rte \
        --data-dir ../shared/data/glue --dtype bf16

Arguments after ``--`` go to ``python -m train.run`` as they are. ``--shape`` (a `train.models` preset or an HF
config dir) with ``--tokenizer`` (a dir holding a real tokenizer, e.g. all-MiniLM-L6-v2's WordPiece) first
writes a random-init model dir of that shape (fp32 safetensors, no task head, as a hub checkpoint has) and
passes it as ``--model``: the timing of a large model without downloading it. Each run is its own process (as a user's
rerun is), with ``--compile-cache`` a fresh directory that only these two runs use, unless ``--cache-dir``
names one. Prints each run's results.json ``timing`` breakdown (seconds), the process's wall time (Python
start and imports included), and the ratio of the total to the steady-state stepping time (``train_steps``:
the loop less compiles, evaluation, checkpoints and reports). ``--json`` prints one JSON line instead.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from train import strict_json
from train import timing as timing_lib

REPO = Path(__file__).resolve().parents[1]
ROWS = (*timing_lib.PHASES, "other", "total")  # results.json's timing, in its order


def write_random_model(shape: str, tokenizer_dir: str, out: Path) -> Path:
    """``out``: a sequence-classification checkpoint of ``shape`` with N(0, 0.02) weights and no classifier
    (the run draws its own head, as for a hub encoder), plus the tokenizer files of ``tokenizer_dir``."""
    from transformers import AutoTokenizer

    from rocoft_jax import tree as tree_lib
    from train import models

    config = models.preset_config(shape)
    model, params = models.random_model_fast(config, "sequence-classification", "fp32")
    flat = {k: v for k, v in tree_lib.flatten(params).items() if not k.startswith("classifier/")}
    model.save_pretrained(out, params=tree_lib.unflatten(flat), safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def write_in_child(shape: str, tokenizer_dir: str, out: Path) -> Path:
    """`write_random_model` in a process of its own: on a GPU, JAX holds most of the memory until its process
    exits, so a model drawn in this process would leave the runs too little (XLA's autotuner then fails with
    CUDA out-of-memory errors)."""
    code = "import sys; from pathlib import Path; from benchmarks.run_time import write_random_model as w; "
    code += "w(sys.argv[1], sys.argv[2], Path(sys.argv[3]))"
    subprocess.run([sys.executable, "-c", code, shape, tokenizer_dir, str(out)], cwd=REPO, check=True)
    return out


def run_once(train_args: list[str], cache_dir: Path, output_dir: Path) -> dict:
    """One ``train.run`` process: ``{"wall", "timing", "steps", "metrics"}`` of its results.json; its stdout and
    stderr are kept in ``output_dir/run.log``."""
    argv = [sys.executable, "-m", "train.run", *train_args, "--compile-cache", str(cache_dir)]
    start = time.perf_counter()
    proc = subprocess.run([*argv, "--output-dir", str(output_dir)], cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"train.run exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    (output_dir / "run.log").write_text(proc.stdout + proc.stderr)
    results = json.loads((output_dir / "results.json").read_text())
    return {"wall": wall, "timing": results["timing"], "steps": results["steps"], "metrics": results["metrics"]}


def summary(run: dict) -> dict:
    """A run's seconds per row of `ROWS`, its wall time, compile counts and the total / train_steps ratio."""
    timing = run["timing"]
    seconds = {row: timing["compile"]["seconds"] if row == "compile" else timing[row] for row in ROWS}
    steps_time = timing["train_steps"]
    return {
        **seconds,
        "wall": round(run["wall"], 3),
        "steps": run["steps"],
        "programs": timing["compile"]["count"],
        "cache_hits": timing["compile"]["cache_hits"],
        "cache_misses": timing["compile"]["cache_misses"],
        "cache_prefetched": timing["compile"]["cache_prefetched"],
        "total_over_steps": timing["total"] / steps_time if steps_time > 0 else None,
    }


def table(cold: dict, warm: dict) -> str:
    lines = [f"{'seconds':<14}{'cold':>10}{'warm':>10}"]
    for row in (*ROWS, "wall"):
        lines.append(f"{row:<14}{cold[row]:>10.2f}{warm[row]:>10.2f}")
    for row in ("steps", "programs", "cache_hits", "cache_misses", "cache_prefetched"):
        lines.append(f"{row:<14}{cold[row]:>10}{warm[row]:>10}")
    ratio = lambda r: "-" if r is None else f"{r:.2f}"  # noqa: E731
    lines.append(f"{'total/steps':<14}{ratio(cold['total_over_steps']):>10}{ratio(warm['total_over_steps']):>10}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run_time", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cache-dir", help="the compilation cache of both runs (default: a fresh temporary dir)")
    parser.add_argument("--output-dir", help="where the runs' output dirs cold/ and warm/ go (default: temporary)")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    parser.add_argument("--shape", help="write a random-init model of this preset or config dir and run it")
    parser.add_argument("--tokenizer", help="with --shape: the dir of the real tokenizer to save beside it")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then train.run's arguments")
    args = parser.parse_args(argv)
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    if bool(args.shape) != bool(args.tokenizer):
        parser.error("--shape and --tokenizer go together")
    with tempfile.TemporaryDirectory(prefix="run_time.") as tmp:
        if args.shape:
            model_dir = write_in_child(args.shape, args.tokenizer, Path(tmp) / "model")
            train_args = [*train_args, "--model", str(model_dir)]
        cache = Path(args.cache_dir) if args.cache_dir else Path(tmp) / "cache"
        out = Path(args.output_dir) if args.output_dir else Path(tmp)
        cold = summary(run_once(train_args, cache, out / "cold"))
        warm = summary(run_once(train_args, cache, out / "warm"))
    if args.json:
        print(strict_json.dumps({"cold": cold, "warm": warm, "train_args": train_args}))
    else:
        print(table(cold, warm))
    return 0


if __name__ == "__main__":
    sys.exit(main())
