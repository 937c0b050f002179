"""Adapters that every PEFT release loads: the field table, --peft-compat on every writer, and
``compat``.

The table (mpt_tools/peft_fields.json) must equal, for the PEFT these tests install, what that
PEFT's own config classes say. Every config a writer produces by default must hold only keys that
every release of the table knows, and load in the installed PEFT by both routes with no warning.
With ``MPT_TOOLS_OLD_PEFT_PYTHON`` set to the python of a virtual environment with an old PEFT
release (see README, "Testing"), the same adapters are loaded there too (tests/peft_load.py) and
must give bitwise the installed PEFT's prompts.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import FIXTURES, ROOT, run_cli

from mpt_tools.peft_releases import fields, fit_config, releases, resolve_release, table

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peft_load

OLD_PYTHON = os.environ.get("MPT_TOOLS_OLD_PEFT_PYTHON")


def _module(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the table ---------------------------------------------------------------------------------


def test_table_equals_the_installed_peft() -> None:
    """The table's entry for the installed PEFT is what its classes say (regenerate with
    docs/make_peft_fields.py when this fails after a PEFT upgrade)."""
    make = _module(ROOT / "docs" / "make_peft_fields.py", "make_peft_fields")
    here = make.dump()
    assert here["version"] in table(), f"add peft {here['version']}: python docs/make_peft_fields.py --python ..."
    assert table()[here["version"]] == here["classes"]


def test_table_spans_the_supported_releases() -> None:
    known = releases()
    assert known[0] == "0.10.0"
    assert {"0.10.0", "0.13.2", "0.14.0", "0.17.1", "0.21.2"} <= set(known)
    # what the measured matrix says: modules_to_save from 0.17.0, peft_version from 0.18.0
    mpt = "MULTITASK_PROMPT_TUNING"
    assert "modules_to_save" not in fields("0.13.2", mpt) and "modules_to_save" in fields("0.17.1", mpt)
    assert "peft_version" not in fields("0.17.1", mpt) and "peft_version" in fields("0.21.2", mpt)


def test_resolve_release() -> None:
    assert resolve_release("0.13.2") == "0.13.2"
    assert resolve_release("0.13") == "0.13.0"
    for bad in ("0.9.0", "1.0", "latest", "0.13.9"):
        with pytest.raises(Exception, match="not one mpt-tools knows"):
            resolve_release(bad)


# --- the rules ---------------------------------------------------------------------------------


def _cfg(**extra: Any) -> dict[str, Any]:
    cfg = json.loads((FIXTURES / "causal" / "adapter_config.json").read_text())
    cfg.update(extra)
    return cfg


def test_portable_leaves_out_defaults_and_peft_version() -> None:
    fit = fit_config(_cfg())
    assert "modules_to_save" not in fit.config and "peft_version" not in fit.config
    assert {r["key"] for r in fit.removed} == {"modules_to_save", "peft_version"}
    assert not fit.warnings
    oldest = set(fields(releases()[0], "MULTITASK_PROMPT_TUNING"))
    assert set(fit.config) <= oldest


def test_portable_keeps_a_value_with_a_warning_exact_release_refuses() -> None:
    fit = fit_config(_cfg(modules_to_save=["score"]))
    assert fit.config["modules_to_save"] == ["score"]
    assert fit.warnings and "0.17.0 or later" in fit.warnings[0]
    with pytest.raises(Exception, match=r"modules_to_save=\[\"score\"\] needs PEFT 0\.17\.0 or later"):
        fit_config(_cfg(modules_to_save=["score"]), "0.13.2")
    assert fit_config(_cfg(modules_to_save=["score"]), "0.17.1").config["modules_to_save"] == ["score"]


def test_exact_release_keeps_what_it_knows() -> None:
    fit = fit_config(_cfg(), "0.17.1")
    assert fit.config["modules_to_save"] is None and "peft_version" not in fit.config
    assert "modules_to_save" not in fit_config(_cfg(), "0.14.0").config
    kept = fit_config(_cfg(), "0.21.2", keep_records=True)
    assert kept.config == _cfg() and not kept.removed


def test_unknown_keys_are_left_out_with_a_warning() -> None:
    fit = fit_config(_cfg(my_note="x"))
    assert "my_note" not in fit.config and "no PEFT release" in fit.warnings[0]
    assert "my_note" not in fit_config(_cfg(my_note="x"), "0.10.0").config


def test_a_bool_is_not_an_int_default() -> None:
    with pytest.raises(Exception, match="needs PEFT"):
        fit_config(_cfg(modules_to_save=False), "0.10.0")


# --- every writer ------------------------------------------------------------------------------


WRITERS: dict[str, list[str]] = {
    "init-average": ["init", "{fx}/causal", "--mode", "average"],
    "init-exact": ["init", "{fx}/causal", "--mode", "exact", "--task", "2", "--target-tasks", "2"],
    "init-shared": ["init", "{fx}/seq2seq", "--mode", "shared", "--seed", "0"],
    "init-bin": ["init", "{fx}/causal_bin", "--mode", "exact", "--task", "1"],
    "tasks": ["tasks", "{fx}/causal", "--select", "2,0"],
    "rerank": ["rerank", "{fx}/causal", "--num-ranks", "3"],
    "convert": ["convert", "{fx}/causal_bin"],
    "export-prompt": ["export-prompt", "{fx}/causal", "--task", "1"],
    "export-encoder": ["export-prompt", "{fx}/seq2seq", "--task", "0", "--encoder-only"],
    "compat": ["compat", "{fx}/causal", "--peft", "0.10.0"],
    "compat-seq2seq": ["compat", "{fx}/seq2seq", "--peft", "0.13.2"],
}


def _write_all(root: Path, extra: list[str]) -> dict[str, Path]:
    out = {}
    for name, argv in WRITERS.items():
        folder = root / name
        line = [a.replace("{fx}", str(FIXTURES)) for a in argv] + ["--out", str(folder)]
        if argv[0] != "compat":
            line += extra
        res = run_cli(*line)
        assert res.exit_code == 0, f"{name}: {res.output}{res.stderr}"
        out[name] = folder
    return out


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _write_all(tmp_path_factory.mktemp("writers"), [])


def test_every_writer_writes_keys_every_release_knows(written: dict[str, Path]) -> None:
    for name, folder in written.items():
        cfg = json.loads((folder / "adapter_config.json").read_text())
        for release in releases():
            unknown = set(cfg) - set(fields(release, cfg["peft_type"]))
            assert not unknown, f"{name}: PEFT {release} does not know {unknown}"


def test_every_writer_loads_in_this_peft_without_warning(written: dict[str, Path]) -> None:
    for name, folder in written.items():
        a = peft_load.load(folder, "from_pretrained")
        b = peft_load.load(folder, "config")
        assert a["ok"] and b["ok"], f"{name}: {a['error'] or b['error']}"
        assert a["warnings"] == [] and b["warnings"] == [], f"{name}: {a['warnings'] + b['warnings']}"
        assert a["prompts"] == b["prompts"], name
    # compat changes no prompt; tasks and export-prompt keep the source's bitwise
    source = peft_load.load(FIXTURES / "causal", "from_pretrained")["prompts"]
    assert peft_load.load(written["compat"], "config")["prompts"] == source
    assert peft_load.load(written["tasks"], "config")["prompts"] == [source[2], source[0]]
    assert peft_load.load(written["export-prompt"], "config")["prompts"] == [source[1]]


@pytest.mark.parametrize("release", ["0.10.0", "0.14.0", "0.17.1", "0.21.2"])
def test_peft_compat_on_every_writer(tmp_path: Path, release: str) -> None:
    folders = _write_all(tmp_path, ["--peft-compat", release])
    for name, folder in folders.items():
        cfg = json.loads((folder / "adapter_config.json").read_text())
        assert not set(cfg) - set(fields(release, cfg["peft_type"])), name
        assert "peft_version" not in cfg or name.startswith("compat"), name
        if release == "0.17.1" and not name.startswith("compat"):
            assert "modules_to_save" in cfg, name  # known there: kept as PEFT 0.17.1 writes it


def test_peft_compat_refuses_a_value_the_release_lacks(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(FIXTURES / "causal", src)
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["modules_to_save"] = ["score"]
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    for argv in (
        ["init", src, "--mode", "average"],
        ["tasks", src, "--select", "0"],
        ["rerank", src, "--num-ranks", "1"],
        ["convert", src],
    ):
        res = run_cli(*argv, "--out", tmp_path / "out", "--peft-compat", "0.13.2")
        assert res.exit_code == 1, res.output
        assert res.stderr.count("\n") == 1 and "needs PEFT 0.17.0 or later" in res.stderr, res.stderr
        assert not (tmp_path / "out").exists()
    # export-prompt takes over only the fields a plain prompt has (not modules_to_save)
    assert (
        run_cli("export-prompt", src, "--task", "0", "--out", tmp_path / "pt", "--peft-compat", "0.13.2").exit_code == 0
    )
    res = run_cli("compat", src, "--peft", "0.13", "--out", tmp_path / "out")
    assert res.exit_code == 1 and "needs PEFT 0.17.0 or later" in res.stderr
    # by default it is kept, with a warning
    res = run_cli("tasks", src, "--select", "0", "--out", tmp_path / "kept")
    assert res.exit_code == 0 and "modules_to_save" in res.stderr
    assert json.loads((tmp_path / "kept" / "adapter_config.json").read_text())["modules_to_save"] == ["score"]


def test_peft_compat_unknown_release_is_a_usage_error(tmp_path: Path) -> None:
    res = run_cli("init", FIXTURES / "causal", "--mode", "average", "--out", tmp_path / "o", "--peft-compat", "0.9")
    assert res.exit_code == 2 and "0.10.0" in res.stderr


# --- compat ------------------------------------------------------------------------------------


def test_compat_copies_weights_and_reports(tmp_path: Path) -> None:
    res = run_cli("compat", FIXTURES / "causal_bin", "--peft", "0.10.0", "--out", tmp_path / "c", "--json")
    assert res.exit_code == 0, res.stderr
    data = json.loads(res.stdout)
    assert (tmp_path / "c" / "adapter_model.bin").read_bytes() == (
        FIXTURES / "causal_bin" / "adapter_model.bin"
    ).read_bytes()
    assert data["weights_sha256"] == data["source_sha256"] and data["changed"]
    assert [r["key"] for r in data["removed"]] == ["modules_to_save", "peft_version"]
    before = json.loads((FIXTURES / "causal_bin" / "adapter_config.json").read_text())
    after = json.loads((tmp_path / "c" / "adapter_config.json").read_text())
    assert after == {k: v for k, v in before.items() if k not in ("modules_to_save", "peft_version")}
    assert sorted(data["kept"]) == sorted(after)
    # no overwrite without --force; never into the source
    res = run_cli("compat", FIXTURES / "causal_bin", "--peft", "0.10.0", "--out", tmp_path / "c")
    assert res.exit_code == 1 and "--force" in res.stderr
    assert (
        run_cli("compat", FIXTURES / "causal_bin", "--peft", "0.10.0", "--out", tmp_path / "c", "--force").exit_code
        == 0
    )
    res = run_cli("compat", FIXTURES / "causal", "--peft", "0.10.0", "--out", FIXTURES / "causal", "--force")
    assert res.exit_code == 1 and "source" in res.stderr


@pytest.mark.parametrize("missing", [("num_ranks",), ("num_tasks",), ("num_ranks", "num_tasks")])
@pytest.mark.parametrize("trap", [False, True])
def test_compat_writes_what_peft_needs_to_load_the_folder(tmp_path: Path, missing: tuple[str, ...], trap: bool) -> None:
    """A config without num_tasks or num_ranks (PEFT takes 1, so loading fails with a size mismatch)
    is a validate warning naming the fix, and compat writes the count from the tensors; PEFT's
    source-to-target init (which re-reads its source file on every load, FileNotFoundError
    elsewhere) becomes RANDOM with a null path. PEFT then loads it, with the source's prompts."""
    source = tmp_path / "a"
    shutil.copytree(FIXTURES / "causal", source)
    config = json.loads((source / "adapter_config.json").read_text())
    for key in missing:
        del config[key]
    if trap:
        config.update(prompt_tuning_init="AVERAGE_SOURCE_TASKS", prompt_tuning_init_state_dict_path="/gone/s.pt")
    (source / "adapter_config.json").write_text(json.dumps(config))
    assert not peft_load.load(source, "from_pretrained")["ok"]
    report = json.loads(run_cli("validate", source, "--json").stdout)
    warned = {f["field"] for f in report["findings"] if f["code"] == "missing-field"}
    assert report["valid"] and warned == set(missing)
    res = run_cli("compat", source, "--peft", "0.21.2", "--out", tmp_path / "c", "--json")
    assert res.exit_code == 0, res.stderr
    data = json.loads(res.stdout)
    want = {"num_tasks": 3, "num_ranks": 2}
    expected = {k: want[k] for k in missing}
    if trap:
        expected |= {"prompt_tuning_init": "RANDOM", "prompt_tuning_init_state_dict_path": None}
    assert {c["key"]: c["value"] for c in data["set"]} == expected and data["changed"]
    loaded = peft_load.load(tmp_path / "c", "from_pretrained")
    assert loaded["ok"], loaded["error"]
    assert loaded["prompts"] == peft_load.load(FIXTURES / "causal", "from_pretrained")["prompts"]
    assert json.loads(run_cli("validate", tmp_path / "c", "--json").stdout)["findings"] == []
    # a planned target config without num_ranks: PEFT's init would build rank 1 and fail to copy rank 2
    del config["prompt_tuning_init_state_dict_path"]
    config.update(num_tasks=1, prompt_tuning_init="AVERAGE_SOURCE_TASKS")
    config.pop("num_ranks", None)
    (tmp_path / "t.json").write_text(json.dumps(config))
    plan = run_cli("validate", FIXTURES / "causal", "--against", tmp_path / "t.json", "--json")
    assert plan.exit_code == 1
    codes = [(f["code"], f["field"]) for f in json.loads(plan.stdout)["findings"] if f["level"] == "error"]
    assert codes == [("target-mismatch", "target num_ranks")]


