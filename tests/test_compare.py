"""diff, task similarity and its heatmap (issue #5)."""

from __future__ import annotations

import builtins
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import FIXTURES, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from safetensors.torch import load_file, save_file  # noqa: E402

from mpt_tools.cli.render import similarity_table  # noqa: E402
from mpt_tools.compare import diff, similarity_json, task_similarity  # noqa: E402

CAUSAL = FIXTURES / "causal"
NAMED = FIXTURES / "named" / "sources"


def naive_similarity(folder: Path) -> np.ndarray:
    t = load_file(str(folder / "adapter_model.safetensors"))
    pe = t["prompt_embeddings"].double().numpy()
    cols, rows = t["prefix_task_cols"].double().numpy(), t["prefix_task_rows"].double().numpy()
    p = (pe[None] * (cols @ rows)).reshape(cols.shape[0], -1)
    norms = np.linalg.norm(p, axis=1)
    return (p @ p.T) / np.outer(norms, norms)


# --------------------------------------------------------------------------------------------
# diff
# --------------------------------------------------------------------------------------------


def test_diff_identical_exits_0(tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(CAUSAL, copy)
    res = run_cli("diff", CAUSAL, copy)
    assert res.exit_code == 0, res.output
    assert res.stdout.strip().endswith("identical") and res.stderr == ""


def test_diff_different_exits_1_with_report_and_one_line(tmp_path: Path) -> None:
    res = run_cli("diff", CAUSAL, FIXTURES / "causal_bf16")
    assert res.exit_code == 1
    assert "dtype prompt_embeddings: float32 vs bfloat16" in res.stdout
    assert "max abs diff" in res.stdout
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("differ: ")
    res = run_cli("diff", CAUSAL, FIXTURES / "causal_bf16", "--json")
    assert res.exit_code == 1
    report = json.loads(res.stdout)
    assert not report["identical"] and report["differences"] >= 4
    assert {d["key"] for d in report["dtypes"]} == {"prompt_embeddings", "prefix_task_cols", "prefix_task_rows"}
    assert len(report["prompts"]["tasks"]) == 3


def test_diff_values_and_prompts(tmp_path: Path) -> None:
    t = dict(load_file(str(CAUSAL / "adapter_model.safetensors")))
    rows = t["prefix_task_rows"].clone()
    rows[1, 0, 5] += 0.25
    t["prefix_task_rows"] = rows
    other = tmp_path / "other"
    shutil.copytree(CAUSAL, other)
    save_file(t, str(other / "adapter_model.safetensors"), metadata={"format": "pt"})
    report = diff(CAUSAL, other)
    assert not report["identical"]
    assert report["tensors"]["prefix_task_rows"]["max_abs_diff"] == pytest.approx(0.25, abs=1e-6)
    assert report["tensors"]["prompt_embeddings"]["bitwise_equal"]
    tasks = report["prompts"]["tasks"]
    assert tasks[0]["max_abs_diff"] == 0 and tasks[2]["max_abs_diff"] == 0 and tasks[1]["max_abs_diff"] > 0
    assert report["shapes"] == [] and report["config"] == []


def test_diff_keys_shapes_and_config(tmp_path: Path) -> None:
    up = tmp_path / "up"
    assert run_cli("rerank", CAUSAL, "--num-ranks", "4", "--out", up).exit_code == 0
    report = diff(CAUSAL, up)
    assert {s["key"] for s in report["shapes"]} == {"prefix_task_cols", "prefix_task_rows"}
    assert report["config"] == [{"field": "num_ranks", "a": 2, "b": 4}]
    # rank differs, the prompts do not
    assert report["prompts"]["max_abs_diff"] == 0.0
    t = dict(load_file(str(CAUSAL / "adapter_model.safetensors")))
    t["extra.weight"] = torch.zeros(2)
    bare = tmp_path / "extra.safetensors"
    save_file(t, str(bare))
    report = diff(CAUSAL, bare)
    assert report["keys"]["only_b"] == ["extra.weight"]
    assert report["config_files"]["b"] is None and not report["identical"]


def test_diff_ignores_metadata_but_reports_it(tmp_path: Path) -> None:
    conv = tmp_path / "conv"
    assert run_cli("convert", CAUSAL, "--out", conv).exit_code == 0
    report = diff(CAUSAL, conv)
    assert report["identical"]
    assert any(m["key"] == "mpt_tools.operation" for m in report["metadata"])


def test_diff_unreadable_is_one_line(tmp_path: Path) -> None:
    res = run_cli("diff", CAUSAL, tmp_path / "missing")
    assert res.exit_code == 1 and res.stderr.startswith("error: ") and len(res.stderr.splitlines()) == 1


# --------------------------------------------------------------------------------------------
# similarity
# --------------------------------------------------------------------------------------------


def test_similarity_matches_numpy() -> None:
    sim = task_similarity(NAMED)
    want = naive_similarity(NAMED)
    assert np.allclose(sim, want, atol=1e-12)
    assert np.array_equal(sim, sim.T) and np.all(np.diag(sim) == 1.0)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunk=st.integers(1, 5000))
