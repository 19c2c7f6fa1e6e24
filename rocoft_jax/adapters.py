"""RoCoFT adapters as files of their own: what a run trained, apart from its base model.

An adapter directory holds two files, readable without JAX:

- ``adapter_model.safetensors``: for each selected kernel its trained slice (``rocoft/<kernel path>``, laid
  out as `rocoft_jax.split` makes it) and its selected indices (``indices/<kernel path>``, int32), and every
  leaf trained in full, e.g. the task head or the targeted biases (``train/<leaf path>``), all fp32;
- ``adapter_config.json``: the base model's name and fingerprint (`fingerprint` of the frozen weights), the
  family, method, mode, rank, strategy and seed, the selected kernels with their shapes, the trained leaves,
  the SHA-256 of the weights file, and free-form ``extra`` fields (the training config, the task).

`load_adapter` reads and validates a directory (numpy only). `check_base` checks an adapter against base
params (family, shapes, fingerprint) and returns its mask; `apply_adapter` gives the trainable tree and frozen
tree of the efficient path (`rocoft_jax.sliced_kernels`), `merge_adapter` the merged params. A wrong base,
a corrupt file or an inconsistent adapter is a one-line ValueError.

`to_peft` writes the same update as a peft LoRA adapter. For rows ``idx`` of a PyTorch-layout weight W0
(d_out x d_in) trained to S, ``W - W0 = E (S - W0[idx, :])`` with E the one-hot d_out x r selector of ``idx``;
for columns, ``W - W0 = (S - W0[:, idx]) E^T``. So ``lora_B = E, lora_A = S - W0[idx]`` (rows) or
``lora_B = S - W0[:, idx], lora_A = E^T`` (columns), with ``lora_alpha = r`` (scale 1). Trained biases of the
targeted layers go where peft keeps them (``bias="lora_only"``), other trained leaves into ``modules_to_save``
(whole modules, untrained parameters at their base values). Fused projections (Bloom's ``query_key_value``,
GPT-2's ``c_attn``) are one PyTorch module each, so their rows and columns are a rank-r update of it too.
Random entries have no low-rank form, and a trained leaf the PyTorch model has no parameter for (the zero
o_proj bias a Qwen2 loads with as a Llama) cannot be carried: both are refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors.numpy

from rocoft_jax import families as families_lib
from rocoft_jax import mask as mask_lib
from rocoft_jax import tree as tree_lib
from rocoft_jax.mask import ROCOFT, TRAIN, KernelSlice, RoCoFTMask
from rocoft_jax.slices import merge, split

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT = "rocoft_jax.adapter"
FORMAT_VERSION = 1
METHODS = ("rocoft", "bitfit")  # what an adapter holds: slices and/or whole leaves; LoRA and full are refused
_SLICE, _INDEX, _LEAF = "rocoft/", "indices/", "train/"
# Required fields of adapter_config.json and their JSON types.
_FIELDS = {
    "format": str,
    "format_version": int,
    "base_model": str,
    "base_fingerprint": str,
    "method": str,
    "mode": str,
    "rank": (int, float),
    "strategy": str,
    "seed": int,
    "kernels": dict,
    "train": list,
    "weights_sha256": str,
}
# Family records (`rocoft_jax.families`) whose PyTorch classes name their modules as the Flax paths with dots, so
# peft's LoRA reaches them: "bert" (BERT, RoBERTa, XLM-R, ELECTRA, RoBERTa-PreLayerNorm, BigBird), "distilbert",
# "llama" (Llama, Mistral, Gemma, and Qwen2 loaded as a Llama), "opt", "gptj", "bloom" and "gpt2".
PEFT_FAMILIES = ("bert", "distilbert", "llama", "opt", "gptj", "bloom", "gpt2")
# PyTorch model_type -> regex of the Flax leaves its PyTorch model lacks: rocoft_jax.faithful's zero stand-ins.
_TORCH_ABSENT = {"qwen2": r"self_attn/o_proj/bias$"}


def fingerprint(frozen) -> str:
    """A hash of the frozen weights' paths, shapes and sampled values.

    Samples (the first and 64 strided entries of each leaf, rounded to bf16)
    keep it cheap for 7B models and independent of dtype and sharding.
    """
    leaves = sorted(tree_lib.flatten(frozen).items())
    on_device = [leaf for _, leaf in leaves if isinstance(leaf, jax.Array)]
    # One program samples every device leaf and one transfer brings the samples back (not two eager
    # slices and two syncs per leaf); host leaves are sampled in place.
    device_samples = iter(jax.device_get(_samples(on_device)) if on_device else [])
    digest = hashlib.sha256()
    for path, leaf in leaves:
        sample = next(device_samples) if isinstance(leaf, jax.Array) else _sample(np.asarray(leaf))
        digest.update(f"{path}:{tuple(leaf.shape)}".encode())
        digest.update(np.asarray(sample).astype(np.float32).astype(ml_dtypes.bfloat16).tobytes())
    return digest.hexdigest()[:16]


def _sample(leaf):
    """The first 64 entries of the flattened leaf, then 64 strided ones (numpy or traced)."""
    flat = leaf.reshape(-1)
    stride = max(flat.shape[0] // 64, 1)
    xp = np if isinstance(leaf, np.ndarray) else jnp
    return xp.concatenate([flat[:64], flat[::stride][:64]])


@jax.jit
def _samples(leaves):
    return [_sample(leaf) for leaf in leaves]


@dataclasses.dataclass(frozen=True, eq=False)
class Adapter:
    """One adapter: its config record and its arrays (numpy, fp32 values, int32 indices).

    ``slices`` and ``indices`` are keyed by kernel path, ``trained`` by leaf path ("/"-joined).
    """

    config: dict[str, Any]
    slices: dict[str, np.ndarray]
    indices: dict[str, np.ndarray]
    trained: dict[str, np.ndarray]
    source: str = ""  # where it was read from, for messages

    @property
    def name(self) -> str:
        return self.source or f"for {self.config['base_model']}"

    @property
    def family(self) -> str | None:
        return self.config.get("family")

    @property
    def mode(self) -> str:
        return self.config["mode"]

    @property
    def kernels(self) -> list[str]:
        return list(self.config["kernels"])

    def trainable(self, dtype=jnp.float32):
        """The trainable tree of `rocoft_jax.split`: ``{"rocoft": slices, "train": leaves}``."""
        as_tree = lambda d: tree_lib.unflatten({p: jnp.asarray(v, dtype) for p, v in d.items()})
        return {ROCOFT: as_tree(self.slices), TRAIN: as_tree(self.trained)}


def _out_axis(family: str | None) -> int:
    return families_lib.get_family(family).out_axis if family else 1


def _slice_axis(mode: str, out_axis: int) -> int | None:
    if mode == "random":
        return None
    return out_axis if mode == "row" else 1 - out_axis


def from_trainable(
    trainable,
    mask: RoCoFTMask,
    *,
    base_fingerprint: str,
    base_model: str,
    method: str = "rocoft",
    extra: Mapping[str, Any] | None = None,
) -> Adapter:
    """The adapter of a trainable tree (`rocoft_jax.split`'s layout) and its mask.

    ``base_fingerprint`` is `fingerprint` of the frozen tree the slices were trained on; ``extra`` is stored
    as is (JSON-ready), e.g. the training config.
    """
    if method not in METHODS:
        raise ValueError(
            f"an adapter holds RoCoFT slices and trained leaves; method {method!r} has none of its own "
            f"(methods: {', '.join(METHODS)}); export the merged model instead"
        )
    slices = {p: _as_f32(v) for p, v in tree_lib.flatten(trainable.get(ROCOFT, {})).items()}
    trained = {p: _as_f32(v) for p, v in tree_lib.flatten(trainable.get(TRAIN, {})).items()}
    if set(slices) != set(mask.slices):
        missing = sorted(set(mask.slices) ^ set(slices))[0]
        raise ValueError(f"the trainable tree and the mask disagree on kernel {missing!r}; pass the pair from split()")
    expected_train = {p for p, label in mask.label_of.items() if label == TRAIN}
    if set(trained) != expected_train:
        missing = sorted(expected_train ^ set(trained))[0]
        raise ValueError(f"the trainable tree and the mask disagree on leaf {missing!r}; pass the pair from split()")
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "base_model": str(base_model),
        "base_fingerprint": base_fingerprint,
        "family": mask.family,
        "method": method,
        "mode": mask.mode,
        "rank": mask.rank,
        "strategy": mask.strategy,
        "seed": int(mask.seed),
        "num_trainable": int(mask.num_trainable),
        "kernels": {p: list(s.shape) for p, s in mask.slices.items()},
        "train": sorted(trained),
        "train_shapes": {p: list(v.shape) for p, v in sorted(trained.items())},
        "weights_sha256": "",
        "extra": dict(extra or {}),
    }
    indices = {p: np.asarray(s.indices, np.int32) for p, s in mask.slices.items()}
    adapter = Adapter(config, slices, indices, trained)
    _check_consistent(adapter)
    return adapter


def save_adapter(adapter: Adapter, directory) -> Path:
    """Writes ``adapter_model.safetensors`` and ``adapter_config.json`` into ``directory``; returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for path in adapter.kernels:
        tensors[_SLICE + path] = np.ascontiguousarray(adapter.slices[path], np.float32)
        tensors[_INDEX + path] = np.ascontiguousarray(adapter.indices[path], np.int32)
    for path, value in adapter.trained.items():
        tensors[_LEAF + path] = np.ascontiguousarray(value, np.float32)
    weights = directory / WEIGHTS_FILE
    safetensors.numpy.save_file(tensors, str(weights), metadata={"format": FORMAT})
    config = {**adapter.config, "weights_sha256": _sha256(weights)}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, allow_nan=False) + "\n")
    return directory


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_adapter(directory) -> Adapter:
    """The adapter in ``directory``, validated (files present, checksum, fields, shapes); numpy only.

    Raises a one-line ValueError naming the file and the problem.
    """
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ValueError(
                f"{path} does not exist; an adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE} "
                "(python -m train.export --format adapter)"
            )
    try:
        config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{config_path} is not valid JSON ({err}); export the adapter again") from err
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        hint = " (a peft adapter: load it with peft)" if isinstance(config, dict) and "peft_type" in config else ""
        raise ValueError(f"{config_path} is not a rocoft_jax adapter config{hint}")
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{config_path} has format version {config.get('format_version')!r}; this rocoft_jax reads "
            f"version {FORMAT_VERSION}"
        )
    bad = [k for k, kind in _FIELDS.items() if not isinstance(config.get(k), kind) or isinstance(config.get(k), bool)]
    if bad:
        raise ValueError(f"{config_path} lacks a valid {', '.join(bad)}; export the adapter again")
    if _sha256(weights_path) != config["weights_sha256"]:
        raise ValueError(
            f"{weights_path} does not match the checksum in {CONFIG_FILE}: the file is corrupt or was changed; "
            "export the adapter again"
        )
    try:
        tensors = safetensors.numpy.load_file(str(weights_path))
    except Exception as err:  # safetensors raises its own error types for a damaged file
        raise ValueError(f"{weights_path} is corrupt ({type(err).__name__}: {str(err)[:200]})") from err
    slices, indices, trained = {}, {}, {}
    try:
        for path in config["kernels"]:
            slices[path] = tensors.pop(_SLICE + path)
            indices[path] = tensors.pop(_INDEX + path)
        for path in config["train"]:
            trained[path] = tensors.pop(_LEAF + path)
    except KeyError as err:
        raise ValueError(f"{weights_path} lacks the tensor {err.args[0]!r} that {CONFIG_FILE} names") from None
    if tensors:
        raise ValueError(f"{weights_path} holds a tensor {sorted(tensors)[0]!r} that {CONFIG_FILE} does not name")
    adapter = Adapter(config, slices, indices, trained, source=str(directory))
    _check_consistent(adapter)
    return adapter


