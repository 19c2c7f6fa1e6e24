"""`rocoft_jax.faithful`: Flax models of real LLM configs compute what PyTorch transformers computes.

Each case builds a tiny PyTorch model of one config feature HF Flax ignores (a rotary base, a rope scaling,
a tied head, Mistral's sliding window, Qwen2's biases), saves it as a checkpoint dir, loads it through
`faithful.from_pretrained`, and compares logits on a right-padded batch. A control shows HF's own Flax class
gets each of them wrong, so the comparison can fail. Features nothing fixes are refused with one line.
"""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import transformers as tf
from flax.traverse_util import flatten_dict

from rocoft_jax import faithful

torch = pytest.importorskip("torch")

CONFIGS = Path(__file__).resolve().parents[1] / "data" / "llm_configs"
SMALL = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    attn_implementation="eager",
)
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,  # with head_dim 16, frequencies fall in all three bands
}
CASES = {
    "llama-theta-1e6": lambda: tf.LlamaConfig(**SMALL, rope_theta=1e6),
    "llama3-scaling": lambda: tf.LlamaConfig(**SMALL, rope_theta=5e5, rope_scaling=LLAMA3),
    "linear-scaling": lambda: tf.LlamaConfig(**SMALL, rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "llama-tied": lambda: tf.LlamaConfig(**SMALL, rope_theta=1e5, tie_word_embeddings=True),
    "mistral-window-4": lambda: tf.MistralConfig(**SMALL, sliding_window=4, rope_theta=1e6),
    "mistral-no-window": lambda: tf.MistralConfig(**SMALL, sliding_window=None),
    "mistral-tied": lambda: tf.MistralConfig(**SMALL, sliding_window=None, tie_word_embeddings=True),
    "gemma-theta-1e6": lambda: tf.GemmaConfig(**SMALL, head_dim=16, rope_theta=1e6),
    "qwen2": lambda: tf.Qwen2Config(**SMALL, rope_theta=1e6, tie_word_embeddings=True),
}


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 96, size=(2, 12))
    mask = np.ones_like(ids)
    mask[1, 7:] = 0  # right padding, as the trainer pads
    return {"input_ids": ids, "attention_mask": mask}


def torch_checkpoint(config, path: Path) -> np.ndarray:
    """Saves a random PyTorch model of ``config`` (biases non-zero) to ``path``; returns nothing."""
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


def torch_logits(model, batch) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.tensor(batch["input_ids"]), attention_mask=torch.tensor(batch["attention_mask"]))
    return out.logits.numpy()


def max_rel_error(actual, expected, mask) -> float:
    keep = mask.astype(bool)
    return float(np.abs(actual - expected)[keep].max() / np.abs(expected[keep]).max())


@pytest.mark.parametrize("case", CASES)
def test_flax_logits_equal_pytorch(case, batch, tmp_path):
    config = CASES[case]()
    reference = torch_logits(torch_checkpoint(config, tmp_path), batch)
    model, params = faithful.from_pretrained(tf.FlaxAutoModelForCausalLM, str(tmp_path))
    logits = np.asarray(model(**batch, params=params).logits)
    assert max_rel_error(logits, reference, batch["attention_mask"]) < 1e-5
    if config.tie_word_embeddings:
        assert "lm_head" not in params  # the head reads the embeddings; no second copy
    assert model.config.model_type == ("llama" if case == "qwen2" else config.model_type)
    if case == "mistral-window-4":
        assert model.config.sliding_window == 4  # the user's config; only the Flax modules see the view

    # Control: HF's own Flax class, given the same weights, computes another model.
    if case != "qwen2":  # HF Flax has no Qwen2 class at all
        plain = tf.FlaxAutoModelForCausalLM.from_config(config, _do_init=False)
        shapes = plain.params_shape_tree
        weights = dict(params)
        if "lm_head" in shapes and "lm_head" not in weights:
            embedding = weights["model"]["embed_tokens"]["embedding"]
            weights["lm_head"] = {"kernel": np.asarray(embedding).T}
        wrong = np.asarray(plain(**batch, params=weights).logits)
        assert max_rel_error(wrong, reference, batch["attention_mask"]) > 1e-4  # 10x the tolerance


