"""``verify``: rebuild every task prompt on the GPU (or CPU), check it against float64, and check a
target written by ``init`` against what its mode promises."""

from __future__ import annotations

import time

from ..checkpoint import Source, load_source
from ..checks import require_valid
from ..dtypes import DTYPE_MAX
from ..errors import ValidationError, VerificationFailed, flag
from ..formats import DTYPE_NAMES, canonical_dtype
from ..options import checked_indices, checked_positive
from ..results import TargetReport, VerifyResult
from . import engine
from .engine import (
    ATOLS,
    SCHEMA,
    TOLERANCES,
    _check_layout,
    _describe_device,
    _exact_fp32_matmul,
    _out_of_memory_is_an_error,
    _Timer,
    _torch_dtype,
    default_chunk_bytes,
    resolve_device,
)
from .target import _resolve_source, _target_checks


def verify(
    path_or_checkpoint: Source,
    *,
    source: Source | None = None,
    device: str = "auto",
    dtype: str = "float32",
    tasks: list[int] | None = None,
    chunk_bytes: int | None = None,
    check: bool = True,
    chunk_log: list[int] | None = None,
) -> VerifyResult:
    """Rebuild every task prompt of an adapter on ``device`` in ``dtype`` and verify it.

    Returns the report (schema ``mpt-tools/verify/1``: device, dtype, tolerance, tasks, target,
    ok, failures, notes, timings). ``tasks`` restricts the rebuild to those tasks; ``chunk_bytes``
    bounds one chunk's working set (default: :func:`default_chunk_bytes`); ``chunk_log``, when
    given, receives the number of tasks of each chunk. With ``source`` (or the recorded
    ``mpt_tools.source``), a target is also checked against what its mode promises.

    When anything fails, raises :class:`VerificationFailed` (a VerifyError naming the failing
    tasks, with the full report as ``.report``) unless ``check`` is False, in which case the
    report is returned with ``ok`` False. Unreadable inputs raise other MptToolsErrors;
    ``device="cuda"`` without CUDA raises :class:`DeviceError`.

    ``path_or_checkpoint`` may be a :class:`~mpt_tools.options.SourceSpec` (a Hub repo, a subfolder,
    config overrides); its Hub token, cache folder and offline switch also serve ``source`` (whose
    revision and subfolder go in its ``hf://`` spec).
    """
    import torch

    t_start = time.perf_counter()
    dtype_name = canonical_dtype(dtype)
    _torch_dtype(dtype_name)  # validates
    dev = resolve_device(device)
    ckpt = load_source(path_or_checkpoint)
    require_valid(ckpt, values=False)
    n, t, r, d = _check_layout(ckpt)
    if tasks is None:
        selected = list(range(n))
    else:
        tasks = checked_indices(tasks, "tasks")
        bad = [k for k in tasks if not 0 <= k < n]
        if bad:
            tasks_word = "task" if n == 1 else "tasks"
            raise ValidationError(
                f"{flag(f'--tasks {bad}', f'tasks={bad}')} out of range: the adapter has {n} {tasks_word} (0..{n - 1})",
                ckpt.location,
            )
        selected = sorted(set(tasks))
    budget = checked_positive(chunk_bytes, "chunk_bytes") if chunk_bytes is not None else default_chunk_bytes(dev)
    notes: list[str] = []
    timer = _Timer(dev)
    target_report: TargetReport | None = None
    with _exact_fp32_matmul(dev), torch.no_grad(), _out_of_memory_is_an_error(dev, budget):
        task_rows, failures, capped = engine._rebuild_checks(ckpt, dev, dtype_name, selected, budget, timer, chunk_log)
        if capped:
            notes.append(capped)
        src = _resolve_source(ckpt, source, notes)
        if source is not None and "mpt_tools.mode" not in ckpt.file.metadata:
            failures.append(
                {
                    "task": None,
                    "check": "target-mismatch",
                    "message": flag("--source", "source")
                    + " given but the adapter records no mpt_tools.mode (not written by init)",
                }
            )
        elif src is not None:
            target_report, target_failures = _target_checks(ckpt, src, dev, dtype_name, budget)
            failures += target_failures
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    info = ckpt.info("prompt_embeddings")
    src_dtype = DTYPE_NAMES.get(info.dtype, info.dtype) if info else None
    report: VerifyResult = {
        "schema": SCHEMA,
        "path": ckpt.location,
        "weights": ckpt.weights_path,
        "device": _describe_device(dev),
        "dtype": dtype_name,
        "stored_dtype": src_dtype,
        "tolerance": {
            "rel_frobenius": TOLERANCES[dtype_name],
            "atol_per_element": ATOLS[dtype_name],
            "dtype_max": DTYPE_MAX[dtype_name],
        },
        "shape": {"num_tasks": n, "total_virtual_tokens": t, "num_ranks": r, "token_dim": d},
        "chunk_bytes": budget,
        "tasks": task_rows,
        "target": target_report,
        "ok": not failures,
        "failures": failures,
        "notes": notes,
        "timings": {
            "read_s": round(timer.read_s, 6),
            "transfer_s": round(timer.transfer_s, 6),
            "rebuild_s": round(timer.rebuild_s, 6),
            "total_s": round(time.perf_counter() - t_start, 6),
        },
    }
    if check and not report["ok"]:
        raise failure_error(report)
    return report


def failure_error(report: VerifyResult) -> VerificationFailed:
    """The one-line error for a failed report, naming the failing tasks and the first problem."""
    failures = report["failures"]
    tasks = sorted({f["task"] for f in failures if f["task"] is not None})
    first = failures[0]
    if tasks:
        shown = ", ".join(str(k) for k in tasks[:10]) + (f" (+{len(tasks) - 10} more)" if len(tasks) > 10 else "")
        head = f"verification failed for task(s) {shown}"
    else:
        head = "verification failed"
    where = f"task {first['task']}: " if first["task"] is not None else ""
    more = f" [{len(failures)} failure(s) in all]" if len(failures) > 1 else ""
    return VerificationFailed(f"{head}: {where}{first['check']}: {first['message']}{more}", report["path"], report)
