"""Validation: every problem with a source (and its planned target) as a list of findings.

Checks run on the header first (keys, dtypes, shapes, config); values (finiteness) are scanned in
chunks of tasks so memory stays bounded whatever the number of tasks.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .checkpoint import Checkpoint
from .config import INIT_MODES, PEFT_TYPE, SIZE_FIELDS, SOURCE_INITS, TASK_TYPES, MptConfig
from .errors import ConfigError, ValidationError, flag
from .findings import Finding, errors, refusal
from .formats import CANONICAL, FLOAT_DTYPES, memory_limit, more_than_memory, to_float32
from .modes import MAX_TARGET_TASKS, MODES, Mode, TargetPlan, get_mode
from .options import checked_index, checked_indices, checked_numbers, checked_seed
from .progress import tracked
from .prompts import CHUNK_BYTES, FLOAT32_MAX, iter_task_chunks, task_prompt_overflow

# --- the config's own fields ---------------------------------------------------------------------

Rule = Callable[[MptConfig, bool], Iterator[Finding]]
TYPES = "one of " + ", ".join(TASK_TYPES)


def _peft_type(cfg: MptConfig, from_file: bool) -> Iterator[Finding]:
    """A config file must be a Multitask Prompt Tuning one."""
    if from_file and cfg.raw.get("peft_type") != PEFT_TYPE:
        yield Finding.error(
            "peft-type",
            "peft_type",
            "not a Multitask Prompt Tuning adapter",
            expected=PEFT_TYPE,
            found=cfg.raw.get("peft_type"),
            fix="use an adapter trained with MultitaskPromptTuningConfig",
        )


def _sizes(cfg: MptConfig, from_file: bool) -> Iterator[Finding]:
    """Every size is a positive JSON integer; T and d are set in a file; 1 or 2 submodules."""
    for name in SIZE_FIELDS:
        value = cfg.raw.get(name)
        if value is None:
            if name in ("num_virtual_tokens", "token_dim") and from_file:
                fix = "give " + flag(f"--{name.replace('_', '-')}", f"ConfigOverrides({name}=...)")
                yield Finding.warning(
                    "missing-field", name, "not set in the config", expected="a positive integer", fix=fix
                )
        elif isinstance(value, bool) or not isinstance(value, int):
            yield Finding.error(
                "bad-type",
                name,
                "must be an integer",
                expected="a positive integer",
                found=repr(value),
                fix=f"write {name} as a JSON integer",
            )
        elif value <= 0:
            fix = f"set {name} to the value the adapter was trained with"
            yield Finding.error("bad-size", name, "must be positive", expected="> 0", found=value, fix=fix)
        elif name == "num_transformer_submodules" and value not in (1, 2):
            fix = "use 1 (decoder-only) or 2 (encoder-decoder)"
            yield Finding.error(
                "bad-size", name, "PEFT supports 1 or 2 submodules", expected="1 or 2", found=value, fix=fix
            )


def _task_type(cfg: MptConfig, from_file: bool) -> Iterator[Finding]:
    """A known task_type, set in a file (PEFT tells seq2seq from causal by it)."""
    task_type = cfg.raw.get("task_type")
    if task_type is None and from_file:
        message = "is null: PEFT cannot tell seq2seq from causal"
        yield Finding.error("task-type", "task_type", message, expected=TYPES, fix=_give_task_type())
    elif task_type is not None and task_type not in TASK_TYPES:
        yield Finding.error(
            "task-type", "task_type", "unknown task type", expected=TYPES, found=task_type, fix=_give_task_type()
        )


def _give_task_type() -> str:
    """The fix of a missing or unknown task_type: give one as a config override."""
    return "give " + flag("--task-type", "ConfigOverrides(task_type=...)")


def _init_mode(cfg: MptConfig, from_file: bool) -> Iterator[Finding]:
    """A known prompt_tuning_init; PEFT's source-to-target values are a trap on reload."""
    init = cfg.raw.get("prompt_tuning_init", "RANDOM")
    if init not in INIT_MODES:
        yield Finding.error(
            "init-mode",
            "prompt_tuning_init",
            "unknown value: PEFT silently treats it as RANDOM",
            expected="one of " + ", ".join(INIT_MODES),
            found=init,
            fix="set it to RANDOM",
        )
    elif init in SOURCE_INITS:
        yield Finding.warning(
            "reload-trap",
            "prompt_tuning_init",
            f"PEFT re-reads {cfg.raw.get('prompt_tuning_init_state_dict_path')!r} on every load, "
            "so this adapter fails on other machines",
            expected="RANDOM",
            found=init,
            fix="rewrite it with `mpt-tools init` or set RANDOM and a null path",
        )


