"""The f(x) that `train.ntk` differentiates, and the encoder of its inputs, for a model and task.

`load_model` returns ``(forward, params, encode)``: a prompt-based f (the label words' logits at the
mask; needs a masked-LM head and configs/ntk/<task>.yaml, or --prompt-config) or a fixed linear readout
on the pooled output, chosen by --head. `checkpoint_pooling` decides what --pooling auto reads out.
"""

from __future__ import annotations

import json
from pathlib import Path

from train.errors import ConfigError


def checkpoint_pooling(model: str) -> str:
    """What --pooling auto reads out: "mean" when ``model`` is a dir whose sentence-transformers Pooling
    module (modules.json, else 1_Pooling/) averages the tokens, else "pooler" (hub ids, plain dirs, and
    CLS pooling, for which the pooler is our nearest option)."""
    root = Path(model)
    path = root / "1_Pooling"
    if (root / "modules.json").is_file():
        pooling = [
            m["path"] for m in json.loads((root / "modules.json").read_text()) if m.get("type", "").endswith(".Pooling")
        ]
        path = root / pooling[0] if pooling else None
    if path is None or not (path / "config.json").is_file():
        return "pooler"
    return "mean" if json.loads((path / "config.json").read_text()).get("pooling_mode_mean_tokens") else "pooler"


def load_model(config, spec):
    """``(forward, params, encode)`` for a `train.ntk.NTKConfig`: f of the chosen head, and a function encoding
    raw columns."""
    from rocoft_jax.ntk import forwards as ntk_forwards
    from train import input_pipeline as pipeline
    from train import models, prompts

    if config.model == "tiny":
        from train.tasks.demo import make_demo_tokenizer

        prompt_head = config.head == "prompt"
        model_cfg = models.preset_config("tiny", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        model, params = models.random_model(model_cfg, "masked-lm" if prompt_head else "base")
        tokenizer = make_demo_tokenizer(model_max_length=model_cfg.max_position_embeddings - 2)
    else:
        from transformers import AutoTokenizer

        model_cfg = models.load_config(config.model)
        masked_lm = any(a.endswith("ForMaskedLM") for a in (model_cfg.architectures or []))
        prompt_head = config.head == "prompt" or (config.head == "auto" and masked_lm)
        model, params = models.load_pretrained(config.model, "masked-lm" if prompt_head else "base")
        tokenizer = AutoTokenizer.from_pretrained(config.model, use_fast=True)
    if prompt_head:
        prompt = prompts.load_prompt(spec.name, config.prompt_config)
        if len(prompt.label_words) != spec.num_labels:
            raise ConfigError(
                f"{spec.name} has {spec.num_labels} classes but the prompt {len(prompt.label_words)} label words"
            )
        forward = ntk_forwards.PromptForward(model, prompts.label_word_ids(tokenizer, prompt.label_words))
        return (
            forward,
            params,
            lambda cols: prompts.encode_prompts(tokenizer, cols, spec.text_keys, prompt, config.max_length),
        )
    readout = ntk_forwards.init_readout(model.config.hidden_size, spec.num_labels, config.readout_seed)
    pooling = config.pooling
    if pooling == "auto":
        pooling = "pooler" if config.model == "tiny" else checkpoint_pooling(config.model)
        print(f"--pooling auto: reading out {pooling}")
    forward = ntk_forwards.ReadoutForward(model, readout, pooling)

    def encode(cols):
        enc = pipeline.encode(tokenizer, cols, spec.text_keys, config.max_length)
        enc.pop("labels")
        return enc

    return forward, params, encode
