"""The fine-tuning methods the harness compares: rocoft, full, lora and bitfit.

Each one is a way to split params into a trainable tree and a frozen tree, to
run the model from the two, and to merge them back for export. The train step
is the same for all, so comparisons are fair.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

import rocoft_jax
from rocoft_jax import lora as lora_lib
from rocoft_jax.fast import fast_paths, remat as remat_lib
from rocoft_jax import families as families_lib
from rocoft_jax import tree as tree_lib

METHODS = ("rocoft", "full", "lora", "bitfit")
ATTENTION = ("auto", "plain", "xla", "cudnn", "cudnn-lengths")


def resolve_attention(name: str) -> str:
    """"auto" is cuDNN's fused kernel on GPUs and HF's own attention elsewhere.

    On GPUs it passes padding as key lengths ("cudnn-lengths"), cuDNN's native
    form: `train` batches are right-padded, and a row that is not comes out NaN.
    """
    if name not in ATTENTION:
        raise ValueError(f"unknown attention {name!r}; choose one of {', '.join(ATTENTION)}")
    if name == "auto":
        return "cudnn-lengths" if jax.default_backend() == "gpu" else "plain"
    return name


REMAT = ("auto", "none", "full", "dots")
REMAT_MIN_PARAMS = 6e9  # 7B's activations outgrow one GPU at the LLM tasks' batch sizes; smaller models fit


def resolve_remat(name: str, model_type: str, num_params: int) -> str | None:
    """The `remat_layers` policy, or None: "auto" is "dots" for Llama/Mistral/Gemma with >= 6B params.

    Only those families' decoder layers can be intercepted (HF's Flax decoders have no remat option).
    """
    if name not in REMAT:
        raise ValueError(f"unknown remat {name!r}; choose one of {', '.join(REMAT)}")
    layered = model_type in remat_lib.MODEL_TYPES
    if name == "auto":
        return "dots" if layered and num_params >= REMAT_MIN_PARAMS else None
    if name != "none" and not layered:
        raise ValueError(f"--remat {name} needs a Llama, Mistral or Gemma model (this is {model_type}, whose "
                         "layers cannot be rematerialized); use --remat none")
    return None if name == "none" else name


MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


@dataclasses.dataclass(frozen=True, eq=False)
class Method:
    """A fine-tuning method bound to one model's params layout."""

    name: str
    mask: rocoft_jax.RoCoFTMask
    lora_paths: tuple[str, ...] = ()
    lora_rank: int = 0
    lora_alpha: float = 0.0
    seed: int = 0

    def split(self, params):
        """``(trainable, frozen)``; the trainable tree is fp32."""
        trainable, frozen = rocoft_jax.split(params, self.mask)
        if self.name == "lora":
            out_axis = families_lib.get_family(self.mask.family).out_axis
            trainable[lora_lib.LORA] = lora_lib.init_lora(
                params, self.lora_paths, self.lora_rank, jax.random.PRNGKey(self.seed), out_axis)
        return trainable, frozen

    def layers(self, trainable):
        """The context that routes the adapted layers through the trainable tree."""
        if self.name == "rocoft":
            return rocoft_jax.sliced_kernels(trainable, self.mask)
        if self.name == "lora":
            return lora_lib.lora_kernels(trainable[lora_lib.LORA], self.lora_alpha, self.lora_rank)
        return contextlib.nullcontext()

    def apply(self, model, trainable, frozen, batch: Mapping[str, Any], *, dropout_rng=None, train=False,
              attention: str = "plain", remat: str | None = None, mesh=None):
        """The model's logits.

        ``attention`` other than "plain" runs HF attention fused (`fused_attention`),
        BERT-family GELU through `rocoft_jax.fast.gelu`, and the last layer of a head that
        reads token 0 alone for that token only (`rocoft_jax.fast.first_token_only`);
        ``remat`` ("full" or "dots", `rocoft_jax.fast.remat.POLICIES`) recomputes each
        Llama/Mistral/Gemma layer in the backward pass (`remat_layers`);
        ``mesh`` is the step's mesh, for the fused attention's layout.
        A ``batch`` without "attention_mask" has no padding: HF builds an all-ones
        mask, which the fused attention is told to skip (``unpadded``).
        """
        if attention != "plain" or remat:
            with fast_paths(model, attention, remat, mesh, unpadded="attention_mask" not in batch):
                return self.apply(model, trainable, frozen, batch, dropout_rng=dropout_rng, train=train)
        params = rocoft_jax.with_trained_leaves(frozen, trainable)
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        # Most HF Flax models take train=; OPT takes deterministic= instead.
        mode = {"train": train} if "train" in inspect.signature(model.__call__).parameters \
            else {"deterministic": not train}
        with self.layers(trainable):
            return model(**inputs, params=params, dropout_rng=dropout_rng, **mode).logits

    def merge(self, trainable, frozen):
        """Full params with everything trained folded in, for export."""
        params = rocoft_jax.merge(trainable, frozen, self.mask)
        if self.name == "lora":
            out_axis = families_lib.get_family(self.mask.family).out_axis
            params = lora_lib.merge_lora(params, trainable[lora_lib.LORA], self.lora_alpha, self.lora_rank, out_axis)
        return params

    def describe(self) -> dict[str, Any]:
        out = {"method": self.name, **self.mask.describe()}
        if self.name == "lora":
            out.update(lora_rank=self.lora_rank, lora_alpha=self.lora_alpha, lora_targets=list(self.lora_paths))
        return out


