"""Tensor files: a bounds-checked safetensors reader with slice access, weights-only pickle
loading, key normalisation, a deterministic safetensors writer and atomic writes.

Arrays are numpy; bfloat16 data is carried as raw ``uint16`` words with the dtype tag "BF16"
(numpy has no bfloat16), and converted exactly to float32 or to torch where needed.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import struct
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .dtypes import DTYPE_CHOICES as DTYPE_CHOICES  # re-exported: the dtype names live in .dtypes
from .dtypes import DTYPE_NAMES as DTYPE_NAMES
from .dtypes import canonical_dtype as canonical_dtype
from .errors import FormatError
from .options import max_tensor_bytes
from .paths import open_regular, open_regular_fd

CANONICAL = ("prompt_embeddings", "prefix_task_cols", "prefix_task_rows")
MAX_HEADER = 100_000_000  # the limit of safetensors' own parser
MAX_DIMS = 64  # the most dimensions numpy and torch give an array (a hostile header may claim more)


def too_many_dims(shape: tuple[int, ...] | list[int]) -> str | None:
    """Why a claimed ``shape`` cannot be an array (over :data:`MAX_DIMS` dimensions), or None."""
    return f"{len(shape)} dimensions, more than the {MAX_DIMS} an array can have" if len(shape) > MAX_DIMS else None


# safetensors dtype tag -> (itemsize, numpy storage dtype)
DTYPES: dict[str, tuple[int, str]] = {
    "F64": (8, "<f8"),
    "F32": (4, "<f4"),
    "F16": (2, "<f2"),
    "BF16": (2, "<u2"),
    "I64": (8, "<i8"),
    "I32": (4, "<i4"),
    "I16": (2, "<i2"),
    "I8": (1, "i1"),
    "U64": (8, "<u8"),
    "U32": (4, "<u4"),
    "U16": (2, "<u2"),
    "U8": (1, "u1"),
    "BOOL": (1, "?"),
    "F8_E4M3": (1, "u1"),
    "F8_E5M2": (1, "u1"),
    "C64": (8, "<c8"),
    "C128": (16, "<c16"),
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_NP_TO_TAG = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint64": "U64",
    "uint32": "U32",
    "uint16": "U16",
    "uint8": "U8",
    "bool": "BOOL",
    "complex64": "C64",
    "complex128": "C128",
}


class Raw(NamedTuple):
    """A tensor as read: its safetensors dtype tag, shape and numpy storage array."""

    dtype: str
    shape: tuple[int, ...]
    array: np.ndarray

    @property
    def nbytes(self) -> int:
        """Bytes of the stored data."""
        return int(self.array.nbytes)


def to_float32(raw: Raw) -> np.ndarray:
    """The tensor as float32, exactly (bf16/fp16 upcasts are lossless; f64 is rounded)."""
    if raw.dtype == "BF16":
        return (raw.array.astype(np.uint32) << 16).view(np.float32).reshape(raw.shape)
    return raw.array.astype(np.float32, copy=False).reshape(raw.shape)


def to_float64(raw: Raw) -> np.ndarray:
    """The tensor as float64, exactly."""
    return to_float32(raw).astype(np.float64) if raw.dtype != "F64" else raw.array


def same_bytes(x: np.ndarray, y: np.ndarray) -> bool:
    """Whether two arrays hold the same bytes (compared in place, without serialised copies)."""
    if x.nbytes != y.nbytes:
        return False
    bx = np.ascontiguousarray(x).reshape(-1).view(np.uint8)
    by = np.ascontiguousarray(y).reshape(-1).view(np.uint8)
    return bool(np.array_equal(bx, by))


def to_torch(raw: Raw) -> Any:
    """The tensor as a torch tensor of its own dtype (imports torch)."""
    import torch

    arr = raw.array if raw.array.flags.writeable else raw.array.copy()
    arr = np.ascontiguousarray(arr)
    if raw.dtype == "BF16":
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16).reshape(raw.shape)
    return torch.from_numpy(arr).reshape(raw.shape)


def torch_dtype(tag: str) -> Any:
    """The torch dtype of a float safetensors dtype tag (F64, F32, F16, BF16; imports torch)."""
    import torch

    return {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[tag]


def from_torch(tensor: Any, *, copy: bool = True) -> Raw:
    """Convert a CPU torch tensor into a :class:`Raw` (imports torch). With ``copy=False`` the
    array shares the (contiguous) tensor's memory, which numpy keeps alive."""
    import torch

    t = tensor.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        tag, arr = "BF16", t.view(torch.int16).numpy().view(np.uint16)
    elif t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        tag, arr = ("F8_E4M3" if t.dtype == torch.float8_e4m3fn else "F8_E5M2"), t.view(torch.uint8).numpy()
    else:
        try:
            arr = t.numpy()
        except TypeError:
            raise FormatError(f"unsupported tensor dtype {t.dtype}") from None
        tag = _NP_TO_TAG.get(arr.dtype.name, arr.dtype.name)
    return Raw(tag, tuple(t.shape), arr.copy() if copy else arr)


def from_numpy(array: np.ndarray) -> Raw:
    """Wrap a numpy array as a :class:`Raw`."""
    tag = _NP_TO_TAG.get(array.dtype.name)
    if tag is None:
        raise FormatError(f"unsupported array dtype {array.dtype}")
    return Raw(tag, tuple(array.shape), np.ascontiguousarray(array))


class TensorInfo(NamedTuple):
    """One tensor's entry in a file: dtype tag, shape and absolute byte range."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's data."""
        return self.end - self.start


