"""`verify`: rebuild every task prompt against float64, and check targets against their source.

The CPU path runs everywhere; tests marked ``gpu`` need CUDA and are skipped without it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import FIXTURES, run_cli, write_random_source
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpt_tools.checkpoint import load_source
from mpt_tools.errors import DeviceError, MptToolsError, VerificationFailed, VerifyError
from mpt_tools.formats import from_torch, safetensors_bytes
from mpt_tools.init import init_adapter, init_and_verify
from mpt_tools.modes import TargetPlan
from mpt_tools.verification import verify
from mpt_tools.verification.engine import SCHEMA, TOLERANCES

CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
SOURCES = ["causal", "seq2seq", "causal_bin", "causal_bf16", "causal_fp16", "named/sources"]
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def write_source(
    folder: Path,
    pe: torch.Tensor,
    cols: torch.Tensor,
    rows: torch.Tensor,
    metadata: dict[str, str] | None = None,
) -> Path:
    """A PEFT-style causal adapter folder holding these three tensors."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"prompt_embeddings": pe, "prefix_task_cols": cols, "prefix_task_rows": rows}
    blob = safetensors_bytes({k: from_torch(v) for k, v in tensors.items()}, metadata or {"format": "pt"})
    (folder / "adapter_model.safetensors").write_bytes(blob)
    config = json.loads((FIXTURES / "causal" / "adapter_config.json").read_text())
    n, t, r = cols.shape
    config.update(num_tasks=n, num_ranks=r, num_virtual_tokens=t, token_dim=pe.shape[1])
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return folder


def random_source(
    folder: Path, n: int = 5, t: int = 6, r: int = 3, d: int = 24, dtype: torch.dtype = torch.float32, seed: int = 0
) -> Path:
    g = torch.Generator().manual_seed(seed)
    pe = torch.randn(t, d, generator=g).to(dtype)
    cols = (0.3 * torch.randn(n, t, r, generator=g)).to(dtype)
    rows = (0.3 * torch.randn(n, r, d, generator=g)).to(dtype)
    return write_source(folder, pe, cols, rows)


def tamper(folder: Path, name: str, index: tuple[int, ...], value: float) -> None:
    """Change one value of a written target, keeping its metadata."""
    ckpt = load_source(folder)
    tensors = {}
    for key in ("prompt_embeddings", "prefix_task_cols", "prefix_task_rows"):
        arr = np.array(ckpt.read(key).array, dtype=np.float32)
        if key == name:
            arr[index] = value
        tensors[key] = from_torch(torch.from_numpy(arr))
    blob = safetensors_bytes(tensors, ckpt.file.metadata)
    (folder / "adapter_model.safetensors").write_bytes(blob)


# --- the rebuild itself ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("name", SOURCES)
def test_fixture_prompts_rebuild_within_tolerance_on_cpu(name: str, dtype: str) -> None:
    report = verify(FIXTURES / name, device="cpu", dtype=dtype)
    assert report["ok"] and not report["failures"]
    n = load_source(FIXTURES / name).shapes["prefix_task_cols"][0]
    assert [t["task"] for t in report["tasks"]] == list(range(n))
    for t in report["tasks"]:
        assert t["ok"] and t["finite"] and t["inputs_finite"]
        assert 0 <= t["rel_err"] <= TOLERANCES[dtype]
        assert t["max_abs"] > 0 and 0 < t["headroom"] < 1e-3
    assert report["device"] == "cpu" and report["dtype"] == dtype
    assert report["target"] is None  # a source, not a target written by init


def test_float32_rebuild_is_exact_to_a_few_ulps() -> None:
    report = verify(FIXTURES / "causal", device="cpu")
    assert max(t["rel_err"] for t in report["tasks"]) < 3e-7


def test_json_schema(tmp_path: Path) -> None:
    out = tmp_path / "avg"
    init_adapter(FIXTURES / "causal", "average", out)
    res = run_cli("verify", out, "--device", "cpu", "--json")
    assert res.exit_code == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["schema"] == SCHEMA == "mpt-tools/verify/1"
    assert set(report) >= {
        "schema",
        "path",
        "device",
        "dtype",
        "tolerance",
        "tasks",
        "target",
        "ok",
        "failures",
        "notes",
        "timings",
    }
    assert set(report["timings"]) == {"read_s", "transfer_s", "rebuild_s", "total_s"}
    assert set(report["tolerance"]) == {"rel_frobenius", "atol_per_element", "dtype_max"}
    assert set(report["tasks"][0]) == {
        "task",
        "max_abs_err",
        "rel_err",
        "max_abs",
        "headroom",
        "finite",
        "inputs_finite",
        "ok",
    }
    target = report["target"]
    assert target["mode"] == "average" and target["source"] == str(FIXTURES / "causal")
    assert all(c["ok"] for c in target["checks"])
    assert [s["task"] for s in target["similarity"]] == [0, 1, 2]
    assert report["ok"] is True and report["failures"] == []


