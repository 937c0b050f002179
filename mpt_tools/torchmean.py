"""Torch's CPU ``mean(0, keepdim=True)`` and ``sum(0)``, reproduced bit for bit in numpy.

PEFT's average target is ``t.mean(0, keepdim=True)`` in the source dtype, and float addition is
not associative, so the bits depend on torch's reduction order. On x86-64 that order is the one of
ATen's ``aten/src/ATen/native/cpu/SumKernel.cpp`` (``cascade_sum``), which this module follows:

- ``mean`` of float32/float64 is ``sum(0) / N`` in that dtype; of float16/bfloat16 the input is first
  cast to float32 (exact), summed and divided in float32, then rounded once to the source dtype
  (round to nearest even);
- the sum views the tensor as ``[N, C]`` (C = the product of the other sizes). For C > 1 each
  column is summed by one of two orders: the *plain cascade* (``multi_row_sum``: sequential sums
  of blocks of ``2**p`` rows, p = max(4, ceil(log2 N) // 4), carried into up to four levels) for
  the columns in groups of 4 vectors (32 float32 / 16 float64 columns from the chunk's start, or
  groups of 4 columns when a chunk is narrower than a vector), and the *interleaved* order
  (``row_sum``: four plain cascades over rows k, k+4, k+8, ..., then the leftover rows, then the
  four partial sums) for the rest. For C == 1 the sum runs along the contiguous axis in vectors
  of 8 (4 for float64), with a scalar tail;
- a reduction of at least 32768 elements on several threads is split: over the columns (chunk
  borders rounded to 128 bytes) for C > 1, and over N in two passes for C == 1. Only the
  thread-sensitive shapes (see :func:`depends_on_threads`) give other bits on other thread counts.

Vectors are 8 float32 (4 float64) lanes in every x86-64 kernel (DEFAULT, AVX2; the sum has no
AVX512 kernel). Only numpy's elementwise ``np.add`` (IEEE, one rounding per add) is used, in the
exact order above; never ``np.sum`` (pairwise). NaN results are not reproduced (their payloads
differ between kernels): callers use torch for them. Imports numpy and the standard library only.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from .errors import ValidationError

GRAIN_SIZE = 32768  # at::internal::GRAIN_SIZE: smaller reductions never run on several threads
ROUND_BYTES = 128  # parallel_dim_reduction rounds column chunks to multiples of 128 bytes
LEVELS = 4  # multi_row_sum's num_levels
ILP = 4  # row_sum's ilp_factor (and scalar_outer_sum's nrows)
CHUNK_BYTES = 1 << 20  # what sum0_chunked reads at a time by default (see default_chunk_rows)
DTYPES = ("F32", "F16", "BF16", "F64")  # the dtypes whose mean is reproduced
X86_64 = ("x86_64", "amd64", "x64")


def _lanes(dtype: np.dtype) -> int:
    return 32 // dtype.itemsize  # Vectorized<float> is 8 wide, Vectorized<double> 4 (256 bits)


def _ceil_log2(n: int) -> int:
    return 1 if n <= 2 else (n - 1).bit_length()


def _sequential(groups: np.ndarray) -> np.ndarray:
    """``groups`` [m, k, ...] -> [m, ...]: each group summed one element at a time from +0."""
    acc = np.zeros((groups.shape[0], *groups.shape[2:]), groups.dtype)
    for j in range(groups.shape[1]):
        np.add(acc, groups[:, j], out=acc)
    return acc


def _levels(values: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Sequential sums of the complete groups of ``step`` values, and that of the rest."""
    full = values.shape[0] // step
    sums = _sequential(values[: full * step].reshape(full, step, *values.shape[1:]))
    rest = _sequential(values[full * step :][None])[0]
    return sums, rest