@pytest.mark.parametrize(
    "build, field",
    [
        (lambda: tf.LlamaConfig(**SMALL, rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling"),
        (lambda: tf.LlamaConfig(**SMALL, rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rope_scaling"),
        (lambda: tf.LlamaConfig(**SMALL, head_dim=32), "head_dim"),
        (lambda: tf.LlamaConfig(**SMALL, mlp_bias=True), "mlp_bias"),
        (lambda: tf.MistralConfig(**SMALL, head_dim=8), "head_dim"),
        (lambda: tf.Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=8), "use_sliding_window"),
        (lambda: tf.GPT2Config(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
        (lambda: tf.GPT2Config(scale_attn_weights=False), "scale_attn_weights"),
        (lambda: tf.OPTConfig(enable_bias=False), "enable_bias"),
        (lambda: tf.BertConfig(position_embedding_type="relative_key"), "position_embedding_type"),
    ],
)
def test_ignored_features_are_refused_in_one_line(build, field):
    config = build()
    with pytest.raises(faithful.UnsupportedConfig, match=f"has {field}=") as err:
        faithful.model_class_for(tf.FlaxAutoModelForCausalLM, config)
    assert "\n" not in str(err.value)


def test_sharded_safetensors_load_as_one_file_does(batch, tmp_path):
    """Llama-2's hub layout (model-0000N-of-0000M.safetensors + index), which HF Flax cannot read."""
    model = tf.AutoModelForCausalLM.from_config(CASES["llama-tied"]()).eval()
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    flax_model, params = faithful.from_pretrained(tf.FlaxAutoModelForCausalLM, str(tmp_path))
    logits = np.asarray(flax_model(**batch, params=params).logits)
    assert max_rel_error(logits, torch_logits(model, batch), batch["attention_mask"]) < 1e-5


def test_a_checkpoint_missing_a_weight_is_refused(tmp_path):
    from safetensors.numpy import load_file, save_file

    torch_checkpoint(tf.LlamaConfig(**SMALL), tmp_path)  # untied: the checkpoint must hold lm_head
    weights = load_file(tmp_path / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks weights the model needs \\(lm_head/kernel\\)"):
        faithful.from_pretrained(tf.FlaxAutoModelForCausalLM, str(tmp_path))


@pytest.mark.parametrize(
    "auto, head, labels",
    [
        (tf.FlaxAutoModelForSequenceClassification, "classifier", 3),
        (tf.FlaxAutoModelForQuestionAnswering, "qa_outputs", 2),
    ],
)
def test_a_new_head_is_the_one_hfs_full_init_draws(auto, head, labels, tmp_path):
    """A checkpoint of the body alone (as hub encoders are): the head `from_pretrained` draws (from a one-layer
    copy of the model) equals HF's own init of the whole model with the same key, and the body is the file's."""
    config = tf.RobertaConfig(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=labels,
    )
    body = tf.FlaxRobertaModel(config, seed=1)
    body.save_pretrained(tmp_path)
    model, params = faithful.from_pretrained(auto, str(tmp_path), new_head=True, num_labels=labels)
    whole = auto.from_config(config, _do_init=False)
    jitted = flatten_dict(jax.jit(lambda rng: whole.init_weights(rng, (1, 1)))(jax.random.PRNGKey(0)))
    eager = flatten_dict(whole.init_weights(jax.random.PRNGKey(0), (1, 1)))  # HF's own, op by op
    got = flatten_dict(params)
    drawn = [k for k in jitted if k[0] == head]
    assert drawn and all(np.array_equal(got[k], jitted[k]) for k in drawn)  # bit for bit
    for k in drawn:  # eager and jitted sampling differ by float rounding only
        np.testing.assert_allclose(got[k], eager[k], rtol=0, atol=1e-7)
    for key, value in flatten_dict(body.params).items():
        if ("roberta", *key) in got:  # RoBERTa's heads read token 0 without the body's pooler
            np.testing.assert_array_equal(got[("roberta", *key)], value)
    assert ("roberta", "encoder", "layer", "2", "output", "dense", "kernel") in got


def _read(name: str):
    return tf.AutoConfig.for_model(**json.loads((CONFIGS / f"{name}.json").read_text()))


def _flax_count(config) -> int:
    cls = faithful.model_class_for(tf.FlaxAutoModelForCausalLM, config)
    model = cls(faithful.flax_config(config), _do_init=False)
    shapes = jax.eval_shape(lambda: model.init_weights(jax.random.PRNGKey(0), (1, 8)))
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))


def _torch_count(config) -> int:
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())  # a tied head is counted once


# The published configs of the paper's LLMs run through HF Flax's own classes unchanged: nothing to fix.
PAPER = ("llama-2-7b-hf", "llama-2-13b-hf", "bloomz-7b1", "gpt-j-6b")
# Modern checkpoints load with fixes (rope base and scaling, tied head, Qwen2's biases) or are refused.
MODERN = {"llama-3.1-8b": True, "mistral-7b-v0.3": True, "qwen2.5-0.5b": True, "mistral-nemo-base-2407": False}


@pytest.mark.parametrize("name", PAPER)
def test_the_papers_llms_load_exactly_without_fixes(name):
    config = _read(name)
    faithful.check_config(config)
    assert not faithful.needs_fixes(config)
    assert faithful.model_class_for(tf.FlaxAutoModelForCausalLM, config).__module__.startswith("transformers.")


@pytest.mark.parametrize("name", [*PAPER[:1], *PAPER[2:], "llama-3.1-8b", "qwen2.5-0.5b"])
def test_flax_holds_as_many_weights_as_pytorch(name):
    """The class we build for each published config has PyTorch's parameter count (shapes only, no weights)."""
    config = _read(name)
    config.max_position_embeddings = 4096  # counts do not depend on it; HF Flax's causal mask does (128k squared)
    assert _flax_count(config) == _torch_count(config) + (
        config.num_hidden_layers * config.hidden_size if name.startswith("qwen2") else 0  # zero o_proj biases
    )


@pytest.mark.parametrize("name, supported", MODERN.items())
def test_modern_llms_are_fixed_or_refused(name, supported):
    config = _read(name)
    if supported:
        faithful.check_config(config)
        assert faithful.needs_fixes(config)
    else:
        with pytest.raises(faithful.UnsupportedConfig, match="head_dim=128"):
            faithful.check_config(config)


def test_a_rebuild_reuses_the_traced_layout_only_for_the_same_config():
    """A second ``_do_init=False`` build of the same config and arguments takes the first one's layout; any
    other config (here a wider MLP, then a cast) traces its own. Each equals HF's own class's layout."""
    auto = tf.FlaxAutoModelForCausalLM
    config = tf.LlamaConfig(**{k: v for k, v in SMALL.items() if k != "attn_implementation"})
    wider = tf.LlamaConfig(**{**config.to_dict(), "intermediate_size": 128})

    def layout(config, **kwargs):
        model = faithful._loadable(faithful.model_class_for(auto, config))(config, _do_init=False, **kwargs)
        return {k: (v.shape, v.dtype) for k, v in flatten_dict(model.params_shape_tree).items()}, model

    def hf_layout(config, **kwargs):
        model = tf.FlaxLlamaForCausalLM(config, _do_init=False, **kwargs)
        return {k: (v.shape, v.dtype) for k, v in flatten_dict(model.params_shape_tree).items()}

    first, _ = layout(config)
    again, model = layout(config)
    assert again == first == hf_layout(config)
    assert model.required_params == set(first)
    mlp = ("model", "layers", "0", "mlp", "up_proj", "kernel")
    other, _ = layout(wider)
    assert other == hf_layout(wider) and other[mlp][0] == (64, 128) and first[mlp][0] == (64, 96)
    assert layout(config, dtype=jax.numpy.bfloat16)[0] == hf_layout(config, dtype=jax.numpy.bfloat16)


_READ_ON_HOST = """
import sys
import jax
import numpy as np
import transformers as tf
from flax.traverse_util import flatten_dict
from rocoft_jax import faithful

host, other = jax.devices()  # two CPU devices: the second stands in for an accelerator
with jax.default_device(other):
    for path in sys.argv[1:]:
        kwargs = {"from_pt": True} if path.endswith("bin") else {}
        _, params = faithful.from_pretrained(tf.FlaxAutoModelForCausalLM, path, **kwargs)
        where = set()
        for x in flatten_dict(params).values():
            where |= {"numpy"} if isinstance(x, np.ndarray) else {str(d) for d in x.devices()}
        print(path.rsplit("/", 1)[-1], sorted(where))
"""


def test_every_checkpoint_format_is_read_on_the_host(tmp_path):
    """Whatever the default device, a checkpoint's arrays are read and converted on the host (numpy, or jax's CPU
    device): on a GPU each crossing to the device and back costs a copy of the whole model."""
    import subprocess
    import sys

    from conftest import cpu_env

    config = CASES["llama-tied"]()
    torch_model = tf.AutoModelForCausalLM.from_config(config).eval()
    torch_model.save_pretrained(tmp_path / "pt-safetensors")
    torch_model.save_pretrained(tmp_path / "pt-sharded", max_shard_size="100KB")
    torch_model.save_pretrained(tmp_path / "pt-bin", safe_serialization=False)
    flax_model = tf.FlaxLlamaForCausalLM(config, seed=0)
    flax_model.save_pretrained(tmp_path / "flax-msgpack")
    flax_model.save_pretrained(tmp_path / "flax-safetensors", safe_serialization=True)
    dirs = [
        str(tmp_path / name) for name in ("pt-safetensors", "pt-sharded", "pt-bin", "flax-msgpack", "flax-safetensors")
    ]
    run = subprocess.run(
        [sys.executable, "-c", _READ_ON_HOST, *dirs], env=cpu_env(2), capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in run.stdout.strip().splitlines())
    on_host = ("['cpu:0']", "['numpy']", "['cpu:0', 'numpy']")  # numpy arrays, or JAX's on its CPU device
    assert set(lines) == {Path(d).name for d in dirs} and all(lines[n] in on_host for n in lines), run.stdout