def test_table_output(tmp_path: Path) -> None:
    res = run_cli("verify", FIXTURES / "causal", "--device", "cpu", "--dtype", "float16")
    assert res.exit_code == 0, res.stderr
    assert "rel err" in res.stdout and "headroom" in res.stdout
    assert res.stdout.strip().splitlines()[-1].startswith("verify ok: 3 task(s) on cpu in float16")


def test_tasks_selection() -> None:
    report = verify(FIXTURES / "named" / "sources", device="cpu", tasks=[3, 1])
    assert [t["task"] for t in report["tasks"]] == [1, 3]
    res = run_cli("verify", FIXTURES / "causal", "--device", "cpu", "--tasks", "0,7")
    assert res.exit_code == 1
    assert res.stderr.count("\n") == 1 and "out of range" in res.stderr


# --- planted problems ----------------------------------------------------------------------------


def test_planted_nan_is_caught_and_named(tmp_path: Path) -> None:
    src = random_source(tmp_path / "src", n=5)
    ckpt = load_source(src)
    cols = torch.from_numpy(np.array(ckpt.read("prefix_task_cols").array))
    cols[3, 2, 1] = float("nan")
    pe = torch.from_numpy(np.array(ckpt.read("prompt_embeddings").array))
    rows = torch.from_numpy(np.array(ckpt.read("prefix_task_rows").array))
    write_source(src, pe, cols, rows)
    with pytest.raises(VerificationFailed) as info:
        verify(src, device="cpu")
    assert "task(s) 3" in str(info.value) and "non-finite-input" in str(info.value)
    report = info.value.report
    assert report["ok"] is False
    assert [f["task"] for f in report["failures"]] == [3]
    assert report["tasks"][3]["inputs_finite"] is False and report["tasks"][3]["rel_err"] is None
    assert all(t["ok"] for i, t in enumerate(report["tasks"]) if i != 3)
    # the CLI still prints the report, then one line on stderr, exit 1
    res = run_cli("verify", src, "--device", "cpu", "--json")
    assert res.exit_code == 1
    assert json.loads(res.stdout)["failures"][0]["task"] == 3
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: ") and "task(s) 3" in res.stderr


