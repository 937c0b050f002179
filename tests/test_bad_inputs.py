"""Every command on every case of the generated hostile/broken corpus: exit 1, one clear line on
stderr naming the problem, no traceback, nothing written, inputs byte-identical, no code run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from conftest import run_cli
from corpus import Case, build_corpus, snapshot

from mpt_tools.cli import cli

FIXTURES = Path(__file__).parent.parent / "fixtures"
CORPUS_ROOT: Path | None = None
EXPORT_FORMATS = ("peft", "tgis", "vllm", "trtllm", "npy")  # export runs every case in each format
CASES: list[Case] = []


def _cases() -> list[Case]:
    global CORPUS_ROOT, CASES
    if not CASES:
        import tempfile

        CORPUS_ROOT = Path(tempfile.mkdtemp(prefix="mpt-corpus-"))
        CASES = build_corpus(CORPUS_ROOT)
    return CASES


def command_lines(case: Case, out: Path) -> dict[str, list[str]]:
    """The command lines to try on a case, for the commands this build has."""
    src = str(case.path)
    lines = {
        "inspect": ["inspect", src],
        "validate": ["validate", src],
        "init-average": ["init", src, "--mode", "average", "--out", str(out / "avg")],
        "init-exact": ["init", src, "--mode", "exact", "--task", "1", "--out", str(out / "exact")],
        "init-shared": ["init", src, "--mode", "shared", "--seed", "1", "--out", str(out / "shared")],
        "verify": ["verify", src],
        "convert": ["convert", src, "--out", str(out / "conv.safetensors")],
        "push-dry-run": ["push", src, "someone/repo", "--dry-run"],
        "tasks": ["tasks", src, "--select", "1,0", "--out", str(out / "tasks")],
        "rerank": ["rerank", src, "--num-ranks", "1", "--out", str(out / "rerank")],
        "export-prompt": ["export-prompt", src, "--task", "0", "--out", str(out / "prompt")],
        **{f"export-{fmt}": ["export", src, "--to", fmt, "--out", str(out / fmt)] for fmt in EXPORT_FORMATS},
        "diff": ["diff", src, str(FIXTURES / "causal")],
        "similarity": ["inspect", src, "--similarity", "--plot", str(out / "sim.png")],
        "compat": ["compat", src, "--peft", "0.10.0", "--out", str(out / "compat")],
        # every writer with --peft-compat (a config for exactly one PEFT release)
        "init-peft-compat": ["init", src, "--mode", "average", "--out", str(out / "avg13"), "--peft-compat", "0.13.2"],
        "tasks-peft-compat": ["tasks", src, "--select", "0", "--out", str(out / "t13"), "--peft-compat", "0.13.2"],
        "rerank-peft-compat": ["rerank", src, "--num-ranks", "2", "--out", str(out / "r13"), "--peft-compat", "0.13"],
        "convert-peft-compat": ["convert", src, "--out", str(out / "conv13"), "--peft-compat", "0.10.0"],
        "export-peft-compat": [
            "export-prompt",
            src,
            "--task",
            "0",
            "--out",
            str(out / "p13"),
            "--peft-compat",
            "0.17.1",
        ],
    }
    # embed refuses the source before it looks at the base model (fixtures/causal has no tokenizer.json)
    lines["embed"] = ["embed", src, "--task", "0", "--text", "hi", "--base-model", str(FIXTURES / "causal"),
                      "--out", str(out / "request.pt")]  # fmt: skip
    # pack reads the case as an MPT adapter (a case is a bad MPT source, not necessarily a bad prompt)
    lines["pack"] = ["pack", "--from", src, "--tasks", "0", "--num-ranks", "1", "--out", str(out / "pack")]
    lines["pack-append"] = ["pack", "--from", src, "--tasks", "0", "--append-to", src, "--out", str(out / "packed")]
    if case.name != "cfg-peft-type-lora":  # audit lists another PEFT type by type: not an error
        lines["audit"] = ["audit", src, "--deep"]  # each case one row with its error (see test_audit)
    return {k: v for k, v in lines.items() if v[0] in cli.commands}


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c.name)
def test_every_command_refuses_cleanly(case: Case, tmp_path: Path) -> None:
    assert CORPUS_ROOT is not None
    case_dir = CORPUS_ROOT / case.name
    before = snapshot(case_dir)
    out = tmp_path / "out"
    for label, argv in command_lines(case, out).items():
        result = run_cli(*argv)
        where = f"{label} on {case.name} ({case.why})"
        assert result.exception is None or isinstance(result.exception, SystemExit), (
            f"{where}: unexpected {result.exception!r}"
        )
        assert result.exit_code == 1, f"{where}: exit {result.exit_code}\n{result.output}\n{result.stderr}"
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, f"{where}: stderr is not one line:\n{result.stderr}"
        line = lines[0]
        # diff compares whatever it can read: a readable but invalid adapter simply differs.
        prefixes = ("error: ", "differ: ") if label == "diff" else ("error: ",)
        assert line.startswith(prefixes), f"{where}: {line}"
        assert "Traceback" not in result.output + result.stderr
        assert "internal error" not in line, f"{where}: {line}"
        assert not out.exists() or not any(out.rglob("*")), f"{where}: wrote {list(out.rglob('*'))}"
        assert snapshot(case_dir) == before, f"{where}: inputs changed"
        if case.sentinel is not None:
            assert not case.sentinel.exists(), f"{where}: the payload ran"


def test_messages_name_the_problem() -> None:
    """A readable table of cases and messages (docs/bad-inputs.md is generated from this)."""
    rows = []
    for case in _cases():
        result = run_cli("validate", str(case.path))
        rows.append((case.name, case.why, result.stderr.strip()))
        assert str(case.path.name) in result.stderr or case.path.name in result.stderr or "error:" in result.stderr
    assert len(rows) >= 40


def test_docs_table_covers_every_case() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "bad-inputs.md").read_text()
    missing = [c.name for c in _cases() if f"`{c.name}`" not in doc]
    assert not missing, f"docs/bad-inputs.md lacks {missing}: run python docs/make_bad_inputs_table.py"


def test_every_fault_case_names_a_test_that_exists() -> None:
    """docs/bad-inputs.md's second table: every case is run by the test it names, and listed."""
    import ast

    from fault_cases import FAULT_CASES

    doc = (Path(__file__).parent.parent / "docs" / "bad-inputs.md").read_text()
    names = [c.name for c in FAULT_CASES]
    assert len(names) == len(set(names))
    for case in FAULT_CASES:
        file, test = case.test.split("::")
        tree = ast.parse((Path(__file__).parent / file).read_text())
        defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert test in defined, f"{case.name}: {case.test} does not exist"
        assert f"`{case.name}`" in doc, f"docs/bad-inputs.md lacks {case.name}: run docs/make_bad_inputs_table.py"
