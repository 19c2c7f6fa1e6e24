"""Fused attention for HF Flax models, by interception.

HF Flax attention materialises the (B, heads, T, S) fp32 softmax and has no fused
kernel. `fused_attention` keeps the HF modules and weights and, while active, runs
the self-attention of the families' attention classes (`rocoft_jax.families`:
BERT-style encoders and Llama-style decoders, with rotary embeddings, GQA, causal
and sliding-window masks as HF builds them) through `jax.nn.dot_product_attention`.
Q, K, V and O go through the modules' own Dense submodules, so `sliced_kernels`
still applies (q, k and v that all train rows run as one op:
`rocoft_jax.fast.fused_dense.dense_sharing_input`), and the returned tuple is HF's.
The encoders' attention output layers are intercepted too: their residual
LayerNorm runs through `rocoft_jax.fast.layer_norm`.

``implementation="cudnn"`` (use it on GPUs) runs cuDNN's flash attention; ``None``
or "xla" runs XLA's, exact to rounding on any backend. Active attention dropout
runs in `rocoft_jax.fast.dropout_attention`'s kernels (encoders, cuDNN path, head
dims 16-128) with the (T, S) mask HF draws: the same training step as HF's.

Falls back to the module's own ``__call__`` (exact by construction) for attention
dropout anywhere else, ``output_attentions=True``, cross-attention and a KV cache.
"cudnn" falls back to XLA off GPUs, outside fp16/bf16, for head dims that are not
a multiple of 8 or exceed 128 (256 from compute capability 9.0), for odd T or S
with a mask, and when cuDNN rejects the call at trace time.

Padding: the (B, S) mask becomes a boolean key mask (exact for any mask). With
``right_padded=True`` it goes as key lengths; rows that are not ones-then-zeros
come out NaN, never silently wrong (checked in the first layer only; the NaN flows
on). With ``unpadded=True`` no mask reaches the kernel, its fastest form: only the
caller knows a mask is all ones (HF builds one for ``attention_mask=None``), so
`train` says so for batches without "attention_mask". Rows with no key left attend
uniformly, as in HF, except under cuDNN. Measurements: docs/performance.md.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import inspect

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from rocoft_jax import families, sharding
from rocoft_jax.fast import dropout_attention as dropout_lib
from rocoft_jax.fast import fused_dense, layer_norm
from rocoft_jax.intercept import replace_calls

IMPLEMENTATIONS = (None, "xla", "cudnn")
# The intercepted classes, from the family records.
ENCODERS = families.collect(lambda f: f.fast.self_attention if f.fast.attention_style == "encoder" else ())
DECODERS = families.collect(lambda f: f.fast.self_attention if f.fast.attention_style == "decoder" else ())
# The encoders' attention output layers: Dense, dropout, then LayerNorm(hidden + input).
SELF_OUTPUTS = families.collect(lambda f: f.fast.attention_outputs)
# Name of the fused attention output, for ``jax.checkpoint`` policies (`rocoft_jax.fast.remat`).
CHECKPOINT_NAME = "rocoft_jax/attention"
# Consumers of a layer's input, each handed its own reference (`rocoft_jax.fast.layer_norm.branch`).
QKV = ("query", "key", "value")


def get_class_names(module) -> set[str]:
    """Names of the module's class and its bases."""
    return {cls.__name__ for cls in type(module).__mro__}


def find_family(module) -> str | None:
    """ "encoder", "decoder" or None, from the class (or a base class) name."""
    names = get_class_names(module)
    return "encoder" if names & ENCODERS else "decoder" if names & DECODERS else None


@functools.cache
def _signature(cls) -> inspect.Signature:
    return inspect.signature(cls.__call__)