def test_nan_in_shared_prompt_fails_every_task(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    pe = torch.randn(4, 8, generator=g)
    pe[0, 0] = float("inf")
    src = write_source(tmp_path / "s", pe, torch.randn(3, 4, 2, generator=g), torch.randn(3, 2, 8, generator=g))
    report = verify(src, device="cpu", check=False)
    assert not report["ok"]
    assert report["failures"][0] == {
        "task": None,
        "check": "non-finite-input",
        "message": "prompt_embeddings (P*) holds NaN/Inf values",
    }
    assert {f["task"] for f in report["failures"][1:]} == {0, 1, 2}


def overflow_source(folder: Path) -> Path:
    """Task 1's prompt reaches ~1e5: fine in fp32/bf16, over float16's 65504."""
    pe = torch.full((4, 8), 300.0)
    cols = torch.full((3, 4, 1), 0.5)
    rows = torch.full((3, 1, 8), 0.5)
    cols[1] = 20.0
    rows[1] = 20.0  # P_1 = 300 * 400 = 120000
    return write_source(folder, pe, cols, rows)


def test_planted_fp16_overflow_is_caught(tmp_path: Path) -> None:
    src = overflow_source(tmp_path / "o")
    assert verify(src, device="cpu", dtype="float32")["ok"]
    assert verify(src, device="cpu", dtype="bfloat16")["ok"]
    with pytest.raises(VerificationFailed) as info:
        verify(src, device="cpu", dtype="float16")
    report = info.value.report
    assert [(f["task"], f["check"]) for f in report["failures"]] == [(1, "overflow")]
    assert report["tasks"][1]["headroom"] == pytest.approx(120000 / 65504)
    assert report["tasks"][0]["headroom"] == pytest.approx(75 / 65504)
    res = run_cli("verify", src, "--device", "cpu", "--dtype", "float16")
    assert res.exit_code == 1 and "FAIL" in res.stdout
    assert res.stderr.count("\n") == 1 and "task(s) 1" in res.stderr and "overflow" in res.stderr


def test_intermediate_overflow_is_caught(tmp_path: Path) -> None:
    """U_k @ V_k overflows float16 even though P_k itself would fit."""
    pe = torch.full((2, 4), 1e-3)
    cols = torch.full((1, 2, 1), 400.0)
    rows = torch.full((1, 1, 4), 400.0)  # U @ V = 160000 > 65504, P = 160
    src = write_source(tmp_path / "i", pe, cols, rows)
    report = verify(src, device="cpu", dtype="float16", check=False)
    assert [(f["task"], f["check"]) for f in report["failures"]] == [(0, "overflow")]
    assert report["tasks"][0]["headroom"] < 1


def test_a_shared_prompt_beyond_the_dtype_is_named(tmp_path: Path) -> None:
    """P* itself beyond float16 (its cast is Inf) while U_k @ V_k and P_k fit: the failure names P*,
    not U_k @ V_k."""
    pe = torch.full((2, 4), 70000.0)
    cols = torch.full((1, 2, 1), 0.5)
    rows = torch.full((1, 1, 4), 0.5)  # U @ V = 0.25, P = 17500
    src = write_source(tmp_path / "p", pe, cols, rows)
    report = verify(src, device="cpu", dtype="float16", check=False)
    [failure] = report["failures"]
    assert failure["check"] == "overflow" and "P* holds 70000, beyond float16 max 65504" in failure["message"]
    assert "U_k @ V_k" not in failure["message"]


def test_verify_finds_the_recorded_source_of_a_named_adapter(tmp_path: Path) -> None:
    """init from a named adapter (--subfolder) records the folder and sub/adapter_model.safetensors:
    verify reads the source there and runs the checks against it (it had skipped them)."""
    out = tmp_path / "t"
    assert (
        run_cli(
            "init", FIXTURES / "named", "--subfolder", "sources", "--mode", "exact", "--task", "1", "--out", out
        ).exit_code
        == 0
    )
    report = verify(out, device="cpu")
    assert report["target"] is not None and report["notes"] == [], report["notes"]
    assert [c["ok"] for c in report["target"]["checks"]] == [True] * 4


def test_wrong_values_exceed_tolerance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rebuild that differs from float64 beyond the dtype's tolerance is a failure (checked by
    holding bf16-rounded arithmetic to the fp32 tolerance)."""
    import mpt_tools.verification.engine as rb

    src = random_source(tmp_path / "w")
    original = rb._rebuild

    def sloppy(pe: Any, cols: Any, rows: Any, dtype: Any, out: Any = None) -> Any:
        return original(pe, cols, rows, torch.bfloat16).to(dtype)

    monkeypatch.setattr(rb, "_rebuild", sloppy)
    report = verify(src, device="cpu", check=False)
    assert {f["check"] for f in report["failures"]} == {"tolerance"}
    assert {f["task"] for f in report["failures"]} == set(range(5))


# --- targets against their source --------------------------------------------------------------


@pytest.mark.parametrize("name", ["causal", "causal_bf16", "causal_fp16", "causal_bin", "seq2seq"])
@pytest.mark.parametrize(
    "mode,kwargs",
    [
        ("average", {}),
        ("average", {"tasks": [0, 1], "weights": [1.0, 3.0]}),
        ("exact", {"task": 1}),
        ("exact", {"task": 0, "num_tasks": 3}),
        ("shared", {"seed": 5, "num_tasks": 2}),
    ],
)
def test_every_mode_matches_its_source(tmp_path: Path, name: str, mode: str, kwargs: dict[str, Any]) -> None:
    out = tmp_path / "t"
    init_adapter(FIXTURES / name, TargetPlan(mode, **kwargs), out)
    for source in (None, FIXTURES / name):  # recorded provenance, then explicit
        report = verify(out, device="cpu", source=source)
        target = report["target"]
        assert target["mode"] == mode
        assert target["checks"] and all(c["ok"] for c in target["checks"]), target["checks"]
        names = [c["check"] for c in target["checks"]]
        if mode == "exact":
            assert names == ["prompt_embeddings", "prefix_task_cols", "prefix_task_rows", "prompt"]
            assert target["task"] == kwargs["task"]
        elif mode == "average":
            assert names == ["prompt_embeddings", "prefix_task_cols", "prefix_task_rows"]
            sims = target["similarity"]
            assert len(sims) == load_source(FIXTURES / name).shapes["prefix_task_cols"][0]
            assert all(-1 <= s["cosine"] <= 1 and s["rel_distance"] >= 0 for s in sims)
            averaged = kwargs.get("tasks")
            assert [s["averaged"] for s in sims] == [averaged is None or s["task"] in averaged for s in sims]
        else:
            assert names == ["prompt_embeddings", "factors"]


def test_exact_target_is_its_source_task(tmp_path: Path) -> None:
    out = tmp_path / "e"
    init_adapter(FIXTURES / "causal", TargetPlan("exact", task=2), out)
    report = verify(out, device="cpu", source=FIXTURES / "causal")
    src = verify(FIXTURES / "causal", device="cpu")
    assert report["tasks"][0]["max_abs"] == src["tasks"][2]["max_abs"]


def test_average_similarity_of_a_one_task_mean_is_one(tmp_path: Path) -> None:
    out = tmp_path / "a"
    init_adapter(FIXTURES / "causal", TargetPlan("average", tasks=[1]), out)
    sims = verify(out, device="cpu")["target"]["similarity"]
    assert sims[1]["cosine"] == pytest.approx(1.0) and sims[1]["rel_distance"] == pytest.approx(0.0, abs=1e-12)
    assert sims[0]["cosine"] < 0.999


@pytest.mark.parametrize(
    "mode,kwargs,name,index",
    [
        ("exact", {"task": 1}, "prefix_task_cols", (0, 1, 0)),
        ("exact", {"task": 1}, "prompt_embeddings", (2, 3)),
        ("average", {}, "prefix_task_rows", (0, 0, 5)),
        ("shared", {"seed": 1}, "prompt_embeddings", (0, 0)),
        ("shared", {"seed": 1}, "prefix_task_cols", (0, 0, 0)),
    ],
)
def test_tampered_target_is_caught(
    tmp_path: Path, mode: str, kwargs: dict[str, Any], name: str, index: tuple[int, ...]
) -> None:
    out = tmp_path / "t"
    init_adapter(FIXTURES / "causal", TargetPlan(mode, **kwargs), out)
    ckpt = load_source(out)
    old = float(ckpt.read(name).array[index])
    size = ckpt.read(name).array.size
    tamper(out, name, index, np.nextafter(np.float32(old), np.float32(np.inf)))  # one ulp
    with pytest.raises(VerificationFailed) as info:
        verify(out, device="cpu", source=FIXTURES / "causal")
    failures = info.value.report["failures"]
    assert failures and all(f["check"] == "target-mismatch" for f in failures)
    assert any(name in f["message"] or "factors" in f["message"] for f in failures)
    # what was found, not only what was expected: the one changed value, by its index
    found = [c["found"] for c in info.value.report["target"]["checks"] if c["found"]]
    at = "[" + ", ".join(str(i) for i in index) + "]"
    assert any(f"1 of {size} values differ, the largest at {at}" in f for f in found), found
    assert "sha256" not in " ".join(info.value.report["notes"])  # the source is the one recorded
    res = run_cli("verify", out, "--device", "cpu")
    assert res.exit_code == 1 and res.stderr.count("\n") == 1 and "target-mismatch" in res.stderr
    assert ", found " in res.stderr and "; found " in res.stdout


def test_target_against_another_source_is_caught(tmp_path: Path) -> None:
    out = tmp_path / "t"
    init_adapter(FIXTURES / "causal", TargetPlan("exact", task=0), out)
    other = random_source(tmp_path / "other", n=3, t=4, r=2, d=16)
    with pytest.raises(VerificationFailed) as info:
        verify(out, device="cpu", source=other)
    assert "sha256 differs" in info.value.report["notes"][0]


def test_recorded_source_gone_or_changed(tmp_path: Path) -> None:
    src = random_source(tmp_path / "src")
    out = tmp_path / "t"
    init_adapter(src, "average", out)
    assert verify(out, device="cpu")["target"]["mode"] == "average"
    random_source(src, seed=9)  # the source changed since init
    report = verify(out, device="cpu")
    assert report["ok"] and report["target"] is None and "changed since init" in report["notes"][0]
    shutil.rmtree(src)
    report = verify(out, device="cpu")
    assert report["ok"] and report["target"] is None and "not found" in report["notes"][0]


def test_relative_recorded_source_found_from_another_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """init recorded `sources` relative to its working directory; verify run from inside the target
    folder still finds it (by walking up from the target, recognised by its sha256), skipping a
    same-named folder with other contents on the way."""
    random_source(tmp_path / "sources")
    monkeypatch.chdir(tmp_path)
    init_adapter("sources", TargetPlan("exact", task=2), "runs/t1")
    random_source(tmp_path / "runs" / "sources", seed=5)  # a decoy nearer to the target
    monkeypatch.chdir(tmp_path / "runs" / "t1")
    report = verify(".", device="cpu")
    assert report["ok"] and report["target"]["task"] == 2
    assert all(c["ok"] for c in report["target"]["checks"]) and len(report["target"]["checks"]) == 4
    assert Path(report["target"]["source"]).resolve() == (tmp_path / "sources").resolve()
    assert any("found as" in n for n in report["notes"]), report["notes"]
    shutil.rmtree(tmp_path / "sources")  # only the decoy is left: a note, no target check
    report = verify(".", device="cpu")
    assert report["target"] is None and "runs/sources has another" in report["notes"][0], report["notes"]


def test_source_given_for_an_adapter_without_provenance(tmp_path: Path) -> None:
    with pytest.raises(VerifyError, match=r"records no mpt_tools\.mode"):
        verify(FIXTURES / "causal", device="cpu", source=FIXTURES / "causal")


def set_metadata(folder: Path, **changes: str) -> None:
    """Rewrite a written adapter with some ``mpt_tools.*`` metadata values changed."""
    ckpt = load_source(folder)
    tensors = {k: ckpt.read(k) for k in ("prompt_embeddings", "prefix_task_cols", "prefix_task_rows")}
    meta = {**ckpt.file.metadata, **{f"mpt_tools.{k}": v for k, v in changes.items()}}
    (folder / "adapter_model.safetensors").write_bytes(safetensors_bytes(tensors, meta))


@pytest.mark.parametrize(
    ("mode", "kwargs", "changes", "needle"),
    [
        ("exact", {"task": 1}, {"task": "abc"}, "task: recorded mpt_tools.task 'abc' is not an integer"),
        ("exact", {"task": 1}, {"task": "-1"}, "task: recorded mpt_tools.task -1 is negative"),
        ("exact", {"task": 1}, {"task": "9" * 30}, "is not a task of the source (0..2)"),
        ("exact", {"task": 1}, {"mode": "bogus"}, "mode: recorded mpt_tools.mode 'bogus' is not one of init's modes"),
        ("average", {}, {"tasks": "1,x"}, "tasks: recorded mpt_tools.tasks '1,x' is not a list of integers"),
        ("average", {}, {"tasks": "0,0"}, "a task is listed twice"),
        ("average", {}, {"tasks": "0," + "9" * 30}, "the source has 3 tasks"),
        ("average", {}, {"weights": "nan,1,1"}, "weights must be finite, non-negative, not all 0"),
        ("average", {}, {"weights": "1,1"}, "need one weight per averaged task (expected 3, found 2)"),
        ("average", {}, {"weights": "w"}, "recorded mpt_tools.weights 'w' is not a list of numbers"),
        ("shared", {"seed": 3}, {"seed": "zz"}, "seed: recorded mpt_tools.seed 'zz' is not an integer"),
        ("shared", {"seed": 3}, {"seed": "-5"}, "seed: recorded mpt_tools.seed -5 is negative"),
        ("shared", {"seed": 3}, {"seed": "4"}, "draws of seed 4, found prefix_task_cols "),
    ],
)
def test_hostile_provenance_is_a_target_mismatch(
    tmp_path: Path, mode: str, kwargs: dict[str, Any], changes: dict[str, str], needle: str
) -> None:
    """Hand-edited or hostile mpt_tools.* values: a named target-mismatch, never an internal error."""
    out = tmp_path / "t"
    init_adapter(FIXTURES / "causal", TargetPlan(mode, **kwargs), out)
    set_metadata(out, **changes)
    result = run_cli("verify", str(out), "--source", str(FIXTURES / "causal"))
    assert result.exit_code == 1, result.stderr
    assert result.stderr.count("\n") == 1 and "target-mismatch" in result.stderr and needle in result.stderr


# --- init --verify ---------------------------------------------------------------------------


def test_init_verify_prints_summary(tmp_path: Path) -> None:
    out = tmp_path / "v"
    res = run_cli("init", FIXTURES / "causal_bf16", "--mode", "average", "--out", out, "--verify")
    assert res.exit_code == 0, res.stderr
    last = res.stdout.strip().splitlines()[-1]
    assert last.startswith("verify ok: 1 task(s)") and "average target vs source: 3/3 checks" in last
    res = run_cli("init", FIXTURES / "causal", "--mode", "exact", "--out", tmp_path / "j", "--verify", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["verify"]["ok"] is True


def break_average(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make init write a wrong average (one value off) so that --verify must fail."""
    import mpt_tools.init as init

    real = init.build_target

    def wrong(*args: Any, **kwargs: Any) -> Any:
        target = real(*args, **kwargs)
        target.tensors["prefix_task_cols"] = target.tensors["prefix_task_cols"] * np.float32(1.001)
        return target

    monkeypatch.setattr(init, "build_target", wrong)


