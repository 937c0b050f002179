"""The factor math of each target mode, bitwise identical to PEFT where PEFT defines it.

- average: ``cols.mean(0, keepdim=True)`` and ``rows.mean(0, keepdim=True)`` as torch computes them
  in the source dtype, then upcast to float32 (what PEFT's float32 parameters receive). By default
  numpy reproduces torch's reduction order bit for bit (:mod:`mpt_tools.torchmean`) without
  importing torch; torch itself computes it where that order is not proven (see
  :func:`average_engine`) or when asked (``engine="torch"``);
- exact: ``cols[k:k+1]``, ``rows[k:k+1]`` (numpy; only task k's bytes are read);
- shared: P* copied, factors drawn N(0, 0.02) from a seeded numpy generator.
Targets are float32, the dtype PEFT's prompt encoder holds.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from . import torchmean
from .checkpoint import Checkpoint
from .errors import ValidationError
from .formats import DTYPES, Raw, to_float32, to_torch

INIT_STD = 0.02
MAX_TARGET_ELEMENTS = 1 << 31
ENGINES = ("auto", "numpy", "torch")
FACTORS = ("prefix_task_cols", "prefix_task_rows")


def average_factors(
    ckpt: Checkpoint,
    tasks: list[int] | None = None,
    weights: list[float] | None = None,
    *,
    engine: str = "auto",
    threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the task factors as PEFT computes it (torch, source dtype), as float32 arrays.

    ``tasks`` restricts the mean to those tasks (in the given order); ``weights`` (one per task,
    non-negative) gives a weighted mean, computed in float64 and rounded once to float32.
    ``engine``: ``auto`` (numpy where it is proven bitwise torch's, torch elsewhere), ``numpy``
    or ``torch``. ``threads``: torch's thread count to reproduce (None: torch's default here);
    only the shapes of :func:`mpt_tools.torchmean.depends_on_threads` depend on it.
    """
    if engine not in ENGINES:
        raise ValidationError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if threads is not None and threads < 1:
        raise ValidationError(f"torch threads must be at least 1, not {threads}")
    infos = [ckpt.info(name) for name in FACTORS]
    out: list[np.ndarray | None] = [None, None]
    if engine != "torch":
        for i, (name, info) in enumerate(zip(FACTORS, infos, strict=True)):
            if info is None:
                continue
            shape = (len(tasks) if tasks is not None else info.shape[0], *info.shape[1:])
            use, count = average_engine(info.dtype, shape, weights is not None, threads)
            if use == "numpy" or (engine == "numpy" and info.dtype in torchmean.DTYPES):
                out[i] = _numpy_average(ckpt, name, tasks, weights, count or 1)
    missing = [i for i, o in enumerate(out) if o is None or (engine == "auto" and bool(np.isnan(o).any()))]
    if missing:
        with on_torch_threads(threads):
            for i in missing:
                out[i] = _torch_average(_selected(ckpt.map(FACTORS[i]), tasks), weights)
    cols, rows = out
    assert cols is not None and rows is not None
    return cols, rows


def average_engine(dtype: str, shape: tuple[int, ...], weighted: bool, threads: int | None) -> tuple[str, int | None]:
    """Which engine the ``auto`` average of a factor uses, and the thread count to reproduce:
    ``numpy`` on x86-64 for F32, F16, BF16 and F64, unless the shape's bits depend on torch's
    thread count and that count cannot be told without torch (then ``torch``)."""
    if dtype not in torchmean.DTYPES or not torchmean.order_reproduced():
        return "torch", threads
    if threads is not None:
        return "numpy", threads
    count = torchmean.torch_default_threads()
    if count is not None:
        return "numpy", count
    summed = "F64" if weighted else dtype  # a weighted mean sums float64 products
    if torchmean.may_depend_on_threads(shape, summed) or (weighted and shape[0] > torchmean.GRAIN_SIZE):
        # (the weights' own float64 sum splits over threads beyond 32768 tasks)
        return "torch", None
    return "numpy", 1


def _selected(raw: Raw, tasks: list[int] | None) -> Raw:
    """The factor restricted to ``tasks`` (in their order), as torch's ``index_select`` would."""
    if tasks is None:
        return raw
    array = np.ascontiguousarray(raw.array.reshape(raw.shape)[np.asarray(tasks, dtype=np.int64)])
    return Raw(raw.dtype, (len(tasks), *raw.shape[1:]), array)


