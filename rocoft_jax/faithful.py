"""HF Flax models that compute what their checkpoints say, or a refusal naming why they cannot.

transformers 4.57 is the last line with Flax models, and its causal LMs ignore parts of their configs
without a word. This module closes that gap for the families rocoft_jax trains:

- Llama, Mistral and Gemma build their rotary tables with a fixed base of 10000: the table is replaced by
  one from ``rope_theta`` and ``rope_scaling`` ("linear", "llama3"), computed as PyTorch transformers does.
- Llama and Mistral keep their own ``lm_head`` when ``tie_word_embeddings`` is set: the head is tied to the
  token embeddings instead (the params hold no ``lm_head``; the logits read ``embed_tokens``).
- Mistral's Flax causal mask keeps one token more than its ``sliding_window`` and, with no window, only
  the diagonal: the Flax modules see a window that gives PyTorch's mask.
- Qwen2 (no Flax class) is a Llama with q/k/v biases: it loads as a Llama whose o_proj bias is zero.

Any other config feature that HF Flax would ignore (another rope scaling, a head size the projections do
not use, MLP biases, GPT-2's layer-scaled attention, OPT without biases, BERT's relative positions, ...)
raises `UnsupportedConfig`, one line naming the field, its value and what to do. `check_config` is the
check, `flax_class` the class that applies the fixes, `from_pretrained` both plus a refusal of checkpoints
that lack weights the model needs (HF would initialise them randomly with a log line).

The fixes are interceptions (`rocoft_jax.intercept.replace_calls`) entered by the top module's ``init``
and ``apply``, so every call of the model, jitted, rematerialized or on a fast path, runs them.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import json
import math
import threading
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from rocoft_jax.intercept import replace_calls

HF_ROPE_BASE = 10000.0  # the base HF Flax's create_sinusoidal_positions hard-codes
ROPE_TYPES = ("default", "linear", "llama3")
ROTARY_CLASSES = ("FlaxLlamaRotaryEmbedding", "FlaxMistralRotaryEmbedding", "FlaxGemmaRotaryEmbedding")
# Causal-LM modules whose lm_head ignores tie_word_embeddings (Gemma, GPT-J, GPT-2, Bloom and OPT tie it).
UNTIED_HEAD_MODULES = ("FlaxLlamaForCausalLMModule", "FlaxMistralForCausalLMModule")
ROTARY_TYPES = ("llama", "mistral", "gemma", "qwen2")
SHARDED_SAFETENSORS = "model.safetensors.index.json"
# Params PyTorch keeps as zero buffers that a checkpoint may omit; Flax initialises them to zero too.
ZERO_BUFFERS = ("final_logits_bias",)


class UnsupportedConfig(ValueError):
    """A config feature the HF Flax model would ignore and this module does not implement."""


def _refuse(config, field: str, value: Any, why: str) -> None:
    raise UnsupportedConfig(
        f"{config.model_type} config has {field}={value!r}, which {why}; HF Flax would ignore it and run a "
        "different model, so it is refused (use a checkpoint without it, or the PyTorch model)"
    )


def rope_type(config) -> str:
    """The rope scaling type of ``config`` ("default" when there is none), as PyTorch transformers reads it."""
    scaling = getattr(config, "rope_scaling", None) or {}
    return scaling.get("rope_type", scaling.get("type", "default"))


def _head_dim(config) -> int:
    """The per-head size HF Flax Llama/Mistral projections use."""
    return config.hidden_size // config.num_attention_heads


def check_config(config) -> None:
    """Raise `UnsupportedConfig` for a feature of ``config`` the Flax model would ignore and nothing here fixes."""
    kind = config.model_type
    if kind in ROTARY_TYPES:
        kind_scaling = rope_type(config)
        if kind_scaling not in ROPE_TYPES:
            _refuse(config, "rope_scaling", config.rope_scaling, f"is not one of the supported types {ROPE_TYPES}")
        factor = getattr(config, "partial_rotary_factor", None)
        if factor not in (None, 1, 1.0):
            _refuse(config, "partial_rotary_factor", factor, "rotates part of each head")
    if kind in ("llama", "mistral", "qwen2"):
        head_dim = getattr(config, "head_dim", None)
        if head_dim not in (None, _head_dim(config)):
            _refuse(config, "head_dim", head_dim, f"differs from hidden_size/num_attention_heads={_head_dim(config)}")
    if kind == "llama" and getattr(config, "mlp_bias", False):
        _refuse(config, "mlp_bias", True, "adds MLP biases HF Flax Llama has no parameters for")
    if kind == "qwen2":
        if getattr(config, "use_sliding_window", False):
            _refuse(config, "use_sliding_window", True, "limits attention to a window in some layers")
        if getattr(config, "attention_bias", None) is False:
            _refuse(config, "attention_bias", False, "drops the q/k/v biases every Qwen2 has")
    if kind == "gpt2":
        if not getattr(config, "scale_attn_weights", True):
            _refuse(config, "scale_attn_weights", False, "turns off the 1/sqrt(head_dim) scaling")
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            _refuse(config, "scale_attn_by_inverse_layer_idx", True, "scales attention by layer")
    if kind == "opt":
        if not getattr(config, "enable_bias", True):
            _refuse(config, "enable_bias", False, "removes the linear layers' biases")
        if not getattr(config, "layer_norm_elementwise_affine", True):
            _refuse(config, "layer_norm_elementwise_affine", False, "removes the LayerNorm scales")
    position = getattr(config, "position_embedding_type", "absolute")
    if kind in ("bert", "roberta", "xlm-roberta", "electra", "roberta-prelayernorm") and position != "absolute":
        _refuse(config, "position_embedding_type", position, "uses relative positions")


def flax_config(config):
    """The config the Flax modules of ``config``'s model should see (``config`` itself when nothing differs).

    Qwen2 becomes a Llama config with attention biases. Mistral's ``sliding_window`` becomes the value whose
    Flax mask (``triu(causal, -(window or 0))``: window + 1 keys) equals PyTorch's (window keys; all keys
    when None).
    """
    check_config(config)
    if config.model_type == "qwen2":
        from transformers import LlamaConfig

        fields = config.to_dict()
        for drop in ("model_type", "architectures", "use_sliding_window", "sliding_window", "max_window_layers"):
            fields.pop(drop, None)
        fields.pop("layer_types", None)
        return LlamaConfig(**{**fields, "attention_bias": True, "mlp_bias": False, "head_dim": _head_dim(config)})
    if config.model_type == "mistral" and not getattr(config, "_flax_view", False):
        view = copy.deepcopy(config)
        window = config.sliding_window
        view.sliding_window = config.max_position_embeddings if window is None else window - 1
        view._flax_view = True
        return view
    return config


def needs_fixes(config) -> bool:
    """Whether ``config``'s Flax model needs `flax_class`'s fixes to compute what the checkpoint says."""
    rotary = config.model_type in ROTARY_TYPES and (
        float(getattr(config, "rope_theta", HF_ROPE_BASE)) != HF_ROPE_BASE or rope_type(config) != "default"
    )
    tied = config.model_type in ("llama", "mistral", "qwen2") and bool(getattr(config, "tie_word_embeddings", False))
    return rotary or tied or config.model_type in ("mistral", "qwen2")


def inverse_frequencies(config, dim: int) -> np.ndarray:
    """The rotary inverse frequencies (dim/2,) of ``config``, in float32, as PyTorch transformers computes them."""
    base = float(getattr(config, "rope_theta", HF_ROPE_BASE))
    inv = (1.0 / (base ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))).astype(np.float32)
    kind, scaling = rope_type(config), getattr(config, "rope_scaling", None) or {}
    if kind == "linear":
        return (inv / np.float32(scaling["factor"])).astype(np.float32)
    if kind == "llama3":
        factor, low, high = (float(scaling[k]) for k in ("factor", "low_freq_factor", "high_freq_factor"))
        old = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def _rotate_half(x):
    half = x.shape[-1] // 2
    return jnp.concatenate((-x[..., half:], x[..., :half]), axis=-1)


def _rotary(module, args, kwargs, call_original):
    """HF's rotary embedding with ``module.config``'s frequencies, from the positions (no table constant)."""
    names = ("key", "query", "position_ids")
    bound = dict(zip(names, args)) | kwargs
    config = module.config
    dim = config.head_dim if config.model_type == "gemma" else _head_dim(config)
    inv = jnp.asarray(inverse_frequencies(config, dim))
    freqs = bound["position_ids"].astype(jnp.float32)[..., None] * inv  # (B, T, dim/2)
    angles = jnp.concatenate((freqs, freqs), axis=-1)[:, :, None, :]  # (B, T, 1, dim)
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    rotate = lambda x: (x * cos + _rotate_half(x) * sin).astype(module.dtype)
    return rotate(bound["key"]), rotate(bound["query"])


def _is_tied_head(module) -> bool:
    parent = module.parent
    return (
        module.name == "lm_head"
        and type(parent).__name__ in UNTIED_HEAD_MODULES
        and bool(getattr(parent.config, "tie_word_embeddings", False))
    )


def _tied_head(module, args, kwargs, call_original):
    """``lm_head(hidden)`` with the token embeddings as its kernel, as nn.Dense computes it."""
    (hidden,) = args
    embedding = module.parent.model.variables["params"]["embed_tokens"]["embedding"]
    hidden, kernel = nn.dtypes.promote_dtype(hidden, embedding.T, dtype=module.dtype)
    return jax.lax.dot_general(hidden, kernel, (((hidden.ndim - 1,), (0,)), ((), ())), precision=module.precision)


@contextlib.contextmanager
def _fixes():
    """The interceptions every call of a fixed model runs in."""
    with replace_calls(ROTARY_CLASSES, _rotary), replace_calls(_is_tied_head, _tied_head):
        yield


@functools.cache
def _fixed_module(module_class: type[nn.Module]) -> type[nn.Module]:
    """``module_class`` whose ``init`` and ``apply`` run the fixes; same fields, params and class name.

    The class keeps HF's name because the fast paths and sharding tables look modules up by name.
    """

    def __post_init__(self):
        object.__setattr__(self, "config", flax_config(self.config))
        module_class.__post_init__(self)

    def init(self, *args, **kwargs):
        with _fixes():
            return module_class.init(self, *args, **kwargs)

    def apply(self, *args, **kwargs):
        with _fixes():
            return module_class.apply(self, *args, **kwargs)

    def init_with_output(self, *args, **kwargs):
        with _fixes():
            return module_class.init_with_output(self, *args, **kwargs)

    namespace = {
        "__post_init__": __post_init__,
        "init": init,
        "apply": apply,
        "init_with_output": init_with_output,
        "__module__": __name__,
        "__qualname__": module_class.__qualname__,
    }
    return type(module_class.__name__, (module_class,), namespace)


@functools.cache
def fixed(model_class: type) -> type:
    """``model_class`` (an HF Flax model class) whose module applies this module's fixes; see `flax_class`."""
    return type(model_class.__name__, (model_class,), {"module_class": _fixed_module(model_class.module_class)})