def test_init_verify_failure_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    break_average(monkeypatch)
    out = tmp_path / "new"
    res = run_cli("init", FIXTURES / "causal", "--mode", "average", "--out", out, "--verify")
    assert res.exit_code == 1
    assert res.stderr.count("\n") == 1 and "prefix_task_cols" in res.stderr and "nothing was written" in res.stderr
    assert not out.exists()
    # a folder that existed (empty) stays empty
    out.mkdir()
    with pytest.raises(VerificationFailed):
        init_and_verify(FIXTURES / "causal", "average", out, device="cpu")
    assert out.is_dir() and list(out.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new"]  # no staging folder left behind


def test_init_verify_failure_leaves_an_existing_adapter_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "old"
    init_adapter(FIXTURES / "causal", TargetPlan("exact", task=2), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    break_average(monkeypatch)
    res = run_cli("init", FIXTURES / "causal", "--mode", "average", "--out", out, "--verify", "--force")
    assert res.exit_code == 1 and res.stderr.count("\n") == 1
    assert "was left as it was" in res.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_init_verify_success_replaces_an_existing_adapter(tmp_path: Path) -> None:
    out = tmp_path / "old"
    init_adapter(FIXTURES / "causal", TargetPlan("exact", task=2), out)
    (out / "notes.txt").write_text("mine")
    res = run_cli("init", FIXTURES / "causal", "--mode", "average", "--out", out, "--verify", "--force", "--json")
    assert res.exit_code == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["out"] == str(out) and data["verify"]["path"] == str(out) and data["verify"]["ok"]
    assert str(tmp_path / ".") not in res.stdout.replace(str(out), "")  # no staging path in the report
    plain = tmp_path / "plain"
    init_adapter(FIXTURES / "causal", "average", plain)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (out / name).read_bytes() == (plain / name).read_bytes()
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old", "plain"]


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.skipif(CUDA, reason="checks the message when CUDA is missing")
def test_device_cuda_without_cuda(tmp_path: Path) -> None:
    res = run_cli("verify", FIXTURES / "causal", "--device", "cuda")
    assert res.exit_code == 1 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and "CUDA is not available" in res.stderr
    with pytest.raises(DeviceError):
        verify(FIXTURES / "causal", device="cuda")
    out = tmp_path / "x"
    res = run_cli("init", FIXTURES / "causal", "--mode", "average", "--out", out, "--verify")
    assert res.exit_code == 0  # --verify uses auto: the CPU
    with pytest.raises(DeviceError):
        init_and_verify(FIXTURES / "causal", "average", tmp_path / "y", device="cuda")
    assert not (tmp_path / "y").exists()  # refused before writing


@pytest.mark.parametrize(
    "args,needle",
    [
        (["verify", "/no/such/adapter"], "no such file"),
        (["verify", str(FIXTURES / "causal"), "--tasks", "-1"], "out of range"),
        (["verify", str(FIXTURES / "causal"), "--source", "/no/such/src"], "no such file"),
    ],
)
def test_errors_are_one_line_exit_1(args: list[str], needle: str) -> None:
    res = run_cli(*args)
    assert res.exit_code == 1
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: ") and needle in res.stderr


def test_missing_factors_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "p.safetensors"
    path.write_bytes(safetensors_bytes({"prompt_embeddings": from_torch(torch.ones(4, 8))}, {"format": "pt"}))
    with pytest.raises(MptToolsError, match="prefix_task_cols: tensor missing"):
        verify(path, device="cpu")


def test_bad_dtype_and_chunk_bytes() -> None:
    with pytest.raises(MptToolsError, match="unknown dtype"):
        verify(FIXTURES / "causal", device="cpu", dtype="float8")
    with pytest.raises(MptToolsError, match="chunk_bytes"):
        verify(FIXTURES / "causal", device="cpu", chunk_bytes=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reads_split_over_threads_and_reused_buffers_give_the_same_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    """Chunks are read into reused host buffers, large reads split over threads: per-task results
    are identical to a one-chunk, one-thread run, and a task planted with NaN is still the one named."""
    from mpt_tools import formats

    g = torch.Generator().manual_seed(1)
    cols = torch.randn(23, 6, 3, generator=g)
    cols[17, 2, 1] = float("nan")
    src = write_source(
        tmp_path / "s",
        torch.randn(6, 40, generator=g).to(dtype),
        cols.to(dtype),
        torch.randn(23, 3, 40, generator=g).to(dtype),
    )
    whole = verify(src, device="cpu", check=False)
    monkeypatch.setattr(formats, "READ_PIECE", 100)
    monkeypatch.setattr(formats, "READ_THREADS", 4)
    log: list[int] = []
    split = verify(src, device="cpu", check=False, chunk_bytes=3 * (6 * 40 * 20 + (6 * 3 + 3 * 40) * 20), chunk_log=log)
    assert log == [3] * 7 + [2]
    assert split["tasks"] == whole["tasks"]
    assert [(f["task"], f["check"]) for f in split["failures"]] == [(17, "non-finite-input")]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_fused_and_unfused_reductions_agree_bitwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str
) -> None:
    """CUDA uses aminmax and a mixed-dtype subtraction, the CPU amin/amax and an upcast first:
    run both on the CPU, with a NaN, an Inf and a float16 overflow planted, and compare."""
    from mpt_tools.verification import engine as rebuild

    g = torch.Generator().manual_seed(3)
    cols = torch.randn(9, 4, 2, generator=g)
    rows = torch.randn(9, 2, 8, generator=g)
    cols[2, 1, 0] = float("nan")
    rows[5, 0, 3] = float("inf")
    cols[7], rows[7] = 300.0, 300.0  # U_7 @ V_7 = 180000: P_7 far above float16 max
    sources = [
        write_source(tmp_path / "planted", torch.randn(4, 8, generator=g), cols, rows),
        overflow_source(tmp_path / "o"),
    ]
    named = []
    for src in sources:
        reports = []
        for fused in (False, True):
            monkeypatch.setattr(rebuild, "_fused_reductions", lambda dev, fused=fused: fused)
            reports.append(verify(src, device="cpu", dtype=dtype, check=False))
        assert reports[0]["tasks"] == reports[1]["tasks"]
        assert reports[0]["failures"] == reports[1]["failures"]
        named.append({(f["task"], f["check"]) for f in reports[0]["failures"]})
    overflow = dtype == "float16"
    assert named[0] == {(2, "non-finite-input"), (5, "non-finite-input")} | ({(7, "overflow")} if overflow else set())
    assert named[1] == ({(1, "overflow")} if overflow else set())


# --- bounded chunks ------------------------------------------------------------------------------


def test_chunks_are_bounded(tmp_path: Path) -> None:
    n, t, r, d = 40, 6, 3, 32
    src = random_source(tmp_path / "big", n=n, t=t, r=r, d=d)
    per_task = t * d * (4 + 16) + (t * r + r * d) * (4 + 16)
    budget = 5 * per_task + 7
    log: list[int] = []
    ckpt = load_source(src)
    report = verify(ckpt, device="cpu", chunk_bytes=budget, chunk_log=log)
    assert report["ok"] and len(report["tasks"]) == n
    assert log == [5] * 8
    reads = [x for x in ckpt.file.reads if x[0] == "prefix_task_rows"]
    assert [stop - start for _, start, stop, _ in reads] == [5] * 8
    assert max(nbytes for *_, nbytes in reads) == 5 * r * d * 4
    # a budget under one task still makes progress, one task at a time
    log.clear()
    verify(src, device="cpu", chunk_bytes=1, chunk_log=log)
    assert log == [1] * n
    # a sparse selection is read as contiguous runs only
    log.clear()
    verify(src, device="cpu", chunk_bytes=budget, chunk_log=log, tasks=[0, 1, 2, 10, 11, 39])
    assert log == [3, 2, 1]
    # identical metrics whatever the chunking
    whole = verify(src, device="cpu")
    assert whole["tasks"] == report["tasks"]


# --- property: init then verify always passes ----------------------------------------------------


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 5),
    t=st.integers(1, 6),
    r=st.integers(1, 4),
    d=st.integers(1, 24),
    dtype=st.sampled_from(["float32", "bfloat16", "float16"]),
    mode=st.sampled_from(["average", "exact", "shared"]),
    compute=st.sampled_from(["float32", "bfloat16", "float16"]),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_init_then_verify_always_passes(
    tmp_path_factory: pytest.TempPathFactory,
    n: int,
    t: int,
    r: int,
    d: int,
    dtype: str,
    mode: str,
    compute: str,
    seed: int,
    data: st.DataObject,
) -> None:
    tmp = tmp_path_factory.mktemp("prop")
    src = random_source(tmp / "src", n=n, t=t, r=r, d=d, dtype=TORCH_DTYPES[dtype], seed=seed)
    kwargs: dict[str, Any] = {}
    if mode == "exact":
        kwargs["task"] = data.draw(st.integers(0, n - 1))
    elif mode == "shared":
        kwargs["seed"] = seed
    else:
        subset = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True) | st.none())
        if subset is not None:
            kwargs["tasks"] = subset
            if data.draw(st.booleans()):
                kwargs["weights"] = data.draw(st.lists(st.floats(0.1, 10), min_size=len(subset), max_size=len(subset)))
    out = tmp / "out"
    init_adapter(src, TargetPlan(mode, **kwargs), out)
    report = verify(out, device="cpu", dtype=compute)
    assert report["ok"] and report["target"] is not None
    assert all(c["ok"] for c in report["target"]["checks"])
    # the source itself rebuilds within tolerance too
    assert verify(src, device="cpu", dtype=compute)["ok"]


