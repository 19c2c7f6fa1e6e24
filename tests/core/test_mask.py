"""`mask_params` / `mask_leaves`: what gets trained, how much, and the errors a user sees.

Counts are checked against the paper's tables, targets against a per-family
table written out by hand, and the labels by running them through
``optax.multi_transform``.
"""

import functools
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers as tf
from conftest import (
    FAMILY_MODELS,
    abstract_params,
    efficient_forward,
    element_masks,
    flat,
    full_forward,
    num_elements,
    tiny_gpt2,
    tiny_llama,
    tiny_roberta,
)
from flax.core import freeze

import rocoft_jax

# The shapes of the paper's checkpoints (2 labels).
_ROBERTA = dict(
    vocab_size=50265,
    max_position_embeddings=514,
    type_vocab_size=1,
    layer_norm_eps=1e-5,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
)
PRESETS = {
    "roberta-base": lambda: tf.RobertaConfig(**_ROBERTA),
    "roberta-large": lambda: tf.RobertaConfig(
        **_ROBERTA, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096
    ),
}


def preset_config(preset):
    return PRESETS[preset]()


@functools.cache
def _preset_shapes(preset):
    return abstract_params(tf.FlaxRobertaForSequenceClassification, preset_config(preset))[1]


# ---------------------------------------------------------------- the paper's counts

PAPER_COUNTS = [
    # (name, preset, rank, mode, trainable scalars in the paper's tables)
    ("roberta-base-r1-row", "roberta-base", 1, "row", 82_944),
    ("roberta-base-r1-column", "roberta-base", 1, "column", 82_944),
    ("roberta-large-r1-row", "roberta-large", 1, "row", 221_184),
    ("roberta-large-r1-column", "roberta-large", 1, "column", 221_184),
    ("roberta-large-r3-row", "roberta-large", 3, "row", 663_552),
    ("roberta-large-r3-column", "roberta-large", 3, "column", 663_552),
]


@pytest.mark.parametrize("name, preset, rank, mode, expected", PAPER_COUNTS, ids=[c[0] for c in PAPER_COUNTS])
def test_paper_trainable_counts(name, preset, rank, mode, expected):
    shapes = _preset_shapes(preset)
    mask = rocoft_jax.mask_params(shapes, rank, mode, train=())
    assert mask.num_trainable == expected
    assert mask.family == "bert" and len(mask.slices) == 6 * preset_config(preset).num_hidden_layers
    # The tree the optimizer actually sees holds exactly that many scalars.
    trainable = jax.eval_shape(lambda p: rocoft_jax.split(p, mask)[0], shapes)
    assert num_elements(trainable) == expected
    assert mask.num_total == num_elements(shapes)


def test_default_train_adds_the_classification_head():
    shapes = _preset_shapes("roberta-base")
    slices_only = rocoft_jax.mask_params(shapes, 1, "row", train=())
    default = rocoft_jax.mask_params(shapes, 1, "row")
    head = {
        p: v
        for p, v in flat(jax.tree.map(lambda s: np.zeros(s.shape, np.int8), shapes)).items()
        if p.startswith("classifier/")
    }
    hidden, labels = 768, 2
    assert sum(v.size for v in head.values()) == hidden * hidden + hidden + hidden * labels + labels
    assert default.num_trainable == slices_only.num_trainable + sum(v.size for v in head.values())


# ---------------------------------------------------------------- the families table


def _layer_suffixes(paths):
    """stack -> {layer index -> set of kernel suffixes}, e.g. "model/layers" -> {"0": {"self_attn/q_proj"}}."""
    out = {}
    for p in paths:
        m = re.fullmatch(r"(.*?)/(\d+)/(.*)/kernel", p)
        assert m, p
        out.setdefault(m.group(1), {}).setdefault(m.group(2), set()).add(m.group(3))
    return out


