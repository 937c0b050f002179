"""``init``: a ready-to-train target adapter from a source, one walk along
source -> Checkpoint -> checks -> the mode's factors -> staged write (-> verify -> push)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .checkpoint import Checkpoint, Source, load_source
from .checks import check_plan_types, check_source, check_target, require_valid, value_findings
from .config import target_config
from .errors import HubError, ValidationError, VerificationFailed, WriteError, flag
from .files import commit_staged, guard_output, staging_folder
from .findings import Finding, errors, refusal
from .formats import Raw, from_numpy, to_float32
from .modes import Mode, TargetPlan, get_mode
from .version import __version__
from .writer import fit_for_peft, fit_note, provenance, write_adapter

if TYPE_CHECKING:  # types only: importing them costs start-up time
    from .results import InitResult, PushResult


@dataclass
class Target:
    """A target initialisation: the three float32 tensors, the mode and how they were made."""

    tensors: dict[str, np.ndarray]
    mode: str
    task: int | None = None
    seed: int | None = None
    tasks: list[int] | None = None
    weights: list[float] | None = None

    @property
    def num_tasks(self) -> int:
        """Number of tasks of the target."""
        return int(self.tensors["prefix_task_cols"].shape[0])

    @property
    def num_ranks(self) -> int:
        """Rank of the target's factors."""
        return int(self.tensors["prefix_task_cols"].shape[2])

    def raw(self) -> dict[str, Raw]:
        """The tensors as :class:`Raw` for writing."""
        return {k: from_numpy(v) for k, v in self.tensors.items()}


def build_target(ckpt: Checkpoint, mode: Mode, plan: TargetPlan, num_tasks: int, num_ranks: int) -> Target:
    """Compute the target tensors of ``plan`` from a checked source: P* as float32, the mode's
    factors, repeated ``num_tasks`` times when the mode copies one task's factors."""
    pe = np.ascontiguousarray(to_float32(ckpt.read("prompt_embeddings")))
    cols, rows, recorded = mode.build(ckpt, plan, num_tasks, num_ranks)
    if mode.copies_factors and num_tasks > 1:
        cols = np.ascontiguousarray(np.repeat(cols, num_tasks, axis=0))
        rows = np.ascontiguousarray(np.repeat(rows, num_tasks, axis=0))
    tensors = {"prompt_embeddings": pe, "prefix_task_cols": cols, "prefix_task_rows": rows}
    return Target(tensors=tensors, mode=mode.name, **recorded)


def target_prompt_overflow(target: Target, mode: Mode) -> Finding | None:
    """The ``prompt-overflow`` finding of a built target whose prompt ``P* * (cols[k] @ rows[k])``
    goes beyond float32's range (PEFT would compute Inf), or None. Checked before anything is
    written; a mode that copies one task's factors is checked on one task (all are the same)."""
    from .checks import prompt_overflow_finding
    from .prompts import prompt_overflow

    t = target.tensors
    cols, rows = t["prefix_task_cols"], t["prefix_task_rows"]
    if mode.copies_factors:
        cols, rows = cols[:1], rows[:1]
    found = prompt_overflow(t["prompt_embeddings"], cols, rows)
    return None if found is None else prompt_overflow_finding(*found)


@dataclass(frozen=True)
class PushRequest:
    """``init --push``: the Hub repo to push the written adapter to, and how."""

    repo_id: str
    private: bool = False
    create_pr: bool = False


