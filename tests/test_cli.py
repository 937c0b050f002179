"""The commands end to end, as a user runs them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES, ROOT, run_cli, write_random_source

from mpt_tools import __version__
from mpt_tools.cli import cli


def all_commands():
    return sorted(cli.commands)


@pytest.mark.parametrize("name", all_commands())
def test_every_command_has_help(name: str) -> None:
    result = run_cli(name, "--help")
    assert result.exit_code == 0
    assert cli.commands[name].help, f"{name} has no help text"
    assert "Usage:" in result.output


def test_version() -> None:
    result = run_cli("--version")
    assert result.exit_code == 0 and __version__ in result.output


def test_the_quick_exit_loses_no_output(tmp_path: Path) -> None:
    """``main`` ends the process with ``os._exit`` once the command has run (no teardown): a long
    output through a pipe still arrives whole, and each way out keeps its status."""
    src = FIXTURES / "causal"
    proc = subprocess.run([sys.executable, "-m", "mpt_tools", "inspect", str(src), "--json"], capture_output=True)
    assert proc.returncode == 0 and json.loads(proc.stdout)["schema"].startswith("mpt-tools/inspect")
    head = "import sys; from mpt_tools.cli import _hard_exit; "
    code = head + "print('x' * 100000, end=''); _hard_exit(int(sys.argv[1]))"
    for status in (0, 3, 255):
        done = subprocess.run([sys.executable, "-c", code, str(status)], capture_output=True, text=True)
        assert done.returncode == status and len(done.stdout) == 100000
    message = subprocess.run([sys.executable, "-c", head + "_hard_exit('stopped')"], capture_output=True, text=True)
    assert message.returncode == 1 and message.stderr.strip() == "stopped"


def test_console_script_and_module(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "mpt-tools"
    for argv in ([str(exe)], [sys.executable, "-m", "mpt_tools"]):
        if argv[0] == str(exe) and not exe.exists():
            continue
        proc = subprocess.run([*argv, "validate", str(FIXTURES / "causal")], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert "valid" in proc.stdout
        bad = subprocess.run([*argv, "inspect", str(tmp_path / "nope")], capture_output=True, text=True)
        assert bad.returncode == 1
        assert bad.stderr.strip().count("\n") == 0 and "no such file" in bad.stderr
        usage = subprocess.run([*argv, "init", str(FIXTURES / "causal")], capture_output=True, text=True)
        assert usage.returncode == 2


def test_init_summary_and_json(tmp_path: Path) -> None:
    result = run_cli("init", FIXTURES / "causal", "--mode", "AVERAGE_SOURCE_TASKS", "--out", tmp_path / "t")
    assert result.exit_code == 0, result.stderr
    assert "AVERAGE_SOURCE_TASKS" in result.output and "adapter_model.safetensors" in result.output
    result = run_cli("init", FIXTURES / "causal", "--mode", "exact", "--task", "2", "--out", tmp_path / "u", "--json")
    data = json.loads(result.stdout)
    assert data["schema"] == "mpt-tools/init/1" and data["task"] == 2
    assert data["shapes"]["prefix_task_cols"] == [1, 4, 2]
    meta = data["metadata"]
    assert meta["format"] == "pt" and meta["mpt_tools.mode"] == "EXACT_SOURCE_TASK" and meta["mpt_tools.task"] == "2"
    assert len(meta["mpt_tools.source_sha256"]) == 64


def test_config_written_peft_style(tmp_path: Path) -> None:
    run_cli("init", FIXTURES / "causal", "--mode", "average", "--out", tmp_path / "t")
    text = (tmp_path / "t" / "adapter_config.json").read_text()
    cfg = json.loads(text)
    assert text == json.dumps(cfg, indent=2, sort_keys=True)  # PEFT's style, no final newline
    src = json.loads((FIXTURES / "causal" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == src["base_model_name_or_path"]
    assert cfg["num_tasks"] == 1 and cfg["prompt_tuning_init"] == "RANDOM"


def test_no_overwrite_without_force(tmp_path: Path) -> None:
    out = tmp_path / "t"
    assert run_cli("init", FIXTURES / "causal", "--mode", "average", "--out", out).exit_code == 0
    before = (out / "adapter_model.safetensors").read_bytes()
    result = run_cli("init", FIXTURES / "causal", "--mode", "exact", "--out", out)
    assert result.exit_code == 1 and "--force" in result.stderr
    assert (out / "adapter_model.safetensors").read_bytes() == before
    assert run_cli("init", FIXTURES / "causal", "--mode", "exact", "--out", out, "--force").exit_code == 0
    assert (out / "adapter_model.safetensors").read_bytes() != before


def test_never_writes_into_source(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(FIXTURES / "causal", src)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    result = run_cli("init", src, "--mode", "average", "--out", src, "--force")
    assert result.exit_code == 1 and "never writes into a source" in result.stderr
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def test_never_writes_inside_a_source_folder(tmp_path: Path) -> None:
    """Nor anywhere below it: every command that writes refuses an output in a subfolder of the
    source's folder (one line, exit 1), and the source's folder is left as it was."""
    src = tmp_path / "src"
    shutil.copytree(FIXTURES / "causal", src)
    before = sorted(p.relative_to(src).as_posix() for p in src.rglob("*"))
    sub = src / "sub"
    commands = [
        ["init", src, "--mode", "average", "--out", sub / "target"],
        ["tasks", src, "--select", "0", "--out", sub / "tasks"],
        ["rerank", src, "--num-ranks", "1", "--out", sub / "reranked"],
        ["convert", src, "--out", sub / "converted.safetensors"],
        ["export-prompt", src, "--task", "0", "--out", sub / "qa"],
        ["export", src, "--to", "tgis", "--out", sub / "store"],
        ["pack", "--from", src, "--num-ranks", "2", "--out", sub / "packed"],
        ["compat", src, "--peft", "0.10.0", "--out", sub / "old"],
        ["inspect", src, "--similarity", "--plot", sub / "sim.png"],
    ]
    for argv in commands:
        result = run_cli(*argv)
        assert result.exit_code == 1, (argv[0], result.stderr)
        assert "never writes into a source" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.relative_to(src).as_posix() for p in src.rglob("*")) == before


FULL_DISK_COMMANDS = {
    "init": ["init", "{fx}/causal", "--mode", "average", "--out", "{out}"],
    "init --verify": ["init", "{fx}/causal", "--mode", "average", "--verify", "--out", "{out}"],
    "tasks": ["tasks", "{fx}/causal", "--select", "1", "--out", "{out}"],
    "rerank": ["rerank", "{fx}/causal", "--num-ranks", "1", "--out", "{out}"],
    "convert": ["convert", "{fx}/causal", "--out", "{out}"],
    "convert file": ["convert", "{fx}/causal", "--out", "{out}.safetensors"],
    "export-prompt": ["export-prompt", "{fx}/causal", "--task", "0", "--out", "{out}"],
    "export npy": ["export", "{fx}/causal", "--to", "npy", "--out", "{out}"],
    "export tgis": ["export", "{fx}/causal", "--to", "tgis", "--out", "{out}"],
    "compat": ["compat", "{fx}/causal", "--peft", "0.10.0", "--out", "{out}"],
    "pack": ["pack", "--from", "{fx}/causal", "--num-ranks", "2", "--out", "{out}"],
    "plot": ["inspect", "{fx}/causal", "--similarity", "--plot", "{out}.png"],
}


@pytest.mark.parametrize("name", sorted(FULL_DISK_COMMANDS))
def test_a_full_disk_is_one_line_for_every_writer(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every writing command on a full disk: one line naming the output, exit 1, nothing left (export
    said "internal error (OSError: [Errno 28] ...)")."""
    if name == "plot":
        pytest.importorskip("matplotlib")

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    out = tmp_path / "work" / "out"
    (tmp_path / "work").mkdir()
    argv = [a.replace("{fx}", str(FIXTURES)).replace("{out}", str(out)) for a in FULL_DISK_COMMANDS[name]]
    result = run_cli(*argv)
    assert result.exit_code == 1, result.stderr
    line = result.stderr.strip()
    assert "\n" not in line and "No space left on device" in line and "internal error" not in line, line
    assert line.startswith(f"error: {out}"), line
    assert list((tmp_path / "work").iterdir()) == []


