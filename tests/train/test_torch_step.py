"""`benchmarks.torch_step` on the tiny presets, on CPU: JSON shape, exact trainable counts, learning.

All runs start at once in subprocesses (each pays ~5 s importing torch and transformers); about 30 s on
2 cores, so the module runs under -m slow (a benchmark's own tests).
"""

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # CI time on 2 cores

pytest.importorskip("torch")
pytest.importorskip("transformers")

ROOT = pathlib.Path(__file__).resolve().parents[2]
KEYS = {"method", "step_ms", "tokens_per_s", "peak_gib", "num_trainable", "loss", "compile"}
H, I, L, R, LORA_R = 64, 128, 2, 3, 8  # tiny preset: hidden, intermediate, layers; Algorithm 1 rank; LoRA rank
CLASSIFIER = (H * H + H) + (H * 2 + 2)  # RobertaClassificationHead: dense + out_proj (2 labels)
ENV = {**os.environ, "USE_FLAX": "0", "USE_TF": "0", "OMP_NUM_THREADS": "1"}  # no jax import; no oversubscription
HAS_PEFT = importlib.util.find_spec("peft") is not None

RUNS = {  # name: extra CLI args
    "algorithm1": ["--peer", "algorithm1", "--model", "tiny", "--dtype", "fp32", "--lr", "1e-2"],
    "algorithm1-llama": ["--peer", "algorithm1", "--model", "tiny-llama"],
    "full": ["--peer", "full", "--model", "tiny"],
}
if HAS_PEFT:
    RUNS["lora"] = ["--peer", "lora", "--model", "tiny"]


@pytest.fixture(scope="module")
def results():
    common = ["--device", "cpu", "--batch-size", "2", "--seq-len", "16", "--steps", "3", "--warmup", "1"]
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "benchmarks.torch_step", *args, *common],
            cwd=ROOT,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, args in RUNS.items()
    }
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr[-3000:]
        out[name] = json.loads(stdout.strip().splitlines()[-1])
    return out


@pytest.mark.parametrize("name", list(RUNS))
def test_json_line(results, name):
    res = results[name]
    assert KEYS <= set(res)
    assert res["method"] == "torch-" + RUNS[name][1]
    assert res["step_ms"] > 0 and res["tokens_per_s"] == pytest.approx(2 * 16 / (res["step_ms"] / 1e3))
    assert res["peak_gib"] is None and res["peak_gib_nonfinite"] == "nan" and res["compile"] is False  # strict JSON
    assert math.isfinite(res["loss"]) and res["num_trainable"] > 0


def test_algorithm1_counts_rows_and_classifier(results):
    # r rows of W (out, in) hold r * in_features: q, k, v, attention.output (in H),
    # intermediate (in H), output (in I); plus the full classifier head.
    per_layer = 4 * R * H + R * H + R * I
    assert results["algorithm1"]["num_trainable"] == L * per_layer + CLASSIFIER


def test_algorithm1_llama_counts_rows(results):
    # q, k, v, o, gate, up take H inputs; down takes I. No head is trained.
    assert results["algorithm1-llama"]["num_trainable"] == L * (6 * R * H + R * I)


def test_algorithm1_learns_fixed_batch(results):
    res = results["algorithm1"]  # 4 AdamW steps at lr 1e-2 on one batch, fp32
    assert res["loss"] < 0.8 * res["first_loss"]


def test_full_counts_everything(results):
    embeddings = 128 * H + 514 * H + 1 * H + 2 * H  # word (vocab 128), position, token type, LayerNorm
    layer = 4 * (H * H + H) + 2 * H + (H * I + I) + (I * H + H) + 2 * H  # attention, LN, MLP, LN
    assert results["full"]["num_trainable"] == embeddings + L * layer + CLASSIFIER


@pytest.mark.skipif(not HAS_PEFT, reason="peft not installed")
def test_lora_counts_adapters_and_classifier(results):
    # A (r x in) + B (out x r) on query and value, both H -> H; classifier via modules_to_save.
    assert results["lora"]["num_trainable"] == L * 2 * (LORA_R * H + H * LORA_R) + CLASSIFIER
