"""benchmarks/RESULTS.md: each benchmark owns one section between ``<!-- NAME:start -->`` and
``<!-- NAME:end -->`` and replaces only that section."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def write_section(name: str, text: str) -> None:
    """Replace (or append) the section ``name`` of RESULTS.md with ``text``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    section = f"{start}\n{text.rstrip()}\n{end}\n"
    if RESULTS.exists():
        current = RESULTS.read_text()
    else:
        current = "# Benchmark results\n\nEach benchmark writes its own section between its markers.\n\n"
    if start in current and end in current:
        head, rest = current.split(start, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        current = head + section + ("\n" + tail if tail else "")
    else:
        current = current.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(current)


def read_section(name: str) -> str | None:
    """The text of the section ``name`` of RESULTS.md (without its markers), or None."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    current = RESULTS.read_text() if RESULTS.exists() else ""
    if start not in current or end not in current:
        return None
    return current.split(start, 1)[1].split(end, 1)[0].strip("\n")