def _check_consistent(adapter: Adapter) -> None:
    """Each slice fits its recorded kernel shape, mode and indices."""
    config, where = adapter.config, adapter.name
    if config["mode"] not in mask_lib.MODES and config["method"] == "rocoft":
        raise ValueError(f"adapter {where} has unknown mode {config['mode']!r}")
    if config["method"] not in METHODS:
        raise ValueError(f"adapter {where} has method {config['method']!r}; adapters hold {', '.join(METHODS)}")
    if config.get("family") is not None:
        families_lib.get_family(config["family"])
    out_axis = _out_axis(config.get("family"))
    axis = _slice_axis(config["mode"], out_axis)
    for path, shape in config["kernels"].items():
        shape = tuple(int(d) for d in shape)
        idx = adapter.indices[path]
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"adapter {where}: the indices of {path} are not a vector of integers")
        try:
            spec = KernelSlice(shape, axis, out_axis, idx.astype(np.int32))
        except ValueError as err:
            raise ValueError(f"adapter {where}: {path}: {err}") from None
        if tuple(adapter.slices[path].shape) != spec.slice_shape:
            raise ValueError(
                f"adapter {where}: the slice of {path} has shape {tuple(adapter.slices[path].shape)}, but "
                f"{len(idx)} {config['mode']}s of a {shape} kernel make {spec.slice_shape}"
            )
    for path, shape in config.get("train_shapes", {}).items():
        if path in adapter.trained and tuple(adapter.trained[path].shape) != tuple(shape):
            raise ValueError(
                f"adapter {where}: trained leaf {path} has shape {tuple(adapter.trained[path].shape)}, "
                f"not {tuple(shape)}"
            )


