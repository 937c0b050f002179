"""``validate``: every problem of a source, and of a planned target, at once."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .checkpoint import Source, load_source
from .checks import check_plan_types, check_source, check_target
from .config import MptConfig, read_config
from .errors import ConfigError
from .findings import errors
from .hazards import serving_hazards
from .modes import MODES, TargetPlan, canonical_mode

if TYPE_CHECKING:  # types only: importing them costs start-up time
    from .results import ValidateResult


def validate(
    source: Source,
    *,
    against: str | os.PathLike[str] | None = None,
    mode: str | None = None,
    task: int | None = None,
    base_model: str | bool | None = None,
    num_tasks: int | None = None,
    num_ranks: int | None = None,
) -> ValidateResult:
    """Check a source (and, with ``against``/``mode``, a planned target) and report every problem.

    Returns ``{"source", "valid", "mode", "against", "findings": [...]}``; ``valid`` is False when
    any finding is an error. Raises MptToolsError only when the source cannot be read at all.
    ``base_model`` (a Hub id or local folder, or True for the config's
    base_model_name_or_path) compares token_dim with the base model's hidden size, reading only
    its config.json (code ``base-model``; off by default, so no network is touched).
    ``num_tasks`` and ``num_ranks`` are the planned target's sizes, as ``init``'s ``--target-tasks``
    and ``--target-ranks`` ask for them (they need ``mode`` or ``against``; a planned config's
    sizes count where they are None).
    """
    if mode is None and against is None:
        given = [n for n, v in (("task", task), ("num_tasks", num_tasks), ("num_ranks", num_ranks)) if v is not None]
        if given:
            verb = "describes" if len(given) == 1 else "describe"
            raise ConfigError(f"{' and '.join(given)} {verb} a planned target: give mode (or against) too")
    ckpt = load_source(source)
    findings = check_source(ckpt) + serving_hazards(ckpt)
    target: MptConfig | None = None
    if against is not None:
        target = read_config(against)
        if mode is None:
            init = target.raw.get("prompt_tuning_init")
            mode = next((m.name for m in MODES.values() if m.peft_name == init), "average")
    if mode is not None:
        plan = check_plan_types(TargetPlan(mode, task=task, num_tasks=num_tasks, num_ranks=num_ranks))
        findings += check_target(ckpt, plan, target=target)
    if base_model is not None and base_model is not False:
        from .hub.base_model import base_model_findings

        findings += base_model_findings(ckpt, None if base_model is True else base_model)
    return {
        "schema": "mpt-tools/validate/1",
        "source": ckpt.location,
        "weights": ckpt.weights_path,
        "valid": not errors(findings),
        "mode": canonical_mode(mode) if mode else None,
        "against": target.path if target else None,
        "findings": [f.to_dict() for f in findings],
    }
