"""mpt-tools: checkpoint conversion and surgery for Multitask Prompt Tuning (MPT) adapters.

The library API (every CLI command is one of these functions)::

    from mpt_tools import load_source, validate, inspect_source, init_adapter, verify
    from mpt_tools import select_tasks, rerank, convert, export_prompt, diff, task_similarity
    from mpt_tools import push_adapter, download_source

None of them imports torch or huggingface_hub until a code path needs it.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .compare import diff, plot_similarity, task_similarity
from .errors import MptToolsError
from .hub import download_source, push_adapter
from .pipeline import init_adapter, inspect_source, validate
from .rebuild import init_and_verify, verify
from .source import Checkpoint, load_source
from .surgery import convert, export_prompt, rerank, select_tasks

__all__ = [
    "Checkpoint",
    "MptToolsError",
    "__version__",
    "convert",
    "diff",
    "download_source",
    "export_prompt",
    "init_adapter",
    "init_and_verify",
    "inspect_source",
    "load_source",
    "plot_similarity",
    "push_adapter",
    "rerank",
    "select_tasks",
    "task_similarity",
    "validate",
    "verify",
]