@pytest.mark.parametrize("name", list(FAMILY_MODELS))
def test_family_targets_and_head(name):
    config_cls, model_cls, kw, family, suffixes, head = FAMILY_MODELS[name]
    config = config_cls(**kw)
    model, shapes = abstract_params(model_cls, config)
    mask = rocoft_jax.mask_params(shapes, 2, "row")
    assert mask.family == family
    assert rocoft_jax.detect_family(flat(jax.tree.map(lambda s: 0, shapes))).name == family

    stacks = _layer_suffixes(mask.slices)
    for stack, layers in stacks.items():
        assert sorted(layers) == ["0", "1"], stack
        for layer, found in layers.items():
            expected = set(suffixes)
            if name == "bart" and stack.endswith("encoder/layers"):
                expected = {s for s in expected if not s.startswith("encoder_attn/")}
            assert found == expected, (stack, layer)
    n_stacks = 2 if name == "bart" else 1
    assert len(stacks) == n_stacks
    assert sorted(p for p, lab in mask.label_of.items() if lab == rocoft_jax.TRAIN) == sorted(head)

    # Every targeted kernel is reached by the sliced forward pass (no "was not used" error, no
    # output-axis mismatch), and the output shape is the model's own.
    ids = np.full((1, 8), 5, np.int32)
    ids[0, -1] = config.eos_token_id if config.eos_token_id is not None else 5
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    sliced = jax.eval_shape(lambda p: efficient_forward(model, *rocoft_jax.split(p, mask), mask, batch), shapes)
    plain = jax.eval_shape(lambda p: full_forward(model, p, batch), shapes)
    assert sliced.shape == plain.shape and sliced.dtype == plain.dtype


# ---------------------------------------------------------------- labels, indices, counts, summary

MODES = [("row", 2), ("column", 3), ("random", 0.1)]


@pytest.mark.parametrize("container", ["dict", "frozendict"])
@pytest.mark.parametrize("mode, rank", MODES)
def test_labels_drive_multi_transform(container, mode, rank):
    _, params = tiny_roberta()
    if container == "frozendict":
        params = freeze(params)
    mask = rocoft_jax.mask_params(params, rank, mode)
    assert type(mask.labels) is type(params)
    assert jax.tree.structure(mask.labels) == jax.tree.structure(params)
    tx = optax.multi_transform(
        {"rocoft": rocoft_jax.masked(optax.sgd(1.0), mask), "train": optax.sgd(1.0), "frozen": optax.set_to_zero()},
        mask.labels,
    )
    grads = jax.tree.map(jnp.ones_like, params)  # plain SGD with unit gradients: each live entry moves by -1
    updates, _ = tx.update(grads, tx.init(params), params)
    assert type(updates) is type(params)
    masks = element_masks(params, mask, mode, out_axis=1, train_prefixes=("classifier/",))
    for path, u in flat(updates).items():
        np.testing.assert_array_equal(u, -masks[path], err_msg=path)


SELECTIONS = [
    (mode, rank, strategy)
    for mode, rank in MODES
    for strategy in ("first", "random")
    if not (mode == "random" and strategy == "random")
]  # mode random has only its seed


@pytest.mark.parametrize("mode, rank, strategy", SELECTIONS)
def test_indices_are_sorted_int32_and_in_range(mode, rank, strategy):
    _, params = tiny_roberta()
    mask = rocoft_jax.mask_params(params, rank, mode, strategy=strategy, seed=3)
    shapes = {p: v.shape for p, v in flat(params).items()}
    assert len(mask.indices) == 12
    for path, idx in mask.indices.items():
        assert idx.dtype == np.int32 and idx.ndim == 1, path
        assert np.all(np.diff(idx) > 0), path  # sorted, no repeats
        limit = math.prod(shapes[path]) if mode == "random" else shapes[path][1 if mode == "row" else 0]
        assert 0 <= idx.min() and idx.max() < limit, path
        if mode != "random":
            assert len(idx) == rank
            if strategy == "first":
                np.testing.assert_array_equal(idx, np.arange(rank))
    again = rocoft_jax.mask_params(params, rank, mode, strategy=strategy, seed=3)
    other = rocoft_jax.mask_params(params, rank, mode, strategy=strategy, seed=4)
    assert all(np.array_equal(mask.indices[p], again.indices[p]) for p in mask.indices)
    if strategy == "random" or mode == "random":
        assert not all(np.array_equal(mask.indices[p], other.indices[p]) for p in mask.indices)


