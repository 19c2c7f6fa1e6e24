"""RoCoFT for JAX: fine-tune r rows or r columns of each attention and MLP kernel.

    mask = rocoft_jax.mask_params(model.params, rank=3, mode="row")
    trainable, frozen = rocoft_jax.split(model.params, mask)
    with rocoft_jax.sliced_kernels(trainable, mask):
        logits = model(**batch, params=rocoft_jax.with_trained_leaves(frozen, trainable)).logits

Paper row i is a Flax ``kernel[:, i]`` (an output unit); paper column j is
``kernel[j, :]`` (an input feature).

This package is the core: it runs and is exact on any backend and imports no
GPU kernels. The GPU fast paths live in `rocoft_jax.fast` and the empirical-NTK
analysis in `rocoft_jax.ntk`; import them where you need them.
"""

from rocoft_jax.adapters import Adapter, apply_adapter, check_base, load_adapter, merge_adapter, save_adapter
from rocoft_jax.families import FAMILIES, Family, detect_family, get_family
from rocoft_jax.mask import (
    FROZEN,
    ROCOFT,
    TRAIN,
    KernelSlice,
    RoCoFTMask,
    mask_from_description,
    mask_leaves,
    mask_params,
)
from rocoft_jax.optim import MaskedSlicesState, masked
from rocoft_jax.selection import activation_norms
from rocoft_jax.sliced import intercept_kernels, sliced_kernels, sliced_matmul
from rocoft_jax.slices import merge, split, with_trained_leaves

__all__ = [
    "Adapter",
    "FAMILIES",
    "FROZEN",
    "Family",
    "KernelSlice",
    "MaskedSlicesState",
    "ROCOFT",
    "RoCoFTMask",
    "TRAIN",
    "activation_norms",
    "apply_adapter",
    "check_base",
    "detect_family",
    "get_family",
    "intercept_kernels",
    "load_adapter",
    "mask_from_description",
    "mask_leaves",
    "mask_params",
    "masked",
    "merge",
    "merge_adapter",
    "save_adapter",
    "sliced_kernels",
    "sliced_matmul",
    "split",
    "with_trained_leaves",
]
