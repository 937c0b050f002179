"""Progress bars for long work: on stderr, only when the command line turned them on.

The library calls :func:`progress` (or :func:`tracked`, for a loop over chunks) around any loop
that can take longer than about a second; it is a no-op unless :func:`enable` was called (the CLI
does so when stderr is a terminal and neither ``--json`` nor ``--quiet`` was given), so library
callers and piped output never see a bar. The bar itself is ``tqdm`` (which huggingface_hub
installs): items done and total, rate, time left; imported only when a bar is shown.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")

_ENABLED = False
MININTERVAL = 0.2
"""The least time between two redraws of a bar, in seconds (tqdm's ``mininterval``)."""


def enable(on: bool = True) -> None:
    """Turn bars on (or off) for this process."""
    global _ENABLED
    _ENABLED = on


def enabled() -> bool:
    """Whether :func:`progress` shows a bar."""
    return _ENABLED


def _shown(total: int) -> bool:
    """Whether a loop of ``total`` items gets a bar: bars on, two items or more, the main thread."""
    return _ENABLED and total >= 2 and threading.current_thread() is threading.main_thread()


def _size(stream: Any) -> tuple[int, int]:
    """The columns and lines of the terminal ``stream`` writes to (0 when it reports none)."""
    import os

    try:
        return tuple(os.get_terminal_size(stream.fileno()))  # type: ignore[return-value]
    except (AttributeError, ValueError, OSError):
        return 0, 0


def _noop(n: int = 1) -> None:
    """Advance nothing (bars are off)."""


@contextmanager
def progress(total: int, label: str, *, unit: str = "task", scale: bool = False) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n=1)`` for ``total`` items of work named ``label``; a bar on stderr while
    the block runs when bars are on, and nothing at all otherwise. The bar is removed at the end,
    so what the command prints afterwards is the same with and without it. ``scale``: show large
    counts as ``1.05M`` (values, bytes). Only the main thread draws: the loops of worker threads
    (``audit --jobs``) stay silent under the bar of the work they share."""
    if not _shown(total):
        yield _noop
        return
    import sys

    from tqdm import tqdm

    # the terminal's width, followed as it changes; a terminal that reports no size (a fresh
    # pseudo-terminal: 0 x 0, where tqdm would draw nothing) is taken as 80 x 24
    columns, lines = _size(sys.stderr)
    size: dict[str, Any] = {"dynamic_ncols": True} if columns > 0 and lines > 0 else {"ncols": 80, "nrows": 24}
    bar = tqdm(
        total=total,
        desc=label,
        unit=unit,
        unit_scale=scale,
        file=sys.stderr,
        leave=False,
        mininterval=MININTERVAL,
        **size,
    )

    def advance(n: int = 1) -> None:
        bar.update(n)

    try:
        yield advance
    finally:
        bar.close()


def tracked(
    items: Iterable[T],
    total: int,
    label: str,
    *,
    unit: str = "task",
    size: Callable[[T], int] | None = None,
    scale: bool = False,
) -> Iterable[T]:
    """``items`` as they are when bars are off; else the same items, advancing a :func:`progress`
    bar of ``total`` by ``size(item)`` (default 1) once the loop body has finished with each. For a
    loop over chunks: one call per chunk, so the loop costs nothing more. The bar goes when the
    loop ends (or is left by ``break``, ``return`` or an exception)."""
    if not _shown(total):
        return items
    return _tracked(items, total, label, unit, size, scale)


def chunk_starts(total: int, step: int, label: str, *, unit: str = "task", scale: bool = False) -> Iterable[int]:
    """``range(0, total, step)``, the starts of chunks of ``step`` items, under a :func:`tracked` bar
    of ``total`` that advances by each chunk's size."""
    starts = range(0, total, step)
    return tracked(starts, total, label, unit=unit, scale=scale, size=lambda start: min(total, start + step) - start)


def _tracked(
    items: Iterable[T], total: int, label: str, unit: str, size: Callable[[T], int] | None, scale: bool
) -> Iterator[T]:
    with progress(total, label, unit=unit, scale=scale) as advance:
        for item in items:
            yield item
            advance(1 if size is None else size(item))
