"""GPU fast paths for HF Flax models: same results as the models' own code, in fewer and fused kernels.

Each fast path is a context that intercepts HF module calls (`rocoft_jax.intercept.replace_calls`)
and falls back to the module's own ``__call__`` wherever it would not be exact:

- `fused_attention`: self-attention through ``jax.nn.dot_product_attention`` (cuDNN on
  GPUs), encoder attention dropout in Pallas kernels (`dropout_attention`), and the
  BERT family's residual LayerNorms in Pallas kernels (`layer_norm`);
- `fast_gelu`: BERT-family GELU in Pallas kernels (`gelu`), fused with the next layer's
  input gradient on Hopper GPUs (`gelu_matmul`, `fused_dense`);
- `first_token_only`: a sequence classifier's last layer for token 0 alone;
- `remat_layers`: per-layer rematerialization of Llama-family decoders.

`fast_paths` turns on what suits a model. Which HF classes each path intercepts comes
from the family records (`rocoft_jax.families`). The core (`rocoft_jax`) never imports
this package: the fused layers reach the trained slices through `rocoft_jax.sliced`'s seam.
"""

from __future__ import annotations

import contextlib

from rocoft_jax.fast.attention import fused_attention
from rocoft_jax.fast.first_token import first_token_only, reads_first_token_only
from rocoft_jax.fast.mlp import fast_gelu
from rocoft_jax.fast.remat import POLICIES as REMAT_POLICIES
from rocoft_jax.fast.remat import remat_layers

ATTENTION = ("plain", "xla", "cudnn", "cudnn-lengths")


@contextlib.contextmanager
def fast_paths(model, attention: str = "cudnn-lengths", remat: str | None = None, mesh=None, unpadded: bool = False):
    """Context in which ``model`` runs on the fast paths that suit it.

    ``attention``: "plain" keeps HF's attention, GELU and last layer; "xla" or "cudnn" fuses
    attention (`fused_attention`), GELU (`fast_gelu`) and, where the model's head reads token 0
    alone, the last layer (`first_token_only`); "cudnn-lengths" passes padding to cuDNN as key
    lengths (every mask row must be ones then zeros). ``remat``: None, "full" or "dots"
    (`remat_layers`). ``mesh``: the mesh the jitted step runs on, if any. ``unpadded``: the
    caller's promise that every attention mask is all ones.
    """
    if attention not in ATTENTION:
        raise ValueError(f"unknown attention {attention!r}; choose one of {', '.join(ATTENTION)}")
    with contextlib.ExitStack() as stack:
        if attention != "plain":
            stack.enter_context(
                fused_attention(
                    attention.removesuffix("-lengths"),
                    right_padded=attention.endswith("-lengths"),
                    unpadded=unpadded,
                    mesh=mesh,
                )
            )
            stack.enter_context(fast_gelu(mesh))
            if reads_first_token_only(model):
                stack.enter_context(first_token_only(model))
        if remat:
            stack.enter_context(remat_layers(remat))
        yield


__all__ = [
    "ATTENTION",
    "REMAT_POLICIES",
    "fast_gelu",
    "fast_paths",
    "first_token_only",
    "fused_attention",
    "reads_first_token_only",
    "remat_layers",
]
