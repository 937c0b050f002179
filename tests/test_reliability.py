"""Reliability: huge claims refused from the header, save-load-save byte-identical, crash-safe
writes under SIGKILL, pickle fuzzing."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES, ROOT, run_cli
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
    assert result.exit_code == 1 and "refusing" in result.stderr
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
    rng = np.random.default_rng(0)
    t, d, r, n = 50, 512, 4, 4
    tensors = {
        "prompt_embeddings": rng.standard_normal((t, d), dtype=np.float32),
        "prefix_task_cols": rng.standard_normal((n, t, r), dtype=np.float32),
        "prefix_task_rows": rng.standard_normal((n, r, d), dtype=np.float32),
    }
    path = tmp / "src.safetensors"
    path.write_bytes(safetensors_bytes({k: from_numpy(v) for k, v in tensors.items()}, {"format": "pt"}))
    return path


@pytest.mark.slow
def test_sigkill_never_leaves_a_partial_file(tmp_path: Path) -> None:
    """Kill `init` at spread-out moments while it writes a ~40 MB target over an existing one:
    each destination file is always the old one or the complete new one."""
    src = _big_source(tmp_path)
    argv = [
        sys.executable,
        "-m",
        "mpt_tools",
        "init",
        str(src),
        "--mode",
        "shared",
        "--seed",
        "5",
        "--num-tasks",
        "5000",
        "--task-type",
        "CAUSAL_LM",
    ]
    new_dir, out = tmp_path / "new", tmp_path / "out"
    subprocess.run([*argv, "--out", str(new_dir)], check=True, cwd=ROOT, capture_output=True)
    old_args = [*argv[:-6], "--seed", "6", "--num-tasks", "4999", "--task-type", "CAUSAL_LM"]
    subprocess.run([*old_args, "--out", str(out)], check=True, cwd=ROOT, capture_output=True)
    names = ("adapter_model.safetensors", "adapter_config.json")
    old = {n: (out / n).read_bytes() for n in names}
    new = {n: (new_dir / n).read_bytes() for n in names}
    assert old != new
    start = time.perf_counter()
    subprocess.run([*argv, "--out", str(tmp_path / "timing")], check=True, cwd=ROOT, capture_output=True)
    full = time.perf_counter() - start
    outcomes = set()
    for i in range(12):
        for n in names:
            (out / n).write_bytes(old[n])
        proc = subprocess.Popen(
            [*argv, "--out", str(out), "--force"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(full * (0.3 + 0.7 * i / 11))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for n in names:
            got = (out / n).read_bytes()
            assert got in (old[n], new[n]), f"partial {n} after a kill at step {i}"
            outcomes.add((n, got == new[n]))
        for p in out.iterdir():  # temp files may remain after SIGKILL, but never under the real names
            assert p.name in names or p.name.endswith(".tmp")
        for p in out.glob("*.tmp"):
            p.unlink()
    assert ("adapter_model.safetensors", False) in outcomes or ("adapter_model.safetensors", True) in outcomes


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
