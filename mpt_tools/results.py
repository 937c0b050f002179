"""What the library returns: one typed schema per command (``mpt-tools/<command>/1``), and the
helpers that keep values JSON-ready."""

from __future__ import annotations

import numpy as np


def json_float(value: float) -> float | None:
    """A float for JSON output: NaN and infinities become None (null)."""
    return float(value) if np.isfinite(value) else None