def bind_arguments(module, args, kwargs) -> dict:
    """The ``__call__`` arguments by name, defaults filled in."""
    bound = _signature(type(module)).bind(module, *args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


def attention_dropout_rate(module, family: str, arguments: dict) -> float:
    """The module's attention dropout rate where it is active in this call, else 0."""
    config = module.config
    rate = config.attention_probs_dropout_prob if family == "encoder" else config.attention_dropout
    return 0.0 if arguments["deterministic"] or not rate else float(rate)


def broadcast_dropout_multiplier(module, rate: float, queries: int, keys: int):
    """The (T, S) multiplier of HF's attention dropout (``broadcast_dropout=True``: one mask for every
    row and head), drawn as HF draws it from ``module``'s "dropout" RNG, in ``module.dtype``."""
    keep_prob = 1.0 - rate
    keep = jax.random.bernoulli(module.make_rng("dropout"), keep_prob, (1, 1, queries, keys))[0, 0]
    return keep.astype(module.dtype) / jnp.asarray(keep_prob, dtype=module.dtype)


def drops_in_kernel(module, family: str, arguments: dict, implementation) -> bool:
    """Whether active attention dropout runs in `rocoft_jax.fast.dropout_attention`'s kernels: encoder
    self-attention on the GPU path (``implementation="cudnn"``) in shapes they take."""
    if family != "encoder" or module.causal or implementation != "cudnn":
        return False
    shape = arguments["hidden_states"].shape[:2] + (module.config.num_attention_heads, module.head_dim)
    return dropout_lib.available() and dropout_lib.supported(shape, module.dtype)


def find_fallback_reason(module, family: str, arguments: dict, implementation=None) -> str | None:
    """Why the fused path would not be exact here, or None."""
    if attention_dropout_rate(module, family, arguments) and not drops_in_kernel(
        module, family, arguments, implementation
    ):
        return "dropout"
    if arguments["output_attentions"]:
        return "output_attentions"
    if arguments.get("key_value_states") is not None:
        return "cross_attention"
    if arguments["init_cache"] or module.has_variable("cache", "cached_key"):
        return "kv_cache"
    return None


def max_cudnn_head_dim() -> int:
    """256 on Hopper and later, 128 before."""
    capability = getattr(jax.devices()[0], "compute_capability", "0.0")
    return 256 if tuple(int(c) for c in str(capability).split(".")[:2]) >= (9, 0) else 128


def choose_implementation(requested, query, key, has_mask: bool):
    """``requested``, or None (XLA) where cuDNN would reject these inputs."""
    if requested != "cudnn":
        return requested
    if jax.default_backend() != "gpu" or query.dtype not in (jnp.bfloat16, jnp.float16):
        return None
    head_dim = query.shape[-1]
    if head_dim % 8 or head_dim > max_cudnn_head_dim():
        return None
    if has_mask and (query.shape[1] % 2 or key.shape[1] % 2):  # a bias needs even lengths to train
        return None
    return "cudnn"


def split_heads(x, head_dim: int):
    return x.reshape(x.shape[:2] + (-1, head_dim))


def project_encoder(module, arguments):
    """Q, K, V (B, T, heads, head_dim) through the BERT-style Dense submodules."""
    hidden = arguments["hidden_states"]
    projections = fused_dense.dense_sharing_input(
        [module.query, module.key, module.value], [layer_norm.branch(hidden, name) for name in QKV]
    )
    return tuple(split_heads(y, module.head_dim) for y in projections)


def project_decoder(module, arguments):
    """Q, K, V through the Llama-style projections, rotary embedding applied; K/V keep their own heads."""
    projections = fused_dense.dense_sharing_input(
        [module.q_proj, module.k_proj, module.v_proj], [arguments["hidden_states"]] * 3
    )
    q, k, v = (split_heads(y, module.head_dim) for y in projections)
    k, q = module.rotary_emb(k, q, arguments["position_ids"])
    return q, k, v


def find_window(module, key_length: int):
    """Mistral's (left, 0) window; None for Llama/Gemma or a window that covers the sequence."""
    if "FlaxMistralAttention" not in get_class_names(module):
        return None
    left = module.config.sliding_window or 0  # HF: triu(causal, k=-(sliding_window or 0))
    return None if left >= key_length - 1 else (left, 0)


def is_first_layer(module) -> bool:
    """Whether ``module`` sits in layer 0 (or in no numbered layer): HF names layers by index."""
    return not any(part.isdigit() and part != "0" for part in module.path)


def poison_unless_prefix(out, keep, lengths):
    """NaN in the rows whose mask is not ones-then-zeros (the promise of ``right_padded``)."""
    prefix = jnp.all(keep == (jnp.arange(keep.shape[-1]) < lengths[:, None]), axis=-1)
    return jnp.where(prefix[:, None, None, None], out, jnp.nan)


def attend(
    q, k, v, keep, *, causal: bool, window, implementation, right_padded: bool, check_prefix: bool = True, mesh=None
):
    """``jax.nn.dot_product_attention`` with the padding ``keep`` (B, S) bool and the causal/window masks.

    With ``right_padded``, ``check_prefix`` NaNs the rows whose ``keep`` is not ones-then-zeros.
    With a ``mesh``, q, k and v are laid out alike first (`sharding.heads_sharding`): cuDNN's
    partitioner refuses differing layouts, which XLA's propagation gives them under fsdp.

    Returns ``(output, implementation used)``.
    """
    if mesh is not None:
        layout = sharding.heads_sharding(mesh, k.shape)
        q, k, v = (jax.lax.with_sharding_constraint(t, layout) for t in (q, k, v))
    mask = lengths = None
    if keep is not None and right_padded:
        lengths = jnp.sum(keep, axis=-1, dtype=jnp.int32)
    elif keep is not None:
        mask = keep[:, None, None, :]
    kwargs = {"is_causal": causal, "key_value_seq_lengths": lengths, "local_window_size": window}
    chosen, out = choose_implementation(implementation, q, k, mask is not None), None
    if chosen == "cudnn":  # cuDNN wants the bias at its full (B, 1, T, S) length
        cudnn_mask = None if mask is None else jnp.broadcast_to(mask, (q.shape[0], 1, q.shape[1], k.shape[1]))
        try:
            out = jax.nn.dot_product_attention(q, k, v, mask=cudnn_mask, implementation="cudnn", **kwargs)
        except (NotImplementedError, ValueError, RuntimeError):
            chosen = None
    if out is None:
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=chosen, **kwargs)
    if lengths is not None and check_prefix:
        out = poison_unless_prefix(out, keep, lengths)
    return checkpoint_name(out, CHECKPOINT_NAME), chosen or "xla"


