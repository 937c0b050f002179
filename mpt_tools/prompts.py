"""Chunks of whole tasks and the prompt math ``P_k = P* * (U_k @ V_k)`` on the host (numpy)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from .checkpoint import Checkpoint
from .formats import DTYPES, Raw

CHUNK_BYTES = 64 << 20
"""The default bound on one chunk of tasks on the host: what a scan, a norm or a diff holds at once."""
MAX_TASK_ROWS = 10_000
"""The most per-task rows a report lists (``inspect``'s norms, ``diff``'s prompt differences):
beyond it a report keeps the first rows and sums up every task, so a header that claims millions
of tasks costs no memory per task."""


def plan_chunks(bytes_per_item: int, budget: int) -> int:
    """How many items (tasks, rows) one chunk holds so that it takes at most ``budget`` bytes,
    at ``bytes_per_item`` each; never fewer than one. The one chunk planner of mpt-tools."""
    return max(1, budget // max(1, bytes_per_item))


def task_runs(tasks: list[int], step: int) -> list[tuple[int, int]]:
    """Split task indices, in their order, into runs ``(start, stop)`` of consecutive tasks, each
    at most ``step`` long, so that each run is read from the file in one piece."""
    runs: list[tuple[int, int]] = []
    for k in tasks:
        if runs and runs[-1][1] == k and k - runs[-1][0] < step:
            runs[-1] = (runs[-1][0], k + 1)
        else:
            runs.append((k, k + 1))
    return runs


def iter_task_chunks(ckpt: Checkpoint, name: str, max_bytes: int = CHUNK_BYTES) -> Iterator[tuple[int, int, Raw]]:
    """Yield ``(start, stop, raw)`` over a factor tensor in chunks of whole tasks, each at most
    ``max_bytes`` (at least one task)."""
    info = ckpt.info(name)
    if info is None or not info.shape:
        return
    n = info.shape[0]
    step = plan_chunks(math.prod(info.shape[1:]) * DTYPES[info.dtype][0], max_bytes)
    for start in range(0, n, step):
        stop = min(n, start + step)
        yield start, stop, ckpt.read_rows(name, start, stop)


FLOAT32_MAX = 3.4028234663852886e38
"""float32's largest finite value: a prompt beyond it is Inf in PEFT's float32 prompt encoder."""


def _chunk_overflow(pe: Any, pe_max: float, cols: Any, rows: Any, start: int, limit: float) -> tuple[int, float] | None:
    """The first task of a chunk (float64 ``cols`` [k, T, r] and ``rows`` [k, r, d]) whose
    ``cols[k] @ rows[k]`` or prompt ``pe * (cols[k] @ rows[k])`` exceeds ``limit``.

    A cheap bound first, per task: ``max_t sum_r |cols| * max |rows|`` bounds every entry of the
    product; only the tasks whose bound (times ``max(1, max|pe|)``) passes ``limit`` are computed."""
    import numpy as np

    with np.errstate(all="ignore"):
        bound = np.abs(cols).sum(axis=2).max(axis=1) * np.abs(rows).max(axis=(1, 2)) * max(1.0, pe_max)
        for i in np.flatnonzero(~(bound <= limit)):
            product = cols[i] @ rows[i]
            peak = max(float(np.abs(product).max()), float(np.abs(product * pe).max()))
            if not peak <= limit:
                return start + int(i), peak
    return None


def prompt_overflow(
    pe: Any, cols: Any, rows: Any, *, limit: float = FLOAT32_MAX, chunk_bytes: int = CHUNK_BYTES
) -> tuple[int, float] | None:
    """For factors held as arrays (``pe`` [T, d], ``cols`` [N, T, r], ``rows`` [N, r, d]): the
    first task ``k`` whose ``cols[k] @ rows[k]`` or prompt ``P* * (cols[k] @ rows[k])`` goes beyond
    ``limit`` (float32's largest value), as ``(k, peak)`` (peak NaN or Inf when not finite), or
    None. Computed in float64 over chunks of tasks of at most ``chunk_bytes``."""
    import numpy as np

    # max |P*| as max(max, -min): exact in any float dtype (NaN stays NaN), with no temporary the
    # size of P*; a product with float64 upcasts ``pe`` exactly, so no float64 copy of P* either
    pe = np.asarray(pe)
    pe_max = abs(float(np.maximum(pe.max(), -pe.min()))) if pe.size else 0.0
    n = cols.shape[0]
    step = plan_chunks(math.prod(cols.shape[1:]) * 8 + math.prod(rows.shape[1:]) * 8, chunk_bytes)
    for start in range(0, n, step):
        stop = min(n, start + step)
        c = np.asarray(cols[start:stop], dtype=np.float64)
        r = np.asarray(rows[start:stop], dtype=np.float64)
        found = _chunk_overflow(pe, pe_max, c, r, start, limit)
        if found is not None:
            return found
    return None


def task_prompt_overflow(ckpt: Checkpoint, tasks: Any, *, limit: float = FLOAT32_MAX) -> tuple[int, float] | None:
    """The exact check of :func:`prompt_overflow` for a source's listed ``tasks`` only (in order),
    each read on its own: for the few tasks whose bound passed the limit."""
    import numpy as np

    from .formats import to_float64

    pe = to_float64(ckpt.read("prompt_embeddings"))
    pe_max = float(np.abs(pe).max()) if pe.size else 0.0
    for k in (int(t) for t in tasks):
        c = to_float64(ckpt.read_rows("prefix_task_cols", k, k + 1))
        r = to_float64(ckpt.read_rows("prefix_task_rows", k, k + 1))
        found = _chunk_overflow(pe, pe_max, c, r, k, limit)
        if found is not None:
            return found
    return None