def _plan_findings(ckpt: Checkpoint, mode: Mode, plan: TargetPlan, warnings: list[str]) -> list[Finding]:
    """Every problem of building ``plan`` from ``ckpt``, before anything is read or written."""
    findings = check_source(ckpt, values=False)
    if not mode.copies_factors:
        if ckpt.info("prefix_task_cols") is None and ckpt.info("prefix_task_rows") is None:
            # A prompt without task factors is a fine source when only P* is copied.
            findings = [f for f in findings if f.code != "missing-tensor" or f.field == "prompt_embeddings"]
        if not errors(findings):
            # such a mode reads only P*; the factors are small next to it, so check them too.
            findings += value_findings(ckpt)
    findings += check_target(ckpt, plan, warnings=warnings)
    if not ckpt.config_from_file and ckpt.config.task_type is None:
        findings.append(
            Finding.error(
                "task-type",
                "task_type",
                "unknown for a bare tensor file; the target config needs it",
                expected="one of CAUSAL_LM, SEQ_2_SEQ_LM, ...",
                fix="give " + flag("--task-type", "ConfigOverrides(task_type=...)"),
            )
        )
    return findings


def init_adapter(
    source: Source,
    plan: TargetPlan | str,
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    base_model: str | bool | None = None,
    verify: str | None = None,
    push: PushRequest | None = None,
    peft_compat: str | None = None,
) -> InitResult:
    """Build a target initialisation from ``source`` and write it to ``out`` as a PEFT adapter.

    ``plan`` is a :class:`~mpt_tools.modes.TargetPlan` or a mode name (average, exact or shared, or
    PEFT's AVERAGE_SOURCE_TASKS, EXACT_SOURCE_TASK and ONLY_SOURCE_SHARED). average/exact tensors
    are bitwise what PEFT's own init computes; shared copies P* and draws N(0, 0.02) factors from
    the plan's seed. Raises ValidationError listing every problem before anything is written.

    ``base_model`` (a Hub id or local folder, or True for the config's base_model_name_or_path)
    refuses a token_dim that is not the base model's hidden size. ``verify`` (a device: auto, cuda
    or cpu) verifies the adapter against the source before it goes into ``out`` (see
    :func:`init_and_verify`); ``push`` then pushes ``out`` to the Hub. Returns the result (schema
    ``mpt-tools/init/1``), with the verify report under ``verify`` and the push under ``push``.
    ``peft_compat`` (a PEFT release, ``"0.13.2"``) writes the config for exactly that release;
    by default it loads in every release mpt-tools knows (:func:`mpt_tools.writer.fit_for_peft`).
    """
    if verify is not None:
        from .verification.engine import resolve_device

        resolve_device(verify)  # fail before reading or writing anything
    plan = check_plan_types(plan)  # one line, not a TypeError; lists as lists
    ckpt = load_source(source)
    if verify is not None:
        result = init_and_verify(
            ckpt, plan, out, force=force, device=verify, base_model=base_model, peft_compat=peft_compat
        )
    else:
        result = _init(ckpt, plan, out, force, base_model, peft_compat)
    if push is not None:
        result["push"] = _push(result["out"], push, ckpt.hub_options.token)
    return result


def _init(
    ckpt: Checkpoint,
    plan: TargetPlan,
    out: str | os.PathLike[str],
    force: bool,
    base_model: Any,
    peft_compat: str | None = None,
) -> InitResult:
    mode = get_mode(plan.mode)
    warnings: list[str] = []
    src_cols = ckpt.shapes.get("prefix_task_cols")
    num_tasks, num_ranks = mode.sizes(plan, src_cols[2] if src_cols and len(src_cols) == 3 else None)
    findings = _plan_findings(ckpt, mode, plan, warnings)
    if base_model is not None and base_model is not False and not errors(findings):
        from .hub.base_model import base_model_findings

        findings += base_model_findings(ckpt, None if base_model is True else base_model)
    warnings += require_valid(ckpt, findings=findings)
    protected = ckpt.source_paths
    guard_output(out, force=force, protected=protected)
    assert num_ranks is not None  # a mode that copies factors has them (checked above)
    target = build_target(ckpt, mode, plan, num_tasks, num_ranks)
    for name, arr in target.tensors.items():
        if not np.isfinite(arr).all():
            where = f"task {target.task}" if target.task is not None else "the source"
            raise ValidationError(f"{name}: {where} holds NaN/Inf values; the target would be unusable", ckpt.location)
    overflow = target_prompt_overflow(target, mode)
    if overflow is not None:
        err = refusal(ckpt.location, [overflow])
        raise ValidationError(f"refusing to write the target: {err.message}", ckpt.location, [overflow])
    fit = fit_for_peft(target_config(ckpt.config, target.num_tasks, target.num_ranks), peft_compat, ckpt.where)
    warnings += fit.warnings
    meta = provenance(
        {
            "mode": mode.peft_name,
            **ckpt.provenance(),
            "task": target.task,
            "tasks": target.tasks,
            "weights": target.weights,
            "seed": target.seed,
            "target_tasks": num_tasks if mode.copies_factors and num_tasks != 1 else None,
        }
    )
    written = write_adapter(out, target.raw(), fit.config, meta, force=force, protected=protected)
    result: InitResult = {
        "schema": "mpt-tools/init/1",
        "source": ckpt.location,
        "source_sha256": ckpt.sha256(),
        "out": str(out),
        "files": written,
        "mode": mode.name,
        "peft_mode": mode.peft_name,
        "task": target.task,
        "seed": target.seed,
        "num_tasks": target.num_tasks,
        "num_ranks": target.num_ranks,
        "shapes": {k: list(v.shape) for k, v in target.tensors.items()},
        "metadata": meta,
        "notes": [*ckpt.notes, fit_note(fit)] if peft_compat is not None else ckpt.notes,
        "warnings": warnings,
        "version": __version__,
    }
    return result


