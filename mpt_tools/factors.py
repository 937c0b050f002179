"""The factor math of each target mode, bitwise identical to PEFT where PEFT defines it.

- average: ``cols.mean(0, keepdim=True)`` and ``rows.mean(0, keepdim=True)`` computed by torch in
  the source dtype, then upcast to float32 (what PEFT's float32 parameters receive);
- exact: ``cols[k:k+1]``, ``rows[k:k+1]`` (numpy; only task k's bytes are read);
- shared: P* copied, factors drawn N(0, 0.02) from a seeded numpy generator.
Targets are float32, the dtype PEFT's prompt encoder holds.
"""

from __future__ import annotations

import numpy as np

from .checkpoint import Checkpoint
from .errors import ValidationError
from .formats import to_float32, to_torch

INIT_STD = 0.02
MAX_TARGET_ELEMENTS = 1 << 31


def average_factors(
    ckpt: Checkpoint, tasks: list[int] | None = None, weights: list[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the task factors as PEFT computes it (torch, source dtype), as float32 arrays.

    ``tasks`` restricts the mean to those tasks (in the given order); ``weights`` (one per task,
    non-negative) gives a weighted mean, computed in float64 and rounded once to float32.
    """
    import torch

    out = []
    for name in ("prefix_task_cols", "prefix_task_rows"):
        t = to_torch(ckpt.map(name))
        if tasks is not None:
            t = t.index_select(0, torch.tensor(tasks, dtype=torch.long))
        if weights is None:
            mean = t.mean(0, keepdim=True)
        else:
            w = torch.tensor(weights, dtype=torch.float64)
            w = w / w.sum()
            mean = (t.double() * w.view(-1, 1, 1)).sum(0, keepdim=True)
        out.append(mean.float().numpy())
    return out[0], out[1]


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
