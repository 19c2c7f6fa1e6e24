"""Mixed-adapter inference against one merged model, on the same device and weights.

    python -m benchmarks.mixed_adapters --model roberta-large --batch-size 64 --seq-len 128 --adapters 8
    python -m benchmarks.mixed_adapters --model llama-2-7b --generate --batch-size 16 --seq-len 128 \\
        --new-tokens 64 --adapters 8

N RoCoFT adapters of one random-init base (r rows or columns of every target, random indices, values
moved as training moves them) are stacked by `rocoft_jax.mixed`; a batch whose rows cycle through the N
adapters runs once per timed iteration, against the same batch through one adapter's merged params (the
throughput a single-task deployment gets). Encoders time classification logits; ``--generate`` times
greedy decoding through HF's KV cache. Prints the medians and mixed/merged throughput two ways: one
call at a time (each waits for its result: host dispatch is on the clock) and pipelined (``--steps``
calls dispatched back to back, then one wait: what a serving loop that keeps the device busy gets).
``--profile`` adds each side's kernel time, kernel count and host dispatch time per call.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import rocoft_jax
from benchmarks import kernels
from rocoft_jax import adapters as adapters_lib
from rocoft_jax import mixed
from train import models, strict_json


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="roberta-large", help="a shape preset of train.models or an HF config dir")
    p.add_argument("--generate", action="store_true", help="greedy decoding of a causal LM instead of logits")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=128, help="tokens per row (the prompt, with --generate)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per row with --generate")
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--rank", type=int, default=3)
    p.add_argument("--mode", choices=("row", "column", "both"), default="both", help="both: alternate per adapter")
    p.add_argument("--dtype", choices=tuple(models.DTYPES), default="bf16", help="the base weights' dtype")
    p.add_argument("--steps", type=int, default=10, help="timed iterations after one warm-up")
    p.add_argument("--profile", action="store_true", help="add each side's device kernels (benchmarks.kernels)")
    p.add_argument("--json", action="store_true", help="print one JSON object only")
    return p.parse_args(argv)


def make_adapters(params, count: int, rank: int, mode: str) -> list:
    """``count`` adapters with different random indices; values perturbed as training would move them."""
    out = []
    for i in range(count):
        adapter_mode = mode if mode != "both" else ("row", "column")[i % 2]
        mask = rocoft_jax.mask_params(params, rank, adapter_mode, strategy="random", seed=i)
        trainable, frozen = rocoft_jax.split(params, mask)
        rng = np.random.default_rng(i)
        trainable = jax.tree.map(
            lambda v, rng=rng: np.asarray(v, np.float32) + 0.02 * rng.normal(size=v.shape).astype(np.float32), trainable
        )
        fingerprint = adapters_lib.fingerprint(frozen)
        out.append(adapters_lib.from_trainable(trainable, mask, base_fingerprint=fingerprint, base_model="random"))
    return out


def median_seconds(run, steps: int) -> float:
    """Median seconds of one call waited for on its own."""
    jax.block_until_ready(run())  # compile and warm up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def pipelined_seconds(run, steps: int) -> float:
    """Seconds per call when ``steps`` calls are dispatched back to back and waited for once."""
    jax.block_until_ready(run())
    start = time.perf_counter()
    jax.block_until_ready([run() for _ in range(steps)])
    return (time.perf_counter() - start) / steps


def main(argv=None) -> dict:
    args = parse_args(argv)
    head = "causal-lm" if args.generate else "sequence-classification"
    overrides = {} if args.generate else {"num_labels": 2}
    config = models.preset_config(args.model, **overrides)
    model, params = models.random_model_fast(config, head, args.dtype)
    adapters = make_adapters(params, args.adapters, args.rank, args.mode)
    stacked = mixed.stack(params, adapters)
    merged = jax.tree.map(
        lambda x: jnp.asarray(x, models.DTYPES[args.dtype]), adapters_lib.merge_adapter(params, adapters[0])
    )

    rng = np.random.default_rng(0)
    ids = rng.integers(3, config.vocab_size, (args.batch_size, args.seq_len)).astype(np.int32)
    mask = np.ones_like(ids)
    which = np.arange(args.batch_size) % args.adapters
    if args.generate:
        eos = config.eos_token_id
        run_mixed = lambda: mixed.generate(
            model, params, stacked, ids, mask, which, max_new_tokens=args.new_tokens, eos_token_id=eos, pad_token_id=eos
        )
        greedy = jax.jit(
            lambda p, i, m: (
                model.generate(
                    i, attention_mask=m, params=p, max_new_tokens=args.new_tokens, do_sample=False, num_beams=1
                ).sequences
            )
        )
        run_merged = lambda: greedy(merged, ids, mask)
        unit, per_batch = "tokens_per_s", args.batch_size * args.new_tokens
    else:
        inputs = {"input_ids": ids, "attention_mask": mask}
        forward = jax.jit(lambda p, b: model(**b, params=p).logits)
        run_mixed = lambda: mixed.logits(model, params, stacked, inputs, which)
        run_merged = lambda: forward(merged, inputs)
        unit, per_batch = "examples_per_s", args.batch_size
    mixed_s, merged_s = median_seconds(run_mixed, args.steps), median_seconds(run_merged, args.steps)
    mixed_p, merged_p = pipelined_seconds(run_mixed, args.steps), pipelined_seconds(run_merged, args.steps)
    result = {
        "model": args.model,
        "device": jax.devices()[0].device_kind,
        "generate": args.generate,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "adapters": args.adapters,
        "rank": args.rank,
        "mode": args.mode,
        "dtype": args.dtype,
        "mixed_ms": mixed_s * 1e3,
        "merged_ms": merged_s * 1e3,
        f"mixed_{unit}": per_batch / mixed_s,
        f"merged_{unit}": per_batch / merged_s,
        "mixed_over_merged_throughput": merged_s / mixed_s,
        "pipelined_mixed_ms": mixed_p * 1e3,
        "pipelined_merged_ms": merged_p * 1e3,
        "pipelined_mixed_over_merged_throughput": merged_p / mixed_p,
    }
    if args.profile:
        result["mixed_profile"], result["merged_profile"] = kernels.profile(run_mixed), kernels.profile(run_merged)
    print(strict_json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))
    return result


if __name__ == "__main__":
    main()