def flax_class(model_class: type, config) -> type:
    """The HF Flax model class to build ``config``'s model with: ``model_class`` itself, or a subclass
    whose module applies this module's fixes. Raises `UnsupportedConfig` first."""
    check_config(config)
    return fixed(model_class) if needs_fixes(config) else model_class


def model_class_for(auto_class, config) -> type:
    """The HF Flax class ``auto_class`` (e.g. ``FlaxAutoModelForCausalLM``) maps ``config`` to, fixed.

    Qwen2 maps through its Llama view. Raises ``KeyError`` when the auto class has no entry for the config.
    """
    view = flax_config(config)
    return flax_class(auto_class._model_mapping[type(view)], config)


def missing_weights(model, params) -> list[str]:
    """'/'-joined paths the model needs that ``params`` lacks."""
    have = set(flatten_dict(params))
    return ["/".join(k) for k in sorted(model.required_params - have)]


def from_pretrained(auto_class, name_or_path: str, *, new_head: bool = False, **kwargs):
    """``(model, params)`` of a checkpoint, checked and fixed; the params stay on the host.

    With ``new_head``, weights outside the pretrained body (``model.base_model_prefix``) and poolers may be
    missing: a task head, initialised as HF does. Any other weight the checkpoint lacks is a ``ValueError``
    naming it, where HF would initialise it randomly with only a log line. ``kwargs`` set config fields,
    except ``dtype``, ``from_pt`` and ``gradient_checkpointing``, which go to the model.
    """
    config, load_kwargs = _split_kwargs(name_or_path, kwargs)
    cls = _loadable(model_class_for(auto_class, config))
    index = Path(name_or_path, SHARDED_SAFETENSORS)
    with _read_on_host():
        if index.is_file():  # HF Flax raises NotImplementedError for these (Llama-2's hub layout)
            model_kwargs = {k: v for k, v in load_kwargs.items() if k != "from_pt"}  # the index says how to read
            model = cls(flax_config(config), _do_init=False, **model_kwargs)
            params = _read_sharded_safetensors(model, index)
        else:
            model, params = cls.from_pretrained(name_or_path, config=flax_config(config), _do_init=False, **load_kwargs)
    if config.model_type == "qwen2":  # the Llama view's o_proj bias, which Qwen2 does not have
        params = _zero_missing(model, params, lambda path: path[-2:] == ("o_proj", "bias"))
    missing = missing_weights(model, params)
    body = model.base_model_prefix
    in_body = lambda path: "pooler" not in path.split("/") and (path.split("/")[0] == body or body not in params)
    fatal = [p for p in missing if p not in ZERO_BUFFERS and (not new_head or in_body(p))]
    if fatal:
        more = f" and {len(fatal) - 3} more" if len(fatal) > 3 else ""
        raise ValueError(
            f"the checkpoint {name_or_path} lacks weights the model needs ({', '.join(fatal[:3])}{more}); "
            "HF would initialise them randomly: check the checkpoint, its config and the model class"
        )
    if missing:  # a new head, drawn as HF draws it
        wanted = sorted(model.required_params - set(flatten_dict(params)))
        params = unflatten_dict({**_draw(model, config, load_kwargs, wanted), **flatten_dict(params)})
    model._config = config if config.model_type != "qwen2" else model.config
    return model, params


