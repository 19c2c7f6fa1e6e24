"""BERT-family MLPs on the fast paths: GELU through `rocoft_jax.fast.gelu`, and fused with the output layer.

`fast_gelu` intercepts the intermediate layers of BERT, RoBERTa, XLM-R and
ELECTRA whose config asks for exact ``"gelu"``. Their Dense calls stay the
modules' own, so `sliced_kernels` still applies. Where the output layer's
Dense can run as one op with the GELU before it (`rocoft_jax.fast.fused_dense.fuses_after_gelu`:
a single Hopper GPU, a row or column slice on its merged kernel), the
intermediate layer returns its pre-activation and the output layer applies
GELU, its Dense, dropout and LayerNorm itself, exactly as HF's
``FlaxBertOutput`` does, with the Dense through `rocoft_jax.fast.fused_dense.dense_after_gelu`.
Every output layer's residual LayerNorm runs through `rocoft_jax.fast.layer_norm`.
"""

from __future__ import annotations

import collections
import contextlib

import flax.linen as nn

from rocoft_jax.fast import fused_dense, layer_norm
from rocoft_jax.fast.attention import QKV, bind_arguments
from rocoft_jax.fast.gelu import gelu

INTERMEDIATES = frozenset({"FlaxBertIntermediate", "FlaxRobertaIntermediate", "FlaxXLMRobertaIntermediate",
                           "FlaxElectraIntermediate"})
OUTPUTS = frozenset({"FlaxBertOutput", "FlaxRobertaOutput", "FlaxXLMRobertaOutput", "FlaxElectraOutput"})


def _fusing_output(intermediate, x, mesh):
    """The layer's output module, if its Dense runs as one op with this intermediate layer's GELU."""
    output = getattr(intermediate.parent, "output", None)
    if type(output).__name__ in OUTPUTS and fused_dense.fuses_after_gelu(output.dense, x, mesh):
        return output
    return None


@contextlib.contextmanager
def fast_gelu(mesh=None):
    """Context in which BERT-family MLPs with exact GELU use `rocoft_jax.fast.gelu`, fused where they can,
    and every BERT-family output layer's residual LayerNorm runs through `rocoft_jax.fast.layer_norm`.

    ``mesh``: the mesh the jitted step runs on, if any (the GPU kernel then runs per shard).
    Yields a ``collections.Counter`` of traced calls replaced: "gelu" for every GELU, and
    "gelu+dense" for those that run as one op with the output layer's Dense.
    """
    counts: collections.Counter = collections.Counter()
    fused: set[tuple[str, ...]] = set()  # paths of output modules handed a pre-activation

    def interceptor(next_fun, args, kwargs, context):
        module, name = context.module, type(context.module).__name__
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        if name in INTERMEDIATES and getattr(module.config, "hidden_act", None) == "gelu":
            counts["gelu"] += 1
            x = layer_norm.branch(bind_arguments(module, args, kwargs)["hidden_states"], "intermediate")
            output = _fusing_output(module, x, mesh)
            if output is None:
                return gelu(module.dense(x), mesh)
            counts["gelu+dense"] += 1
            fused.add(tuple(output.path))
            return module.dense(x)  # the output layer applies GELU inside its own op
        if name in OUTPUTS:
            arguments = bind_arguments(module, args, kwargs)
            if tuple(module.path) in fused:
                fused.discard(tuple(module.path))
                y = fused_dense.dense_after_gelu(module.dense, arguments["hidden_states"])
            else:
                y = module.dense(arguments["hidden_states"])
            y = module.dropout(y, deterministic=arguments["deterministic"])
            residual = layer_norm.branch(arguments["attention_output"], "residual")
            return layer_norm.residual_layer_norm(module.LayerNorm, y, residual, mesh, branches=(*QKV, "residual"))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor), layer_norm.branching():
        yield counts
