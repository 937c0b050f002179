"""``inspect``: what a source holds (files, tensors, config, findings) and its per-task norms."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from .checkpoint import Checkpoint, Source, load_source
from .checks import check_source
from .errors import ConfigError, ValidationError
from .files import stale_staging
from .findings import errors
from .formats import DTYPE_NAMES, json_float, to_float32
from .hazards import serving_hazards
from .options import checked_path
from .paths import read_small
from .progress import chunk_starts
from .prompts import CHUNK_BYTES, MAX_TASK_ROWS, plan_chunks

if TYPE_CHECKING:  # types only: importing them costs start-up time
    from .results import FileEntry, InspectResult, ParameterCounts, TaskNorms, TensorEntry


class NormSummary:
    """Running extremes of the per-task norms over every task (finite values only), and the count
    of tasks with a non-finite norm."""

    def __init__(self) -> None:
        self.count = 0
        self.nonfinite = 0
        self.low = [math.inf] * 3
        self.high = [-math.inf] * 3
        self.peak_task: int | None = None

    def add(self, start: int, norms: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        """Take in one chunk's (cols, rows, prompt) norms of tasks ``start...``."""
        self.count += norms[0].shape[0]
        bad = ~(np.isfinite(norms[0]) & np.isfinite(norms[1]) & np.isfinite(norms[2]))
        self.nonfinite += int(bad.sum())
        for j, values in enumerate(norms):
            finite = values[np.isfinite(values)]
            if finite.size:
                self.low[j] = min(self.low[j], float(finite.min()))
                if float(finite.max()) > self.high[j]:
                    self.high[j] = float(finite.max())
                    if j == 2:
                        self.peak_task = start + int(np.flatnonzero(values == finite.max())[0])

    def line(self, shown: int) -> str:
        """The note an inspect report carries when only ``shown`` of the tasks are listed."""

        def span(j: int) -> str:
            return "n/a" if self.low[j] > self.high[j] else f"{self.low[j]:.4g}..{self.high[j]:.4g}"

        text = (
            f"per-task norms listed for the first {shown} of {self.count} tasks (at most {MAX_TASK_ROWS}); "
            f"over all {self.count}: |U_k| {span(0)}, |V_k| {span(1)}, |P_k| {span(2)}"
        )
        if self.peak_task is not None:
            text += f" (largest at task {self.peak_task})"
        return text + f", {self.nonfinite} task(s) with a non-finite norm"