def _init_task(cfg: MptConfig, from_file: bool) -> Iterator[Finding]:
    """prompt_tuning_init_task is a non-negative JSON integer (PEFT counts a negative one from the end)."""
    task = cfg.raw.get("prompt_tuning_init_task", 0)
    if task is not None and (isinstance(task, bool) or not isinstance(task, int)):
        yield Finding.error(
            "bad-type",
            "prompt_tuning_init_task",
            "must be an integer",
            expected="an integer >= 0",
            found=repr(task),
            fix="write it as a JSON integer",
        )
    elif isinstance(task, int) and task < 0:
        yield Finding.error(
            "negative-task",
            "prompt_tuning_init_task",
            "negative task index: PEFT silently counts from the end",
            expected=">= 0",
            found=task,
            fix="use the task's non-negative index",
        )


def _assumed(cfg: MptConfig, from_file: bool) -> Iterator[Finding]:
    """What mpt-tools assumed where the config says nothing."""
    for name, why in cfg.assumed.items():
        yield Finding.info("assumed", name, f"assumed {why}")


def _unknown_keys(cfg: MptConfig, from_file: bool) -> Iterator[Finding]:
    """Keys no PEFT release of the table knows (a typo, another tool's record): older releases
    refuse the config, newer ones drop the key with a warning."""
    from .peft_releases import CLASS_OF, STRICT_BEFORE, known_keys, supported_range

    peft_type = cfg.raw.get("peft_type")
    if not from_file or not isinstance(peft_type, str) or peft_type not in CLASS_OF:
        return
    known = known_keys(peft_type)
    strict = ".".join(map(str, STRICT_BEFORE))
    for key in cfg.raw:
        if key not in known:
            yield Finding.warning(
                "unknown-key",
                key,
                f"no PEFT release from {supported_range()} knows it: releases before {strict} refuse the "
                "config (TypeError), later ones drop the key",
                found=_shown_value(cfg.raw[key]),
                fix="leave it out (what mpt-tools writes leaves it out)",
            )


def _shown_value(value: Any) -> str:
    """A config value for a message: JSON, at most 40 characters."""
    import json

    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


CONFIG_RULES: tuple[Rule, ...] = (_peft_type, _sizes, _task_type, _init_mode, _init_task, _assumed, _unknown_keys)


def config_findings(cfg: MptConfig, from_file: bool) -> list[Finding]:
    """Problems in the config fields themselves: every rule of :data:`CONFIG_RULES`, in order."""
    return [finding for rule in CONFIG_RULES for finding in rule(cfg, from_file)]


# --- the tensors, against each other and the config ------------------------------------------------

NDIM = {"prompt_embeddings": 2, "prefix_task_cols": 3, "prefix_task_rows": 3}
MISSING_WHY = {
    "prompt_embeddings": "PEFT fails with KeyError when it loads this adapter",
    "prefix_task_cols": "PEFT would silently keep random task factors",
    "prefix_task_rows": "PEFT would silently keep random task factors",
}
# The config field behind each dimension of each tensor ("T" is nvt x nts).
DIM_FIELDS = {
    "prompt_embeddings": ("T", "token_dim"),
    "prefix_task_cols": ("num_tasks", "T", "num_ranks"),
    "prefix_task_rows": ("num_tasks", "num_ranks", "token_dim"),
}


