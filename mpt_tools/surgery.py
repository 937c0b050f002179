"""Task surgery on MPT adapters: select tasks, change the rank, export one task's prompt.

Every operation reads a source (see :func:`mpt_tools.checkpoint.load_source`), checks it, computes
the new tensors in memory and only then writes, through :func:`mpt_tools.writer.write_adapter`:
atomic, ``force`` to overwrite, never into the source's folder, with ``mpt_tools.*`` provenance
metadata and a PEFT-style adapter_config.json.

- :func:`select_tasks`: keep, drop, reorder (or repeat) tasks; bitwise copies in the source dtype.
- :func:`rerank`: change num_ranks. Lower: per task the best rank-R approximation of
  ``cols[k] @ rows[k]`` (truncated SVD, split as ``U_r sqrt(S)``, ``sqrt(S) V_r^T``); higher: zero
  padding, exact.
- :func:`export_prompt`: one task's effective prompt ``P* * (cols[k] @ rows[k])`` as a plain PEFT
  PROMPT_TUNING adapter, computed the way PEFT's forward computes it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, cast

import numpy as np

from .checkpoint import Checkpoint, Source, load_source
from .checks import require_valid
from .config import PROMPT_TUNING_DEFAULTS, target_config
from .errors import ValidationError, flag
from .factors import MAX_TARGET_ELEMENTS
from .files import guard_output
from .findings import Finding
from .formats import (
    DTYPE_NAMES,
    Raw,
    from_numpy,
    from_torch,
    memory_limit,
    more_than_memory,
    to_float32,
    to_float64,
    to_torch,
)
from .options import checked_index, checked_indices, checked_positive
from .progress import chunk_starts
from .prompts import CHUNK_BYTES, plan_chunks, task_runs
from .results import ExportPromptResult, RerankResult, TasksResult
from .writer import _write_and_report, fit_for_peft

FACTOR_KEYS = ("prefix_task_cols", "prefix_task_rows")

# Fields a PROMPT_TUNING config takes over from the MPT source config.
_PT_FROM_SOURCE = (
    "base_model_name_or_path",
    "num_attention_heads",
    "num_layers",
    "revision",
    "task_type",
    "token_dim",
)


# ---------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------


def _dims(ckpt: Checkpoint) -> tuple[int, int, int, int]:
    """(N, T, r, d) of a checked source."""
    n, t, r = ckpt.shapes["prefix_task_cols"]
    d = ckpt.shapes["prompt_embeddings"][1]
    return n, t, r, d


def _check_tasks(field_name: str, tasks: Sequence[int], n: int) -> list[Finding]:
    out: list[Finding] = []
    if not tasks:
        out.append(
            Finding.error(
                "usage",
                field_name,
                "no tasks given",
                expected="at least one task",
                found="[]",
                fix="list tasks like 2,0",
            )
        )
    bad = [t for t in tasks if t < 0 or t >= n]
    if bad:
        out.append(
            Finding.error(
                "task-range",
                field_name,
                f"the source has {n} tasks",
                expected=f"0..{n - 1}",
                found=bad,
                fix=f"pick tasks in 0..{n - 1}",
            )
        )
    return out


# ---------------------------------------------------------------------------------------------
# tasks --select
# ---------------------------------------------------------------------------------------------


def _gather(ckpt: Checkpoint, name: str, select: Sequence[int]) -> Raw:
    """Rows ``select`` of a factor tensor, bitwise, reading each run of consecutive tasks once."""
    parts = [ckpt.read_rows(name, a, b) for a, b in task_runs(list(select), max(1, len(select)))]
    arr = np.ascontiguousarray(np.concatenate([p.array for p in parts], axis=0))
    return Raw(parts[0].dtype, tuple(arr.shape), arr)


def _output_size(option: str, ckpt: Checkpoint, tasks: int, rank: int | None) -> list[Finding]:
    """A refusal where the largest factor tensor of the output (``tasks`` tasks: at the source's rank
    in the source dtype, or at ``rank`` in float32) would claim more than :func:`memory_limit` bytes."""
    info, shape = ckpt.info("prefix_task_rows"), ckpt.shapes.get("prefix_task_rows")
    if info is None or shape is None or len(shape) != 3 or 0 in shape:
        return []
    itemsize = 4 if rank is not None else info.nbytes // (shape[0] * shape[1] * shape[2])
    need = tasks * (shape[1] if rank is None else rank) * shape[2] * itemsize
    if need <= memory_limit():
        return []
    return [
        Finding.error(
            "too-large",
            option,
            f"prefix_task_rows of the output would claim {need:,} bytes, {more_than_memory()}",
            expected=f"<= {memory_limit():,} bytes",
            found=f"{need:,} bytes",
            fix="select fewer tasks" if rank is None else "lower " + flag("--num-ranks", "num_ranks"),
        )
    ]


def repeated_and_dropped(select: Sequence[int], n: int) -> tuple[list[int], list[int]]:
    """The tasks ``select`` lists more than once (sorted) and the tasks of ``range(n)`` it leaves
    out, in one pass over each (a 64,000-task --select stays linear)."""
    seen: set[int] = set()
    twice: set[int] = set()
    for k in select:
        (twice if k in seen else seen).add(k)
    return sorted(twice), [k for k in range(n) if k not in seen]


def select_tasks(
    source: Source,
    select: Sequence[int],
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    peft_compat: str | None = None,
) -> TasksResult:
    """Write an adapter whose task ``i`` is source task ``select[i]``.

    Selecting keeps, drops and reorders tasks (a task may be listed twice, to start a new task from
    it). ``prompt_embeddings`` and each selected task's factors are copied bitwise in the source
    dtype; only the selected tasks' bytes are read. ``num_tasks`` in the config follows.
    ``peft_compat`` writes the config for exactly that PEFT release (default: every release; see
    :func:`mpt_tools.writer.fit_for_peft`).
    """
    select = checked_indices(select, "select")
    ckpt = load_source(source)
    extra: list[Finding] = []
    cols_shape = ckpt.shapes.get("prefix_task_cols")
    if cols_shape and len(cols_shape) == 3:
        extra += _check_tasks("select", select, cols_shape[0])
        extra += _output_size("select", ckpt, len(select), None)
    warnings = require_valid(ckpt, extra)
    n, _t, r, _d = _dims(ckpt)
    guard_output(out, force=force, protected=ckpt.source_paths)
    tensors: dict[str, Raw] = {"prompt_embeddings": ckpt.read("prompt_embeddings")}
    for name in FACTOR_KEYS:
        tensors[name] = _gather(ckpt, name, select)
    repeated, dropped = repeated_and_dropped(select, n)
    notes = list(ckpt.notes)
    if repeated:
        notes.append(f"tasks listed more than once: {repeated}")
    result = _write_and_report(
        "tasks",
        ckpt,
        out,
        tensors,
        fit_for_peft(target_config(ckpt.config, len(select), r), peft_compat, ckpt.where),
        {"select": select},
        force=force,
        select=select,
        dropped=dropped,
        num_tasks=len(select),
        num_ranks=r,
        dtype=DTYPE_NAMES.get(tensors["prompt_embeddings"].dtype, tensors["prompt_embeddings"].dtype),
        warnings=warnings,
        notes=notes,
    )
    return cast(TasksResult, result)


# ---------------------------------------------------------------------------------------------
# rerank
# ---------------------------------------------------------------------------------------------


def best_rank_factors(cols: np.ndarray, rows: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The best rank-``rank`` approximation of ``cols @ rows`` (Eckart-Young), as new factors.

    ``cols`` is [T, r] and ``rows`` [r, d] (float64). The product's SVD ``U S V^T`` is computed
    through thin QR decompositions of both factors (an r x r SVD, never a T x d one) and split as
    ``U_R sqrt(S_R)`` ([T, rank]) and ``sqrt(S_R) V_R^T`` ([rank, d]); missing singular values are
    zero. Returns the two factors and all singular values.
    """
    t, r = cols.shape
    d = rows.shape[1]
    qc, rc = np.linalg.qr(cols)  # [T, k1], [k1, r]
    qr_, rr = np.linalg.qr(rows.T)  # [d, k2], [k2, r]
    core = rc @ rr.T  # [k1, k2]
    u, s, vt = np.linalg.svd(core, full_matrices=False)
    left = qc @ u  # [T, m]
    right = vt @ qr_.T  # [m, d]
    keep = min(rank, s.shape[0])
    root = np.sqrt(s[:keep])
    new_cols = np.zeros((t, rank), dtype=np.float64)
    new_rows = np.zeros((rank, d), dtype=np.float64)
    new_cols[:, :keep] = left[:, :keep] * root[None, :]
    new_rows[:keep] = root[:, None] * right[:keep]
    del r
    return new_cols, new_rows, s


