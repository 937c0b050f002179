"""``convert``: a .bin/.pt/.pth (read weights-only) or .safetensors source to safetensors, with
canonical keys and an optional dtype cast, to one file or an adapter folder.

The output is guarded before any work (:func:`mpt_tools.files.guard_output`), written atomically,
and read back from its staged copy (before anything is moved into place) and compared: bitwise for
a plain conversion, against the cast values for ``dtype`` (whose largest error is reported; a value
beyond float16's range is refused, naming tensor and value).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, cast

import numpy as np

from .checkpoint import Source, load_source
from .checks import require_valid
from .config import WEIGHTS_NAME, target_config
from .dtypes import DTYPE_MAX
from .errors import ValidationError, VerifyError
from .files import atomic_write, guard_output, write_files
from .findings import Finding
from .formats import (
    DTYPE_CHOICES,
    DTYPE_NAMES,
    Raw,
    canonical_dtype,
    from_torch,
    open_safetensors,
    safetensors_bytes,
    same_bytes,
    to_torch,
    torch_dtype,
)
from .progress import chunk_starts
from .prompts import CHUNK_BYTES, plan_chunks
from .results import CastReport, ConvertResult
from .writer import _result, fit_for_peft, fit_note, provenance, write_adapter

# ---------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# tasks --select
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# rerank
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# convert
# ---------------------------------------------------------------------------------------------


CAST_CHUNK = 1 << 20  # elements per step of a cast: a few float64 temporaries of 8 MiB each


def cast_tensor(name: str, raw: Raw, tag: str) -> tuple[Raw, CastReport]:
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
    for start in chunk_starts(src.numel(), CAST_CHUNK, f"cast {name}", unit="value", scale=True):
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
        bf16_holds = tag != "BF16" and abs(worst) <= DTYPE_MAX["bfloat16"]
        raise ValidationError(
            f"{name}: value {worst!r} at {where} is out of the {DTYPE_NAMES[tag]} range{limit}; "
            f"{overflows} value(s) would become inf; refusing to cast "
            f"({'keep float32 or use bfloat16' if bf16_holds else 'keep float32'})"
        )
    report: CastReport = {"max_abs_error": max_abs, "max_relative_error": max_rel, "flushed_to_zero": flushed}
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
    step = plan_chunks(info.nbytes // max(1, rows), chunk_bytes)
    starts = chunk_starts(rows, step, f"read back {name}", unit="row")
    return all(
        same_bytes(back.read_rows(name, i, min(rows, i + step)).array, meant.array[i : i + step]) for i in starts
    )


def convert(
    source: Source,
    out: str | os.PathLike[str],
    *,
    dtype: str | None = None,
    force: bool = False,
    peft_compat: str | None = None,
) -> ConvertResult:
    """Convert SOURCE (.bin/.pt/.pth read weights-only, or .safetensors) to safetensors.

    Keys are normalised to ``prompt_embeddings``, ``prefix_task_cols``, ``prefix_task_rows``
    (other keys are dropped, with a warning); ``dtype`` (float32, bfloat16, float16) casts every
    tensor. ``out`` ending in ``.safetensors`` is a file; anything else is a folder that receives
    ``adapter_model.safetensors`` plus, when the source has one, its adapter_config.json refreshed
    (prompt_tuning_init RANDOM, null path, PEFT's fields filled in). The staged file is read back,
    before it is moved into place, and compared bitwise with what was meant to be written (a plain
    conversion is therefore bitwise the source's values); for a cast the result reports the max cast
    error. A finite value out of the target dtype's range is refused, naming the tensor and the
    value. The config loads
    in every PEFT release mpt-tools knows, or in exactly ``peft_compat``
    (:func:`mpt_tools.writer.fit_for_peft`).
    """
    ckpt = load_source(source)
    tag: str | None = None
    extra: list[Finding] = []
    if dtype is not None:
        key = canonical_dtype(dtype)
        if key not in DTYPE_CHOICES:
            extra.append(
                Finding.error(
                    "usage",
                    "dtype",
                    "unsupported dtype",
                    expected="float32, bfloat16 or float16",
                    found=dtype,
                    fix="pick one of those",
                )
            )
        else:
            tag = DTYPE_CHOICES[key]
    warnings = require_valid(ckpt, extra)
    out_path = Path(out)
    as_file = out_path.suffix.lower() == ".safetensors" and not os.path.isdir(out_path)
    fit = None
    if ckpt.config_from_file and not as_file:  # a folder gets a config: fitted (or refused) before any work
        cols = ckpt.shapes["prefix_task_cols"]
        fit = fit_for_peft(target_config(ckpt.config, cols[0], cols[2]), peft_compat, ckpt.where)
        warnings += fit.warnings
    for key in ckpt.ignored:
        warnings.append(f"dropped {key!r}: not an MPT tensor")
    protected = ckpt.source_paths
    guard_output(out_path, force=force, protected=protected, kind="file" if as_file else "dir")
    tensors: dict[str, Raw] = {}
    casts: dict[str, CastReport] = {}
    dtypes_before: dict[str, str] = {}
    for name in ("prompt_embeddings", "prefix_task_cols", "prefix_task_rows"):
        if ckpt.info(name) is None:
            continue
        raw = ckpt.read(name)
        dtypes_before[name] = DTYPE_NAMES.get(raw.dtype, raw.dtype)
        if tag is not None and raw.dtype in DTYPE_NAMES:
            try:
                raw, report = cast_tensor(name, raw, tag)
            except ValidationError as exc:  # name the file
                raise ValidationError(exc.message, ckpt.where) from None
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

    def read_back(staged: Path) -> None:
        """The staged weights, read back from disk and compared bitwise with what was meant to be
        written, before they are moved into place (a failure replaces nothing)."""
        back = open_safetensors(staged)
        bad = [k for k in tensors if k not in back.infos or not _read_back_equal(back, k, tensors[k])]
        if bad or set(back.infos) != set(tensors):
            raise VerifyError(f"read-back differs from what was written for {bad or sorted(back.infos)}", str(out))

    written: list[str]
    config_written = False
    if as_file:
        atomic_write(out_path, safetensors_bytes(tensors, meta), replace=force, check=read_back, parents=True)
        written = [str(out_path)]
    elif fit is not None:
        written = write_adapter(out_path, tensors, fit.config, meta, force=force, protected=protected, check=read_back)
        config_written = True
    else:
        write_files(
            out_path,
            {WEIGHTS_NAME: safetensors_bytes(tensors, meta)},
            force=force,
            check=lambda staging: read_back(staging / WEIGHTS_NAME),
        )
        written = [str(out_path / WEIGHTS_NAME)]
    notes = list(ckpt.notes)
    if not as_file and not config_written:
        notes.append("the source has no adapter_config.json: wrote the weights only")
    if fit is not None and peft_compat is not None:
        notes.append(fit_note(fit))
    max_cast = max((c["max_abs_error"] for c in casts.values()), default=0.0)
    flushed = sum(c["flushed_to_zero"] for c in casts.values())
    if flushed:
        warnings.append(f"{flushed} non-zero value(s) became 0 in {DTYPE_NAMES[tag or 'F32']}")
    result = _result(
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
    return cast(ConvertResult, result)


# ---------------------------------------------------------------------------------------------
# export-prompt
# ---------------------------------------------------------------------------------------------