def _norm_chunks(ckpt: Checkpoint, chunk_bytes: int) -> Iterator[tuple[int, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """``(start, (cols_norms, rows_norms, prompt_norms))`` per chunk of tasks (float64 arrays)."""
    pe = to_float32(ckpt.read("prompt_embeddings"))
    t, d = pe.shape
    rows_info = ckpt.info("prefix_task_rows")
    assert rows_info is not None
    step = plan_chunks(t * d * 4, chunk_bytes)
    n = rows_info.shape[0]
    # one prompt buffer for every chunk: fresh chunk-sized arrays cost more in page faults than
    # the matmul itself
    buf = np.empty((min(step, n), t, d), dtype=np.float32)
    for start in chunk_starts(n, step, "norms"):
        stop = min(n, start + step)
        cols = to_float32(ckpt.read_rows("prefix_task_cols", start, stop))
        rows = to_float32(ckpt.read_rows("prefix_task_rows", start, stop))
        with np.errstate(all="ignore"):
            prompts = np.matmul(cols, rows, out=buf[: stop - start])
            prompts *= pe[None]
            pn = np.sqrt(np.einsum("ktd,ktd->k", prompts, prompts).astype(np.float64))
            cn = np.sqrt(np.square(cols, dtype=np.float64).sum(axis=(1, 2)))
            rn = np.sqrt(np.square(rows, dtype=np.float64).sum(axis=(1, 2)))
        yield start, (cn, rn, pn)


def task_norms_report(
    ckpt: Checkpoint, chunk_bytes: int = CHUNK_BYTES, max_rows: int | None = MAX_TASK_ROWS
) -> tuple[list[TaskNorms], NormSummary]:
    """The per-task norms of the first ``max_rows`` tasks (None: all) and a summary of every task.

    One pass over the factors in chunks (see :func:`task_norms`); memory is bounded by the chunk
    and ``max_rows``, whatever number of tasks the header claims.
    """
    out: list[TaskNorms] = []
    summary = NormSummary()
    for start, (cn, rn, pn) in _norm_chunks(ckpt, chunk_bytes):
        summary.add(start, (cn, rn, pn))
        listed = len(cn) if max_rows is None else min(len(cn), max(0, max_rows - start))
        for i in range(listed):
            out.append(
                {
                    "task": start + i,
                    "cols_norm": json_float(cn[i]),
                    "rows_norm": json_float(rn[i]),
                    "prompt_norm": json_float(pn[i]),
                }
            )
    return out, summary


def task_norms(ckpt: Checkpoint, chunk_bytes: int = CHUNK_BYTES) -> list[TaskNorms]:
    """Per task k: Frobenius norms of U_k, V_k and of the effective prompt P* * (U_k @ V_k).

    Prompts are formed and summed in float32 (as PEFT computes them; ~1e-6 relative), over chunks
    of tasks sized so that one chunk's prompts take at most ``chunk_bytes``. Non-finite norms are
    reported as None. Every task is listed (``inspect`` lists at most :data:`MAX_TASK_ROWS`: see
    :func:`task_norms_report`).
    """
    return task_norms_report(ckpt, chunk_bytes, max_rows=None)[0]


def _leftovers(ckpt: Checkpoint) -> list[str]:
    """A note on staging files or folders that a killed mpt-tools run left in or beside a local
    source (the next command that writes there removes them)."""
    if ckpt.hub:
        return []
    left = stale_staging(ckpt.location)
    if not left:
        return []
    return [
        f"{len(left)} staging leftover(s) of an interrupted mpt-tools run: {', '.join(left)} "
        "(the next mpt-tools command that writes here removes them; or delete them)"
    ]


def inspect_source(
    source: Source,
    *,
    norms: bool = True,
    similarity: bool = False,
    plot: str | os.PathLike[str] | None = None,
    force: bool = False,
) -> InspectResult:
    """Describe a source: files with sha256, format, tensors, config, parameter counts, findings and
    per-task norms (see the README for the JSON schema).

    ``similarity`` adds the task-by-task cosine similarity of the prompts (``similarity``: None when
    the source cannot give one); ``plot`` also draws it as a heatmap PNG (``force`` overwrites an
    existing file), unless the source has errors (then a note says so and nothing is written).
    """
    if plot is not None:
        plot = checked_path(plot, "plot")  # "" is an unset variable, not "no plot"
    ckpt = load_source(source)
    cols_shape = ckpt.shapes.get("prefix_task_cols")
    if (similarity or plot) and cols_shape and len(cols_shape) == 3:
        from .compare import check_similarity_size

        check_similarity_size(cols_shape[0], ckpt.location)  # before any work
    if plot:
        from .compare import check_plot_path

        check_plot_path(plot, force=force, protected=ckpt.source_paths)  # before any work, not after it
    findings = check_source(ckpt) + serving_hazards(ckpt)
    files: list[FileEntry] = [
        {"role": "weights", "path": ckpt.weights_path, "bytes": ckpt.file.size, "sha256": ckpt.sha256()}
    ]
    if ckpt.config.path:
        import hashlib

        cfg_bytes = read_small(ckpt.config.path, 1 << 24, ConfigError) or b""  # a regular file, as read before
        files.append(
            {
                "role": "config",
                "path": ckpt.config.path,
                "bytes": len(cfg_bytes),
                "sha256": hashlib.sha256(cfg_bytes).hexdigest(),
            }
        )
    tensors: list[TensorEntry] = []
    for original, info in ckpt.file.infos.items():
        canonical = next((k for k, v in ckpt.keymap.items() if v == original), None)
        count = 1
        for s in info.shape:
            count *= s
        tensors.append(
            {
                "key": canonical,
                "stored_as": original,
                "dtype": DTYPE_NAMES.get(info.dtype, info.dtype),
                "shape": list(info.shape),
                "parameters": count,
            }
        )
    shapes = ckpt.shapes
    params: ParameterCounts = {}
    if "prompt_embeddings" in shapes and len(shapes["prompt_embeddings"]) == 2:
        t, d = shapes["prompt_embeddings"]
        params["shared"] = t * d
        if "prefix_task_cols" in shapes and len(shapes["prefix_task_cols"]) == 3:
            n, _, r = shapes["prefix_task_cols"]
            params["per_task"] = t * r + r * d
            params["num_tasks"] = n
            params["total"] = t * d + n * (t * r + r * d)
    task_list: list[TaskNorms] | None = None
    header_errors = [
        f
        for f in errors(findings)
        if f.code
        not in (
            "non-finite",
            "peft-type",
            "task-type",
            "init-mode",
            "negative-task",
            "bad-type",
            "bad-size",
            "config-mismatch",
        )
    ]
    capped_note: str | None = None
    if norms and not header_errors:
        task_list, summary = task_norms_report(ckpt)
        if summary.count > len(task_list):
            capped_note = summary.line(len(task_list))
    report: InspectResult = {
        "schema": "mpt-tools/inspect/1",
        "source": ckpt.location,
        "format": ckpt.format,
        "files": files,
        "metadata": ckpt.file.metadata,
        "tensors": tensors,
        "config": ckpt.config.raw,
        "config_source": ckpt.config.path or "inferred from the tensor shapes",
        "assumed": ckpt.config.assumed,
        "derived": {
            "num_transformer_submodules": ckpt.config.num_transformer_submodules,
            "total_virtual_tokens": ckpt.config.total_virtual_tokens,
        },
        "parameters": params,
        "valid": not errors(findings),
        "findings": [f.to_dict() for f in findings],
        "tasks": task_list,
        "notes": ckpt.notes + ([capped_note] if capped_note else []) + _leftovers(ckpt),
        "hub": ckpt.hub,
    }
    if similarity or plot:
        _add_similarity(report, ckpt, plot, force)
    return report


def _add_similarity(report: InspectResult, ckpt: Checkpoint, plot: str | os.PathLike[str] | None, force: bool) -> None:
    """Add the task similarity matrix (and the plot) to an inspect report."""
    from .compare import plot_similarity, similarity_json, task_similarity

    try:
        matrix = task_similarity(ckpt)
    except ValidationError:
        if plot:
            raise
        report["similarity"] = None
        return
    report["similarity"] = similarity_json(matrix)
    if plot and not report.get("valid", True):
        # exit 1 means nothing written: an invalid source gets its report, not a picture.
        report.setdefault("notes", []).append(f"{plot} not written: the source has errors")
        return
    if plot:
        title = f"task similarity: {ckpt.location}"
        report["plot"] = plot_similarity(matrix, plot, title=title, force=force, protected=ckpt.source_paths)
