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

Once a signal has been raised, later ones are ignored: the first one's cleanup (every ``finally``
that removes a staging folder, the CLI's message) runs to its end, and the message and exit status
name the first. (Two signals held back together by :func:`deferred` are taken in signal-number
order: the kernel does not say which came first.)

The command line installs the handlers before it imports anything heavy, in a mode that only notes
a signal (``install(act=False)``); its command runs in :func:`acting`, which raises a signal noted
before it began at once. So a signal while Python starts the command line, or while Click parses
the arguments or exits, is never a traceback nor Click's ``Aborted!``.
"""

from __future__ import annotations

import _signal  # the C module under `signal`: `signal` itself builds enums every start-up would pay for
import contextlib
import sys
import threading
from collections.abc import Callable, Iterator
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


_depth = 0  # how deep in deferred() the main thread is
_pending: int | None = None  # a signal noted and not acted on yet
_stopping: int | None = None  # the signal raised (the process is stopping for it): later ones are ignored
_acting = True  # outside deferred(), a signal raises at once; False: it is only noted (see acting())


def _handler(signum: int, frame: FrameType | None) -> None:
    global _pending
    if _stopping is not None:
        return  # the first signal's cleanup is running: nothing interrupts it
    if _pending is None:
        _pending = signum
    if _acting and not _depth:
        _raise_pending()


def _raise_pending() -> None:
    """Raise the signal noted (if any, and if none was raised before) as :class:`Interrupted`."""
    global _pending, _stopping
    if _pending is None or _stopping is not None:
        return
    signum, _pending = _pending, None
    _stopping = signum
    raise Interrupted(signum)


def take_pending() -> int | None:
    """The signal noted and not acted on yet (outside :func:`acting` under ``install(act=False)``),
    now taken as acted on: later signals are ignored. The command line drops one that came after
    its command failed and said so."""
    global _pending, _stopping
    signum = _pending
    if signum is not None and _stopping is None:
        _pending, _stopping = None, signum
        return signum
    return None


def rearm() -> None:
    """Forget a signal already raised (a new command begins in this process: a test, a script), so
    that the next one raises again. A signal noted and not acted on yet stays noted."""
    global _stopping
    _stopping = None


def stopping() -> int | None:
    """The signal this process was interrupted by (raised as :class:`Interrupted`), if any."""
    return _stopping


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


def install(*, act: bool = True) -> None:
    """Make SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted` (main thread only; a signal the
    parent ignores stays ignored), and hold them back while a native package imports.

    With ``act=False`` a signal is only noted until an :func:`acting` block
    begins: the command line's mode, so that nothing raises while it imports or Click parses.
    Installing again forgets a signal already raised (the handlers act on the next one)."""
    global _acting, _stopping
    if threading.current_thread() is not threading.main_thread():
        return
    _acting, _stopping = act, None
    for sig in _signals():
        if _signal.getsignal(sig) == _signal.SIG_IGN:
            continue
        _signal.signal(sig, _handler)
    if not any(isinstance(finder, _NativeImportFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _NativeImportFinder())
    if not isinstance(sys.unraisablehook, _QuietUnraisable):
        sys.unraisablehook = _QuietUnraisable(sys.unraisablehook)


class _QuietUnraisable:
    """``sys.unraisablehook`` for an :class:`Interrupted` raised where Python cannot pass it on (a
    ``__del__``, a weakref callback): instead of a traceback, the signal is noted again as not
    acted on, so the next deferral or :func:`acting` block raises it, and a later signal is not
    ignored. Anything else goes to the hook it wraps."""

    def __init__(self, hook: Callable[[Any], object]) -> None:
        self.hook = hook

    def __call__(self, unraisable: Any) -> None:
        global _pending, _stopping
        exc = unraisable.exc_value
        if not isinstance(exc, Interrupted):
            self.hook(unraisable)
        elif _stopping == exc.signum:
            _pending, _stopping = exc.signum, None


@contextlib.contextmanager
def acting() -> Iterator[None]:
    """Signals raise :class:`Interrupted` while the block runs (outside :func:`deferred`); one noted
    before it began is raised as it begins, and one noted but not raised by its end (see
    :class:`_QuietUnraisable`) as it ends. Afterwards they are noted again if they were before."""
    global _acting
    before = _acting
    try:
        _acting = True
        if not _depth:
            _raise_pending()
        yield
        if not _depth:
            _raise_pending()
    finally:
        _acting = before


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP back until the block ends, then act on the first one.

    The depth is counted before the signals are blocked, so a signal whose handler runs while the
    block begins is held back too (it never raises from the ``with`` line itself)."""
    global _depth
    _depth += 1
    blocked = False
    try:
        if _depth == 1 and hasattr(_signal, "pthread_sigmask"):
            with contextlib.suppress(OSError, ValueError):
                _signal.pthread_sigmask(_signal.SIG_BLOCK, set(_signals()))
                blocked = True
        yield
    finally:
        _depth -= 1
        if blocked:  # a signal that came meanwhile is delivered here, to a handler that acts
            _signal.pthread_sigmask(_signal.SIG_UNBLOCK, set(_signals()))
        if not _depth and _acting:
            _raise_pending()


def cleanup(action: Callable[[], object]) -> None:
    """Run ``action`` (a cleanup that may run twice: removing a staging folder) to its end whatever
    signals come: under :func:`deferred`, and once more if the first signal was raised before the
    deferral took hold (later signals are ignored by then), before that signal goes on."""
    try:
        with deferred():
            action()
    except KeyboardInterrupt:
        action()
        raise
