"""Where a whole `train.run` spends its host time: the run under ``jax.profiler``, then a summary of the trace.

    python -m benchmarks.trace_run --trace-dir DIR -- --model MODEL_DIR --task rte --max-steps 20

Arguments after ``--`` go to ``python -m train.run``. The run is traced with JAX's host tracer at level 2, which
records XLA's own compile annotations (its HLO pass pipelines such as ``priority-fusion``, code generation,
an executable's deserialization and load) and JAX's (tracing, lowering, transfers), but not Python functions.
The summary prints the host events' total seconds by thread and name (``--top`` of them), then every event
longer than ``--longer-than`` seconds in time order. Threads are named as the OS names them: Python's own
threads (the main thread, the compile and prefetch threads) all read ``python``. The trace itself (perfetto
``.trace.json.gz``) stays in DIR for a viewer.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import sys
from pathlib import Path


def trace(trace_dir: Path, run_args: list[str]) -> int:
    """``python -m train.run run_args`` in this process under ``jax.profiler``; its exit code."""
    from train import run

    run.without_torch()  # as `python -m train.run` does, before transformers is imported
    import jax

    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0  # Python function events cost more than they tell about a whole run
    options.host_tracer_level = 2
    jax.profiler.start_trace(str(trace_dir), create_perfetto_trace=True, profiler_options=options)
    try:
        return run.main(run_args)
    finally:
        jax.profiler.stop_trace()


def summarize(trace_dir: Path, top: int = 40, longer_than: float = 0.2) -> str:
    """The newest trace under ``trace_dir``: host event seconds by (thread, name), then the long events."""
    paths = sorted(trace_dir.glob("**/*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not paths:
        raise SystemExit(f"no *.trace.json.gz under {trace_dir}")
    events = json.loads(gzip.decompress(paths[-1].read_bytes()))
    events = events["traceEvents"] if isinstance(events, dict) else events
    threads = {
        (e["pid"], e["tid"]): e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"
    }

    def thread_of(e) -> str:
        return threads.get((e["pid"], e["tid"]), str(e["tid"]))

    spans = [e for e in events if e.get("ph") == "X"]
    if not spans:
        return f"{paths[-1]}: no host events"
    start = min(e["ts"] for e in spans)
    seconds, counts, first = collections.Counter(), collections.Counter(), {}
    for e in spans:
        key = (thread_of(e), e["name"][:100])
        seconds[key] += e["dur"] / 1e6
        counts[key] += 1
        first.setdefault(key, (e["ts"] - start) / 1e6)
    lines = [f"{paths[-1]}: {len(spans)} host events", "seconds   count    first at  thread | event"]
    for key, total in seconds.most_common(top):
        lines.append(f"{total:8.3f}  {counts[key]:6d}  {first[key]:9.2f} s  {key[0][:24]} | {key[1]}")
    lines.append(f"events longer than {longer_than} s, in time order (start, +seconds):")
    for e in sorted((e for e in spans if e["dur"] > longer_than * 1e6), key=lambda e: e["ts"]):
        lines.append(f"{(e['ts'] - start) / 1e6:8.2f} +{e['dur'] / 1e6:8.3f}  {thread_of(e)[:24]} | {e['name'][:100]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.trace_run", description=__doc__.splitlines()[0])
    parser.add_argument("--trace-dir", required=True, type=Path, help="where the profiler writes the trace")
    parser.add_argument("--top", type=int, default=40, help="how many (thread, event) totals to print")
    parser.add_argument("--longer-than", type=float, default=0.2, help="seconds: the timeline's threshold")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then train.run's arguments")
    args = parser.parse_args(argv)
    run_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    code = trace(args.trace_dir, run_args)
    print(summarize(args.trace_dir, args.top, args.longer_than))
    return code


if __name__ == "__main__":
    sys.exit(main())
