"""mpt-tools: checkpoint conversion and surgery for Multitask Prompt Tuning (MPT) adapters.

The library API (every CLI command is one of these functions)::

    from mpt_tools import load_source, validate, inspect_source, init_adapter, verify
    from mpt_tools import select_tasks, rerank, convert, export_prompt, compat_adapter, diff, task_similarity
    from mpt_tools import export_prompts, ExportOptions                # bake prompts for serving engines
    from mpt_tools import audit_adapters                                         # many adapters at once
    from mpt_tools import embed_request, embed_payload            # a serving engine's input (file, bytes)
    from mpt_tools import pack_prompts, PackOptions           # single-task prompts into one MPT adapter
    from mpt_tools import push_adapter, download_source
    from mpt_tools import SourceSpec, HubOptions, ConfigOverrides, TargetPlan   # typed options
    from mpt_tools import MptToolsError, ValidationError, WriteError, ...  # the one exception family

Names are imported on first use, so ``import mpt_tools`` stays cheap, and none of the functions
imports torch or huggingface_hub until a code path needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__

_WHERE = {
    "Checkpoint": "checkpoint",
    "ConfigError": "errors",
    "DeviceError": "errors",
    "FormatError": "errors",
    "HubError": "errors",
    "SourceError": "errors",
    "ValidationError": "errors",
    "VerificationFailed": "errors",
    "VerifyError": "errors",
    "WriteError": "errors",
    "ConfigOverrides": "options",
    "ExportOptions": "export",
    "HubOptions": "options",
    "MptToolsError": "errors",
    "PackOptions": "pack",
    "SourceSpec": "options",
    "TargetPlan": "modes",
    "audit_adapters": "audit",
    "compat_adapter": "compat",
    "convert": "conversion",
    "diff": "compare",
    "embed_payload": "embed",
    "embed_request": "embed",
    "download_source": "hub.download",
    "export_prompts": "export",
    "export_prompt": "surgery",
    "init_adapter": "init",
    "init_and_verify": "init",
    "inspect_source": "inspection",
    "load_source": "checkpoint",
    "pack_prompts": "pack",
    "plot_similarity": "compare",
    "push_adapter": "hub.push",
    "rerank": "surgery",
    "select_tasks": "surgery",
    "task_similarity": "compare",
    "validate": "validation",
    "verify": "verification",
}

__all__ = [
    "Checkpoint",
    "ConfigError",
    "ConfigOverrides",
    "DeviceError",
    "ExportOptions",
    "FormatError",
    "HubError",
    "HubOptions",
    "MptToolsError",
    "PackOptions",
    "SourceError",
    "SourceSpec",
    "TargetPlan",
    "ValidationError",
    "VerificationFailed",
    "VerifyError",
    "WriteError",
    "__version__",
    "audit_adapters",
    "compat_adapter",
    "convert",
    "diff",
    "download_source",
    "embed_payload",
    "embed_request",
    "export_prompt",
    "export_prompts",
    "init_adapter",
    "init_and_verify",
    "inspect_source",
    "load_source",
    "pack_prompts",
    "plot_similarity",
    "push_adapter",
    "rerank",
    "select_tasks",
    "task_similarity",
    "validate",
    "verify",
]

if TYPE_CHECKING:
    from .audit import audit_adapters
    from .checkpoint import Checkpoint, load_source
    from .compare import diff, plot_similarity, task_similarity
    from .compat import compat_adapter
    from .conversion import convert
    from .embed import embed_payload, embed_request
    from .errors import (
        ConfigError,
        DeviceError,
        FormatError,
        HubError,
        MptToolsError,
        SourceError,
        ValidationError,
        VerificationFailed,
        VerifyError,
        WriteError,
    )
    from .export import ExportOptions, export_prompts
    from .hub.download import download_source
    from .hub.push import push_adapter
    from .init import init_adapter, init_and_verify
    from .inspection import inspect_source
    from .modes import TargetPlan
    from .options import ConfigOverrides, HubOptions, SourceSpec
    from .pack import PackOptions, pack_prompts
    from .surgery import export_prompt, rerank, select_tasks
    from .validation import validate
    from .verification import verify


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use (PEP 562)."""
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mpt_tools' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