def _numpy_average(
    ckpt: Checkpoint, name: str, tasks: list[int] | None, weights: list[float] | None, threads: int
) -> np.ndarray:
    """The numpy reproduction of :func:`_torch_average` (float32 result), reading the factor in
    chunks of tasks as it sums them: about 1 MB each, into one reused buffer, so that a chunk is
    still in the CPU's cache when it is summed (the file opened once for all of them)."""
    info = ckpt.info(name)
    assert info is not None
    inner = tuple(info.shape[1:])
    n = len(tasks) if tasks is not None else info.shape[0]
    c = math.prod(inner)
    if c == 1:  # one value per task: read it whole (the sum runs along it)
        raw = _selected(ckpt.map(name), tasks)
        if weights is None:
            return torchmean.mean0(raw.array.reshape(raw.shape), raw.dtype, threads).astype(np.float32)
        values = torchmean.float32_of(raw.array, raw.dtype).astype(np.float64, copy=False).reshape(n)
        total = torchmean.sum0(values * normalised_weights_numpy(weights, threads), threads)
        return total.reshape(1, *inner).astype(np.float32)
    w = None if weights is None else normalised_weights_numpy(weights, threads)
    summed = np.dtype(np.float64 if w is not None or info.dtype == "F64" else np.float32)
    storage = np.dtype(DTYPES[info.dtype][1])
    windows = torchmean.column_windows(n, c, storage.itemsize, _workers())

    with ckpt.row_reader(mapped=n * c * storage.itemsize >= torchmean.WINDOW_BYTES) as read_rows:

        def window(columns: tuple[int, int]) -> np.ndarray:
            lo, hi = columns
            width = hi - lo
            part = None if width == c else columns
            # a chunk read into the buffer (or converted, or weighted) is summed while in the cache;
            # a view of the mapping summed as it is has no copy to keep there: larger chunks, fewer calls
            mapped = getattr(read_rows, "mapped", False)
            direct = mapped and tasks is None and w is None and info.dtype in ("F32", "F64")
            per_chunk = MAPPED_CHUNK_BYTES if direct else torchmean.CHUNK_BYTES
            rows = torchmean.default_chunk_rows(width, summed.itemsize, per_chunk)
            step = torchmean.chunk_rows_of(n, c, summed, threads, rows)
            # (untouched pages of a large np.empty cost nothing: from a mapping it is used only
            # when the lease breaks, or for rows copied in task order)
            buffer = np.empty(min(step, n) * width, dtype=storage)

            def read(start: int, stop: int) -> np.ndarray:
                if tasks is None:  # a view of the leased mapping, or the rows read into buffer
                    got = buffer[: (stop - start) * width]
                    stored = read_rows(name, start, stop, out=got, columns=part).array
                else:
                    stored = buffer[: (stop - start) * width]
                    for i, task in enumerate(tasks[start:stop]):
                        row = stored[i * width : (i + 1) * width]
                        got_row = read_rows(name, task, task + 1, out=row, columns=part).array
                        if not np.may_share_memory(got_row, row):  # a view of the mapping
                            row[:] = got_row.reshape(-1)
                values = torchmean.float32_of(stored, info.dtype).reshape(stop - start, width)
                if w is None:
                    return values
                return values.astype(np.float64, copy=False) * w[start:stop, None]  # t.double() * w

            return torchmean.sum0_chunked(read, n, c, summed, threads, step, columns=columns)

        total = np.concatenate(_on_threads(window, windows))
    if w is not None:
        return total.reshape(1, *inner).astype(np.float32)
    return torchmean.mean_of_sum(total, n, info.dtype).reshape(1, *inner).astype(np.float32)


MAPPED_CHUNK_BYTES = 16 << 20
"""Rows a thread takes at a time from a leased mapping (views: no buffer to keep in cache)."""


