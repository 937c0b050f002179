"""Comparing MPT adapters: two adapters against each other, and the tasks of one adapter.

- :func:`diff`: keys, shapes, dtypes and config fields of two sources, the max abs difference of each
  tensor and, when both have the same N, T and d, the difference of each task's effective prompt.
- :func:`task_similarity`: the N x N cosine similarity of the effective prompts
  ``P_k = P* * (cols[k] @ rows[k])``, computed in float64 over chunks of tasks.
- :func:`plot_similarity`: that matrix as a heatmap PNG (needs matplotlib: ``mpt-tools[plot]``).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import Checkpoint, Source, load_source
from .checks import require_valid
from .errors import ConfigError, MptToolsError, WriteError, flag
from .files import atomic_write, guard_output
from .formats import CANONICAL, DTYPE_NAMES, FLOAT_DTYPES, same_bytes, to_float64
from .options import checked_positive
from .peft_releases import is_default
from .progress import chunk_starts, progress, tracked
from .prompts import CHUNK_BYTES, MAX_TASK_ROWS, plan_chunks
from .results import ConfigFieldDiff, ConfigFiles, DiffResult, KeyDiff, PromptDiff, PromptTaskDiff, TensorDiff

# Config fields that say how or where a file was written, not what the adapter is.
VOLATILE_CONFIG = ("peft_version",)


def _task_ranges(ckpt: Checkpoint, chunk_bytes: int) -> list[tuple[int, int]]:
    """Ranges of tasks whose float64 prompts take at most ``chunk_bytes`` (at least one task)."""
    t, d = ckpt.shapes["prompt_embeddings"]
    n = ckpt.shapes["prefix_task_cols"][0]
    step = plan_chunks(t * d * 8, chunk_bytes)
    return [(start, min(n, start + step)) for start in range(0, n, step)]


def _prompts(ckpt: Checkpoint, pe: np.ndarray, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
    """The float64 effective prompts P* * (U_k @ V_k) of tasks ``start:stop``, [k, T, d] (into
    ``out``, a float64 buffer of at least that size, when given)."""
    cols = to_float64(ckpt.read_rows("prefix_task_cols", start, stop))
    rows = to_float64(ckpt.read_rows("prefix_task_rows", start, stop))
    if out is not None:
        out = out[: stop - start]
    with np.errstate(all="ignore"):
        prompts = np.matmul(cols, rows, out=out)
        prompts *= pe[None]
    return prompts


SIMILARITY_CHUNK_BYTES = 256 << 20
MAX_SIMILARITY_TASKS = 4096
"""The most tasks ``--similarity`` compares: its N x N matrix is printed and held as JSON lists
(4096 tasks: 16.8 million cells, about 0.6 GB as Python objects)."""


def check_similarity_size(num_tasks: int, location: str | None = None) -> None:
    """Refuse, before anything is computed, a similarity matrix of more than
    :data:`MAX_SIMILARITY_TASKS` tasks (or one bigger than this machine's memory), naming the size."""
    from .errors import ValidationError, flag
    from .formats import memory_limit, memory_name

    need = num_tasks * num_tasks * 8
    if num_tasks > MAX_SIMILARITY_TASKS or 4 * need > memory_limit():
        raise ValidationError(
            flag("--similarity", "a similarity matrix")
            + f" compares every pair of tasks: {num_tasks} tasks need a {num_tasks} x {num_tasks} "
            f"matrix ({need:,} bytes as float64); the limit is {MAX_SIMILARITY_TASKS} tasks "
            f"(and a quarter of {memory_name()}, {memory_limit():,} bytes)",
            location,
        )


def task_similarity(
    source: Source,
    *,
    chunk_bytes: int = SIMILARITY_CHUNK_BYTES,
) -> np.ndarray:
    """The N x N cosine similarity of the tasks' effective prompts (flattened), float64.

    The Gram matrix of the float64 prompts is summed over blocks of prompt features (virtual
    tokens, and token_dim columns when N is huge): each block holds every task's prompt values for
    those features, at most ``chunk_bytes`` of them, and adds ``F @ F.T`` to the Gram matrix. Every
    prompt value is computed once (blocks of tasks paired with blocks of tasks would recompute
    them over and over: minutes instead of seconds at 1000 tasks), and memory stays bounded
    besides the N x N result. An entry is NaN where a prompt is all zeros or not finite. More than
    :data:`MAX_SIMILARITY_TASKS` tasks are refused before anything is computed.
    """
    ckpt = load_source(source)
    require_valid(ckpt, values=False)
    n, t, r = ckpt.shapes["prefix_task_cols"]
    check_similarity_size(n, ckpt.location)
    d = ckpt.shapes["prompt_embeddings"][1]
    pe = to_float64(ckpt.read("prompt_embeddings"))
    cols = to_float64(ckpt.read("prefix_task_cols"))  # N x T x r: small beside the rows
    budget = checked_positive(chunk_bytes, "chunk_bytes")
    if n * d * 8 <= budget:  # whole token rows per block
        tokens, columns = min(t, budget // (n * d * 8)), d
    else:
        tokens, columns = 1, max(1, min(d, budget // (n * 8)))
    # factor rows are read and converted to float64 a chunk of tasks at a time (a quarter of the budget)
    task_step = plan_chunks(r * d * 8, budget // 4)
    gram = np.zeros((n, n), dtype=np.float64)
    block = np.empty(n * tokens * columns, dtype=np.float64)
    passes = -(-t // tokens) * -(-d // columns)  # blocks of features, each a pass over every task
    label = "similarity" if passes == 1 else f"similarity ({passes} passes)"
    with np.errstate(all="ignore"), progress(n * passes, label) as advance:
        for t0 in range(0, t, tokens):
            t1 = min(t, t0 + tokens)
            for j0 in range(0, d, columns):
                j1 = min(d, j0 + columns)
                f = block[: n * (t1 - t0) * (j1 - j0)].reshape(n, t1 - t0, j1 - j0)
                for c0 in range(0, n, task_step):
                    c1 = min(n, c0 + task_step)
                    rows = to_float64(ckpt.read_rows("prefix_task_rows", c0, c1))[:, :, j0:j1]
                    np.matmul(cols[c0:c1, t0:t1], rows, out=f[c0:c1])
                    advance(c1 - c0)
                f *= pe[None, t0:t1, j0:j1]
                flat = f.reshape(n, -1)
                gram += flat @ flat.T
        gram = np.triu(gram) + np.triu(gram, 1).T  # exactly symmetric, whatever the BLAS did
        norms = np.sqrt(np.diag(gram).copy())
        sim = gram / np.outer(norms, norms)
    sim[~np.isfinite(sim)] = np.nan
    np.fill_diagonal(sim, np.where(norms > 0, 1.0, np.nan))
    return np.clip(sim, -1.0, 1.0)


def similarity_json(matrix: np.ndarray) -> list[list[float | None]]:
    """The matrix as nested lists, NaN as None (JSON null)."""
    return [[None if not np.isfinite(v) else round(float(v), 12) for v in row] for row in matrix]


def require_matplotlib() -> None:
    """Raise MptToolsError saying how to install matplotlib when it is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MptToolsError(flag("--plot", "a plot") + " needs matplotlib: pip install 'mpt-tools[plot]'") from None


def check_plot_path(path: str | os.PathLike[str], *, force: bool = False, protected: list[str] | None = None) -> Path:
    """Everything that could refuse a plot file, checked before any computation: matplotlib is
    installed, the name ends in .png, and :func:`mpt_tools.files.guard_output` lets it be written
    (no existing file without ``force``, nothing in a source's folder)."""
    require_matplotlib()
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise WriteError("the plot file name must end in .png", str(out))
    guard_output(out, force=force, protected=protected or [], kind="file")
    return out


def plot_similarity(
    matrix: np.ndarray,
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
    force: bool = False,
    protected: list[str] | None = None,
) -> str:
    """Draw the similarity matrix as a heatmap PNG at ``path`` (atomic; ``force`` to overwrite).

    Uses matplotlib's Agg backend; a diverging colormap from -1 (blue) to 1 (red), values written in
    the cells for up to 16 tasks. Raises MptToolsError naming ``pip install 'mpt-tools[plot]'`` when
    matplotlib is missing. ``protected`` are source paths whose folders are never written.
    """
    out = check_plot_path(path, force=force, protected=protected)
    shape = getattr(matrix, "shape", None)
    if shape is None or len(shape) != 2 or shape[0] != shape[1]:
        raise ConfigError(
            "the similarity matrix must be a square 2-D array (task_similarity's), not "
            f"{shape or type(matrix).__name__}"
        )
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    n = matrix.shape[0]
    size = min(14.0, 3.0 + 0.45 * n)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    try:
        shown = np.ma.masked_invalid(matrix)
        cmap = plt.get_cmap("RdBu_r").with_extremes(bad="lightgrey")
        im = ax.imshow(shown, cmap=cmap, vmin=-1.0, vmax=1.0, interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="cosine similarity")
        if n <= 40:
            ax.set_xticks(range(n))
            ax.set_yticks(range(n))
        ax.set_xlabel("task")
        ax.set_ylabel("task")
        if n <= 16:
            for i in range(n):
                for j in range(n):
                    v = matrix[i, j]
                    text = "n/a" if not np.isfinite(v) else f"{v:.2f}"
                    color = "white" if np.isfinite(v) and abs(v) > 0.6 else "black"
                    ax.text(j, i, text, ha="center", va="center", fontsize=8, color=color)
        ax.set_title(title or "task similarity (effective prompts)", fontsize=10)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
    finally:
        plt.close(fig)
    atomic_write(out, buf.getvalue(), replace=force, parents=True)
    return str(out)


def _file_sets(ckpt: Checkpoint) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name in CANONICAL:
        info = ckpt.info(name)
        if info is not None:
            out[name] = {"dtype": DTYPE_NAMES.get(info.dtype, info.dtype), "shape": list(info.shape), "tag": info.dtype}
    for key in ckpt.ignored:
        info = ckpt.file.infos[key]
        out[key] = {"dtype": DTYPE_NAMES.get(info.dtype, info.dtype), "shape": list(info.shape), "tag": info.dtype}
    return out


def _tensor_diff(a: Checkpoint, b: Checkpoint, name: str, chunk_bytes: int) -> TensorDiff:
    """Max abs difference (float64) of one tensor with equal shapes, and whether the bytes agree."""
    ka = a.keymap.get(name, name)
    kb = b.keymap.get(name, name)
    ia, ib = a.file.infos[ka], b.file.infos[kb]
    shape = ia.shape
    rows = shape[0] if shape else 1
    per_row = max(1, ia.nbytes // max(1, rows)) * 2
    step = plan_chunks(per_row, chunk_bytes)
    max_abs = 0.0
    bitwise = ia.dtype == ib.dtype
    nan_mismatch = 0
    label = f"diff {name}" if name in CANONICAL else "diff values"  # a file's own key: not on a terminal
    for start in chunk_starts(rows, step, label, unit="row"):
        stop = min(rows, start + step)
        ra, rb = a.file.read_rows(ka, start, stop), b.file.read_rows(kb, start, stop)
        if ia.dtype == ib.dtype and same_bytes(ra.array, rb.array):
            continue  # equal bytes: no value difference, nothing non-finite that differs
        bitwise = False
        if ia.dtype in FLOAT_DTYPES and ib.dtype in FLOAT_DTYPES:
            va, vb = to_float64(ra), to_float64(rb)
        else:
            va, vb = ra.array.astype(np.float64), rb.array.astype(np.float64)
        with np.errstate(all="ignore"):
            fa, fb = np.isfinite(va), np.isfinite(vb)
            both = fa & fb
            same_special = (~fa & ~fb) & ((va == vb) | (np.isnan(va) & np.isnan(vb)))
            nan_mismatch += int((~both & ~same_special).sum())
            if both.any():
                max_abs = max(max_abs, float(np.abs(va[both] - vb[both]).max()))
    return {
        "max_abs_diff": max_abs,
        "bitwise_equal": bitwise,
        "nonfinite_mismatches": nan_mismatch,
    }


def _config_diff(a: Checkpoint, b: Checkpoint) -> list[ConfigFieldDiff]:
    ra, rb = a.config.raw, b.config.raw
    out: list[ConfigFieldDiff] = []
    for key in sorted(set(ra) | set(rb)):
        if key in VOLATILE_CONFIG:
            continue
        va, vb = ra.get(key, "<absent>"), rb.get(key, "<absent>")
        if (key not in ra and is_default(rb.get("peft_type"), key, vb)) or (
            key not in rb and is_default(ra.get("peft_type"), key, va)
        ):
            continue  # absent means PEFT's default: the same config to every PEFT release
        if va != vb or type(va) is not type(vb):
            out.append({"field": key, "a": va, "b": vb})
    return out


def diff(
    a: Source,
    b: Source,
    *,
    chunk_bytes: int = CHUNK_BYTES,
) -> DiffResult:
    """Compare two sources; ``identical`` is True when nothing below differs.

    Reported: keys present in one only (canonical names; stored names may differ, see
    ``renamed``), shapes, dtypes, config fields (``peft_version`` ignored, and a field absent on one
    side equals PEFT's default on the other; a config file present on one side only is a
    difference), per tensor the max abs difference in float64 and whether the bytes are equal,
    and, when N, T and d agree (the rank may differ), per task the max abs and the relative
    Frobenius difference of the effective prompts. Safetensors metadata differences are listed but
    do not make the adapters different.
    """
    chunk_bytes = checked_positive(chunk_bytes, "chunk_bytes")
    ca, cb = load_source(a), load_source(b)
    fa, fb = _file_sets(ca), _file_sets(cb)
    only_a = sorted(set(fa) - set(fb))
    only_b = sorted(set(fb) - set(fa))
    shapes: list[KeyDiff] = []
    dtypes: list[KeyDiff] = []
    tensors: dict[str, TensorDiff] = {}
    for name in sorted(set(fa) & set(fb)):
        if fa[name]["shape"] != fb[name]["shape"]:
            shapes.append({"key": name, "a": fa[name]["shape"], "b": fb[name]["shape"]})
        if fa[name]["dtype"] != fb[name]["dtype"]:
            dtypes.append({"key": name, "a": fa[name]["dtype"], "b": fb[name]["dtype"]})
        if fa[name]["shape"] == fb[name]["shape"]:
            tensors[name] = _tensor_diff(ca, cb, name, chunk_bytes)
    config_files: ConfigFiles = {"a": ca.config.path, "b": cb.config.path}
    config_presence = ca.config_from_file != cb.config_from_file
    # An inferred config against a file's one would only list the fields a bare file cannot carry.
    config = [] if config_presence else _config_diff(ca, cb)
    prompts = _prompt_diff(ca, cb, chunk_bytes)
    meta_a, meta_b = ca.file.metadata, cb.file.metadata
    metadata: list[KeyDiff] = [
        {"key": k, "a": meta_a.get(k), "b": meta_b.get(k)}
        for k in sorted(set(meta_a) | set(meta_b))
        if meta_a.get(k) != meta_b.get(k)
    ]
    renamed: list[KeyDiff] = [
        {"key": k, "a": ca.keymap[k], "b": cb.keymap[k]}
        for k in CANONICAL
        if k in ca.keymap and k in cb.keymap and ca.keymap[k] != cb.keymap[k]
    ]
    value_diffs = [
        k for k, v in tensors.items() if not v["bitwise_equal"] and (v["max_abs_diff"] > 0 or v["nonfinite_mismatches"])
    ]
    # Same values stored in another dtype are a dtype difference, not a value difference.
    identical = not (only_a or only_b or shapes or dtypes or config or config_presence or value_diffs)
    count = len(only_a) + len(only_b) + len(shapes) + len(dtypes) + len(config) + int(config_presence)
    count += len(value_diffs)
    report: DiffResult = {
        "schema": "mpt-tools/diff/1",
        "a": ca.location,
        "b": cb.location,
        "identical": identical,
        "differences": count,
        "summary": "",
        "keys": {"only_a": only_a, "only_b": only_b},
        "renamed": renamed,
        "shapes": shapes,
        "dtypes": dtypes,
        "config_files": config_files,
        "config": config,
        "tensors": tensors,
        "prompts": prompts,
        "metadata": metadata,
        "sha256": {"a": ca.sha256(), "b": cb.sha256()},
    }
    report["summary"] = _summary(report, value_diffs, config_presence)
    return report


def _summary(report: DiffResult, value_diffs: list[str], config_presence: bool) -> str:
    """One line naming what differs in a diff report (``value_diffs``: the tensors whose values
    differ; ``config_presence``: a config file on one side only)."""
    only_a, only_b = report["keys"]["only_a"], report["keys"]["only_b"]
    shapes, dtypes, config = report["shapes"], report["dtypes"], report["config"]
    tensors, prompts = report["tensors"], report["prompts"]
    if report["identical"]:
        return "identical (keys, shapes, dtypes, config and every value)"
    parts = []
    if only_a or only_b:
        parts.append(f"{len(only_a) + len(only_b)} key(s) in one only")
    if shapes:
        parts.append("shapes differ: " + ", ".join(s["key"] for s in shapes))
    if dtypes:
        parts.append("dtypes differ: " + ", ".join(s["key"] for s in dtypes))
    if config_presence:
        parts.append("adapter_config.json on one side only")
    if config:
        parts.append(f"{len(config)} config field(s) differ: " + ", ".join(c["field"] for c in config[:5]))
    if value_diffs:
        worst = max(tensors[k]["max_abs_diff"] for k in value_diffs)
        parts.append(f"values differ in {', '.join(value_diffs)} (max abs {worst:.4g})")
    if prompts and prompts.get("max_abs_diff") is not None:
        parts.append(f"max prompt difference {prompts['max_abs_diff']:.4g}")
    return "; ".join(parts)


def _prompt_diff(a: Checkpoint, b: Checkpoint, chunk_bytes: int, max_rows: int = MAX_TASK_ROWS) -> PromptDiff | None:
    """Per-task effective-prompt differences when both have N, T, d in common (else None): the
    first ``max_rows`` tasks listed, ``max_abs_diff`` over every task."""
    try:
        for ckpt in (a, b):
            require_valid(ckpt, values=False)
    except MptToolsError:
        return None
    na, ta, _ = a.shapes["prefix_task_cols"]
    nb, tb, _ = b.shapes["prefix_task_cols"]
    if (na, ta) != (nb, tb) or a.shapes["prompt_embeddings"] != b.shapes["prompt_embeddings"]:
        return None
    per_task: list[PromptTaskDiff] = []
    overall: float | None = None  # the largest finite max |dP_k| over every task, listed or not
    ranges = _task_ranges(a, max(1, chunk_bytes // 2))
    t, d = a.shapes["prompt_embeddings"]
    # two float64 buffers reused by every chunk: no chunk-sized temporaries
    buf_a, buf_b = (np.empty((ranges[0][1] - ranges[0][0], t, d)) for _ in range(2))
    pe_a, pe_b = to_float64(a.read("prompt_embeddings")), to_float64(b.read("prompt_embeddings"))
    for start, stop in tracked(ranges, na, "diff prompts", size=lambda run: run[1] - run[0]):
        k = stop - start
        pa = _prompts(a, pe_a, start, stop, out=buf_a).reshape(k, -1)
        pb = _prompts(b, pe_b, start, stop, out=buf_b).reshape(k, -1)
        with np.errstate(all="ignore"):
            ref = np.sqrt(np.einsum("ij,ij->i", pa, pa))
            delta = np.subtract(pa, pb, out=pa)  # in place: pa is not needed any more
            fro = np.sqrt(np.einsum("ij,ij->i", delta, delta))
            worst = np.maximum(delta.max(1), -delta.min(1)) if delta.shape[1] else np.zeros(k)  # NaN propagates
            worst += 0.0  # -0.0 (max of -delta where delta is all 0) is 0
            finite = worst[np.isfinite(worst)]
        if finite.size:
            overall = max(overall if overall is not None else 0.0, float(finite.max()))
        for i in range(min(k, max(0, max_rows - start))):
            m = float(worst[i])
            rel = float(fro[i] / ref[i]) if ref[i] > 0 else (0.0 if fro[i] == 0 else None)
            per_task.append(
                {
                    "task": start + i,
                    "max_abs_diff": m if np.isfinite(m) else None,
                    "relative_diff": rel if rel is None or np.isfinite(rel) else None,
                }
            )
    return {"max_abs_diff": overall, "tasks": per_task}
