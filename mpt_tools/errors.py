"""The one exception family of mpt-tools.

Every failure the library reports on purpose is an :class:`MptToolsError`; the CLI turns it into
one line on stderr and exit status 1. Anything else escaping the library is a bug.

A message that tells the user what to change names it as they gave it: a command-line flag
(``--force``) while the CLI runs a command (:func:`cli_wording`), the Python argument
(``force=True``) otherwise. :func:`flag` picks the spelling.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .results import VerifyResult

_CLI_WORDING = False
"""True while the command line runs a command (:func:`cli_wording`): messages name its flags.

A plain module global, not a contextvar: ``audit`` (and pack's fit) build messages in worker threads,
which do not inherit a contextvar's value. One process runs one command at a time."""


def flag(cli: str, python: str) -> str:
    """The way a message names an option: ``cli`` (e.g. ``"--force"``) while the command line runs
    a command, ``python`` (e.g. ``"force=True"``) for a caller of the library."""
    return cli if _CLI_WORDING else python


@contextlib.contextmanager
def cli_wording(on: bool = True) -> Iterator[None]:
    """Word messages for the command line (``on``; False: for the library) inside the block, and
    restore the previous wording after it, however it ends."""
    global _CLI_WORDING
    before = _CLI_WORDING
    _CLI_WORDING = on
    try:
        yield
    finally:
        _CLI_WORDING = before


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