@dataclass
class TensorFile:
    """A tensor file opened for reading: its entries, metadata and a read log.

    Safetensors files are read lazily, by tensor or by a range of the first dimension;
    pickle files are loaded whole (weights only) when opened.
    """

    path: str
    format: str
    infos: dict[str, TensorInfo]
    metadata: dict[str, str]
    size: int
    _loaded: dict[str, Raw] = field(default_factory=dict, repr=False)
    reads: list[tuple[str, int, int, int]] = field(default_factory=list, repr=False)
    identity: tuple[int, ...] | None = field(default=None, repr=False)

    def _open(self) -> int:
        """A descriptor on the file, which must still be the regular file that was opened."""
        try:
            fd = open_regular_fd(self.path)
        except OSError as exc:
            raise FormatError(f"cannot read file: {exc.strerror or exc}", self.path) from None
        try:
            self._same_file(fd)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _same_file(self, fd: int) -> None:
        """Raise FormatError when the file behind ``fd`` is not the one whose header was read."""
        if self.identity is None:
            return
        now = file_identity(os.fstat(fd))
        if now != self.identity:
            raise changed_error(self.path, self.identity, now)

    def read(self, name: str) -> Raw:
        """Read one whole tensor."""
        info = self.infos[name]
        first = info.shape[0] if info.shape else 1
        return self.read_rows(name, 0, first)

    def map(self, name: str) -> Raw:
        """One whole tensor, for large reductions (the average): the same bytes as :meth:`read`.

        This used to memory-map the file. A mapped file that another program truncates kills the
        process with SIGBUS at the next touched page, with no message, so the tensor is read into
        memory instead (a parallel ``preadv``; one memory copy more than a mapping) and a file that
        changed while it was read is refused with "changed while reading".
        """
        return self.read(name)

    def read_rows(self, name: str, start: int, stop: int, *, out: Any = None) -> Raw:
        """Read rows ``start:stop`` of a tensor's first dimension (only those bytes).

        ``out``, a writable buffer of at least the rows' size (e.g. a pinned host tensor's numpy
        view), receives the bytes straight from the file, with no zero-filled or intermediate
        copy; the returned array is a view of it. Large reads are split over threads.
        """
        return self._read_rows(name, start, stop, out, None)

    @contextlib.contextmanager
    def row_reader(self, *, mapped: bool = False) -> Iterator[Callable[..., Raw]]:
        """:meth:`read_rows` for many small reads in a row (a reduction's chunks of tasks, each
        read into the same small buffer while it is in the CPU's cache): the file is opened once for
        all of them, not once per read, and checked when the block ends to be still the file whose
        header was read, unchanged (a write changes its modification time, so this one check refuses
        a change during any of the reads: FormatError "changed while reading" leaves the block
        instead of its result). Inside the block, ``read(name, start, stop, out=None,
        columns=None)`` is :meth:`read_rows`; ``columns=(lo, hi)`` reads only those columns of each
        row (a tensor of more than one dimension, flattened to [rows, columns]), row by row: what
        threads summing column windows read (it may be called from several threads).

        ``mapped``: where the file can be held still (then ``read.mapped`` is true), reads are views
        of a read-only mapping of it
        (no copy; ``out`` unused; strided for ``columns``; valid until the next read of the same
        tensor and columns on the same thread: rows before the one every reader has reached are
        handed back, so the process does not hold the file's pages as it sums them), else as
        above. A mapped file that another program truncates kills the process with SIGBUS, so the
        file is mapped only under a read lease (:func:`_leased_map`: no process can open it for
        writing or truncate it while the lease is held), a lease break sends every later read back
        to ``preadv``, and the file is checked before the lease is released."""
        fd: int | None = None
        opening = threading.Lock()
        stack = contextlib.ExitStack()
        lease: _Lease | None = None

        def read(name: str, start: int, stop: int, *, out: Any = None, columns: tuple[int, int] | None = None) -> Raw:
            nonlocal fd
            if fd is None and name not in self._loaded:
                with opening:
                    if fd is None:
                        fd = self._open()
            if lease is not None and not lease.broken and name not in self._loaded:
                return self._mapped_rows(lease, name, start, stop, columns)
            if columns is not None:
                return self._read_columns(name, start, stop, columns, out, fd)
            return self._read_rows(name, start, stop, out, fd)

        try:
            if mapped and len(self._loaded) < len(self.infos):  # here, on the thread that gets the signal
                fd = self._open()
                lease = stack.enter_context(_leased_map(fd, self.size))
            read.mapped = lease is not None  # type: ignore[attr-defined]
            with stack:
                yield read
                if fd is not None:  # (before the lease goes: a writer it held back may be waiting)
                    try:
                        self._same_file(fd)
                    except OSError as exc:
                        raise FormatError(f"cannot read file: {exc.strerror or exc}", self.path) from None
        finally:
            stack.close()
            if fd is not None:
                os.close(fd)

    def _mapped_rows(self, lease: _Lease, name: str, start: int, stop: int, columns: tuple[int, int] | None) -> Raw:
        """Rows ``start:stop`` (and ``columns``) of a tensor as a view of the leased mapping (see
        :meth:`_Lease.reached` for the pages handed back)."""
        info = self.infos[name]
        itemsize, storage = DTYPES[info.dtype]
        inner = math.prod(info.shape[1:]) if info.shape else 1
        first = info.shape[0] if info.shape else 1
        start, stop = max(0, start), min(first, stop)
        rows = max(0, stop - start)
        lease.reached(name, (threading.get_ident(), columns), start, info.start, inner * itemsize)
        whole = np.frombuffer(lease.map, dtype=storage, count=first * inner, offset=info.start).reshape(first, inner)
        part = whole[start:stop]
        if columns is not None:
            part = part[:, columns[0] : columns[1]]
            self.reads.append((name, start, stop, rows * (columns[1] - columns[0]) * itemsize))
            return Raw(info.dtype, part.shape, part)
        self.reads.append((name, start, stop, rows * inner * itemsize))
        shape = (rows, *info.shape[1:]) if info.shape else ()
        return Raw(info.dtype, shape, part.reshape(shape))

    def _read_rows(self, name: str, start: int, stop: int, out: Any, fd: int | None) -> Raw:
        """:meth:`read_rows` on the open descriptor ``fd`` (None: open the file for this read)."""
        info = self.infos[name]
        itemsize, storage = DTYPES[info.dtype]
        if not info.shape:
            shape: tuple[int, ...] = ()
            row_bytes, count = info.nbytes, 1
            start, stop = 0, 1
        else:
            start, stop = max(0, start), min(info.shape[0], stop)
            inner = math.prod(info.shape[1:])
            row_bytes = inner * itemsize
            shape = (max(0, stop - start), *info.shape[1:])
            count = max(0, stop - start) * inner
        nbytes = count * itemsize
        target = None
        if out is not None:
            target = memoryview(out).cast("B")
            if target.readonly or target.nbytes < nbytes:
                raise ValueError(f"out must be a writable buffer of at least {nbytes} bytes")
            target = target[:nbytes]
        if name in self._loaded:
            raw = self._loaded[name]
            arr = np.ascontiguousarray(raw.array if not info.shape else raw.array[start:stop])
            if target is None:
                return Raw(raw.dtype, shape, arr)
            target[:] = arr.reshape(-1).view(np.uint8).data
            return Raw(raw.dtype, shape, np.frombuffer(target, dtype=storage, count=count).reshape(shape))
        offset = info.start + start * row_bytes
        self.reads.append((name, start, stop, nbytes))
        data = target if target is not None else np.empty(nbytes, dtype=np.uint8).data
        held = fd is not None
        try:
            if fd is None:
                fd = self._open()
            got = _read_fd(fd, memoryview(data).cast("B"), offset)
            if not held:
                self._same_file(fd)  # a file rewritten while it was read: refuse what was read
        except OSError as exc:
            raise FormatError(f"cannot read tensor {name!r}: {exc.strerror or exc}", self.path) from None
        finally:
            if fd is not None and not held:
                os.close(fd)
        if got != nbytes:
            raise FormatError(f"file ended inside tensor {name!r} (truncated?)", self.path)
        arr = np.frombuffer(data, dtype=storage, count=count).reshape(shape)
        return Raw(info.dtype, shape, arr)

    def _read_columns(
        self, name: str, start: int, stop: int, columns: tuple[int, int], out: Any, fd: int | None
    ) -> Raw:
        """Rows ``start:stop`` of a tensor flattened to [rows, columns], only ``columns=(lo, hi)``:
        [stop - start, hi - lo], read row by row on ``fd`` (held by :meth:`row_reader`, which
        checks the file when its block ends) into ``out``."""
        info = self.infos[name]
        itemsize, storage = DTYPES[info.dtype]
        if name in self._loaded or fd is None or len(info.shape) < 2:
            whole = self._read_rows(name, start, stop, None, fd).array
            part = np.ascontiguousarray(whole.reshape(whole.shape[0], -1)[:, columns[0] : columns[1]])
            if out is not None:
                target = np.frombuffer(memoryview(out).cast("B"), dtype=storage, count=part.size)
                target[:] = part.reshape(-1)
                part = target.reshape(part.shape)
            return Raw(info.dtype, part.shape, part)
        start, stop = max(0, start), min(info.shape[0], stop)
        lo, hi = columns
        width = (hi - lo) * itemsize
        row_bytes = math.prod(info.shape[1:]) * itemsize
        rows = max(0, stop - start)
        view = memoryview(out).cast("B") if out is not None else memoryview(bytearray(rows * width))
        if view.readonly or view.nbytes < rows * width:
            raise ValueError(f"out must be a writable buffer of at least {rows * width} bytes")
        self.reads.append((name, start, stop, rows * width))
        try:
            first = info.start + start * row_bytes + lo * itemsize
            for i in range(rows):
                got = _read_fd(fd, view[i * width : (i + 1) * width], first + i * row_bytes)
                if got != width:
                    raise FormatError(f"file ended inside tensor {name!r} (truncated?)", self.path)
        except OSError as exc:
            raise FormatError(f"cannot read tensor {name!r}: {exc.strerror or exc}", self.path) from None
        arr = np.frombuffer(view, dtype=storage, count=rows * (hi - lo)).reshape(rows, hi - lo)
        return Raw(info.dtype, (rows, hi - lo), arr)


