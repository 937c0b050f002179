"""Progress bars (issue 14, item 4): on stderr only when it is a terminal, never under ``--json``
or ``--quiet``, and never a byte of difference in piped output.

The commands run for real, in one child process each way (several commands in one process, as a
script would): once with stderr a pseudo-terminal (``pty.openpty``) and once with stderr a pipe.
The source has 64 tasks, so each loop's bar shows ``0/64`` and its rate (``task/s``).
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, run_cli, write_random_source

from mpt_tools.cli import cli

# Each command runs with the same arguments in both children; {src} and {other} are absolute.
COMMANDS: dict[str, list[str]] = {
    "validate": ["validate", "{src}"],
    "inspect --similarity": ["inspect", "{src}", "--similarity"],
    "diff": ["diff", "{src}", "{other}"],
    "rerank": ["rerank", "{src}", "--num-ranks", "1", "--out", "reranked"],
    "convert": ["convert", "{src}", "--out", "converted.safetensors"],
    "inspect --quiet": ["inspect", "{src}", "--similarity", "--quiet"],
    "rerank -q": ["rerank", "{src}", "--num-ranks", "1", "--out", "quiet", "-q"],
    "diff --json": ["diff", "{src}", "{other}", "--json"],
    "verify": ["verify", "{src}", "--device", "cpu"],  # last: the only one that imports torch
}
# The bars each command shows on a terminal: label, total and unit (the work is 64 tasks of 8 tokens).
TASKS, ROWS = ("64", "task"), ("64", "row")
BARS: dict[str, list[tuple[str, tuple[str, str]]]] = {
    "validate": [("scan prompt_embeddings", ("8", "row")), ("scan prefix_task_cols", TASKS)],
    "inspect --similarity": [("scan prefix_task_rows", TASKS), ("norms", TASKS), ("similarity", TASKS)],
    "diff": [("diff prompt_embeddings", ("8", "row")), ("diff prefix_task_rows", ROWS), ("diff prompts", TASKS)],
    "rerank": [("scan prefix_task_rows", TASKS), ("rerank", TASKS)],
    "convert": [("scan prefix_task_rows", TASKS), ("read back prefix_task_rows", ROWS)],
    "verify": [("verify", TASKS)],
}
SILENT = ["inspect --quiet", "rerank -q", "diff --json"]
PIPED = [name for name in COMMANDS if name != "verify"]  # verify prints its timings: not comparable

DRIVER = r"""
import json, sys
from mpt_tools.cli import cli
for name, args in json.loads(sys.argv[1]):
    for stream in (sys.stdout, sys.stderr):
        stream.write(f"\n=== {name}\n")
        stream.flush()
    try:
        cli.main(args, prog_name="mpt-tools")
    except SystemExit:
        pass
"""


def _split(text: str) -> dict[str, str]:
    """The output of each command of a driver run, by name."""
    parts = re.split(r"\n=== (.+)\n", text.replace("\r\n", "\n"))
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def _without_bars(tty_text: str) -> str:
    """A terminal's stderr (newlines as ``\\n``) with the bars taken out: a bar is drawn as ``\\r<line>`` and always
    followed by another ``\\r`` (its next drawing, or the blank that clears it, then ``\\r``)."""
    text = re.sub(r"\r[^\r\n]*(?=\r)", "", tty_text)
    return text.replace("\r", "")


def _drive(names: list[str], workdir: Path, sources: dict[str, Path], *, tty: bool) -> tuple[str, str]:
    """Run the named commands in one child process in ``workdir``; its (stdout, stderr). With
    ``tty`` stderr is a pseudo-terminal 100 columns wide, else a pipe; stdout is a file."""
    workdir.mkdir()
    commands = [[name, [a.format(**sources) for a in COMMANDS[name]]] for name in names]
    env = {**os.environ, "XDG_CACHE_HOME": str(workdir / "cache"), "HF_HOME": str(workdir / "hf")}
    env.pop("MPT_TOOLS_DEBUG", None)
    argv = [sys.executable, "-c", DRIVER, json.dumps(commands)]
    with open(workdir / "stdout", "wb") as out:
        if not tty:
            proc = subprocess.run(argv, stdout=out, stderr=subprocess.PIPE, cwd=workdir, env=env, timeout=300)
            err = proc.stderr
        else:
            master, slave = pty.openpty()
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
            child = subprocess.Popen(argv, stdout=out, stderr=slave, cwd=workdir, env=env)
            os.close(slave)
            chunks = []
            while True:
                try:
                    chunk = os.read(master, 1 << 16)
                except OSError:  # EIO: the child has exited and closed the terminal
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            os.close(master)
            child.wait(timeout=300)
            err = b"".join(chunks)
    return (workdir / "stdout").read_text(), err.decode()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The commands run with stderr a terminal and again with stderr a pipe."""
    root = tmp_path_factory.mktemp("progress")
    sources = {
        "src": str(write_random_source(root / "src.safetensors", 64, 8, 2, 256)),
        "other": str(write_random_source(root / "other.safetensors", 64, 8, 2, 256, seed=1)),
    }
    tty_out, tty_err = _drive(list(COMMANDS), root / "tty", sources, tty=True)
    pipe_out, pipe_err = _drive(PIPED, root / "pipe", sources, tty=False)
    return {
        "tty_out": _split(tty_out),
        "tty_err": _split(tty_err),
        "pipe_out": _split(pipe_out),
        "pipe_err": _split(pipe_err),
    }