def _keys(ckpt: Checkpoint) -> Iterator[Finding]:
    """Keys mpt-tools renamed, and keys that are not MPT tensors."""
    for note in ckpt.notes:
        if note.startswith("renamed"):
            yield Finding.info("renamed-key", "keys", note)
    for key in ckpt.ignored:
        yield Finding.warning("extra-key", key, "not an MPT tensor; ignored")


def _each_tensor(ckpt: Checkpoint, shapes: dict[str, tuple[int, ...]]) -> Iterator[Finding]:
    """Each of the three tensors is present, floating-point, of its rank and not empty (a tensor of
    the wrong rank leaves ``shapes``, so later rules do not read its dimensions)."""
    for name in CANONICAL:
        info = ckpt.info(name)
        if info is None:
            yield Finding.error(
                "missing-tensor",
                name,
                f"tensor missing: {MISSING_WHY[name]}",
                expected="present",
                found="absent",
                fix="use the full adapter state dict (all three tensors)",
            )
            continue
        if info.dtype not in FLOAT_DTYPES:
            yield Finding.error(
                "dtype",
                name,
                "not a floating-point tensor",
                expected="float32, bfloat16, float16 or float64",
                found=info.dtype,
                fix="save the adapter's float parameters",
            )
        if len(info.shape) != NDIM[name]:
            yield Finding.error(
                "ndim",
                name,
                f"must have {NDIM[name]} dimensions",
                expected=NDIM[name],
                found=list(info.shape),
                fix="check that this is an MPT adapter",
            )
            shapes.pop(name, None)
        elif 0 in info.shape:
            fix = "check the adapter"
            yield Finding.error(
                "empty", name, "has an empty dimension", expected="all sizes > 0", found=list(info.shape), fix=fix
            )


def _agreement(ckpt: Checkpoint, shapes: dict[str, tuple[int, ...]]) -> Iterator[Finding]:
    """The tensors agree with each other on N, r, T and d."""
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
            yield Finding.error(
                "tensors-disagree",
                fieldname,
                f"{a} and {b} disagree on {fieldname}",
                expected=f"{av} (from {a})",
                found=f"{bv} (from {b})",
                fix="the tensors come from different adapters or a corrupted save",
            )


def _against_config(ckpt: Checkpoint, shapes: dict[str, tuple[int, ...]]) -> Iterator[Finding]:
    """Each dimension is what the config says (each disagreement reported once)."""
    expected = ckpt.config.expected_shapes()
    reported: set[tuple[str, Any, Any]] = set()
    for name, shape in shapes.items():
        for label, want, got in zip(DIM_FIELDS[name], expected[name], shape, strict=False):
            field_name = "num_virtual_tokens x num_transformer_submodules" if label == "T" else label
            if want is None or want == got or (field_name, want, got) in reported:
                continue
            reported.add((field_name, want, got))
            yield Finding.error(
                "config-mismatch",
                field_name,
                f"config says {want} but {name} has {got}",
                expected=want,
                found=got,
                fix=f"fix {label} in adapter_config.json (or override it with "
                + flag(
                    f"--{label.replace('_', '-')} where the command takes the source's config flags: "
                    "validate, inspect, verify, tasks, convert, export)",
                    f"SourceSpec(..., overrides=ConfigOverrides({label}=...)))",
                )
                if label != "T"
                else "fix num_virtual_tokens / num_transformer_submodules / task_type in adapter_config.json (or"
                " override them with "
                + flag(
                    "the source's config flags: --num-virtual-tokens, ...)",
                    "SourceSpec(..., overrides=ConfigOverrides(num_virtual_tokens=...)), ...)",
                ),
            )


# the size fields PEFT gives a default when a config leaves them out, and the tensor dimension that holds each
DEFAULTED_SIZES = {"num_tasks": ("prefix_task_cols", 0), "num_ranks": ("prefix_task_cols", 2)}


