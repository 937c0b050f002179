"""Findings: one problem (or remark) about a source or a plan, with its level, a stable code, the
field, what was expected and found, and the fix; and the one way to refuse on error findings."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from .errors import ValidationError, flag

if TYPE_CHECKING:  # the result types cost import time that --help does not need
    from .results import FindingItem


class Finding:
    """One problem (or remark): its level, a stable code, the field, expected/found and the fix.

    Build one with :meth:`error`, :meth:`warning` or :meth:`info`, whose ``expected``, ``found``
    and ``fix`` are keywords, so a rule reads as what it checks::

        Finding.error("task-range", "task", "the source has 3 tasks", expected="0..2", found=5, fix="pass 0..2")
    """

    # A frozen class by hand: a frozen dataclass costs every command ~2 ms of start-up to define.
    _FIELDS = ("level", "code", "field", "message", "expected", "found", "fix")
    __slots__ = _FIELDS

    level: str  # "error", "warning" or "info"
    code: str
    field: str
    message: str
    expected: Any
    found: Any
    fix: str

    def __init__(
        self, level: str, code: str, field: str, message: str, *, expected: Any = None, found: Any = None, fix: str = ""
    ) -> None:
        for name, value in zip(self._FIELDS, (level, code, field, message, expected, found, fix), strict=True):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"Finding is frozen: cannot assign to {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"Finding is frozen: cannot delete {name!r}")

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in self._FIELDS)

    __hash__ = None  # type: ignore[assignment]  # expected/found may be lists, as with the dataclass

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}={getattr(self, n)!r}" for n in self._FIELDS)
        return f"Finding({inner})"

    @classmethod
    def error(
        cls, code: str, field: str, message: str, *, expected: Any = None, found: Any = None, fix: str = ""
    ) -> Finding:
        """A problem that makes the source (or plan) invalid."""
        return cls("error", code, field, message, expected=expected, found=found, fix=fix)

    @classmethod
    def warning(
        cls, code: str, field: str, message: str, *, expected: Any = None, found: Any = None, fix: str = ""
    ) -> Finding:
        """A problem that does not stop an operation but deserves attention."""
        return cls("warning", code, field, message, expected=expected, found=found, fix=fix)

    @classmethod
    def info(
        cls, code: str, field: str, message: str, *, expected: Any = None, found: Any = None, fix: str = ""
    ) -> Finding:
        """A remark: something mpt-tools assumed, normalised or confirmed."""
        return cls("info", code, field, message, expected=expected, found=found, fix=fix)

    def replace(self, **changes: Any) -> Finding:
        """A copy with ``changes`` (keywords by field name)."""
        values = {n: getattr(self, n) for n in self._FIELDS} | changes
        return Finding(values.pop("level"), values.pop("code"), values.pop("field"), values.pop("message"), **values)

    def to_dict(self) -> FindingItem:
        """The finding as a JSON-ready dict."""
        return cast("FindingItem", {n: getattr(self, n) for n in self._FIELDS})

    def brief(self) -> str:
        """``field: message (expected X, found Y)``: the finding without its level and fix (either
        part left out where it is None)."""
        text = f"{self.field}: {self.message}"
        pairs = (("expected", self.expected), ("found", self.found))
        shown = [f"{name} {value}" for name, value in pairs if value is not None]
        return f"{text} ({', '.join(shown)})" if shown else text

    def line(self) -> str:
        """One human-readable line."""
        return f"{self.level}: {self.text()}"

    def text(self) -> str:
        """:meth:`line` without the level (for a list the caller prefixes itself)."""
        return f"{self.brief()}; fix: {self.fix}" if self.fix else self.brief()


def errors(findings: list[Finding]) -> list[Finding]:
    """Only the findings at level error."""
    return [f for f in findings if f.level == "error"]


REFUSAL_SHOWS = 2
"""A refusal's line names this many problems after the first in brief; it counts the rest."""


def refusal(location: str, problems: list[Finding]) -> ValidationError:
    """One error for a list of error findings: the first in full, then up to
    :data:`REFUSAL_SHOWS` more in brief, then how many more there are (``validate`` lists those of
    a source; the others are a command's own options)."""
    first = problems[0]
    msg = first.brief()
    if first.fix:
        msg += f"; fix: {first.fix}"
    rest = problems[1:]
    if rest:
        shown = "; ".join(f.brief() for f in rest[:REFUSAL_SHOWS])
        more = len(rest) - REFUSAL_SHOWS
        validate = flag("`mpt-tools validate`", "validate()")
        tail = f"; and {more} more ({validate} lists the source's)" if more > 0 else ""
        msg += f" [also {shown}{tail}]"
    return ValidationError(msg, location, problems)