def adapter_mask(adapter: Adapter, params, *, head_shapes: bool = True) -> RoCoFTMask:
    """The mask of ``adapter`` on ``params``: its saved indices, after the family and shape checks.

    ``head_shapes=False`` lets trained leaves differ in shape from the base's (another head size), for
    mixed batches; merging and the efficient path need equal shapes.
    """
    leaves = tree_lib.flat_paths(params)
    where = adapter.name
    family = adapter.family
    if family is not None:
        try:
            found = families_lib.detect_family(leaves).name
        except ValueError:
            found = None
        if found != family:
            raise ValueError(
                f"adapter {where} is for a {family} model ({adapter.config['base_model']}), but these params are "
                f"{'a ' + found if found else 'of an unknown family'}: load the base model it was trained on"
            )
    out_axis = _out_axis(family)
    axis = _slice_axis(adapter.mode, out_axis)
    slices = {}
    for path in adapter.kernels:
        if path not in leaves:
            raise ValueError(
                f"adapter {where} slices {path}, which these params lack: a different base model "
                f"(the adapter's is {adapter.config['base_model']})"
            )
        shape = tuple(int(d) for d in np.shape(leaves[path]))
        if shape != tuple(adapter.config["kernels"][path]):
            raise ValueError(
                f"adapter {where} was trained on a {tuple(adapter.config['kernels'][path])} kernel at {path}, but "
                f"these params have {shape}: a different base model (the adapter's is {adapter.config['base_model']})"
            )
        slices[path] = KernelSlice(shape, axis, out_axis, adapter.indices[path].astype(np.int32))
    for path, value in adapter.trained.items():
        if path not in leaves:
            raise ValueError(f"adapter {where} trains {path}, which these params lack: load the base with that head")
        if head_shapes and tuple(np.shape(leaves[path])) != tuple(value.shape):
            raise ValueError(
                f"adapter {where} trained {path} with shape {tuple(value.shape)}, but these params have "
                f"{tuple(np.shape(leaves[path]))}: load the base with the adapter's head (e.g. its num_labels)"
            )
    return mask_lib._build(
        params,
        leaves,
        slices,
        list(adapter.trained),
        mode=adapter.mode,
        rank=adapter.config["rank"],
        strategy=adapter.config["strategy"],
        family=family,
        seed=adapter.config["seed"],
    )