def _peft_defaults(ckpt: Checkpoint, shapes: dict[str, tuple[int, ...]]) -> Iterator[Finding]:
    """A config file without num_tasks or num_ranks: PEFT takes 1, so where the tensors hold
    another count PEFT cannot load the folder (mpt-tools reads the count from the tensors)."""
    if not ckpt.config_from_file:
        return
    for name, (tensor, dim) in DEFAULTED_SIZES.items():
        shape = shapes.get(tensor)
        if ckpt.config.raw.get(name) is None and shape and len(shape) == 3 and shape[dim] != 1:
            yield Finding.warning(
                "missing-field",
                name,
                f"not set in the config: PEFT takes its default 1, but {tensor} has {shape[dim]}, "
                "so PEFT cannot load this folder (mpt-tools reads it from the tensors)",
                expected=shape[dim],
                found="absent",
                fix=f'write "{name}": {shape[dim]} into adapter_config.json (`mpt-tools compat` does)',
            )


def tensor_findings(ckpt: Checkpoint) -> list[Finding]:
    """Problems visible from the header: keys, each tensor, their agreement, the config."""
    shapes = ckpt.shapes
    header = [*_keys(ckpt), *_each_tensor(ckpt, shapes)]  # first: it drops tensors of the wrong rank
    return [*header, *_agreement(ckpt, shapes), *_against_config(ckpt, shapes), *_peft_defaults(ckpt, shapes)]


# --- values ------------------------------------------------------------------------------------


# Finite float64 values at or above this magnitude round to Inf in float32 (2**128 - 2**103 is the
# halfway point between float32's largest value and 2**128; it rounds to even, i.e. to Inf).
F32_OVERFLOW = 2.0**128 - 2.0**103


def value_findings(
    ckpt: Checkpoint, chunk_bytes: int = CHUNK_BYTES, *, bounds: dict[str, Any] | None = None
) -> list[Finding]:
    """Non-finite values in each float tensor, and finite float64 values beyond float32's range
    (float32 would hold Inf there), scanned in bounded chunks without numpy overflow warnings.

    ``bounds``, when given, receives what :func:`prompt_findings` needs from the same pass (so the
    factors are read once): ``pe_max`` (max |P*|), ``cols`` (per task, max over tokens of the sum
    over ranks of |cols|) and ``rows`` (per task, max |rows|)."""
    out: list[Finding] = []
    for name in CANONICAL:
        info = ckpt.info(name)
        if info is None or info.dtype not in FLOAT_DTYPES or not info.shape or 0 in info.shape:
            continue
        bad = beyond = 0
        first: int | None = None
        first_beyond: int | None = None
        peak = 0.0
        stat = _bound_stat(name, info.shape) if bounds is not None else None
        per_task = np.zeros(info.shape[0], dtype=np.float64) if stat and stat != "pe_max" else None
        unit = "row" if name == "prompt_embeddings" else "task"
        chunks = iter_task_chunks(ckpt, name, chunk_bytes)
        label = f"scan {name}"
        for start, stop, raw in tracked(chunks, info.shape[0], label, unit=unit, size=lambda c: c[1] - c[0]):
            with np.errstate(all="ignore"):
                values = raw.array.reshape(raw.shape) if raw.dtype == "F64" else to_float32(raw)
                # two reductions per row, no temporaries: NaN and Inf show in a row's max or min,
                # which also give max |x| (the overflow bound, float64's range); full scans only then
                flat = values.reshape(stop - start, -1)
                hi, lo = flat.max(axis=1), flat.min(axis=1)
                clean = bool(np.isfinite(hi).all() and np.isfinite(lo).all())
                mask = None if clean else ~np.isfinite(values)
                if raw.dtype == "F64" and not bool((np.maximum(hi, -lo) < F32_OVERFLOW).all()):
                    magnitude = np.where(np.isfinite(values), np.abs(values), 0.0)
                    over = magnitude >= F32_OVERFLOW
                    if over.any():
                        beyond += int(over.sum())
                        peak = max(peak, float(magnitude.max()))
                        if first_beyond is None:
                            first_beyond = start + int(np.argwhere(over)[0][0])
                if stat is not None and bounds is not None:
                    _gather_bound(stat, values, hi, lo, per_task, (start, stop), bounds)
            count = 0 if mask is None else int(mask.sum())
            if count and first is None and mask is not None:
                first = start + int(np.argwhere(mask)[0][0])
            bad += count
        if per_task is not None and bounds is not None:
            bounds[stat or name] = per_task
        if bad:
            out.append(
                Finding.error(
                    "non-finite",
                    name,
                    f"{bad} NaN/Inf values (first in {unit} {first})",
                    expected="finite values",
                    found=f"{bad} non-finite",
                    fix="retrain or restore the adapter",
                )
            )
        if beyond:
            out.append(
                Finding.error(
                    "beyond-float32",
                    name,
                    f"{beyond} float64 values beyond float32's range (max |x| = {peak:.2g}; first in {unit} "
                    f"{first_beyond}): PEFT's float32 prompt encoder would hold Inf there",
                    expected="|x| <= 3.4e+38",
                    found=f"max |x| = {peak:.2g}",
                    fix="retrain or restore the adapter (its values are far too large)",
                )
            )
    return out


