"""Benchmark of the real train steps of `train/`: compiled FLOPs, or time, tokens/s and memory.

    python -m benchmarks.step --model roberta-base --batch-size 8 --seq-len 128 --flops --json
    python -m benchmarks.step --model roberta-large --batch-size 32 --seq-len 512

Weights are random (shape presets of `train.models`, or any HF config dir), so
nothing is downloaded. The batch has no padding, so, as `train.run` does with
such batches, it carries no attention mask and attention runs unmasked
(`--keep-mask` times an all-ones mask instead, as padded batches run). Dropout
is off on both stacks unless `--dropout` sets the encoders' hidden and
attention dropout, as `train.run`'s default of 0.1 does. Each
timed method runs in its own subprocess, so peak memory is its own. When torch
is importable, the PyTorch peers (`benchmarks.torch_step`: the paper's
Algorithm 1, peft LoRA r=8 on q,v and on every RoCoFT target, eager and
torch.compile'd: `PEERS`) run on the same device too, and the ratios name the
fastest of them, with
PYTHONPATH cleared so they use the environment's own transformers (the JAX
side may need transformers<5 on PYTHONPATH while PyTorch uses 5.x).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from benchmarks.flops import useful_step_flops
from rocoft_jax import sharding
from rocoft_jax.fast import remat as remat_lib
from train import input_pipeline as pipeline
from train import methods as methods_lib
from train import models, strict_json
from train import step as step_lib

JAX_METHODS = ("rocoft", "full", "lora")


def head_of(args) -> str:
    """Decoder families train with the causal-LM loss; encoders as 2-way classifiers."""
    decoder = models.preset_config(args.model).model_type in models.CAUSAL_LM_TYPES
    return "causal-lm" if decoder or args.causal else "sequence-classification"


def build(args, method_name: str):
    """Model, method, state, frozen tree, batch and the compiled train step, as `train.run` builds them."""
    head = head_of(args)
    # Dropout (off by default, so attention can fuse) as the PyTorch peers get it.
    overrides = (
        {}
        if head == "causal-lm"
        else {"num_labels": 2, "hidden_dropout_prob": args.dropout, "attention_probs_dropout_prob": args.dropout}
    )
    config = models.preset_config(args.model, **overrides)
    # Llama-likes have no HF remat option: their layers are rematerialized by interception instead.
    intercepted = config.model_type in remat_lib.MODEL_TYPES
    if args.remat == "dots" and not intercepted:
        raise SystemExit("--remat dots needs a Llama/Mistral/Gemma model; use --remat full (HF's own) here")
    hf_remat = args.remat != "none" and not intercepted
    model, params = models.random_model_fast(config, head, args.dtype, remat=hf_remat)
    method = methods_lib.build_method(method_name, params, rank=args.rank, mode=args.mode, lora_rank=8, lora_alpha=16)
    trainable, frozen = method.split(params)
    del params
    tx, _ = step_lib.make_optimizer(1e-4, 1000, 10)
    devices = jax.devices()[: args.num_devices or None]
    mesh = sharding.make_mesh(sharding.parse_mesh("", len(devices)), devices)
    state, shardings = step_lib.init_sharded_state(trainable, tx, 0, mesh, method.mask.family, frozen)
    rng = np.random.default_rng(0)
    batch = {
        "input_ids": rng.integers(3, config.vocab_size, (args.batch_size, args.seq_len)).astype(np.int32),
        "attention_mask": np.ones((args.batch_size, args.seq_len), np.int32),
    }
    loss = "causal-lm" if head == "causal-lm" else "classification"
    if loss == "classification":
        batch["labels"] = rng.integers(0, 2, (args.batch_size,)).astype(np.int32)
    if not args.keep_mask:  # as train.run's host drops it: attention then runs unmasked
        batch = pipeline.drop_full_mask(batch, jax.process_count())
    train_fn, _ = step_lib.compile_steps(
        model,
        method,
        tx,
        loss,
        shardings,
        attention=methods_lib.resolve_attention(args.attention),
        remat=args.remat if intercepted and args.remat != "none" else None,
    )
    frozen, batch = jax.device_put(frozen, shardings.frozen), jax.device_put(batch, shardings.batch)
    return config, head, method, state, frozen, batch, train_fn


def compiled_flops(args, method_name: str) -> float:
    _, _, _, state, frozen, batch, train_fn = build(args, method_name)
    cost = train_fn.lower(state, frozen, batch).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def _profile(compiled, state, frozen, batch, path: str) -> None:
    """Traces 3 steps and keeps only the Chrome trace, as ``path`` (a .trace.json.gz file)."""
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            for _ in range(3):
                state, metrics = compiled(state, frozen, batch)
            jax.block_until_ready(metrics)
        shutil.move(next(Path(tmp).rglob("*.trace.json.gz")), path)


def time_method(args, method_name: str) -> dict:
    config, head, method, state, frozen, batch, train_fn = build(args, method_name)
    t0 = time.perf_counter()
    compiled = train_fn.lower(state, frozen, batch).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready(metrics)
    # Steady state, as a training loop runs: each step is queued before waiting on the one before,
    # and a step's time is the interval between consecutive completions.
    state, metrics = compiled(state, frozen, batch)
    done = []
    for _ in range(args.steps + 1):
        state, queued = compiled(state, frozen, batch)
        jax.block_until_ready(metrics)
        done.append(time.perf_counter())
        metrics = queued
    jax.block_until_ready(metrics)
    median = statistics.median(b - a for a, b in zip(done, done[1:]))
    if args.profile:
        _profile(compiled, state, frozen, batch, args.profile)
    stats = jax.devices()[0].memory_stats() or {}
    num_devices = args.num_devices or jax.device_count()
    useful = useful_step_flops(config, args.batch_size, args.seq_len, head)
    return {
        "method": f"jax-{method_name}" + ("" if args.remat == "none" else f"-remat-{args.remat}"),
        "num_devices": num_devices,
        "attention_mask": args.keep_mask,
        "step_ms": 1e3 * median,
        "tokens_per_s": args.batch_size * args.seq_len / median,
        "tokens_per_s_per_device": args.batch_size * args.seq_len / median / num_devices,
        "peak_gib": stats.get("peak_bytes_in_use", float("nan")) / 2**30,
        "useful_flop_util": useful / median / args.peak / num_devices,
        "compile_s": compile_s,
        "num_trainable": method.mask.num_trainable,
        "loss": float(metrics["loss"]),
    }


# The PyTorch peers timed by default: the paper's Algorithm 1 and peft LoRA on q,v and on every target
# (the kernels RoCoFT slices), eager and torch.compile'd; ratios are also given against the fastest.
PEERS = ("algorithm1", "algorithm1+compile", "lora", "lora+compile", "lora-all+compile")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", default="roberta-base", help=f"shape preset ({', '.join(models.PRESETS)}) or HF config dir"
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    p.add_argument("--rank", type=int, default=3)
    p.add_argument("--mode", choices=("row", "column"), default="row")
    p.add_argument("--causal", action="store_true", help="causal-LM loss for an HF config dir")
    p.add_argument(
        "--attention",
        default="auto",
        help="auto (cuDNN on GPU), plain, xla, cudnn or cudnn-lengths "
        "(padding as key lengths: right-padded batches only)",
    )
    p.add_argument(
        "--keep-mask",
        action="store_true",
        help="time the step with an all-ones attention mask, as padded batches run (default: no mask, "
        "as train.run's batches without padding)",
    )
    p.add_argument(
        "--dropout",
        type=float,
        default=0.0,
        help="hidden and attention dropout of encoder models, both stacks (train.run's default: 0.1)",
    )
    p.add_argument(
        "--remat",
        choices=("none", "full", "dots"),
        default="none",
        help="recompute each layer in the backward pass: full, or all but the projections (dots, "
        "Llama-likes; see rocoft_jax.fast.remat)",
    )
    p.add_argument(
        "--num-devices",
        type=int,
        default=0,
        help="data-parallel over the first N devices (default: all); --batch-size is the global batch",
    )
    p.add_argument("--profile", help="also write a Chrome trace (.trace.json.gz) of 3 steps to this file")
    p.add_argument(
        "--flops",
        action="store_true",
        help="report compiled FLOPs of the rocoft and full steps (compiled for the CPU on any machine)",
    )
    p.add_argument("--methods", default="rocoft,full", help=f"JAX methods to time, from {','.join(JAX_METHODS)}")
    p.add_argument(
        "--peers",
        default=",".join(PEERS),
        help="PyTorch peers to time (empty: none): algorithm1, lora (q,v), lora-all (every target) or full, "
        "each eager or with +compile (torch.compile)",
    )
    p.add_argument("--steps", type=int, default=20, help="timed steps after warm-up")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak", type=float, default=790e12, help="bf16 peak FLOP/s for utilization")
    p.add_argument("--json", action="store_true", help="print one JSON object only")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _subprocess_json(cmd: list[str], label: str, env=None) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {"method": label, "error": (out.stderr.strip().splitlines() or ["failed"])[-1][:300]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def peer_args(spec: str) -> list[str]:
    """`benchmarks.torch_step` arguments of a peer spec such as "lora-all+compile"."""
    name, *flags = spec.split("+")
    base = {"algorithm1": ["--peer", "algorithm1"], "lora": ["--peer", "lora"], "full": ["--peer", "full"]}
    base["lora-all"] = ["--peer", "lora", "--lora-targets", "all"]
    if name not in base or any(flag != "compile" for flag in flags):
        raise SystemExit(f"unknown peer {spec!r}; choose from {', '.join(base)}, each optionally +compile")
    return base[name] + (["--compile"] if flags else [])


def _ratios(rows: list[dict]) -> dict[str, Any]:
    """RoCoFT against each peer and against the fastest PyTorch peer: ratios of step time (lower is better)
    and tokens/s (higher is better), and the peak-memory difference to that fastest peer."""
    by = {r["method"]: r for r in rows if "step_ms" in r}
    ours = next((r for name, r in by.items() if name.startswith("jax-rocoft")), None)
    if ours is None:
        return {}
    out: dict[str, Any] = {}
    for peer, row in by.items():
        if peer.startswith("torch-") or peer == "jax-full":
            out[f"rocoft_over_{peer}_time"] = ours["step_ms"] / row["step_ms"]
    torch_rows = {name: r for name, r in by.items() if name.startswith("torch-")}
    if torch_rows:
        name = min(torch_rows, key=lambda n: torch_rows[n]["step_ms"])
        fastest = torch_rows[name]
        out["fastest_peer"] = name
        out["rocoft_over_fastest_peer_time"] = ours["step_ms"] / fastest["step_ms"]
        out["rocoft_over_fastest_peer_tokens"] = ours["tokens_per_s"] / fastest["tokens_per_s"]
        if ours.get("peak_gib") is not None and fastest.get("peak_gib") is not None:
            out["rocoft_minus_fastest_peer_peak_gib"] = ours["peak_gib"] - fastest["peak_gib"]
    return out


def _table(rows: list[dict]) -> str:
    cols = (
        "method",
        "num_devices",
        "step_ms",
        "tokens_per_s",
        "tokens_per_s_per_device",
        "peak_gib",
        "useful_flop_util",
        "compile_s",
    )
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    for r in rows:
        lines.append(" | ".join(f"{r[c]:.3g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols))
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(strict_json.dumps(time_method(args, args.worker)))
        return
    if args.flops:
        # XLA's cost analysis counts its own ops only: on a GPU, cuDNN's attention and our Pallas and
        # Mosaic kernels are custom calls it leaves out. On the CPU every op is XLA's.
        jax.config.update("jax_platforms", "cpu")
        rocoft, full = compiled_flops(args, "rocoft"), compiled_flops(args, "full")
        result = {
            "model": args.model,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "rocoft_step_flops": rocoft,
            "full_step_flops": full,
            "ratio": rocoft / full,
        }
        print(strict_json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))
        return
    rows = []
    argv = list(sys.argv[1:] if argv is None else argv)
    for name in filter(None, args.methods.split(",")):
        if name not in JAX_METHODS:
            raise SystemExit(f"unknown method {name!r}; choose from {', '.join(JAX_METHODS)}")
        rows.append(_subprocess_json([sys.executable, "-m", "benchmarks.step", *argv, "--worker", name], f"jax-{name}"))
    torch_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for peer in filter(None, args.peers.split(",")):
        row = _subprocess_json(
            [
                sys.executable,
                "-m",
                "benchmarks.torch_step",
                *peer_args(peer),
                "--model",
                args.model,
                "--batch-size",
                str(args.batch_size),
                "--seq-len",
                str(args.seq_len),
                "--rank",
                str(args.rank),
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                "--dtype",
                args.dtype,
                "--dropout",
                str(args.dropout),
            ],
            f"torch-{peer}",
            env=torch_env,
        )
        rows.append({**row, "method": f"torch-{peer}"})
    for row in rows:
        if "step_ms" in row and "useful_flop_util" not in row:
            useful = useful_step_flops(models.preset_config(args.model), args.batch_size, args.seq_len, head_of(args))
            row["useful_flop_util"] = useful / (row["step_ms"] / 1e3) / args.peak
    result = {
        "model": args.model,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "dropout": args.dropout,
        "device": jax.devices()[0].device_kind,
        "results": rows,
        "ratios": _ratios(rows),
    }
    ratios = "\n".join(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}" for k, v in result["ratios"].items())
    print(strict_json.dumps(result) if args.json else f"{_table(rows)}\n{ratios}")


if __name__ == "__main__":
    main()
