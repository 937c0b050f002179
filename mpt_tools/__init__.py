"""mpt-tools: checkpoint conversion and surgery for Multitask Prompt Tuning (MPT) adapters.

The library API (every CLI command is one of these functions)::

    from mpt_tools import load_source, validate, inspect_source, init_adapter
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import MptToolsError
from .pipeline import init_adapter, inspect_source, validate
from .source import Checkpoint, load_source

__all__ = [
    "Checkpoint",
    "MptToolsError",
    "__version__",
    "init_adapter",
    "inspect_source",
    "load_source",
    "validate",
]
