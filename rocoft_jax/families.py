"""Which kernels RoCoFT trains, per model family, in one table.

Parameters are addressed by their "/"-joined path, e.g.
``roberta/encoder/layer/0/attention/self/query/kernel``. A family is recognised
from those paths alone, so the table works for HF Flax models, their headless
bases and any params pytree that reuses HF's module names.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Sequence



@dataclasses.dataclass(frozen=True)
class Family:
    """Default RoCoFT targets of one model family.

    ``out_axis`` is the kernel axis of the output units: 1 for ``nn.Dense``
    kernels (d_in, d_out), 0 for GPT-2's ``FlaxConv1D`` kernels (d_out, d_in).
    ``head`` are the leaves trained in full by default (peft's
    ``modules_to_save``): the classification head of sequence classifiers.
    """

    name: str
    signature: str
    targets: tuple[str, ...]
    head: tuple[str, ...] = ()
    out_axis: int = 1


_ENCODER_LAYER = r"layer/\d+/(attention/(self/(query|key|value)|output/dense)|intermediate/dense|output/dense)/kernel$"

FAMILIES: tuple[Family, ...] = (
    # BERT, RoBERTa, XLM-R, ELECTRA, CamemBERT share HF's BERT module names.
    Family(
        name="bert",
        signature=r"encoder/layer/\d+/attention/self/query/kernel$",
        targets=(_ENCODER_LAYER,),
        head=(r"(^|/)pooler/", r"^classifier/"),
    ),
    Family(
        name="distilbert",
        signature=r"transformer/layer/\d+/attention/q_lin/kernel$",
        targets=(r"layer/\d+/(attention/(q_lin|k_lin|v_lin|out_lin)|ffn/(lin1|lin2))/kernel$",),
        head=(r"^pre_classifier/", r"^classifier/"),
    ),
    Family(
        name="bart",
        signature=r"encoder/layers/\d+/self_attn/q_proj/kernel$",
        targets=(r"layers/\d+/((self_attn|encoder_attn)/(q_proj|k_proj|v_proj|out_proj)|fc1|fc2)/kernel$",),
        head=(r"^classification_head/",),
    ),
    Family(
        name="llama",  # also Mistral and Gemma
        signature=r"layers/\d+/mlp/gate_proj/kernel$",
        targets=(r"layers/\d+/(self_attn/(q_proj|k_proj|v_proj|o_proj)|mlp/(gate_proj|up_proj|down_proj))/kernel$",),
    ),
    Family(
        name="opt",
        signature=r"decoder/layers/\d+/self_attn/q_proj/kernel$",
        targets=(r"layers/\d+/(self_attn/(q_proj|k_proj|v_proj|out_proj)|fc1|fc2)/kernel$",),
    ),
    Family(
        name="gptj",
        signature=r"h/\d+/attn/q_proj/kernel$",
        targets=(r"h/\d+/(attn/(q_proj|k_proj|v_proj|out_proj)|mlp/(fc_in|fc_out))/kernel$",),
    ),
    Family(
        name="bloom",
        signature=r"h/\d+/self_attention/query_key_value/kernel$",
        targets=(r"h/\d+/(self_attention/(query_key_value|dense)|mlp/(dense_h_to_4h|dense_4h_to_h))/kernel$",),
    ),
    Family(
        name="gpt2",
        signature=r"h/\d+/attn/c_attn/kernel$",
        targets=(r"h/\d+/(attn/(c_attn|c_proj)|mlp/(c_fc|c_proj))/kernel$",),
        out_axis=0,
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