@contextlib.contextmanager
def _read_on_host():
    """Inside, a checkpoint is read and converted on the host, as numpy arrays where HF lets us.

    HF reads safetensors through ``safetensors.flax`` and converts PyTorch checkpoints with ``jnp`` (transposes,
    ``jnp.asarray``), all on the default device: on a GPU a checkpoint crossed PCIe to the device, back to the
    host (``_do_init=False`` keeps params there) and again when the caller cast and placed it. Inside, jax's CPU
    device is the default, and HF's PyTorch conversion reads numpy and keeps it (`_HostNumpy`): its transposes
    stay views, which the caller's cast copies once. Without a CPU backend (``JAX_PLATFORMS`` naming only an
    accelerator) JAX's arrays stay where JAX puts them. The swap of HF's module globals is process-wide, so
    reads take `_READ_LOCK` one at a time.
    """
    from transformers import modeling_flax_pytorch_utils as hf_pt

    try:
        host = jax.local_devices(backend="cpu")[0]
    except RuntimeError:
        host = None
    with _READ_LOCK:
        original = hf_pt.jnp, getattr(hf_pt, "safe_open", None)
        hf_pt.jnp = _HostNumpy()
        if original[1] is not None:
            hf_pt.safe_open = _numpy_safe_open
        try:
            with jax.default_device(host) if host is not None else contextlib.nullcontext():
                yield
        finally:
            hf_pt.jnp = original[0]
            if original[1] is not None:
                hf_pt.safe_open = original[1]


