"""Loading HF Flax models: pretrained from the hub or a local dir, or random from a shape preset.

Presets need no download. ``tiny`` is the offline default's model; ``tiny-llama``,
``tiny-mistral``, ``tiny-gemma``, ``tiny-gptj``, ``tiny-bloom``, ``tiny-opt`` and ``tiny-gpt2`` are
2-layer causal LMs sized for the offline byte tokenizer (`train.byte_tokenizer`); the others
reproduce the shapes of well-known checkpoints for benchmarks.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import os
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from transformers import (
    AutoConfig,
    BartConfig,
    BertConfig,
    BloomConfig,
    GemmaConfig,
    GPT2Config,
    GPTJConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    RobertaConfig,
)

from rocoft_jax import faithful, families
from train import byte_tokenizer
from train.errors import ModelError

_ROBERTA = dict(
    vocab_size=50265,
    max_position_embeddings=514,
    type_vocab_size=1,
    layer_norm_eps=1e-5,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
)
# The byte tokenizer's 259 ids, padded to a multiple of 8 so fsdp/tensor axes can split the vocabulary.
_BYTES = dict(
    vocab_size=264,
    bos_token_id=byte_tokenizer.BOS_ID,
    eos_token_id=byte_tokenizer.EOS_ID,
    pad_token_id=byte_tokenizer.PAD_ID,
)
PRESETS = {
    "tiny": lambda: RobertaConfig(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=66,
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    ),
    "tiny-llama": lambda: LlamaConfig(
        **_BYTES,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
    ),
    "tiny-mistral": lambda: MistralConfig(
        **_BYTES,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    ),
    "tiny-gemma": lambda: GemmaConfig(
        **_BYTES,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=2048,
    ),
    "tiny-gptj": lambda: GPTJConfig(**_BYTES, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=2048),
    "tiny-bloom": lambda: BloomConfig(**_BYTES, hidden_size=64, n_layer=2, n_head=4),
    "tiny-opt": lambda: OPTConfig(
        **_BYTES,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=128,
        word_embed_proj_dim=64,
        max_position_embeddings=2048,
    ),
    "tiny-gpt2": lambda: GPT2Config(**_BYTES, n_embd=64, n_layer=2, n_head=4, n_positions=2048),
    # A 2+2-layer BART for the summarization tasks, read with the byte tokenizer. As in BART, the decoder starts
    # from EOS and generation forces BOS first and EOS at the length limit.
    "tiny-bart": lambda: BartConfig(
        **_BYTES,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_position_embeddings=1024,
        decoder_start_token_id=byte_tokenizer.EOS_ID,
        forced_bos_token_id=byte_tokenizer.BOS_ID,
        forced_eos_token_id=byte_tokenizer.EOS_ID,
    ),
    "roberta-base": lambda: RobertaConfig(**_ROBERTA),
    "roberta-large": lambda: RobertaConfig(
        **_ROBERTA, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096
    ),
    "bert-base-uncased": lambda: BertConfig(),
    "bert-large-uncased": lambda: BertConfig(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096
    ),
    "bart-large": lambda: BartConfig(),  # transformers' defaults are facebook/bart-large's shape
    "llama-2-7b": lambda: LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    ),
    "llama-2-13b": lambda: LlamaConfig(
        vocab_size=32000,
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    ),
}

DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16}
# The ``model_type`` of the families trained as causal LMs (HF Flax has *ForCausalLM for each).
CAUSAL_LM_TYPES = families.model_types("causal-lm")
# Config attributes of dropout rates across families: BERT-likes, DistilBERT/BART/OPT, Llama-likes and Bloom, GPT-2/J.
DROPOUT_KEYS = (
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "dropout",
    "attention_dropout",
    "hidden_dropout",
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
)


def _auto_class(head: str):
    if head == "sequence-classification":
        return transformers.FlaxAutoModelForSequenceClassification
    if head == "causal-lm":
        return transformers.FlaxAutoModelForCausalLM
    if head == "seq2seq-lm":  # encoder-decoder LMs (summarization)
        return transformers.FlaxAutoModelForSeq2SeqLM
    if head == "question-answering":  # extractive QA: start and end logits per token
        return transformers.FlaxAutoModelForQuestionAnswering
    if head == "masked-lm":  # train.ntk's prompt-based f(x)
        return transformers.FlaxAutoModelForMaskedLM
    if head == "base":  # train.ntk's readout on the pooled output
        return transformers.FlaxAutoModel
    raise ValueError(f"unknown head {head!r}")


def preset_config(name: str, **overrides):
    """The config of a shape preset, or of a local HF config dir."""
    if name in PRESETS:
        config = PRESETS[name]()
    elif Path(name, "config.json").is_file():
        config = AutoConfig.from_pretrained(name)
    else:
        raise ModelError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)} or an HF config dir")
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def unbound_model(config, head: str, dtype: str, remat: bool):
    """The HF Flax model of ``config`` and ``head``, without params (``.params_shape_tree`` is their layout).

    ``remat`` is HF's gradient checkpointing, which not every family has.
    """
    cls = _model_class(config, head)
    kwargs = {"gradient_checkpointing": True} if remat else {}
    return cls(config, dtype=DTYPES[dtype], _do_init=False, **kwargs)


def _model_class(config, head: str):
    """The HF Flax class of ``config`` and ``head``, with `rocoft_jax.faithful`'s fixes where it needs them."""
    try:
        return faithful.model_class_for(_auto_class(head), config)
    except faithful.UnsupportedConfig as err:
        raise ModelError(str(err)) from err
    except KeyError:
        raise ModelError(
            f"{config.model_type} has no HF Flax {head} class; for the LLM tasks use a Llama, Mistral, "
            "Gemma, GPT-J, Bloom, OPT, GPT-2 or Qwen2 model"
        ) from None


