"""The README is the user's door: its set-up commands, CI and command reference stay true."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from conftest import ROOT

from mpt_tools.cli import cli

README = (ROOT / "README.md").read_text()


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def test_two_setup_commands_and_ci_runs_the_test_command() -> None:
    setup = README.split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = [b.strip() for b in re.findall(r"```bash\n(.*?)```", setup, flags=re.S)]
    assert len(commands) == 2
    main_job, tests = commands
    assert "pip install" in main_job and "mpt-tools init fixtures/" in main_job
    assert "pip install" in tests and "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci, "the README's test command must be what .ci/run runs"


def test_every_command_is_documented() -> None:
    for name in cli.commands:
        assert f"mpt-tools {name}" in README, f"README lacks a reference for `{name}`"


def test_main_job_fixture_exists() -> None:
    setup = README.split("## Set up", 1)[1]
    fixture = re.search(r"mpt-tools init (fixtures/\S+)", setup)
    assert fixture and (ROOT / fixture.group(1) / "adapter_config.json").is_file()


def test_generated_command_reference_is_up_to_date() -> None:
    """README's "Command reference (generated)" is what docs/make_cli_reference.py writes from the
    real --help texts and the result types (the same check .ci/run makes), whatever the terminal."""
    env = {**os.environ, "COLUMNS": "37"}  # a narrow terminal: the help width is fixed anyway
    proc = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "make_cli_reference.py"), "--check"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "docs/make_cli_reference.py --check" in (ROOT / ".ci" / "run").read_text()


def test_library_example_runs(tmp_path, monkeypatch) -> None:
    """The README's Library example, run as written where its names exist (``sources`` is the
    causal fixture, ``sources.safetensors`` its bare weights)."""
    import shutil

    block = README.split("## Library", 1)[1].split("\n## ", 1)[0]
    code = re.findall(r"```python\n(.*?)```", block, flags=re.S)[0]
    shutil.copytree(ROOT / "fixtures" / "causal", tmp_path / "sources")
    shutil.copy(ROOT / "fixtures" / "causal" / "adapter_model.safetensors", tmp_path / "sources.safetensors")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile(code, "README.md#library", "exec"), namespace)
    report = namespace["report"]
    assert isinstance(report, dict) and report["ok"] and report["target"]["mode"] == "average"
    assert (tmp_path / "target" / "adapter_config.json").is_file()
    assert json.loads((tmp_path / "target-4" / "adapter_config.json").read_text())["num_tasks"] == 4