@pytest.mark.parametrize("name", sorted(FULL_DISK_COMMANDS))
def test_an_output_through_a_file_or_a_symlink_loop_is_one_line(name: str, tmp_path: Path) -> None:
    """``--out plain/x`` where ``plain`` is a file, and an output that is (or passes through) a
    symlink loop: one line naming the output, before any work (they were internal errors)."""
    if name == "plot":
        pytest.importorskip("matplotlib")
    (tmp_path / "plain").write_text("a file")
    (tmp_path / "loop").symlink_to("loop")
    for out, needle in (
        (tmp_path / "plain" / "x", "cannot write: " + str(tmp_path / "plain") + " is a file, not a folder"),
        (tmp_path / "loop" / "x", "symbolic link that loops"),
    ):
        argv = [a.replace("{fx}", str(FIXTURES)).replace("{out}", str(out)) for a in FULL_DISK_COMMANDS[name]]
        result = run_cli(*argv)
        assert result.exit_code == 1, result.stderr
        line = result.stderr.strip()
        assert "\n" not in line and needle in line and line.startswith(f"error: {out}"), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loop", "plain"]


def test_a_long_output_name_is_written_and_a_too_long_one_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 240-byte output name (valid up to 255) is written: its staging name holds the first 187
    bytes and a hash, not the whole name and 35 more bytes (it was "File name too long"); a killed
    writer's staging of it is still found and removed. A 256-byte name is one line."""
    import time

    from mpt_tools.files import _stem

    long = "a" * 240
    for argv in (
        ["init", FIXTURES / "causal", "--mode", "average", "--out", tmp_path / long],
        ["convert", FIXTURES / "causal", "--out", tmp_path / (long + ".safetensors")],
        ["export", FIXTURES / "causal", "--to", "npy", "--out", tmp_path / "e" / long],
    ):
        result = run_cli(*argv)
        assert result.exit_code == 0, result.stderr
    stem = _stem(long + "b")
    assert len(stem.encode()) == 200 and stem != _stem(long + "c")  # two long names, two staging names
    leftover = tmp_path / f".{stem}.mpt-tools-999999999-0123456789ab.tmp"
    leftover.mkdir()
    past = time.time() - 3600
    os.utime(leftover, (past, past))
    result = run_cli("init", FIXTURES / "causal", "--mode", "average", "--out", tmp_path / (long + "b"))
    assert result.exit_code == 0 and not leftover.exists(), result.stderr
    too_long = run_cli("init", FIXTURES / "causal", "--mode", "average", "--out", tmp_path / ("x" * 256))
    assert too_long.exit_code == 1 and "has 256 bytes, more than the 255 a file name may have" in too_long.stderr
    assert len(too_long.stderr.strip().splitlines()) == 1
    monkeypatch.chdir(tmp_path)  # a bare name: Path.is_dir() raises ENAMETOOLONG (it was an internal error)
    for argv in (
        ["convert", FIXTURES / "causal", "--out", "x" * 250 + ".safetensors"],
        ["push", "x" * 256, "me/x", "--dry-run"],
        ["audit", "x" * 256],
    ):
        result = run_cli(*argv)
        assert result.exit_code == 1 and "internal error" not in result.stderr, (argv[0], result.stderr)


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mpt_tools.files as files

    def boom(fd: int) -> None:  # the disk fills up as the data is flushed
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", boom)
    out = tmp_path / "t"
    result = run_cli("init", FIXTURES / "causal", "--mode", "average", "--out", out)
    assert result.exit_code == 1 and "No space left" in result.stderr
    assert not out.exists()
    # an existing folder keeps its old files and gets no temp files
    out.mkdir()
    (out / "adapter_config.json").write_text("old")
    result = run_cli("init", FIXTURES / "causal", "--mode", "average", "--out", out, "--force")
    assert result.exit_code == 1
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json"]
    assert (out / "adapter_config.json").read_text() == "old"


