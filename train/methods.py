"""The fine-tuning methods the harness compares: rocoft, full, lora and bitfit, one small class each.

A method is bound to one model's params layout. It splits params into a trainable tree (fp32) and a frozen
tree, runs the model from the two (`Method.apply`), folds them back together for export (`Method.merge`) and
records itself for checkpoints (`Method.describe`, read back by `restore_method`). The train step is the same
for every method, so comparisons are fair. The base class trains the mask's whole leaves with the model's own
layers (full fine-tuning and BitFit need nothing more); RoCoFT routes its kernels through the sliced matmul,
LoRA through its adapters. `METHODS` maps each name to its class: adding a method is one class and one entry.

`resolve_attention` and `resolve_remat` turn the ``--attention`` and ``--remat`` options into what
`Method.apply` passes to `rocoft_jax.fast.fast_paths`; HF's own attention and no remat are the fallback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

import rocoft_jax
from rocoft_jax import families as families_lib
from rocoft_jax import lora as lora_lib
from rocoft_jax import tree as tree_lib
from rocoft_jax.fast import fast_paths
from rocoft_jax.fast import remat as remat_lib

ATTENTION = ("auto", "plain", "xla", "cudnn", "cudnn-lengths")
REMAT = ("auto", "none", "full", "dots")
REMAT_MIN_PARAMS = 6e9  # 7B's activations outgrow one GPU at the LLM tasks' batch sizes; smaller models fit
MODEL_INPUTS = (
    "input_ids",
    "attention_mask",
    "token_type_ids",
    "position_ids",
    "decoder_input_ids",  # encoder-decoder models (summarization)
    "decoder_attention_mask",
)


def resolve_attention(name: str) -> str:
    """ "auto" is cuDNN's fused kernel on GPUs and HF's own attention elsewhere.

    On GPUs it passes padding as key lengths ("cudnn-lengths"), cuDNN's native
    form: `train` batches are right-padded, and a row that is not comes out NaN.
    """
    if name not in ATTENTION:
        raise ValueError(f"unknown attention {name!r}; choose one of {', '.join(ATTENTION)}")
    if name == "auto":
        return "cudnn-lengths" if jax.default_backend() == "gpu" else "plain"
    return name


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
        raise ValueError(
            f"--remat {name} needs a Llama, Mistral or Gemma model (this is {model_type}, whose "
            "layers cannot be rematerialized); use --remat none"
        )
    return None if name == "none" else name


def output_logits(output) -> jax.Array:
    """The logits of an HF model output; a question-answering head's start and end logits (each (B, T))
    come stacked on a last axis, (B, T, 2), so every head yields one array."""
    if hasattr(output, "start_logits"):
        return jnp.stack([output.start_logits, output.end_logits], axis=-1)
    return output.logits


class Targets(NamedTuple):
    """What a method may adapt in one params tree: its family and the family's target kernels."""

    family: families_lib.Family
    kernel_paths: tuple[str, ...]