def _bound_stat(name: str, shape: tuple[int, ...]) -> str | None:
    """Which overflow-bound statistic a tensor gives (see :func:`value_findings`), if its shape is
    a factor's."""
    if name == "prompt_embeddings" and len(shape) == 2:
        return "pe_max"
    if name == "prefix_task_cols" and len(shape) == 3:
        return "cols"
    if name == "prefix_task_rows" and len(shape) == 3:
        return "rows"
    return None


def _gather_bound(
    stat: str, values: Any, hi: Any, lo: Any, per_task: Any, span: tuple[int, int], bounds: dict[str, Any]
) -> None:
    """Add one chunk's share of a bound statistic, from its values and each row's max ``hi`` and
    min ``lo`` (NaN where values are not finite: no bound)."""
    start, stop = span
    if stat == "pe_max":
        bounds["pe_max"] = max(bounds.get("pe_max", 0.0), float(max(hi.max(), -lo.min())))
    elif stat == "rows":
        per_task[start:stop] = np.maximum(hi, -lo)
    else:  # cols, summed in float64: times max|rows|, an upper bound of every |(cols @ rows)[t, j]|
        per_task[start:stop] = np.abs(values).astype(np.float64).sum(axis=2).max(axis=1)


def check_source(ckpt: Checkpoint, *, values: bool = True) -> list[Finding]:
    """All findings for a source: config fields, tensors against each other and the config,
    and (when ``values``) non-finite values and prompts beyond float32 (one read of the factors)."""
    out = config_findings(ckpt.config, ckpt.config_from_file)
    out += tensor_findings(ckpt)
    if values:
        bounds: dict[str, Any] = {}
        out += value_findings(ckpt, bounds=bounds)
        if not errors(out):
            out += prompt_findings(ckpt, bounds=bounds)
    return out


def prompt_findings(
    ckpt: Checkpoint, chunk_bytes: int = CHUNK_BYTES, *, bounds: dict[str, Any] | None = None
) -> list[Finding]:
    """Finite factors whose product ``cols[k] @ rows[k]`` or prompt ``P* * (cols[k] @ rows[k])``
    goes beyond float32's range: PEFT's float32 prompt encoder computes Inf there (code
    ``prompt-overflow``). A per-task bound from the ``bounds`` :func:`value_findings` gathered
    (gathered here when not given), exact only for the tasks whose bound passes the limit: only
    those are read again. Run on a source without errors."""
    if bounds is None:
        bounds = {}
        value_findings(ckpt, chunk_bytes, bounds=bounds)
    if not {"cols", "rows"} <= set(bounds):
        return []
    with np.errstate(all="ignore"):
        bound = bounds["cols"] * bounds["rows"] * max(1.0, bounds.get("pe_max", 0.0))
    suspects = np.flatnonzero(~(bound <= FLOAT32_MAX))
    found = task_prompt_overflow(ckpt, suspects) if suspects.size else None
    if found is None:
        return []
    return [prompt_overflow_finding(*found)]


