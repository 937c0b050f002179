"""Task surgery on MPT adapters: select tasks, change the rank, convert files, export one task's prompt.

Every operation reads a SOURCE (see :func:`mpt_tools.source.load_source`), checks it, computes the
new tensors in memory and only then writes, through :func:`mpt_tools.writer.write_adapter` (or
:func:`mpt_tools.formats.atomic_write` for a single file): atomic, ``force`` to overwrite, never into
the source's folder, with ``mpt_tools.*`` provenance metadata and a PEFT-style adapter_config.json.

- :func:`select_tasks`: keep, drop, reorder (or repeat) tasks; bitwise copies in the source dtype.
- :func:`rerank`: change num_ranks. Lower: per task the best rank-R approximation of
  ``cols[k] @ rows[k]`` (truncated SVD, split as ``U_r sqrt(S)``, ``sqrt(S) V_r^T``); higher: zero
  padding, exact.
- :func:`convert`: .bin/.pt/.safetensors to safetensors with canonical keys and an optional dtype cast,
  verified by reloading what was written.
- :func:`export_prompt`: one task's effective prompt ``P* * (cols[k] @ rows[k])`` as a plain PEFT
  PROMPT_TUNING adapter, computed the way PEFT's forward computes it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .checks import Finding, check_source, errors, refusal, task_runs
from .config import PEFT_DEFAULTS, target_config
from .errors import ValidationError, VerifyError, WriteError
from .formats import (
    DTYPE_CHOICES,
    DTYPE_NAMES,
    Raw,
    atomic_write,
    canonical_dtype,
    from_numpy,
    from_torch,
    open_safetensors,
    safetensors_bytes,
    same_bytes,
    to_float32,
    to_float64,
    to_torch,
    torch_dtype,
)
from .source import Checkpoint, load_source
from .writer import WEIGHTS_NAME, check_output_dir, provenance, source_folders, write_adapter, write_files

FACTOR_KEYS = ("prefix_task_cols", "prefix_task_rows")
MAX_ELEMENTS = 1 << 31
CHUNK_BYTES = 64 << 20
FP16_MAX = 65504.0

# The fields PEFT 0.21 writes for a PromptTuningConfig (save_pretrained), with its defaults: the
# MultitaskPromptTuningConfig's fields less the four MPT ones.
_MPT_ONLY = ("num_ranks", "num_tasks", "prompt_tuning_init_state_dict_path", "prompt_tuning_init_task")
PROMPT_TUNING_DEFAULTS: dict[str, Any] = {
    **{k: v for k, v in PEFT_DEFAULTS.items() if k not in _MPT_ONLY},
    "num_transformer_submodules": 1,
    "peft_type": "PROMPT_TUNING",
}
# Fields a PROMPT_TUNING config takes over from the MPT source config.
_PT_FROM_SOURCE = (
    "base_model_name_or_path",
    "num_attention_heads",
    "num_layers",
    "peft_version",
    "revision",
    "task_type",
    "token_dim",
)


# ---------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------


def _require(ckpt: Checkpoint, extra: list[Finding] | None = None, *, values: bool = True) -> list[str]:
    """Raise ValidationError listing every error of the source (plus ``extra``); return the warnings."""
    findings = check_source(ckpt, values=values) + (extra or [])
    problems = errors(findings)
    if problems:
        raise refusal(ckpt.location, problems)
    return [f.line() for f in findings if f.level == "warning"]


def _usage(field_name: str, message: str, expected: Any, found: Any, fix: str, code: str = "usage") -> Finding:
    return Finding("error", code, field_name, message, expected, found, fix)


def _dims(ckpt: Checkpoint) -> tuple[int, int, int, int]:
    """(N, T, r, d) of a checked source."""
    n, t, r = ckpt.shapes["prefix_task_cols"]
    d = ckpt.shapes["prompt_embeddings"][1]
    return n, t, r, d


def _result(
    schema: str, ckpt: Checkpoint, out: str | os.PathLike[str], files: list[str], **extra: Any
) -> dict[str, Any]:
    res: dict[str, Any] = {
        "schema": f"mpt-tools/{schema}/1",
        "source": ckpt.location,
        "source_sha256": ckpt.sha256(),
        "out": str(out),
        "files": files,
    }
    res.update(extra)
    res.setdefault("notes", list(ckpt.notes))
    res["version"] = __version__
    return res


def _write_and_report(
    operation: str,
    ckpt: Checkpoint,
    out: str | os.PathLike[str],
    tensors: dict[str, Raw],
    config: dict[str, Any],
    recorded: dict[str, Any],
    *,
    force: bool,
    **extra: Any,
) -> dict[str, Any]:
    """Write an adapter folder (``mpt_tools.*`` provenance: the operation, the source and
    ``recorded``) and return the command's result: :func:`_result` with ``extra``, the tensor
    shapes and the metadata written."""
    meta = provenance({"operation": operation, **ckpt.provenance(), **recorded})
    written = write_adapter(out, tensors, config, meta, force=force, protected=ckpt.source_paths)
    shapes = {k: list(v.shape) for k, v in tensors.items()}
    return _result(operation, ckpt, out, written, **extra, shapes=shapes, metadata=meta)


def _check_tasks(field_name: str, tasks: Sequence[int], n: int) -> list[Finding]:
    out: list[Finding] = []
    if not tasks:
        out.append(_usage(field_name, "no tasks given", "at least one task", "[]", "list tasks like 2,0"))
    bad = [t for t in tasks if t < 0 or t >= n]
    if bad:
        out.append(
            _usage(
                field_name, f"the source has {n} tasks", f"0..{n - 1}", bad, f"pick tasks in 0..{n - 1}", "task-range"
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


def select_tasks(
    source: str | os.PathLike[str] | Checkpoint,
    select: Sequence[int],
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    overrides: dict[str, Any] | None = None,
    subfolder: str | None = None,
    hub_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write an adapter whose task ``i`` is source task ``select[i]``.

    Selecting keeps, drops and reorders tasks (a task may be listed twice, to start a new task from
    it). ``prompt_embeddings`` and each selected task's factors are copied bitwise in the source
    dtype; only the selected tasks' bytes are read. ``num_tasks`` in the config follows.
    """
    ckpt = load_source(source, overrides=overrides, subfolder=subfolder, hub_options=hub_options)
    select = [int(s) for s in select]
    extra: list[Finding] = []
    cols_shape = ckpt.shapes.get("prefix_task_cols")
    if cols_shape and len(cols_shape) == 3:
        extra += _check_tasks("select", select, cols_shape[0])
    warnings = _require(ckpt, extra)
    n, _t, r, _d = _dims(ckpt)
    check_output_dir(out, force=force, protected=ckpt.source_paths)
    tensors: dict[str, Raw] = {"prompt_embeddings": ckpt.read("prompt_embeddings")}
    for name in FACTOR_KEYS:
        tensors[name] = _gather(ckpt, name, select)
    repeated = sorted({k for k in select if select.count(k) > 1})
    dropped = [k for k in range(n) if k not in select]
    notes = list(ckpt.notes)
    if repeated:
        notes.append(f"tasks listed more than once: {repeated}")
    return _write_and_report(
        "tasks",
        ckpt,
        out,
        tensors,
        target_config(ckpt.config, len(select), r),
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
    source: str | os.PathLike[str] | Checkpoint,
    num_ranks: int,
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    overrides: dict[str, Any] | None = None,
    subfolder: str | None = None,
    hub_options: dict[str, Any] | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> dict[str, Any]:
    """Write an adapter with rank ``num_ranks``; factors are float32 (PEFT's dtype).

    Higher (or equal) rank: the factors are zero-padded, so every prompt is exactly the source's.
    Lower rank: per task, when the dropped rank components are exactly zero the factors are truncated
    (exact); otherwise they are replaced by the best rank-R approximation of ``cols[k] @ rows[k]``
    (truncated SVD). The result reports per task the relative error of the prompt it causes,
    ``|P* * (approx - exact)|_F / |P* * exact|_F`` (float64; 0 when exact).
    """
    ckpt = load_source(source, overrides=overrides, subfolder=subfolder, hub_options=hub_options)
    extra: list[Finding] = []
    if num_ranks < 1:
        extra.append(_usage("num_ranks", "must be positive", ">= 1", num_ranks, "pass --num-ranks 1 or more"))
    shapes = ckpt.shapes
    pe_shape, cols_shape = shapes.get("prompt_embeddings"), shapes.get("prefix_task_cols")
    if pe_shape and cols_shape and len(pe_shape) == 2 and len(cols_shape) == 3:
        n0, t0, _ = cols_shape
        d0 = pe_shape[-1]
        size = n0 * max(num_ranks, 0) * (t0 + d0)
        if size > MAX_ELEMENTS:
            extra.append(
                _usage(
                    "num_ranks", f"the factors would hold {size} values", f"<= {MAX_ELEMENTS}", num_ranks, "lower it"
                )
            )
    warnings = _require(ckpt, extra)
    n, t, r, d = _dims(ckpt)
    check_output_dir(out, force=force, protected=ckpt.source_paths)
    pe32 = np.ascontiguousarray(to_float32(ckpt.read("prompt_embeddings")))
    pe64 = pe32.astype(np.float64)
    new_cols = np.zeros((n, t, num_ranks), dtype=np.float32)
    new_rows = np.zeros((n, num_ranks, d), dtype=np.float32)
    per_task: list[dict[str, Any]] = []
    keep = min(r, num_ranks)
    step = max(1, chunk_bytes // max(1, (t * r + r * d) * 8 + t * d * 16))
    # two float64 [T, d] buffers for the error of an SVD'd task, reused for every task
    exact_buf = diff_buf = None
    for start in range(0, n, step):
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
    return _write_and_report(
        "rerank",
        ckpt,
        out,
        tensors,
        target_config(ckpt.config, n, num_ranks),
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


# ---------------------------------------------------------------------------------------------
# convert
# ---------------------------------------------------------------------------------------------


CAST_CHUNK = 1 << 20  # elements per step of a cast: a few float64 temporaries of 8 MiB each


def cast_tensor(name: str, raw: Raw, tag: str) -> tuple[Raw, dict[str, Any]]:
    """Cast one tensor to the dtype ``tag`` (F32, BF16 or F16) with torch's round-to-nearest-even.

    Returns the cast tensor and its cast report (``max_abs_error``, ``max_relative_error``,
    ``flushed_to_zero``). Raises ValidationError naming the tensor and the value when a finite
    value overflows the target dtype (float16's largest value is 65504). Works through the tensor
    in steps of ``CAST_CHUNK`` elements, so the float64 error analysis needs a few small buffers
    rather than several copies of the tensor.
    """
    import torch

    if raw.dtype == tag:
        return raw, {"max_abs_error": 0.0, "max_relative_error": 0.0, "flushed_to_zero": 0}
    src = to_torch(raw).reshape(-1)
    cast = torch.empty(src.shape, dtype=torch_dtype(tag))
    max_abs = max_rel = 0.0
    flushed = overflows = 0
    first: int | None = None
    worst = 0.0
    for start in range(0, src.numel(), CAST_CHUNK):
        s = src[start : start + CAST_CHUNK]
        c = cast[start : start + CAST_CHUNK]
        c.copy_(s)  # the cast itself: round to nearest even
        s64, c64 = s.double(), c.double()
        finite = torch.isfinite(s64)
        overflow = finite & ~torch.isfinite(c64)
        if bool(overflow.any()):
            values = s64[overflow]
            overflows += int(values.numel())
            if first is None:
                first = start + int(torch.nonzero(overflow)[0, 0])
            big = float(values[values.abs().argmax()])
            worst = big if abs(big) > abs(worst) else worst
            continue
        if overflows:
            continue  # only the overflow report matters now
        diff = c64.sub_(s64).abs_().masked_fill_(~finite, 0.0)
        nonzero = finite & (s64 != 0)
        flushed += int((nonzero & (c.double() == 0)).sum())
        if diff.numel():
            max_abs = max(max_abs, float(diff.max()))
            rel = diff.div_(s64.abs_().clamp_min_(1e-300)).masked_fill_(~nonzero, 0.0)
            max_rel = max(max_rel, float(rel.max()))
    if overflows:
        assert first is not None
        where = [int(i) for i in np.unravel_index(first, raw.shape)] if raw.shape else []
        limit = " (largest float16 value 65504)" if tag == "F16" else ""
        raise ValidationError(
            f"{name}: value {worst!r} at {where} is out of the {DTYPE_NAMES[tag]} range{limit}; "
            f"{overflows} value(s) would become inf; refusing to cast (keep float32 or use bfloat16)"
        )
    report = {"max_abs_error": max_abs, "max_relative_error": max_rel, "flushed_to_zero": flushed}
    return from_torch(cast.reshape(raw.shape), copy=False), report


def _read_back_equal(back: Any, name: str, meant: Raw, chunk_bytes: int = CHUNK_BYTES) -> bool:
    """Whether tensor ``name`` of the written file ``back`` holds exactly ``meant``, read back in
    chunks of rows (so the check does not hold a second copy of the tensor)."""
    info = back.infos[name]
    if info.dtype != meant.dtype or tuple(info.shape) != tuple(meant.shape):
        return False
    if not meant.shape:
        return same_bytes(back.read(name).array, meant.array)
    rows = meant.shape[0]
    step = max(1, chunk_bytes // max(1, info.nbytes // max(1, rows)))
    return all(
        same_bytes(back.read_rows(name, i, min(rows, i + step)).array, meant.array[i : i + step])
        for i in range(0, rows, step)
    )


def convert(
    source: str | os.PathLike[str] | Checkpoint,
    out: str | os.PathLike[str],
    *,
    dtype: str | None = None,
    force: bool = False,
    overrides: dict[str, Any] | None = None,
    subfolder: str | None = None,
    hub_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Convert SOURCE (.bin/.pt/.pth read weights-only, or .safetensors) to safetensors.

    Keys are normalised to ``prompt_embeddings``, ``prefix_task_cols``, ``prefix_task_rows``
    (other keys are dropped, with a warning); ``dtype`` (float32, bfloat16, float16) casts every
    tensor. ``out`` ending in ``.safetensors`` is a file; anything else is a folder that receives
    ``adapter_model.safetensors`` plus, when the source has one, its adapter_config.json refreshed
    (prompt_tuning_init RANDOM, null path, PEFT's fields filled in). After writing, the file is read
    back and compared bitwise with what was meant to be written (a plain conversion is therefore
    bitwise the source's values); for a cast the result reports the max cast error. A finite value
    out of the target dtype's range is refused, naming the tensor and the value.
    """
    ckpt = load_source(source, overrides=overrides, subfolder=subfolder, hub_options=hub_options)
    tag: str | None = None
    extra: list[Finding] = []
    if dtype is not None:
        key = canonical_dtype(dtype)
        if key not in DTYPE_CHOICES:
            extra.append(
                _usage("dtype", "unsupported dtype", "float32, bfloat16 or float16", dtype, "pick one of those")
            )
        else:
            tag = DTYPE_CHOICES[key]
    warnings = _require(ckpt, extra)
    for key in ckpt.ignored:
        warnings.append(f"dropped {key!r}: not an MPT tensor")
    out_path = Path(out)
    as_file = out_path.suffix.lower() == ".safetensors" and not out_path.is_dir()
    protected = ckpt.source_paths
    if as_file:
        if out_path.exists() and not out_path.is_file():
            raise WriteError("exists and is not a file", str(out_path))
        if out_path.resolve() in {Path(p).resolve() for p in protected}:
            raise WriteError("is the source file itself; mpt-tools never writes over a source", str(out_path))
        if out_path.resolve().parent in source_folders(protected):
            raise WriteError("is in the source's own folder; mpt-tools never writes into a source", str(out_path))
        if os.path.lexists(out_path) and not force:
            raise WriteError("already exists; pass --force to overwrite it", str(out_path))
    else:
        check_output_dir(out_path, force=force, protected=protected)
    tensors: dict[str, Raw] = {}
    casts: dict[str, dict[str, Any]] = {}
    dtypes_before: dict[str, str] = {}
    for name in ("prompt_embeddings", "prefix_task_cols", "prefix_task_rows"):
        if ckpt.info(name) is None:
            continue
        raw = ckpt.read(name)
        dtypes_before[name] = DTYPE_NAMES.get(raw.dtype, raw.dtype)
        if tag is not None and raw.dtype in DTYPE_NAMES:
            raw, report = cast_tensor(name, raw, tag)
            casts[name] = report
        tensors[name] = Raw(raw.dtype, raw.shape, np.ascontiguousarray(raw.array))
    meta = provenance(
        {
            "operation": "convert",
            **ckpt.provenance(),
            "source_format": ckpt.format,
            "dtype": DTYPE_NAMES[tag] if tag else None,
        }
    )
    written: list[str]
    config_written = False
    if as_file:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out_path, safetensors_bytes(tensors, meta))
        written = [str(out_path)]
        weights_file = out_path
    elif ckpt.config_from_file:
        cols = ckpt.shapes["prefix_task_cols"]
        config = target_config(ckpt.config, cols[0], cols[2])
        written = write_adapter(out_path, tensors, config, meta, force=force, protected=protected)
        weights_file = out_path / WEIGHTS_NAME
        config_written = True
    else:
        write_files(out_path, {WEIGHTS_NAME: safetensors_bytes(tensors, meta)})
        written = [str(out_path / WEIGHTS_NAME)]
        weights_file = out_path / WEIGHTS_NAME
    # Read back what was written and compare bitwise with what was meant.
    back = open_safetensors(weights_file)
    bad = [k for k in tensors if k not in back.infos or not _read_back_equal(back, k, tensors[k])]
    if bad or set(back.infos) != set(tensors):
        for path in written:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise VerifyError(f"read-back differs from what was written for {bad or sorted(back.infos)}", str(out))
    notes = list(ckpt.notes)
    if not as_file and not config_written:
        notes.append("the source has no adapter_config.json: wrote the weights only")
    max_cast = max((c["max_abs_error"] for c in casts.values()), default=0.0)
    flushed = sum(c["flushed_to_zero"] for c in casts.values())
    if flushed:
        warnings.append(f"{flushed} non-zero value(s) became 0 in {DTYPE_NAMES[tag or 'F32']}")
    return _result(
        "convert",
        ckpt,
        out,
        written,
        source_format=ckpt.format,
        dtype=DTYPE_NAMES[tag] if tag else None,
        dtypes_before=dtypes_before,
        dtypes_after={k: DTYPE_NAMES.get(v.dtype, v.dtype) for k, v in tensors.items()},
        keys={k: ckpt.keymap[k] for k in tensors},
        dropped=list(ckpt.ignored),
        verified="bitwise" if not casts or max_cast == 0.0 else "bitwise (after the cast)",
        exact=max_cast == 0.0,
        max_cast_error=max_cast,
        casts=casts,
        config_written=config_written,
        metadata=meta,
        warnings=warnings,
        notes=notes,
    )


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


def export_prompt(
    source: str | os.PathLike[str] | Checkpoint,
    task: int,
    out: str | os.PathLike[str],
    *,
    encoder_only: bool = False,
    force: bool = False,
    overrides: dict[str, Any] | None = None,
    subfolder: str | None = None,
    hub_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write task ``task``'s effective prompt as a plain PEFT PROMPT_TUNING adapter.

    The adapter holds ``prompt_embeddings`` [T, d] = ``P* * (cols[k] @ rows[k])``, computed as PEFT's
    forward does (see :func:`task_prompt`), so loading it with ``PeftModel.from_pretrained`` gives
    bitwise the prompt the MPT adapter gives with ``task_ids=[k]``.

    Seq2seq adapters with 2 transformer submodules are refused: PEFT's plain prompt tuning prepends
    only the first num_virtual_tokens rows (the encoder half) and drops the decoder half that MPT's
    forward feeds to the decoder. ``encoder_only`` exports just the encoder half (num_transformer_submodules
    1), which is exactly what ``generate()`` uses for MPT too, but not what MPT's forward (training loss) sees.
    """
    ckpt = load_source(source, overrides=overrides, subfolder=subfolder, hub_options=hub_options)
    extra: list[Finding] = []
    cols_shape = ckpt.shapes.get("prefix_task_cols")
    if cols_shape and len(cols_shape) == 3:
        extra += _check_tasks("task", [task], cols_shape[0])
    nts = ckpt.config.num_transformer_submodules or 1
    nvt = ckpt.config.size("num_virtual_tokens")
    if nts == 2 and not encoder_only:
        extra.append(
            _usage(
                "num_transformer_submodules",
                "PEFT's plain prompt tuning uses only the encoder half of a seq2seq prompt "
                "(PeftModelForSeq2SeqLM.forward drops the decoder half that MPT feeds to the decoder)",
                1,
                2,
                "pass --encoder-only to export the encoder half (what generate() uses)",
                "seq2seq-decoder",
            )
        )
    if encoder_only and nts != 2:
        extra.append(
            _usage(
                "encoder_only",
                "applies to seq2seq adapters with 2 transformer submodules",
                2,
                nts,
                "drop --encoder-only",
            )
        )
    warnings = _require(ckpt, extra)
    if nvt is None:
        raise ValidationError("num_virtual_tokens is unknown; give --num-virtual-tokens", ckpt.location)
    check_output_dir(out, force=force, protected=ckpt.source_paths)
    prompt = task_prompt(ckpt, task)
    if encoder_only:
        prompt = prompt[:nvt].contiguous()
    import torch

    if not bool(torch.isfinite(prompt).all()):
        raise ValidationError(f"task {task}'s prompt holds NaN/Inf values; nothing written", ckpt.location)
    tensors = {"prompt_embeddings": from_torch(prompt)}
    config = prompt_tuning_config(ckpt, nvt, 1 if encoder_only else nts)
    return _write_and_report(
        "export-prompt",
        ckpt,
        out,
        tensors,
        config,
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


__all__ = [
    "best_rank_factors",
    "cast_tensor",
    "convert",
    "export_prompt",
    "prompt_tuning_config",
    "rerank",
    "select_tasks",
    "task_prompt",
]
