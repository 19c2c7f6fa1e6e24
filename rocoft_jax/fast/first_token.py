"""The last encoder layer for the first token only, for heads that read nothing else.

The sequence-classification heads of the BERT family (BERT, RoBERTa, XLM-R,
ELECTRA) read only token 0 of the last hidden state (BERT through its pooler).
In the last layer, then, only the keys and values need every token: the other
tokens' queries, attention rows, output projection, LayerNorms and MLP feed
nothing, and XLA cannot drop them itself, since they are dense over the token
axis. `first_token_only` runs that layer through the modules' own submodules:
its self-attention for the query at token 0 (the query, key and value layers
are the module's own; the attention math is HF's, restated), then the rest of
the layer on token 0. Other interceptors (`sliced_kernels`, LoRA, `fast_gelu`)
still apply, and the layer returns a one-token hidden state, which the head
indexes at 0.

It is exact (same ops, same order, for the rows the head reads), dropout
included: every dropout mask of the layer is drawn at its full-sequence shape,
as HF draws it, and cut to token 0. It falls back to the whole layer (the
module's own call) for ``output_attentions``, cross-attention and a KV cache,
and does nothing for models whose head reads other tokens
(`reads_first_token_only`). Measurements: docs/performance.md.
"""

from __future__ import annotations

import collections
import contextlib

import flax.linen as nn
import jax.numpy as jnp
from flax.linen.attention import dot_product_attention_weights
from jax import lax

from rocoft_jax import families
from rocoft_jax.fast.attention import bind_arguments, broadcast_dropout_multiplier, split_heads
from rocoft_jax.intercept import replace_calls

LAYERS = families.collect(lambda f: f.fast.layers)
HEADS = families.collect(lambda f: f.fast.first_token_heads)


def reads_first_token_only(model) -> bool:
    """Whether ``model``'s output depends on its last hidden state through token 0 alone."""
    return type(model).__name__ in HEADS


def _is_last_layer(module) -> bool:
    return module.path[-2:] == ("layer", str(module.config.num_hidden_layers - 1))


def _fallback_reason(arguments) -> str | None:
    if arguments["output_attentions"]:
        return "output_attentions"
    if arguments["encoder_hidden_states"] is not None:
        return "cross_attention"
    if arguments["init_cache"]:
        return "kv_cache"
    return None


def _first_query_attention(module, hidden, attention_mask, head_mask, deterministic: bool):
    """HF's ``FlaxBertSelfAttention.__call__`` (encoder self-attention) for the query at token 0 alone.

    Its dropout keeps row 0 of the (1, 1, T, S) mask HF's ``broadcast_dropout`` draws from the same key.
    """
    query = split_heads(module.query(hidden[:, :1]), module.head_dim)
    key = split_heads(module.key(hidden), module.head_dim)
    value = split_heads(module.value(hidden), module.head_dim)
    bias = None
    if attention_mask is not None:
        mask = jnp.expand_dims(attention_mask, axis=(-3, -2))
        bias = lax.select(
            mask > 0,
            jnp.full(mask.shape, 0.0).astype(module.dtype),
            jnp.full(mask.shape, jnp.finfo(module.dtype).min).astype(module.dtype),
        )
    weights = dot_product_attention_weights(query, key, bias=bias, dtype=module.dtype, precision=None)
    rate = module.config.attention_probs_dropout_prob
    if not deterministic and rate > 0.0:  # HF's (T, S) mask, row 0
        weights = weights * broadcast_dropout_multiplier(module, rate, hidden.shape[1], key.shape[1])[:1]
    if head_mask is not None:
        weights = jnp.einsum("...hqk,h->...hqk", weights, head_mask)
    out = jnp.einsum("...hqk,...khd->...qhd", weights, value)
    return out.reshape(out.shape[:2] + (-1,))


@contextlib.contextmanager
def _dropout_over(tokens: int):
    """Context in which ``nn.Dropout`` on (B, 1, ...) draws its mask at (B, tokens, ...), as HF's layer
    does, and keeps token 0's."""

    def full_shape(module, args, kwargs, call_original):
        x, *rest = args
        return call_original(jnp.broadcast_to(x, x.shape[:1] + (tokens,) + x.shape[2:]), *rest, **kwargs)[:, :1]

    with replace_calls(lambda module: isinstance(module, nn.Dropout), full_shape):
        yield


def _first_token_layer(layer, arguments):
    """HF's ``FlaxBertLayer.__call__`` for token 0: ``(hidden state (B, 1, D),)``."""
    hidden, deterministic = arguments["hidden_states"], arguments["deterministic"]
    attended = _first_query_attention(
        layer.attention.self, hidden, arguments["attention_mask"], arguments["layer_head_mask"], deterministic
    )
    with _dropout_over(hidden.shape[1]):
        attention_output = layer.attention.output(attended, hidden[:, :1], deterministic=deterministic)
        return (layer.output(layer.intermediate(attention_output), attention_output, deterministic=deterministic),)


@contextlib.contextmanager
def first_token_only(model):
    """Context in which ``model``'s last encoder layer runs for token 0 only.

    ``model`` is the HF Flax model whose output the caller reads
    (`reads_first_token_only` must hold: its last hidden state keeps one token).
    Yields a ``collections.Counter`` of traced last-layer calls: "first_token",
    or "fallback:<reason>" (output_attentions, cross_attention, kv_cache).

    Example::

        with rocoft_jax.fast.first_token_only(model), rocoft_jax.sliced_kernels(trainable, mask):
            logits = model(**batch, params=rocoft_jax.with_trained_leaves(frozen, trainable)).logits
    """
    if not reads_first_token_only(model):
        raise ValueError(
            f"first_token_only needs a head that reads token 0 alone ({', '.join(sorted(HEADS))}); "
            f"got {type(model).__name__}, whose output needs every token of the last layer"
        )
    counts: collections.Counter = collections.Counter()

    def last_layer(module, args, kwargs, call_original):
        arguments = bind_arguments(module, args, kwargs)
        reason = _fallback_reason(arguments)
        if reason is not None:
            counts[f"fallback:{reason}"] += 1
            return call_original(*args, **kwargs)
        counts["first_token"] += 1
        return _first_token_layer(module, arguments)

    is_last = lambda module: type(module).__name__ in LAYERS and not module.is_initializing() and _is_last_layer(module)
    with replace_calls(is_last, last_layer):
        yield counts