def build_method(
    name: str,
    params,
    *,
    rank=3,
    mode: str = "row",
    strategy: str = "first",
    seed: int = 0,
    train_bias: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    calibrate: Callable[[list[str]], Mapping[str, Any]] | None = None,
) -> Method:
    """Builds a method; ``calibrate(kernel_paths)`` supplies Wanda norms when the strategy needs them."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    family = families_lib.detect_family(tree_lib.flat_paths(params))
    kernel_paths = families_lib.match_paths(tree_lib.flat_paths(params), family.targets, "target", strict=False)
    head = family.head
    biases = tuple("^" + p[: -len("kernel")] + "bias$" for p in kernel_paths) if train_bias else ()
    if name == "rocoft":
        calibration = None
        if strategy in ("max", "min", "mixed"):
            if calibrate is None:
                raise ValueError(f"strategy {strategy!r} needs calibration batches")
            calibration = calibrate(kernel_paths)
        mask = rocoft_jax.mask_params(params, rank, mode, strategy=strategy, seed=seed,
                                      calibration=calibration, train_bias=train_bias)
        return Method(name, mask, seed=seed)
    if name == "full":
        mask = rocoft_jax.mask_leaves(params, (".*",), name="full")
        return Method(name, dataclasses.replace(mask, family=family.name), seed=seed)
    if name == "bitfit":
        mask = rocoft_jax.mask_leaves(params, head + (r"(^|/)bias$",), name="bitfit", strict=False)
        return Method(name, dataclasses.replace(mask, family=family.name), seed=seed)
    mask = rocoft_jax.mask_leaves(params, head + biases, name="lora", strict=False)
    leaves = tree_lib.flat_paths(params)
    adapters = sum(int(lora_rank) * sum(jnp.shape(leaves[p])) for p in kernel_paths)
    mask = dataclasses.replace(mask, family=family.name, rank=int(lora_rank),
                               num_trainable=mask.num_trainable + adapters)
    return Method(name, mask, tuple(kernel_paths), int(lora_rank), float(lora_alpha), seed)


def restore_method(params, description: Mapping[str, Any]) -> Method:
    """The method recorded by `Method.describe`, with its saved selection (no recalibration)."""
    mask = rocoft_jax.mask_from_description(params, description)
    if description["method"] == "lora":
        return Method("lora", mask, tuple(description["lora_targets"]), int(description["lora_rank"]),
                      float(description["lora_alpha"]), int(description["seed"]))
    return Method(description["method"], mask, seed=int(description["seed"]))
