"""RoCoFT for JAX: fine-tune r rows or r columns of each attention and MLP kernel.

    mask = rocoft_jax.mask_params(model.params, rank=3, mode="row")
    trainable, frozen = rocoft_jax.split(model.params, mask)
    with rocoft_jax.sliced_kernels(trainable, mask):
        logits = model(**batch, params=rocoft_jax.with_trained_leaves(frozen, trainable)).logits

Paper row i is a Flax ``kernel[:, i]`` (an output unit); paper column j is
``kernel[j, :]`` (an input feature).
"""

from rocoft_jax.attention import fused_attention
from rocoft_jax.dense import intercept_kernels, sliced_kernels, sliced_matmul
from rocoft_jax.first_token import first_token_only, reads_first_token_only
from rocoft_jax.mlp import fast_gelu
from rocoft_jax.mask import FROZEN, ROCOFT, TRAIN, KernelSlice, RoCoFTMask, mask_from_description, mask_leaves, mask_params
from rocoft_jax.remat import remat_layers
from rocoft_jax.optim import MaskedSlicesState, masked
from rocoft_jax.selection import activation_norms
from rocoft_jax.slices import merge, split, with_trained_leaves
from rocoft_jax.targets import FAMILIES, detect_family
from rocoft_jax import klr, ntk, ntk_metrics  # Section 5's NTK analysis

__all__ = [
    "FAMILIES",
    "FROZEN",
    "KernelSlice",
    "MaskedSlicesState",
    "ROCOFT",
    "RoCoFTMask",
    "TRAIN",
    "activation_norms",
    "detect_family",
    "fast_gelu",
    "first_token_only",
    "fused_attention",
    "intercept_kernels",
    "klr",
    "mask_from_description",
    "mask_leaves",
    "mask_params",
    "masked",
    "merge",
    "ntk",
    "ntk_metrics",
    "reads_first_token_only",
    "remat_layers",
    "sliced_kernels",
    "sliced_matmul",
    "split",
    "with_trained_leaves",
]