# --- GPU -------------------------------------------------------------------------------------------


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("name", SOURCES)
def test_gpu_agrees_with_cpu(name: str, dtype: str) -> None:
    cpu = verify(FIXTURES / name, device="cpu", dtype=dtype)
    cuda = verify(FIXTURES / name, device="cuda", dtype=dtype)
    assert cuda["ok"] and cuda["device"].startswith("cuda:")
    tol = TOLERANCES[dtype]
    for a, b in zip(cpu["tasks"], cuda["tasks"], strict=True):
        assert a["task"] == b["task"]
        assert b["rel_err"] <= tol
        # the float64 references agree to float64 precision; the rebuilds within the tolerance
        assert b["max_abs"] == pytest.approx(a["max_abs"], rel=1e-12)
        assert abs(b["rel_err"] - a["rel_err"]) <= tol


@gpu
@needs_cuda
def test_gpu_target_checks_and_timings(tmp_path: Path) -> None:
    out = tmp_path / "a"
    init_adapter(FIXTURES / "causal", "average", out)
    report = verify(out, device="cuda")
    assert report["ok"] and all(c["ok"] for c in report["target"]["checks"])
    cpu = verify(out, device="cpu")
    for a, b in zip(cpu["target"]["similarity"], report["target"]["similarity"], strict=True):
        assert b["cosine"] == pytest.approx(a["cosine"], rel=1e-9)
    assert report["timings"]["transfer_s"] > 0 and report["timings"]["rebuild_s"] > 0


