"""Messages name options as the caller gave them: Python arguments for the library, flags for the CLI.

The library words a message with :func:`mpt_tools.errors.flag`, which gives the command line's
spelling (``--force``) only while the CLI runs a command (:func:`mpt_tools.errors.cli_wording`);
a caller of ``import mpt_tools`` reads ``force=True``. Each case below is one failure, run once
through the library and, where the command line reaches the library with it, once through the CLI.
"""

from __future__ import annotations

import ast
import re
import shutil
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from conftest import run_cli

import mpt_tools
from mpt_tools import errors
from mpt_tools.errors import MptToolsError, cli_wording, flag

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
CAUSAL, SEQ2SEQ = FIXTURES / "causal", FIXTURES / "seq2seq"

FLAG = re.compile(r"(?<![\w-])--(?:[a-z]|\{)")
"""A command-line flag in a message: ``--force``, or ``--{name}`` built from a field name."""


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _written(out: Path) -> Path:
    """``out`` with an adapter already written there (for a second write to refuse)."""
    mpt_tools.init_adapter(CAUSAL, "average", out)
    return out


def _odd_prompt(folder: Path) -> Path:
    """A bare [3, 16] prompt file in ``folder``: 3 rows, which 2 submodules cannot split."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "enc.npy", np.ones((3, 16), dtype=np.float32))
    return folder / "enc.npy"


def _library_error(call: Callable[[], Any]) -> str:
    with pytest.raises(MptToolsError) as info:
        call()
    return str(info.value)


# name: (library call given tmp_path, what its message says, CLI argv given tmp_path, what the CLI says);
# argv None where the command line refuses the input itself (a usage error, exit 2) before the library.
CASES: dict[str, tuple[Callable[[Path], Any], list[str], Callable[[Path], list[Any]] | None, list[str]]] = {
    "init twice": (
        lambda t: mpt_tools.init_adapter(CAUSAL, "average", _written(t / "o")),
        ["pass force=True to overwrite it"],
        lambda t: ["init", CAUSAL, "--mode", "average", "--out", _written(t / "o")],
        ["pass --force to overwrite it"],
    ),
    "verify tasks out of range": (
        lambda t: mpt_tools.verify(CAUSAL, device="cpu", tasks=[7]),
        ["tasks=[7] out of range"],
        lambda t: ["verify", CAUSAL, "--device", "cpu", "--tasks", "7"],
        ["--tasks [7] out of range"],
    ),
    "rerank to rank 0": (
        lambda t: mpt_tools.rerank(CAUSAL, 0, t / "o"),
        ["fix: pass num_ranks=1 or more"],
        None,  # --num-ranks 0 is a usage error
        [],
    ),
    "export-prompt of a seq2seq adapter": (
        lambda t: mpt_tools.export_prompt(SEQ2SEQ, 0, t / "o"),
        ["fix: pass encoder_only=True"],
        lambda t: ["export-prompt", SEQ2SEQ, "--task", "0", "--out", t / "o"],
        ["fix: pass --encoder-only"],
    ),
    "export with too few names": (
        lambda t: mpt_tools.export_prompts(CAUSAL, "peft", t / "o", names=["a"]),
        ["give as many names as tasks"],
        lambda t: ["export", CAUSAL, "--to", "peft", "--names", "a", "--out", t / "o"],
        ["give as many --names as tasks"],
    ),
    "export --encoder-only of a causal adapter": (
        lambda t: mpt_tools.export_prompts(CAUSAL, "tgis", t / "o", options=mpt_tools.ExportOptions(encoder_only=True)),
        ["fix: drop ExportOptions(encoder_only=True)"],
        lambda t: ["export", CAUSAL, "--to", "tgis", "--encoder-only", "--out", t / "o"],
        ["fix: drop --encoder-only"],
    ),
    "pack an MPT adapter as a prompt": (
        lambda t: mpt_tools.pack_prompts([CAUSAL], t / "o", options=mpt_tools.PackOptions(num_ranks=1)),
        ["give it in sources=[(SOURCE, TASKS)]"],
        lambda t: ["pack", CAUSAL, "--num-ranks", "1", "--out", t / "o"],
        ["give it as --from SOURCE (--tasks LIST)"],
    ),
    "pack bare encoder prompts of a seq2seq model": (
        lambda t: mpt_tools.pack_prompts(
            [_odd_prompt(t)], t / "o", options=mpt_tools.PackOptions(num_ranks=1, task_type="SEQ_2_SEQ_LM")
        ),
        ["for the encoder half alone give PackOptions(num_transformer_submodules=1)"],
        lambda t: ["pack", _odd_prompt(t), "--task-type", "SEQ_2_SEQ_LM", "--num-ranks", "1", "--out", t / "o"],
        ["for the encoder half alone give --num-transformer-submodules 1"],
    ),
    "pack without a rank": (
        lambda t: mpt_tools.pack_prompts([], t / "o"),
        ["give prompts or sources=[(SOURCE, TASKS)]", "is required (without PackOptions(append_to=...))"],
        None,  # the command line asks for PROMPTS and --num-ranks itself
        [],
    ),
    "a folder of named adapters": (
        lambda t: mpt_tools.load_source(FIXTURES / "named"),
        ["add SourceSpec(..., subfolder=NAME)"],
        lambda t: ["validate", FIXTURES / "named"],
        ["add --subfolder NAME"],
    ),
    "a subfolder of a file": (
        lambda t: mpt_tools.load_source(mpt_tools.SourceSpec(str(CAUSAL / "adapter_model.safetensors"), "sources")),
        ["subfolder applies to an adapter directory"],
        lambda t: ["validate", CAUSAL / "adapter_model.safetensors", "--subfolder", "sources"],
        ["--subfolder applies to an adapter directory"],
    ),
    "a Hub repo offline, not cached": (
        lambda t: mpt_tools.load_source(
            mpt_tools.SourceSpec("org/nowhere", hub=mpt_tools.HubOptions(offline=True, cache_dir=str(t / "hf")))
        ),
        ["(HubOptions(offline=True) or HF_HUB_OFFLINE=1)", "give HubOptions(cache_dir=...) of a cache"],
        lambda t: ["validate", "org/nowhere", "--offline", "--cache-dir", t / "hf"],
        ["(--offline or HF_HUB_OFFLINE=1)", "give --cache-dir of a cache"],
    ),
    "verify on CUDA without CUDA": (
        lambda t: mpt_tools.verify(CAUSAL, device="cuda"),
        ['device="cuda": CUDA is not available', 'use device="cpu" or "auto"'],
        lambda t: ["verify", CAUSAL, "--device", "cuda"],
        ["--device cuda: CUDA is not available", "use --device cpu or auto"],
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_library_names_python_arguments_and_the_cli_its_flags(name: str, tmp_path: Path) -> None:
    call, says, argv, cli_says = CASES[name]
    if "CUDA" in name and _cuda():
        pytest.skip("CUDA is available here")
    message = _library_error(lambda: call(tmp_path / "lib"))
    for text in says:
        assert text in message, message
    assert not FLAG.search(message), message
    if argv is None:
        return
    result = run_cli(*argv(tmp_path / "cli"))
    assert result.exit_code == 1, result.stderr
    for text in cli_says:
        assert text in result.stderr, result.stderr
    # the same failure, the same words around the option (the CLI's line leads with "error: ")
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: ")


def test_findings_and_notes_name_python_arguments(tmp_path: Path) -> None:
    """Not only exceptions: a finding's message and fix, and a note of a result."""
    report = mpt_tools.validate(CAUSAL, mode="shared", task=1)
    (unused,) = [f for f in report["findings"] if f["code"] == "unused-option"]
    assert (
        unused["message"] == 'task= applies to mode="exact" only: ignored by shared' and unused["fix"] == "drop task="
    )
    result = run_cli("validate", CAUSAL, "--mode", "shared", "--task", "1", "--json")
    assert result.exit_code == 0, result.stderr
    assert "--task applies to --mode exact only" in result.stdout and '"drop --task"' in result.stdout

    tree = tmp_path / "tree"
    shutil.copytree(FIXTURES / "causal_bin", tree / "bin")
    (row,) = mpt_tools.audit_adapters([str(tree)], jobs=2)["rows"]  # the rows are made in worker threads
    assert "weights not read (.bin: deep=True reads them)" in row["notes"], row["notes"]
    result = run_cli("audit", tree, "--jobs", "2")
    assert "weights not read (.bin: --deep reads them)" in result.stdout, result.stdout