_READ_LOCK = threading.Lock()


class _HostNumpy:
    """``jax.numpy`` for HF's PyTorch-to-Flax conversion, whose ``asarray`` keeps numpy arrays as they are."""

    @staticmethod
    def asarray(x, dtype=None):
        return np.asarray(x, dtype)

    def __getattr__(self, name):  # anything else HF uses (``bfloat16``) stays jax's
        return getattr(jnp, name)


def _numpy_safe_open(path, framework, **kwargs):
    from safetensors import safe_open

    return safe_open(path, framework="np", **kwargs)


def unloaded_model(auto_class, name_or_path: str, **kwargs):
    """The model `from_pretrained` returns for the same arguments, built without reading any weight:
    its ``params_shape_tree`` gives the params' layout before they load."""
    config, load_kwargs = _split_kwargs(name_or_path, kwargs)
    load_kwargs.pop("from_pt", None)  # how to read the weights, which this does not
    model = _loadable(model_class_for(auto_class, config))(flax_config(config), _do_init=False, **load_kwargs)
    model._config = config if config.model_type != "qwen2" else model.config
    return model


def _split_kwargs(name_or_path: str, kwargs) -> tuple[Any, dict]:
    """``(config, model kwargs)``: the checkpoint's config with ``kwargs``' config fields set, and the rest."""
    from transformers import AutoConfig

    config_kwargs = {k: v for k, v in kwargs.items() if k not in ("dtype", "from_pt", "gradient_checkpointing")}
    load_kwargs = {k: v for k, v in kwargs.items() if k not in config_kwargs}
    return AutoConfig.from_pretrained(name_or_path, **config_kwargs), load_kwargs


_LAYER_COUNTS = ("num_hidden_layers", "n_layer", "num_layers", "encoder_layers", "decoder_layers")