@gpu
@needs_cuda
def test_gpu_catches_nan_and_overflow(tmp_path: Path) -> None:
    src = overflow_source(tmp_path / "o")
    with pytest.raises(VerificationFailed) as info:
        verify(src, device="cuda", dtype="float16")
    assert [(f["task"], f["check"]) for f in info.value.report["failures"]] == [(1, "overflow")]
    assert verify(src, device="cuda", dtype="float32")["ok"]
    g = torch.Generator().manual_seed(0)
    cols = torch.randn(4, 3, 2, generator=g)
    cols[2, 0, 0] = float("nan")
    nan_src = write_source(tmp_path / "n", torch.randn(3, 8, generator=g), cols, torch.randn(4, 2, 8, generator=g))
    with pytest.raises(VerificationFailed) as info:
        verify(nan_src, device="cuda")
    assert [(f["task"], f["check"]) for f in info.value.report["failures"]] == [(2, "non-finite-input")]


@gpu
@needs_cuda
def test_gpu_chunks_bounded(tmp_path: Path) -> None:
    n, t, r, d = 64, 50, 4, 512
    src = random_source(tmp_path / "big", n=n, t=t, r=r, d=d)
    per_task = t * d * (4 + 16) + (t * r + r * d) * (4 + 16)
    log: list[int] = []
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    report = verify(src, device="cuda", chunk_bytes=4 * per_task, chunk_log=log)
    peak = torch.cuda.max_memory_allocated() - before
    assert report["ok"] and log == [4] * 16
    # the whole source's prompts in float64 would take n * t * d * 8 = 13 MB; one chunk's working
    # set is 4 * per_task = 2 MB; allow for the allocator's rounding and the float64 temporaries
    assert peak < 3 * 4 * per_task, peak
    cpu = verify(src, device="cpu")
    assert [t["max_abs"] for t in cpu["tasks"]] == pytest.approx([t["max_abs"] for t in report["tasks"]], rel=1e-12)