@pytest.mark.parametrize("mode, rank", MODES)
def test_num_trainable_matches_a_hand_count(mode, rank):
    _, params = tiny_roberta()
    mask = rocoft_jax.mask_params(params, rank, mode)
    h, i, labels, layers = 32, 64, 3, 2
    # Flax kernels are (d_in, d_out): a row (output unit) holds d_in entries, a column d_out.
    per_layer_kernels = [(h, h)] * 4 + [(h, i), (i, h)]
    if mode == "row":
        slices = layers * sum(rank * d_in for d_in, _ in per_layer_kernels)
    elif mode == "column":
        slices = layers * sum(rank * d_out for _, d_out in per_layer_kernels)
    else:
        slices = sum(len(v) for v in mask.indices.values())
        expected_mean = rank * layers * sum(a * b for a, b in per_layer_kernels)
        assert abs(slices - expected_mean) < 5 * math.sqrt(expected_mean)
    head = h * h + h + h * labels + labels
    assert mask.num_trainable == slices + head
    assert mask.num_total == sum(v.size for v in flat(params).values())
    trainable, _ = rocoft_jax.split(params, mask)
    assert num_elements(trainable) == mask.num_trainable


def test_summary_reports_counts_and_percent(capsys):
    _, params = tiny_roberta()
    mask = rocoft_jax.mask_params(params, 2, "row", train=())
    total = sum(v.size for v in flat(params).values())
    trainable = 2 * 2 * (32 * 5 + 64)
    text = mask.summary()
    assert f"{trainable:,}" in text and f"{total:,}" in text
    assert f"{100 * trainable / total:.4f}" in text
    mask.print_trainable_parameters()
    assert capsys.readouterr().out.strip() == text
    assert text in str(mask)


def test_train_bias_trains_the_target_layers_biases():
    _, params = tiny_roberta()
    mask = rocoft_jax.mask_params(params, 1, "row", train=(), train_bias=True)
    trained = sorted(p for p, lab in mask.label_of.items() if lab == rocoft_jax.TRAIN)
    assert trained == sorted(p[: -len("kernel")] + "bias" for p in mask.slices)
    assert mask.num_trainable == 2 * (32 * 5 + 64) + 2 * (32 * 5 + 64)


def test_train_bias_on_layers_without_biases_is_not_an_error():
    """Llama's projections have no biases: train_bias has nothing to add, with or without explicit train=."""
    _, params = tiny_llama()
    default = rocoft_jax.mask_params(params, 1, "row", train_bias=True)
    explicit = rocoft_jax.mask_params(params, 1, "row", train=(), train_bias=True)
    assert explicit.num_trainable == default.num_trainable == rocoft_jax.mask_params(params, 1, "row").num_trainable


def test_describe_is_json_ready():
    _, params = tiny_roberta()
    mask = rocoft_jax.mask_params(params, 2, "column", strategy="random", seed=5)
    record = json.loads(json.dumps(mask.describe()))
    assert record["mode"] == "column" and record["rank"] == 2 and record["strategy"] == "random"
    assert record["family"] == "bert" and record["num_trainable"] == mask.num_trainable
    assert record["train"] == sorted(p for p in flat(params) if p.startswith("classifier/"))
    assert {p: np.asarray(v, np.int32).tolist() for p, v in mask.indices.items()} == record["indices"]


ROUND_TRIPS = [
    ("roberta", "row", 2, "random"),
    ("roberta", "column", 3, "first"),
    ("roberta", "random", 0.05, "first"),
    ("gpt2", "row", 2, "random"),
    ("gpt2", "random", 0.05, "first"),
]