def base_fingerprint(params, adapter: Adapter) -> str:
    """`fingerprint` of ``params`` without the leaves ``adapter`` trains in full: what it records of its base."""
    trained = set(adapter.trained)
    return fingerprint(tree_lib.unflatten({p: v for p, v in tree_lib.flatten(params).items() if p not in trained}))


def check_base(adapter: Adapter, params, *, head_shapes: bool = True) -> RoCoFTMask:
    """The adapter's mask on ``params`` once family, shapes and fingerprint match; else a ValueError."""
    mask = adapter_mask(adapter, params, head_shapes=head_shapes)
    found = base_fingerprint(params, adapter)
    if found != adapter.config["base_fingerprint"]:
        raise ValueError(
            f"adapter {adapter.name} was trained on other base weights ({adapter.config['base_model']}, "
            f"fingerprint {adapter.config['base_fingerprint']}) than these (fingerprint {found}); "
            "load the exact base model it was trained on"
        )
    return mask


def apply_adapter(params, adapter: Adapter):
    """``(trainable, frozen, mask)`` for the efficient path, after `check_base`:

    with rocoft_jax.sliced_kernels(trainable, mask):
        logits = model(**batch, params=rocoft_jax.with_trained_leaves(frozen, trainable)).logits
    """
    mask = check_base(adapter, params)
    _, frozen = split(params, mask)
    return adapter.trainable(), frozen, mask


