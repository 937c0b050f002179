"""The table of target modes: a mode registered here, in the test, works in init, validate, verify
and the command line with no other change; an unknown recorded mode is a clear verify failure."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import FIXTURES, run_cli

from mpt_tools import modes
from mpt_tools.checkpoint import Checkpoint, load_source
from mpt_tools.errors import ConfigError, VerificationFailed
from mpt_tools.findings import Finding
from mpt_tools.init import init_adapter
from mpt_tools.modes import Expectation, Mode, TargetPlan
from mpt_tools.validation import validate
from mpt_tools.verification import verify


def _last(ckpt: Checkpoint) -> int:
    return ckpt.shapes["prefix_task_cols"][0] - 1


def _build(ckpt: Checkpoint, plan: TargetPlan, n: int, r: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    from mpt_tools.factors import exact_factors

    cols, rows = exact_factors(ckpt, _last(ckpt))
    return cols, rows, {"task": _last(ckpt)}


def _rules(ckpt: Checkpoint, plan: TargetPlan, warnings: list[str]) -> list[Finding]:
    if plan.task is not None:
        return [Finding.error("usage", "task", "last takes no --task", expected=None, found=plan.task, fix="drop it")]
    return []


def _expect(src: Checkpoint, record: dict[str, Any], layout: tuple[int, int, int, int]) -> Expectation:
    from mpt_tools.factors import exact_factors

    k = _last(src)
    cols, rows = exact_factors(src, k)
    return Expectation(what=f"bitwise the last source task ({k})", cols=cols, rows=rows, task=k, prompt_equal=True)


LAST = Mode(
    name="last",
    peft_name="LAST_SOURCE_TASK",
    summary="the last source task's factors",
    copies_factors=True,
    build=_build,
    plan_rules=_rules,
    expect=_expect,
    describe=lambda result: f"the last source task ({result['task']})",
    aliases=("final",),
)


@pytest.fixture
def last_mode() -> Iterator[Mode]:
    modes.register(LAST)
    try:
        yield LAST
    finally:
        del modes.MODES["last"]


def test_a_registered_mode_works_everywhere(tmp_path: Path, last_mode: Mode) -> None:
    src = FIXTURES / "causal"
    n = load_source(src).shapes["prefix_task_cols"][0]
    # init, by any of its names
    for i, name in enumerate(("last", "LAST_SOURCE_TASK", "Final")):
        result = init_adapter(src, name, tmp_path / f"t{i}")
        assert result["mode"] == "last" and result["peft_mode"] == "LAST_SOURCE_TASK" and result["task"] == n - 1
    out = tmp_path / "t0"
    meta = load_source(out).file.metadata
    assert meta["mpt_tools.mode"] == "LAST_SOURCE_TASK" and meta["mpt_tools.task"] == str(n - 1)
    # K copies, as for every mode that copies factors
    assert init_adapter(src, TargetPlan("last", num_tasks=3), tmp_path / "k3")["num_tasks"] == 3
    # its own plan rules, in init and validate
    with pytest.raises(Exception, match="last takes no --task"):
        init_adapter(src, TargetPlan("last", task=1), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    report = validate(src, mode="last", task=1)
    assert not report["valid"] and report["mode"] == "last"
    assert validate(src, mode="final")["valid"]
    # validate --against a config that names the mode's PEFT value plans that mode
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["prompt_tuning_init"] = "LAST_SOURCE_TASK"
    (tmp_path / "against.json").write_text(json.dumps(cfg))
    assert validate(src, against=tmp_path / "against.json")["mode"] == "last"
    # verify holds the target to the mode's promise, from the recorded source and the given one
    for given in (None, src):
        target = verify(out, device="cpu", source=given)["target"]
        assert target["mode"] == "last" and target["task"] == n - 1
        assert [c["check"] for c in target["checks"]] == [
            "prompt_embeddings",
            "prefix_task_cols",
            "prefix_task_rows",
            "prompt",
        ]
        assert all(c["ok"] for c in target["checks"])
    # the command line: a choice, described by the mode itself
    res = run_cli("init", src, "--mode", "last", "--out", tmp_path / "cli")
    assert res.exit_code == 0, res.stderr
    assert f"LAST_SOURCE_TASK: the last source task ({n - 1})" in res.stdout
    res = run_cli("verify", tmp_path / "cli", "--device", "cpu")
    assert res.exit_code == 0 and "last target vs source: 4/4 checks" in res.stdout
    assert "[average|exact|shared|last]" in run_cli("init", "--help").stdout


def test_a_tampered_target_of_a_registered_mode_fails(tmp_path: Path, last_mode: Mode) -> None:
    from test_verify import tamper

    out = tmp_path / "t"
    init_adapter(FIXTURES / "causal", "last", out)
    old = float(load_source(out).read("prefix_task_rows").array[0, 0, 3])
    tamper(out, "prefix_task_rows", (0, 0, 3), np.nextafter(np.float32(old), np.float32(np.inf)))
    with pytest.raises(VerificationFailed) as info:
        verify(out, device="cpu", source=FIXTURES / "causal")
    assert "prefix_task_rows: expected bitwise the last source task" in str(info.value)
    new = np.nextafter(np.float32(old), np.float32(np.inf))
    assert f"found 1 of 32 values differ, the largest at [0, 0, 3]: {new!s} vs {np.float32(old)!s}" in str(info.value)
    assert str(new) != str(np.float32(old))  # one ulp apart, and it shows


def test_unknown_mode_names_every_mode() -> None:
    with pytest.raises(ConfigError, match=r"unknown mode 'median': use average, exact or shared \(or AVERAGE"):
        modes.get_mode("median")
    res = run_cli("init", FIXTURES / "causal", "--mode", "median", "--out", "x")
    assert res.exit_code == 2 and "unknown mode 'median'" in res.stderr


def test_an_unknown_recorded_mode_is_a_verify_failure_not_an_average(tmp_path: Path, last_mode: Mode) -> None:
    out = tmp_path / "t"
    init_adapter(FIXTURES / "causal", "last", out)
    del modes.MODES["last"]  # the mode that wrote it is not known where it is verified
    try:
        with pytest.raises(VerificationFailed) as info:
            verify(out, device="cpu", source=FIXTURES / "causal")
        target = info.value.report["target"]
        assert target["mode"] == "unknown" and target["checks"][0]["check"] == "mode"
        assert "not one of init's modes" in str(info.value)
    finally:
        modes.register(LAST)
