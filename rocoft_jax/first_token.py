"""The last encoder layer for the first token only, for heads that read nothing else.

The sequence-classification heads of BERT, RoBERTa, XLM-R and ELECTRA read
only token 0 of the last hidden state (BERT through its pooler). In the last
layer, then, only the keys and values need every token: the other tokens'
queries, attention rows, output projection, LayerNorms and MLP feed nothing.
XLA cannot drop them itself, since they are dense over the token axis.
`first_token_only` runs that layer through the modules' own submodules:
HF's self-attention with token 0 as its query and every token as keys and
values (its ``key_value_states`` path), then the rest of the layer on token 0.
Other interceptors (`sliced_kernels`, LoRA, `fast_gelu`) still apply, and
the layer returns a one-token hidden state, which the head indexes at 0.

It is exact (same ops, same order, for the rows the head reads) and falls back
to the whole layer where it could not be: active dropout, whose masks are
drawn over every token; ``output_attentions``; cross-attention; a KV cache.
One H100, roberta-large B=32 T=512: see docs/performance.md.
"""

from __future__ import annotations

import collections
import contextlib

import flax.linen as nn

from rocoft_jax.attention import bind_arguments

LAYERS = frozenset({"FlaxBertLayer", "FlaxRobertaLayer", "FlaxXLMRobertaLayer", "FlaxElectraLayer"})
HEADS = frozenset({"FlaxBertForSequenceClassification", "FlaxRobertaForSequenceClassification",
                   "FlaxXLMRobertaForSequenceClassification", "FlaxElectraForSequenceClassification"})


def reads_first_token_only(model) -> bool:
    """Whether ``model``'s output depends on its last hidden state through token 0 alone."""
    return type(model).__name__ in HEADS


def _is_last_layer(module) -> bool:
    return module.path[-2:] == ("layer", str(module.config.num_hidden_layers - 1))


def _fallback_reason(layer, arguments) -> str | None:
    config = layer.config
    if not arguments["deterministic"] and (config.hidden_dropout_prob > 0 or config.attention_probs_dropout_prob > 0):
        return "dropout"
    if arguments["output_attentions"]:
        return "output_attentions"
    if arguments["encoder_hidden_states"] is not None:
        return "cross_attention"
    if arguments["init_cache"]:
        return "kv_cache"
    return None


def _first_token_layer(layer, arguments):
    """HF's ``FlaxBertLayer.__call__`` for the query at token 0: ``(hidden state (B, 1, D),)``."""
    hidden, deterministic = arguments["hidden_states"], arguments["deterministic"]
    first = hidden[:, :1]
    attended = layer.attention.self(first, arguments["attention_mask"], arguments["layer_head_mask"],
                                    key_value_states=hidden, deterministic=deterministic)[0]
    attention_output = layer.attention.output(attended, first, deterministic=deterministic)
    return (layer.output(layer.intermediate(attention_output), attention_output, deterministic=deterministic),)


@contextlib.contextmanager
def first_token_only(model):
    """Context in which ``model``'s last encoder layer runs for token 0 only.

    ``model`` is the HF Flax model whose output the caller reads
    (`reads_first_token_only` must hold: its last hidden state keeps one token).
    Yields a ``collections.Counter`` of traced last-layer calls: "first_token",
    or "fallback:<reason>" (dropout, output_attentions, cross_attention, kv_cache).

    Example::

        with rocoft_jax.first_token_only(model), rocoft_jax.sliced_kernels(trainable, mask):
            logits = model(**batch, params=rocoft_jax.with_trained_leaves(frozen, trainable)).logits
    """
    if not reads_first_token_only(model):
        raise ValueError(f"first_token_only needs a head that reads token 0 alone ({', '.join(sorted(HEADS))}); "
                         f"got {type(model).__name__}, whose output needs every token of the last layer")
    counts: collections.Counter = collections.Counter()

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if (context.method_name != "__call__" or type(module).__name__ not in LAYERS or module.is_initializing()
                or not _is_last_layer(module)):
            return next_fun(*args, **kwargs)
        arguments = bind_arguments(module, args, kwargs)
        reason = _fallback_reason(module, arguments)
        if reason is not None:
            counts[f"fallback:{reason}"] += 1
            return next_fun(*args, **kwargs)
        counts["first_token"] += 1
        return _first_token_layer(module, arguments)

    with nn.intercept_methods(interceptor):
        yield counts