def merge_adapter(params, adapter: Adapter):
    """``params`` with the adapter merged in (kernels keep their dtype, trained leaves are fp32), after `check_base`."""
    trainable, frozen, mask = apply_adapter(params, adapter)
    return merge(trainable, frozen, mask)


# ---------------------------------------------------------------- peft


def torch_name(path: str) -> tuple[str, str]:
    """``(PyTorch module name, parameter name)`` of a Flax leaf path, as HF's PyTorch classes name them."""
    parts = path.split("/")
    param = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(parts[-1], parts[-1])
    return ".".join(parts[:-1]), param


def torch_layout(path: str, value: np.ndarray) -> np.ndarray:
    """A Flax leaf in PyTorch's layout: kernels transposed (GPT-2's Conv1D kernels become Conv1D weights)."""
    value = np.asarray(value, np.float32)
    return np.ascontiguousarray(value.T if path.endswith("/kernel") else value)


def _as_f32(x) -> np.ndarray:
    return np.asarray(jax.device_get(x)).astype(np.float32)


def base_model_type(name: str) -> str | None:
    """``model_type`` of the config.json of base model ``name`` (a local dir, or a hub id in the local HF cache).

    None when there is no such file; nothing is downloaded.
    """
    path = Path(name, "config.json")
    if not path.is_file():
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(name, "config.json")
        except ValueError:  # not a hub id (a path that does not exist, a preset name with odd characters)
            cached = None
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    try:
        return json.loads(path.read_text()).get("model_type")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None