class _Lease:
    """A read lease's mapping of a file, and whether the lease was broken (see :func:`_leased_map`)."""

    def __init__(self, mapping: Any) -> None:
        self.map = mapping
        self.broken = False  # no more views: the lease was broken (signalled) or is being let go
        self.signalled = False
        self.progress: dict[str, dict[Any, int]] = {}
        self.released: dict[str, int] = {}
        self.lock = threading.Lock()

    def reached(self, name: str, reader: Any, row: int, offset: int, row_bytes: int) -> None:
        """``reader`` (a thread and its columns) now reads tensor ``name`` from ``row`` on (its
        earlier rows are done with). Once the rows every reader of the tensor is past add up to
        :data:`FORGET_BYTES`, their whole pages are handed back (``MADV_DONTNEED``: the process's
        mapping of them goes, the page cache keeps them, a later read would fault them in again):
        one call per span, as each call stops every thread of the process to flush its TLB."""
        import mmap

        with self.lock:
            readers = self.progress.setdefault(name, {})
            readers[reader] = row
            low = min(readers.values())
            done = self.released.get(name, 0)
            if (low - done) * row_bytes < FORGET_BYTES or self.broken:
                return
            self.released[name] = low
            page = mmap.PAGESIZE
            a = -(-(offset + done * row_bytes) // page) * page
            b = (offset + low * row_bytes) // page * page
            advise = getattr(self.map, "madvise", None)
            if advise is not None and a < b:
                with contextlib.suppress(OSError, ValueError):
                    advise(mmap.MADV_DONTNEED, a, b - a)


FORGET_BYTES = 256 << 20
"""A leased mapping hands back the pages of rows every reader is past in spans of this many bytes."""


@contextlib.contextmanager
def _leased_map(fd: int, size: int) -> Iterator[_Lease | None]:
    """A read-only mapping of the file behind ``fd`` under a Linux read lease, or ``None`` where
    one cannot be had (not Linux, not the main thread, which must receive the lease-break signal;
    a file open for writing anywhere, owned by another user, or on a filesystem without leases).

    While a read lease is held, an ``open`` for writing or a ``truncate`` of the file by any
    process waits until the holder releases it (at most ``/proc/sys/fs/lease-break-time``,
    45 s by default) and the holder gets SIGIO: so the mapping cannot shrink under us (no SIGBUS)
    and the bytes cannot change. On SIGIO the lease is marked broken: callers stop reading the
    mapping and read with ``preadv`` instead (the writer still waits until the lease is let go,
    or the break time runs out), and :meth:`TensorFile.row_reader` checks the file before it lets
    the lease go. The previous SIGIO handler is restored on the way out, after the lease is
    released."""
    import sys

    if not sys.platform.startswith("linux") or size <= 0 or threading.current_thread() is not threading.main_thread():
        yield None
        return
    import fcntl
    import mmap
    import signal

    lease = _Lease(None)  # before the lease is taken: a break that comes at once is not missed

    def broken(_signum: int, _frame: Any) -> None:
        lease.broken = lease.signalled = True

    try:
        previous = signal.signal(signal.SIGIO, broken)
    except (ValueError, OSError):
        yield None
        return
    held = False
    mapping = None
    try:
        try:
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
            held = True
            if os.fstat(fd).st_size == size:  # held still from here on: a mapping past the end would SIGBUS
                mapping = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        except (OSError, ValueError):
            mapping = None
        lease.map = mapping
        yield lease if mapping is not None else None
    finally:
        lease.broken = True  # no view is taken from here on
        if mapping is not None:
            with contextlib.suppress(BufferError):  # a view still alive: the mapping goes with the last of them
                mapping.close()
        if held:
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        signal.signal(signal.SIGIO, previous)


READ_PIECE = 8 << 20  # bytes per thread of a parallel read
READ_THREADS = max(1, min(8, os.cpu_count() or 1))


def read_into(path: str | os.PathLike[str], buffer: Any, offset: int) -> int:
    """Fill the writable ``buffer`` with the file's bytes from ``offset``; the bytes read (fewer
    only when the file ends first). Reads over ``READ_PIECE`` are split in pieces read by up to
    ``READ_THREADS`` threads with ``os.preadv`` (which releases the GIL): a page-cache read is a
    memory copy, and one core does not saturate memory bandwidth. Only a regular file is read
    (see :func:`mpt_tools.paths.open_regular_fd`)."""
    view = memoryview(buffer).cast("B")
    fd = open_regular_fd(path)
    try:
        return _read_fd(fd, view, offset)
    finally:
        os.close(fd)


def _read_fd(fd: int, view: memoryview, offset: int) -> int:
    """:func:`read_into` on an open descriptor (its file position is not used)."""
    size = view.nbytes
    preadv = getattr(os, "preadv", None)
    if preadv is None:  # platforms without preadv: one sequential read
        os.lseek(fd, offset, os.SEEK_SET)
        return _read_fully(lambda v, _pos: _read_once(fd, v), view, 0)
    if size <= READ_PIECE:  # one piece, read here: the many small reads of a reduction pay no more
        done = 0
        while done < size:
            got = preadv(fd, [view[done:]], offset + done)
            if not got:
                break
            done += got
        return done
    pieces = [(a, min(size, a + READ_PIECE)) for a in range(0, size, READ_PIECE)]

    def piece(bounds: tuple[int, int]) -> int:
        a, b = bounds
        return _read_fully(lambda v, pos: preadv(fd, [v], offset + pos), view[a:b], a)

    if len(pieces) <= 1 or READ_THREADS == 1:
        return sum(map(piece, pieces))
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(READ_THREADS, len(pieces))) as pool:
        got = list(pool.map(piece, pieces))
    # a short piece means the file ended there: count only the bytes read without a gap
    total = 0
    for (a, b), n in zip(pieces, got, strict=True):
        total += n
        if n < b - a:
            break
    return total


