"""Replacing the ``__call__`` of chosen Flax modules, leaving every other call alone.

`sliced_kernels`, LoRA and the fast paths (`rocoft_jax.fast`) all run HF Flax
models unchanged and swap in their own computation for some modules. They do
it through `replace_calls`, one wrapper around ``flax.linen.intercept_methods``:
only ``__call__`` of a matching module is replaced; other methods and other
modules pass straight through. Contexts nest: the innermost runs first, and
``call_original`` hands the call to the next one out, then to the module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection
from typing import Any

import flax.linen as nn

# replacement(module, args, kwargs, call_original) -> the module's output
Replacement = Callable[[nn.Module, tuple, dict, Callable[..., Any]], Any]


@contextlib.contextmanager
def replace_calls(match: Collection[str] | Callable[[nn.Module], bool], replacement: Replacement):
    """Context in which ``replacement(module, args, kwargs, call_original)`` runs instead of
    ``module(*args, **kwargs)`` for every module that ``match`` accepts.

    ``match`` is a collection of class names (``type(module).__name__``, subclasses
    not included) or a predicate ``module -> bool``. ``call_original(*args, **kwargs)``
    runs the module's own ``__call__`` (through any interceptors outside this one),
    with the arguments the replacement chooses.
    """
    if callable(match):
        accepts = match
    else:
        names = frozenset(match)
        accepts = lambda module: type(module).__name__ in names

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__" or not accepts(context.module):
            return next_fun(*args, **kwargs)
        return replacement(context.module, args, kwargs, next_fun)

    with nn.intercept_methods(interceptor):
        yield