def test_similarity_in_chunks_is_the_same(chunk: int) -> None:
    whole = task_similarity(NAMED)
    assert np.allclose(task_similarity(NAMED, chunk_bytes=chunk), whole, atol=1e-12)


def test_similarity_zero_prompt_is_nan(tmp_path: Path) -> None:
    t = dict(load_file(str(CAUSAL / "adapter_model.safetensors")))
    cols = t["prefix_task_cols"].clone()
    cols[1] = 0
    t["prefix_task_cols"] = cols
    path = tmp_path / "z.safetensors"
    save_file(t, str(path))
    sim = task_similarity(path)
    assert np.isnan(sim[1]).all() and np.isnan(sim[:, 1]).all() and sim[0, 0] == 1.0
    assert "n/a" in similarity_table(similarity_json(sim))


@pytest.mark.parametrize("chunk", [1, 300, 1 << 20])
def test_similarity_with_a_nan_task_leaves_the_others_alone(tmp_path: Path, chunk: int) -> None:
    t = dict(load_file(str(NAMED / "adapter_model.safetensors")))
    rows = t["prefix_task_rows"].clone()
    rows[2, 0, 5] = float("nan")
    t["prefix_task_rows"] = rows
    path = tmp_path / "n.safetensors"
    save_file(t, str(path))
    sim = task_similarity(path, chunk_bytes=chunk)
    clean = task_similarity(NAMED)
    assert np.isnan(sim[2]).all() and np.isnan(sim[:, 2]).all()
    keep = [0, 1, 3]
    assert np.allclose(sim[np.ix_(keep, keep)], clean[np.ix_(keep, keep)], atol=1e-12)


def test_inspect_similarity_text_and_json() -> None:
    res = run_cli("inspect", NAMED, "--similarity")
    assert res.exit_code == 0, res.output
    assert "task similarity" in res.stdout
    table = res.stdout.split("task similarity", 1)[1].strip().splitlines()[2:]
    assert len(table) == 4 and table[0].split()[1] == "1.000"
    res = run_cli("inspect", NAMED, "--similarity", "--json")
    report = json.loads(res.stdout)
    assert np.allclose(np.array(report["similarity"]), naive_similarity(NAMED), atol=1e-9)
    # without the flag nothing changes
    assert "similarity" not in json.loads(run_cli("inspect", NAMED, "--json").stdout)


def test_plot_heatmap(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "plots" / "sim.png"
    res = run_cli("inspect", NAMED, "--plot", png)
    assert res.exit_code == 0, res.output
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
    res = run_cli("inspect", NAMED, "--plot", png)
    assert res.exit_code == 1 and "--force" in res.stderr
    assert run_cli("inspect", NAMED, "--plot", png, "--force").exit_code == 0
    res = run_cli("inspect", NAMED, "--plot", tmp_path / "sim.jpg")
    assert res.exit_code == 1 and ".png" in res.stderr


def test_plot_refuses_the_source_folder(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    copy = tmp_path / "src"
    shutil.copytree(CAUSAL, copy)
    res = run_cli("inspect", copy, "--plot", copy / "sim.png")
    assert res.exit_code == 1 and "source" in res.stderr and not (copy / "sim.png").exists()


def test_plot_without_matplotlib_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def fake_import(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    png = tmp_path / "sim.png"
    res = run_cli("inspect", NAMED, "--plot", png)
    assert res.exit_code == 1
    assert "pip install 'mpt-tools[plot]'" in res.stderr and len(res.stderr.splitlines()) == 1
    assert not png.exists()