def random_model(config, head: str, dtype: str = "fp32", seed: int = 0):
    """A randomly initialised model and its params, built without host copies of the weights.

    Params are created by a jitted init, so large shapes go straight to the
    device; with ``dtype="bf16"`` they are cast inside the same program.
    """
    model = unbound_model(config, head, dtype, remat=False)
    shape = (1, min(16, config.max_position_embeddings - 2))
    init = jax.jit(lambda rng: jax.tree.map(lambda x: x.astype(DTYPES[dtype]), model.init_weights(rng, shape)))
    return model, init(jax.random.PRNGKey(seed))


def random_model_fast(config, head: str, dtype: str = "bf16", seed: int = 0, remat: bool = False):
    """Like `random_model`, for benchmarks and the causal-LM presets: N(0, 0.02) kernels and
    embeddings, unit norm scales, zero biases, drawn per leaf by one small jitted program per
    distinct shape.

    HF's own init compiles the whole model (minutes for 24+ layers on a GPU);
    a benchmark needs only the shapes and plausible magnitudes.
    """
    model = unbound_model(config, head, dtype, remat)
    shapes = jax.eval_shape(lambda rng: model.init_weights(rng, (1, 8)), jax.random.PRNGKey(0))
    target = DTYPES[dtype]

    @functools.partial(jax.jit, static_argnums=(1, 2))
    def draw(key, shape, kind):
        if kind == "ones":
            return jnp.ones(shape, target)
        if kind == "zeros":
            return jnp.zeros(shape, target)
        return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(target)

    def leaf(path, spec):
        name = str(getattr(path[-1], "key", path[-1]))
        kind = "zeros" if name == "bias" else "ones" if name in ("scale", "weight") else "normal"
        # crc32, not hash(): str hashes change from one process to the next.
        key = jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(jax.tree_util.keystr(path).encode()) % (2**31))
        return draw(key, tuple(spec.shape), kind)

    return model, jax.tree_util.tree_map_with_path(leaf, shapes)


def dropout_overrides(model_config, rate: float) -> dict[str, float]:
    """Every dropout rate ``model_config`` has, set to ``rate`` (``--dropout``)."""
    return {key: rate for key in DROPOUT_KEYS if hasattr(model_config, key)}


def load_config(name_or_dir: str):
    """The HF config of a hub id or local model dir."""
    check_source(name_or_dir)
    try:
        return AutoConfig.from_pretrained(name_or_dir)
    except OSError as err:
        raise ModelError(
            f"cannot load the config of --model {name_or_dir} ({str(err).splitlines()[0]}); "
            "give a local model dir or a reachable hub id"
        ) from err