def test_deterministic_outputs(tmp_path: Path) -> None:
    for mode in ("average", "exact", "shared"):
        files = []
        for i in range(2):
            out = tmp_path / f"{mode}{i}"
            assert run_cli("init", FIXTURES / "causal", "--mode", mode, "--seed", "3", "--out", out).exit_code == 0
            files.append([(out / n).read_bytes() for n in ("adapter_model.safetensors", "adapter_config.json")])
        assert files[0] == files[1], mode


def test_shared_seed_recorded_and_num_tasks(tmp_path: Path) -> None:
    result = run_cli(
        "init",
        FIXTURES / "causal",
        "--mode",
        "shared",
        "--num-tasks",
        "4",
        "--num-ranks",
        "3",
        "--out",
        tmp_path / "t",
        "--json",
    )
    data = json.loads(result.stdout)
    assert data["seed"] is not None and data["metadata"]["mpt_tools.seed"] == str(data["seed"])
    assert data["shapes"]["prefix_task_cols"] == [4, 4, 3] and data["shapes"]["prefix_task_rows"] == [4, 3, 16]


def test_negative_task_refused_unless_allowed(tmp_path: Path) -> None:
    result = run_cli("init", FIXTURES / "causal", "--mode", "exact", "--task", "-1", "--out", tmp_path / "t")
    assert result.exit_code == 1 and "task 2" in result.stderr and not (tmp_path / "t").exists()
    result = run_cli(
        "init", FIXTURES / "causal", "--mode", "exact", "--task=-1", "--allow-negative-task", "--out", tmp_path / "t"
    )
    assert result.exit_code == 0 and "resolves to task 2" in result.stderr
    result = run_cli("init", FIXTURES / "causal", "--mode", "exact", "--task", "3", "--out", tmp_path / "u")
    assert result.exit_code == 1 and "0..2" in result.stderr