def multi_row_sum(x: np.ndarray) -> np.ndarray:
    """ATen's ``multi_row_sum`` along axis 0 of ``x`` [n, ...]: the plain cascade, as an array [...]."""
    n = x.shape[0]
    power = max(4, _ceil_log2(n) // LEVELS)
    step = 1 << power
    blocks, acc0 = _levels(x, step)  # acc[0] ends with the rows after the last full block
    carried1, acc1 = _levels(blocks, step)  # acc[1] is emptied into acc[2] every step blocks
    carried2, acc2 = _levels(carried1, step)  # and acc[2] into acc[3] every step**2
    acc3 = _sequential(carried2[None])[0]  # acc[3] is never emptied
    for acc in (acc1, acc2, acc3):
        np.add(acc0, acc, out=acc0)
    return acc0


def row_sum(x: np.ndarray) -> np.ndarray:
    """ATen's ``row_sum`` along axis 0 of ``x`` [n, w]: four interleaved cascades, then the rest."""
    n = x.shape[0]
    size = n // ILP
    partial = multi_row_sum(x[: size * ILP].reshape(size, ILP, *x.shape[1:]))
    acc = partial[0].copy()
    for i in range(size * ILP, n):
        np.add(acc, x[i], out=acc)
    for k in range(1, ILP):
        np.add(acc, partial[k], out=acc)
    return acc


def _inner_sum(x: np.ndarray) -> np.ndarray:
    """The sum of a contiguous 1-D ``x`` (ATen's ``vectorized_inner_sum``), as a 0-d array."""
    lanes = _lanes(x.dtype)
    n = x.shape[0]
    if n < lanes:
        return row_sum(x.reshape(n, 1))[0]
    vecs = n // lanes
    vec = row_sum(x[: vecs * lanes].reshape(vecs, lanes))
    acc = np.zeros((), x.dtype)
    for k in range(vecs * lanes, n):
        np.add(acc, x[k], out=acc)
    for k in range(lanes):
        np.add(acc, vec[k], out=acc)
    return acc


def _plain_columns(c: int, chunks: Sequence[tuple[int, int]], lanes: int) -> list[tuple[int, int]]:
    """The column runs summed by the plain cascade; the others are summed by ``row_sum``."""
    runs: list[tuple[int, int]] = []
    for begin, end in chunks:
        width = end - begin
        group = ILP * lanes if width >= lanes else ILP  # vectorized_outer_sum or scalar_outer_sum
        stop = begin + width // group * group
        if stop > begin:
            if runs and runs[-1][1] == begin:
                runs[-1] = (runs[-1][0], stop)
            else:
                runs.append((begin, stop))
    return runs


def _column_chunks(n: int, c: int, threads: int, itemsize: int) -> list[tuple[int, int]]:
    """The column ranges torch's threads sum (``parallel_dim_reduction``), in order."""
    if n * c < GRAIN_SIZE or threads <= 1 or c <= 1:
        return [(0, c)]
    used = min(threads, c)
    size = -(-c // used)
    multiple = ROUND_BYTES // itemsize
    chunks = []
    for tid in range(used):
        begin = tid * size
        if begin >= c:
            break
        end = min(c, begin + size)
        begin -= begin % multiple
        if end != c:
            end -= end % multiple
        if begin != end:
            chunks.append((begin, end))
    return chunks


def _row_chunks(n: int, threads: int) -> list[tuple[int, int]] | None:
    """For C == 1: the row ranges of torch's two-pass reduction, or None when it runs serially."""
    if n <= GRAIN_SIZE or threads <= 1:
        return None
    used = min(threads, -(-n // GRAIN_SIZE))
    size = -(-n // used)
    return [(b, min(n, b + size)) for b in range(0, n, size)][:used]


def depends_on_threads(shape: Sequence[int], threads: int, dtype: str = "F32") -> bool:
    """Whether torch's ``sum(0)``/``mean(0)`` of a tensor of ``shape`` on ``threads`` threads may
    give other bits than on one thread. True only for C == 1 with N > 32768, and (float32 and the
    half types) for C >= 36 with a last column chunk 4 to 7 wide, when N * C >= 32768."""
    n, c = int(shape[0]), int(np.prod(shape[1:], dtype=np.int64))
    itemsize = 8 if dtype == "F64" else 4
    lanes = 32 // itemsize
    if c == 1:
        return _row_chunks(n, threads) is not None
    one = _plain_columns(c, [(0, c)], lanes)
    return _plain_columns(c, _column_chunks(n, c, threads, itemsize), lanes) != one


def may_depend_on_threads(shape: Sequence[int], dtype: str = "F32") -> bool:
    """Whether :func:`depends_on_threads` is true for some thread count: C == 1 with N > 32768,
    or (not F64) C >= 36 with C mod 32 in 4..7 and N * C >= 32768."""
    n, c = int(shape[0]), int(np.prod(shape[1:], dtype=np.int64))
    if n * c < GRAIN_SIZE:
        return False
    if c == 1:
        return n > GRAIN_SIZE
    return dtype != "F64" and c >= 36 and 4 <= c % 32 <= 7


def sum0(x: np.ndarray, threads: int = 1) -> np.ndarray:
    """torch's ``x.sum(0)`` of a C-contiguous float32 or float64 array ``x`` [N, ...] on ``threads``
    threads, bit for bit (x86-64 order), with the shape ``x.shape[1:]``."""
    if x.dtype not in (np.float32, np.float64):
        raise ValidationError(f"sum0 takes float32 or float64, not {x.dtype}")
    if x.ndim == 0 or x.shape[0] == 0:
        raise ValidationError("sum0 needs at least one row")
    with np.errstate(over="ignore", invalid="ignore"):  # Inf and Inf - Inf are torch's results too
        return _sum0(x, threads)


def _sum0(x: np.ndarray, threads: int) -> np.ndarray:
    n = x.shape[0]
    c = int(np.prod(x.shape[1:], dtype=np.int64))
    flat = np.ascontiguousarray(x).reshape(n, c)
    if c == 1:
        return _sum_column(flat[:, 0], threads).reshape(x.shape[1:])
    return sum0_chunked(lambda a, b: flat[a:b], n, c, x.dtype, threads).reshape(x.shape[1:])


def _sum_column(x: np.ndarray, threads: int) -> np.ndarray:
    """C == 1: the sum along the contiguous axis, in two passes when torch splits it over threads."""
    zero = np.zeros((), x.dtype)
    rows = _row_chunks(x.shape[0], threads)
    if rows is None:
        return np.add(zero, _inner_sum(x))
    buffer = np.zeros(threads, x.dtype)  # one partial per thread (the others stay 0), then their sum
    for tid, (begin, end) in enumerate(rows):
        buffer[tid] = np.add(zero, _inner_sum(x[begin:end]))
    return np.add(zero, _inner_sum(buffer))


def _chunks(
    read: Callable[[int, int], np.ndarray], n: int, size: int, prefetch: bool
) -> Iterator[tuple[int, int, np.ndarray]]:
    """(start, stop, rows) of each chunk of ``size`` rows, in order; read one ahead on a thread."""
    ranges = [(start, min(n, start + size)) for start in range(0, n, size)]
    if not prefetch or len(ranges) < 2:
        for start, stop in ranges:
            yield start, stop, read(start, stop)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(read, *ranges[0])
        for k, (start, stop) in enumerate(ranges):
            rows = pending.result()
            if k + 1 < len(ranges):
                pending = pool.submit(read, *ranges[k + 1])
            yield start, stop, rows


class Cascade:
    """:func:`multi_row_sum` fed in order, any number of items at a time: ATen's loop as a state
    machine (four level accumulators and the item count), so a tensor can be summed in chunks of
    rows read one after another. ``items`` has the shape [m, *item_shape]."""

    def __init__(self, size: int, item_shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.power = max(4, _ceil_log2(size) // LEVELS)
        self.step = 1 << self.power
        self.mask = self.step - 1
        self.acc = [np.zeros(item_shape, dtype) for _ in range(LEVELS)]
        self.count = 0

    def _carry(self, first: int) -> None:
        """After a full block: ``acc[j] += acc[j-1]; acc[j-1] = 0`` from level ``first``, up the
        levels while the item count is a multiple of the level's span."""
        acc = self.acc
        for j in range(first, LEVELS):
            np.add(acc[j], acc[j - 1], out=acc[j])
            acc[j - 1].fill(0)
            if self.count & (self.mask << (j * self.power)):
                break

    def feed(self, items: np.ndarray) -> None:
        """Add the next items, in order."""
        acc0, step = self.acc[0], self.step
        k, m = 0, items.shape[0]
        while k < m and self.count % step:  # finish a block begun by the previous chunk
            np.add(acc0, items[k], out=acc0)
            k += 1
            self.count += 1
            if self.count % step == 0:
                self._carry(1)
        full = (m - k) // step
        if full:
            sums = _sequential(items[k : k + full * step].reshape(full, step, *items.shape[1:]))
            for block in sums:  # acc[0] is 0 here: acc[1] += the block's sum, then carry up
                self.count += step
                np.add(self.acc[1], block, out=self.acc[1])
                if not self.count & (self.mask << self.power):
                    self._carry(2)
            k += full * step
        for i in range(k, m):  # a block the next chunk (or the tail) completes
            np.add(acc0, items[i], out=acc0)
            self.count += 1
            if self.count % step == 0:
                self._carry(1)

    def result(self) -> np.ndarray:
        """``acc[0] + acc[1] + acc[2] + acc[3]``, in that order."""
        out = self.acc[0].copy()
        for acc in self.acc[1:]:
            np.add(out, acc, out=out)
        return out


def _runs(n: int, c: int, threads: int, dtype: np.dtype) -> list[tuple[int, int, bool]]:
    """The column runs ``(begin, end, cascade)`` of an [n, c] sum, in order: ``cascade`` for the
    plain cascade (``multi_row_sum``), else ``row_sum``."""
    plain = _plain_columns(c, _column_chunks(n, c, threads, dtype.itemsize), _lanes(dtype))
    edges = [0, *[e for run in plain for e in run], c]
    return [(edges[i], edges[i + 1], i % 2 == 1) for i in range(len(edges) - 1) if edges[i] < edges[i + 1]]


def chunk_rows_of(n: int, c: int, dtype: np.dtype, threads: int = 1, chunk_rows: int = 0) -> int:
    """The rows :func:`sum0_chunked` reads at a time: ``chunk_rows`` (0: :func:`default_chunk_rows`),
    rounded down to a multiple of 4 (at least 4) when some columns are summed by ``row_sum``, which
    takes rows in groups of 4; any number when all are summed by the plain cascade."""
    dtype = np.dtype(dtype)
    rows = chunk_rows if chunk_rows > 0 else default_chunk_rows(c, dtype.itemsize)
    if all(cascade for _, _, cascade in _runs(n, c, threads, dtype)):
        return rows
    return max(ILP, rows - rows % ILP)


def sum0_chunked(
    read: Callable[[int, int], np.ndarray],
    n: int,
    c: int,
    dtype: np.dtype,
    threads: int = 1,
    chunk_rows: int = 0,
    prefetch: bool = False,
    columns: tuple[int, int] | None = None,
) -> np.ndarray:
    """torch's ``sum(0)`` of an [n, c] float32/float64 tensor (c > 1) whose rows ``read(start, stop)``
    returns as a C-contiguous [stop - start, c] array, read :func:`chunk_rows_of` ``(n, c, dtype,
    threads, chunk_rows)`` rows at a time, in order. Bit for bit :func:`sum0`, whatever the
    chunking. With ``prefetch``, the next chunk is read on a second thread while one is summed:
    ``read`` must then not reuse the memory of the chunk before the one it reads (two buffers,
    alternating, suffice).

    ``columns=(lo, hi)``: only those columns of the sum, bit for bit the same slice of the whole
    (every column is summed on its own; which of torch's two loops sums it is taken from the whole
    [n, c] shape): ``read`` returns [stop - start, hi - lo] and so does the result. Windows that
    cover the columns can be summed on several threads (see :func:`column_windows`)."""
    dtype = np.dtype(dtype)
    lo, hi = columns if columns is not None else (0, c)
    runs = [(max(b, lo) - lo, min(e, hi) - lo, cascade) for b, e, cascade in _runs(n, c, threads, dtype)]
    runs = [(b, e, cascade) for b, e, cascade in runs if b < e]
    chunk_rows = chunk_rows_of(n, c, dtype, threads, chunk_rows)
    c = hi - lo
    grouped = n // ILP * ILP  # row_sum: rows in groups of 4 (one item each), then the rest one by one
    cascades = [
        Cascade(n if cascade else n // ILP, (e - b,) if cascade else (ILP, e - b), dtype) for b, e, cascade in runs
    ]
    rest: list[np.ndarray] = []
    with np.errstate(over="ignore", invalid="ignore"):
        for start, stop, rows in _chunks(read, n, chunk_rows, prefetch):
            whole = max(0, min(stop, grouped) - start)
            for (b, e, cascade), state in zip(runs, cascades, strict=True):
                if cascade:
                    state.feed(rows[:, b:e])
                elif whole:
                    state.feed(rows[:whole, b:e].reshape(whole // ILP, ILP, e - b))
            if stop > grouped:
                rest += [rows[i - start].copy() for i in range(max(start, grouped), stop)]
        out = np.empty(c, dtype)
        for (b, e, cascade), state in zip(runs, cascades, strict=True):
            if cascade:
                out[b:e] = state.result()
                continue
            partial = state.result()
            acc = partial[0].copy()
            for row in rest:
                np.add(acc, row[b:e], out=acc)
            for k in range(1, ILP):
                np.add(acc, partial[k], out=acc)
            out[b:e] = acc
        np.add(out, dtype.type(0), out=out)  # the output starts at +0 and is added to (-0 becomes +0)
    return out


def float32_of(raw: np.ndarray, dtype: str) -> np.ndarray:
    """The float32 (or float64 for F64) values of stored data: bf16 as raw uint16 patterns."""
    if dtype == "BF16":
        return (np.ascontiguousarray(raw).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if dtype == "F64":
        return np.ascontiguousarray(raw, dtype=np.float64)
    return raw.astype(np.float32, copy=False)  # float32 as stored: no copy (a strided view stays one)


def round_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even as torch does (not NaN)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    bias = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    return ((bits + bias) >> 16).astype(np.uint16)


def mean0(raw: np.ndarray, dtype: str, threads: int = 1) -> np.ndarray:
    """torch's ``t.mean(0, keepdim=True).float()`` for a tensor stored as ``raw`` [N, ...] with
    safetensors dtype tag ``dtype`` (F32, F16, BF16 as uint16 patterns, F64), bit for bit.

    The result is float32 [1, ...] (float64 for F64). NaN results are the caller's to refuse."""
    if dtype not in DTYPES:
        raise ValidationError(f"no numpy mean for dtype {dtype}")
    values = float32_of(raw, dtype).reshape(raw.shape)
    return mean_of_sum(sum0(values, threads), int(raw.shape[0]), dtype).reshape(1, *raw.shape[1:])


def mean_of_sum(total: np.ndarray, n: int, dtype: str) -> np.ndarray:
    """torch's mean from its float32 (float64 for F64) sum of ``n`` rows: ``sum / N`` in that
    dtype, then for F16 and BF16 rounded once to the source dtype (nearest even) and upcast."""
    with np.errstate(over="ignore", invalid="ignore"):
        mean = np.divide(total, total.dtype.type(n), dtype=total.dtype)  # sum(0).div_(N), in float32
        if dtype == "F16":
            mean = mean.astype(np.float16).astype(np.float32)
        elif dtype == "BF16":
            mean = (round_bf16(mean).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(mean)


WINDOW_BYTES = 64 << 20
"""A chunked sum over at least this many bytes is split into column windows summed on threads."""


def column_windows(n: int, c: int, itemsize: int, workers: int) -> list[tuple[int, int]]:
    """Column windows ``(lo, hi)`` covering ``range(c)`` for :func:`sum0_chunked`'s ``columns``:
    one per worker (at most ``workers``, each at least 16 columns wide, widths multiples of 16 but
    the last) when the [n, c] sum is at least :data:`WINDOW_BYTES`, else the whole. The result is
    the same bits however the columns are split; what the split buys is the read (a page-cache
    copy) and the sum on several cores (1000 x 131072 float32 on 2 cores: 0.25 s to 0.13 s)."""
    count = max(1, min(workers, c // 16)) if n * c * itemsize >= WINDOW_BYTES else 1
    if count == 1:
        return [(0, c)]
    width = ((c + count - 1) // count + 15) // 16 * 16
    edges = [min(c, k * width) for k in range(count)] + [c]
    return [(edges[k], edges[k + 1]) for k in range(count) if edges[k] < edges[k + 1]]


def default_chunk_rows(c: int, itemsize: int, chunk_bytes: int = 0) -> int:
    """The rows :func:`sum0_chunked` reads at a time by default: about ``CHUNK_BYTES`` (or
    ``chunk_bytes``; at least
    one row; a multiple of 64 from 64 rows on, so that most of the cascade's blocks of rows are
    summed a block at a time). Read into one reused buffer, a chunk this small is still in the
    core's cache when it is summed (on a 2-core Xeon, 8 MB chunks read one ahead on a second thread
    took 1.4-1.8x as long)."""
    rows = max(1, (chunk_bytes or CHUNK_BYTES) // max(1, c * itemsize))
    return rows // 64 * 64 if rows >= 64 else rows


# --- torch's thread count, without torch -------------------------------------------------------


_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
# variables that change the count in ways not modelled here: with any of them set, ask torch
_UNMODELLED = (
    "MKL_DYNAMIC",
    "MKL_DOMAIN_NUM_THREADS",
    "OMP_DYNAMIC",
    "OMP_THREAD_LIMIT",
    "KMP_ALL_THREADS",
    "KMP_DEVICE_THREAD_LIMIT",
    "KMP_TEAMS_THREAD_LIMIT",
    "OMP_MAX_ACTIVE_LEVELS",
)


def _env_threads(name: str) -> int | bool | None:
    """A thread variable: its count, None when unset, False when set to anything but a plain count."""
    value = os.environ.get(name)
    if value is None:
        return None
    text = value.strip()
    return int(text) if text.isdigit() and 0 < int(text) < 4096 else False


def _cpu_list(text: str) -> set[int]:
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if part:
            low, _, high = part.partition("-")
            cpus.update(range(int(low), int(high or low) + 1))
    return cpus


def _physical_cores() -> int | None:
    """The physical cores of this machine, from sysfs; None when sysfs cannot tell or when this
    process may not run on all of them (an affinity mask: then the count is the libraries' guess)."""
    base = "/sys/devices/system/cpu"
    try:
        with open(f"{base}/possible") as f, open(f"{base}/present") as g:
            cpus = _cpu_list(f.read()) & _cpu_list(g.read())
        with open(f"{base}/online") as f:
            online = _cpu_list(f.read())
        cores = set()
        for cpu in cpus:
            with open(f"{base}/cpu{cpu}/topology/thread_siblings_list") as f:
                cores.add(frozenset(_cpu_list(f.read())))
        allowed = os.sched_getaffinity(0)
    except (OSError, ValueError, AttributeError):
        return None
    if not cpus or online != cpus or set(allowed) != cpus:
        return None
    return len(cores)


def torch_default_threads() -> int | None:
    """The thread count torch would use here (``torch.get_num_threads()``), or None when it cannot
    be told without torch. torch's own answer when torch is already imported. Otherwise the rule
    of the x86-64 Linux wheels, which take MKL's count (``omp_set_num_threads(mkl_get_max_threads())``):
    MKL_NUM_THREADS, else OMP_NUM_THREADS, else the physical cores, never more than the physical
    cores (MKL_DYNAMIC). None on other systems, under an affinity mask, and when a thread variable
    is not a plain count or one that this rule does not model is set: the caller then asks torch."""
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "get_num_threads"):
        return int(torch.get_num_threads())
    if not sys.platform.startswith("linux") or any(k in os.environ for k in _UNMODELLED):
        return None
    cores = _physical_cores()
    asked = [_env_threads(k) for k in _THREAD_VARIABLES]
    if cores is None or False in asked:
        return None
    omp, mkl = asked
    return min(int(mkl or omp or cores), cores)


def order_reproduced() -> bool:
    """Whether this platform sums in the order reproduced here (x86-64: 8 float32 lanes)."""
    return platform.machine().lower() in X86_64