def _on_threads(func: Callable[[Any], np.ndarray], items: list[Any]) -> list[np.ndarray]:
    """``[func(item) for item in items]``, the first on this thread and each other on a thread of
    its own (plain threads: ``concurrent.futures`` imports ``logging``, 10 ms of start-up); the
    first exception raised, after every thread has ended."""
    if len(items) == 1:
        return [func(items[0])]
    import threading

    results: list[Any] = [None] * len(items)
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            results[k] = func(items[k])
        except BaseException as exc:  # re-raised on the calling thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(1, len(items))]
    for thread in threads:
        thread.start()
    try:
        run(0)
    finally:
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]
    return results


def _workers() -> int:
    """The threads a large average's column windows are summed on: the cores this process may
    run on, at most 4 (the sum is bound by memory beyond that)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


def _torch_average(raw: Raw, weights: list[float] | None) -> np.ndarray:
    """Torch's own mean (or weighted mean) of a factor, as float32 (imports torch)."""
    t = to_torch(raw)
    if weights is None:
        mean = t.mean(0, keepdim=True)
    else:
        w = normalised_weights(weights)
        mean = (t.double() * w.view(-1, *([1] * (t.dim() - 1)))).sum(0, keepdim=True)
    return np.asarray(mean.float().numpy())


@contextmanager
def on_torch_threads(threads: int | None) -> Iterator[None]:
    """torch on ``threads`` threads inside the block (None: leave torch's setting alone)."""
    if threads is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _check_weights(weights: list[float]) -> None:
    if not weights or not all(math.isfinite(w) and w >= 0 for w in weights) or not max(weights) > 0:
        raise ValidationError("weights must be finite, non-negative, not all 0")


def normalised_weights_numpy(weights: list[float], threads: int = 1) -> np.ndarray:
    """:func:`normalised_weights` in numpy, bit for bit (torch's float64 sum order; no torch)."""
    _check_weights(weights)
    w = np.asarray(weights, dtype=np.float64)
    total = torchmean.sum0(w, threads)
    if not math.isfinite(float(total)):
        _, exponent = math.frexp(float(w.max()))
        w = np.ldexp(w, -exponent)
        total = torchmean.sum0(w, threads)
    return np.asarray(w / total, dtype=np.float64)


def normalised_weights(weights: list[float]) -> Any:
    """``w / w.sum()`` as a float64 torch tensor, as it always was computed, without overflow: when
    the sum overflows (``1e308, 1e308``: the quotient would be all zeros), the weights are first
    scaled by a power of two that brings the largest below 1 (exact, so the ratios are kept).
    Ordinary weights get bitwise the result of before. Raises ValidationError for weights that are
    not finite and non-negative with a positive sum (what the plan rules refuse first)."""
    import torch

    w = torch.tensor(weights, dtype=torch.float64)
    if w.numel() == 0 or not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or not float(w.max()) > 0:
        raise ValidationError("weights must be finite, non-negative, not all 0")
    total = w.sum()
    if not bool(torch.isfinite(total)):
        _, exponent = math.frexp(float(w.max()))
        w = torch.ldexp(w, torch.tensor(-exponent, dtype=torch.float64))
        total = w.sum()
    return w / total


def exact_factors(ckpt: Checkpoint, task: int) -> tuple[np.ndarray, np.ndarray]:
    """Task ``task``'s factors (``[k:k+1]``) as float32, reading only that task's bytes."""
    cols = to_float32(ckpt.read_rows("prefix_task_cols", task, task + 1))
    rows = to_float32(ckpt.read_rows("prefix_task_rows", task, task + 1))
    return np.ascontiguousarray(cols), np.ascontiguousarray(rows)


def random_factors(
    seed: int, num_tasks: int, total_tokens: int, num_ranks: int, token_dim: int
) -> tuple[np.ndarray, np.ndarray]:
    """Fresh N(0, 0.02) factors from a numpy generator seeded with ``seed``."""
    size = num_tasks * num_ranks * (total_tokens + token_dim)
    if size > MAX_TARGET_ELEMENTS:
        raise ValidationError(f"a target of {num_tasks} tasks x rank {num_ranks} needs {size} values; refusing")
    rng = np.random.default_rng(seed)
    cols = rng.normal(0.0, INIT_STD, size=(num_tasks, total_tokens, num_ranks)).astype(np.float32)
    rows = rng.normal(0.0, INIT_STD, size=(num_tasks, num_ranks, token_dim)).astype(np.float32)
    return cols, rows