def rerank(
    source: Source,
    num_ranks: int,
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    chunk_bytes: int = CHUNK_BYTES,
    peft_compat: str | None = None,
) -> RerankResult:
    """Write an adapter with rank ``num_ranks``; factors are float32 (PEFT's dtype).

    Higher (or equal) rank: the factors are zero-padded (the product is unchanged; PEFT's float32
    prompt may differ in the last bits, within the bound the README states).
    Lower rank: per task, when the dropped rank components are exactly zero the factors are truncated
    (exact); otherwise they are replaced by the best rank-R approximation of ``cols[k] @ rows[k]``
    (truncated SVD). The result reports per task the relative error of the prompt it causes,
    ``|P* * (approx - exact)|_F / |P* * exact|_F`` (float64; 0 when exact). ``peft_compat``: as
    in :func:`select_tasks`.
    """
    num_ranks = checked_index(num_ranks, "num_ranks")
    chunk_bytes = checked_positive(chunk_bytes, "chunk_bytes")
    ckpt = load_source(source)
    extra: list[Finding] = []
    if num_ranks < 1:
        extra.append(
            Finding.error(
                "usage",
                "num_ranks",
                "must be positive",
                expected=">= 1",
                found=num_ranks,
                fix="pass " + flag("--num-ranks 1", "num_ranks=1") + " or more",
            )
        )
    shapes = ckpt.shapes
    pe_shape, cols_shape = shapes.get("prompt_embeddings"), shapes.get("prefix_task_cols")
    if pe_shape and cols_shape and len(pe_shape) == 2 and len(cols_shape) == 3:
        n0, t0, _ = cols_shape
        d0 = pe_shape[-1]
        size = n0 * max(num_ranks, 0) * (t0 + d0)
        if size > MAX_TARGET_ELEMENTS:
            extra.append(
                Finding.error(
                    "usage",
                    "num_ranks",
                    f"the factors would hold {size} values",
                    expected=f"<= {MAX_TARGET_ELEMENTS}",
                    found=num_ranks,
                    fix="lower it",
                )
            )
        else:
            extra += _output_size("num_ranks", ckpt, n0, max(num_ranks, 0))
    warnings = require_valid(ckpt, extra)
    n, t, r, d = _dims(ckpt)
    guard_output(out, force=force, protected=ckpt.source_paths)
    pe32 = np.ascontiguousarray(to_float32(ckpt.read("prompt_embeddings")))
    pe64 = pe32.astype(np.float64)
    new_cols = np.zeros((n, t, num_ranks), dtype=np.float32)
    new_rows = np.zeros((n, num_ranks, d), dtype=np.float32)
    per_task: list[dict[str, Any]] = []
    keep = min(r, num_ranks)
    step = plan_chunks((t * r + r * d) * 8 + t * d * 16, chunk_bytes)
    # two float64 [T, d] buffers for the error of an SVD'd task, reused for every task
    exact_buf = diff_buf = None
    for start in chunk_starts(n, step, "rerank"):
        stop = min(n, start + step)
        cols = to_float32(ckpt.read_rows("prefix_task_cols", start, stop))
        rows = to_float32(ckpt.read_rows("prefix_task_rows", start, stop))
        for i in range(stop - start):
            k = start + i
            c, w = cols[i], rows[i]
            dropped_zero = all(not c[:, j].any() or not w[j].any() for j in range(keep, r))
            entry: dict[str, Any] = {"task": k}
            if num_ranks >= r or dropped_zero:
                new_cols[k, :, :keep] = c[:, :keep]
                new_rows[k, :keep] = w[:keep]
                entry["method"] = "pad" if num_ranks > r else ("copy" if num_ranks == r else "truncate")
                entry["relative_error"] = 0.0
                entry["singular_values"] = None
            else:
                c64, w64 = c.astype(np.float64), w.astype(np.float64)
                a, b, s = best_rank_factors(c64, w64, num_ranks)
                new_cols[k] = a.astype(np.float32)
                new_rows[k] = b.astype(np.float32)
                if exact_buf is None or diff_buf is None:
                    exact_buf, diff_buf = np.empty((t, d)), np.empty((t, d))
                with np.errstate(all="ignore"):  # P* * exact and P* * (approx - exact), in place
                    exact = np.matmul(c64, w64, out=exact_buf)
                    delta = np.matmul(new_cols[k].astype(np.float64), new_rows[k].astype(np.float64), out=diff_buf)
                    delta -= exact
                    exact *= pe64
                    delta *= pe64
                    ref = float(np.sqrt(np.einsum("ij,ij->", exact, exact)))
                    err = float(np.sqrt(np.einsum("ij,ij->", delta, delta)))
                entry["method"] = "svd"
                entry["relative_error"] = err / ref if ref > 0 else (0.0 if err == 0 else None)
                entry["singular_values"] = [float(x) for x in s]
            per_task.append(entry)
    if not (np.isfinite(new_cols).all() and np.isfinite(new_rows).all()):
        raise ValidationError("the reranked factors hold NaN/Inf values; nothing written", ckpt.location)
    tensors = {
        "prompt_embeddings": from_numpy(pe32),
        "prefix_task_cols": from_numpy(new_cols),
        "prefix_task_rows": from_numpy(new_rows),
    }
    errs = [e["relative_error"] for e in per_task if e["relative_error"] is not None]
    result = _write_and_report(
        "rerank",
        ckpt,
        out,
        tensors,
        fit_for_peft(target_config(ckpt.config, n, num_ranks), peft_compat, ckpt.where),
        {
            "source_num_ranks": r,
            "num_ranks": num_ranks,
            "max_relative_error": f"{max(errs):.6g}" if errs else None,
        },
        force=force,
        source_num_ranks=r,
        num_ranks=num_ranks,
        num_tasks=n,
        exact=all(e["method"] != "svd" for e in per_task),
        max_relative_error=max(errs) if errs else None,
        tasks=per_task,
        warnings=warnings,
    )
    return cast(RerankResult, result)