def prompt_overflow_finding(task: int, peak: float) -> Finding:
    """The ``prompt-overflow`` error for ``task``, whose prompt reaches ``peak``."""
    return Finding.error(
        "prompt-overflow",
        "prefix_task_cols/rows",
        f"task {task}'s prompt P* * (cols[k] @ rows[k]) overflows float32: PEFT computes Inf there",
        expected=f"|P_k| <= {FLOAT32_MAX:.4g}",
        found=f"{peak:.4g}",
        fix="retrain or restore the adapter (its factors are far too large)",
    )


def _config_label(target: MptConfig) -> str:
    """A planned target config as messages name it: its file's name."""
    return os.path.basename(os.fspath(target.path)) if target.path else "the target config"


def target_config_findings(target: MptConfig) -> list[Finding]:
    """Problems of a planned target config itself, labelled as the target's (``target <field>``,
    naming the file) so they cannot be mistaken for the source's; the reload trap is left out
    (a target config naming PEFT's init is what ``init`` replaces)."""
    where = _config_label(target)
    out = []
    for f in config_findings(target, True):
        if f.code == "reload-trap":
            continue
        if f.code == "peft-type":
            fix = f"set peft_type to {PEFT_TYPE} in {where}"
        else:
            fix = f"set {f.field} in {where}" if f.fix.startswith("give --") else f.fix
        out.append(f.replace(field=f"target {f.field}", message=f"{f.message} (in {where})", fix=fix))
    return out


def check_plan_types(plan: Any) -> TargetPlan:
    """``plan`` (a TargetPlan or a mode name) with its lists as plain lists of ints and floats (a
    numpy array or a tuple is taken); ConfigError (one line, naming the field) where it is not a
    TargetPlan or a field has the wrong type: a string where a list or an integer belongs, a bool
    or a float task, a seed outside 0..2**64 - 1 (:func:`~mpt_tools.options.checked_seed`; the
    library's version of the command line's parameter checks; init and validate call it before they
    use the plan)."""
    if isinstance(plan, str):
        plan = TargetPlan(plan)
    if not isinstance(plan, TargetPlan):
        raise ConfigError(f"the plan must be a mode name or a TargetPlan, not {type(plan).__name__}")
    if not isinstance(plan.mode, str):
        raise ConfigError(f"the mode must be a name such as 'average', not {plan.mode!r:.40}")
    for name in ("task", "num_tasks", "num_ranks"):
        if getattr(plan, name) is not None:
            checked_index(getattr(plan, name), name)
    if plan.seed is not None:
        checked_seed(plan.seed)
    return plan._replace(
        tasks=None if plan.tasks is None else checked_indices(plan.tasks, "tasks"),
        weights=None if plan.weights is None else checked_numbers(plan.weights, "weights"),
    )


