"""Device kernel time and count per kernel name, from a `jax.profiler` trace of a few calls.

    summary = kernels.profile(run, iters=3)   # run() returns arrays; it is called once untimed first

Reads the trace's device planes (``/device:GPU:N``) with `jax.profiler.ProfileData`, so it needs no
TensorBoard plugin. Kernel names lose their numeric suffixes (``gemm_fusion_dot.13`` and
``gemm_fusion_dot_506`` are both ``gemm_fusion_dot``), which groups XLA's fusions by kind. A CPU backend
records no device kernels: the summary is then empty.
"""

from __future__ import annotations

import collections
import glob
import re
import tempfile
import time

import jax


def profile(run, iters: int = 3, top: int = 14) -> dict:
    """``{"kernel_ms", "kernels", "dispatch_ms", "by_name": {name: {"count", "ms"}}}`` per call, averaged
    over ``iters`` calls; ``dispatch_ms`` is the host time until ``run`` returns (before waiting), and
    ``by_name`` keeps the ``top`` names by count."""
    from jax.profiler import ProfileData

    jax.block_until_ready(run())
    trace_dir = tempfile.mkdtemp(prefix="kernels_")
    dispatch = 0.0
    with jax.profiler.trace(trace_dir):
        for _ in range(iters):
            start = time.perf_counter()
            result = run()
            dispatch += time.perf_counter() - start
            jax.block_until_ready(result)
    (path,) = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
    seconds, counts = collections.Counter(), collections.Counter()
    for plane in ProfileData.from_file(path).planes:
        if not plane.name.startswith("/device:"):
            continue
        for line in plane.lines:
            if "stream" not in line.name.lower():
                continue
            for event in line.events:
                name = re.sub(r"[_.]?\d+$", "", event.name)
                seconds[name] += event.duration_ns * 1e-9
                counts[name] += 1
    return {
        "kernel_ms": sum(seconds.values()) * 1e3 / iters,
        "kernels": sum(counts.values()) / iters,
        "dispatch_ms": dispatch * 1e3 / iters,
        "by_name": {
            name: {"count": count / iters, "ms": seconds[name] * 1e3 / iters} for name, count in counts.most_common(top)
        },
    }