class Options(NamedTuple):
    """`build_method`'s options; each method reads the ones it needs."""

    rank: Any = 3
    mode: str = "row"
    strategy: str = "first"
    seed: int = 0
    train_bias: bool = False
    lora_rank: int = 8
    lora_alpha: float = 16.0
    calibrate: Callable[[list[str]], Mapping[str, Any]] | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class Method:
    """A method that trains the mask's leaves and runs the model's own layers."""

    name: ClassVar[str]
    mask: rocoft_jax.RoCoFTMask
    seed: int = 0

    @classmethod
    def build(cls, params, targets: Targets, options: Options) -> Method:
        raise NotImplementedError

    @classmethod
    def restore(cls, mask: rocoft_jax.RoCoFTMask, description: Mapping[str, Any]) -> Method:
        """The method of a saved `describe` record, around its rebuilt mask."""
        return cls(mask, seed=int(description["seed"]))

    def split(self, params):
        """``(trainable, frozen)``; the trainable tree is fp32."""
        return rocoft_jax.split(params, self.mask)

    def layers(self, trainable):
        """The context that routes the adapted layers through the trainable tree."""
        return contextlib.nullcontext()

    def apply(
        self,
        model,
        trainable,
        frozen,
        batch: Mapping[str, Any],
        *,
        dropout_rng=None,
        train=False,
        attention: str = "plain",
        remat: str | None = None,
        mesh=None,
    ):
        """The model's logits (`output_logits`: a span head's start and end logits stacked as (B, T, 2)).

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
        mode = (
            {"train": train}
            if "train" in inspect.signature(model.__call__).parameters
            else {"deterministic": not train}
        )
        with self.layers(trainable):
            return output_logits(model(**inputs, params=params, dropout_rng=dropout_rng, **mode))

    def merge(self, trainable, frozen):
        """Full params with everything trained folded in, for export."""
        return rocoft_jax.merge(trainable, frozen, self.mask)

    def describe(self) -> dict[str, Any]:
        """JSON-ready record of the method and its selection, for checkpoints and `restore_method`."""
        return {"method": self.name, **self.mask.describe()}


class RoCoFT(Method):
    """r rows or columns of each target kernel (or random entries), run through the sliced matmul."""

    name = "rocoft"

    @classmethod
    def build(cls, params, targets: Targets, options: Options) -> Method:
        calibration = None
        if options.strategy in ("max", "min", "mixed"):
            if options.calibrate is None:
                raise ValueError(f"strategy {options.strategy!r} needs calibration batches")
            calibration = options.calibrate(list(targets.kernel_paths))
        mask = rocoft_jax.mask_params(
            params,
            options.rank,
            options.mode,
            strategy=options.strategy,
            seed=options.seed,
            calibration=calibration,
            train_bias=options.train_bias,
        )
        return cls(mask, seed=options.seed)

    def layers(self, trainable):
        return rocoft_jax.sliced_kernels(trainable, self.mask)


class Full(Method):
    """Every leaf trained."""

    name = "full"

    @classmethod
    def build(cls, params, targets: Targets, options: Options) -> Method:
        mask = rocoft_jax.mask_leaves(params, (".*",), name=cls.name)
        return cls(dataclasses.replace(mask, family=targets.family.name), seed=options.seed)


class BitFit(Method):
    """Every bias and the task head trained."""

    name = "bitfit"

    @classmethod
    def build(cls, params, targets: Targets, options: Options) -> Method:
        mask = rocoft_jax.mask_leaves(params, targets.family.head + (r"(^|/)bias$",), name=cls.name, strict=False)
        return cls(dataclasses.replace(mask, family=targets.family.name), seed=options.seed)


@dataclasses.dataclass(frozen=True, eq=False)
class LoRA(Method):
    """Low-rank adapters on every target kernel, plus the head (and, with train_bias, the targets' biases)."""

    name = "lora"
    lora_paths: tuple[str, ...] = ()
    lora_rank: int = 0
    lora_alpha: float = 0.0

    @classmethod
    def build(cls, params, targets: Targets, options: Options) -> Method:
        biases = tuple("^" + p[: -len("kernel")] + "bias$" for p in targets.kernel_paths) if options.train_bias else ()
        mask = rocoft_jax.mask_leaves(params, targets.family.head + biases, name=cls.name, strict=False)
        leaves = tree_lib.flat_paths(params)
        adapters = sum(int(options.lora_rank) * sum(jnp.shape(leaves[p])) for p in targets.kernel_paths)
        mask = dataclasses.replace(
            mask, family=targets.family.name, rank=int(options.lora_rank), num_trainable=mask.num_trainable + adapters
        )
        return cls(mask, options.seed, tuple(targets.kernel_paths), int(options.lora_rank), float(options.lora_alpha))

    @classmethod
    def restore(cls, mask: rocoft_jax.RoCoFTMask, description: Mapping[str, Any]) -> Method:
        return cls(
            mask,
            int(description["seed"]),
            tuple(description["lora_targets"]),
            int(description["lora_rank"]),
            float(description["lora_alpha"]),
        )

    def _out_axis(self) -> int:
        return families_lib.get_family(self.mask.family).out_axis

    def split(self, params):
        trainable, frozen = super().split(params)
        trainable[lora_lib.LORA] = lora_lib.init_lora(
            params, self.lora_paths, self.lora_rank, jax.random.PRNGKey(self.seed), self._out_axis()
        )
        return trainable, frozen

    def layers(self, trainable):
        return lora_lib.lora_kernels(trainable[lora_lib.LORA], self.lora_alpha, self.lora_rank)

    def merge(self, trainable, frozen):
        params = super().merge(trainable, frozen)
        return lora_lib.merge_lora(params, trainable[lora_lib.LORA], self.lora_alpha, self.lora_rank, self._out_axis())

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "lora_rank": self.lora_rank,
            "lora_alpha": self.lora_alpha,
            "lora_targets": list(self.lora_paths),
        }


METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (RoCoFT, Full, LoRA, BitFit)}


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
    """Builds method ``name`` for ``params``; ``calibrate(kernel_paths)`` supplies Wanda norms when needed.

    ``rank`` is rows/columns per kernel, or the entry probability in mode "random". An unknown name or a
    Wanda strategy without ``calibrate`` is a ValueError.
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    leaves = tree_lib.flat_paths(params)
    family = families_lib.detect_family(leaves)
    kernel_paths = families_lib.match_paths(leaves, family.targets, "target", strict=False)
    options = Options(rank, mode, strategy, seed, train_bias, lora_rank, lora_alpha, calibrate)
    return METHODS[name].build(params, Targets(family, tuple(kernel_paths)), options)


def restore_method(params, description: Mapping[str, Any]) -> Method:
    """The method recorded by `Method.describe`, with its saved selection (no recalibration)."""
    mask = rocoft_jax.mask_from_description(params, description)
    return METHODS[description["method"]].restore(mask, description)
