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

:func:`install` also holds the signals back while a native package imports (torch, numpy,
safetensors, tokenizers: see :data:`NATIVE_PACKAGES`). Their imports run Python code from C++:
an exception raised there by a handler is swallowed by the import (the signal is lost and the
command runs on) or reaches a ``noexcept`` frame of pybind11, which aborts the process (SIGABRT,
exit -6) with no ``finally`` run. The signal takes effect when that import ends.
"""

from __future__ import annotations

import _signal  # the C module under `signal`: `signal` itself builds enums every start-up would pay for
import contextlib
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

HANDLED = ("SIGINT", "SIGTERM", "SIGHUP")

#: Packages whose import :func:`install` runs with the signals held back (top-level names; their
#: submodules imported later are held back too).
NATIVE_PACKAGES = frozenset({"torch", "numpy", "safetensors", "tokenizers"})


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


def _held() -> contextlib.AbstractContextManager[None]:
    """:func:`deferred` on the main thread, where the handlers run; nothing on another (an import
    there is never interrupted, and its deferral would hold the main thread's signal for it)."""
    return deferred() if threading.current_thread() is threading.main_thread() else contextlib.nullcontext()


class _DeferredLoader:
    """Runs another loader's ``create_module``/``exec_module`` with the signals held back (on the
    main thread); once the module is executed, its spec and ``__loader__`` name the original
    loader again."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: Any) -> Any:
        """The original loader's module (or None for the default one), signals held back."""
        with _held():
            return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        """Execute the module with the original loader, signals held back."""
        spec = module.__spec__
        try:
            with _held():
                self.loader.exec_module(module)
        finally:
            if spec is not None and spec.loader is self:
                spec.loader = self.loader
            namespace = getattr(module, "__dict__", {})  # some modules refuse getattr and setattr
            if namespace.get("__loader__") is self:
                namespace["__loader__"] = self.loader

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


class _NativeImportFinder:
    """A meta-path finder that finds nothing itself: for a module of :data:`NATIVE_PACKAGES` it
    asks the finders after it and wraps the loader of their spec in :class:`_DeferredLoader`."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        """The spec the next finders give, with its loader wrapped; None for other modules."""
        if fullname.partition(".")[0] not in NATIVE_PACKAGES:
            return None
        for finder in sys.meta_path:
            if isinstance(finder, _NativeImportFinder) or not hasattr(finder, "find_spec"):
                continue
            spec: Any = finder.find_spec(fullname, path, target)
            if spec is None:
                continue
            if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _DeferredLoader(spec.loader)
            return spec
        return None


def install() -> None:
    """Make SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted` (main thread only; a signal the
    parent ignores stays ignored), and hold them back while a native package imports."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in _signals():
        if _signal.getsignal(sig) == _signal.SIG_IGN:
            continue
        _signal.signal(sig, _handler)
    if not any(isinstance(finder, _NativeImportFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _NativeImportFinder())


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
