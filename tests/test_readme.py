"""The README is the user's door: its set-up commands, CI and command reference stay true."""

from __future__ import annotations

import re

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
