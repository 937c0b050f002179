"""Reliability: huge claims refused from the header, save-load-save byte-identical, crash-safe
writes under SIGKILL, pickle fuzzing."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES, ROOT, run_cli, write_random_source
from hypothesis import given, settings
from hypothesis import strategies as st

from mpt_tools.errors import MptToolsError
from mpt_tools.formats import Raw, from_numpy, open_safetensors, safetensors_bytes


def test_huge_claim_refused_from_header_alone(tmp_path: Path) -> None:
    """A sparse file whose header honestly describes a 100 GB tensor: refused with the size, and
    nothing is allocated (the check happens before any read)."""
    size = 100 * 2**30
    header = {"prompt_embeddings": {"dtype": "F32", "shape": [size // 4 // 1024, 1024], "data_offsets": [0, size]}}
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)) + blob)
        fh.truncate(8 + len(blob) + size)  # sparse: no disk used
    for cmd in ("inspect", "validate"):
        result = run_cli(cmd, path)
        assert result.exit_code == 1
        assert "107,374,182,400 bytes" in result.stderr and "memory" in result.stderr


def test_shared_target_size_capped(tmp_path: Path) -> None:
    result = run_cli(
        "init", FIXTURES / "causal", "--mode", "shared", "--num-tasks", "1000000000", "--out", tmp_path / "t"
    )
    assert result.exit_code == 1 and "out of range (expected 1..1000000, found 1000000000)" in result.stderr
    assert not (tmp_path / "t").exists()


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 5),
    t=st.integers(1, 6),
    r=st.integers(1, 3),
    d=st.integers(1, 8),
    meta=st.dictionaries(st.text(min_size=1, max_size=6), st.text(max_size=6), max_size=4),
    seed=st.integers(0, 1000),
)
def test_save_load_save_is_byte_identical(tmp_path_factory, n, t, r, d, meta, seed) -> None:
    rng = np.random.default_rng(seed)
    tensors = {
        "prompt_embeddings": from_numpy(rng.standard_normal((t, d), dtype=np.float32)),
        "prefix_task_cols": from_numpy(rng.standard_normal((n, t, r), dtype=np.float32)),
        "prefix_task_rows": from_numpy(rng.standard_normal((n, r, d)).astype(np.float16)),
    }
    first = safetensors_bytes(tensors, meta)
    path = tmp_path_factory.mktemp("sls") / "a.safetensors"
    path.write_bytes(first)
    tf = open_safetensors(path)
    again: dict[str, Raw] = {k: tf.read(k) for k in tf.infos}
    assert safetensors_bytes(again, tf.metadata) == first


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=400))
def test_pickle_reader_fuzz_only_raises_our_error(tmp_path_factory, data: bytes) -> None:
    from mpt_tools.formats import open_pickle

    path = tmp_path_factory.mktemp("pk") / "f.bin"
    path.write_bytes(data)
    with contextlib.suppress(MptToolsError):
        open_pickle(path)


def _big_source(tmp: Path) -> Path:
    return write_random_source(tmp / "src.safetensors", n=4, t=50, r=4, d=512)


def _big_adapter(tmp: Path) -> Path:
    """A ~40 MB adapter folder (5000 tasks) for convert to chew on."""
    src = _big_source(tmp)
    folder = tmp / "big-adapter"
    subprocess.run(
        [sys.executable, "-m", "mpt_tools", "init", str(src), "--mode", "shared", "--seed", "1",
         "--num-tasks", "5000", "--task-type", "CAUSAL_LM", "--out", str(folder)],
        check=True, cwd=ROOT, capture_output=True,
    )  # fmt: skip
    return folder


def _commands(tmp: Path) -> dict[str, tuple[list[str], list[str]]]:
    """name: (argv writing the new output, argv writing a different old output), without --out."""
    src = _big_source(tmp)
    base = [sys.executable, "-m", "mpt_tools"]
    init = [*base, "init", str(src), "--mode", "shared", "--task-type", "CAUSAL_LM"]
    adapter = _big_adapter(tmp)
    convert = [*base, "convert", str(adapter)]
    return {
        "init": ([*init, "--seed", "5", "--num-tasks", "5000"], [*init, "--seed", "6", "--num-tasks", "4999"]),
        "convert": ([*convert, "--dtype", "bfloat16"], [*convert, "--dtype", "float16"]),
    }


def _kill_at_spread_moments(argv: list[str], full: float, i: int, steps: int) -> None:
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(full * (0.3 + 0.8 * i / (steps - 1)))
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("command", ["init", "convert"])
def test_sigkill_never_leaves_a_partial_file(tmp_path: Path, command: str) -> None:
    """Kill `init` / `convert` (SIGKILL, in a subprocess) at spread-out moments while it writes a
    ~40 MB adapter, over an existing one and into a new folder: an existing destination file is
    always the old one or the complete new one; a new folder is absent or complete."""
    new_argv, old_argv = _commands(tmp_path)[command]
    names = ("adapter_model.safetensors", "adapter_config.json")
    new_dir, out = tmp_path / "new", tmp_path / "out"
    start = time.perf_counter()
    subprocess.run([*new_argv, "--out", str(new_dir)], check=True, cwd=ROOT, capture_output=True)
    full = time.perf_counter() - start
    subprocess.run([*old_argv, "--out", str(out)], check=True, cwd=ROOT, capture_output=True)
    old = {n: (out / n).read_bytes() for n in names}
    new = {n: (new_dir / n).read_bytes() for n in names}
    assert old["adapter_model.safetensors"] != new["adapter_model.safetensors"]
    steps = 10
    outcomes = set()
    for i in range(steps):
        for n in names:
            (out / n).write_bytes(old[n])
        _kill_at_spread_moments([*new_argv, "--out", str(out), "--force"], full, i, steps)
        for n in names:
            got = (out / n).read_bytes()
            assert got in (old[n], new[n]), f"partial {n} after a kill at step {i}"
            outcomes.add((n, got == new[n]))
        for p in out.iterdir():  # temp files may remain after SIGKILL, but never under the real names
            assert p.name in names or p.name.endswith(".tmp"), p
        for p in out.glob("*.tmp"):  # a killed run's staging folder
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
        fresh = tmp_path / f"fresh{i}"
        _kill_at_spread_moments([*new_argv, "--out", str(fresh)], full, i, steps)
        if fresh.exists():
            assert {p.name: p.read_bytes() for p in fresh.iterdir()} == new, f"partial new folder at step {i}"
            outcomes.add(("fresh", True))
        else:
            outcomes.add(("fresh", False))
        for p in tmp_path.glob(".fresh*.tmp"):  # a killed run's temp folder, under a hidden temp name
            assert p.is_dir()
    assert outcomes  # every kill was checked


def test_written_files_get_normal_permissions(tmp_path: Path) -> None:
    """Temp-then-rename must not leave mkstemp's 0600 on the outputs: they are shared like
    save_pretrained's files (0666 less the umask)."""
    old = os.umask(0o022)
    try:
        for argv in (
            ["init", FIXTURES / "causal", "--mode", "exact", "--out", tmp_path / "new"],
            ["init", FIXTURES / "causal", "--mode", "average", "--out", tmp_path / "new", "--force"],
            ["convert", FIXTURES / "causal_bin", "--out", tmp_path / "conv.safetensors"],
        ):
            assert run_cli(*argv).exit_code == 0
    finally:
        os.umask(old)
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o755
    for p in [*(tmp_path / "new").iterdir(), tmp_path / "conv.safetensors"]:
        assert p.stat().st_mode & 0o777 == 0o644, p
    assert not list(tmp_path.glob(".*"))


