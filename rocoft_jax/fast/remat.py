"""Per-layer rematerialization for HF Flax models that lack ``gradient_checkpointing``.

transformers 4.57's Flax Llama, Mistral and Gemma have no remat option, so a
7B step keeps every layer's activations for the backward pass. `remat_layers`
intercepts each decoder layer's ``__call__`` and runs it under Flax's lifted
``nn.remat``: the backward pass recomputes the layer from its input, trading
about one extra forward pass for activation memory. Boolean flags are closed
over as Python constants (they steer Python control flow); the other
interceptors (`sliced_kernels`, `fused_attention`) still apply inside. Only
the families' decoder-layer classes (`rocoft_jax.families`) are rematerialized;
every other module, and a layer already inside its lifted clone, runs its own call.

Two policies (`POLICIES`):
  - "full" saves only each layer's input: least memory, one extra forward.
  - "dots" also saves the outputs of the projections (sliced or plain Dense)
    and of fused attention, and recomputes only elementwise work (norms in
    fp32, rotary embeddings, SiLU): most of full remat's memory saving for a
    few percent of the time, since HF Flax otherwise keeps several fp32 and
    SiLU intermediates per token and layer.
"""

from __future__ import annotations

import contextlib
import threading

import flax.linen as nn
import jax

from rocoft_jax import families, sliced
from rocoft_jax.fast import attention
from rocoft_jax.intercept import replace_calls

LAYERS = families.collect(lambda f: f.fast.remat_layers)
MODEL_TYPES = families.collect(lambda f: f.model_types if f.fast.remat_layers else ())  # those layers' models
_FLAGS = ("deterministic", "init_cache", "output_attentions")
POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(sliced.CHECKPOINT_NAME, attention.CHECKPOINT_NAME),
    ),
}


@contextlib.contextmanager
def remat_layers(policy: str = "full"):
    """While active, every Llama/Mistral/Gemma decoder layer is rematerialized.

    ``policy`` names what the backward pass may reuse (`POLICIES`).
    """
    if policy not in POLICIES:
        raise ValueError(f"remat policy must be one of {sorted(POLICIES)}; got {policy!r}")
    inside = threading.local()

    def rematerialized(module, args, kwargs, call_original):
        names = ("hidden_states", "attention_mask", "position_ids")
        arrays = dict(zip(names, args))
        arrays.update({k: kwargs[k] for k in names if k in kwargs})
        flags = {k: kwargs[k] for k in _FLAGS if k in kwargs}

        def layer(module, hidden_states, attention_mask, position_ids):
            inside.active = True  # the lifted clone's own __call__ passes straight through
            try:
                return module(hidden_states, attention_mask=attention_mask, position_ids=position_ids, **flags)
            finally:
                inside.active = False

        rematted = nn.remat(layer, prevent_cse=True, policy=POLICIES[policy])
        return rematted(module, arrays["hidden_states"], arrays.get("attention_mask"), arrays.get("position_ids"))

    outermost = lambda module: type(module).__name__ in LAYERS and not getattr(inside, "active", False)
    with replace_calls(outermost, rematerialized):
        yield