# ---------------------------------------------------------------------------------------------
# convert
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# export-prompt
# ---------------------------------------------------------------------------------------------


def task_prompt(ckpt: Checkpoint, task: int) -> Any:
    """Task ``task``'s effective prompt as PEFT's forward computes it: a float32 torch tensor [T, d].

    The parameters are upcast to float32 (PEFT's prompt encoder dtype), then
    ``torch.matmul(cols[k:k+1], rows[k:k+1])`` and an in-place elementwise product with P*, as in
    ``MultitaskPromptEmbedding.forward`` with ``task_ids=[k]``.
    """
    import torch

    pe = to_torch(ckpt.read("prompt_embeddings")).to(torch.float32)
    cols = to_torch(ckpt.read_rows("prefix_task_cols", task, task + 1)).to(torch.float32)
    rows = to_torch(ckpt.read_rows("prefix_task_rows", task, task + 1)).to(torch.float32)
    prompt = pe.unsqueeze(0).clone()
    prompt *= torch.matmul(cols, rows)
    return prompt[0].contiguous()


def prompt_tuning_config(ckpt: Checkpoint, num_virtual_tokens: int, num_transformer_submodules: int) -> dict[str, Any]:
    """The adapter_config.json of a plain PROMPT_TUNING adapter for the source's base model."""
    raw = dict(PROMPT_TUNING_DEFAULTS)
    for key in _PT_FROM_SOURCE:
        if key in ckpt.config.raw:
            raw[key] = ckpt.config.raw[key]
    raw["num_virtual_tokens"] = num_virtual_tokens
    raw["num_transformer_submodules"] = num_transformer_submodules
    raw["token_dim"] = ckpt.shapes["prompt_embeddings"][1]
    if raw.get("task_type") is None:
        raw["task_type"] = ckpt.config.task_type
    return raw