def _weights_kind(path: Path) -> dict:
    if any(
        (path / name).is_file() for name in ("flax_model.msgpack", "model.safetensors", faithful.SHARDED_SAFETENSORS)
    ):
        return {}
    if (path / "pytorch_model.bin").is_file():
        return {"from_pt": True}
    raise ModelError(
        f"{path} holds no weights: expected flax_model.msgpack, model.safetensors (or its sharded index) "
        "or pytorch_model.bin"
    )


def check_source(name_or_dir: str) -> Path | None:
    """The local dir of ``name_or_dir``, None for a hub id; a clear error for a bad path."""
    local = Path(os.path.expanduser(name_or_dir))
    if local.exists():
        if not local.is_dir():
            raise ModelError(f"--model {name_or_dir}: not a directory; give an HF model dir or hub id")
        return local
    if name_or_dir.startswith((".", "/", "~")):
        raise ModelError(f"--model {name_or_dir}: no such directory; check the path")
    return None


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A model, its tokenizer and the layout of its params, with the params read only by `load`.

    ``abstract_params`` are ``jax.ShapeDtypeStruct`` leaves in the dtypes `load` returns, so a caller can
    choose rows, lay out state and compile step programs before (and while) the weights are read.
    """

    model: Any
    abstract_params: Any
    tokenizer: Any
    load: Callable[[], Any]

    @classmethod
    def of(cls, model, params, tokenizer) -> ModelSource:
        """The source of params already in hand (a random-init preset)."""
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
        return cls(model, abstract, tokenizer, lambda: params)


def pretrained_source(name_or_dir: str, head: str, dtype: str = "fp32", tokenizer=None, **config_overrides):
    """The `ModelSource` of a hub id or local dir, with ``config_overrides`` (e.g. num_labels): the model and
    its params' layout at once, the weights when ``load`` is called (see `load_pretrained`)."""
    local = check_source(name_or_dir)
    _model_class(load_config(name_or_dir), head)  # a config error before any weights are looked for
    kwargs = dict(config_overrides)
    if local is not None:
        kwargs.update(_weights_kind(local))
    path = str(local) if local else name_or_dir
    with _load_errors(name_or_dir):
        model = faithful.unloaded_model(_auto_class(head), path, dtype=DTYPES[dtype], **kwargs)
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, DTYPES[dtype]), model.params_shape_tree)

    def load():
        with _load_errors(name_or_dir):
            _, params = faithful.from_pretrained(
                _auto_class(head),
                path,
                new_head=head not in ("causal-lm", "seq2seq-lm"),  # a language model's head is pretrained
                dtype=DTYPES[dtype],
                **kwargs,
            )
        return on_device(params, DTYPES[dtype])

    return ModelSource(model, abstract, tokenizer, load)


def on_device(params, dtype):
    """``params`` (host arrays) cast to ``dtype`` on the host and placed on the default device.

    Casting on the host keeps a bf16 run from ever holding fp32 weights on the device. numpy's cast releases
    the GIL, so the leaves are cast and placed on a few threads.
    """
    leaves, treedef = jax.tree.flatten(params)
    cast = lambda x: jax.device_put(np.asarray(x).astype(dtype, copy=False))
    with concurrent.futures.ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        return treedef.unflatten(list(pool.map(cast, leaves)))


@contextlib.contextmanager
def _load_errors(name_or_dir: str):
    """`ModelError`s, one line each, for a checkpoint that cannot be read or does not fit its model."""
    try:
        yield
    except OSError as err:
        raise ModelError(
            f"cannot load model {name_or_dir!r} ({str(err).splitlines()[0]}); give a local model dir, "
            "or check the hub id and your network (HF_HUB_OFFLINE=1 needs a cached copy)"
        ) from err
    except ValueError as err:  # a missing weight, a shape mismatch
        raise ModelError(f"--model {name_or_dir}: {str(err).splitlines()[0][:400]}") from err


def load_pretrained(name_or_dir: str, head: str, dtype: str = "fp32", **config_overrides):
    """``(model, params)`` of a hub id or local dir, with ``config_overrides`` (e.g. num_labels).

    Loads through `rocoft_jax.faithful.from_pretrained`: a config HF Flax would run wrong is fixed or
    refused, and a checkpoint missing weights outside a new task head is refused.
    """
    source = pretrained_source(name_or_dir, head, dtype, **config_overrides)
    return source.model, source.load()