def test_the_cli_wording_is_restored_after_a_command() -> None:
    """The switch is on only while a command runs: after a failing and a passing one, the library
    words its messages for Python again; nested blocks restore what they found."""
    assert run_cli("validate", FIXTURES / "named").exit_code == 1
    assert run_cli("validate", CAUSAL).exit_code == 0
    assert flag("--force", "force=True") == "force=True"
    with cli_wording():
        assert flag("--force", "force=True") == "--force"
        with cli_wording(False):
            assert flag("--force", "force=True") == "force=True"
        seen: list[str] = []
        worker = threading.Thread(target=lambda: seen.append(flag("--deep", "deep=True")))
        worker.start()
        worker.join()
        assert seen == ["--deep"]  # a plain global: worker threads (audit's pool) see it too
    assert errors._CLI_WORDING is False


# ---------------------------------------------------------------------------------------------
# structure: no string literal of the library names a flag, except through flag()
# ---------------------------------------------------------------------------------------------

ALLOWED: dict[tuple[str, str], str] = {
    ("mpt_tools/export.py", "serve_lines"): (
        "how to serve an export: other engines' command lines (vLLM, TensorRT-LLM) and export's own "
        "format; written into manifest.json, whose bytes must not depend on who called export"
    ),
    ("mpt_tools/hub/card.py", "model_card"): (
        "the model card's provenance (which mpt-tools command made the adapter): a file pushed to the "
        "Hub, the same whether the CLI or the library pushed it"
    ),
}
"""(file, enclosing function): why its string literals may name a command-line flag."""


