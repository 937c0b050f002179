"""Arguments a shell produces, numbers at the edge, bounded reports and new-user trips (issue 15).

Every refusal: the right exit status (2 for a usage error, 1 for a refused operation), one error
line on stderr, and nothing written.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import FIXTURES, run_cli, write_random_source

from mpt_tools.formats import from_numpy, safetensors_bytes

CAUSAL = FIXTURES / "causal"


def error_lines(stderr: str) -> list[str]:
    """The lines of stderr that state an error (Click's usage errors add a usage and a hint line)."""
    return [line for line in stderr.splitlines() if line.lower().startswith("error")]


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def write_source(path: Path, pe: np.ndarray, cols: np.ndarray, rows: np.ndarray) -> Path:
    tensors = {"prompt_embeddings": pe, "prefix_task_cols": cols, "prefix_task_rows": rows}
    path.write_bytes(safetensors_bytes({k: from_numpy(v) for k, v in tensors.items()}, {"format": "pt"}))
    return path


# --- empty paths (an unset shell variable) ----------------------------------------------------------

EMPTY_PATHS = {
    "init --out": ["init", CAUSAL, "--mode", "average", "--out", ""],
    "tasks --out": ["tasks", CAUSAL, "--select", "0", "--out", ""],
    "rerank --out": ["rerank", CAUSAL, "--num-ranks", "1", "--out", ""],
    "convert --out": ["convert", CAUSAL, "--out", ""],
    "export-prompt --out": ["export-prompt", CAUSAL, "--task", "0", "--out", ""],
    "export --out": ["export", CAUSAL, "--to", "npy", "--out", ""],
    "export --names": ["export", CAUSAL, "--to", "npy", "--names", "", "--out", "t"],
    "inspect --plot": ["inspect", CAUSAL, "--similarity", "--plot", ""],
    "blank --out": ["init", CAUSAL, "--mode", "average", "--out", "  "],
    "validate SOURCE": ["validate", ""],
    "inspect SOURCE": ["inspect", ""],
    "init SOURCE": ["init", "", "--mode", "average", "--out", "t"],
    "diff B": ["diff", CAUSAL, ""],
    "verify PATH": ["verify", ""],
    "verify --source": ["verify", CAUSAL, "--source", ""],
    "push DIR": ["push", "", "me/repo", "--dry-run"],
    "push REPO_ID": ["push", CAUSAL, "", "--dry-run"],
    "validate --against": ["validate", CAUSAL, "--against", ""],
    "--cache-dir": ["validate", CAUSAL, "--cache-dir", ""],
    "--subfolder": ["validate", CAUSAL, "--subfolder", ""],
    "init --push": ["init", CAUSAL, "--mode", "average", "--out", "t", "--push", ""],
    "compat --out": ["compat", CAUSAL, "--peft", "0.10.0", "--out", ""],
    "compat ADAPTER": ["compat", "", "--peft", "0.10.0", "--out", "t"],
    "embed --text": ["embed", CAUSAL, "--task", "0", "--text", "", "--base-model", "m", "--out", "e.pt"],
    "embed --out": ["embed", CAUSAL, "--task", "0", "--text", "hi", "--base-model", "m", "--out", ""],
    "pack --out": ["pack", "a.npy", "--num-ranks", "1", "--out", ""],
}


@pytest.mark.parametrize("case", sorted(EMPTY_PATHS))
def test_an_empty_path_is_a_usage_error(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = run_cli(*EMPTY_PATHS[case])
    assert result.exit_code == 2, (case, result.stdout, result.stderr)
    assert len(error_lines(result.stderr)) == 1 and "empty" in result.stderr, result.stderr
    assert files_under(tmp_path) == []  # nothing written into the current directory


def test_a_file_output_ending_in_a_slash_is_a_usage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An output that must be a file (``embed --out``, ``inspect --plot``) given with a trailing
    slash names a folder: a usage error, not a file written under the folder's name."""
    monkeypatch.chdir(tmp_path)
    for argv in (
        ["embed", CAUSAL, "--task", "0", "--text", "hi", "--base-model", "m", "--out", "newdir/"],
        ["inspect", CAUSAL, "--similarity", "--plot", "plots/"],
    ):
        result = run_cli(*argv)
        assert result.exit_code == 2, (argv, result.stderr)
        assert len(error_lines(result.stderr)) == 1 and "ends in a slash" in result.stderr, result.stderr
    assert files_under(tmp_path) == []


@pytest.mark.parametrize(
    "argv",
    [
        ["verify", CAUSAL, "--tasks", ""],
        ["verify", CAUSAL, "--tasks", "0,,1"],
        ["init", CAUSAL, "--mode", "average", "--tasks", "0,1,", "--out", "t"],
        ["init", CAUSAL, "--mode", "average", "--weights", "", "--out", "t"],
        ["tasks", CAUSAL, "--select", "", "--out", "t"],
        ["export", CAUSAL, "--to", "npy", "--tasks", "0,,2", "--out", "t"],
        ["pack", "--from", CAUSAL, "--tasks", "", "--num-ranks", "1", "--out", "t"],
    ],
    ids=lambda argv: " ".join(str(a) for a in argv[:1] + argv[2:4]),
)
def test_an_empty_list_or_item_is_a_usage_error(
    argv: list[Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--tasks ""`` (an unset variable) checked nothing and passed in verify; ``0,,1`` and ``0,1,``
    were read as ``0,1``: each is a malformed list, exit 2."""
    monkeypatch.chdir(tmp_path)
    result = run_cli(*argv)
    assert result.exit_code == 2, (argv, result.stdout, result.stderr)
    assert len(error_lines(result.stderr)) == 1 and ("empty list" in result.stderr or "empty item" in result.stderr)
    assert files_under(tmp_path) == []


def test_a_limit_set_by_the_variable_is_named_as_such(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With MPT_TOOLS_MAX_TENSOR_BYTES set, a refusal over the limit names the variable, not this
    machine's memory."""
    monkeypatch.setenv("MPT_TOOLS_MAX_TENSOR_BYTES", "2000")
    result = run_cli("init", CAUSAL, "--mode", "average", "--target-tasks", "1000", "--out", tmp_path / "t")
    assert result.exit_code == 1 and "more than MPT_TOOLS_MAX_TENSOR_BYTES (2,000 bytes)" in result.stderr
    assert "machine" not in result.stderr and not (tmp_path / "t").exists()


def test_no_python_none_in_human_output(tmp_path: Path) -> None:
    """A bare tensor file has no task_type or base model: inspect says "not set", not Python's None;
    validate's negative-task hint names the flag only where the command has it (init)."""
    shutil.copy(CAUSAL / "adapter_model.safetensors", tmp_path / "bare.safetensors")
    result = run_cli("inspect", tmp_path / "bare.safetensors", "--no-norms")
    assert result.exit_code == 0 and "None" not in result.stdout and "- (not set)" in result.stdout
    hint = run_cli("validate", CAUSAL, "--mode", "exact", "--task", "-1")
    assert "to init, --allow-negative-task" in hint.stdout + hint.stderr


def test_init_says_num_tasks_is_a_deprecated_spelling(tmp_path: Path) -> None:
    """init's --num-tasks still works as --target-tasks, with a note on stderr (JSON untouched)."""
    result = run_cli("init", CAUSAL, "--mode", "average", "--num-tasks", "2", "--out", tmp_path / "t", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["num_tasks"] == 2
    assert "--num-tasks is the deprecated spelling of --target-tasks" in result.stderr


def test_a_usage_error_under_json_prints_the_error_object(tmp_path: Path) -> None:
    """``--json`` promises a JSON object on stdout even when the command fails: a usage error too
    (exit 2, click's usage on stderr as always; the object's message is Click's text, a missing
    option's too); without --json stdout stays empty."""
    for argv, kind in (
        (["init", CAUSAL, "--mode", "bogus", "--out", tmp_path / "t", "--json"], "BadParameter"),
        (["verify", CAUSAL, "--tasks", "", "--json"], "BadParameter"),
        (["pack", "a.npy", "--out", tmp_path / "p", "--json"], "UsageError"),
        (["export", CAUSAL, "--out", tmp_path / "e", "--json"], "MissingParameter"),
    ):
        result = run_cli(*argv)
        assert result.exit_code == 2, (argv, result.stderr)
        report = json.loads(result.stdout)
        assert report["schema"] == "mpt-tools/error/1" and report["ok"] is False, report
        assert report["command"] == argv[0] and report["error"]["type"] == kind and report["written"] == []
        assert "Usage:" in result.stderr
        message = report["error"]["message"]  # Click's own text (a MissingParameter's was "")
        assert message and f"Error: {message}" in result.stderr, (message, result.stderr)
    plain = run_cli("init", CAUSAL, "--mode", "bogus", "--out", tmp_path / "t")
    assert plain.exit_code == 2 and plain.stdout == ""
    assert not (tmp_path / "t").exists()


def test_a_number_that_is_no_integer_says_so(tmp_path: Path) -> None:
    """Click's IntRange says "not a valid integer range" of "1.5"; ours says "not a valid integer"."""
    for argv in (
        ["init", CAUSAL, "--mode", "shared", "--seed", "1.5", "--out", tmp_path / "t"],
        ["rerank", CAUSAL, "--num-ranks", "x", "--out", tmp_path / "r"],
    ):
        result = run_cli(*argv)
        assert result.exit_code == 2 and "is not a valid integer." in result.stderr, result.stderr
        assert "integer range" not in result.stderr


def test_an_option_the_mode_ignores_is_a_warning(tmp_path: Path) -> None:
    """--task with a mode other than exact is ignored (as PEFT ignores prompt_tuning_init_task):
    init and validate say so, once per warning line ("warning: warning:" was printed before)."""
    result = run_cli("init", CAUSAL, "--mode", "shared", "--task", "1", "--out", tmp_path / "t")
    assert result.exit_code == 0, result.stderr
    assert "warning: task: --task applies to --mode exact only: ignored by shared" in result.stderr
    assert "warning: warning" not in result.stderr
    report = json.loads(run_cli("validate", CAUSAL, "--mode", "average", "--task", "1", "--json").stdout)
    assert [f["code"] for f in report["findings"] if f["level"] == "warning"] == ["unused-option"]
    assert report["valid"] is True


def test_pack_without_a_rank_is_a_usage_error(tmp_path: Path) -> None:
    """pack needs --num-ranks unless --append-to gives the rank: a missing required option, exit 2
    (was a refusal, exit 1), before any input is read."""
    result = run_cli("pack", tmp_path / "missing.npy", "--out", tmp_path / "out")
    assert result.exit_code == 2, result.stderr
    assert len(error_lines(result.stderr)) == 1 and "--num-ranks" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_refusal_names_its_other_problems_without_python_words(tmp_path: Path) -> None:
    """A refusal with several problems names the next ones in brief on the same line (``validate``
    would not list an option's), and no message says ``expected None``."""
    result = run_cli("export", CAUSAL, "--to", "npy", "--tasks", "0,0", "--out", tmp_path / "x")
    assert result.exit_code == 1
    line = error_lines(result.stderr)[0]
    assert "listed more than once (found [0])" in line and "[also names: names must be distinct" in line, line
    assert "None" not in result.stderr and "mpt-tools validate" not in result.stderr
    seq2seq = run_cli("export", FIXTURES / "seq2seq", "--to", "tgis", "--out", tmp_path / "s")
    assert seq2seq.exit_code == 1 and "encoder.pt" in seq2seq.stderr and "also" in seq2seq.stderr
    assert "decoder.pt" in seq2seq.stderr, seq2seq.stderr
    names = run_cli("export", CAUSAL, "--to", "npy", "--names", "qa,qa,nli", "--out", tmp_path / "y")
    assert "names must be distinct, ignoring case (found ['qa'])" in names.stderr, names.stderr
    assert files_under(tmp_path) == []


# --- sizes and seeds -----------------------------------------------------------------------------------

BAD_NUMBERS = {
    "init --target-tasks 0": ["init", CAUSAL, "--mode", "average", "--target-tasks", "0"],
    "init --target-tasks -3": ["init", CAUSAL, "--mode", "exact", "--target-tasks", "-3"],
    "init --target-ranks 0": ["init", CAUSAL, "--mode", "shared", "--target-ranks", "0"],
    "init --num-tasks 0": ["init", CAUSAL, "--mode", "shared", "--num-tasks", "0"],
    "init --num-ranks -1": ["init", CAUSAL, "--mode", "shared", "--num-ranks", "-1"],
    "init --seed -1": ["init", CAUSAL, "--mode", "shared", "--seed", "-1"],
    "init --seed 2**64": ["init", CAUSAL, "--mode", "shared", "--seed", str(2**64)],
    "init --token-dim 0": ["init", CAUSAL, "--mode", "average", "--token-dim", "0"],
    "validate --num-tasks 0": ["validate", CAUSAL, "--num-tasks", "0"],
    "validate --num-ranks -2": ["validate", CAUSAL, "--num-ranks", "-2"],
    "validate --num-virtual-tokens 0": ["validate", CAUSAL, "--num-virtual-tokens", "0"],
    "validate --nts 3": ["validate", CAUSAL, "--num-transformer-submodules", "3"],
    "validate --target-tasks 0": ["validate", CAUSAL, "--mode", "average", "--target-tasks", "0"],
    "validate --target-ranks -1": ["validate", CAUSAL, "--mode", "shared", "--target-ranks", "-1"],
    "inspect --num-tasks 0": ["inspect", CAUSAL, "--num-tasks", "0"],
    "rerank --num-ranks 0": ["rerank", CAUSAL, "--num-ranks", "0"],
    "rerank --num-ranks -1": ["rerank", CAUSAL, "--num-ranks", "-1"],
    "tasks --num-ranks 0": ["tasks", CAUSAL, "--select", "0", "--num-ranks", "0"],
    "convert --num-tasks -1": ["convert", CAUSAL, "--num-tasks", "-1"],
    "export-prompt --token-dim 0": ["export-prompt", CAUSAL, "--task", "0", "--token-dim", "0"],
    "export --max-prefix-len 0": ["export", CAUSAL, "--to", "tgis", "--max-prefix-len", "0"],
    "verify --num-tasks 0": ["verify", CAUSAL, "--num-tasks", "0"],
}


@pytest.mark.parametrize("case", sorted(BAD_NUMBERS))
def test_a_size_below_one_or_a_negative_seed_is_a_usage_error(case: str, tmp_path: Path) -> None:
    argv: list[Any] = list(BAD_NUMBERS[case])
    if argv[0] in ("init", "tasks", "rerank", "convert", "export-prompt", "export"):
        argv += ["--out", tmp_path / "out"]
    result = run_cli(*argv)
    assert result.exit_code == 2, (case, result.stdout, result.stderr)
    assert len(error_lines(result.stderr)) == 1, result.stderr
    assert not (tmp_path / "out").exists()


def test_a_zero_size_is_refused_by_the_library_too_not_replaced() -> None:
    """The library's plan rules refuse 0 and negative sizes for every mode (``shared`` used to
    turn ``num_tasks=0`` into 1 and ``num_ranks=0`` into the source's rank)."""
    from mpt_tools.checkpoint import load_source
    from mpt_tools.checks import check_target
    from mpt_tools.modes import TargetPlan, get_mode

    ckpt = load_source(CAUSAL)
    for mode in ("average", "exact", "shared"):
        for plan in (TargetPlan(mode, num_tasks=0), TargetPlan(mode, num_tasks=-1), TargetPlan(mode, num_ranks=0)):
            codes = {(f.code, f.field) for f in check_target(ckpt, plan) if f.level == "error"}
            assert codes & {("usage", "target_tasks"), ("usage", "target_ranks")}, (mode, plan, codes)
    assert get_mode("shared").sizes(TargetPlan("shared", num_tasks=0, num_ranks=0), 2) == (0, 0)
    assert get_mode("shared").sizes(TargetPlan("shared"), 2) == (1, 2)


def test_seed_zero_is_accepted_and_recorded(tmp_path: Path) -> None:
    result = run_cli("init", CAUSAL, "--mode", "shared", "--seed", "0", "--out", tmp_path / "t", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["metadata"]["mpt_tools.seed"] == "0"


# --- sizes against memory ----------------------------------------------------------------------------


def test_target_tasks_beyond_memory_is_refused_before_anything_is_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mpt_tools.init as init_module

    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the target was built before its size was checked")

    monkeypatch.setattr(init_module, "build_target", never)
    monkeypatch.setenv("MPT_TOOLS_MAX_TENSOR_BYTES", str(50 << 20))
    out = tmp_path / "t"
    for mode in ("average", "exact", "shared"):
        result = run_cli("init", CAUSAL, "--mode", mode, "--target-tasks", "1000000", "--out", out)
        assert result.exit_code == 1, (mode, result.stderr)
        assert len(result.stderr.splitlines()) == 1, result.stderr
        # the claimed size and the limit are both named
        assert "1000000 task(s)" in result.stderr and f"{50 << 20:,}" in result.stderr, result.stderr
        assert not out.exists()


def test_target_tasks_over_the_cap_is_refused(tmp_path: Path) -> None:
    result = run_cli("init", CAUSAL, "--mode", "shared", "--target-tasks", "1000001", "--out", tmp_path / "t")
    assert result.exit_code == 1 and "1..1000000" in result.stderr, result.stderr
    assert not (tmp_path / "t").exists()


def test_validate_plans_a_k_task_target(monkeypatch: pytest.MonkeyPatch) -> None:
    ok = run_cli("validate", CAUSAL, "--mode", "exact", "--task", "1", "--target-tasks", "4", "--json")
    assert ok.exit_code == 0, ok.stderr
    assert json.loads(ok.stdout)["valid"] is True
    # exact copies the source's factors: another rank is refused, as init refuses it
    bad = run_cli("validate", CAUSAL, "--mode", "exact", "--target-ranks", "3", "--json")
    assert bad.exit_code == 1
    assert any(f["field"] == "num_ranks" for f in json.loads(bad.stdout)["findings"])
    assert run_cli("validate", CAUSAL, "--mode", "shared", "--target-tasks", "4", "--target-ranks", "3").exit_code == 0
    monkeypatch.setenv("MPT_TOOLS_MAX_TENSOR_BYTES", str(1 << 20))
    big = run_cli("validate", CAUSAL, "--mode", "average", "--target-tasks", "1000000", "--json")
    assert big.exit_code == 1
    assert [f["code"] for f in json.loads(big.stdout)["findings"] if f["level"] == "error"] == ["too-large"]
    # sizes without a planned target are a usage error
    alone = run_cli("validate", CAUSAL, "--target-tasks", "4")
    assert alone.exit_code == 2 and "--mode" in alone.stderr


def test_validate_target_sizes_match_init(tmp_path: Path) -> None:
    """What validate says of a plan is what init does with it."""
    for args in (["--mode", "average", "--target-tasks", "3"], ["--mode", "exact", "--target-ranks", "5"]):
        planned = run_cli("validate", CAUSAL, *args)
        made = run_cli("init", CAUSAL, *args, "--out", tmp_path / "-".join(args))
        assert (planned.exit_code == 0) == (made.exit_code == 0), (args, planned.stdout, made.stderr)


# --- weights at the edge -----------------------------------------------------------------------------


def test_huge_weights_are_normalised_not_zeroed(tmp_path: Path) -> None:
    from mpt_tools.formats import open_safetensors

    out = tmp_path / "huge"
    result = run_cli("init", CAUSAL, "--mode", "average", "--weights", "1e308,1e308,1e308", "--out", out)
    assert result.exit_code == 0, result.stderr
    plain = tmp_path / "plain"
    assert run_cli("init", CAUSAL, "--mode", "average", "--weights", "1,1,1", "--out", plain).exit_code == 0
    got = open_safetensors(out / "adapter_model.safetensors")
    want = open_safetensors(plain / "adapter_model.safetensors")
    for name in ("prefix_task_cols", "prefix_task_rows"):
        a, b = got.read(name).array, want.read(name).array
        assert np.abs(a).max() > 0
        assert np.array_equal(a, b)  # 1e308 each is the same as 1 each: ratios kept exactly
    verify = run_cli("verify", out, "--source", CAUSAL, "--device", "cpu")
    assert verify.exit_code == 0, verify.stderr


@pytest.mark.parametrize(
    "weights", [[1.0, 3.0], [0.1, 0.2, 0.7], [1e-300, 5.0], [2.5, 0.0, 1e10], [5e-324, 1.0], [1e308, 1.0]]
)
def test_ordinary_weights_keep_their_bits(weights: list[float]) -> None:
    import torch

    from mpt_tools.factors import normalised_weights

    w = torch.tensor(weights, dtype=torch.float64)
    old = w / w.sum()
    assert torch.equal(normalised_weights(weights), old)


def test_weights_whose_sum_overflows() -> None:
    from mpt_tools.factors import normalised_weights

    w = normalised_weights([1e308, 1e308, 1.5e308])
    assert np.isclose(float(w.sum()), 1.0) and np.allclose(w.numpy(), [2 / 7, 2 / 7, 3 / 7])


def test_weights_without_tasks_say_all_source_tasks(tmp_path: Path) -> None:
    result = run_cli("init", CAUSAL, "--mode", "average", "--weights", "1,2,3", "--out", tmp_path / "t")
    assert result.exit_code == 0, result.stderr
    assert "None" not in result.stdout and "weighted mean of all source tasks" in result.stdout


# --- prompts that overflow float32 ---------------------------------------------------------------------


def overflowing_source(path: Path) -> Path:
    """Finite float32 factors whose product P* * (cols[k] @ rows[k]) is beyond float32's range in
    task 1 only."""
    pe = np.ones((4, 8), np.float32)
    cols = np.full((3, 4, 2), 0.5, np.float32)
    rows = np.full((3, 2, 8), 0.5, np.float32)
    cols[1] = 3e19
    rows[1] = 3e19
    return write_source(path, pe, cols, rows)


def test_validate_reports_a_prompt_that_overflows(tmp_path: Path) -> None:
    src = overflowing_source(tmp_path / "over.safetensors")
    result = run_cli("validate", src, "--task-type", "CAUSAL_LM", "--json")
    assert result.exit_code == 1
    errs = [f for f in json.loads(result.stdout)["findings"] if f["level"] == "error"]
    assert [f["code"] for f in errs] == ["prompt-overflow"] and "task 1" in errs[0]["message"]
    text = run_cli("validate", src, "--task-type", "CAUSAL_LM")
    assert len(text.stderr.splitlines()) == 1 and "overflows float32" in text.stderr


def test_init_refuses_a_target_whose_prompt_overflows(tmp_path: Path) -> None:
    src = overflowing_source(tmp_path / "over.safetensors")
    out = tmp_path / "t"
    result = run_cli("init", src, "--task-type", "CAUSAL_LM", "--mode", "exact", "--task", "1", "--out", out)
    assert result.exit_code == 1 and "overflows float32" in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert not out.exists()
    # the target holds task 0 only, whose prompt is fine
    ok = run_cli("init", src, "--task-type", "CAUSAL_LM", "--mode", "exact", "--task", "0", "--out", out)
    assert ok.exit_code == 0, ok.stderr


def test_prompt_overflow_bound_and_exact_check() -> None:
    from mpt_tools.prompts import FLOAT32_MAX, prompt_overflow

    pe = np.ones((2, 3))
    cols = np.ones((4, 2, 2))
    rows = np.ones((4, 2, 3))
    assert prompt_overflow(pe, cols, rows) is None
    # the product alone overflows float32 although P* brings the prompt back into range: PEFT
    # computes cols @ rows in float32 first, so that is Inf too
    cols[2] = 1e20
    rows[2] = 1e20
    found = prompt_overflow(pe * 1e-30, cols, rows)
    assert found is not None and found[0] == 2 and found[1] > FLOAT32_MAX
    # a bound above the limit whose exact value is not: cancellation inside the product
    cols = np.zeros((1, 1, 2))
    cols[0, 0] = [3e38, -3e38]
    rows = np.ones((1, 2, 1))
    assert prompt_overflow(np.ones((1, 1)), cols, rows) is None
    # chunks of one task find the same first task
    cols = np.ones((5, 2, 2))
    cols[3] = 1e39
    assert prompt_overflow(pe, cols, np.ones((5, 2, 3)), chunk_bytes=1) == (3, pytest.approx(2e39))


def test_an_ordinary_source_computes_no_prompt_for_the_overflow_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """The overflow check is a bound read with the factors; no prompt is formed when it passes."""
    from mpt_tools import prompts
    from mpt_tools.checkpoint import load_source
    from mpt_tools.checks import prompt_findings

    calls: list[int] = []
    real = prompts._chunk_overflow

    def counting(pe: Any, pe_max: float, cols: Any, rows: Any, start: int, limit: float) -> Any:
        calls.append(start)
        return real(pe, pe_max, cols, rows, start, limit)

    monkeypatch.setattr(prompts, "_chunk_overflow", counting)
    assert prompt_findings(load_source(CAUSAL)) == []
    assert calls == []  # every task's bound passes: no task is read again, no product is formed


# --- long lists stay linear --------------------------------------------------------------------------


class Watched(list):  # type: ignore[type-arg]
    """A list that counts full passes over it and refuses the quadratic operations (``in``,
    ``count``, ``index``: each a pass of its own, so one per item makes the step quadratic)."""

    def __init__(self, items: Any) -> None:
        super().__init__(items)
        self.passes = 0

    def __iter__(self) -> Any:
        self.passes += 1
        return super().__iter__()

    def __contains__(self, item: object) -> bool:
        raise AssertionError("membership test on a list: quadratic when done per item")

    def count(self, item: Any) -> int:
        raise AssertionError("list.count: quadratic when done per item")

    def index(self, *args: Any) -> int:
        raise AssertionError("list.index: quadratic when done per item")


def test_list_helpers_make_a_bounded_number_of_passes() -> None:
    from mpt_tools.checkpoint import load_source
    from mpt_tools.modes import TargetPlan, selection_rules
    from mpt_tools.prompts import task_runs
    from mpt_tools.surgery import repeated_and_dropped
    from mpt_tools.writer import provenance

    n = 64_000
    select = Watched([*range(n - 1, -1, -1), 5, 7])
    repeated, dropped = repeated_and_dropped(select, n + 10)
    assert repeated == [5, 7] and dropped == list(range(n, n + 10))
    assert select.passes <= 2
    runs = Watched(list(range(n)))
    assert task_runs(runs, 1000)[:2] == [(0, 1000), (1000, 2000)] and runs.passes == 1
    tasks, weights = Watched(list(range(3))), Watched([1.0, 2.0, 3.0])
    assert selection_rules(load_source(CAUSAL), TargetPlan("average", tasks=tasks, weights=weights), []) == []
    assert tasks.passes <= 4 and weights.passes <= 4
    meta = provenance({"select": Watched(list(range(n)))})
    assert meta["mpt_tools.select"].count(",") == n - 1


def test_number_list_parses_in_one_pass() -> None:
    from mpt_tools.cli.options import NumberList

    text = ",".join(str(k % 3) for k in range(64_000))
    assert NumberList(int).convert(text, None, None) == [k % 3 for k in range(64_000)]


def test_64000_entry_lists_end_to_end(tmp_path: Path) -> None:
    """The lists a shell can produce: --select, --tasks and --weights with 64,000 entries."""
    n = 64_000
    src = write_random_source(tmp_path / "many.safetensors", n=n, t=1, r=1, d=2)
    select = ",".join(str(k) for k in range(n - 1, -1, -1))
    result = run_cli("tasks", src, "--task-type", "CAUSAL_LM", "--select", select, "--out", tmp_path / "rev")
    assert result.exit_code == 0, result.stderr
    tasks = ",".join(str(k) for k in range(n))
    weights = ",".join("1" for _ in range(n))
    result = run_cli(
        "init", src, "--task-type", "CAUSAL_LM", "--mode", "average", "--tasks", tasks, "--weights", weights,
        "--out", tmp_path / "avg", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["metadata"]["mpt_tools.tasks"].count(",") == n - 1


# --- bounded per-task reports --------------------------------------------------------------------------


def sparse_source(path: Path, n: int, t: int = 2, r: int = 1, d: int = 4) -> Path:
    """A bare source whose header claims ``n`` tasks, written as a sparse file (all zeros)."""
    import struct

    entries: dict[str, Any] = {}
    pos = 0
    for name, shape in (
        ("prefix_task_cols", [n, t, r]),
        ("prefix_task_rows", [n, r, d]),
        ("prompt_embeddings", [t, d]),
    ):
        size = 4 * int(np.prod(shape))
        entries[name] = {"dtype": "F32", "shape": shape, "data_offsets": [pos, pos + size]}
        pos += size
    entries["__metadata__"] = {"format": "pt"}
    head = json.dumps(entries).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(head)) + head)
        fh.truncate(8 + len(head) + pos)
    return path


def test_inspect_lists_at_most_max_task_rows_and_sums_up_the_rest(tmp_path: Path) -> None:
    from mpt_tools.prompts import MAX_TASK_ROWS

    n = MAX_TASK_ROWS + 2345
    src = sparse_source(tmp_path / "many.safetensors", n)
    result = run_cli("inspect", src, "--task-type", "CAUSAL_LM", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert len(report["tasks"]) == MAX_TASK_ROWS and report["tasks"][-1]["task"] == MAX_TASK_ROWS - 1
    assert report["parameters"]["num_tasks"] == n
    note = [x for x in report["notes"] if x.startswith("per-task norms listed")]
    assert note and f"first {MAX_TASK_ROWS} of {n} tasks" in note[0]
    text = run_cli("inspect", src, "--task-type", "CAUSAL_LM")
    assert text.exit_code == 0 and f"note: per-task norms listed for the first {MAX_TASK_ROWS} of {n}" in text.stdout


def test_inspect_summary_covers_every_task(tmp_path: Path) -> None:
    from mpt_tools.checkpoint import load_source
    from mpt_tools.inspection import task_norms, task_norms_report

    src = write_random_source(tmp_path / "s.safetensors", n=50, t=3, r=2, d=4)
    ckpt = load_source(src)
    rows, summary = task_norms_report(ckpt, chunk_bytes=100, max_rows=7)
    every = task_norms(ckpt, chunk_bytes=100)
    assert rows == every[:7] and summary.count == 50 and summary.nonfinite == 0
    peak = max(every, key=lambda x: x["prompt_norm"] or 0.0)
    assert summary.peak_task == peak["task"]
    assert summary.high[2] == pytest.approx(peak["prompt_norm"])


def test_a_small_source_reports_every_task_with_no_note() -> None:
    report = json.loads(run_cli("inspect", CAUSAL, "--json").stdout)
    assert len(report["tasks"]) == 3 and not any(n.startswith("per-task") for n in report["notes"])


def test_similarity_of_too_many_tasks_is_refused_before_any_work(tmp_path: Path) -> None:
    from mpt_tools.compare import MAX_SIMILARITY_TASKS

    src = sparse_source(tmp_path / "many.safetensors", MAX_SIMILARITY_TASKS + 1)
    plot = tmp_path / "sim.png"
    for extra in ([], ["--plot", plot]):
        result = run_cli("inspect", src, "--task-type", "CAUSAL_LM", "--similarity", *extra)
        assert result.exit_code == 1, result.stderr
        assert len(result.stderr.splitlines()) == 1 and str(MAX_SIMILARITY_TASKS) in result.stderr
        assert f"{MAX_SIMILARITY_TASKS + 1} tasks" in result.stderr
    assert not plot.exists()


def test_diff_lists_at_most_max_task_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mpt_tools import compare

    monkeypatch.setattr(compare, "MAX_TASK_ROWS", 5)
    a = write_random_source(tmp_path / "a.safetensors", n=12, t=2, r=1, d=3, seed=1)
    b = write_random_source(tmp_path / "b.safetensors", n=12, t=2, r=1, d=3, seed=2)
    capped = compare._prompt_diff(compare.load_source(a), compare.load_source(b), 1000, max_rows=5)
    full = compare._prompt_diff(compare.load_source(a), compare.load_source(b), 1000, max_rows=100)
    assert capped is not None and full is not None
    assert capped["tasks"] == full["tasks"][:5] and len(full["tasks"]) == 12
    assert capped["max_abs_diff"] == full["max_abs_diff"]


# --- diff of identical prompts ----------------------------------------------------------------------


def test_diff_of_identical_prompts_prints_no_negative_zero(tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in CAUSAL.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    text = run_cli("diff", CAUSAL, copy)
    assert text.exit_code == 0, text.stderr
    assert "-0" not in text.stdout
    report = json.loads(run_cli("diff", CAUSAL, copy, "--json").stdout)
    for row in report["prompts"]["tasks"]:
        assert row["max_abs_diff"] == 0.0 and str(row["max_abs_diff"]) == "0.0"
    assert "-0" not in json.dumps(report["prompts"])


# --- output paths are checked before the work ----------------------------------------------------------


def test_an_existing_plot_file_is_refused_before_any_computation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mpt_tools.inspection as inspection

    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("computed before the output was checked")

    monkeypatch.setattr(inspection, "check_source", never)
    monkeypatch.setattr(inspection, "task_norms_report", never)
    plot = tmp_path / "sim.png"
    plot.write_bytes(b"keep")
    result = run_cli("inspect", CAUSAL, "--similarity", "--plot", plot)
    assert result.exit_code == 1 and "--force" in result.stderr, result.stderr
    assert plot.read_bytes() == b"keep"
    bad_suffix = run_cli("inspect", CAUSAL, "--plot", tmp_path / "sim.jpg")
    assert bad_suffix.exit_code == 1 and ".png" in bad_suffix.stderr
    # a plot inside the source's own folder
    src = tmp_path / "src"
    src.mkdir()
    for f in CAUSAL.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    inside = run_cli("inspect", src, "--plot", src / "sim.png")
    assert inside.exit_code == 1 and "source" in inside.stderr
    assert not (src / "sim.png").exists()


# --- a missing local path is not a Hub repo id -------------------------------------------------------


@pytest.mark.parametrize(
    "text", ["runs/sources", "./x", "../x", "/abs/no/such", "x.safetensors", "runs/a.bin", "a/b/c", "nosuch"]
)
def test_a_missing_path_says_no_such_file_at_once(text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mpt_tools.hub.download as download

    def no_hub(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("asked the Hub about a local path")

    monkeypatch.setattr(download, "download_source", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    result = run_cli("validate", text)
    assert result.exit_code == 1, result.stderr
    assert len(result.stderr.splitlines()) == 1 and "no such file or folder" in result.stderr, result.stderr
    assert "not in the local cache" not in result.stderr


@pytest.mark.parametrize("text", ["teachers/qa.npy", "qa.npy", "./teachers/qa", "a/b/c", "x.pt"])
def test_a_missing_prompt_for_pack_says_no_such_file_at_once(
    text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pack reads Hub prompts too, by the same rule: a missing tensor file (``.npy`` included) or
    folder is a missing local path, without a Hub call."""
    import mpt_tools.hub.download as download

    def no_hub(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("asked the Hub about a local path")

    monkeypatch.setattr(download, "download_source", no_hub)
    monkeypatch.chdir(tmp_path)
    result = run_cli("pack", text, "--num-ranks", "1", "--out", tmp_path / "out")
    assert result.exit_code == 1, result.stderr
    assert len(result.stderr.splitlines()) == 1 and "no such file or folder" in result.stderr, result.stderr
    assert text in result.stderr and not (tmp_path / "out").exists()


def test_path_or_repo_id_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mpt_tools.hub.download import local_path_reason

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert local_path_reason("runs/sources") is not None
    assert local_path_reason("org/name") is None  # a Hub id: no folder "org" here
    assert local_path_reason("org/name@v2") is None
    assert local_path_reason("hf://runs/sources") is None  # hf:// is always the Hub
    for path in ("./org/name", "/org/name", "~/x", "org/name.safetensors", "org\\name", "C:x"):
        assert local_path_reason(path) is not None, path
    result = run_cli("validate", "runs/sources")
    assert "hf://runs/sources" in result.stderr  # the Hub reading, as a hint


# --- the tool's own environment variables ----------------------------------------------------------------


@pytest.mark.parametrize("value", ["abc", "-5", "0", "1e9", "12 MB", "1_000", "\u0663\u0660\u0660\u0660", "+5"])
def test_a_garbage_environment_value_is_one_line(value: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MPT_TOOLS_MAX_TENSOR_BYTES", value)
    for argv in (["validate", CAUSAL], ["init", CAUSAL, "--mode", "average", "--out", tmp_path / "t"]):
        result = run_cli(*argv)
        assert result.exit_code == 1, result.stderr
        assert result.stderr.splitlines() == [
            f"error: MPT_TOOLS_MAX_TENSOR_BYTES={value!r} is not a positive number of bytes: fix it or unset it"
        ]
    assert not (tmp_path / "t").exists()


def test_good_environment_values_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    from mpt_tools.cli.options import environment_problem

    assert environment_problem({}) is None
    assert environment_problem({"MPT_TOOLS_MAX_TENSOR_BYTES": ""}) is None
    assert environment_problem({"MPT_TOOLS_MAX_TENSOR_BYTES": " 1048576 "}) is None
    assert environment_problem({"MPT_TOOLS_DEBUG": "yes please", "MPT_TOOLS_NO_HASH_CACHE": "x"}) is None
    monkeypatch.setenv("MPT_TOOLS_MAX_TENSOR_BYTES", "1000000000000")
    assert run_cli("validate", CAUSAL).exit_code == 0
    assert os.environ["MPT_TOOLS_MAX_TENSOR_BYTES"] == "1000000000000"


# --- the README's training route ---------------------------------------------------------------------


def test_readme_training_route_block_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's training block, run as written (``base_model`` a tiny model, ``target`` made by
    init): its check passes, and PEFT's load result does list the three keys, as the README says."""
    import re

    from conftest import ROOT
    from test_peft_oracle import tiny_model

    readme = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "set_peft_model_state_dict" in b)
    assert run_cli("init", CAUSAL, "--mode", "average", "--out", tmp_path / "target").exit_code == 0
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"base_model": tiny_model("CAUSAL_LM", 16)}
    exec(compile(block, "README.md#training", "exec"), namespace)
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(namespace["model"], namespace["weights"])
    assert sorted(result.unexpected_keys) == ["prefix_task_cols", "prefix_task_rows", "prompt_embeddings"]
    assert "prompt_encoder.default.prefix_task_cols" in result.missing_keys


def test_memory_limit_refuses_a_garbage_override_for_library_callers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The library gives the CLI's one line (a ConfigError), not a bare ValueError."""
    from mpt_tools.errors import ConfigError
    from mpt_tools.formats import memory_limit

    for value in ("abc", "-5", "0"):
        monkeypatch.setenv("MPT_TOOLS_MAX_TENSOR_BYTES", value)
        with pytest.raises(ConfigError, match="not a positive number of bytes"):
            memory_limit()
    monkeypatch.setenv("MPT_TOOLS_MAX_TENSOR_BYTES", " 4096 ")
    assert memory_limit() == 4096


def test_a_missing_repo_shaped_path_names_both_readings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`runs/sources` with no `runs/` folder here is read as a Hub repo id (offline: not cached);
    the one line says there is no local file or folder of that name either. `hf://` is never a path."""
    monkeypatch.chdir(tmp_path)
    result = run_cli("validate", "runs/sources")
    assert result.exit_code == 1
    assert "there is no local file or folder 'runs/sources' either" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = run_cli("validate", "hf://runs/sources")
    assert result.exit_code == 1 and "local file" not in result.stderr


def test_validate_reads_the_factors_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The overflow bound comes from the value scan's own pass: an ordinary source's factors are
    read once by check_source (no second pass over every task)."""
    from mpt_tools.checkpoint import load_source
    from mpt_tools.checks import check_source

    src = write_random_source(tmp_path / "s.safetensors", n=6, t=4, r=2, d=8)
    ckpt = load_source(src)
    check_source(ckpt)
    rows_read = [r for r in ckpt.file.reads if r[0] in ("prefix_task_cols", "prefix_task_rows")]
    assert sum(stop - start for _, start, stop, _ in rows_read) == 2 * 6, rows_read


# --- the library's own arguments -------------------------------------------------------------------------


def _library_calls(tmp: Path) -> dict[str, Any]:
    """Library calls with an argument of the wrong kind, each a ConfigError naming it (they were
    TypeErrors, ValueErrors, or a read of the current folder), by what is wrong."""
    import numpy as np

    from mpt_tools import (
        ExportOptions,
        PackOptions,
        TargetPlan,
        audit_adapters,
        diff,
        export_prompt,
        export_prompts,
        init_adapter,
        inspect_source,
        pack_prompts,
        rerank,
        select_tasks,
        validate,
        verify,
    )
    from mpt_tools.compare import plot_similarity, task_similarity

    out = tmp / "out"
    return {
        "init out ''": lambda: init_adapter(CAUSAL, "average", ""),
        "init out None": lambda: init_adapter(CAUSAL, "average", None),
        "export out ''": lambda: export_prompts(CAUSAL, "npy", ""),
        "validate ''": lambda: validate(""),
        "validate 123": lambda: validate(123),
        "validate against ''": lambda: validate(CAUSAL, against=""),
        "inspect None": lambda: inspect_source(None),
        "inspect plot ''": lambda: inspect_source(CAUSAL, similarity=True, plot=""),
        "pack shared ''": lambda: pack_prompts([CAUSAL], out, options=PackOptions(num_ranks=1, shared="")),
        "select '2,0'": lambda: select_tasks(CAUSAL, "2,0", out),
        "select 2": lambda: select_tasks(CAUSAL, 2, out),
        "select [2.5, 0]": lambda: select_tasks(CAUSAL, [2.5, 0], out),
        "select [True, False]": lambda: select_tasks(CAUSAL, [True, False], out),
        "export tasks '0,1'": lambda: export_prompts(CAUSAL, "npy", out, tasks="0,1"),
        "export names 'abc'": lambda: export_prompts(CAUSAL, "npy", out, names="abc"),
        "export options dict": lambda: export_prompts(CAUSAL, "npy", out, options={"dtype": "float16"}),
        "verify tasks '0,1'": lambda: verify(CAUSAL, tasks="0,1"),
        "verify tasks 1": lambda: verify(CAUSAL, tasks=1),
        "rerank '2'": lambda: rerank(CAUSAL, "2", out),
        "rerank 2.0": lambda: rerank(CAUSAL, 2.0, out),
        "export_prompt 1.0": lambda: export_prompt(CAUSAL, 1.0, out),
        "plan tasks '0,2'": lambda: init_adapter(CAUSAL, TargetPlan("average", tasks="0,2"), out),
        "plan weights str": lambda: init_adapter(CAUSAL, TargetPlan("average", weights="0.5,0.5,0"), out),
        "plan task '1'": lambda: validate(CAUSAL, mode="exact", task="1"),
        "plan seed -1": lambda: init_adapter(CAUSAL, TargetPlan("shared", seed=-1), out),
        "plan seed 1.5": lambda: init_adapter(CAUSAL, TargetPlan("shared", seed=1.5), out),
        "plan seed 2**64": lambda: init_adapter(CAUSAL, TargetPlan("shared", seed=2**64), out),
        "pack seed 2**64": lambda: pack_prompts(
            [], out, sources=[CAUSAL], options=PackOptions(num_ranks=1, seed=2**64)
        ),
        "pack seed -1": lambda: pack_prompts([], out, sources=[CAUSAL], options=PackOptions(num_ranks=1, seed=-1)),
        "pack nts 1.0": lambda: pack_prompts(
            [], out, sources=[CAUSAL], options=PackOptions(num_ranks=1, num_transformer_submodules=1.0)
        ),
        "plan 123": lambda: init_adapter(CAUSAL, 123, out),
        "pack options dict": lambda: pack_prompts([CAUSAL], out, options={"num_ranks": 2}),
        "pack sources (c, '0,1')": lambda: pack_prompts([], out, sources=[(CAUSAL, "0,1")]),
        "pack sources 5": lambda: pack_prompts([], out, sources=[5]),
        "plot a list": lambda: plot_similarity(np.eye(3).tolist(), tmp / "s.png"),
        "plot a row": lambda: plot_similarity(np.eye(3)[0], tmp / "s.png"),
        # a budget or a worker count below 1 (0 was silently "the default" or "one item at a time")
        "audit jobs 0": lambda: audit_adapters(CAUSAL, jobs=0),
        "audit jobs '4'": lambda: audit_adapters(CAUSAL, jobs="4"),
        "diff chunk_bytes 0": lambda: diff(CAUSAL, CAUSAL, chunk_bytes=0),
        "diff chunk_bytes 1e6": lambda: diff(CAUSAL, CAUSAL, chunk_bytes=1e6),
        "similarity chunk_bytes -1": lambda: task_similarity(CAUSAL, chunk_bytes=-1),
        "verify chunk_bytes 0": lambda: verify(CAUSAL, chunk_bytes=0),
        "rerank chunk_bytes 0": lambda: rerank(CAUSAL, 1, out, chunk_bytes=0),
        "export chunk_bytes 0": lambda: export_prompts(CAUSAL, "npy", out, options=ExportOptions(chunk_bytes=0)),
        "pack chunk_bytes 0": lambda: pack_prompts([CAUSAL], out, options=PackOptions(num_ranks=1, chunk_bytes=0)),
        "export options ok": lambda: ExportOptions(),  # not an error: a control
    }


def test_tasks_and_rerank_outputs_are_held_to_the_memory_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What tasks and rerank would write is held to MPT_TOOLS_MAX_TENSOR_BYTES as what is read is
    (prefix_task_rows of the 3-task fixture: 3 x 2 x 16 float32 = 384 bytes)."""
    monkeypatch.setenv("MPT_TOOLS_MAX_TENSOR_BYTES", "384")
    cases = [
        (["tasks", CAUSAL, "--select", "0,1,2,0,1,2"], "would claim 768 bytes", 1),
        (["tasks", CAUSAL, "--select", "2,0,1"], "", 0),
        (["rerank", CAUSAL, "--num-ranks", "3"], "would claim 576 bytes", 1),
        (["rerank", CAUSAL, "--num-ranks", "1"], "", 0),
    ]
    for i, (argv, needle, code) in enumerate(cases):
        result = run_cli(*argv, "--out", tmp_path / f"o{i}")
        assert result.exit_code == code and needle in result.stderr, (argv, result.stderr)
        assert (tmp_path / f"o{i}").exists() == (code == 0)
    assert "MPT_TOOLS_MAX_TENSOR_BYTES (384 bytes)" in run_cli(*cases[0][0], "--out", tmp_path / "x").stderr


def test_the_library_refuses_arguments_of_the_wrong_kind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mpt_tools.errors import ConfigError

    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)  # an empty path must never mean this folder
    calls = _library_calls(tmp_path)
    for name, call in calls.items():
        if name == "export options ok":
            call()
            continue
        with pytest.raises(ConfigError) as info:
            call()
        assert "\n" not in str(info.value), name
    assert files_under(work) == [] and not (tmp_path / "out").exists()


def test_the_library_takes_one_path_where_it_takes_many(tmp_path: Path) -> None:
    """A single path where a list of paths is taken is that one path (audit walked the characters of
    the string: "/", "f", ...); a source alone in pack's ``sources`` is all its tasks; and export
    takes the dtype aliases every --dtype takes."""
    from mpt_tools import PackOptions, audit_adapters, export_prompts, pack_prompts

    one = audit_adapters(str(CAUSAL))
    assert [r["where"] for r in one["rows"]] == [str(CAUSAL)]
    packed = pack_prompts([], tmp_path / "p", sources=[CAUSAL], options=PackOptions(num_ranks=2))
    assert packed["num_tasks"] == 3
    from mpt_tools import ExportOptions

    export_prompts(CAUSAL, "npy", tmp_path / "a", options=ExportOptions(dtype="fp16"))
    export_prompts(CAUSAL, "npy", tmp_path / "b", options=ExportOptions(dtype="float16"))
    assert (tmp_path / "a" / "task_0.npy").read_bytes() == (tmp_path / "b" / "task_0.npy").read_bytes()


def test_library_takes_paths_and_arrays_and_refuses_a_plan_without_a_mode(tmp_path: Path) -> None:
    """A tester's library run: a Path that does not exist is audit's row, not an AttributeError; a
    numpy array of tasks or weights is a list (it was numpy's "truth value ... is ambiguous");
    download_source given a Path, and validate given a target's sizes without a mode, are one-line
    ConfigErrors (validate had ignored them); every exception class is importable from the top."""
    import inspect

    import numpy as np

    import mpt_tools as M
    from mpt_tools import ConfigError, TargetPlan, errors

    row = M.audit_adapters(tmp_path / "nope")["rows"][0]
    assert row["valid"] is False and "no such file" in row["error"]
    assert M.audit_adapters([tmp_path / "nope", str(CAUSAL)])["adapters"] == 2
    with pytest.raises(ConfigError, match="targets: expected paths or repo ids"):
        M.audit_adapters([3])  # type: ignore[list-item]
    plan = TargetPlan("average", tasks=np.array([0, 2]), weights=np.array([0.25, 0.75]))  # type: ignore[arg-type]
    listed = TargetPlan("average", tasks=[0, 2], weights=[0.25, 0.75])
    a = M.init_adapter(CAUSAL, plan, tmp_path / "a")
    b = M.init_adapter(CAUSAL, listed, tmp_path / "b")
    assert a["metadata"]["mpt_tools.tasks"] == b["metadata"]["mpt_tools.tasks"] == "0,2"
    assert a["metadata"]["mpt_tools.weights"] == b["metadata"]["mpt_tools.weights"]
    weights = "adapter_model.safetensors"
    assert (tmp_path / "a" / weights).read_bytes() == (tmp_path / "b" / weights).read_bytes()
    with pytest.raises(ConfigError, match="download_source takes a Hub repo id"):
        M.download_source(CAUSAL)  # type: ignore[arg-type]
    for kwargs, needle in (
        ({"num_tasks": 3}, "num_tasks describes"),
        ({"task": 1, "num_ranks": 2}, "task and num_ranks"),
    ):
        with pytest.raises(ConfigError, match=needle):
            M.validate(CAUSAL, **kwargs)  # type: ignore[arg-type]
    assert run_cli("validate", CAUSAL, "--task", "1").exit_code == 2
    for name in M.__all__:
        value = getattr(M, name)
        if isinstance(value, type) and issubclass(value, Exception):
            assert value is getattr(errors, name) and issubclass(value, M.MptToolsError)
    assert {"ValidationError", "WriteError", "VerificationFailed", "HubError"} <= set(M.__all__)
    for options in (M.SourceSpec, M.HubOptions, M.TargetPlan, M.ExportOptions, M.PackOptions, M.ConfigOverrides):
        assert "ForwardRef('int" not in str(inspect.signature(options)) and "ForwardRef('str" not in str(
            inspect.signature(options)
        ), options


LIBRARY_RUN = """
import sys
import mpt_tools as M
src, out = sys.argv[1], sys.argv[2]
M.validate(src, mode="average")
M.inspect_source(src)
M.init_adapter(src, "average", out + "/init")
M.init_and_verify(src, M.TargetPlan("exact", task=1), out + "/exact", device="cpu")
M.verify(out + "/init", device="cpu")
M.select_tasks(src, [2, 0], out + "/tasks")
M.rerank(src, 3, out + "/rerank")
M.convert(src, out + "/conv.safetensors")
M.export_prompts(src, "npy", out + "/npy")
M.pack_prompts([], out + "/pack", sources=[src], options=M.PackOptions(num_ranks=2, device="cpu"))
M.audit_adapters(out, deep=True)
M.diff(src, out + "/tasks")
try:
    M.init_adapter(src, "average", out + "/init")
except M.WriteError:
    pass
"""


def test_the_library_prints_nothing_even_on_a_terminal(tmp_path: Path) -> None:
    """The README's promise: library functions print nothing and show no progress bar, even with
    stdout and stderr on a terminal (where the command line shows bars)."""
    import pty
    import subprocess
    import sys

    main, other = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", LIBRARY_RUN, str(CAUSAL), str(tmp_path)],
            stdout=other,
            stderr=other,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        os.close(other)
        shown = b""
        while True:
            try:
                chunk = os.read(main, 4096)
            except OSError:  # EIO: the other end is closed
                break
            if not chunk:
                break
            shown += chunk
        assert proc.wait(timeout=300) == 0, shown.decode(errors="replace")
    finally:
        os.close(main)
    assert shown == b"", shown.decode(errors="replace")
    assert (tmp_path / "pack" / "adapter_model.safetensors").exists()


def test_cast_and_release_refusals_name_the_source(tmp_path: Path) -> None:
    """A tester's finding: convert's dtype-overflow refusal and a --peft-compat refusal were lines
    with no file (``error: prompt_embeddings: ...``, ``error: PEFT 0.10.0 cannot load ...``)."""
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(CAUSAL / "adapter_model.safetensors"))
    tensors["prompt_embeddings"][0, 0] = 3.4e38
    torch.save(tensors, tmp_path / "big.pt")
    for dtype, advice in (("float16", "(keep float32)"), ("bfloat16", "(keep float32)")):  # 3.4e38: no bfloat16
        res = run_cli("convert", tmp_path / "big.pt", "--out", tmp_path / f"{dtype}.safetensors", "--dtype", dtype)
        assert res.exit_code == 1 and res.stderr.startswith(f"error: {tmp_path / 'big.pt'}: prompt_embeddings:")
        assert res.stderr.rstrip().endswith(advice), res.stderr
    source = tmp_path / "ms"
    shutil.copytree(CAUSAL, source)
    config = json.loads((source / "adapter_config.json").read_text())
    (source / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["score"]}))
    for argv in (
        ["compat", source, "--peft", "0.13.2", "--out", tmp_path / "c"],
        ["init", source, "--mode", "average", "--peft-compat", "0.10.0", "--out", tmp_path / "i"],
        ["tasks", source, "--select", "0", "--peft-compat", "0.10.0", "--out", tmp_path / "t"],
    ):
        res = run_cli(*argv)
        assert res.exit_code == 1 and res.stderr.startswith(f"error: {source}: PEFT 0."), res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.pt", "ms"]


@pytest.mark.parametrize("value", ["\uff11", "0_1", "1_0", "\u0661"])
def test_single_numbers_take_ascii_digits_only(tmp_path: Path, value: str) -> None:
    """A tester's finding: --task and --num-ranks went through int(), which reads 0_1 as 1 and a
    fullwidth or Arabic-Indic digit as its value; --tol through float(). Usage errors, as in lists."""
    for argv in (
        ["init", CAUSAL, "--mode", "exact", "--task", value, "--out", tmp_path / "i"],
        ["rerank", CAUSAL, "--num-ranks", value, "--out", tmp_path / "r"],
        ["export-prompt", CAUSAL, "--task", value, "--out", tmp_path / "e"],
        ["pack", "--from", CAUSAL, "--num-ranks", "1", "--tol", value, "--out", tmp_path / "p"],
    ):
        result = run_cli(*argv)
        assert result.exit_code == 2 and "is not a valid" in result.stderr, (argv, result.stderr)
    assert list(tmp_path.iterdir()) == []
