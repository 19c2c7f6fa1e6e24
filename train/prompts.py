"""Prompts for the NTK's prompt-based f(x): a template with a mask token, and one label word per class.

``configs/ntk/<task>.yaml`` holds ``template`` (Python format fields: the task's text columns
and ``{mask}``) and ``label_words`` in label-id order, from LM-BFF (Gao et al., 2021) as used
by Malladi et al. (2023). f(x) reads the label words' logits at the mask position.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from train.config_files import CONFIG_DIR
from train.errors import ConfigError
from train.options import load_yaml

_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclasses.dataclass(frozen=True)
class Prompt:
    template: str
    label_words: tuple[str, ...]


def load_prompt(task: str, path: str | Path | None = None) -> Prompt:
    """The prompt of ``task`` from ``path`` or ``configs/ntk/<task>.yaml``."""
    path = Path(path) if path else CONFIG_DIR / "ntk" / f"{task}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"no prompt for task {task!r}: {path} is missing; pass --prompt-config FILE with "
            "'template' (with {mask}) and 'label_words', or use --head readout"
        )
    values = load_yaml(path)
    if set(values) != {"template", "label_words"} or "{mask}" not in str(values.get("template", "")):
        raise ConfigError(f"{path}: needs exactly the keys 'template' (containing {{mask}}) and 'label_words'")
    if not isinstance(values["label_words"], list) or not values["label_words"]:
        raise ConfigError(f"{path}: label_words must be a list of words, one per class in label-id order")
    return Prompt(str(values["template"]), tuple(str(w) for w in values["label_words"]))


def label_word_ids(tokenizer, words: Sequence[str]) -> tuple[int, ...]:
    """One token id per label word, as it reads after a space (RoBERTa's "Ġgreat")."""
    ids = []
    for word in words:
        for text in (" " + word, word):
            tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(tokens) == 1:
                ids.append(int(tokens[0]))
                break
        else:
            raise ConfigError(f"label word {word!r} is not one token of this tokenizer; choose another word")
    if len(set(ids)) != len(ids):
        raise ConfigError(f"label words {list(words)} share a token; choose distinct words")
    return tuple(ids)


def _fill(prompt: Prompt, tokenizer, fields: dict[str, str], max_length: int) -> list[int]:
    """Token ids of the filled template; the longest field loses words until it fits."""
    fields = dict(fields)
    while True:
        ids = tokenizer(prompt.template.format(mask=tokenizer.mask_token, **fields))["input_ids"]
        excess = len(ids) - max_length
        if excess <= 0:
            return ids
        longest = max(fields, key=lambda k: len(fields[k].split()))
        words = fields[longest].split()
        if not words:
            raise ConfigError(f"the template alone exceeds --max-length {max_length}; raise it")
        fields[longest] = " ".join(words[: max(0, len(words) - max(1, excess // 2))])


def encode_prompts(
    tokenizer, columns: Mapping[str, list], text_keys: Sequence[str], prompt: Prompt, max_length: int
) -> dict[str, np.ndarray]:
    """Fixed-shape int32 arrays (padded to ``max_length``) plus ``mask_pos``, one row per example."""
    if tokenizer.mask_token is None:
        raise ConfigError("this tokenizer has no mask token; use --head readout")
    n = len(columns[text_keys[0]])
    out = {
        "input_ids": np.full((n, max_length), tokenizer.pad_token_id, np.int32),
        "attention_mask": np.zeros((n, max_length), np.int32),
        "mask_pos": np.zeros((n,), np.int32),
    }
    for i in range(n):
        ids = _fill(prompt, tokenizer, {k: str(columns[k][i]) for k in text_keys}, max_length)
        if ids.count(tokenizer.mask_token_id) != 1:
            count = ids.count(tokenizer.mask_token_id)
            raise ConfigError(f"the template must yield exactly one mask token; got {count}")
        out["input_ids"][i, : len(ids)] = ids
        out["attention_mask"][i, : len(ids)] = 1
        out["mask_pos"][i] = ids.index(tokenizer.mask_token_id)
    if "token_type_ids" in tokenizer.model_input_names:
        out["token_type_ids"] = np.zeros((n, max_length), np.int32)
    return out
