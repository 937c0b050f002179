"""Tensor files: a bounds-checked safetensors reader with slice access, weights-only pickle
loading, key normalisation, a deterministic safetensors writer and atomic writes.

Arrays are numpy; bfloat16 data is carried as raw ``uint16`` words with the dtype tag "BF16"
(numpy has no bfloat16), and converted exactly to float32 or to torch where needed.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import FormatError

CANONICAL = ("prompt_embeddings", "prefix_task_cols", "prefix_task_rows")
MAX_HEADER = 100_000_000  # the limit of safetensors' own parser

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
DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
# what a user may write for the three dtypes adapters are trained in (also fp16, half, torch.bfloat16, ...)
DTYPE_CHOICES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def canonical_dtype(text: str) -> str:
    """``float32``, ``bfloat16`` or ``float16`` for a dtype name or alias (``fp16``, ``half``,
    ``torch.bfloat16``, any case); other text comes back lower-cased, for the caller to refuse."""
    key = text.strip().lower().removeprefix("torch.")
    return _DTYPE_ALIASES.get(key, key)


@dataclass
class Raw:
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


@dataclass
class TensorInfo:
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

    def read(self, name: str) -> Raw:
        """Read one whole tensor."""
        info = self.infos[name]
        first = info.shape[0] if info.shape else 1
        return self.read_rows(name, 0, first)

    def map(self, name: str) -> Raw:
        """One whole tensor, memory-mapped (private copy-on-write) rather than read into new memory.

        For large reductions (the average): the page cache's pages back the array, so nothing is
        copied or zero-filled, and writes to the array never reach the file. The file's size is
        checked against the header before mapping. Falls back to :meth:`read` for pickles, empty
        tensors and platforms without mmap.
        """
        info = self.infos[name]
        if name in self._loaded or not info.shape or info.nbytes == 0:
            return self.read(name)
        itemsize, storage = DTYPES[info.dtype]
        try:
            with open(self.path, "rb") as fh:
                if os.fstat(fh.fileno()).st_size < info.start + info.nbytes:
                    raise FormatError(f"file ended inside tensor {name!r} (truncated?)", self.path)
                mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        except (OSError, ValueError, AttributeError):
            return self.read(name)
        self.reads.append((name, 0, info.shape[0], info.nbytes))
        arr = np.frombuffer(mapped, dtype=storage, count=info.nbytes // itemsize, offset=info.start)
        return Raw(info.dtype, tuple(info.shape), arr.reshape(info.shape))

    def read_rows(self, name: str, start: int, stop: int, *, out: Any = None) -> Raw:
        """Read rows ``start:stop`` of a tensor's first dimension (only those bytes).

        ``out``, a writable buffer of at least the rows' size (e.g. a pinned host tensor's numpy
        view), receives the bytes straight from the file, with no zero-filled or intermediate
        copy; the returned array is a view of it. Large reads are split over threads.
        """
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
        try:
            got = read_into(self.path, data, offset)
        except OSError as exc:
            raise FormatError(f"cannot read tensor {name!r}: {exc.strerror or exc}", self.path) from None
        if got != nbytes:
            raise FormatError(f"file ended inside tensor {name!r} (truncated?)", self.path)
        arr = np.frombuffer(data, dtype=storage, count=count).reshape(shape)
        return Raw(info.dtype, shape, arr)


READ_PIECE = 8 << 20  # bytes per thread of a parallel read
READ_THREADS = max(1, min(8, os.cpu_count() or 1))


def read_into(path: str | os.PathLike[str], buffer: Any, offset: int) -> int:
    """Fill the writable ``buffer`` with the file's bytes from ``offset``; the bytes read (fewer
    only when the file ends first). Reads over ``READ_PIECE`` are split in pieces read by up to
    ``READ_THREADS`` threads with ``os.preadv`` (which releases the GIL): a page-cache read is a
    memory copy, and one core does not saturate memory bandwidth."""
    view = memoryview(buffer).cast("B")
    size = view.nbytes
    with open(path, "rb", buffering=0) as fh:
        preadv = getattr(os, "preadv", None)
        if preadv is None:  # platforms without preadv: one sequential read
            fh.seek(offset)
            return _read_fully(lambda v, _pos: fh.readinto(v), view, 0)
        fd = fh.fileno()
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
    override = os.environ.get("MPT_TOOLS_MAX_TENSOR_BYTES")
    if override:
        return int(override)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 1 << 40


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def open_safetensors(path: str | os.PathLike[str]) -> TensorFile:
    """Parse and check a safetensors header without reading any tensor data.

    Checks everything safetensors' own parser checks (header length and size limit, UTF-8 JSON
    object, known dtypes, shapes matching byte ranges, contiguous non-overlapping offsets covering
    the data exactly) and raises FormatError naming the first problem.
    """
    p = str(path)
    try:
        with open(p, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(8)
            if len(head) < 8:
                raise _fail(p, f"the file is {size} bytes, too short for a header")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER:
                raise _fail(p, f"header claims {n} bytes, over the {MAX_HEADER}-byte limit")
            if 8 + n > size:
                raise _fail(p, f"header claims {n} bytes but the file has {size - 8} after the length (truncated?)")
            blob = fh.read(n)
    except OSError as exc:
        raise FormatError(f"cannot read file: {exc.strerror or exc}", p) from None
    try:
        header = json.loads(blob.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError:
        raise _fail(p, "header is not UTF-8") from None
    except _DuplicateKey as exc:
        raise _fail(p, f"header names {exc.args[0]!r} twice") from None
    except (ValueError, RecursionError):
        raise _fail(p, "header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _fail(p, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _fail(p, "__metadata__ must map strings to strings")
    data_len = size - 8 - n
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise _fail(p, f"entry {name!r} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise _fail(p, f"tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
        ):
            raise _fail(p, f"tensor {name!r} has an invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
            or offsets[1] < offsets[0]
        ):
            raise _fail(p, f"tensor {name!r} has invalid data_offsets {offsets!r}")
        want = math.prod(shape) * DTYPES[dtype][0]
        if offsets[1] - offsets[0] != want:
            raise _fail(
                p,
                f"tensor {name!r} of shape {shape} {dtype} needs {want} bytes but its offsets span "
                f"{offsets[1] - offsets[0]}",
            )
        infos[name] = TensorInfo(name, dtype, tuple(shape), 8 + n + offsets[0], 8 + n + offsets[1])
    limit = memory_limit()
    for info in infos.values():
        if info.nbytes > limit:
            raise FormatError(
                f"tensor {info.name!r} claims {info.nbytes:,} bytes, more than this machine's memory "
                f"({limit:,} bytes); refusing before reading it",
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
    return TensorFile(p, "safetensors", infos, dict(metadata), size)


_TORCH_MSG = re.compile(r"(Unsupported global: [^\n]*?)(?: was not an allowed global|\.|\n|$)")


def open_pickle(path: str | os.PathLike[str]) -> TensorFile:
    """Load a PyTorch pickle (.bin/.pt/.pth) with ``weights_only=True`` (imports torch).

    Only a flat mapping of names to tensors is accepted; code, other objects and nested
    wrappers are refused without executing anything.
    """
    import torch

    p = str(path)
    try:
        size = os.stat(p).st_size
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise FormatError(f"cannot read file: {exc.strerror or exc}", p) from None
    except Exception as exc:  # torch raises many types for hostile or corrupt pickles
        text = str(exc)
        found = _TORCH_MSG.search(text)
        if found:
            why = f"refused to unpickle it ({found.group(1).strip()}); it holds more than tensors"
        elif "zip" in text.lower() or "archive" in text.lower() or "central directory" in text.lower():
            why = "not a readable PyTorch file (corrupt or truncated zip archive)"
        else:
            first = text.strip().splitlines()[0][:160] if text.strip() else type(exc).__name__
            why = f"not a readable weights-only PyTorch file ({first})"
        raise FormatError(why, p) from None
    if not isinstance(obj, dict):
        raise FormatError(f"holds a {type(obj).__name__}, not a mapping of names to tensors", p)
    loaded: dict[str, Raw] = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise FormatError(f"holds a non-string key {key!r}", p)
        if isinstance(value, dict):
            raise FormatError(f"tensors are nested under {key!r}; save the inner state dict itself", p)
        if not isinstance(value, torch.Tensor):
            raise FormatError(f"entry {key!r} is a {type(value).__name__}, not a tensor", p)
        loaded[key] = from_torch(value)
    infos = {k: TensorInfo(k, r.dtype, r.shape, 0, r.nbytes) for k, r in loaded.items()}
    return TensorFile(p, "pickle", infos, {}, size, _loaded=loaded)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
TENSOR_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)  # every tensor file mpt-tools reads


def open_tensor_file(path: str | os.PathLike[str]) -> TensorFile:
    """Open a tensor file by its suffix: ``.safetensors`` or a PyTorch pickle suffix."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        return open_safetensors(p)
    if suffix in PICKLE_SUFFIXES:
        return open_pickle(p)
    # Unknown suffix: sniff. A safetensors file starts with a small little-endian header length.
    try:
        with open(p, "rb") as fh:
            head = fh.read(10)
    except OSError as exc:
        raise FormatError(f"cannot read file: {exc.strerror or exc}", str(p)) from None
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return open_pickle(p)
    if len(head) >= 9 and head[8:9] == b"{":
        return open_safetensors(p)
    raise FormatError("unknown file type: expected .safetensors, .bin, .pt or .pth", str(p))


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