def test_compat_of_a_prompt_tuning_adapter_and_refusals(tmp_path: Path) -> None:
    assert (
        run_cli(
            "export-prompt", FIXTURES / "causal", "--task", "0", "--out", tmp_path / "pt", "--peft-compat", "0.21.2"
        ).exit_code
        == 0
    )
    res = run_cli("compat", tmp_path / "pt", "--peft", "0.13.2", "--out", tmp_path / "pt13")
    assert res.exit_code == 0, res.stderr
    assert "modules_to_save" not in json.loads((tmp_path / "pt13" / "adapter_config.json").read_text())
    lora = tmp_path / "lora"
    shutil.copytree(tmp_path / "pt", lora)
    cfg = json.loads((lora / "adapter_config.json").read_text())
    cfg["peft_type"] = "LORA"
    (lora / "adapter_config.json").write_text(json.dumps(cfg))
    res = run_cli("compat", lora, "--peft", "0.13.2", "--out", tmp_path / "x")
    assert res.exit_code == 1 and res.stderr.count("\n") == 1 and not (tmp_path / "x").exists()
    res = run_cli(
        "compat", FIXTURES / "causal" / "adapter_model.safetensors", "--peft", "0.13.2", "--out", tmp_path / "x"
    )
    assert res.exit_code == 0  # the weights file of an adapter folder: its config is found beside it
    bare = tmp_path / "bare.safetensors"
    shutil.copy(FIXTURES / "causal" / "adapter_model.safetensors", bare)
    res = run_cli("compat", bare, "--peft", "0.13.2", "--out", tmp_path / "y")
    assert res.exit_code == 1 and "no adapter_config.json" in res.stderr


