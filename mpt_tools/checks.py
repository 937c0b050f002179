"""Validation: every problem with a source (and its planned target) as a list of findings.

Checks run on the header first (keys, dtypes, shapes, config); values (finiteness) are scanned in
chunks of tasks so memory stays bounded whatever the number of tasks.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from .config import INIT_MODES, PEFT_TYPE, SIZE_FIELDS, TASK_TYPES, MptConfig
from .errors import ValidationError
from .formats import CANONICAL, DTYPES, FLOAT_DTYPES, Raw, to_float32
from .source import Checkpoint

CHUNK_BYTES = 32 << 20
MODES = {
    "average": "average",
    "average_source_tasks": "average",
    "exact": "exact",
    "exact_source_task": "exact",
    "shared": "shared",
    "only_source_shared": "shared",
}
PEFT_MODE_NAMES = {"average": "AVERAGE_SOURCE_TASKS", "exact": "EXACT_SOURCE_TASK", "shared": "ONLY_SOURCE_SHARED"}


def canonical_mode(mode: str) -> str:
    """Map a mode name (ours or PEFT's, any case) to "average", "exact" or "shared"."""
    from .errors import ConfigError

    key = mode.strip().lower().replace("-", "_")
    if key not in MODES:
        raise ConfigError(
            f"unknown mode {mode!r}: use average, exact or shared "
            "(or AVERAGE_SOURCE_TASKS, EXACT_SOURCE_TASK, ONLY_SOURCE_SHARED)"
        )
    return MODES[key]


@dataclass
class Finding:
    """One problem (or remark): its level, a stable code, the field, expected/found and the fix."""

    level: str  # "error", "warning" or "info"
    code: str
    field: str
    message: str
    expected: Any = None
    found: Any = None
    fix: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The finding as a JSON-ready dict."""
        return asdict(self)

    def line(self) -> str:
        """One human-readable line."""
        parts = [f"{self.level}: {self.field}: {self.message}"]
        if self.expected is not None or self.found is not None:
            parts.append(f"(expected {self.expected}, found {self.found})")
        text = " ".join(parts)
        return f"{text}; fix: {self.fix}" if self.fix else text


def errors(findings: list[Finding]) -> list[Finding]:
    """Only the findings at level error."""
    return [f for f in findings if f.level == "error"]


def refusal(location: str, problems: list[Finding]) -> ValidationError:
    """One error for a list of error findings: the first in full, then how many more there are."""
    first = problems[0]
    msg = f"{first.field}: {first.message}"
    if first.expected is not None or first.found is not None:
        msg += f" (expected {first.expected}, found {first.found})"
    if first.fix:
        msg += f"; fix: {first.fix}"
    if len(problems) > 1:
        msg += f" [and {len(problems) - 1} more problem(s): run `mpt-tools validate`]"
    return ValidationError(msg, location, problems)


def config_findings(cfg: MptConfig, from_file: bool) -> list[Finding]:
    """Problems in the config fields themselves (types, ranges, enums, the reload trap)."""
    out: list[Finding] = []
    raw = cfg.raw
    if from_file:
        peft_type = raw.get("peft_type")
        if peft_type != PEFT_TYPE:
            out.append(
                Finding(
                    "error",
                    "peft-type",
                    "peft_type",
                    "not a Multitask Prompt Tuning adapter",
                    PEFT_TYPE,
                    peft_type,
                    "use an adapter trained with MultitaskPromptTuningConfig",
                )
            )
    for name in SIZE_FIELDS:
        value = raw.get(name)
        if value is None:
            if name in ("num_virtual_tokens", "token_dim") and from_file:
                out.append(
                    Finding(
                        "warning",
                        "missing-field",
                        name,
                        "not set in the config",
                        "a positive integer",
                        None,
                        f"give --{name.replace('_', '-')}",
                    )
                )
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            out.append(
                Finding(
                    "error",
                    "bad-type",
                    name,
                    "must be an integer",
                    "a positive integer",
                    repr(value),
                    f"write {name} as a JSON integer",
                )
            )
        elif value <= 0:
            out.append(
                Finding(
                    "error",
                    "bad-size",
                    name,
                    "must be positive",
                    "> 0",
                    value,
                    f"set {name} to the value the adapter was trained with",
                )
            )
        elif name == "num_transformer_submodules" and value not in (1, 2):
            out.append(
                Finding(
                    "error",
                    "bad-size",
                    name,
                    "PEFT supports 1 or 2 submodules",
                    "1 or 2",
                    value,
                    "use 1 (decoder-only) or 2 (encoder-decoder)",
                )
            )
    task_type = raw.get("task_type")
    if task_type is None:
        if from_file:
            out.append(
                Finding(
                    "error",
                    "task-type",
                    "task_type",
                    "is null: PEFT cannot tell seq2seq from causal",
                    "one of " + ", ".join(TASK_TYPES),
                    None,
                    "give --task-type",
                )
            )
    elif task_type not in TASK_TYPES:
        out.append(
            Finding(
                "error",
                "task-type",
                "task_type",
                "unknown task type",
                "one of " + ", ".join(TASK_TYPES),
                task_type,
                "give --task-type",
            )
        )
    init = raw.get("prompt_tuning_init", "RANDOM")
    if init not in INIT_MODES:
        out.append(
            Finding(
                "error",
                "init-mode",
                "prompt_tuning_init",
                "unknown value: PEFT silently treats it as RANDOM",
                "one of " + ", ".join(INIT_MODES),
                init,
                "set it to RANDOM",
            )
        )
    elif init in ("AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED"):
        out.append(
            Finding(
                "warning",
                "reload-trap",
                "prompt_tuning_init",
                f"PEFT re-reads {raw.get('prompt_tuning_init_state_dict_path')!r} on every load, "
                "so this adapter fails on other machines",
                "RANDOM",
                init,
                "rewrite it with `mpt-tools init` or set RANDOM and a null path",
            )
        )
    task = raw.get("prompt_tuning_init_task", 0)
    if task is not None and (isinstance(task, bool) or not isinstance(task, int)):
        out.append(
            Finding(
                "error",
                "bad-type",
                "prompt_tuning_init_task",
                "must be an integer",
                "an integer >= 0",
                repr(task),
                "write it as a JSON integer",
            )
        )
    elif isinstance(task, int) and task < 0:
        out.append(
            Finding(
                "error",
                "negative-task",
                "prompt_tuning_init_task",
                "negative task index: PEFT silently counts from the end",
                ">= 0",
                task,
                "use the task's non-negative index",
            )
        )
    for name, why in cfg.assumed.items():
        out.append(Finding("info", "assumed", name, f"assumed {why}"))
    return out


def tensor_findings(ckpt: Checkpoint) -> list[Finding]:
    """Problems visible from the header: missing keys, dtypes, ranks, shape agreement, config."""
    out: list[Finding] = []
    for note in ckpt.notes:
        if note.startswith("renamed"):
            out.append(Finding("info", "renamed-key", "keys", note))
    for key in ckpt.ignored:
        out.append(Finding("warning", "extra-key", key, "not an MPT tensor; ignored"))
    shapes = ckpt.shapes
    want_ndim = {"prompt_embeddings": 2, "prefix_task_cols": 3, "prefix_task_rows": 3}
    for name in CANONICAL:
        info = ckpt.info(name)
        if info is None:
            why = {
                "prompt_embeddings": "PEFT fails with KeyError when it loads this adapter",
                "prefix_task_cols": "PEFT would silently keep random task factors",
                "prefix_task_rows": "PEFT would silently keep random task factors",
            }[name]
            out.append(
                Finding(
                    "error",
                    "missing-tensor",
                    name,
                    f"tensor missing: {why}",
                    "present",
                    "absent",
                    "use the full adapter state dict (all three tensors)",
                )
            )
            continue
        if info.dtype not in FLOAT_DTYPES:
            out.append(
                Finding(
                    "error",
                    "dtype",
                    name,
                    "not a floating-point tensor",
                    "float32, bfloat16, float16 or float64",
                    info.dtype,
                    "save the adapter's float parameters",
                )
            )
        if len(info.shape) != want_ndim[name]:
            out.append(
                Finding(
                    "error",
                    "ndim",
                    name,
                    f"must have {want_ndim[name]} dimensions",
                    want_ndim[name],
                    list(info.shape),
                    "check that this is an MPT adapter",
                )
            )
            shapes.pop(name, None)
        elif 0 in info.shape:
            out.append(
                Finding(
                    "error",
                    "empty",
                    name,
                    "has an empty dimension",
                    "all sizes > 0",
                    list(info.shape),
                    "check the adapter",
                )
            )
    pe, cols, rows = shapes.get("prompt_embeddings"), shapes.get("prefix_task_cols"), shapes.get("prefix_task_rows")
    pairs = []
    if cols and rows:
        pairs.append(("num_tasks", "prefix_task_cols", cols[0], "prefix_task_rows", rows[0]))
        pairs.append(("num_ranks", "prefix_task_cols", cols[2], "prefix_task_rows", rows[1]))
    if pe and cols:
        pairs.append(("T", "prompt_embeddings", pe[0], "prefix_task_cols", cols[1]))
    if pe and rows:
        pairs.append(("token_dim", "prompt_embeddings", pe[1], "prefix_task_rows", rows[2]))
    for fieldname, a, av, b, bv in pairs:
        if av != bv:
            out.append(
                Finding(
                    "error",
                    "tensors-disagree",
                    fieldname,
                    f"{a} and {b} disagree on {fieldname}",
                    f"{av} (from {a})",
                    f"{bv} (from {b})",
                    "the tensors come from different adapters or a corrupted save",
                )
            )
    cfg = ckpt.config
    expected = cfg.expected_shapes()
    labels = {
        "prompt_embeddings": ("T", "token_dim"),
        "prefix_task_cols": ("num_tasks", "T", "num_ranks"),
        "prefix_task_rows": ("num_tasks", "num_ranks", "token_dim"),
    }
    reported: set[tuple[str, Any, Any]] = set()
    for name, shape in shapes.items():
        for label, want, got in zip(labels[name], expected[name], shape, strict=False):
            if want is None or want == got:
                continue
            field_name = "num_virtual_tokens x num_transformer_submodules" if label == "T" else label
            seen = (field_name, want, got)
            if seen in reported:
                continue
            reported.add(seen)
            out.append(
                Finding(
                    "error",
                    "config-mismatch",
                    field_name,
                    f"config says {want} but {name} has {got}",
                    want,
                    got,
                    f"fix the config or pass the right --{label.replace('_', '-')}"
                    if label != "T"
                    else "pass the right --num-virtual-tokens / --num-transformer-submodules or --task-type",
                )
            )
    return out


def task_runs(tasks: list[int], step: int) -> list[tuple[int, int]]:
    """Split task indices, in their order, into runs ``(start, stop)`` of consecutive tasks, each
    at most ``step`` long, so that each run is read from the file in one piece."""
    runs: list[tuple[int, int]] = []
    for k in tasks:
        if runs and runs[-1][1] == k and k - runs[-1][0] < step:
            runs[-1] = (runs[-1][0], k + 1)
        else:
            runs.append((k, k + 1))
    return runs


def iter_task_chunks(ckpt: Checkpoint, name: str, max_bytes: int = CHUNK_BYTES) -> Iterator[tuple[int, int, Raw]]:
    """Yield ``(start, stop, raw)`` over a factor tensor in chunks of whole tasks, each at most
    ``max_bytes`` (at least one task)."""
    info = ckpt.info(name)
    if info is None or not info.shape:
        return
    n = info.shape[0]
    per_task = max(1, math.prod(info.shape[1:]) * DTYPES[info.dtype][0])
    step = max(1, max_bytes // per_task)
    for start in range(0, n, step):
        stop = min(n, start + step)
        yield start, stop, ckpt.read_rows(name, start, stop)


def value_findings(ckpt: Checkpoint, chunk_bytes: int = CHUNK_BYTES) -> list[Finding]:
    """Non-finite values in each float tensor, scanned in bounded chunks."""
    out: list[Finding] = []
    for name in CANONICAL:
        info = ckpt.info(name)
        if info is None or info.dtype not in FLOAT_DTYPES or not info.shape or 0 in info.shape:
            continue
        bad = 0
        first: int | None = None
        for start, _stop, raw in iter_task_chunks(ckpt, name, chunk_bytes):
            values = to_float32(raw)
            mask = ~np.isfinite(values)
            count = int(mask.sum())
            if count and first is None:
                first = start + int(np.argwhere(mask)[0][0])
            bad += count
        if bad:
            where = f"row {first}" if name == "prompt_embeddings" else f"task {first}"
            out.append(
                Finding(
                    "error",
                    "non-finite",
                    name,
                    f"{bad} NaN/Inf values (first in {where})",
                    "finite values",
                    f"{bad} non-finite",
                    "retrain or restore the adapter",
                )
            )
    return out


def check_source(ckpt: Checkpoint, *, values: bool = True) -> list[Finding]:
    """All findings for a source: config fields, tensors against each other and the config,
    and (when ``values``) non-finite values."""
    out = config_findings(ckpt.config, ckpt.config_from_file)
    out += tensor_findings(ckpt)
    if values:
        out += value_findings(ckpt)
    return out


def target_config_findings(target: MptConfig) -> list[Finding]:
    """Problems of a planned target config itself, labelled as the target's (``target <field>``,
    naming the file) so they cannot be mistaken for the source's; the reload trap is left out
    (a target config naming PEFT's init is what ``init`` replaces)."""
    where = os.path.basename(os.fspath(target.path)) if target.path else "the target config"
    out = []
    for f in config_findings(target, True):
        if f.code == "reload-trap":
            continue
        if f.code == "peft-type":
            fix = f"set peft_type to {PEFT_TYPE} in {where}"
        else:
            fix = f"set {f.field} in {where}" if f.fix.startswith("give --") else f.fix
        out.append(replace(f, field=f"target {f.field}", message=f"{f.message} (in {where})", fix=fix))
    return out


def check_target(
    ckpt: Checkpoint,
    mode: str,
    *,
    target: MptConfig | None = None,
    task: int | None = None,
    num_tasks: int | None = None,
    num_ranks: int | None = None,
    peft_init_path: bool = True,
) -> list[Finding]:
    """Findings for building a target of ``mode`` from ``ckpt``.

    average/exact need the same T, r and d (and, for PEFT's own init path, target num_tasks 1);
    shared needs the same T and d. ``target`` is a planned target config; ``num_tasks`` and
    ``num_ranks`` are the planned target's values when no config is given.
    """
    mode = canonical_mode(mode)
    out: list[Finding] = []
    shapes = ckpt.shapes
    pe, cols = shapes.get("prompt_embeddings"), shapes.get("prefix_task_cols")
    src_t = pe[0] if pe and len(pe) == 2 else None
    src_d = pe[1] if pe and len(pe) == 2 else None
    src_r = cols[2] if cols and len(cols) == 3 else None
    src_n = cols[0] if cols and len(cols) == 3 else None
    if target is not None:
        out += target_config_findings(target)
        tgt_t, tgt_d = target.total_virtual_tokens, target.size("token_dim")
        t_n, t_r = target.size("num_tasks"), target.size("num_ranks")
        num_tasks = num_tasks if num_tasks is not None else t_n
        num_ranks = num_ranks if num_ranks is not None else t_r
        for field_name, want, got, fix in (
            (
                "num_virtual_tokens x num_transformer_submodules",
                src_t,
                tgt_t,
                "the target must use the source's num_virtual_tokens and num_transformer_submodules",
            ),
            ("token_dim", src_d, tgt_d, "the target base model must have the source's hidden size"),
        ):
            if want is not None and got is not None and want != got:
                out.append(
                    Finding(
                        "error",
                        "target-mismatch",
                        field_name,
                        f"target config differs from the source ({mode} needs them equal)",
                        want,
                        got,
                        fix,
                    )
                )
    if mode in ("average", "exact"):
        if ckpt.info("prefix_task_cols") is None or ckpt.info("prefix_task_rows") is None:
            out.append(
                Finding(
                    "error",
                    "missing-tensor",
                    "prefix_task_cols/rows",
                    f"{mode} needs the source task factors",
                    "present",
                    "absent",
                    "use --mode shared, or a source with its task factors",
                )
            )
        if num_ranks is not None and src_r is not None and num_ranks != src_r:
            out.append(
                Finding(
                    "error",
                    "target-mismatch",
                    "num_ranks",
                    f"{mode} copies factors, so the target rank must be the source's",
                    src_r,
                    num_ranks,
                    f"set the target num_ranks to {src_r} (or use --mode shared)",
                )
            )
        if peft_init_path and num_tasks is not None and num_tasks != 1:
            out.append(
                Finding(
                    "error",
                    "target-mismatch",
                    "num_tasks",
                    f"PEFT's {PEFT_MODE_NAMES[mode]} makes a 1-task target",
                    1,
                    num_tasks,
                    "set the target num_tasks to 1",
                )
            )
    if mode == "exact":
        if task is None:
            task = 0
        if src_n is not None:
            if task < 0:
                resolved = src_n + task
                out.append(
                    Finding(
                        "error",
                        "negative-task",
                        "task",
                        "negative task index: PEFT would silently take "
                        + (f"task {resolved} (counting from the end)" if resolved >= 0 else "nothing"),
                        f"0..{src_n - 1}",
                        task,
                        f"pass --task {resolved} (or --allow-negative-task to count from the end)"
                        if resolved >= 0
                        else f"pass a task in 0..{src_n - 1}",
                    )
                )
            elif task >= src_n:
                out.append(
                    Finding(
                        "error",
                        "task-range",
                        "task",
                        f"the source has {src_n} tasks",
                        f"0..{src_n - 1}",
                        task,
                        f"pass a task in 0..{src_n - 1}",
                    )
                )
    return out