def file_identity(st: os.stat_result) -> tuple[int, ...]:
    """What must not change while a file is read: device, inode, size and modification time."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def changed_error(path: str, before: tuple[int, ...], after: tuple[int, ...] | None) -> FormatError:
    """The error for a file that changed (rewritten, truncated, replaced, removed: ``after`` None)
    while it was read."""
    if after is None:
        how = "it was removed"
    elif before[:2] != after[:2]:
        how = "it was replaced by another file"
    elif after[2] < before[2]:
        how = f"it shrank from {before[2]:,} to {after[2]:,} bytes (truncated)"
    elif after[2] > before[2]:
        how = f"it grew from {before[2]:,} to {after[2]:,} bytes"
    else:
        how = "it was rewritten"
    return FormatError(
        f"changed while reading ({how}); nothing read from it is used: run the command again "
        "once no other program writes the file",
        path,
    )


def _read_once(fd: int, view: memoryview) -> int:
    """One sequential read into ``view`` (``readv`` where there is one)."""
    readv = getattr(os, "readv", None)
    if readv is not None:
        return int(readv(fd, [view]))
    data = os.read(fd, view.nbytes)
    view[: len(data)] = data
    return len(data)


def _read_fully(read: Any, view: memoryview, base: int) -> int:
    """Call ``read(subview, file_position_of_it)`` until ``view`` is full or a read returns 0."""
    done = 0
    while done < view.nbytes:
        n = read(view[done:], base + done)
        if not n:
            break
        done += n
    return done


def _fail(path: str, msg: str) -> FormatError:
    return FormatError(f"not a valid safetensors file: {msg}", path)


def memory_limit() -> int:
    """Bytes of physical memory on this machine (the most one tensor may claim).

    ``MPT_TOOLS_MAX_TENSOR_BYTES`` overrides it (tests, or to be stricter).
    """
    override = max_tensor_bytes()  # ConfigError (one line) for a value that is not a byte count
    if override is not None:
        return override
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 1 << 40


def memory_name() -> str:
    """What :func:`memory_limit` is, for a message: "this machine's memory", or the variable that
    overrides it."""
    return "this machine's memory" if max_tensor_bytes() is None else "MPT_TOOLS_MAX_TENSOR_BYTES"


def more_than_memory(limit: int | None = None) -> str:
    """ "more than <what the limit is> (<limit> bytes)", the end of every message that refuses a size
    over :func:`memory_limit` (``limit``: that limit, already read)."""
    return f"more than {memory_name()} ({memory_limit() if limit is None else limit:,} bytes)"


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


# The dtype tags safetensors' own parser (0.8) knows; the sub-byte and E8M0 ones mpt-tools cannot read.
SAFETENSORS_DTYPES = frozenset((*(t for t in DTYPES if t != "C128"), "F4", "F6_E2M3", "F6_E3M2", "F8_E8M0"))
_SUB_BYTE_BITS = {"F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "F8_E8M0": 8}
_USIZE = 1 << 64  # safetensors reads shapes and offsets as Rust usize (u64 here)
_JSON_DEPTH = 128  # serde_json's nesting limit: 128 nested arrays/objects are refused


def _json_int(text: str) -> int | float:
    """``-0`` is an integer to Python's json and a float to serde's: keep it out of usize fields."""
    return -0.0 if text == "-0" else int(text)


def _json_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} out of range")
    return value


def _too_deep(value: Any) -> bool:
    """Whether ``value`` nests arrays/objects ``_JSON_DEPTH`` deep (serde_json refuses that)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth >= _JSON_DEPTH:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def _usize(value: Any) -> bool:
    """A JSON number safetensors reads as a usize: an integer (not a bool or float), 0 <= v < 2**64."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _USIZE


def _json_type(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "a list", dict: "an object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def open_safetensors(path: str | os.PathLike[str]) -> TensorFile:
    """Parse and check a safetensors header without reading any tensor data.

    Checks everything safetensors' own parser checks, types as well as values: header length and
    size limit; UTF-8 JSON that serde_json accepts (no NaN/Infinity, no number out of range, no
    unpaired surrogate escape, under 128 levels of nesting); a JSON object whose
    ``__metadata__`` maps strings to strings; per tensor an object with a known ``dtype`` string,
    a ``shape`` list and a two-item ``data_offsets`` list of integers below 2**64 (not floats such
    as 4.0, not booleans), whose byte size does not overflow; contiguous non-overlapping offsets
    covering the data exactly. Unknown fields in an entry are ignored, as safetensors does.
    Stricter than safetensors in one way: a name given twice is refused (safetensors keeps the
    last). Raises FormatError naming the first problem; only a regular file is read.
    """
    p = str(path)
    try:
        with open_regular(p) as fh:
            st = os.fstat(fh.fileno())
            size = st.st_size
            head = _read_exactly(fh, 8)
            if len(head) < 8:
                raise _fail(p, f"the file is {size} bytes, too short for a header")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER:
                raise _fail(p, f"header claims {n} bytes, over the {MAX_HEADER}-byte limit")
            if 8 + n > size:
                raise _fail(p, f"header claims {n} bytes but the file has {size - 8} after the length (truncated?)")
            blob = _read_exactly(fh, n)
            if len(blob) < n:
                raise changed_error(p, file_identity(st), file_identity(os.fstat(fh.fileno())))
    except OSError as exc:
        raise FormatError(f"cannot read file: {exc.strerror or exc}", p) from None
    return parse_header(p, blob, size, identity=file_identity(st))


def parse_header(
    p: str, blob: bytes, size: int, *, identity: tuple[int, ...] | None = None, check_memory: bool = True
) -> TensorFile:
    """Check the JSON header ``blob`` of a safetensors file of ``size`` bytes named ``p`` (see
    :func:`open_safetensors` for the rules) and describe the file without reading any data. The
    Hub audit calls it on a header fetched by range requests; ``check_memory`` False there, since
    nothing of the file is ever loaded from such a description."""
    n = len(blob)
    try:
        header = json.loads(
            blob.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_int=_json_int,
            parse_float=_json_float,
            parse_constant=_reject_constant,
        )
        json.dumps(header, ensure_ascii=False).encode("utf-8")  # unpaired surrogate escapes
    except UnicodeDecodeError:
        raise _fail(p, "header is not UTF-8") from None
    except UnicodeEncodeError:
        raise _fail(p, "header holds an unpaired UTF-16 surrogate escape (not valid JSON text)") from None
    except _DuplicateKey as exc:
        raise _fail(p, f"header names {exc.args[0]!r} twice") from None
    except (ValueError, RecursionError) as exc:
        why = f" ({exc})" if str(exc).startswith(("number", "NaN", "Infinity", "-Infinity")) else ""
        raise _fail(p, f"header is not valid JSON{why}") from None
    if not isinstance(header, dict):
        raise _fail(p, "header is not a JSON object")
    if _too_deep(header):
        raise _fail(p, f"header nests {_JSON_DEPTH} or more levels deep (safetensors' limit)")
    metadata = header.pop("__metadata__", None)
    if metadata is None:  # null is no metadata; [], "", 0 and false are refused below, as serde does
        metadata = {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _fail(p, "__metadata__ must map strings to strings")
    data_len = size - 8 - n
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise _fail(p, f"entry {name!r} is {_json_type(entry)}, not an object")
        for key in ("dtype", "shape", "data_offsets"):
            if key not in entry:
                raise _fail(p, f"tensor {name!r} has no {key!r} field")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str):
            raise _fail(p, f"tensor {name!r} has dtype {dtype!r}, {_json_type(dtype)}, not a dtype string")
        if dtype not in SAFETENSORS_DTYPES:
            raise _fail(p, f"tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_usize(s) for s in shape):
            raise _fail(
                p, f"tensor {name!r} has an invalid shape {shape!r} (a list of integers from 0 to 2**64-1 expected)"
            )
        if too_many_dims(shape):
            raise _fail(p, f"tensor {name!r} has {too_many_dims(shape)}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_usize(o) for o in offsets):
            raise _fail(p, f"tensor {name!r} has invalid data_offsets {offsets!r} (two integers from 0 expected)")
        if offsets[1] < offsets[0]:
            raise _fail(p, f"tensor {name!r} has invalid data_offsets {offsets!r} (end before start)")
        elements = 1
        for dim in shape:  # as safetensors computes it: overflow at any step is an error
            elements *= dim
            if elements >= _USIZE:
                raise _fail(p, f"tensor {name!r} of shape {shape}: the element count overflows 64 bits")
        bits = elements * (DTYPES[dtype][0] * 8 if dtype in DTYPES else _SUB_BYTE_BITS[dtype])
        if bits >= _USIZE:
            raise _fail(p, f"tensor {name!r} of shape {shape} {dtype}: the size in bits overflows 64 bits")
        if bits % 8:
            raise _fail(p, f"tensor {name!r} of shape {shape} {dtype} does not end on a byte boundary")
        want = bits // 8
        if offsets[1] - offsets[0] != want:
            raise _fail(
                p,
                f"tensor {name!r} of shape {shape} {dtype} needs {want} bytes but its offsets span "
                f"{offsets[1] - offsets[0]}",
            )
        infos[name] = TensorInfo(name, dtype, tuple(shape), 8 + n + offsets[0], 8 + n + offsets[1])
    limit = memory_limit() if check_memory else _USIZE
    for info in infos.values():
        if info.nbytes > limit:
            raise FormatError(
                f"tensor {info.name!r} claims {info.nbytes:,} bytes, {more_than_memory(limit)}; "
                "refusing before reading it",
                p,
            )
    pos = 8 + n
    for info in sorted(infos.values(), key=lambda i: (i.start, i.end)):
        if info.start != pos:
            what = "overlaps the previous tensor" if info.start < pos else "leaves a gap before it"
            raise _fail(p, f"tensor {info.name!r} {what} (data offsets are not contiguous)")
        pos = info.end
    if pos - 8 - n != data_len:
        if pos - 8 - n > data_len:
            raise _fail(p, f"tensor data needs {pos - 8 - n} bytes but the file has {data_len} (truncated?)")
        raise _fail(p, f"{data_len - (pos - 8 - n)} bytes of trailing data after the last tensor")
    for info in infos.values():  # a valid file, with a dtype mpt-tools has no use for
        if info.dtype not in DTYPES:
            raise FormatError(f"tensor {info.name!r} has dtype {info.dtype}, which mpt-tools does not read", p)
    return TensorFile(p, "safetensors", infos, dict(metadata), size, identity=identity)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _read_exactly(fh: Any, n: int) -> bytes:
    """Up to ``n`` bytes from an unbuffered file (fewer only at the end of the file)."""
    chunks: list[bytes] = []
    got = 0
    while got < n:
        block = fh.read(min(n - got, 1 << 26))
        if not block:
            break
        chunks.append(block)
        got += len(block)
    return b"".join(chunks)


_TORCH_MSG = re.compile(r"(?:Unsupported global: |Trying to load unsupported )GLOBAL ([\w.]+)")
_TORCH_BOILERPLATE = (
    "weights only load failed",
    "check the documentation",
    "please file an issue",
    "re-running `torch.load`",
)
# A torch rebuild function in a pickle -> what it builds, for the one-line refusal.
_REFUSED_REBUILDS = {
    "torch._utils._rebuild_sparse_tensor": "a sparse tensor",
    "torch._utils._rebuild_sparse_csr_tensor": "a sparse tensor",
    "torch._utils._rebuild_meta_tensor_no_storage": "a meta-device tensor (no data)",
    "torch._utils._rebuild_qtensor": "a quantized tensor",
    "torch._utils._rebuild_nested_tensor": "a nested tensor",
    "torch._utils._rebuild_wrapper_subclass": "a tensor subclass",
}
_TENSOR_REBUILDS = (
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_tensor_v3",
    "torch._utils._rebuild_qtensor",
)


class _Claim:
    """What a global named in a pickle would build: its arguments, recorded; nothing is run."""

    qualname = ""
    sink: list[_Claim] = []  # noqa: RUF012 - set per unpickling, on each recorder class

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.items: dict[Any, Any] = {}
        self.sink.append(self)

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items[key] = value

    def append(self, value: Any) -> None:
        """What APPEND does to a list."""

    def extend(self, values: Any) -> None:
        """What APPENDS does to a list."""


class _Storage(NamedTuple):
    """A storage a pickle refers to (persistent id): its type, key, location and element count."""

    type_name: str
    key: str
    location: str
    numel: Any


class _Claims:
    """Everything a torch pickle claims, read without building anything (see :func:`_pickle_claims`)."""

    def __init__(self) -> None:
        self.calls: list[_Claim] = []
        self.storages: dict[str, _Storage] = {}
        self.result: Any = None


def _claims_unpickler(fh: Any, claims: _Claims) -> Any:
    import pickle

    classes: dict[tuple[str, str], type[_Claim]] = {}

    class ClaimsUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            key = (module, name)
            if key not in classes:
                classes[key] = type(name, (_Claim,), {"qualname": f"{module}.{name}", "sink": claims.calls})
            return classes[key]

        def persistent_load(self, pid: Any) -> Any:
            if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] in ("storage", b"storage"):
                storage_type, key, location, numel = pid[1:5]
                name = getattr(storage_type, "qualname", "")
                storage = _Storage(name, str(key), str(location), numel)
                claims.storages.setdefault(storage.key, storage)
                return storage
            return None

    return ClaimsUnpickler(fh)


def _pickle_claims(fh: Any, legacy: bool) -> _Claims:
    """Unpickle a torch pickle with every global replaced by a recorder, so that what it claims
    (storages and their sizes, tensors and their shapes, sparse/meta/quantized rebuilds) can be
    checked before torch allocates anything. Runs no code; a pickle it cannot read is left for
    torch to refuse (what was recorded up to there is still returned)."""
    claims = _Claims()
    try:
        unpickler = _claims_unpickler(fh, claims)
        if legacy:  # magic number, protocol version, sys info, then the object
            for _ in range(3):
                unpickler.load()
        claims.result = unpickler.load()
    except Exception:  # a corrupt pickle: torch says what is wrong with it
        pass
    return claims


def _dtype_of(torch: Any, name: str) -> Any:
    """The torch dtype of a storage class name or dtype name in a pickle (None if unknown)."""
    short = name.rpartition(".")[2]
    if short == "UntypedStorage":
        return torch.uint8
    found = getattr(torch, short, None)
    dtype = getattr(found, "dtype", found) if short.endswith("Storage") else found
    return dtype if isinstance(dtype, torch.dtype) else None


def _tensor_kind(torch: Any, dtype: Any) -> str | None:
    """Why a tensor of this dtype is refused (complex, quantized), or None."""
    if dtype is None:
        return None
    if dtype.is_complex:
        return f"a complex tensor ({dtype})"
    if dtype in (torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4):
        return f"a quantized tensor ({dtype})"
    return None


def _names_of(result: Any) -> dict[int, str]:
    """id(value) -> key for the top-level mapping of a claims pass (to name a tensor)."""
    items = result.items if isinstance(result, _Claim) else result if isinstance(result, dict) else {}
    out: dict[int, str] = {}
    for key, value in items.items():
        out[id(value)] = repr(key)
        if isinstance(value, _Claim) and value.args and isinstance(value.args[0], _Claim):  # a Parameter
            out[id(value.args[0])] = repr(key)
    return out


def _check_claims(p: str, claims: _Claims, size: int, torch: Any) -> None:
    """Refuse what a pickle claims before torch builds it: more storage than the file holds,
    a tensor larger than memory, sparse/meta/quantized/complex tensors."""
    limit = memory_limit()
    names = _names_of(claims.result)
    total_storage = 0
    for storage in claims.storages.values():
        dtype = _dtype_of(torch, storage.type_name)
        numel = storage.numel if isinstance(storage.numel, int) and not isinstance(storage.numel, bool) else 0
        total_storage += max(0, numel) * (dtype.itemsize if dtype is not None else 1)
        if storage.location.startswith("meta"):
            raise FormatError("holds a meta-device tensor (no data); save the materialised weights", p)
    if total_storage > size:
        raise FormatError(
            f"its pickle claims {total_storage:,} bytes of tensor storage but the file has {size:,} bytes; "
            "refusing before allocating it",
            p,
        )
    total_tensors = 0
    for call in claims.calls:
        what = _REFUSED_REBUILDS.get(call.qualname)
        tensor = call.qualname in _TENSOR_REBUILDS
        if what is None and not tensor:
            if call.qualname.startswith("torch.") and _tensor_kind(torch, _dtype_of(torch, call.qualname)):
                what = _tensor_kind(torch, _dtype_of(torch, call.qualname))
            else:
                continue
        name = names.get(id(call))
        label = f" {name}" if name else ""
        source = call.args[0] if call.args and isinstance(call.args[0], _Storage) else None
        dtype = _dtype_of(torch, source.type_name) if source else None
        what = what or _tensor_kind(torch, dtype)
        if what is not None:
            article, _, rest = what.partition(" ")
            raise FormatError(
                f"holds {article} {rest.replace('tensor', f'tensor{label}', 1)}; mpt-tools reads dense "
                "real-valued CPU tensors only",
                p,
            )
        shape = call.args[2] if len(call.args) > 2 else None
        if not isinstance(shape, tuple) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            continue  # torch refuses it
        if too_many_dims(shape):
            raise FormatError(f"tensor{label} has {too_many_dims(shape)}", p)
        elements = math.prod(max(0, d) for d in shape)
        held = source.numel if source is not None and isinstance(source.numel, int) else None
        if held is not None and elements > max(0, held):  # strides of 0 (expand) or overlapping rows
            raise FormatError(
                f"tensor{label} of shape {list(shape)} has {elements:,} elements but its storage holds "
                f"{max(0, held):,} (a broadcast or overlapping view, as .expand() makes): refusing to "
                "materialise it; save the tensor with .contiguous()",
                p,
            )
        claimed = elements * (dtype.itemsize if dtype is not None else 1)
        total_tensors += claimed
        if claimed > limit or total_tensors > limit:
            what_claims = f"tensor{label} of shape {list(shape)} claims" if claimed > limit else "its tensors claim"
            amount = claimed if claimed > limit else total_tensors
            raise FormatError(
                f"{what_claims} {amount:,} bytes, {more_than_memory(limit)}; refusing before allocating it",
                p,
            )


def _check_zip(p: str, fh: Any, size: int) -> bytes | None:
    """Check a torch.save zip's central directory (records stored, not compressed; sizes within
    the file) and return its ``data.pkl`` (None when there is none: torch says so)."""
    import zipfile

    try:
        archive = zipfile.ZipFile(fh)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, struct.error):
        raise FormatError("not a readable PyTorch file (corrupt or truncated zip archive)", p) from None
    with archive:
        infos = archive.infolist()
        total = 0
        for info in infos:
            if info.compress_type != zipfile.ZIP_STORED:
                raise FormatError(
                    f"zip record {info.filename!r} is compressed (it claims {info.file_size:,} bytes once "
                    f"inflated); torch.save writes records uncompressed: refusing to inflate it",
                    p,
                )
            total += info.file_size
        if total > size:
            raise FormatError(
                f"its zip records claim {total:,} bytes but the file has {size:,} bytes (overlapping or "
                "corrupt records); refusing before reading them",
                p,
            )
        pickles = [i for i in infos if i.filename.endswith("/data.pkl") or i.filename == "data.pkl"]
        if len(pickles) != 1:
            return None
        try:
            return archive.read(pickles[0])
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error):
            raise FormatError("not a readable PyTorch file (corrupt or truncated zip archive)", p) from None


def _sniff(head: bytes, size: int) -> str | None:
    """What a file named .bin/.pt/.pth is when it is not a torch.save file (None: it may be one)."""
    if size == 0:
        return "is empty (0 bytes), not a PyTorch weights file"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06") or head[:1] == b"\x80":
        return None
    if len(head) >= 9 and head[8:9] == b"{" and 8 + struct.unpack("<Q", head[:8])[0] <= size:
        return (
            "is a safetensors file with a PyTorch name: rename it to .safetensors (PEFT would torch.load "
            "a .bin and fail)"
        )
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text.startswith(b"version https://git-lfs"):
        return f"is a Git LFS pointer ({size:,} bytes), not the weights: fetch the file itself (git lfs pull)"
    low = text[:64].lower()
    if low.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<?xml", b"<!--")):
        return "is an HTML page, not a PyTorch weights file (an error page saved in place of the download?)"
    if text[:1] in (b"{", b"["):
        return "is JSON text, not a PyTorch weights file"
    try:
        decoded = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        decoded = head[: exc.start].decode("utf-8") if exc.start > len(head) - 4 else ""
    if decoded and all(c.isprintable() or c in "\t\r\n" for c in decoded):
        first = decoded.strip().splitlines()[0][:40] if decoded.strip() else ""
        return f"is a text file ({first!r}...), not a PyTorch weights file"
    return "is not a PyTorch weights file (neither a torch.save zip archive nor a pickle)"


def _torch_reason(exc: BaseException) -> str:
    """One line for a torch.load failure: torch's reason, without its boilerplate, whole sentences."""
    text = str(exc)
    found = _TORCH_MSG.search(text)
    if found:
        return (
            f"refused to unpickle it (it names {found.group(1)}, which is not a tensor type); "
            "it holds more than tensors"
        )
    low = text.lower()
    if "zip" in low or "archive" in low or "central directory" in low:
        return "not a readable PyTorch file (corrupt or truncated zip archive)"
    lines = []
    for line in text.splitlines():
        line = line.strip().removeprefix(
            "Please file an issue with the following so that we can make "
            "`weights_only=True` compatible with your use case: "
        )
        line = line.removeprefix("WeightsUnpickler error:").strip()
        if line and not line.lower().startswith(_TORCH_BOILERPLATE):
            lines.append(line)
    first = lines[0] if lines else type(exc).__name__
    sentence = re.split(r"(?<=[.;])\s", first, maxsplit=1)[0]
    if len(sentence) > 160:
        sentence = sentence[:160].rsplit(" ", 1)[0] + " ..."
    return f"not a readable weights-only PyTorch file ({sentence.rstrip('.')})"


