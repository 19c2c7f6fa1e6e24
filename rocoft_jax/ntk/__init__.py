"""The empirical neural tangent kernel of parameter subsets (the paper's Section 5).

`empirical` builds kernels, predictions and linearized outputs of a `Subset`
(`subsets`: full, bitfit, row<r>, column<r>, lora<r>); `forwards` gives the f(x)
the kernel is taken of; `metrics` compares kernels and plots them; `klr` fits
kernel logistic regression on them. Nothing here is imported by the core.
"""

from rocoft_jax.ntk.empirical import *  # noqa: F401,F403  (kernel, predict, outputs, ...)
from rocoft_jax.ntk.empirical import __all__ as _empirical_all
from rocoft_jax.ntk.subsets import SUBSET_NAMES, Subset, make_subset, parse_subset, restrict

__all__ = [*_empirical_all, "SUBSET_NAMES", "Subset", "make_subset", "parse_subset", "restrict"]