def test_bin_source_and_subfolder(tmp_path: Path) -> None:
    assert run_cli("validate", FIXTURES / "causal_bin").exit_code == 0
    result = run_cli("validate", FIXTURES / "named")
    assert result.exit_code == 1 and "--subfolder" in result.stderr and "sources" in result.stderr
    assert run_cli("validate", FIXTURES / "named", "--subfolder", "sources").exit_code == 0


def test_safetensors_wins_over_bin(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(FIXTURES / "causal", src)
    shutil.copy(FIXTURES / "causal_bin" / "adapter_model.bin", src / "adapter_model.bin")
    data = json.loads(run_cli("inspect", src, "--json").stdout)
    assert data["format"] == "safetensors"


def test_module_style_keys_normalised(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file, save_file

    sd = load_file(str(FIXTURES / "causal" / "adapter_model.safetensors"))
    prefixed = {
        "base_model.model.prompt_encoder.default.embedding.weight": sd["prompt_embeddings"],
        "prompt_encoder.default.prefix_task_cols": sd["prefix_task_cols"],
        "prompt_encoder.default.prefix_task_rows": sd["prefix_task_rows"],
    }
    path = tmp_path / "module_keys.safetensors"
    save_file(prefixed, str(path))
    result = run_cli("init", path, "--mode", "average", "--out", tmp_path / "t", "--task-type", "CAUSAL_LM")
    assert result.exit_code == 0, result.stderr
    assert "renamed" in result.stderr
    out = load_file(str(tmp_path / "t" / "adapter_model.safetensors"))
    assert torch.equal(out["prompt_embeddings"], sd["prompt_embeddings"])


def test_bare_file_says_what_it_assumed(tmp_path: Path) -> None:
    bare = tmp_path / "bare.safetensors"
    shutil.copy(FIXTURES / "seq2seq" / "adapter_model.safetensors", bare)
    result = run_cli("inspect", bare)
    assert result.exit_code == 0
    assert "assumed" in result.output and "cannot be split" in result.output
    data = json.loads(run_cli("inspect", bare, "--json", "--task-type", "SEQ_2_SEQ_LM").stdout)
    assert data["derived"] == {"num_transformer_submodules": 2, "total_virtual_tokens": 6}
    assert data["config"]["num_virtual_tokens"] == 3


def test_config_flags_override(tmp_path: Path) -> None:
    result = run_cli("validate", FIXTURES / "causal", "--num-virtual-tokens", "5", "--json")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    fields = {f["field"] for f in data["findings"] if f["level"] == "error"}
    assert "num_virtual_tokens x num_transformer_submodules" in fields


def test_validate_against_reports_everything(tmp_path: Path) -> None:
    target = tmp_path / "target_config.json"
    cfg = json.loads((FIXTURES / "causal" / "adapter_config.json").read_text())
    cfg.update(num_virtual_tokens=5, token_dim=32, num_ranks=3, num_tasks=2)
    target.write_text(json.dumps(cfg))
    result = run_cli("validate", FIXTURES / "causal", "--against", target, "--mode", "exact", "--task", "-1", "--json")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    errs = {f["field"] for f in data["findings"] if f["level"] == "error"}
    assert {"num_virtual_tokens x num_transformer_submodules", "token_dim", "num_ranks", "num_tasks", "task"} <= errs
    for f in data["findings"]:
        assert f["fix"], f
    shared = run_cli("validate", FIXTURES / "causal", "--against", target, "--mode", "shared", "--json")
    errs = {f["field"] for f in json.loads(shared.stdout)["findings"] if f["level"] == "error"}
    assert "num_ranks" not in errs and "token_dim" in errs


def test_target_config_problems_are_labelled_as_the_targets(tmp_path: Path) -> None:
    """A partial or broken target config: its own problems say `target <field>` and name the file,
    so they cannot be read as the source's; the source's own findings stay clean."""
    target = tmp_path / "plan.json"
    target.write_text(json.dumps({"num_virtual_tokens": 4, "task_type": "NOPE"}))
    result = run_cli("validate", FIXTURES / "causal", "--against", target, "--json")
    assert result.exit_code == 1
    findings = json.loads(result.stdout)["findings"]
    own = [f for f in findings if f["field"].startswith("target ")]
    assert {f["field"] for f in own} >= {"target peft_type", "target task_type", "target token_dim"}
    assert all("plan.json" in f["message"] and "plan.json" in f["fix"] for f in own), own
    assert not any(f["field"] in ("peft_type", "task_type", "token_dim") for f in findings)
    text = run_cli("validate", FIXTURES / "causal", "--against", target)
    assert text.stdout.startswith(f"{FIXTURES / 'causal'} with a planned average target ({target}): INVALID")


def test_reload_trap_flagged(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(FIXTURES / "causal", src)
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg.update(prompt_tuning_init="AVERAGE_SOURCE_TASKS", prompt_tuning_init_state_dict_path="/home/x/src.safetensors")
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    data = json.loads(run_cli("validate", src, "--json").stdout)
    assert any(f["code"] == "reload-trap" for f in data["findings"])


def test_inspect_json_schema() -> None:
    result = run_cli("inspect", FIXTURES / "named", "--subfolder", "sources", "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["schema"] == "mpt-tools/inspect/1"
    assert {
        "source",
        "format",
        "files",
        "metadata",
        "tensors",
        "config",
        "parameters",
        "findings",
        "tasks",
        "valid",
        "derived",
        "assumed",
        "notes",
        "hub",
        "config_source",
    } <= set(data)
    assert len(data["tasks"]) == 4
    assert all(t["prompt_norm"] > 0 for t in data["tasks"])
    assert data["parameters"]["total"] == 5 * 16 + 4 * (5 * 3 + 3 * 16)


def test_debug_env_shows_traceback(tmp_path: Path) -> None:
    env = dict(os.environ, MPT_TOOLS_DEBUG="1")
    env.pop("MPT_TOOLS_RAISE_UNEXPECTED", None)
    proc = subprocess.run(
        [sys.executable, "-m", "mpt_tools", "inspect", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 1 and "Traceback" in proc.stderr


def test_outputs_may_go_beside_a_bare_file_but_never_over_a_source(tmp_path: Path) -> None:
    """A bare tensor file does not claim its folder; an adapter folder (or an adapter file name) does."""
    bare = tmp_path / "sources.safetensors"
    shutil.copy(FIXTURES / "causal" / "adapter_model.safetensors", bare)
    before = bare.read_bytes()
    assert run_cli("convert", bare, "--out", tmp_path / "bf16.safetensors", "--dtype", "bfloat16").exit_code == 0
    ok = run_cli("init", bare, "--mode", "exact", "--task-type", "CAUSAL_LM", "--out", tmp_path)
    assert ok.exit_code == 0, ok.stderr
    assert (tmp_path / "adapter_model.safetensors").exists()
    over = run_cli("convert", bare, "--out", bare, "--force")
    assert over.exit_code == 1 and "source file itself" in over.stderr
    assert bare.read_bytes() == before
    # now tmp_path holds an adapter: it is a source folder, and its files are off limits
    again = run_cli("init", tmp_path, "--mode", "exact", "--out", tmp_path, "--force")
    assert again.exit_code == 1 and "source's own folder" in again.stderr


def test_closed_pipe_is_quiet(tmp_path: Path) -> None:
    """`mpt-tools inspect big --similarity | head -1`: no internal error when the reader leaves."""
    src = write_random_source(tmp_path / "many.safetensors", n=300, t=4, r=1, d=8)
    argv = [sys.executable, "-m", "mpt_tools", "inspect", str(src), "--task-type", "CAUSAL_LM", "--similarity"]
    env = {k: v for k, v in os.environ.items() if k != "MPT_TOOLS_RAISE_UNEXPECTED"}  # as a user runs it
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith(b"source: ")
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert "internal error" not in err and "Traceback" not in err and "BrokenPipe" not in err, err


def test_control_characters_from_files_are_shown_escaped(tmp_path: Path) -> None:
    """A newline or a terminal escape sequence in a tensor name, metadata or a config value cannot
    split an output line or reach the terminal: it is printed escaped."""
    import numpy as np

    from mpt_tools.formats import from_numpy, safetensors_bytes

    evil = "evil\n\x1b]0;pwned\x07\x1b[2Jkey"
    src = tmp_path / "src"
    src.mkdir()
    tensors = {
        "prompt_embeddings": np.zeros((4, 16), np.float32),
        "prefix_task_cols": np.zeros((3, 4, 2), np.float32),
        "prefix_task_rows": np.zeros((3, 2, 16), np.float32),
        evil: np.zeros(1, np.float32),
    }
    blob = safetensors_bytes({k: from_numpy(v) for k, v in tensors.items()}, {"format": "pt", evil: evil})
    (src / "adapter_model.safetensors").write_bytes(blob)
    config = json.loads((FIXTURES / "causal" / "adapter_config.json").read_text())
    config.update(num_tasks=3, num_ranks=2, num_virtual_tokens=4, token_dim=16, task_type="CAUSAL_LM\n\x1b[31m")
    (src / "adapter_config.json").write_text(json.dumps(config))
    shown = "evil\\n\\x1b]0;pwned\\x07\\x1b[2Jkey"
    for args in (["inspect", src], ["validate", src], ["diff", src, FIXTURES / "causal"]):
        result = run_cli(*args)
        assert result.exit_code == 1, (args, result.stdout, result.stderr)
        text = result.stdout + result.stderr
        assert shown in text, (args, text)
        assert not any(c in text for c in "\x1b\x07\r"), (args, text)
        assert all("evil" not in line or "key" in line for line in text.splitlines()), text
        assert len(result.stderr.splitlines()) == 1, result.stderr


def test_json_on_an_internal_error_prints_the_error_object(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An internal error (a bug) under --json: the error object on stdout too (it printed nothing),
    typed by the exception, its message the line on stderr."""
    import mpt_tools.init

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.delenv("MPT_TOOLS_RAISE_UNEXPECTED")
    monkeypatch.setattr(mpt_tools.init, "init_adapter", boom)
    result = run_cli("init", str(FIXTURES / "causal"), "--mode", "average", "--out", str(tmp_path / "out"), "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["error"]["type"] == "RuntimeError" and report["command"] == "init"
    assert report["error"]["message"].startswith("internal error (RuntimeError: boom)")
    assert result.stderr == f"error: {report['error']['message']}\n"


def test_written_lists_only_outputs_that_exist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a failure reports as already written: outputs put in place and still there; not a
    staging folder (init --verify commits into one first), not the sha256 cache."""
    from mpt_tools import files

    files.WRITTEN.clear()
    src = write_random_source(tmp_path / "src.safetensors", n=64, t=50, r=4, d=1024)  # cached: 1 MiB or more
    files.file_sha256(src)
    assert files._hash_cache_path().exists()
    from mpt_tools.files import staging_name

    staging = tmp_path / staging_name("out")
    files.write_files(staging, {"a": b"x"}, force=False)  # a commit into a staging folder
    kept, gone = tmp_path / "kept", tmp_path / "gone"
    for p in (kept, gone):
        files.atomic_write(p, b"x")
    gone.unlink()
    assert [str(kept), str(gone)] == files.WRITTEN
    assert files.written() == [str(kept)]
    files.WRITTEN.clear()


def test_a_failed_file_write_removes_the_parents_it_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """atomic_write(parents=True) (convert into a file, --plot): the folders it made for the file
    are removed again when the write fails, those that existed are kept."""
    from mpt_tools import files
    from mpt_tools.errors import WriteError

    def full(tmp: object, data: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files, "write_synced", full)
    (tmp_path / "pa").mkdir()
    with pytest.raises(WriteError, match="No space left"):
        files.atomic_write(tmp_path / "pa" / "pb" / "pc" / "x.safetensors", b"x", parents=True)
    assert [p.name for p in tmp_path.rglob("*")] == ["pa"]
    monkeypatch.undo()
    files.atomic_write(tmp_path / "pa" / "pb" / "x", b"x", parents=True)
    assert (tmp_path / "pa" / "pb" / "x").read_bytes() == b"x"


def test_an_output_removed_before_it_is_reported_is_said_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The report stats each written file as it prints it: one removed meanwhile (another process,
    the user) is "no longer there", not an internal error."""
    from mpt_tools.cli import render

    kept, gone = tmp_path / "kept.safetensors", tmp_path / "gone.safetensors"
    kept.write_bytes(b"12345")
    render.written({"out": str(tmp_path), "files": [str(kept), str(gone)]}, "test")
    out = capsys.readouterr().out
    assert f"  {kept}  (5 bytes)" in out and f"  {gone}  (no longer there)" in out