def open_pickle(path: str | os.PathLike[str], *, bare: bool = False) -> TensorFile:
    """Load a PyTorch pickle (.bin/.pt/.pth) with ``weights_only=True`` (imports torch).

    Only a flat mapping of names to dense, real-valued tensors is accepted; code, other objects
    and nested wrappers are refused without executing anything. Before torch reads it, the file
    must be a regular file; a file that is not a torch.save file at all (empty, safetensors, JSON,
    HTML, a Git LFS pointer, text) is named; a zip's records must be stored uncompressed and
    within the file; and what the pickle claims (storage bytes, tensor sizes, sparse, meta-device,
    quantized or complex tensors) is checked, so nothing is inflated or allocated first. Torch's
    warnings are silenced; a file that changes while it is read is refused. With ``bare``, a
    pickle of one tensor (``torch.save(tensor)``, TGIS's ``decoder.pt``) is accepted too, as the
    one entry :data:`BARE_KEY`.
    """
    p = str(path)
    try:
        with open_regular(p) as fh:
            st = os.fstat(fh.fileno())
            size = st.st_size
            head = _read_exactly(fh, 512)
            why = _sniff(head, size)
            if why is not None:
                raise FormatError(why, p)
            fh.seek(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if head[:2] == b"PK":
                    pkl = _check_zip(p, fh, size)
                    claims = _pickle_claims(io.BytesIO(pkl), legacy=False) if pkl is not None else None
                else:
                    claims = _pickle_claims(fh, legacy=True)
                import torch  # only now: a file refused above costs no torch import

                if claims is not None:
                    _check_claims(p, claims, size, torch)
                fh.seek(0)
                reason: str | None = None
                try:
                    obj = torch.load(fh, map_location="cpu", weights_only=True)
                except OSError:
                    raise
                except Exception as exc:  # torch raises many types for hostile or corrupt pickles
                    reason = _torch_reason(exc)
                    obj = None
                now = file_identity(os.fstat(fh.fileno()))
                if now != file_identity(st):
                    raise changed_error(p, file_identity(st), now)
                if reason is not None:
                    raise FormatError(reason, p)
                if bare and isinstance(obj, torch.Tensor):  # a bare tensor (TGIS's decoder.pt): one entry
                    obj = {BARE_KEY: obj}
                loaded = _pickle_tensors(p, obj, torch)
    except OSError as exc:
        raise FormatError(f"cannot read file: {exc.strerror or exc}", p) from None
    infos = {k: TensorInfo(k, r.dtype, r.shape, 0, r.nbytes) for k, r in loaded.items()}
    return TensorFile(p, "pickle", infos, {}, size, _loaded=loaded, identity=file_identity(st))


def _pickle_tensors(p: str, obj: Any, torch: Any) -> dict[str, Raw]:
    """The tensors of a loaded pickle, checked (a flat mapping of dense real CPU tensors, each
    within memory) before any is copied."""
    if not isinstance(obj, dict):
        raise FormatError(f"holds a {type(obj).__name__}, not a mapping of names to tensors", p)
    limit = memory_limit()
    total = 0
    for key, value in obj.items():
        if not isinstance(key, str):
            raise FormatError(f"holds a non-string key {key!r}", p)
        if isinstance(value, dict):
            raise FormatError(f"tensors are nested under {key!r}; save the inner state dict itself", p)
        if not isinstance(value, torch.Tensor):
            raise FormatError(f"entry {key!r} is a {type(value).__name__}, not a tensor", p)
        what = None
        if value.layout != torch.strided:
            what = f"a sparse tensor {key!r} ({value.layout})"
        elif value.is_meta:
            what = f"a meta-device tensor {key!r} (no data)"
        elif value.is_quantized:
            what = f"a quantized tensor {key!r} ({value.dtype})"
        elif value.is_complex():
            what = f"a complex tensor {key!r} ({value.dtype})"
        if what is not None:
            raise FormatError(f"holds {what}; mpt-tools reads dense real-valued CPU tensors only", p)
        claimed = value.numel() * value.element_size()
        total += claimed
        if claimed > limit or total > limit:
            raise FormatError(
                f"tensor {key!r} of shape {list(value.shape)} claims {claimed:,} bytes"
                + (f" ({total:,} with the tensors before it)" if claimed <= limit else "")
                + f", {more_than_memory(limit)}; refusing before allocating it",
                p,
            )
    return {key: from_torch(value) for key, value in obj.items()}


PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
TENSOR_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)  # every tensor file mpt-tools reads
PROMPT_SUFFIXES = (*TENSOR_SUFFIXES, ".npy")  # and a single prompt (pack: open_tensor_file(bare=True))


