"""Strict JSON for every file and line the project writes: a non-finite float becomes ``null`` plus a flag.

Python's `json` writes NaN and infinities as the bare tokens ``NaN`` and ``Infinity``, which are not JSON:
strict parsers (jq, most languages, ``json.loads`` with ``parse_constant`` raising) reject the whole file.
`dumps` writes such a value as ``null`` and, inside a mapping, adds ``"<key>_nonfinite"`` (``"nan"``,
``"inf"`` or ``"-inf"``) beside it, so a reader still learns what it was; in a list it is ``null`` alone.
It then encodes with ``allow_nan=False``, so nothing non-finite can slip through.
"""

from __future__ import annotations

import json
import math
from typing import Any

SUFFIX = "_nonfinite"


def _nonfinite(value) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def kind(value: float) -> str:
    """``"nan"``, ``"inf"`` or ``"-inf"``: the flag written beside a non-finite value."""
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None, and flagged beside it in a mapping."""
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            out[key] = finite(value)
            if _nonfinite(value):
                out[f"{key}{SUFFIX}"] = kind(value)
        return out
    if isinstance(obj, (list, tuple)):
        return [finite(value) for value in obj]
    return None if _nonfinite(obj) else obj


def dumps(obj: Any, **kwargs) -> str:
    """``json.dumps`` of ``obj`` after `finite`; never writes ``NaN`` or ``Infinity``."""
    return json.dumps(finite(obj), allow_nan=False, **kwargs)