# --- an old PEFT release, in its own environment -------------------------------------------------


@pytest.mark.skipif(not OLD_PYTHON, reason="set MPT_TOOLS_OLD_PEFT_PYTHON to an old PEFT venv's python")
def test_old_peft_loads_what_mpt_tools_writes(tmp_path: Path, written: dict[str, Path]) -> None:
    assert OLD_PYTHON is not None
    old = subprocess.run(
        [OLD_PYTHON, "-c", "import peft; print(peft.__version__)"], capture_output=True, text=True, check=True
    ).stdout.strip()
    exact = _write_all(tmp_path, ["--peft-compat", old])
    folders = {**{f"{k}": v for k, v in written.items()}, **{f"{k}@{old}": v for k, v in exact.items()}}
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", PYTHONNOUSERSITE="1")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [OLD_PYTHON, str(ROOT / "tests" / "peft_load.py"), *map(str, folders.values())],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(folders)
    for (name, folder), got in zip(folders.items(), results, strict=True):
        assert got["peft"] == old
        here = peft_load.load(folder, "from_pretrained")["prompts"]
        for route, outcome in got["routes"].items():
            assert outcome["ok"], f"{name} in PEFT {old} ({route}): {outcome['error']}"
            assert outcome["prompts"] == here, f"{name} in PEFT {old} ({route}): prompts differ"
            if "@" in name:  # written for exactly this release: not even a warning
                assert not [w for w in outcome["warnings"] if "nexpected" in w], f"{name}: {outcome['warnings']}"


def test_validate_warns_of_a_key_no_release_knows(tmp_path: Path) -> None:
    """A tester's finding: validate said nothing of a key no PEFT release knows (``my_extra``),
    which PEFT before 0.14 refuses and every writer then drops with a warning."""
    source = tmp_path / "a"
    shutil.copytree(FIXTURES / "causal", source)
    config = json.loads((source / "adapter_config.json").read_text())
    (source / "adapter_config.json").write_text(json.dumps({**config, "my_extra": [1, 2]}))
    report = json.loads(run_cli("validate", source, "--json").stdout)
    assert report["valid"] and [(f["code"], f["field"], f["found"]) for f in report["findings"]] == [
        ("unknown-key", "my_extra", "[1, 2]")
    ]
    assert "before 0.14.0 refuse" in report["findings"][0]["message"]
    assert json.loads(run_cli("validate", FIXTURES / "causal", "--json").stdout)["findings"] == []
