"""The hostile-input corpus (tests/corpus.py) builds, is complete, and is really hostile."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch  # noqa: F401  (imported up front so the build timing excludes torch's import)
from safetensors import safe_open
from safetensors.numpy import load as st_load_bytes

sys.path.insert(0, str(Path(__file__).parent))
import corpus

MIN_CASES = 45

# Cases that the safetensors library (0.8, Rust parser) itself accepts although they are hostile:
# duplicate JSON keys are resolved last-wins, so a first-wins reader would see another tensor.
SAFETENSORS_ACCEPTS = {"st-duplicate-keys"}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, list[corpus.Case]]:
    root = tmp_path_factory.mktemp("corpus")
    return root, corpus.build_corpus(root)


def _weights_file(case: corpus.Case) -> Path:
    return case.path / corpus.BIN_NAME if case.path.is_dir() else case.path


def _run_python(code: str, *args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_enough_unique_well_formed_cases(built):
    root, cases = built
    assert len(cases) >= MIN_CASES
    names = [c.name for c in cases]
    assert len(set(names)) == len(names)
    for c in cases:
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", c.name), c.name
        assert c.why and "\n" not in c.why, c.name
        assert c.expect and c.expect == c.expect.lower(), c.name
        # every case lives in its own fresh subdirectory of root
        assert c.path.relative_to(root).parts[0] == c.name
        if c.name == "fs-missing":
            assert not os.path.lexists(c.path) and c.path.parent.is_dir()
        else:
            assert os.path.lexists(c.path), c.name
        if c.sentinel is not None:
            assert c.sentinel.parent.is_dir() and not os.path.lexists(c.sentinel)


def test_required_case_families_present(built):
    _, cases = built
    names = {c.name for c in cases}
    for prefix, at_least in [
        ("st-", 20),
        ("content-", 15),
        ("bin-", 8),
        ("cfg-", 12),
        ("fs-", 3),
    ]:
        assert sum(n.startswith(prefix) for n in names) >= at_least, prefix
    assert sum(c.sentinel is not None for c in cases) >= 3


def test_build_is_fast_and_repeatable(tmp_path):
    t0 = time.perf_counter()
    cases = corpus.build_corpus(tmp_path / "a")
    assert time.perf_counter() - t0 < 2.0
    again = corpus.build_corpus(tmp_path / "b")
    assert [(c.name, c.why, c.expect) for c in cases] == [(c.name, c.why, c.expect) for c in again]
    # Same bytes, apart from the absolute sentinel paths inside the pickles and torch.save's
    # random serialization id.
    sa, sb = corpus.snapshot(tmp_path / "a"), corpus.snapshot(tmp_path / "b")
    assert sa.keys() == sb.keys()
    for key, val in sa.items():
        if key.endswith(".bin"):
            continue
        assert val == sb[key], key


def test_snapshot_records_files_links_dirs_and_detects_changes(built, tmp_path):
    root, _ = built
    snap = corpus.snapshot(root)
    assert corpus.snapshot(root) == snap
    assert snap["fs-symlink-loop/a.safetensors"] == "symlink:b.safetensors"
    assert snap["fs-symlink-loop/b.safetensors"] == "symlink:a.safetensors"
    assert snap["fs-weights-self-symlink/adapter/adapter_model.safetensors"] == ("symlink:adapter_model.safetensors")
    assert snap["cfg-is-directory/adapter/adapter_config.json"] == "dir"
    assert snap["st-empty/adapter_model.safetensors"] == b""

    # Detects a change, a new file, and a deletion (on a copy, not the shared corpus).
    corpus.build_corpus(tmp_path)
    before = corpus.snapshot(tmp_path)
    (tmp_path / "st-empty" / "adapter_model.safetensors").write_bytes(b"x")
    (tmp_path / "bin-exec-zip-open" / "PWNED").touch()
    (tmp_path / "cfg-empty" / "adapter" / "adapter_config.json").unlink()
    after = corpus.snapshot(tmp_path)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert changed == {
        "st-empty/adapter_model.safetensors",
        "bin-exec-zip-open/PWNED",
        "cfg-empty/adapter/adapter_config.json",
    }


def test_hand_written_safetensors_baseline_is_valid():
    base = corpus.baseline_tensors()
    loaded = st_load_bytes(corpus.safetensors_bytes(base))
    assert loaded.keys() == base.keys()
    for k in base:
        assert loaded[k].dtype == np.float32 and np.array_equal(loaded[k], base[k])
    assert base["prompt_embeddings"].shape == (corpus.T, corpus.D)
    assert base["prefix_task_cols"].shape == (corpus.N_TASKS, corpus.T, corpus.R)
    assert base["prefix_task_rows"].shape == (corpus.N_TASKS, corpus.R, corpus.D)
    cfg = json.loads(corpus.config_text(corpus.baseline_config()))
    assert cfg["peft_type"] == "MULTITASK_PROMPT_TUNING"
    assert cfg["num_virtual_tokens"] * cfg["num_transformer_submodules"] == corpus.T


def test_content_cases_are_valid_safetensors(built):
    """content-* files are well-formed containers: only their tensors are wrong."""
    _, cases = built
    checked = 0
    for c in cases:
        if c.name.startswith("content-") and c.path.suffix == ".safetensors":
            with safe_open(str(c.path), "np") as f:
                names = f.keys()
                shapes = {k: f.get_slice(k).get_shape() for k in names}
            assert shapes, c.name
            checked += 1
    assert checked >= 15
    by_name = {c.name: c for c in cases}
    with safe_open(str(by_name["content-0d-prompt"].path), "np") as f:
        assert f.get_slice("prompt_embeddings").get_shape() == []


def test_safetensors_library_rejects_container_cases(built):
    _, cases = built
    for c in cases:
        if not c.name.startswith("st-") or c.name in SAFETENSORS_ACCEPTS:
            continue
        with (
            pytest.raises(Exception),  # noqa: B017 - any refusal will do
            safe_open(str(c.path), "np") as f,
        ):
            names = f.keys()
            for k in names:
                f.get_tensor(k)


def test_exec_payload_runs_when_unpickled_unsafely(tmp_path):
    """Proof that the payload is live: plain pickle.loads in a subprocess creates the sentinel."""
    for how in ("open", "system"):
        sentinel = tmp_path / f"sentinel-{how}"
        payload = tmp_path / f"payload-{how}.pkl"
        payload.write_bytes(corpus.exec_payload(sentinel, how))
        out = _run_python(
            """
            import json, pickle, sys
            pickle.loads(open(sys.argv[1], "rb").read())
            print(json.dumps({"ok": True}))
            """,
            str(payload),
        )
        assert out["ok"] and sentinel.exists(), how


def test_exec_cases_run_under_torch_load_weights_only_false(tmp_path):
    cases = [c for c in corpus.build_corpus(tmp_path) if c.sentinel is not None]
    files = [str(_weights_file(c)) for c in cases]
    _run_python(
        """
        import json, sys, warnings, torch
        warnings.simplefilter("ignore")
        for path in sys.argv[1:]:
            try:
                torch.load(path, weights_only=False)
            except Exception:
                pass  # the raw pickle fails the magic check only after running the payload
        print(json.dumps({"ok": True}))
        """,
        *files,
    )
    for c in cases:
        assert c.sentinel.exists(), c.name


def test_exec_cases_refused_by_torch_load_weights_only_true(built):
    root, cases = built
    exec_cases = [c for c in cases if c.sentinel is not None]
    before = corpus.snapshot(root)
    out = _run_python(
        """
        import json, pickle, sys, torch
        res = {}
        for path in sys.argv[1:]:
            try:
                torch.load(path, weights_only=True)
                res[path] = "loaded"
            except pickle.UnpicklingError as e:
                res[path] = "refused: " + str(e)
        print(json.dumps(res))
        """,
        *[str(_weights_file(c)) for c in exec_cases],
    )
    for c in exec_cases:
        msg = out[str(_weights_file(c))]
        assert msg.startswith("refused:") and "GLOBAL" in msg, (c.name, msg)
        assert not os.path.lexists(c.sentinel), c.name
    assert corpus.snapshot(root) == before
