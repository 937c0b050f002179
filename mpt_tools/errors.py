"""The one exception family of mpt-tools.

Every failure the library reports on purpose is an :class:`MptToolsError`; the CLI turns it into
one line on stderr and exit status 1. Anything else escaping the library is a bug.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .results import VerifyResult


def debug() -> bool:
    """MPT_TOOLS_DEBUG is set (and not 0): show tracebacks and third-party messages."""
    return os.environ.get("MPT_TOOLS_DEBUG", "") not in ("", "0")


class MptToolsError(Exception):
    """Base class: a problem with the user's input or a refused operation.

    ``path`` names the file or location the problem is about, when there is one; it leads the
    message printed by the CLI.
    """

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = path

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class SourceError(MptToolsError):
    """A source cannot be found or resolved (missing path, no weights file, ambiguous layout)."""


class FormatError(MptToolsError):
    """A tensor file is corrupt, truncated, hostile or not a weights file."""


class ConfigError(MptToolsError):
    """An adapter_config.json is unreadable or inconsistent, or a config flag is invalid."""


class ValidationError(MptToolsError):
    """The tensors fail the checks an operation needs; ``findings`` holds every problem
    (:class:`~mpt_tools.findings.Finding`; ``f.to_dict()`` is what ``validate`` reports)."""

    def __init__(self, message: str, path: str | None = None, findings: list[Any] | None = None) -> None:
        super().__init__(message, path)
        self.findings: list[Any] = findings or []  # Finding (findings sits above errors: no import)


class WriteError(MptToolsError):
    """An output cannot be written (exists without force, would overwrite the source, I/O)."""


class HubError(MptToolsError):
    """A Hugging Face Hub operation failed (not found, gated, offline, server error)."""


class VerifyError(MptToolsError):
    """A rebuilt prompt failed verification."""


class DeviceError(MptToolsError):
    """The requested device cannot be used (e.g. ``cuda`` without a CUDA device)."""


class VerificationFailed(VerifyError):
    """Verification ran and found failures; ``report`` is the full report (``ok`` is False)."""

    def __init__(self, message: str, path: str | None, report: VerifyResult) -> None:
        super().__init__(message, path)
        self.report = report