BARE_KEY = ""
"""The one entry of a file that holds a bare tensor (``open_tensor_file(..., bare=True)``)."""
NPY_MAGIC = b"\x93NUMPY"
_NPY_DTYPES = {"<f2": "F16", "<f4": "F32", "<f8": "F64"}
MAX_NPY_HEADER = 1 << 16


def open_tensor_file(path: str | os.PathLike[str], *, bare: bool = False) -> TensorFile:
    """Open a tensor file by its suffix: ``.safetensors`` or a PyTorch pickle suffix.

    ``bare`` (a single prompt, ``mpt-tools pack``): also a pickle of one bare tensor and a
    ``.npy`` file (:func:`open_npy`), each as the one entry :data:`BARE_KEY`."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        return open_safetensors(p)
    if suffix in PICKLE_SUFFIXES:
        return open_pickle(p, bare=bare)
    if bare and suffix == ".npy":
        return open_npy(p)
    # Unknown suffix: sniff. A safetensors file starts with a small little-endian header length.
    try:
        with open_regular(p) as fh:
            head = _read_exactly(fh, 10)
    except OSError as exc:
        raise FormatError(f"cannot read file: {exc.strerror or exc}", str(p)) from None
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return open_pickle(p, bare=bare)
    if len(head) >= 9 and head[8:9] == b"{":
        return open_safetensors(p)
    if bare and head.startswith(NPY_MAGIC):
        return open_npy(p)
    kinds = ".safetensors, .bin, .pt, .pth or .npy (a [T, d] prompt)" if bare else ".safetensors, .bin, .pt or .pth"
    raise FormatError(f"unknown file type: expected {kinds}", str(p))


def _npy_header(p: str, fh: Any, size: int) -> tuple[str, bool, tuple[int, ...], int]:
    """The dtype tag, Fortran order, shape and data offset of a ``.npy`` file, checked: the
    header is parsed as a Python literal (never evaluated), a little-endian float dtype only."""
    import ast

    head = _read_exactly(fh, 12)
    if not head.startswith(NPY_MAGIC) or len(head) < 10:
        raise FormatError("not a .npy file (no NUMPY magic)", p)
    major = head[6]
    if major == 1:
        length, offset = struct.unpack("<H", head[8:10])[0], 10
    elif major in (2, 3) and len(head) >= 12:
        length, offset = struct.unpack("<I", head[8:12])[0], 12
    else:
        raise FormatError(f"unknown .npy format version {major}.{head[7]}", p)
    if length > MAX_NPY_HEADER or offset + length > size:
        raise FormatError(f".npy header claims {length:,} bytes (the file has {size:,}); corrupt or hostile", p)
    fh.seek(offset)
    text = _read_exactly(fh, length).decode("latin-1" if major < 3 else "utf-8", errors="replace")
    try:
        header = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise FormatError(".npy header is not a readable dictionary (corrupt?)", p) from None
    if not isinstance(header, dict) or not {"descr", "fortran_order", "shape"} <= set(header):
        raise FormatError(".npy header lacks descr, fortran_order or shape", p)
    descr, fortran, shape = header["descr"], header["fortran_order"], header["shape"]
    if not isinstance(descr, str) or descr.replace("=", "<") not in _NPY_DTYPES:
        raise FormatError(f".npy dtype {descr!r}: expected little-endian float16, float32 or float64", p)
    if not isinstance(fortran, bool):
        raise FormatError(".npy header: fortran_order is not a boolean", p)
    sizes = isinstance(shape, tuple) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
    if not sizes:
        raise FormatError(f".npy header: shape {shape!r} is not a tuple of sizes", p)
    if too_many_dims(shape):
        raise FormatError(f".npy header: {too_many_dims(shape)}", p)
    return _NPY_DTYPES[descr.replace("=", "<")], fortran, shape, offset + length


def open_npy(path: str | os.PathLike[str]) -> TensorFile:
    """Read a ``.npy`` array (numpy's format, without numpy's loader) as the one entry
    :data:`BARE_KEY`: little-endian float16/32/64 only (object arrays, which unpickle, are
    refused), and a header whose size must be the file's (no claim beyond the file or memory is
    allocated, no trailing bytes); a file that changes while it is read is refused."""
    p = str(path)
    try:
        with open_regular(p) as fh:
            st = os.fstat(fh.fileno())
            tag, fortran, shape, offset = _npy_header(p, fh, st.st_size)
            nbytes = math.prod(shape) * DTYPES[tag][0]
            if nbytes > memory_limit():
                raise FormatError(
                    f".npy array of shape {list(shape)} claims {nbytes:,} bytes, {more_than_memory()}; "
                    "refusing before allocating it",
                    p,
                )
            if offset + nbytes != st.st_size:
                what = "truncated?" if offset + nbytes > st.st_size else "trailing bytes after the array"
                raise FormatError(
                    f".npy array of shape {list(shape)} needs {nbytes:,} bytes but the file holds "
                    f"{st.st_size - offset:,} after its header ({what})",
                    p,
                )
            fh.seek(offset)
            data = _read_exactly(fh, nbytes)
            now = file_identity(os.fstat(fh.fileno()))
            if now != file_identity(st) or len(data) != nbytes:
                raise changed_error(p, file_identity(st), now)
    except OSError as exc:
        raise FormatError(f"cannot read file: {exc.strerror or exc}", p) from None
    arr = np.frombuffer(data, dtype=DTYPES[tag][1])
    arr = arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)
    raw = Raw(tag, tuple(shape), np.ascontiguousarray(arr))
    infos = {BARE_KEY: TensorInfo(BARE_KEY, tag, raw.shape, 0, raw.nbytes)}
    return TensorFile(p, "npy", infos, {}, st.st_size, _loaded={BARE_KEY: raw}, identity=file_identity(st))


def normalise_keys(names: Iterable[str], path: str | None = None) -> tuple[dict[str, str], list[str], list[str]]:
    """Map the keys of a file to the canonical MPT keys.

    Returns ``(canonical -> original, notes, ignored)``: ``notes`` says which keys were renamed,
    ``ignored`` lists keys that are not MPT tensors. Raises FormatError when two keys map to the
    same canonical key or when prompt encoders of several adapters are present.
    """
    mapping: dict[str, str] = {}
    notes: list[str] = []
    ignored: list[str] = []
    adapters: set[str] = set()
    for original in names:
        key = original
        if key.startswith("base_model.model."):
            key = key[len("base_model.model.") :]
        if key.startswith("prompt_encoder."):
            rest = key[len("prompt_encoder.") :]
            adapter, _, key = rest.partition(".")
            adapters.add(adapter)
        if key == "embedding.weight":
            key = "prompt_embeddings"
        if key not in CANONICAL:
            ignored.append(original)
            continue
        if key in mapping:
            raise FormatError(f"keys {mapping[key]!r} and {original!r} both hold {key}", path)
        mapping[key] = original
        if original != key:
            notes.append(f"renamed {original!r} to {key!r}")
    if len(adapters) > 1:
        raise FormatError(
            f"holds the prompt encoders of several adapters ({', '.join(sorted(adapters))}); save one adapter per file",
            path,
        )
    return mapping, notes, ignored


def safetensors_parts(tensors: dict[str, Raw], metadata: dict[str, str] | None = None) -> list[bytes | memoryview]:
    """The safetensors serialisation of ``tensors`` as a list of buffers, without copying the data.

    Writing the parts in order (``file.writelines``) gives exactly :func:`safetensors_bytes`.
    """
    order = sorted(tensors, key=lambda k: (-DTYPES[tensors[k].dtype][0], k))
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    pos = 0
    chunks: list[bytes | memoryview] = []
    for name in order:
        raw = tensors[name]
        data = np.ascontiguousarray(raw.array).reshape(-1).view(np.uint8).data
        header[name] = {"dtype": raw.dtype, "shape": list(raw.shape), "data_offsets": [pos, pos + data.nbytes]}
        pos += data.nbytes
        chunks.append(data)
    blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    return [struct.pack("<Q", len(blob)) + blob, *chunks]


def safetensors_bytes(tensors: dict[str, Raw], metadata: dict[str, str] | None = None) -> bytes:
    """Serialise tensors to safetensors bytes, deterministically.

    Byte-identical to ``safetensors.torch.save_file`` for tensors of one dtype and a metadata of one
    key (what PEFT writes); metadata keys are sorted (safetensors itself orders them at random).
    Tensors are laid out by descending itemsize, then name, as safetensors does.
    """
    return b"".join(safetensors_parts(tensors, metadata))


def json_float(value: float) -> float | None:
    """A float for JSON output: NaN and infinities become None (null)."""
    return float(value) if np.isfinite(value) else None