def attend_with_dropout(q, k, v, keys, drop, mesh=None):
    """`rocoft_jax.fast.dropout_attention` of (B, T, heads, head_dim) inputs; under a ``mesh``, on each
    device's rows and heads (`sharding.heads_sharding`), which the kernels treat independently."""
    run = lambda q, k, v, keys, drop: dropout_lib.dropout_attention(
        q, k, v, keys, drop, q.shape[-1] ** -0.5, jax.default_backend() != "gpu"
    )
    if mesh is None or mesh.size == 1:
        return run(q, k, v, keys, drop)
    spec = sharding.heads_sharding(mesh, k.shape).spec
    keys_spec = None if keys is None else P(spec[0], None)
    return jax.shard_map(run, mesh=mesh, in_specs=(spec, spec, spec, keys_spec, P()), out_specs=spec, check_vma=False)(
        q, k, v, keys, drop
    )


def fused_call(
    module,
    family: str,
    arguments: dict,
    implementation,
    right_padded: bool,
    check_prefix: bool,
    mesh,
    unpadded: bool = False,
):
    """The module's output tuple, computed with `attend` (or, under active dropout, `attend_with_dropout`);
    and the implementation used.

    ``unpadded`` drops the module's attention mask, which the caller knows is all ones.
    """
    mask = None if unpadded else arguments["attention_mask"]
    rate = attention_dropout_rate(module, family, arguments)
    if rate:  # `find_fallback_reason` let it through: HF's broadcast dropout mask, applied in the kernels
        q, k, v = project_encoder(module, arguments)
        drop = broadcast_dropout_multiplier(module, rate, q.shape[1], k.shape[1])
        keys = None if mask is None else (mask > 0).astype(jnp.int32)
        out = attend_with_dropout(q, k, v, keys, drop, mesh)
        return _finish_heads(module, family, arguments, checkpoint_name(out, CHECKPOINT_NAME)), "dropout"
    if family == "encoder":
        q, k, v = project_encoder(module, arguments)
        keep = None if mask is None else mask > 0  # HF: lax.select(attention_mask > 0, 0, min)
        causal, window = bool(module.causal), None
    else:
        q, k, v = project_decoder(module, arguments)
        keep = None if mask is None else mask.astype(bool)  # HF: combine_masks = logical_and
        causal, window = True, find_window(module, k.shape[1])
    out, used = attend(
        q,
        k,
        v,
        keep,
        causal=causal,
        window=window,
        implementation=implementation,
        right_padded=right_padded,
        check_prefix=check_prefix,
        mesh=mesh,
    )
    return _finish_heads(module, family, arguments, out), used