@pytest.mark.parametrize(
    "model_name, mode, rank, strategy", ROUND_TRIPS, ids=["-".join(map(str, r)) for r in ROUND_TRIPS]
)
def test_mask_from_description_rebuilds_the_same_selection(model_name, mode, rank, strategy):
    _, params = (tiny_roberta if model_name == "roberta" else tiny_gpt2)()
    mask = rocoft_jax.mask_params(params, rank, mode, strategy=strategy, seed=11)
    again = rocoft_jax.mask_from_description(params, json.loads(json.dumps(mask.describe())))
    assert again.label_of == mask.label_of and again.num_trainable == mask.num_trainable
    assert jax.tree.structure(again.labels) == jax.tree.structure(mask.labels)
    assert list(again.slices) == list(mask.slices)
    for path, spec in mask.slices.items():
        other = again.slices[path]
        assert (other.shape, other.axis, other.out_axis) == (spec.shape, spec.axis, spec.out_axis), path
        np.testing.assert_array_equal(other.indices, spec.indices, err_msg=path)
        assert other.indices.dtype == np.int32


def test_mask_from_description_rejects_indices_outside_the_kernel():
    # The sliced matmul's gathers clip out-of-bounds indices, so a saved selection that does not fit
    # these kernels (a smaller base model) must fail here rather than train the wrong rows.
    _, params = tiny_roberta()
    description = json.loads(json.dumps(rocoft_jax.mask_params(params, 2, "row").describe()))
    path = next(iter(description["indices"]))
    description["indices"][path] = [0, 4096]
    with pytest.raises(
        ValueError,
        match=r"selected indices 0\.\.4096 do not fit a kernel of shape \(32, \d+\); "
        r"was the selection made for a different base model\?",
    ):
        rocoft_jax.mask_from_description(params, description)


def test_mask_leaves_labels_whole_leaves():
    _, params = tiny_roberta()
    full = rocoft_jax.mask_leaves(params, (".*",), name="full")
    assert set(full.label_of.values()) == {rocoft_jax.TRAIN} and full.num_trainable == full.num_total
    bitfit = rocoft_jax.mask_leaves(params, (r"(^|/)bias$",), name="bitfit")
    biases = [v for p, v in flat(params).items() if p.endswith("/bias")]
    assert bitfit.num_trainable == sum(v.size for v in biases) and bitfit.mode == "bitfit"
    with pytest.raises(ValueError, match=r"train pattern 'pooler/' matches no parameter"):
        rocoft_jax.mask_leaves(params, ("pooler/",))


# ---------------------------------------------------------------- errors

_CUSTOM = {"foo": {"bar": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}}

ERRORS = [
    # (name, params, args, kwargs, message regex)
    (
        "targets-match-nothing",
        "roberta",
        (1,),
        {"targets": [r"attention/self/querry/kernel$"]},
        r"target pattern 'attention/self/querry/kernel\$' matches no parameter",
    ),
    ("rank-zero", "roberta", (0,), {}, r"rank must be a positive integer number of rows; got 0"),
    ("rank-negative", "roberta", (-2, "column"), {}, r"rank must be a positive integer number of columns; got -2"),
    ("rank-float", "roberta", (1.5,), {}, r"rank must be a positive integer number of rows; got 1\.5"),
    ("rank-bool", "roberta", (True,), {}, r"rank must be a positive integer"),
    (
        "rank-too-big-row",
        "roberta",
        (33, "row"),
        {},
        (
            r"rank 33 exceeds the 32 rows of roberta/encoder/layer/0/attention/output/dense/kernel "
            r"\(shape \(32, 32\)\); choose rank <= 32"
        ),
    ),
    (
        "rank-too-big-column",
        "roberta",
        (40, "column"),
        {"targets": [r"intermediate/dense/kernel$"]},
        r"rank 40 exceeds the 32 columns of roberta/encoder/layer/0/intermediate/dense/kernel .*choose rank <= 32",
    ),
    ("random-p-out-of-range", "roberta", (1.5, "random"), {}, r"mode 'random' takes rank=p, a probability in \(0, 1\]"),
    ("unknown-mode", "roberta", (1, "diagonal"), {}, r"unknown mode 'diagonal'; choose one of: row, column, random"),
    (
        "unknown-strategy",
        "roberta",
        (1,),
        {"strategy": "largest"},
        r"unknown strategy 'largest'; choose one of: first, random, max, min, mixed",
    ),
    ("wanda-in-random-mode", "roberta", (0.1, "random"), {"strategy": "max"}, r"strategy 'max' needs mode 'row'"),
    (
        "unknown-family",
        "custom",
        (1,),
        {},
        r"unknown model family: no known layout matches parameter paths like 'foo/bar/kernel'.*Pass targets=",
    ),
    ("unknown-family-name", "roberta", (1,), {"family": "t5"}, r"unknown family 't5'; choose one of: bert"),
    (
        "wanda-without-calibration",
        "roberta",
        (1,),
        {"strategy": "max"},
        (
            r"strategy 'max' scores rows/columns by input activations, but calibration= lacks "
            r"'roberta/encoder/layer/0/attention/output/dense/kernel'.*activation_norms"
        ),
    ),
    (
        "train-pattern-matches-nothing",
        "roberta",
        (1,),
        {"train": [r"^pooler/"]},
        r"train pattern '\^pooler/' matches no parameter",
    ),
]


