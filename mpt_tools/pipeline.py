"""The operations behind the commands: validate, inspect and init, one walk each along
SOURCE -> Checkpoint -> checks -> factors -> write."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .checks import (
    PEFT_MODE_NAMES,
    Finding,
    canonical_mode,
    check_source,
    check_target,
    errors,
    refusal,
    value_findings,
)
from .config import INIT_MODES, MptConfig, read_config, target_config
from .errors import MptToolsError, ValidationError
from .factors import build_target
from .formats import DTYPE_NAMES, to_float32
from .source import Checkpoint, load_source
from .writer import check_output_dir, provenance, write_adapter

NORM_CHUNK_BYTES = 64 << 20


def validate(
    source: str | os.PathLike[str] | Checkpoint,
    *,
    against: str | os.PathLike[str] | None = None,
    mode: str | None = None,
    task: int | None = None,
    overrides: dict[str, Any] | None = None,
    subfolder: str | None = None,
    hub_options: dict[str, Any] | None = None,
    base_model: str | None = None,
    check_base_model: bool = False,
) -> dict[str, Any]:
    """Check a source (and, with ``against``/``mode``, a planned target) and report every problem.

    Returns ``{"source", "valid", "mode", "against", "findings": [...]}``; ``valid`` is False when
    any finding is an error. Raises MptToolsError only when the source cannot be read at all.
    ``base_model`` (a Hub id or local folder) or ``check_base_model`` (use the config's
    base_model_name_or_path) compares token_dim with the base model's hidden size, reading only
    its config.json (code ``base-model``; off by default, so no network is touched).
    """
    ckpt = load_source(source, subfolder=subfolder, overrides=overrides, hub_options=hub_options)
    findings = check_source(ckpt)
    target: MptConfig | None = None
    if against is not None:
        target = read_config(against)
        if mode is None:
            init = target.raw.get("prompt_tuning_init")
            mode = init if init in INIT_MODES[2:] else "average"
    if mode is not None:
        findings += check_target(ckpt, mode, target=target, task=task)
    if base_model is not None or check_base_model:
        from .hub import base_model_findings

        findings += base_model_findings(ckpt, base_model, hub_options=hub_options)
    return {
        "schema": "mpt-tools/validate/1",
        "source": ckpt.location,
        "weights": ckpt.weights_path,
        "valid": not errors(findings),
        "mode": canonical_mode(mode) if mode else None,
        "against": target.path if target else None,
        "findings": [f.to_dict() for f in findings],
    }


def json_float(value: float) -> float | None:
    """A float for JSON output: NaN and infinities become None (null)."""
    return float(value) if np.isfinite(value) else None


def task_norms(ckpt: Checkpoint, chunk_bytes: int = NORM_CHUNK_BYTES) -> list[dict[str, Any]]:
    """Per task k: Frobenius norms of U_k, V_k and of the effective prompt P* * (U_k @ V_k).

    Prompts are formed and summed in float32 (as PEFT computes them; ~1e-6 relative), over chunks
    of tasks sized so that one chunk's prompts take at most ``chunk_bytes``. Non-finite norms are
    reported as None.
    """
    pe = to_float32(ckpt.read("prompt_embeddings"))
    t, d = pe.shape
    rows_info = ckpt.info("prefix_task_rows")
    assert rows_info is not None
    per_task = max(1, t * d * 4)
    step = max(1, chunk_bytes // per_task)
    n = rows_info.shape[0]
    out: list[dict[str, Any]] = []
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
    source: str | os.PathLike[str] | Checkpoint,
    *,
    overrides: dict[str, Any] | None = None,
    subfolder: str | None = None,
    hub_options: dict[str, Any] | None = None,
    norms: bool = True,
) -> dict[str, Any]:
    """Describe a source: files with sha256, format, tensors, config, parameter counts, findings and
    per-task norms (see the README for the JSON schema)."""
    ckpt = load_source(source, subfolder=subfolder, overrides=overrides, hub_options=hub_options)
    findings = check_source(ckpt)
    files = [{"role": "weights", "path": ckpt.weights_path, "bytes": ckpt.file.size, "sha256": ckpt.sha256()}]
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
    tensors = []
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
    params: dict[str, Any] = {}
    if "prompt_embeddings" in shapes and len(shapes["prompt_embeddings"]) == 2:
        t, d = shapes["prompt_embeddings"]
        params["shared"] = t * d
        if "prefix_task_cols" in shapes and len(shapes["prefix_task_cols"]) == 3:
            n, _, r = shapes["prefix_task_cols"]
            params["per_task"] = t * r + r * d
            params["num_tasks"] = n
            params["total"] = t * d + n * (t * r + r * d)
    task_list: list[dict[str, Any]] | None = None
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
    return {
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


def selection_findings(
    mode: str, src_n: int | None, tasks: list[int] | None, weights: list[float] | None, target_tasks: int
) -> list[Finding]:
    """Problems with --tasks, --weights and --target-tasks."""
    out: list[Finding] = []
    if (tasks is not None or weights is not None) and mode != "average":
        out.append(
            Finding(
                "error",
                "usage",
                "tasks",
                "--tasks and --weights apply to --mode average only",
                "average",
                mode,
                "drop --tasks/--weights or use --mode average",
            )
        )
        return out
    if tasks is not None:
        if not tasks:
            out.append(
                Finding("error", "usage", "tasks", "no tasks given", "at least one task", "[]", "list tasks like 0,3,5")
            )
        if len(set(tasks)) != len(tasks):
            out.append(
                Finding(
                    "error",
                    "usage",
                    "tasks",
                    "a task is listed twice",
                    "distinct tasks",
                    tasks,
                    "list each task once (use --weights to weigh one more)",
                )
            )
        if src_n is not None:
            bad = [t for t in tasks if t < 0 or t >= src_n]
            if bad:
                out.append(
                    Finding(
                        "error",
                        "task-range",
                        "tasks",
                        f"the source has {src_n} tasks",
                        f"0..{src_n - 1}",
                        bad,
                        f"pick tasks in 0..{src_n - 1}",
                    )
                )
    if weights is not None:
        count = len(tasks) if tasks is not None else src_n
        if count is not None and len(weights) != count:
            out.append(
                Finding(
                    "error",
                    "usage",
                    "weights",
                    "need one weight per averaged task",
                    count,
                    len(weights),
                    "give as many weights as tasks",
                )
            )
        if any(not np.isfinite(w) or w < 0 for w in weights) or not sum(weights) > 0:
            out.append(
                Finding(
                    "error",
                    "usage",
                    "weights",
                    "weights must be finite, non-negative, not all 0",
                    ">= 0",
                    weights,
                    "fix the weights",
                )
            )
    if target_tasks < 1 or target_tasks > 1_000_000:
        out.append(
            Finding(
                "error",
                "usage",
                "target_tasks",
                "out of range",
                "1..1000000",
                target_tasks,
                "pass a positive --target-tasks",
            )
        )
    elif target_tasks > 1 and mode == "shared":
        out.append(
            Finding(
                "error",
                "usage",
                "target_tasks",
                "--mode shared takes --num-tasks instead",
                1,
                target_tasks,
                "use --num-tasks K with --mode shared",
            )
        )
    return out


def init_adapter(
    source: str | os.PathLike[str] | Checkpoint,
    mode: str,
    out: str | os.PathLike[str],
    *,
    task: int | None = None,
    seed: int | None = None,
    num_tasks: int | None = None,
    num_ranks: int | None = None,
    force: bool = False,
    allow_negative_task: bool = False,
    tasks: list[int] | None = None,
    weights: list[float] | None = None,
    target_tasks: int = 1,
    overrides: dict[str, Any] | None = None,
    subfolder: str | None = None,
    hub_options: dict[str, Any] | None = None,
    base_model: str | None = None,
    check_base_model: bool = False,
) -> dict[str, Any]:
    """Build a target initialisation from SOURCE and write it to ``out`` as a PEFT adapter.

    ``base_model``/``check_base_model``: as in :func:`validate`; a token_dim mismatch refuses.

    mode is average, exact or shared (PEFT's AVERAGE_SOURCE_TASKS, EXACT_SOURCE_TASK and
    ONLY_SOURCE_SHARED names work too). average/exact tensors are bitwise what PEFT's own init
    computes; shared copies P* and draws N(0, 0.02) factors from ``seed``. Raises
    ValidationError listing every problem before anything is written.
    """
    mode = canonical_mode(mode)
    ckpt = load_source(source, subfolder=subfolder, overrides=overrides, hub_options=hub_options)
    warnings: list[str] = []
    src_cols = ckpt.shapes.get("prefix_task_cols")
    src_n = src_cols[0] if src_cols and len(src_cols) == 3 else None
    src_r = src_cols[2] if src_cols and len(src_cols) == 3 else None
    tgt_n: int
    tgt_r: int | None
    if mode == "shared":
        tgt_n, tgt_r = num_tasks or 1, num_ranks or src_r or 1
    else:
        tgt_n, tgt_r = num_tasks or target_tasks, num_ranks or src_r
    findings = check_source(ckpt, values=False)
    if mode == "shared" and ckpt.info("prefix_task_cols") is None and ckpt.info("prefix_task_rows") is None:
        # A prompt without task factors is a fine source for shared: only P* is copied.
        findings = [f for f in findings if f.code != "missing-tensor" or f.field == "prompt_embeddings"]
    if mode == "shared" and not errors(findings):
        # shared reads only P*; the factors are small next to it, so check them too.
        findings += value_findings(ckpt)
    findings += check_target(ckpt, mode, task=task, num_tasks=tgt_n, num_ranks=tgt_r, peft_init_path=target_tasks == 1)
    if mode != "shared" and num_tasks is not None and num_tasks != target_tasks and target_tasks != 1:
        findings.append(
            Finding(
                "error",
                "target-mismatch",
                "num_tasks",
                "--num-tasks and --target-tasks disagree",
                target_tasks,
                num_tasks,
                "give only one of them",
            )
        )
    findings += selection_findings(mode, src_n, tasks, weights, target_tasks)
    if not ckpt.config_from_file and ckpt.config.task_type is None:
        findings.append(
            Finding(
                "error",
                "task-type",
                "task_type",
                "unknown for a bare tensor file; the target config needs it",
                "one of CAUSAL_LM, SEQ_2_SEQ_LM, ...",
                None,
                "give --task-type",
            )
        )
    if mode == "exact" and task is not None and task < 0 and allow_negative_task and src_n is not None:
        findings = [f for f in findings if f.code != "negative-task"]
        if task + src_n >= 0:
            warnings.append(f"task {task} resolves to task {task + src_n} of {src_n} (counting from the end)")
        else:
            findings.append(
                Finding(
                    "error",
                    "task-range",
                    "task",
                    f"the source has {src_n} tasks",
                    f"-{src_n}..{src_n - 1}",
                    task,
                    f"pass a task in 0..{src_n - 1}",
                )
            )
    if (base_model is not None or check_base_model) and not errors(findings):
        from .hub import base_model_findings

        findings += base_model_findings(ckpt, base_model, hub_options=hub_options)
    problems = errors(findings)
    if problems:
        raise refusal(ckpt.location, problems)
    warnings += [f.line() for f in findings if f.level == "warning"]
    protected = ckpt.source_paths
    check_output_dir(out, force=force, protected=protected)
    target = build_target(
        ckpt,
        mode,
        task=task,
        seed=seed,
        num_tasks=tgt_n,
        num_ranks=tgt_r,
        tasks=tasks,
        weights=weights,
        target_tasks=target_tasks,
    )
    for name, arr in target.tensors.items():
        if not np.isfinite(arr).all():
            where = f"task {target.task}" if target.task is not None else "the source"
            raise ValidationError(f"{name}: {where} holds NaN/Inf values; the target would be unusable", ckpt.location)
    config = target_config(ckpt.config, target.num_tasks, target.num_ranks)
    meta = provenance(
        {
            "mode": PEFT_MODE_NAMES[mode],
            **ckpt.provenance(),
            "task": target.task,
            "tasks": target.tasks,
            "weights": target.weights,
            "seed": target.seed,
            "target_tasks": target_tasks if target_tasks != 1 else None,
        }
    )
    written = write_adapter(out, target.raw(), config, meta, force=force, protected=protected)
    return {
        "schema": "mpt-tools/init/1",
        "source": ckpt.location,
        "source_sha256": ckpt.sha256(),
        "out": str(out),
        "files": written,
        "mode": mode,
        "peft_mode": PEFT_MODE_NAMES[mode],
        "task": target.task,
        "seed": target.seed,
        "num_tasks": target.num_tasks,
        "num_ranks": target.num_ranks,
        "shapes": {k: list(v.shape) for k, v in target.tensors.items()},
        "metadata": meta,
        "notes": ckpt.notes,
        "warnings": warnings,
        "version": __version__,
    }


__all__ = ["MptToolsError", "init_adapter", "inspect_source", "task_norms", "validate"]