def test_named_adapter_with_subfolder() -> None:
    result = run_cli("verify", str(FIXTURES / "named"), "--subfolder", "sources", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["shape"]["num_tasks"] == 4
    result = run_cli("verify", str(FIXTURES / "named"))
    assert result.exit_code == 1 and "add --subfolder NAME" in result.stderr


def test_cuda_chunk_bound_follows_free_memory() -> None:
    from mpt_tools.verification.engine import DEFAULT_CHUNK_BYTES, cuda_chunk_bytes

    assert cuda_chunk_bytes(80 << 30) == DEFAULT_CHUNK_BYTES["cuda"]
    assert cuda_chunk_bytes(3 << 30) == 1 << 30
    assert cuda_chunk_bytes(0) == 64 << 20


@pytest.mark.parametrize(
    ("exc", "needle"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "ran out of memory"),
        (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"), "fewer --tasks"),
    ],
)
def test_out_of_memory_is_one_line(monkeypatch: pytest.MonkeyPatch, exc: Exception, needle: str) -> None:
    from mpt_tools.verification import engine as rebuild

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise exc

    monkeypatch.setattr(rebuild, "_rebuild_checks", boom)
    result = run_cli("verify", str(FIXTURES / "causal"), "--device", "cpu")
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "cpu ran out of memory" in result.stderr and needle in result.stderr


def test_other_runtime_errors_are_not_called_out_of_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    from mpt_tools.verification import engine as rebuild

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("something else")

    monkeypatch.setattr(rebuild, "_rebuild_checks", boom)
    with pytest.raises(RuntimeError, match="something else"):
        verify(FIXTURES / "causal", device="cpu")


@gpu
@needs_cuda
def test_gpu_default_chunk_bound() -> None:
    from mpt_tools.verification.engine import default_chunk_bytes

    free, _ = torch.cuda.mem_get_info()
    bound = default_chunk_bytes(torch.device("cuda"))
    assert 64 << 20 <= bound <= 2 << 30 and bound <= max(64 << 20, free // 3)


@gpu
@needs_cuda
def test_gpu_init_verify_uses_cuda_by_default(tmp_path: Path) -> None:
    out = tmp_path / "t"
    result = run_cli("init", str(FIXTURES / "causal"), "--mode", "exact", "--task", "1", "--out", str(out), "--verify")
    assert result.exit_code == 0, result.stderr
    assert "verify ok" in result.stdout and "on cuda:" in result.stdout
    report = verify(out)  # auto: CUDA, and the recorded source is found and matches
    assert report["device"].startswith("cuda:") and all(c["ok"] for c in report["target"]["checks"])


def test_verify_lists_at_most_max_task_rows_and_sums_up_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per-task rows (and failures) are capped at prompts.MAX_TASK_ROWS; a note covers the rest,
    so memory stays bounded for millions of tasks. Every task is still checked."""
    from mpt_tools import prompts
    from mpt_tools.verification import verify

    monkeypatch.setattr(prompts, "MAX_TASK_ROWS", 3)
    folder = tmp_path / "a"
    folder.mkdir()
    src = write_random_source(folder / "adapter_model.safetensors", n=7, t=4, r=2, d=8)
    report = verify(src, device="cpu")
    assert [row["task"] for row in report["tasks"]] == [0, 1, 2]
    assert report["ok"]
    assert any("first 3 of 7 tasks" in n and "other 4: 0 failing" in n for n in report["notes"]), report["notes"]