@pytest.mark.parametrize("name", sorted(BARS))
def test_a_terminal_shows_each_bar(runs: dict[str, Any], name: str) -> None:
    err = runs["tty_err"][name]
    for label, (total, unit) in BARS[name]:
        # tqdm's bar: "label:   0%|     | 0/64 [00:00<?, ?task/s]": count and total, time left, rate
        pattern = rf"\r{re.escape(label)}: +\d+%\|[^|]*\| *\d+/{total} \[[\d:]+<[\d:?]+, *[\d.?]+{unit}/s\]"
        assert re.search(pattern, err), f"{name}: no {label!r} bar in {err!r}"
    assert re.search(r"\r {20,}\r", err), "the bar is cleared at the end"


@pytest.mark.parametrize("name", SILENT)
def test_quiet_and_json_show_no_bar(runs: dict[str, Any], name: str) -> None:
    err = runs["tty_err"][name]
    assert "%|" not in err and "task/s" not in err and "\r" not in err, repr(err)


@pytest.mark.parametrize("name", PIPED)
def test_piped_output_is_unchanged(runs: dict[str, Any], name: str) -> None:
    """A pipe gets no bar, and the bars never change what a command prints: stdout is byte for
    byte the same with stderr a terminal, and so is stderr once the bars are taken out."""
    piped_err = runs["pipe_err"][name]
    assert "%|" not in piped_err and "\r" not in piped_err
    assert runs["tty_out"][name] == runs["pipe_out"][name]
    assert _without_bars(runs["tty_err"][name]) == piped_err


def test_the_commands_ran(runs: dict[str, Any]) -> None:
    """The runs compared above did their work (a command that failed at once would show no bar)."""
    out = runs["tty_out"]
    assert "similarity" in out["inspect --similarity"].lower()
    assert "differ" in runs["pipe_err"]["diff"] and json.loads(out["diff --json"])["identical"] is False
    assert "svd" in out["rerank"] or "error" in out["rerank"].lower()
    assert "64" in out["verify"]


def test_every_command_has_quiet() -> None:
    for name in cli.commands:
        result = run_cli(name, "--help")
        assert "-q, --quiet" in result.output and "No progress bar" in result.output, name


def test_the_cli_turns_bars_off_after_a_command(tmp_path: Path) -> None:
    from mpt_tools import progress

    src = write_random_source(tmp_path / "src.safetensors", 4, 2, 1, 8)
    progress.enable(True)
    result = run_cli("validate", src)  # stderr is not a terminal here
    assert result.exit_code == 0, result.stderr
    assert not progress.enabled()
    assert "%|" not in result.stderr


PROBE = r"""
import sys
from mpt_tools import progress
items = range(10)
assert progress.tracked(items, 10, "x") is items
assert progress.chunk_starts(10, 3, "x") == range(0, 10, 3)
with progress.progress(10, "x") as advance:
    advance(5)
from mpt_tools.cli import cli
try:
    cli.main(sys.argv[1:], prog_name="mpt-tools")
except SystemExit as exc:
    assert not exc.code, exc.code
print("tqdm" in sys.modules)
"""


def test_no_bar_no_tqdm(tmp_path: Path) -> None:
    """Bars off (a library caller, a piped command): progress() does nothing and tqdm is never
    imported."""
    src = write_random_source(tmp_path / "src.safetensors", 64, 8, 2, 256)
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, "inspect", str(src), "--similarity"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False"


def test_a_bar_when_enabled(capsys: pytest.CaptureFixture[str]) -> None:
    """The library's bar: label, count, rate, cleared at the end; nothing for fewer than 2 items,
    nor in a worker thread (audit's workers run loops under audit's own bar)."""
    import threading

    from mpt_tools import progress

    progress.enable(True)
    try:
        assert list(progress.chunk_starts(10, 4, "demo")) == [0, 4, 8]
        with progress.progress(1, "one") as advance:
            advance()
        worker = threading.Thread(target=lambda: list(progress.chunk_starts(10, 4, "worker")))
        worker.start()
        worker.join()
    finally:
        progress.enable(False)
    err = capsys.readouterr().err
    assert "demo:" in err and "/10" in err and "task/s" in err
    assert "one:" not in err and "worker" not in err
    assert err.endswith("\r")
