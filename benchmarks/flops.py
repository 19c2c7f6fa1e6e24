"""Analytic "useful" FLOPs of a RoCoFT step: the forward pass plus the input gradient.

That is the work any method must do to train the upper layers of a frozen
network; the weight gradient is what RoCoFT saves. Attention has no weights,
so its whole backward (2x its forward) counts as input gradient. Matmuls count
2 FLOPs per multiply-add.
"""

from __future__ import annotations


def _dims(config):
    h = config.hidden_size
    layers = config.num_hidden_layers
    inter = config.intermediate_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return h, layers, inter, heads, kv_heads


def forward_flops(config, batch: int, seq: int, head: str) -> tuple[float, float]:
    """``(linear, attention)`` forward FLOPs of one batch."""
    h, layers, inter, heads, kv_heads = _dims(config)
    tokens = batch * seq
    kv = h * kv_heads // heads
    gated = getattr(config, "model_type", "") in ("llama", "mistral", "gemma")
    mlp = (3 if gated else 2) * h * inter
    linear = 2 * tokens * layers * (2 * h * h + 2 * h * kv + mlp)
    attention = 2 * tokens * layers * 2 * seq * h  # QK^T and PV
    if head == "causal-lm":
        linear += 2 * tokens * h * config.vocab_size
    return float(linear), float(attention)


def useful_step_flops(config, batch: int, seq: int, head: str) -> float:
    """Forward + input-gradient FLOPs of one training step."""
    linear, attention = forward_flops(config, batch, seq, head)
    return 2 * linear + 3 * attention
