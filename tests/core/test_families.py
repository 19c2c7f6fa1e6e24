"""The family records: each one complete and consistent, and the tables derived from them unchanged.

The reference tables below are the hand-written ones the records replaced, copied
verbatim: the sharding rules, the fast paths' class-name sets and the causal-LM
model types must stay exactly what they were.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import re

import flax.linen as nn
import jax
import pytest
import transformers as tf
from conftest import FAMILY_MODELS, abstract_params
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P
from transformers.models.auto.configuration_auto import CONFIG_MAPPING, model_type_to_module_name

import rocoft_jax
from rocoft_jax import families, sharding
from rocoft_jax.fast import attention, first_token, mlp, remat
from rocoft_jax.tree import flat_paths, flatten

# ---------------------------------------------------------------- the reference tables, as they were written

_COL, _ROW, _COL_BIAS = P("fsdp", "tensor"), P("tensor", "fsdp"), P("tensor")


def _layers(col: str, row: str, embeddings: str, extra: tuple = ()) -> tuple[tuple[str, P], ...]:
    return (
        (rf"({col})/kernel$", _COL),
        (rf"({col})/bias$", _COL_BIAS),
        (rf"({row})/kernel$", _ROW),
        (rf"({row})/bias$", P()),
        (rf"({embeddings})/embedding$", P(None, "fsdp")),
        *extra,
        (r"(embed_positions|position_embeddings|wpe)/embedding$", P()),
    )


REFERENCE_RULES: dict[str, tuple[tuple[str, P], ...]] = {
    "bert": (
        *_layers(r"attention/self/(query|key|value)|intermediate/dense", r"output/dense", "word_embeddings"),
        (r"embeddings/\w+_embeddings/embedding$", P()),
        (r"(embeddings_project|lm_head|cls|generator_\w+|discriminator_\w+)/", P()),  # ELECTRA, MLM heads
    ),
    "distilbert": _layers(r"attention/(q_lin|k_lin|v_lin)|ffn/lin1", r"attention/out_lin|ffn/lin2", "word_embeddings"),
    "bart": (
        *_layers(
            r"(self_attn|encoder_attn)/(q_proj|k_proj|v_proj)|fc1",
            r"(self_attn|encoder_attn)/out_proj|fc2",
            "shared|embed_tokens",
        ),
        (r"final_logits_bias$", P()),  # the seq2seq LM head
        (r"lm_head/kernel$", P("fsdp", "tensor")),
    ),
    "llama": (
        *_layers(
            r"self_attn/(q_proj|k_proj|v_proj)|mlp/(gate_proj|up_proj)",
            r"self_attn/o_proj|mlp/down_proj",
            "embed_tokens",
        ),
        (r"lm_head/kernel$", P("fsdp", "tensor")),
    ),
    "opt": (
        *_layers(r"self_attn/(q_proj|k_proj|v_proj)|fc1", r"self_attn/out_proj|fc2", "embed_tokens"),
        (r"(project_in|project_out)/kernel$", P()),
        (r"lm_head/kernel$", P("fsdp", "tensor")),
    ),
    "gptj": (
        *_layers(r"attn/(q_proj|k_proj|v_proj)|mlp/fc_in", r"attn/out_proj|mlp/fc_out", "wte"),
        (r"lm_head/kernel$", P("fsdp", "tensor")),
    ),
    "bloom": _layers(
        r"self_attention/query_key_value|mlp/dense_h_to_4h",
        r"self_attention/dense|mlp/dense_4h_to_h",
        "word_embeddings",
    ),
    "gpt2": (
        (r"(attn/c_attn|mlp/c_fc)/kernel$", P("tensor", "fsdp")),
        (r"(attn/c_attn|mlp/c_fc)/bias$", _COL_BIAS),
        (r"(attn/c_proj|mlp/c_proj)/kernel$", P("fsdp", "tensor")),
        (r"wte/embedding$", P(None, "fsdp")),
        (r"wpe/embedding$", P()),
    ),
}

REFERENCE_TABLES = {
    "attention.ENCODERS": (
        attention.ENCODERS,
        {
            "FlaxBertSelfAttention",
            "FlaxRobertaSelfAttention",
            "FlaxXLMRobertaSelfAttention",
            "FlaxElectraSelfAttention",
            "FlaxRobertaPreLayerNormSelfAttention",
            "FlaxBigBirdSelfAttention",
        },
    ),
    "attention.DECODERS": (attention.DECODERS, {"FlaxLlamaAttention", "FlaxMistralAttention", "FlaxGemmaAttention"}),
    "attention.SELF_OUTPUTS": (
        attention.SELF_OUTPUTS,
        {"FlaxBertSelfOutput", "FlaxRobertaSelfOutput", "FlaxXLMRobertaSelfOutput", "FlaxElectraSelfOutput"},
    ),
    "mlp.INTERMEDIATES": (
        mlp.INTERMEDIATES,
        {"FlaxBertIntermediate", "FlaxRobertaIntermediate", "FlaxXLMRobertaIntermediate", "FlaxElectraIntermediate"},
    ),
    "mlp.OUTPUTS": (mlp.OUTPUTS, {"FlaxBertOutput", "FlaxRobertaOutput", "FlaxXLMRobertaOutput", "FlaxElectraOutput"}),
    "first_token.LAYERS": (
        first_token.LAYERS,
        {"FlaxBertLayer", "FlaxRobertaLayer", "FlaxXLMRobertaLayer", "FlaxElectraLayer"},
    ),
    "first_token.HEADS": (
        first_token.HEADS,
        {
            "FlaxBertForSequenceClassification",
            "FlaxRobertaForSequenceClassification",
            "FlaxXLMRobertaForSequenceClassification",
            "FlaxElectraForSequenceClassification",
        },
    ),
    "remat.LAYERS": (remat.LAYERS, {"FlaxLlamaDecoderLayer", "FlaxMistralDecoderLayer", "FlaxGemmaDecoderLayer"}),
    "remat.MODEL_TYPES": (remat.MODEL_TYPES, {"llama", "mistral", "gemma"}),
    "causal-lm model types": (
        families.model_types("causal-lm"),
        {"llama", "mistral", "gemma", "gptj", "bloom", "opt", "gpt2"},
    ),
}

NAMES = [f.name for f in families.FAMILIES]


# ---------------------------------------------------------------- derived tables equal the references


def test_derived_partition_rules_equal_the_reference():
    assert list(sharding.RULES) == list(REFERENCE_RULES)  # one rule set per family, in table order
    for name, rules in REFERENCE_RULES.items():
        assert sharding.RULES[name] == rules, name  # the same (regex, spec) pairs in the same order


@pytest.mark.parametrize("table", list(REFERENCE_TABLES))
def test_derived_class_tables_equal_the_reference(table):
    derived, reference = REFERENCE_TABLES[table]
    assert set(derived) == reference
    assert len(derived) == len(reference)  # no name listed twice


# ---------------------------------------------------------------- every record is complete and consistent


@functools.cache
def _flax_modules(family: families.Family) -> tuple:
    """transformers' Flax modeling modules of the family's model types."""
    modules = []
    for model_type in family.model_types:
        name = model_type_to_module_name(model_type)
        modules.append(importlib.import_module(f"transformers.models.{name}.modeling_flax_{name}"))
    return tuple(modules)


@pytest.mark.parametrize("name", NAMES)
def test_record_is_complete(name):
    family = families.get_family(name)
    assert family.kind in families.KINDS
    assert family.model_types and all(t in CONFIG_MAPPING for t in family.model_types)
    assert _flax_modules(family)  # each model type has a Flax implementation (import fails otherwise)
    assert family.out_axis in (0, 1)
    for rx in (family.signature, *family.targets, *family.head):
        re.compile(rx)
    layout = family.sharding
    if layout.rules:  # a layout written out whole replaces the template
        assert not (layout.col or layout.row or layout.embeddings or layout.extra)
    else:
        assert layout.col and layout.row and layout.embeddings
    for rx, spec in sharding.RULES[name]:
        re.compile(rx)
        assert isinstance(spec, P) and set(jax.tree.leaves(tuple(spec))) <= set(sharding.AXES)


@pytest.mark.parametrize("name", [f.name for f in families.FAMILIES if f.kind == "causal-lm"])
def test_causal_lm_records_have_a_causal_lm_class_per_model_type(name):
    family = families.get_family(name)
    mapping = tf.FlaxAutoModelForCausalLM._model_mapping
    assert all(CONFIG_MAPPING[t] in mapping for t in family.model_types)


@pytest.mark.parametrize("name", NAMES)
def test_fast_path_classes_exist_in_the_family_modules(name):
    family = families.get_family(name)
    fast = family.fast
    assert bool(fast.self_attention) == bool(fast.attention_style)
    assert fast.attention_style in ("", *families.ATTENTION_STYLES)
    modules = _flax_modules(family)
    for field in dataclasses.fields(fast):
        if field.name == "attention_style":
            continue
        names = getattr(fast, field.name)
        assert len(set(names)) == len(names), field.name
        for class_name in names:
            found = [getattr(m, class_name) for m in modules if hasattr(m, class_name)]
            assert found, f"{class_name} ({field.name}) is in none of {[m.__name__ for m in modules]}"
            if field.name == "first_token_heads":  # the model classes users instantiate
                assert getattr(tf, class_name) is found[0]
            else:
                assert issubclass(found[0], nn.Module), class_name
    if fast.remat_layers:
        assert family.kind == "causal-lm" and fast.attention_style == "decoder"
    if fast.first_token_heads:
        assert family.kind == "encoder" and fast.layers and fast.attention_style == "encoder"


def test_records_are_unique_and_post_init_checks_them():
    assert len(set(NAMES)) == len(NAMES)
    types = [t for f in families.FAMILIES for t in f.model_types]
    assert len(set(types)) == len(types)  # a model type belongs to one family
    with pytest.raises(ValueError, match="kind must be one of"):
        dataclasses.replace(families.get_family("bert"), kind="decoder")
    with pytest.raises(ValueError, match="attention_style must be one of"):
        dataclasses.replace(
            families.get_family("llama"), fast=families.FastPaths(self_attention=("FlaxLlamaAttention",))
        )


@pytest.mark.parametrize("name", list(FAMILY_MODELS))
def test_tiny_model_is_recognised_and_targeted_by_its_record(name):
    """The record's signature picks it out, and its targets are exactly the test table's layer kernels."""
    config_cls, model_cls, kwargs, family_name, layer_targets, _ = FAMILY_MODELS[name]
    _, shapes = abstract_params(model_cls, config_cls(**kwargs))
    paths = list(flat_paths(shapes))
    family = families.get_family(family_name)
    assert rocoft_jax.detect_family(paths) is family
    assert any(re.search(family.signature, p) for p in paths)
    targeted = families.match_paths(paths, family.targets, "target", strict=True)
    assert targeted and {re.sub(r"^.*?/\d+/(.*)/kernel$", r"\1", p) for p in targeted} == set(layer_targets)
    for other in families.FAMILIES:  # no other family's signature claims it before its own
        if other is family:
            break
        assert not any(re.search(other.signature, p) for p in paths), other.name


@pytest.mark.parametrize("name", list(FAMILY_MODELS))
def test_every_family_has_partition_rules_that_split_the_target_layers(name):
    """Rules cover every 2-D leaf of each family (an unmatched one is an error); targets split over tensor."""
    config_cls, model_cls, kwargs, family, layer_targets, _ = FAMILY_MODELS[name]
    _, params = abstract_params(model_cls, config_cls(**kwargs))
    mesh = AbstractMesh((2, 2, 2), sharding.AXES)
    specs = flatten(sharding.partition_specs(params, family, mesh))
    out_axis = families.get_family(family).out_axis
    for path, spec in specs.items():
        if path.endswith("/kernel") and any(f"/{t}/kernel" in path for t in layer_targets):
            assert "tensor" in tuple(spec), (path, spec)  # column- or row-parallel, never replicated
        if "embed" in path or "wte" in path:
            assert "tensor" not in tuple(spec)[:1] or out_axis == 0, (path, spec)