def _push(out: str, push: PushRequest, token: str | None) -> PushResult:
    """init --push: push the folder just written; on failure say that it was written."""
    from .hub.push import push_adapter

    try:
        return push_adapter(out, push.repo_id, private=push.private, create_pr=push.create_pr, token=token)
    except HubError as exc:
        raise HubError(
            f"{exc.message} (the adapter was written to {out}: push it with "
            + flag(f"`mpt-tools push {out} {push.repo_id}`", f"push_adapter({out!r}, {push.repo_id!r})")
            + ")",
            exc.path,
        ) from None


def init_and_verify(
    source: Source,
    plan: TargetPlan | str,
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    device: str = "auto",
    base_model: str | bool | None = None,
    peft_compat: str | None = None,
) -> InitResult:
    """Run :func:`init_adapter`, then :func:`~mpt_tools.verification.verify` the written folder
    against the source; returns init's result with the verify report under ``"verify"``.

    The adapter is written and verified in a hidden :func:`mpt_tools.files.staging_folder` and
    only then moved into place by :func:`mpt_tools.files.commit_staged`. On a failed verification
    the staging folder is removed and ``out`` is left exactly as it was; then VerificationFailed is
    raised.
    """
    from .factors import on_torch_threads
    from .verification import failure_error
    from .verification import verify as run_verify
    from .verification.engine import resolve_device

    resolve_device(device)  # fail before writing anything
    plan = check_plan_types(plan)
    ckpt = load_source(source)
    folder = guard_output(out, force=force, protected=ckpt.source_paths)
    with staging_folder(folder) as staging:
        try:
            result = _init(ckpt, plan, staging, force, base_model, peft_compat)
        except WriteError as exc:  # written into the staging folder: name the output the user gave
            if exc.path and exc.path.startswith(str(staging)):
                raise WriteError(exc.message, str(out)) from None
            raise
        with on_torch_threads(plan.torch_threads):  # verify's torch mean on the threads init matched
            report = run_verify(staging, source=ckpt, device=device, check=False)
        if not report["ok"]:
            err = failure_error(report)
            kept = " (nothing was written)" if not folder.exists() else f" ({folder} was left as it was)"
            raise VerificationFailed(err.message + kept, str(out), report)
        commit_staged(staging, folder, force=force)
    for key in ("path", "weights"):  # name the final folder, not the staging one (its only paths)
        value = report[key]
        if value.startswith(str(staging)):
            report[key] = str(folder) + value[len(str(staging)) :]
    files = [str(folder / Path(f).name) for f in result["files"]]
    return {**result, "out": str(folder), "files": files, "verify": report}