def _finish_heads(module, family: str, arguments: dict, out):
    """The module's output tuple from the (B, T, heads, head_dim) attention output."""
    head_mask = arguments.get("layer_head_mask")  # HF's BertModel always passes one: ones (int32)
    if head_mask is not None:  # scaling head h's weights scales head h's output
        out = out * jnp.asarray(head_mask, out.dtype)[:, None]
    out = out.reshape(out.shape[:2] + (-1,))
    if family == "decoder":
        out = module.o_proj(out)
    return (out,)


def finish_attention_output(module, arguments: dict, mesh=None):
    """HF's ``FlaxBertSelfOutput.__call__``, its LayerNorm through `rocoft_jax.fast.layer_norm`."""
    y = module.dropout(module.dense(arguments["hidden_states"]), deterministic=arguments["deterministic"])
    residual = layer_norm.branch(arguments["input_tensor"], "residual")
    return layer_norm.residual_layer_norm(module.LayerNorm, y, residual, mesh, branches=("intermediate", "residual"))


@contextlib.contextmanager
def fused_attention(implementation=None, *, right_padded: bool = False, unpadded: bool = False, mesh=None):
    """Context in which HF Flax self-attention runs through ``jax.nn.dot_product_attention``.

    Args:
      implementation: None (JAX's choice: XLA today), "xla" or "cudnn"
        (falls back to XLA where cuDNN can't take the inputs; see the module doc).
      right_padded: pass padding as key lengths (cuDNN's native padding);
        every mask row must be ones then zeros, or that row's output is NaN
        (checked in the first layer, see the module doc).
      unpadded: the caller's promise that every attention mask is all ones
        (HF builds one when given None): attention then runs with no padding
        mask or lengths, cuDNN's fastest form; causal and window masks stay.
        A mask that is not all ones is ignored, so its padding is attended.
      mesh: the `rocoft_jax.sharding` mesh the jitted step runs on, if any:
        q, k and v are then laid out alike (batch over data/fsdp, heads over tensor).

    Yields a ``collections.Counter`` of traced attention calls: "fused:xla",
    "fused:cudnn", "fused:dropout" (`rocoft_jax.fast.dropout_attention`), or
    "fallback:<reason>" (dropout, output_attentions, cross_attention, kv_cache).

    Example::

        with rocoft_jax.fast.fused_attention("cudnn"), rocoft_jax.sliced_kernels(trainable, mask):
            logits = model(**batch, params=rocoft_jax.with_trained_leaves(frozen, trainable)).logits
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}; got {implementation!r}")
    counts: collections.Counter = collections.Counter()

    def attention(module, args, kwargs, call_original):
        family = find_family(module)
        arguments = bind_arguments(module, args, kwargs)
        reason = find_fallback_reason(module, family, arguments, implementation)
        if reason is not None:
            counts[f"fallback:{reason}"] += 1
            return call_original(*args, **kwargs)
        outputs, used = fused_call(
            module,
            family,
            arguments,
            implementation,
            right_padded,
            check_prefix=is_first_layer(module),
            mesh=mesh,
            unpadded=unpadded,
        )
        counts[f"fused:{used}"] += 1
        return outputs

    def attention_output(module, args, kwargs, call_original):
        return finish_attention_output(module, bind_arguments(module, args, kwargs), mesh)

    is_attention = lambda module: find_family(module) is not None
    is_output = lambda module: not is_attention(module) and type(module).__name__ in SELF_OUTPUTS
    with replace_calls(is_attention, attention), replace_calls(is_output, attention_output), layer_norm.branching():
        yield counts