def _draw(model, config, load_kwargs, wanted) -> dict:
    """The leaves ``wanted`` of HF's random init of ``model``, jitted (HF's own init runs op by op).

    Flax derives each module's random stream from its path, so a copy of the model with one layer draws
    the same head; tracing that copy takes a fraction of the full model's time (about 2.5 s for a 24-layer
    encoder on a CPU), and returning only the wanted leaves lets XLA drop the rest of the init and its
    forward pass. The full model is used where the copy lacks a wanted leaf (a layer's own weight).
    """
    shallow_config = copy.deepcopy(config)
    for name in _LAYER_COUNTS:
        if isinstance(getattr(shallow_config, name, None), int):
            setattr(shallow_config, name, 1)
    shallow = type(model)(flax_config(shallow_config), _do_init=False, **load_kwargs)
    shapes = flatten_dict(shallow.params_shape_tree)
    full = flatten_dict(model.params_shape_tree)
    source = shallow if all(k in shapes and shapes[k].shape == full[k].shape for k in wanted) else model
    draw = jax.jit(lambda rng: [flatten_dict(source.init_weights(rng, (1, 1)))[k] for k in wanted])
    return dict(zip(wanted, draw(jax.random.PRNGKey(0))))


def _read_sharded_safetensors(model, index: Path) -> dict:
    """The Flax params of a PyTorch checkpoint in several safetensors files, converted as HF converts one."""
    from safetensors import safe_open
    from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax

    state = {}
    for name in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        with safe_open(str(index.parent / name), framework="np") as shard:
            if (shard.metadata() or {}).get("format", "pt") != "pt":
                raise ValueError(f"{index.parent / name} is not a PyTorch-format safetensors file")
            state.update({key: shard.get_tensor(key) for key in shard.keys()})
    return convert_pytorch_state_dict_to_flax(state, model)


@functools.cache
def _loadable(model_class: type) -> type:
    """``model_class`` whose ``params`` read as their shapes until initialised, and whose layout is traced once.

    transformers 4.57 converts PyTorch weights by reading ``model.params`` for the layout alone, which
    raises for a model built with ``_do_init=False``; loading that way skips a random init of the whole
    model and lets `from_pretrained` see which weights the checkpoint lacks.

    A model built with ``_do_init=False`` traces its whole init for the params' layout (about a second for a
    24-layer encoder or a 7B decoder on a CPU), and a run builds the same model twice: once for the layout
    that step programs are lowered from, once inside HF's ``from_pretrained``. A build with the same config
    (its JSON) and arguments as an earlier one reuses that layout (`_LAYOUTS`) instead of tracing again.
    """

    def params(self):
        return model_class.params.fget(self) if self._is_initialized else self.params_shape_tree

    def __init__(self, config, *args, **kwargs):
        key = None
        if kwargs.get("_do_init", True) is False:
            key = (model_class, config.to_json_string(), repr(args), repr(sorted(kwargs.items())))
        token = _KNOWN_LAYOUT.set(_LAYOUTS.get(key))
        try:
            model_class.__init__(self, config, *args, **kwargs)
        finally:
            _KNOWN_LAYOUT.reset(token)
        if key is not None:
            _LAYOUTS.pop(key, None)
            _LAYOUTS[key] = self.params_shape_tree
            while len(_LAYOUTS) > 8:
                _LAYOUTS.pop(next(iter(_LAYOUTS)))

    def init_weights(self, rng, input_shape, params=None):
        known = _KNOWN_LAYOUT.get()
        if known is not None and params is None:  # traced by __init__'s eval_shape: only the shapes matter
            return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), known)
        return model_class.init_weights(self, rng, input_shape, params)

    namespace = {
        "params": property(params, model_class.params.fset),
        "__init__": __init__,
        "init_weights": init_weights,
    }
    return type(model_class.__name__, (model_class,), namespace)


# Layouts (params_shape_tree) of recent _do_init=False builds, by class, config JSON and arguments; and the one
# the build in progress on this thread may reuse.
_LAYOUTS: dict[tuple, Any] = {}
_KNOWN_LAYOUT: contextvars.ContextVar = contextvars.ContextVar("rocoft_known_layout", default=None)


def _zero_missing(model, params, wanted) -> dict:
    flat = flatten_dict(params)
    shapes = flatten_dict(model.params_shape_tree)
    for path, shape in shapes.items():
        if path not in flat and wanted(path):
            flat[path] = np.zeros(shape.shape, shape.dtype)
    return unflatten_dict(flat)
