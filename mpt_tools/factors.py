"""The factor math of each target mode, bitwise identical to PEFT where PEFT defines it.

- average: ``cols.mean(0, keepdim=True)`` and ``rows.mean(0, keepdim=True)`` computed by torch in
  the source dtype, then upcast to float32 (what PEFT's float32 parameters receive);
- exact: ``cols[k:k+1]``, ``rows[k:k+1]`` (numpy; only task k's bytes are read);
- shared: P* copied, factors drawn N(0, 0.02) from a seeded numpy generator.
Targets are float32, the dtype PEFT's prompt encoder holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .checks import canonical_mode
from .errors import ValidationError
from .formats import Raw, from_numpy, to_float32
from .source import Checkpoint

INIT_STD = 0.02
MAX_TARGET_ELEMENTS = 1 << 31


@dataclass
class Target:
    """A target initialisation: the three float32 tensors, the mode and how they were made."""

    tensors: dict[str, np.ndarray]
    mode: str
    task: int | None = None
    seed: int | None = None
    tasks: list[int] | None = None
    weights: list[float] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def num_tasks(self) -> int:
        """Number of tasks of the target."""
        return int(self.tensors["prefix_task_cols"].shape[0])

    @property
    def num_ranks(self) -> int:
        """Rank of the target's factors."""
        return int(self.tensors["prefix_task_cols"].shape[2])

    def raw(self) -> dict[str, Raw]:
        """The tensors as :class:`Raw` for writing."""
        return {k: from_numpy(v) for k, v in self.tensors.items()}


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
        t = _torch_tensor(ckpt.map(name))
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


def _torch_tensor(raw: Raw) -> Any:
    from .formats import to_torch

    return to_torch(raw)


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


def build_target(
    ckpt: Checkpoint,
    mode: str,
    *,
    task: int | None = None,
    seed: int | None = None,
    num_tasks: int | None = None,
    num_ranks: int | None = None,
    tasks: list[int] | None = None,
    weights: list[float] | None = None,
    target_tasks: int = 1,
) -> Target:
    """Compute the target tensors of ``mode`` from a checked source.

    The caller has validated the source (see :func:`mpt_tools.checks.check_target`); negative
    ``task`` values are resolved Python-style here, as PEFT does.
    """
    mode = canonical_mode(mode)
    pe = to_float32(ckpt.read("prompt_embeddings"))
    pe = np.ascontiguousarray(pe)
    target = Target(tensors={}, mode=mode)
    if mode == "average":
        cols, rows = average_factors(ckpt, tasks, weights)
        target.tasks, target.weights = tasks, weights
    elif mode == "exact":
        n = ckpt.shapes["prefix_task_cols"][0]
        k = 0 if task is None else task
        if k < 0:
            k += n
        cols, rows = exact_factors(ckpt, k)
        target.task = k
    else:
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % (1 << 63))  # type: ignore[operator]
        t, d = pe.shape
        src_cols = ckpt.shapes.get("prefix_task_cols")
        r = num_ranks or (src_cols[2] if src_cols else 1)
        cols, rows = random_factors(seed, num_tasks or 1, t, r, d)
        target.seed = seed
    if mode != "shared" and target_tasks > 1:
        cols = np.ascontiguousarray(np.repeat(cols, target_tasks, axis=0))
        rows = np.ascontiguousarray(np.repeat(rows, target_tasks, axis=0))
    target.tensors = {"prompt_embeddings": pe, "prefix_task_cols": cols, "prefix_task_rows": rows}
    return target