def check_target(
    ckpt: Checkpoint,
    plan: TargetPlan | str,
    *,
    target: MptConfig | None = None,
    warnings: list[str] | None = None,
) -> list[Finding]:
    """Findings for building the target ``plan`` (or a mode name) asks for from ``ckpt``.

    Every mode needs the source's T and d; a mode that copies factors also needs the factors, the
    source's rank and (for PEFT's own init path, when no target size is asked for) one target
    task. Then come the mode's own rules. ``target`` is a planned target config, whose sizes
    count where the plan gives none. ``warnings`` receives the plan's warnings.
    """
    if isinstance(plan, str):
        plan = TargetPlan(plan)
    mode = get_mode(plan.mode)
    out: list[Finding] = []
    shapes = ckpt.shapes
    pe, cols = shapes.get("prompt_embeddings"), shapes.get("prefix_task_cols")
    src_t = pe[0] if pe and len(pe) == 2 else None
    src_d = pe[1] if pe and len(pe) == 2 else None
    src_r = cols[2] if cols and len(cols) == 3 else None
    num_tasks, num_ranks = plan.num_tasks, plan.num_ranks
    if target is not None:
        out += target_config_findings(target)
        tgt_t, tgt_d = target.total_virtual_tokens, target.size("token_dim")
        num_tasks = num_tasks if num_tasks is not None else target.peft_size("num_tasks")  # absent: PEFT's 1
        num_ranks = num_ranks if num_ranks is not None else target.peft_size("num_ranks")
        if plan.num_ranks is None and target.raw.get("num_ranks") is None and mode.copies_factors:
            if src_r is not None and src_r != 1:
                where = _config_label(target)
                out.append(
                    Finding.error(
                        "target-mismatch",
                        "target num_ranks",
                        f"not set in {where}: PEFT takes its default 1, and {mode.name} copies the source's "
                        f"rank-{src_r} factors",
                        expected=src_r,
                        found="absent",
                        fix=f'write "num_ranks": {src_r} into {where}',
                    )
                )
            num_ranks = None  # reported here, not again as a mismatch
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
                    Finding.error(
                        "target-mismatch",
                        field_name,
                        f"target config differs from the source ({mode.name} needs them equal)",
                        expected=want,
                        found=got,
                        fix=fix,
                    )
                )
    if mode.copies_factors:
        out += _copy_rules(ckpt, mode, src_r, num_ranks, num_tasks if plan.num_tasks is None else None)
    out += mode.plan_rules(ckpt, plan, warnings if warnings is not None else [])
    if (plan.tasks is not None or plan.weights is not None) and not mode.selects_tasks:
        selecting = ", ".join(m.name for m in MODES.values() if m.selects_tasks)
        out.append(
            Finding.error(
                "usage",
                "tasks",
                flag(
                    f"--tasks and --weights apply to --mode {selecting} only",
                    f'TargetPlan tasks= and weights= apply to mode="{selecting}" only',
                ),
                expected=selecting,
                found=mode.name,
                fix=flag(
                    f"drop --tasks/--weights or use --mode {selecting}", f'drop tasks/weights or use mode="{selecting}"'
                ),
            )
        )
    if plan.task is not None and not mode.takes_task:
        taking = ", ".join(m.name for m in MODES.values() if m.takes_task)
        out.append(
            Finding.warning(
                "unused-option",
                "task",
                flag(f"--task applies to --mode {taking} only", f'task= applies to mode="{taking}" only')
                + f": ignored by {mode.name}",
                found=plan.task,
                fix=flag("drop --task", "drop task="),
            )
        )
    out += _size_rules(mode, plan, src_t, src_d, src_r)
    return out


def target_bytes(mode: Mode, num_tasks: int, total_tokens: int, num_ranks: int, token_dim: int) -> int:
    """Bytes of memory building a target of these sizes holds at once: its float32 tensors, and for
    a mode that draws fresh factors the float64 draw of the larger factor tensor."""
    per_task = total_tokens * num_ranks + num_ranks * token_dim
    need = 4 * (total_tokens * token_dim + num_tasks * per_task)
    if not mode.copies_factors:
        need += 8 * num_tasks * max(total_tokens * num_ranks, num_ranks * token_dim)
    return need


