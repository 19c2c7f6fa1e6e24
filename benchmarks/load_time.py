"""Benchmark of loading a causal LM checkpoint as `train.run` does: read, convert, cast and place the weights.

    python -m benchmarks.load_time --shape llama-2-7b            # a random Llama-2-7B-shape checkpoint
    python -m benchmarks.load_time --model DIR --dtype bf16      # a checkpoint of your own

``--shape`` (a `train.models` Llama-family preset) first writes a checkpoint as the hub stores Llama-2: one
PyTorch-format safetensors file of fp16 weights (zeros: the values do not change the time) and its
config.json. Each load runs in a fresh process (as a run's does, with the file in the page cache after the
first), timing ``train.models.pretrained_source(...).load()`` until the arrays are on the device. Prints one
JSON line: the seconds of each load, the bytes (and GiB) loaded and the device.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_CHILD = """
import json, sys, time
import jax
from train import models
source = models.pretrained_source(sys.argv[1], "causal-lm", sys.argv[2])
start = time.perf_counter()
params = jax.block_until_ready(source.load())
seconds = time.perf_counter() - start
leaves = jax.tree.leaves(params)
print(json.dumps({"seconds": seconds, "bytes": sum(x.nbytes for x in leaves), "device": str(leaves[0].device)}))
"""


def write_checkpoint(shape: str, out: Path) -> Path:
    """``out``: config.json and one PyTorch-format model.safetensors (fp16 zeros) of the Llama-family ``shape``.

    The PyTorch names and layouts are the inverse of HF's conversion: a Flax ``kernel`` (in, out) is a
    ``weight`` (out, in), an ``embedding`` a ``weight``."""
    import numpy as np
    from safetensors.numpy import save_file

    from rocoft_jax import tree as tree_lib
    from train import models

    config = models.preset_config(shape)
    if config.model_type != "llama":
        raise SystemExit(f"--shape {shape}: not a Llama-family preset; give a Llama preset or --model DIR")
    layout = models.unbound_model(config, "causal-lm", "fp32", remat=False).params_shape_tree
    tensors = {}
    for path, leaf in tree_lib.flatten(layout).items():
        *prefix, name = path.split("/")
        shape_ = tuple(reversed(leaf.shape)) if name == "kernel" else leaf.shape
        tensors[".".join([*prefix, "weight" if name in ("kernel", "embedding") else name])] = np.zeros(
            shape_, np.float16
        )
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)
    return out


def load_once(model_dir: Path, dtype: str) -> dict:
    """One load in a fresh process: ``{"seconds", "bytes", "device"}``."""
    run = subprocess.run(
        [sys.executable, "-c", _CHILD, str(model_dir), dtype], cwd=REPO, capture_output=True, text=True, check=False
    )
    if run.returncode != 0:
        raise SystemExit(f"loading {model_dir} failed: {run.stderr.strip().splitlines()[-1]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.load_time", description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--shape", help="a Llama-family preset of train.models, written as a random checkpoint")
    which.add_argument("--model", help="a local HF model dir")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--repeat", type=int, default=2, help="loads, each in a fresh process")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rocoft_load_") as scratch:
        model_dir = Path(args.model) if args.model else write_checkpoint(args.shape, Path(scratch) / args.shape)
        loads = [load_once(model_dir, args.dtype) for _ in range(args.repeat)]
    print(
        json.dumps(
            {
                "model": args.model or args.shape,
                "dtype": args.dtype,
                "seconds": [round(x["seconds"], 3) for x in loads],
                "bytes": loads[0]["bytes"],
                "gib": round(loads[0]["bytes"] / 2**30, 3),
                "device": loads[0]["device"],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
