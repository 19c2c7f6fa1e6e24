"""The outputs of `train.ntk` a reader looks at: seed 0's kernel pictures, and the per-subset summary.

`summarize` turns per-seed records into ntk_results.json's entries (mean and std of the accuracy over
seeds, and of the distances to the full-parameter kernel when it was computed); `markdown` renders
them as ntk_results.md's table.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_pictures(out: Path, kernels: dict, y, c_out: int, task: str, k: int) -> None:
    from rocoft_jax.ntk import metrics as ntk_metrics

    title = f"{task}, k={k}, seed 0"
    ntk_metrics.plot_heatmaps(kernels, y, out / "heatmaps.png", num_outputs=c_out, title=title)
    ntk_metrics.plot_spectra(
        {n: ntk_metrics.spectrum(kv) for n, kv in kernels.items()}, out / "spectrum.png", title=title
    )
    np.savez(out / "kernels.npz", labels=y, **kernels)


def summarize(records: dict, num_params: dict) -> dict:
    results = {}
    for name, rec in records.items():
        acc = np.asarray(rec["accuracies"])
        entry = {
            "accuracy_mean": float(acc.mean()),
            "accuracy_std": float(acc.std()),
            "accuracies": rec["accuracies"],
            "num_params": num_params[name],
            "lambdas": rec["lambdas"],
            "kernel_seconds": float(np.mean(rec["kernel_seconds"])),
        }
        if rec["d1"]:
            entry.update(
                distance_p1=float(np.mean(rec["d1"])),
                distance_p2=float(np.mean(rec["d2"])),
                distance_p1_std=float(np.std(rec["d1"])),
                distance_p2_std=float(np.std(rec["d2"])),
            )
        results[name] = entry
    return results


def markdown(results: dict, config, task: str, num_dev: int) -> str:
    lines = [
        f"NTK analysis: {task}, model {config.model}, k={config.k} per class, {config.seeds} seed(s), "
        f"{num_dev} dev examples. Mean (std) over seeds; distances to the full-parameter kernel.",
        "",
        "| subset | parameters | accuracy (%) | distance p=1 | distance p=2 |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        dist = [
            f"{r[f'distance_p{p}']:.3f} ({r[f'distance_p{p}_std']:.3f})" if f"distance_p{p}" in r else "-"
            for p in (1, 2)
        ]
        lines.append(
            f"| {name} | {r['num_params']:,} | {100 * r['accuracy_mean']:.1f} "
            f"({100 * r['accuracy_std']:.1f}) | {dist[0]} | {dist[1]} |"
        )
    return "\n".join(lines) + "\n"
