"""BERT-family MLPs on the fast paths: GELU through `rocoft_jax.fast.gelu`, and fused with the output layer.

`fast_gelu` intercepts the BERT family's intermediate layers (the families' MLP
classes, `rocoft_jax.families`) whose config asks for exact ``"gelu"``. Their
Dense calls stay the modules' own, so `sliced_kernels` still applies. Where the
output layer's Dense can run as one op with the GELU before it
(`rocoft_jax.fast.fused_dense.fuses_after_gelu`: a single Hopper GPU, a row or
column slice on its merged kernel), the intermediate layer returns its
pre-activation and the output layer applies GELU, its Dense, dropout and
LayerNorm itself, in HF's order, with the Dense through
`rocoft_jax.fast.fused_dense.dense_after_gelu`. Every output layer's residual
LayerNorm runs through `rocoft_jax.fast.layer_norm`.

Other activations, other families and other methods of the modules run
untouched (the module's own call); off GPUs the kernels fall back to XLA.
"""

from __future__ import annotations

import collections
import contextlib

from rocoft_jax import families
from rocoft_jax.fast import fused_dense, layer_norm
from rocoft_jax.fast.attention import QKV, bind_arguments
from rocoft_jax.fast.gelu import gelu
from rocoft_jax.intercept import replace_calls

INTERMEDIATES = families.collect(lambda f: f.fast.intermediates)
OUTPUTS = families.collect(lambda f: f.fast.outputs)


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

    def intermediate(module, args, kwargs, call_original):
        counts["gelu"] += 1
        x = layer_norm.branch(bind_arguments(module, args, kwargs)["hidden_states"], "intermediate")
        output = _fusing_output(module, x, mesh)
        if output is None:
            return gelu(module.dense(x), mesh)
        counts["gelu+dense"] += 1
        fused.add(tuple(output.path))
        return module.dense(x)  # the output layer applies GELU inside its own op

    def output(module, args, kwargs, call_original):
        arguments = bind_arguments(module, args, kwargs)
        if tuple(module.path) in fused:
            fused.discard(tuple(module.path))
            y = fused_dense.dense_after_gelu(module.dense, arguments["hidden_states"])
        else:
            y = module.dense(arguments["hidden_states"])
        y = module.dropout(y, deterministic=arguments["deterministic"])
        residual = layer_norm.branch(arguments["attention_output"], "residual")
        return layer_norm.residual_layer_norm(module.LayerNorm, y, residual, mesh, branches=(*QKV, "residual"))

    exact_gelu = lambda module: (
        type(module).__name__ in INTERMEDIATES and getattr(module.config, "hidden_act", None) == "gelu"
    )
    with replace_calls(exact_gelu, intermediate), replace_calls(OUTPUTS, output), layer_norm.branching():
        yield counts
