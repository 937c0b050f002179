"""Signals as exceptions: SIGTERM and SIGHUP behave like Ctrl-C, and a commit is never cut in half.

The command line calls :func:`install` once: SIGINT, SIGTERM and SIGHUP then raise
:class:`Interrupted` (a KeyboardInterrupt) in the main thread, so every ``finally`` removes its
staging files exactly as for Ctrl-C, and the CLI exits with the shell's 128+signal. A signal the
parent set to be ignored (``nohup`` ignores SIGHUP, a background job of a script ignores SIGINT)
stays ignored.

:func:`deferred` holds a signal back while it runs (the renames that put a finished output in
place): the signal takes effect when the block ends, so a folder is never left half-replaced.
Library users who install no handlers keep Python's defaults; :func:`deferred` still blocks the
signals in the calling thread for its duration.
"""

from __future__ import annotations

import _signal  # the C module under `signal`: `signal` itself builds enums every start-up would pay for
import contextlib
import threading
from collections.abc import Iterator
from types import FrameType

HANDLED = ("SIGINT", "SIGTERM", "SIGHUP")


class Interrupted(KeyboardInterrupt):
    """The process got a signal that asks it to stop; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        """The signal's name (``SIGTERM``)."""
        import signal

        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"

    @property
    def exit_status(self) -> int:
        """The shell's convention for a process stopped by a signal: 128 + its number."""
        return 128 + self.signum


_depth = 0
_pending: int | None = None


def _handler(signum: int, frame: FrameType | None) -> None:
    global _pending
    if _depth:
        _pending = _pending or signum
        return
    raise Interrupted(signum)


def _signals() -> list[int]:
    return [getattr(_signal, name) for name in HANDLED if hasattr(_signal, name)]


def install() -> None:
    """Make SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted` (main thread only; a signal the
    parent ignores stays ignored)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in _signals():
        if _signal.getsignal(sig) == _signal.SIG_IGN:
            continue
        _signal.signal(sig, _handler)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP back until the block ends, then act on the first one."""
    global _depth, _pending
    blocked = False
    mask = set(_signals())
    if _depth == 0 and hasattr(_signal, "pthread_sigmask"):
        with contextlib.suppress(OSError, ValueError):
            _signal.pthread_sigmask(_signal.SIG_BLOCK, mask)
            blocked = True
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            pending, _pending = _pending, None
            if blocked:  # a signal that came meanwhile is delivered here, to a handler that acts
                _signal.pthread_sigmask(_signal.SIG_UNBLOCK, mask)
            if pending:
                raise Interrupted(pending)
