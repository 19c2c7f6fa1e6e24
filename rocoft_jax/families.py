"""Everything the library knows of a model family, in one record per family (`FAMILIES`).

A `Family` holds the default RoCoFT targets and trained head, whether the family
is an encoder, a causal LM or seq2seq, its sharding layout (which projections
are column- or row-parallel), and the HF class names the fast paths intercept.
`rocoft_jax.sharding`'s rules and every fast-path table are derived from these
records, so adding a family is one edit here (docs/design.md, "Adding a model
family").

Parameters are addressed by their "/"-joined path, e.g.
``roberta/encoder/layer/0/attention/self/query/kernel``. A family is recognised
from those paths alone (`detect_family`), so the records work for HF Flax models,
their headless bases and any params pytree that reuses HF's module names; an
unrecognised layout is an error unless explicit targets are given.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Sequence

from jax.sharding import PartitionSpec as P

KINDS = ("encoder", "causal-lm", "seq2seq")
ATTENTION_STYLES = ("encoder", "decoder")


@dataclasses.dataclass(frozen=True)
class Sharding:
    """How a family's frozen weights split over the mesh (`rocoft_jax.sharding`).

    ``col`` and ``row`` are regex alternatives of layer paths: column-parallel
    layers split their output (heads, MLP width) over "tensor", row-parallel
    ones their input. ``embeddings`` names the token embedding tables, split
    over "fsdp"; ``extra`` are further ``(regex, PartitionSpec)`` rules, tried
    after those (and after the replicated position embeddings). ``rules``, when given, is the whole rule list instead:
    for layouts the Megatron template does not fit (GPT-2's (d_out, d_in) kernels).
    """

    col: str = ""
    row: str = ""
    embeddings: str = ""
    extra: tuple[tuple[str, P], ...] = ()
    rules: tuple[tuple[str, P], ...] = ()


@dataclasses.dataclass(frozen=True)
class FastPaths:
    """The HF Flax class names whose ``__call__`` the fast paths (`rocoft_jax.fast`) replace.

    Empty where a family has no fast path; the model then runs its own code.
    ``self_attention`` classes match through the MRO (subclasses too) and are
    ``attention_style`` "encoder" (BERT-style query/key/value) or "decoder"
    (Llama-style projections, rotary embeddings, causal mask).
    ``attention_outputs``, ``intermediates`` and ``outputs`` are the residual
    LayerNorm and GELU MLP layers of BERT-style encoders; ``layers`` the encoder
    layers run for token 0 alone under ``first_token_heads`` (sequence
    classifiers that read nothing else); ``remat_layers`` the decoder layers
    rematerialized per layer.
    """

    self_attention: tuple[str, ...] = ()
    attention_style: str = ""
    attention_outputs: tuple[str, ...] = ()
    intermediates: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    layers: tuple[str, ...] = ()
    first_token_heads: tuple[str, ...] = ()
    remat_layers: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Family:
    """Everything the library knows of one model family.

    ``signature`` is a path regex found only in this family's params (`detect_family`).
    ``targets`` are the kernels RoCoFT slices by default. ``head`` are the leaves
    trained in full by default (peft's ``modules_to_save``): the classification
    head of sequence classifiers, the span head (``qa_outputs``) of question
    answering. ``out_axis`` is the kernel axis of the output units: 1 for
    ``nn.Dense`` kernels (d_in, d_out), 0 for GPT-2's ``FlaxConv1D`` kernels
    (d_out, d_in). ``kind`` is "encoder", "causal-lm" or "seq2seq";
    ``model_types`` the HF ``config.model_type``s the record covers.
    """

    name: str
    signature: str
    targets: tuple[str, ...]
    kind: str
    model_types: tuple[str, ...]
    sharding: Sharding
    head: tuple[str, ...] = ()
    out_axis: int = 1
    fast: FastPaths = FastPaths()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"family {self.name!r}: kind must be one of {KINDS}; got {self.kind!r}")
        if self.fast.self_attention and self.fast.attention_style not in ATTENTION_STYLES:
            raise ValueError(f"family {self.name!r}: attention_style must be one of {ATTENTION_STYLES}")


_ENCODER_LAYER = r"layer/\d+/(attention/(self/(query|key|value)|output/dense)|intermediate/dense|output/dense)/kernel$"
_LM_HEAD = ((r"lm_head/kernel$", P("fsdp", "tensor")),)


FAMILIES: tuple[Family, ...] = (
    # BERT, RoBERTa, XLM-R, ELECTRA and HF's copies of BERT share its module names.
    Family(
        name="bert",
        signature=r"encoder/layer/\d+/attention/self/query/kernel$",
        targets=(_ENCODER_LAYER,),
        kind="encoder",
        model_types=("bert", "roberta", "xlm-roberta", "electra", "roberta-prelayernorm", "big_bird"),
        head=(r"(^|/)pooler/", r"^classifier/", r"^qa_outputs/"),
        sharding=Sharding(
            col=r"attention/self/(query|key|value)|intermediate/dense",
            row=r"output/dense",
            embeddings="word_embeddings",
            extra=(
                (r"embeddings/\w+_embeddings/embedding$", P()),
                (r"(embeddings_project|lm_head|cls|generator_\w+|discriminator_\w+)/", P()),
            ),  # ELECTRA, MLM heads
        ),
        fast=FastPaths(
            self_attention=(
                "FlaxBertSelfAttention",
                "FlaxRobertaSelfAttention",
                "FlaxXLMRobertaSelfAttention",
                "FlaxElectraSelfAttention",
                # HF's exact copies (BigBird in its "original_full" mode)
                "FlaxRobertaPreLayerNormSelfAttention",
                "FlaxBigBirdSelfAttention",
            ),
            attention_style="encoder",
            attention_outputs=(
                "FlaxBertSelfOutput",
                "FlaxRobertaSelfOutput",
                "FlaxXLMRobertaSelfOutput",
                "FlaxElectraSelfOutput",
            ),
            intermediates=(
                "FlaxBertIntermediate",
                "FlaxRobertaIntermediate",
                "FlaxXLMRobertaIntermediate",
                "FlaxElectraIntermediate",
            ),
            outputs=("FlaxBertOutput", "FlaxRobertaOutput", "FlaxXLMRobertaOutput", "FlaxElectraOutput"),
            layers=("FlaxBertLayer", "FlaxRobertaLayer", "FlaxXLMRobertaLayer", "FlaxElectraLayer"),
            first_token_heads=(
                "FlaxBertForSequenceClassification",
                "FlaxRobertaForSequenceClassification",
                "FlaxXLMRobertaForSequenceClassification",
                "FlaxElectraForSequenceClassification",
            ),
        ),
    ),
    Family(
        name="distilbert",
        signature=r"transformer/layer/\d+/attention/q_lin/kernel$",
        targets=(r"layer/\d+/(attention/(q_lin|k_lin|v_lin|out_lin)|ffn/(lin1|lin2))/kernel$",),
        kind="encoder",
        model_types=("distilbert",),
        head=(r"^pre_classifier/", r"^classifier/", r"^qa_outputs/"),
        sharding=Sharding(
            col=r"attention/(q_lin|k_lin|v_lin)|ffn/lin1",
            row=r"attention/out_lin|ffn/lin2",
            embeddings="word_embeddings",
        ),
    ),
    Family(
        name="bart",
        signature=r"encoder/layers/\d+/self_attn/q_proj/kernel$",
        targets=(r"layers/\d+/((self_attn|encoder_attn)/(q_proj|k_proj|v_proj|out_proj)|fc1|fc2)/kernel$",),
        kind="seq2seq",
        # HF's BART-derived encoder-decoders share its module names (summarization: *ForConditionalGeneration)
        model_types=("bart", "mbart", "pegasus", "marian", "blenderbot", "blenderbot-small"),
        head=(r"^classification_head/", r"^qa_outputs/"),
        sharding=Sharding(
            col=r"(self_attn|encoder_attn)/(q_proj|k_proj|v_proj)|fc1",
            row=r"(self_attn|encoder_attn)/out_proj|fc2",
            embeddings="shared|embed_tokens",
            extra=((r"final_logits_bias$", P()), *_LM_HEAD),  # the seq2seq LM head (lm_head when untied)
        ),
    ),
    Family(
        name="llama",
        signature=r"layers/\d+/mlp/gate_proj/kernel$",
        targets=(r"layers/\d+/(self_attn/(q_proj|k_proj|v_proj|o_proj)|mlp/(gate_proj|up_proj|down_proj))/kernel$",),
        kind="causal-lm",
        model_types=("llama", "mistral", "gemma"),
        sharding=Sharding(
            col=r"self_attn/(q_proj|k_proj|v_proj)|mlp/(gate_proj|up_proj)",
            row=r"self_attn/o_proj|mlp/down_proj",
            embeddings="embed_tokens",
            extra=_LM_HEAD,
        ),
        fast=FastPaths(
            self_attention=("FlaxLlamaAttention", "FlaxMistralAttention", "FlaxGemmaAttention"),
            attention_style="decoder",
            remat_layers=("FlaxLlamaDecoderLayer", "FlaxMistralDecoderLayer", "FlaxGemmaDecoderLayer"),
        ),
    ),
    Family(
        name="opt",
        signature=r"decoder/layers/\d+/self_attn/q_proj/kernel$",
        targets=(r"layers/\d+/(self_attn/(q_proj|k_proj|v_proj|out_proj)|fc1|fc2)/kernel$",),
        kind="causal-lm",
        model_types=("opt",),
        sharding=Sharding(
            col=r"self_attn/(q_proj|k_proj|v_proj)|fc1",
            row=r"self_attn/out_proj|fc2",
            embeddings="embed_tokens",
            extra=((r"(project_in|project_out)/kernel$", P()), *_LM_HEAD),
        ),
    ),
    Family(
        name="gptj",
        signature=r"h/\d+/attn/q_proj/kernel$",
        targets=(r"h/\d+/(attn/(q_proj|k_proj|v_proj|out_proj)|mlp/(fc_in|fc_out))/kernel$",),
        kind="causal-lm",
        model_types=("gptj",),
        sharding=Sharding(
            col=r"attn/(q_proj|k_proj|v_proj)|mlp/fc_in",
            row=r"attn/out_proj|mlp/fc_out",
            embeddings="wte",
            extra=_LM_HEAD,
        ),
    ),
    Family(
        name="bloom",
        signature=r"h/\d+/self_attention/query_key_value/kernel$",
        targets=(r"h/\d+/(self_attention/(query_key_value|dense)|mlp/(dense_h_to_4h|dense_4h_to_h))/kernel$",),
        kind="causal-lm",
        model_types=("bloom",),
        sharding=Sharding(
            col=r"self_attention/query_key_value|mlp/dense_h_to_4h",
            row=r"self_attention/dense|mlp/dense_4h_to_h",
            embeddings="word_embeddings",
        ),
    ),
    Family(
        name="gpt2",
        signature=r"h/\d+/attn/c_attn/kernel$",
        targets=(r"h/\d+/(attn/(c_attn|c_proj)|mlp/(c_fc|c_proj))/kernel$",),
        kind="causal-lm",
        model_types=("gpt2",),
        out_axis=0,
        # Conv1D kernels are (d_out, d_in): the Megatron layout, mirrored.
        sharding=Sharding(
            rules=(
                (r"(attn/c_attn|mlp/c_fc)/kernel$", P("tensor", "fsdp")),
                (r"(attn/c_attn|mlp/c_fc)/bias$", P("tensor")),
                (r"(attn/c_proj|mlp/c_proj)/kernel$", P("fsdp", "tensor")),
                (r"wte/embedding$", P(None, "fsdp")),
                (r"wpe/embedding$", P()),
            )
        ),
    ),
)

_BY_NAME = {f.name: f for f in FAMILIES}


def detect_family(paths: Iterable[str]) -> Family:
    """The family whose signature path occurs in ``paths``."""
    paths = list(paths)
    for family in FAMILIES:
        sig = re.compile(family.signature)
        if any(sig.search(p) for p in paths):
            return family
    example = next((p for p in paths if p.endswith("kernel")), paths[0] if paths else "<empty>")
    raise ValueError(
        f"unknown model family: no known layout matches parameter paths like {example!r}. "
        f"Known families: {', '.join(_BY_NAME)}. Pass targets=[regex, ...] over '/'-joined kernel paths."
    )


def get_family(name: str) -> Family:
    """The family record called ``name``."""
    if name not in _BY_NAME:
        raise ValueError(f"unknown family {name!r}; choose one of: {', '.join(_BY_NAME)}")
    return _BY_NAME[name]


def match_paths(paths: Iterable[str], patterns: Sequence[str], what: str, strict: bool) -> list[str]:
    """Paths matched by any regex in ``patterns`` (``re.search``).

    With ``strict``, a pattern that matches nothing is an error: it is almost
    always a typo, and silently training less than asked is worse.
    """
    paths = list(paths)
    hits: list[str] = []
    for pattern in patterns:
        rx = re.compile(pattern)
        found = [p for p in paths if rx.search(p)]
        if strict and not found:
            sample = ", ".join(p for p in paths[:4])
            raise ValueError(
                f"{what} pattern {pattern!r} matches no parameter. Patterns are regexes searched in "
                f"'/'-joined paths such as {sample}."
            )
        hits.extend(found)
    return [p for p in paths if p in set(hits)]


def collect(field: Callable[[Family], Iterable[str]]) -> frozenset[str]:
    """The union of ``field(family)`` over every family: the tables the fast paths look names up in."""
    return frozenset(name for family in FAMILIES for name in field(family))


def model_types(kind: str) -> tuple[str, ...]:
    """The HF ``model_type``s of the families of ``kind`` ("encoder", "causal-lm" or "seq2seq")."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {KINDS}")
    return tuple(t for family in FAMILIES if family.kind == kind for t in family.model_types)