def _size_rules(mode: Mode, plan: TargetPlan, src_t: int | None, src_d: int | None, src_r: int | None) -> list[Finding]:
    """The sizes a plan asks for: at least 1 task and rank, at most :data:`MAX_TARGET_TASKS` tasks,
    and a target that fits in memory (:func:`mpt_tools.formats.memory_limit`), all checked before
    anything is allocated."""
    out: list[Finding] = []
    if plan.num_tasks is not None and not 1 <= plan.num_tasks <= MAX_TARGET_TASKS:
        out.append(
            Finding.error(
                "usage",
                "target_tasks",
                "out of range",
                expected=f"1..{MAX_TARGET_TASKS}",
                found=plan.num_tasks,
                fix=("pass a positive " if plan.num_tasks < 1 else "ask for fewer ")
                + flag("--target-tasks", "num_tasks"),
            )
        )
    if plan.num_ranks is not None and plan.num_ranks < 1:
        out.append(
            Finding.error(
                "usage",
                "target_ranks",
                "out of range",
                expected=">= 1",
                found=plan.num_ranks,
                fix="pass a positive " + flag("--target-ranks", "num_ranks"),
            )
        )
    if out or src_t is None or src_d is None:
        return out
    num_tasks, num_ranks = mode.sizes(plan, src_r)
    if num_ranks is None or num_ranks < 1:
        return out
    need, limit = target_bytes(mode, num_tasks, src_t, num_ranks, src_d), memory_limit()
    if need > limit:
        out.append(
            Finding.error(
                "too-large",
                "target_tasks" if plan.num_tasks is not None else "target_ranks",
                f"a target of {num_tasks} task(s) x rank {num_ranks} needs {need:,} bytes of memory, "
                + more_than_memory(limit),
                expected=f"<= {limit:,} bytes",
                found=f"{need:,} bytes",
                fix=flag(
                    "ask for fewer --target-tasks or a lower --target-ranks",
                    "ask for fewer num_tasks or a lower num_ranks",
                ),
            )
        )
    return out


def _mode_shared() -> str:
    """How a fix names the shared mode: ``--mode shared`` or ``mode="shared"``."""
    return flag("--mode shared", 'mode="shared"')


def _copy_rules(
    ckpt: Checkpoint, mode: Mode, src_r: int | None, num_ranks: int | None, config_tasks: int | None
) -> list[Finding]:
    """A mode that copies the source's factors needs them, keeps their rank, and (on PEFT's own
    init path: ``config_tasks``, a planned config's num_tasks) makes a 1-task target."""
    out: list[Finding] = []
    if ckpt.info("prefix_task_cols") is None or ckpt.info("prefix_task_rows") is None:
        out.append(
            Finding.error(
                "missing-tensor",
                "prefix_task_cols/rows",
                f"{mode.name} needs the source task factors",
                expected="present",
                found="absent",
                fix=f"use {_mode_shared()}, or a source with its task factors",
            )
        )
    if num_ranks is not None and src_r is not None and num_ranks != src_r:
        out.append(
            Finding.error(
                "target-mismatch",
                "num_ranks",
                f"{mode.name} copies factors, so the target rank must be the source's",
                expected=src_r,
                found=num_ranks,
                fix=f"set the target num_ranks to {src_r} (or use {_mode_shared()})",
            )
        )
    if config_tasks is not None and config_tasks != 1:
        out.append(
            Finding.error(
                "target-mismatch",
                "num_tasks",
                f"PEFT's {mode.peft_name} makes a 1-task target",
                expected=1,
                found=config_tasks,
                fix=f"set the target num_tasks to 1, or plan the {config_tasks} copies as init makes them: "
                + flag(f"--target-tasks {config_tasks}", f"num_tasks={config_tasks}"),
            )
        )
    return out


def require_valid(
    ckpt: Checkpoint,
    extra: list[Finding] | None = None,
    *,
    values: bool = True,
    findings: list[Finding] | None = None,
    refusing: str | None = None,
) -> list[str]:
    """The one refusal of an invalid source: raise ValidationError for the first error (and the
    count of the rest) among ``findings`` (default: :func:`check_source` of ``ckpt``, with
    ``values``) plus ``extra``; ``refusing`` names the refused operation in the message ("refusing
    to push: ..."). Returns the warnings as lines."""
    found = (check_source(ckpt, values=values) if findings is None else findings) + (extra or [])
    problems = errors(found)
    if problems:
        err = refusal(ckpt.location, problems)
        if refusing:
            err = ValidationError(f"refusing to {refusing}: {err.message}", err.path, problems)
        raise err
    return [f.text() for f in found if f.level == "warning"]  # the caller says "warning: "