def _text(node: ast.AST) -> str | None:
    """A string literal's text; an f-string's with each replacement field as ``{}``."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    return None


def _is_flag_call(node: ast.AST) -> bool:
    func = node.func if isinstance(node, ast.Call) else None
    return (isinstance(func, ast.Name) and func.id == "flag") or (
        isinstance(func, ast.Attribute) and func.attr == "flag"
    )


class _Finder(ast.NodeVisitor):
    """Every string literal naming a flag outside docstrings and flag()'s first argument, with
    the function it is in; and every flag() whose Python wording names one."""

    def __init__(self, rel: str) -> None:
        self.rel = rel
        self.where: list[str] = []
        self.found: list[str] = []

    def _scope(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> None:
        self.where.append(node.name)
        self.generic_visit(node)
        self.where.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _scope

    def visit_Expr(self, node: ast.Expr) -> None:
        if _text(node.value) is None:  # a docstring (of a module, class, function or attribute)
            self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        if _is_flag_call(node) and len(node.args) == 2:
            python = node.args[1]
            for sub in ast.walk(python):
                text = _text(sub)
                if text is not None and FLAG.search(text):
                    self.found.append(f"{self.rel}:{sub.lineno}: flag()'s Python wording names a flag: {text!r}")
                    break
            return  # its first argument is the command line's wording: a flag is its point
        self.generic_visit(node)

    def _literal(self, node: ast.Constant | ast.JoinedStr) -> None:
        text = _text(node)
        if text is None or not FLAG.search(text):
            self.generic_visit(node)
            return
        function = next((w for w in reversed(self.where) if (self.rel, w) in ALLOWED), None)
        if function is None:
            self.found.append(f"{self.rel}:{node.lineno}: {text!r}")

    def visit_Constant(self, node: ast.Constant) -> None:
        self._literal(node)

    def visit_JoinedStr(self, node: ast.JoinedStr) -> None:
        self._literal(node)


def test_library_strings_name_flags_only_through_flag() -> None:
    found: list[str] = []
    for path in sorted((ROOT / "mpt_tools").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("mpt_tools/cli/"):
            continue
        finder = _Finder(rel)
        finder.visit(ast.parse(path.read_text(), rel))
        found += finder.found
    assert not found, "\n".join(found)
    for rel, function in ALLOWED:  # no stale entry
        tree = ast.parse((ROOT / rel).read_text())
        assert any(isinstance(n, ast.FunctionDef) and n.name == function for n in ast.walk(tree)), (rel, function)


def test_the_structural_check_sees_what_it_should() -> None:
    """The finder itself: a plain literal, an f-string's ``--{name}`` and a flag() whose Python
    wording names a flag are found; docstrings and flag()'s command-line wording are not."""
    source = '''
"""Module docstring: --help."""
def f(name):
    """--force is fine here."""
    a = "pass --force"
    b = f"drop --{name}"
    c = flag("--deep", "deep=True")
    d = flag(f"--tasks {name}", f"--tasks={name}")
    e = "a -- b, org--name, ---"
'''
    finder = _Finder("x.py")
    finder.visit(ast.parse(source))
    lines = sorted(int(item.split(":")[1]) for item in finder.found)
    assert lines == [5, 6, 8], finder.found
