"""Chunks of whole tasks and the prompt math ``P_k = P* * (U_k @ V_k)`` on the host (numpy)."""

from __future__ import annotations

import math
from collections.abc import Iterator

from .checkpoint import Checkpoint
from .formats import DTYPES, Raw

CHUNK_BYTES = 64 << 20
"""The default bound on one chunk of tasks on the host: what a scan, a norm or a diff holds at once."""


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