def to_peft(
    adapter: Adapter, params, *, task_type: str | None = None, model_type: str | None = None
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(adapter_config, tensors)`` of a peft LoRA adapter that computes exactly ``adapter``'s update.

    ``params`` are the base params (checked with `check_base`); the slices enter as they are merged, in the
    kernels' dtype. ``task_type`` defaults to SEQ_CLS (QUESTION_ANS for a span head) for encoders and
    CAUSAL_LM for causal LMs. ``model_type`` is the PyTorch base's ``config.model_type``, by default
    `base_model_type` of the adapter's base model. Refuses, with a one-line ValueError, what LoRA cannot express
    exactly: random entries, adapters without slices, families outside `PEFT_FAMILIES`, a leaf both sliced and
    trained in full, and a trained leaf the PyTorch model has no parameter for.
    """
    where = adapter.name
    if adapter.config["method"] != "rocoft" or adapter.mode not in ("row", "column"):
        what = "random entries have" if adapter.mode == "random" else f"method {adapter.config['method']!r} has"
        raise ValueError(f"adapter {where}: {what} no low-rank form; export it as --format adapter or merged instead")
    if adapter.family not in PEFT_FAMILIES:
        raise ValueError(
            f"adapter {where}: peft export covers the families {', '.join(PEFT_FAMILIES)}, not {adapter.family}"
        )
    mask = check_base(adapter, params)
    family = families_lib.get_family(adapter.family)
    flat = tree_lib.flatten(params)
    if model_type is None:
        model_type = base_model_type(adapter.config["base_model"])
    absent = _TORCH_ABSENT.get(model_type)
    lacks = lambda path: absent is not None and re.search(absent, path) is not None
    carried = sorted(p for p in adapter.trained if lacks(p))
    if carried:
        raise ValueError(
            f"adapter {where}: it trains {carried[0]}, which the PyTorch {model_type} model has no parameter for; "
            "train without biases, or export it merged or as an adapter"
        )
    rank = int(adapter.config["rank"])
    prefix = "base_model.model."
    tensors: dict[str, np.ndarray] = {}
    targets = []
    for path, spec in mask.slices.items():
        kernel = flat[path]
        merged_values = _as_f32(jnp.asarray(adapter.slices[path]).astype(kernel.dtype))
        w0 = _as_f32(kernel)
        # The PyTorch (d_out, d_in) view: a Dense kernel is its transpose, a GPT-2 Conv1D kernel already is it.
        w0 = w0 if spec.out_axis == 0 else w0.T
        values = merged_values if spec.out_axis == 0 else merged_values.T
        idx = np.asarray(spec.indices)
        d_out, d_in = w0.shape
        selector = np.zeros((len(idx), d_out if spec.axis == spec.out_axis else d_in), np.float32)
        selector[np.arange(len(idx)), idx] = 1.0
        if spec.axis == spec.out_axis:  # rows: W[idx, :] = S
            lora_a, lora_b = values - w0[idx, :], selector.T
        else:  # columns: W[:, idx] = S
            lora_a, lora_b = selector, values - w0[:, idx]
        module = torch_name(path)[0]
        targets.append(module)
        tensors[f"{prefix}{module}.lora_A.weight"] = np.ascontiguousarray(lora_a)
        tensors[f"{prefix}{module}.lora_B.weight"] = np.ascontiguousarray(lora_b)

    target_modules = {p[: -len("/kernel")] for p in mask.slices}
    trained = set(adapter.trained)
    lora_biases = {p for p in trained if p.endswith("/bias") and p[: -len("/bias")] in target_modules}
    bias = "none"
    if lora_biases:  # peft's "lora_only" keeps the bias of every LoRA layer: write each, trained or base
        bias = "lora_only"
        for module in sorted(target_modules):
            if module + "/bias" in flat and not lacks(module + "/bias"):
                value = adapter.trained.get(module + "/bias", flat[module + "/bias"])
                tensors[f"{prefix}{torch_name(module + '/bias')[0]}.base_layer.bias"] = _as_f32(value)
    if task_type is None:
        if family.kind == "causal-lm":
            task_type = "CAUSAL_LM"
        elif any(p.startswith("qa_outputs/") for p in trained):
            task_type = "QUESTION_ANS"
        else:
            task_type = "SEQ_CLS"
    modules = _modules_to_save({p.rsplit("/", 1)[0] for p in trained - lora_biases}, task_type)
    clash = [m for m in modules for t in target_modules if t == m or t.startswith(m + "/")]
    if clash:
        raise ValueError(f"adapter {where}: {clash[0]} is both sliced and trained in full, which LoRA cannot express")
    for module in modules:
        for path in [p for p in flat if p.startswith(module + "/")]:
            value = adapter.trained.get(path, flat[path])
            name, param = torch_name(path)
            tensors[f"{prefix}{name}.{param}"] = torch_layout(path, _as_f32(value))
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": adapter.config["base_model"],
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "target_modules": sorted(targets),
        "modules_to_save": [m.replace("/", ".") for m in modules] or None,
        "bias": bias,
        "fan_in_fan_out": family.out_axis == 0,  # GPT-2's Conv1D
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    return config, tensors


# The head modules peft's task classes add to modules_to_save themselves (whole modules, by name).
_PEFT_HEADS = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}


def _modules_to_save(modules: set[str], task_type: str) -> list[str]:
    """Flax module paths for peft's ``modules_to_save``: none inside another, and a head peft wraps itself
    (``classifier`` of SEQ_CLS) named whole, as peft wraps it: nested wrappers of one module clash in peft."""
    heads = _PEFT_HEADS.get(task_type, ())
    modules = {m.split("/")[0] if m.split("/")[0] in heads else m for m in modules}
    return sorted(m for m in modules if not any(m.startswith(other + "/") for other in modules))


def save_peft(
    adapter: Adapter, params, directory, *, task_type: str | None = None, model_type: str | None = None
) -> Path:
    """Writes `to_peft`'s adapter as peft's ``adapter_config.json`` and ``adapter_model.safetensors``."""
    config, tensors = to_peft(adapter, params, task_type=task_type, model_type=model_type)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def num_bytes(directory) -> int:
    """Bytes of an adapter directory's two files."""
    return sum((Path(directory) / f).stat().st_size for f in (CONFIG_FILE, WEIGHTS_FILE))


__all__ = [
    "Adapter",
    "CONFIG_FILE",
    "PEFT_FAMILIES",
    "WEIGHTS_FILE",
    "adapter_mask",
    "apply_adapter",
    "base_fingerprint",
    "base_model_type",
    "check_base",
    "fingerprint",
    "from_trainable",
    "load_adapter",
    "merge_adapter",
    "num_bytes",
    "save_adapter",
    "save_peft",
    "to_peft",
    "torch_layout",
    "torch_name",
]
