"""Analytic "useful" FLOPs of a RoCoFT step: the forward pass plus the input gradient.

That is the work any method must do to train the upper layers of a frozen
network; the weight gradient is what RoCoFT saves. Attention has no weights,
so its whole backward (2x its forward) counts as input gradient. Matmuls count
2 FLOPs per multiply-add. A BERT-family classifier reads token 0 of the last
layer alone, so that layer needs keys and values for every token and the rest
for one token a sequence (`rocoft_jax.fast.first_token_only`); only that counts.
"""

from __future__ import annotations


def _dims(config):
    h = config.hidden_size
    layers = config.num_hidden_layers
    inter = config.intermediate_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return h, layers, inter, heads, kv_heads


# ``model_type`` of the families whose sequence classifier reads token 0 alone (`rocoft_jax.fast.first_token`).
FIRST_TOKEN_TYPES = ("bert", "roberta", "xlm-roberta", "electra")


def forward_flops(config, batch: int, seq: int, head: str) -> tuple[float, float]:
    """``(linear, attention)`` forward FLOPs of one batch."""
    h, layers, inter, heads, kv_heads = _dims(config)
    tokens = batch * seq
    kv = h * kv_heads // heads
    gated = getattr(config, "model_type", "") in ("llama", "mistral", "gemma")
    mlp = (3 if gated else 2) * h * inter
    keys_values, rest = 2 * h * kv, 2 * h * h + mlp  # multiply-adds per token of one layer
    # Queries for every token, or for token 0 alone in the last layer (see the module doc).
    queries = [tokens] * layers
    if head == "sequence-classification" and getattr(config, "model_type", "") in FIRST_TOKEN_TYPES:
        queries[-1] = batch
    linear = 2 * sum(tokens * keys_values + q * rest for q in queries)
    attention = 2 * sum(queries) * 2 * seq * h  # QK^T and PV
    if head == "causal-lm":
        linear += 2 * tokens * h * config.vocab_size
    return float(linear), float(attention)


def useful_step_flops(config, batch: int, seq: int, head: str) -> float:
    """Forward + input-gradient FLOPs of one training step."""
    linear, attention = forward_flops(config, batch, seq, head)
    return 2 * linear + 3 * attention
