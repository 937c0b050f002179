"""Opening files for reading when the filesystem may be hostile.

Every file mpt-tools reads (a tensor file, an adapter_config.json, a base model's config.json) is
opened here: ``O_NONBLOCK`` so that a FIFO never blocks the open, then ``fstat`` on the open
descriptor, so the check and the read are about the same file (no check-then-open race). A FIFO,
device, socket or directory is refused with one line that names what it is; only then is
``O_NONBLOCK`` cleared and the descriptor used.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from typing import BinaryIO

from .errors import FormatError, MptToolsError

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def file_kind(mode: int) -> str:
    """What a ``st_mode`` is, in words: "a regular file", "a FIFO (named pipe)", "a directory", ..."""
    if stat.S_ISREG(mode):
        return "a regular file"
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def not_regular_message(path: str | os.PathLike[str], mode: int) -> str:
    """The one-line reason for refusing ``path`` whose (followed) ``st_mode`` is ``mode``."""
    kind = file_kind(mode)
    if os.path.islink(path):
        target = os.path.realpath(path)
        return f"is a symlink to {target}, which is {kind}, not a regular file"
    return f"is {kind}, not a regular file"


def open_regular_fd(path: str | os.PathLike[str], error: type[MptToolsError] = FormatError) -> int:
    """Open ``path`` read-only and return its descriptor, refusing anything but a regular file.

    A ``stat`` first keeps devices and sockets from being opened at all; the ``O_NONBLOCK`` open
    never waits for a FIFO's writer; ``fstat`` of the descriptor then confirms that what was opened
    is a regular file (a path swapped in between is caught). ``O_NONBLOCK`` is cleared before the
    descriptor is returned. Raises ``error`` (with ``path``) for a file that is not regular, and
    ``OSError`` when the path cannot be opened (the caller words those).
    """
    where = os.fspath(path)
    st = os.stat(where)
    if not stat.S_ISREG(st.st_mode):
        raise error(not_regular_message(where, st.st_mode), str(where))
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(where, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(not_regular_message(where, st.st_mode), str(where))
        if getattr(os, "O_NONBLOCK", 0):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def open_regular(path: str | os.PathLike[str], error: type[MptToolsError] = FormatError) -> Iterator[BinaryIO]:
    """:func:`open_regular_fd` as an unbuffered binary file object, closed on exit."""
    fd = open_regular_fd(path, error)
    with os.fdopen(fd, "rb", buffering=0) as fh:
        yield fh  # type: ignore[misc]


def check_regular(path: str | os.PathLike[str], error: type[MptToolsError] = FormatError) -> None:
    """Refuse ``path`` unless it is (or links to) a regular file, without opening it.

    For paths found in a folder before they are read; the read itself still goes through
    :func:`open_regular_fd`. A missing path is left for the caller to report.
    """
    try:
        st = os.stat(path)
    except OSError:
        return
    if not stat.S_ISREG(st.st_mode):
        raise error(not_regular_message(path, st.st_mode), os.fspath(path))


def read_small(path: str | os.PathLike[str], limit: int, error: type[MptToolsError] = FormatError) -> bytes | None:
    """The bytes of a regular file of at most ``limit`` bytes; None when it is larger.

    The size is checked on the open descriptor and the read is bounded, so a file that grows in
    between is still never read past ``limit``. Raises as :func:`open_regular_fd`.
    """
    with open_regular(path, error) as fh:
        if os.fstat(fh.fileno()).st_size > limit:
            return None
        chunks: list[bytes] = []
        got = 0
        while got <= limit:
            block = fh.read(limit + 1 - got)
            if not block:
                break
            chunks.append(block)
            got += len(block)
    return None if got > limit else b"".join(chunks)