@pytest.mark.parametrize("name, which, args, kwargs, message", ERRORS, ids=[e[0] for e in ERRORS])
def test_mask_params_errors(name, which, args, kwargs, message):
    params = tiny_roberta()[1] if which == "roberta" else _CUSTOM
    with pytest.raises(ValueError, match=message):
        rocoft_jax.mask_params(params, *args, **kwargs)


def test_masked_rejects_leaves_that_are_not_rocoft_kernels():
    _, params = tiny_roberta()
    mask = rocoft_jax.mask_params(params, 1)
    tx = rocoft_jax.masked(optax.adam(1e-3), mask)
    with pytest.raises(
        ValueError,
        match=r"rocoft_jax.masked received 'classifier/dense/bias', which is not a "
        r"selected kernel of the mask.*mask.labels",
    ):
        tx.init({"classifier": {"dense": {"bias": params["classifier"]["dense"]["bias"]}}})


def test_split_rejects_params_of_another_model():
    _, params = tiny_roberta()
    mask = rocoft_jax.mask_params(params, 1)
    other = dict(params, extra={"kernel": jnp.ones((2, 2))})
    with pytest.raises(ValueError, match=r"parameter 'extra/kernel' is not in the mask"):
        rocoft_jax.split(other, mask)


# ---------------------------------------------------------------- custom trees and explicit targets


def test_custom_tree_with_explicit_targets_needs_no_family():
    """A user model outside the family table: targets= alone must be enough (train defaults to no head).

    The unknown-family error itself tells the user to "Pass targets=[regex, ...]".
    """
    mask = rocoft_jax.mask_params(_CUSTOM, 1, "row", targets=[r"bar/kernel$"])
    assert mask.family is None
    np.testing.assert_array_equal(mask.indices["foo/bar/kernel"], [0])
    assert mask.num_trainable == 4


@pytest.mark.parametrize("train", [None, ()], ids=["default-train", "train-empty"])
@pytest.mark.parametrize("mode", ["row", "column"])
def test_gpt2_explicit_targets_keep_the_conv1d_layout(mode, train):
    """GPT-2's FlaxConv1D kernels are (d_out, d_in): paper row i is kernel[i, :], whatever else is passed."""
    _, params = tiny_gpt2()
    kwargs = {} if train is None else {"train": train}
    mask = rocoft_jax.mask_params(params, 2, mode, targets=[r"h/\d+/attn/c_attn/kernel$"], **kwargs)
    spec = mask.slices["transformer/h/0/attn/c_attn/kernel"]
    assert spec.shape == (96, 32) and spec.out_axis == 0
    assert spec.slice_shape == ((2, 32) if mode == "row" else (96, 2))
