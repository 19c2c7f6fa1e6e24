"""Time the empirical NTK of a parameter subset on a shape preset (random init, nothing downloaded).

    python -m benchmarks.ntk --model roberta-large --n 64 --seq-len 128 --subsets full,row1

For each subset it computes the (n, n) kernel of a 2-class readout f(x) twice (the first
call compiles) and reports the second call's wall time, the subset's size and the peak
device memory, as one JSON object per subset.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from rocoft_jax import ntk
from rocoft_jax.ntk.forwards import ReadoutForward, init_readout
from train import models, strict_json


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="roberta-base", help=f"shape preset ({', '.join(models.PRESETS)}) or config dir")
    p.add_argument("--n", type=int, default=64, help="examples in the kernel")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--subsets", default="full,row1")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--chunk-size", type=int, default=16)
    p.add_argument("--max-bytes", type=float, default=8e9, help="bound on per-example gradients held at once")
    args = p.parse_args(argv)
    config = models.preset_config(args.model)
    model, params = models.random_model_fast(config, "base", args.dtype)
    forward = ReadoutForward(model, init_readout(config.hidden_size, 2))
    rng = np.random.default_rng(0)
    batch = {
        "input_ids": jnp.asarray(rng.integers(3, config.vocab_size, (args.n, args.seq_len)), jnp.int32),
        "attention_mask": jnp.ones((args.n, args.seq_len), jnp.int32),
    }
    for name in args.subsets.split(","):
        subset = ntk.make_subset(name, params, forward)
        size = sum(int(np.size(v)) for v in jax.tree.leaves(subset.theta))
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            k = ntk.kernel(subset, batch, max_bytes=int(args.max_bytes), chunk_size=args.chunk_size)
            times.append(time.perf_counter() - t0)
        stats = jax.devices()[0].memory_stats() or {}
        print(
            strict_json.dumps(
                {
                    "model": args.model,
                    "subset": name,
                    "n": args.n,
                    "seq_len": args.seq_len,
                    "num_params": size,
                    "first_s": times[0],
                    "kernel_s": times[1],
                    "peak_gib": stats.get("peak_bytes_in_use", float("nan")) / 2**30,
                    "trace": float(np.trace(k)),
                    "device": jax.devices()[0].device_kind,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