@pytest.mark.parametrize("to", ["peft", "tgis", "vllm", "trtllm", "npy"])
def test_every_export_file_gets_0666_less_the_umask(tmp_path: Path, to: str) -> None:
    """A tester's finding: ``prompt_table.npy`` (trtllm) was created 0644 less the umask."""
    old = os.umask(0)
    try:
        assert run_cli("export", FIXTURES / "causal", "--to", to, "--out", tmp_path / "o").exit_code == 0
    finally:
        os.umask(old)
    for p in (tmp_path / "o").rglob("*"):
        assert p.stat().st_mode & 0o777 == (0o777 if p.is_dir() else 0o666), p


def test_the_mode_of_new_files_is_read_without_touching_the_umask(monkeypatch: pytest.MonkeyPatch) -> None:
    """The umask is process-wide: setting it to read it (the portable way) changed it for a moment
    for every other thread of a library user. On Linux it is read from /proc, never set."""
    from mpt_tools import files

    old = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", lambda mask: pytest.fail("the umask was set"))
        assert files.file_mode() == 0o640
    finally:
        monkeypatch.undo()
        os.umask(old)


def test_normal_failure_leaves_no_temp_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mpt_tools.formats as formats

    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        real_fsync(fd)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(formats.os, "fsync", failing_fsync)
    out = tmp_path / "t"
    out.mkdir()
    result = run_cli("init", FIXTURES / "causal", "--mode", "exact", "--out", out)
    assert result.exit_code == 1 and "Input/output error" in result.stderr
    assert list(out.iterdir()) == []