def seq2seq_decoder_finding(fix: str) -> Finding:
    """The refusal of a seq2seq prompt (2 transformer submodules) as one PROMPT_TUNING folder."""
    return Finding.error(
        "seq2seq-decoder",
        "num_transformer_submodules",
        "PEFT's plain prompt tuning uses only the encoder half of a seq2seq prompt "
        "(PeftModelForSeq2SeqLM.forward drops the decoder half that MPT feeds to the decoder)",
        expected=1,
        found=2,
        fix=fix,
    )


def export_prompt(
    source: Source,
    task: int,
    out: str | os.PathLike[str],
    *,
    encoder_only: bool = False,
    force: bool = False,
    peft_compat: str | None = None,
) -> ExportPromptResult:
    """Write task ``task``'s effective prompt as a plain PEFT PROMPT_TUNING adapter.

    The adapter holds ``prompt_embeddings`` [T, d] = ``P* * (cols[k] @ rows[k])``, computed as PEFT's
    forward does (see :func:`task_prompt`), so loading it with ``PeftModel.from_pretrained`` gives
    bitwise the prompt the MPT adapter gives with ``task_ids=[k]``.

    Seq2seq adapters with 2 transformer submodules are refused: PEFT's plain prompt tuning prepends
    only the first num_virtual_tokens rows (the encoder half) and drops the decoder half that MPT's
    forward feeds to the decoder. ``encoder_only`` exports just the encoder half (num_transformer_submodules
    1), which is exactly what ``generate()`` uses for MPT too, but not what MPT's forward (training loss) sees.
    ``peft_compat``: as in :func:`select_tasks`.
    """
    task = checked_index(task, "task")
    ckpt = load_source(source)
    extra: list[Finding] = []
    cols_shape = ckpt.shapes.get("prefix_task_cols")
    if cols_shape and len(cols_shape) == 3:
        extra += _check_tasks("task", [task], cols_shape[0])
    nts = ckpt.config.num_transformer_submodules or 1
    nvt = ckpt.config.size("num_virtual_tokens")
    if nts == 2 and not encoder_only:
        fix = f"pass {flag('--encoder-only', 'encoder_only=True')} to export the encoder half (what generate() uses)"
        extra.append(seq2seq_decoder_finding(fix))
    if encoder_only and nts != 2:
        extra.append(
            Finding.error(
                "usage",
                "encoder_only",
                "applies to seq2seq adapters with 2 transformer submodules",
                expected=2,
                found=nts,
                fix="drop " + flag("--encoder-only", "encoder_only=True"),
            )
        )
    warnings = require_valid(ckpt, extra)
    if nvt is None:
        give = flag("--num-virtual-tokens", "ConfigOverrides(num_virtual_tokens=...)")
        raise ValidationError(f"num_virtual_tokens is unknown; give {give}", ckpt.location)
    guard_output(out, force=force, protected=ckpt.source_paths)
    prompt = task_prompt(ckpt, task)
    if encoder_only:
        prompt = prompt[:nvt].contiguous()
    import torch

    if not bool(torch.isfinite(prompt).all()):
        raise ValidationError(f"task {task}'s prompt holds NaN/Inf values; nothing written", ckpt.location)
    tensors = {"prompt_embeddings": from_torch(prompt)}
    config = prompt_tuning_config(ckpt, nvt, 1 if encoder_only else nts)
    result = _write_and_report(
        "export-prompt",
        ckpt,
        out,
        tensors,
        fit_for_peft(config, peft_compat, ckpt.where),
        {"task": task, "encoder_only": "true" if encoder_only else None},
        force=force,
        task=task,
        encoder_only=encoder_only,
        peft_type="PROMPT_TUNING",
        num_virtual_tokens=nvt,
        num_transformer_submodules=config["num_transformer_submodules"],
        prompt_norm=float(np.linalg.norm(to_float64(tensors["prompt_embeddings"]))),
        warnings=warnings,
    )
    return cast(ExportPromptResult, result)
