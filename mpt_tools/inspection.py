"""``inspect``: what a source holds (files, tensors, config, findings) and its per-task norms."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .checkpoint import Checkpoint, Source, load_source
from .checks import check_source
from .errors import ValidationError
from .findings import errors
from .formats import DTYPE_NAMES, json_float, to_float32
from .prompts import CHUNK_BYTES, plan_chunks

if TYPE_CHECKING:  # types only: importing them costs start-up time
    from .results import FileEntry, InspectResult, ParameterCounts, TaskNorms, TensorEntry


def task_norms(ckpt: Checkpoint, chunk_bytes: int = CHUNK_BYTES) -> list[TaskNorms]:
    """Per task k: Frobenius norms of U_k, V_k and of the effective prompt P* * (U_k @ V_k).

    Prompts are formed and summed in float32 (as PEFT computes them; ~1e-6 relative), over chunks
    of tasks sized so that one chunk's prompts take at most ``chunk_bytes``. Non-finite norms are
    reported as None.
    """
    pe = to_float32(ckpt.read("prompt_embeddings"))
    t, d = pe.shape
    rows_info = ckpt.info("prefix_task_rows")
    assert rows_info is not None
    step = plan_chunks(t * d * 4, chunk_bytes)
    n = rows_info.shape[0]
    out: list[TaskNorms] = []
    # one prompt buffer for every chunk: fresh chunk-sized arrays cost more in page faults than
    # the matmul itself
    buf = np.empty((min(step, n), t, d), dtype=np.float32)
    for start in range(0, n, step):
        stop = min(n, start + step)
        cols = to_float32(ckpt.read_rows("prefix_task_cols", start, stop))
        rows = to_float32(ckpt.read_rows("prefix_task_rows", start, stop))
        with np.errstate(all="ignore"):
            prompts = np.matmul(cols, rows, out=buf[: stop - start])
            prompts *= pe[None]
            pn = np.sqrt(np.einsum("ktd,ktd->k", prompts, prompts).astype(np.float64))
            cn = np.sqrt(np.square(cols, dtype=np.float64).sum(axis=(1, 2)))
            rn = np.sqrt(np.square(rows, dtype=np.float64).sum(axis=(1, 2)))
        for i in range(stop - start):
            out.append(
                {
                    "task": start + i,
                    "cols_norm": json_float(cn[i]),
                    "rows_norm": json_float(rn[i]),
                    "prompt_norm": json_float(pn[i]),
                }
            )
    return out


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
    ckpt = load_source(source)
    findings = check_source(ckpt)
    files: list[FileEntry] = [
        {"role": "weights", "path": ckpt.weights_path, "bytes": ckpt.file.size, "sha256": ckpt.sha256()}
    ]
    if ckpt.config.path:
        import hashlib

        cfg_bytes = Path(ckpt.config.path).read_bytes()
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
    if norms and not header_errors:
        task_list = task_norms(ckpt)
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
        "notes": ckpt.notes,
        "hub": ckpt.hub,
    }
    if similarity or plot:
        _add_similarity(report, ckpt, plot, force)
    return report


def _add_similarity(report: InspectResult, ckpt: Checkpoint, plot: str | os.PathLike[str] | None, force: bool) -> None:
    """Add the task similarity matrix (and the plot) to an inspect report."""
    from .compare import plot_similarity, require_matplotlib, similarity_json, task_similarity

    if plot:
        require_matplotlib()  # before the (possibly long) similarity computation
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
