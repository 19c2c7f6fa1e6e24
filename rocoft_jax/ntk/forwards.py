"""What f is for the NTK: the model outputs whose parameter gradients the kernel compares.

Two classes give one output, the logit difference; more give one output per class.
Models with a masked-LM head are read prompt-based (LM-BFF; Malladi et al., 2023): the label
words' logits at the mask. Models without one get a linear readout of the pooled output,
fixed at init; it is part of f, not of any parameter subset.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np


def class_outputs(logits):
    """The outputs f of class logits: their difference (one output) for two classes, else the logits."""
    return logits[:, 1:] - logits[:, :1] if logits.shape[-1] == 2 else logits


def init_readout(hidden: int, num_classes: int, seed: int = 0) -> np.ndarray:
    """A fixed ``(hidden, num_classes)`` readout, N(0, 1/hidden), for models without an LM head."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((hidden, num_classes)) / np.sqrt(hidden)).astype(np.float32)


MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


@dataclasses.dataclass(frozen=True, eq=False)
class ReadoutForward:
    """f(x) = class_outputs(pooled(x) @ readout): ``pooling`` "pooler" (HF's pooled output) or "mean"."""

    model: Any
    readout: np.ndarray
    pooling: str = "pooler"

    def __call__(self, params, batch):
        out = self.model(**{k: batch[k] for k in MODEL_INPUTS if k in batch}, params=params)
        if self.pooling == "pooler":
            pooled = out.pooler_output
        else:
            weights = batch["attention_mask"][..., None].astype(out.last_hidden_state.dtype)
            pooled = (out.last_hidden_state * weights).sum(1) / weights.sum(1)
        return class_outputs(pooled.astype(jnp.float32) @ self.readout)


@dataclasses.dataclass(frozen=True, eq=False)
class PromptForward:
    """f(x) = class_outputs(label words' logits at the mask): prompt-based, as LM-BFF.

    Batches carry ``mask_pos``, the mask token's position in each example.
    """

    model: Any
    label_ids: tuple[int, ...]

    def __call__(self, params, batch):
        logits = self.model(**{k: batch[k] for k in MODEL_INPUTS if k in batch}, params=params).logits
        at_mask = logits[jnp.arange(logits.shape[0]), batch["mask_pos"]]
        return class_outputs(at_mask[:, jnp.asarray(self.label_ids)].astype(jnp.float32))
