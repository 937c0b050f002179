"""``audit`` (issue 14, item 3): every adapter under folders, in Hub repos and in a Hub author's
PEFT repos, one row each; header-only by default (locally and on the Hub, where a test counts the
bytes the server sends), values with --deep; JSON Lines, CSV, Markdown; exit 1 on any error; the
hostile corpus as rows; Ctrl-C prints the summary so far."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES, ROOT, run_cli, write_random_source

sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus import build_corpus
from hubserver import FakeHub, isolate_hf_environment, use_endpoint
from test_schemas import problems

from mpt_tools import audit_adapters
from mpt_tools.formats import from_numpy, safetensors_bytes
from mpt_tools.results import AuditRow, AuditSummary

MPT = "MULTITASK_PROMPT_TUNING"


def jsonl(text: str) -> tuple[list[dict], dict]:
    """Rows and summary of ``audit --json``, each checked against its TypedDict."""
    lines = [json.loads(line) for line in text.splitlines()]
    *rows, summary = lines
    for row in rows:
        assert row["schema"] == "mpt-tools/audit-row/1"
        assert not problems(row, AuditRow, "row", {})
    assert summary["schema"] == "mpt-tools/audit/1"
    assert not problems(summary, AuditSummary, "summary", {})
    return rows, summary


def copy_adapter(name: str, dest: Path) -> Path:
    shutil.copytree(FIXTURES / name, dest, ignore=shutil.ignore_patterns("README.md"))
    return dest


def lora_folder(dest: Path) -> Path:
    dest.mkdir(parents=True)
    (dest / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8}))
    weights = {"base_model.model.layer.lora_A.weight": from_numpy(np.zeros((8, 16), np.float32))}
    (dest / "adapter_model.safetensors").write_bytes(safetensors_bytes(weights))
    return dest


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A tree of experiments: adapters at several depths, named subfolders, a duplicate, a bare
    source, a .bin adapter, another PEFT type, a file that is not an adapter, a hidden folder."""
    root = tmp_path / "runs"
    copy_adapter("causal", root / "exp1" / "sources")
    copy_adapter("causal", root / "exp1" / "copy")  # identical weights
    copy_adapter("seq2seq", root / "exp2" / "seq2seq")
    copy_adapter("named", root / "exp3" / "multi")  # named adapters in subfolders
    copy_adapter("causal_bin", root / "exp4" / "bin")
    lora_folder(root / "exp5" / "lora")
    write_random_source(root / "bare.safetensors", n=3, t=4, r=2, d=8)
    (root / "model.safetensors").write_bytes(safetensors_bytes({"w": from_numpy(np.ones((2, 2), np.float32))}))
    (root / "notes.txt").write_text("not an adapter")
    copy_adapter("causal", root / ".hidden" / "skipped")
    return root


def test_finds_every_adapter_and_describes_it(tree: Path) -> None:
    result = run_cli("audit", str(tree), "--json")
    assert result.exit_code == 0, result.stderr
    rows, summary = jsonl(result.stdout)
    by = {Path(r["where"]).relative_to(tree).as_posix(): r for r in rows}
    named = sorted(p.parent.name for p in (FIXTURES / "named").rglob("adapter_config.json"))
    expected = {
        "bare.safetensors",
        "exp1/copy",
        "exp1/sources",
        "exp2/seq2seq",
        "exp4/bin",
        "exp5/lora",
        *(f"exp3/multi/{n}" if n != "named" else "exp3/multi" for n in named),
    }
    assert set(by) == expected  # not model.safetensors, notes.txt or .hidden
    src = by["exp1/sources"]
    assert (src["peft_type"], src["task_type"], src["dtype"]) == (MPT, "CAUSAL_LM", "float32")
    assert (src["num_tasks"], src["total_virtual_tokens"], src["num_ranks"], src["token_dim"]) == (3, 4, 2, 16)
    assert src["valid"] is True and src["error"] is None
    assert src["bytes"] == (FIXTURES / "causal" / "adapter_model.safetensors").stat().st_size
    assert src["serving_hazard"] is True  # an MPT folder: prompt-tuning servers would serve P*
    assert (
        src["base_model"]
        == json.loads((FIXTURES / "causal" / "adapter_config.json").read_text())["base_model_name_or_path"]
    )
    assert src["sha256"] is None  # header only: the weights are not hashed without --deep
    s2s = by["exp2/seq2seq"]
    assert (
        s2s["total_virtual_tokens"]
        == 2 * json.loads((FIXTURES / "seq2seq" / "adapter_config.json").read_text())["num_virtual_tokens"]
    )
    lora = by["exp5/lora"]
    assert (lora["peft_type"], lora["valid"], lora["error"], lora["findings"]) == ("LORA", None, None, [])
    assert summary["other_types"] == {"LORA": 1}
    binrow = by["exp4/bin"]
    assert binrow["valid"] is None and any("--deep" in n for n in binrow["notes"])
    assert summary["skipped"] == {}
    assert summary["ok"] is True and summary["adapters"] == len(rows)
    assert summary["duplicates"] == []  # needs the hashes of --deep locally


def test_peft_releases_that_load_each_config(tmp_path: Path) -> None:
    """A PEFT-0.21-written config (modules_to_save, peft_version) loads from 0.14 on; what
    mpt-tools writes loads in every release."""
    copy_adapter("causal", tmp_path / "peft")
    init = run_cli("init", str(FIXTURES / "causal"), "--mode", "average", "--out", str(tmp_path / "ours"))
    assert init.exit_code == 0
    rows, _ = jsonl(run_cli("audit", str(tmp_path), "--json").stdout)
    by = {Path(r["where"]).name: r for r in rows}
    assert (by["peft"]["peft_oldest"], by["peft"]["peft_newest"]) == ("0.14.0", "0.21.2")
    assert (by["ours"]["peft_oldest"], by["ours"]["peft_newest"]) == ("0.10.0", "0.21.2")


def test_default_reads_no_tensor_data(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --deep only configs and headers are read: reading any tensor bytes would fail."""
    import mpt_tools.formats as formats

    def no_reads(*args: object, **kwargs: object) -> int:
        raise AssertionError("tensor data read")

    monkeypatch.setattr(formats, "_read_fd", no_reads)
    result = audit_adapters([str(tree)])
    assert result["ok"], [r["error"] for r in result["rows"] if r["error"]]
    assert result["mpt"] >= 6


def test_deep_checks_values_and_finds_duplicates(tree: Path) -> None:
    nan = copy_adapter("causal", tree / "exp6" / "nan")
    from safetensors.numpy import load_file, save_file

    tensors = load_file(nan / "adapter_model.safetensors")
    tensors[next(k for k in tensors if "cols" in k)][1, 0, 0] = np.nan
    save_file(tensors, nan / "adapter_model.safetensors")
    shallow, _ = jsonl(run_cli("audit", str(tree), "--json").stdout)
    assert next(r for r in shallow if r["where"].endswith("nan"))["valid"] is True  # values not read
    result = run_cli("audit", str(tree), "--deep", "--json")
    assert result.exit_code == 1
    rows, summary = jsonl(result.stdout)
    by = {Path(r["where"]).relative_to(tree).as_posix(): r for r in rows}
    assert by["exp6/nan"]["valid"] is False and "non-finite" in by["exp6/nan"]["findings"]
    assert by["exp4/bin"]["valid"] is True and by["exp4/bin"]["num_tasks"] == 3  # .bin read with --deep
    weights = {tuple(g["adapters"]) for g in summary["duplicates"] if g["kind"] == "weights"}
    assert (str(tree / "exp1/copy"), str(tree / "exp1/sources")) in weights
    assert by["exp1/sources"]["sha256"] == by["exp1/copy"]["sha256"] is not None
    shared = [set(g["adapters"]) for g in summary["duplicates"] if g["kind"] == "shared_prompt"]
    assert any({str(tree / "exp1/sources"), str(tree / "exp6/nan")} <= g for g in shared)  # same P*, other factors
    assert summary["invalid"] == 1 and summary["ok"] is False
    assert "error: 1 of" in result.stderr


def test_table_csv_and_markdown(tree: Path) -> None:
    table = run_cli("audit", str(tree))
    assert table.exit_code == 0
    lines = table.stdout.splitlines()
    header = ["where", "type", "N", "T", "r", "d", "dtype", "valid", "findings", "PEFT", "hazard", "dup"]
    assert lines[0].split() == header
    assert all(line.split()[1] in ("MPT", "LORA") for line in lines[1:8])
    assert "adapter(s)" in lines[-1] and "MPT" in lines[-1]
    # the table's dashes and its hazard column are explained under it
    assert f"note: {tree / 'exp4' / 'bin'}: weights not read (.bin: --deep reads them)" in lines
    assert any(line.startswith("note: hazard P*: a prompt-tuning server") for line in lines)
    rows = list(csv.DictReader(io.StringIO(run_cli("audit", str(tree), "--csv").stdout)))
    assert {r["peft_type"] for r in rows} == {MPT, "LORA"}
    assert all(r["valid"] in ("true", "false", "") for r in rows)
    markdown = run_cli("audit", str(tree), "--markdown").stdout.splitlines()
    assert markdown[0].startswith("| where |") and markdown[1].startswith("|---|")
    assert len([m for m in markdown if m.startswith("| `")]) == len(rows)
    # what the text view explains under its table, Markdown lists under its own
    assert [f"- {line}" for line in lines[len(rows) + 1 : -1]] == markdown[len(rows) + 3 : -2]
    assert f"- note: {tree / 'exp4' / 'bin'}: weights not read (.bin: --deep reads them)" in markdown
    deep = run_cli("audit", str(tree), "--deep", "--markdown").stdout.splitlines()
    assert any(m.startswith("- w1: identical weights: ") for m in deep), deep  # the dup column's labels
    assert run_cli("audit", str(tree), "--json", "--csv").exit_code == 2
    assert run_cli("audit").exit_code == 2


def test_markdown_holds_a_name_with_backticks_and_pipes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tester's finding: a folder named with a backtick broke the table's code span. The span's
    fence is one backtick longer than the name's longest run; a pipe is escaped."""
    monkeypatch.chdir(tmp_path)
    for name in ("back`tick", "a|b", "`edge"):
        shutil.copytree(FIXTURES / "causal", tmp_path / "runs" / name)
    rows = [m for m in run_cli("audit", "runs", "--markdown").stdout.splitlines() if m.startswith("| `")]
    assert [row.split(" | ")[0] for row in rows] == ["| ``runs/`edge``", "| `runs/a\\|b`", "| ``runs/back`tick``"]


def test_stale_staging_is_listed(tree: Path) -> None:
    leftover = tree / "exp1" / ".sources.mpt-tools-999999999-0123456789ab.tmp"
    leftover.mkdir()
    past = time.time() - 3600
    os.utime(leftover, (past, past))
    _, summary = jsonl(run_cli("audit", str(tree), "--json").stdout)
    assert summary["stale_staging"] == [str(leftover)]
    assert "interrupted mpt-tools run" in run_cli("audit", str(tree)).stdout


def test_empty_folder_and_missing_path_are_rows_with_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = run_cli("audit", str(tmp_path / "empty"), str(tmp_path / "missing.safetensors"), "--json")
    assert result.exit_code == 1
    rows, summary = jsonl(result.stdout)
    assert len(rows) == 2 and all(r["valid"] is False and r["error"] for r in rows)
    assert summary["unreadable"] == 2
    assert len(result.stderr.strip().splitlines()) == 1


def test_hostile_corpus_is_one_row_per_case(tmp_path: Path) -> None:
    """Every case of the corpus, audited in one run: a row with its error (the LoRA-typed config
    is another adapter type, listed and not checked), never a traceback, nothing written."""
    root = tmp_path / "corpus"
    cases = build_corpus(root)
    before = sorted(str(p) for p in root.rglob("*"))
    result = subprocess.run(
        [sys.executable, "-m", "mpt_tools", "audit", str(root), "--deep", "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    rows, summary = jsonl(result.stdout)
    assert sorted(str(p) for p in root.rglob("*")) == before
    checked = 0
    for case in cases:
        if not case.path.exists() and not case.path.is_symlink():
            continue  # a missing path is not in the tree (tested above)
        mine = [r for r in rows if r["where"] == str(case.path) or r["where"].startswith(str(case.path) + os.sep)]
        if case.name in ("content-no-mpt-keys", "dir-empty"):  # inside a tree these are not adapters
            assert not mine
            continue
        assert mine, f"{case.name}: no row"
        for row in mine:
            if row["peft_type"] not in (MPT, None):
                continue
            assert row["valid"] is False and row["error"], f"{case.name}: {row}"
            assert "internal error" not in row["error"], f"{case.name}: {row['error']}"
        checked += 1
    assert checked >= 100 and summary["adapters"] == len(rows)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_prints_the_summary_so_far(tmp_path: Path, sig: signal.Signals) -> None:
    root = tmp_path / "many"
    for i in range(1500):
        copy_adapter("causal", root / f"a{i:04d}")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mpt_tools", "audit", str(root), "--json", "--jobs", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        # a shell's background job inherits SIGINT ignored, and mpt-tools keeps an ignored signal
        # ignored: give the child the default, as a terminal does
        preexec_fn=lambda: signal.signal(sig, signal.SIG_DFL),
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()  # rows are printed as they are done
    assert json.loads(first)["schema"] == "mpt-tools/audit-row/1"
    proc.send_signal(sig)
    rest = proc.stdout.read()  # not communicate(): it reads the pipe itself, past what readline buffered
    assert proc.stderr is not None
    err = proc.stderr.read()
    proc.wait(timeout=120)
    lines = [json.loads(x) for x in (first + rest).splitlines()]
    summary = lines[-1]
    assert summary["schema"] == "mpt-tools/audit/1" and summary["interrupted"] == sig.name
    assert summary["adapters"] == len(lines) - 1 < 1500
    assert proc.returncode == 128 + sig
    assert err.strip().splitlines() == [f"error: interrupted by {sig.name}; nothing was written"]


# --- the Hub -------------------------------------------------------------------------------------


def big_adapter(seed: int, n: int = 8, t: int = 100, d: int = 2048) -> dict[str, bytes]:
    """An adapter whose weights (~0.9 MB) are far over huggingface_hub's 100 kB first header read."""
    rng = np.random.default_rng(seed)
    tensors = {
        "prompt_embeddings": rng.standard_normal((t, d), dtype=np.float32),
        "prefix_task_cols": rng.standard_normal((n, t, 1), dtype=np.float32),
        "prefix_task_rows": rng.standard_normal((n, 1, d), dtype=np.float32),
    }
    config = json.loads((FIXTURES / "causal" / "adapter_config.json").read_text())
    config.update(num_virtual_tokens=t, token_dim=d, num_tasks=n, num_ranks=1, num_transformer_submodules=1)
    return {
        "adapter_config.json": json.dumps(config).encode(),
        "adapter_model.safetensors": safetensors_bytes({k: from_numpy(v) for k, v in tensors.items()}),
    }


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    isolate_hf_environment(monkeypatch, tmp_path / "hf_home")
    with FakeHub() as server:
        use_endpoint(monkeypatch, server.url)
        server.add_repo("org/one", big_adapter(0))
        two = {f"task-{i}/{k}": v for i in range(2) for k, v in big_adapter(1).items()}  # identical weights
        server.add_repo("org/two", two)
        lora = lora_folder(tmp_path / "lora")
        server.add_repo("org/lora", {p.name: p.read_bytes() for p in lora.iterdir()})
        server.add_repo("org/readme-only", {"README.md": b"# not an adapter"})
        server.add_repo("someone/else", big_adapter(2))
        yield server


def test_author_audit_reads_headers_only(hub: FakeHub) -> None:
    hub.clear_requests()
    result = run_cli("audit", "--author", "org", "--json")
    assert result.exit_code == 0, result.stderr
    rows, summary = jsonl(result.stdout)
    wheres = sorted(r["where"] for r in rows)
    assert [w.split("@")[0] for w in wheres] == ["hf://org/lora", "hf://org/one", "hf://org/two", "hf://org/two"]
    assert all(r["origin"] == "hub" for r in rows)
    one = next(r for r in rows if r["where"].startswith("hf://org/one"))
    assert (one["num_tasks"], one["total_virtual_tokens"], one["token_dim"], one["valid"]) == (8, 100, 2048, True)
    weights = big_adapter(0)["adapter_model.safetensors"]
    assert one["bytes"] == len(weights)
    import hashlib

    assert one["sha256"] == hashlib.sha256(weights).hexdigest()  # the Hub's LFS sha256, nothing downloaded
    assert summary["duplicates"] == [
        {
            "kind": "weights",
            "sha256": hashlib.sha256(big_adapter(1)["adapter_model.safetensors"]).hexdigest(),
            "adapters": sorted(r["where"] for r in rows if r["where"].startswith("hf://org/two")),
        }
    ]
    # no weights downloaded: every weights request is a ranged header read, and the server sent
    # less than one weights file for all three MPT adapters together
    gets = [r for r in hub.requests if "adapter_model.safetensors" in r.path]
    assert gets and all(r.headers.get("range") == "bytes=0-100000" for r in gets)
    assert hub.bytes_sent < len(weights)  # three adapters: 2.6 MB of weights
    assert len(hub.requests) <= 2 + 4 * 3  # listing + per repo: info, config, header


def test_repo_arguments_and_subfolders(hub: FakeHub) -> None:
    rows, _ = jsonl(run_cli("audit", "org/one", "hf://org/two/task-1", "--json").stdout)
    assert sorted(r["where"].rsplit("/", 1)[-1] if "task" in r["where"] else "one" for r in rows) == ["one", "task-1"]


def test_an_adapter_named_twice_is_one_row(hub: FakeHub, tmp_path: Path) -> None:
    """A tester's finding: ``audit runs runs/ runs/a`` (and ``org/x hf://org/x@main``) gave a row per
    naming, each the duplicate of the others. Each adapter is audited once, as first named."""
    runs = tmp_path / "runs"
    shutil.copytree(FIXTURES / "causal", runs / "a")
    (tmp_path / "link").symlink_to(runs / "a")
    rows, summary = jsonl(run_cli("audit", runs, f"{runs}/", runs / "a", tmp_path / "link", "--deep", "--json").stdout)
    assert [r["where"] for r in rows] == [str(runs / "a")] and summary["duplicates"] == []
    rows, summary = jsonl(run_cli("audit", "org/one", "hf://org/one@main", "hf://org/one", "--json").stdout)
    assert len(rows) == 1 and summary["duplicates"] == [] and summary["adapters"] == 1
    rows, _ = jsonl(run_cli("audit", "org/two", "hf://org/two/task-1", "--json").stdout)
    assert sorted(r["where"].rsplit("/", 1)[-1] for r in rows) == ["task-0", "task-1"]


def test_an_author_with_no_adapters_and_a_mistyped_folder_say_so(hub: FakeHub, tmp_path: Path, monkeypatch) -> None:
    """A tester's findings: ``--author nobody`` printed "0 adapter(s)" and exit 0; ``audit myruns/exp1``
    (a mistyped local folder) said "repository not found" without the hint validate gives."""
    result = run_cli("audit", "--author", "nobody-here", "--json")
    rows, _ = jsonl(result.stdout)
    assert result.exit_code == 1 and [r["where"] for r in rows] == ["--author nobody-here"]
    assert "no PEFT model repos" in rows[0]["error"]
    monkeypatch.chdir(tmp_path)
    rows, _ = jsonl(run_cli("audit", "myruns/exp1", "--json").stdout)
    assert "there is no local file or folder 'myruns/exp1' either" in rows[0]["error"], rows[0]["error"]


def test_hub_errors_are_rows(hub: FakeHub) -> None:
    bad = big_adapter(3)
    bad["adapter_model.safetensors"] = b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}"
    hub.add_repo("org/bad", bad)
    result = run_cli("audit", "org/bad", "org/missing", "org/readme-only", "--json")
    assert result.exit_code == 1
    rows, summary = jsonl(result.stdout)
    errors = {r["where"].split("@")[0]: r["error"] for r in rows}
    assert "not valid JSON" in errors["hf://org/bad"]
    assert "not found" in errors["hf://org/missing"]
    assert "no adapter" in errors["hf://org/readme-only"]
    assert summary["unreadable"] == 3


def test_empty_files_on_the_hub_are_content_errors(hub: FakeHub) -> None:
    """A 0-byte file answers a range request with 416: the row said "cannot connect"; it names what
    is wrong with the file, as it would locally."""
    good = big_adapter(4)
    hub.add_repo("org/emptycfg", {**good, "adapter_config.json": b""})
    hub.add_repo("org/emptyweights", {**good, "adapter_model.safetensors": b""})
    rows, _ = jsonl(run_cli("audit", "org/emptycfg", "org/emptyweights", "--json").stdout)
    errors = {r["where"].split("@")[0]: r["error"] for r in rows}
    assert "not valid JSON" in errors["hf://org/emptycfg"], errors
    assert "0 bytes" in errors["hf://org/emptyweights"], errors
    assert not any("cannot connect" in e for e in errors.values())


def test_hub_deep_downloads_and_checks_values(hub: FakeHub) -> None:
    files = big_adapter(4)
    from safetensors.numpy import load, save

    tensors = load(files["adapter_model.safetensors"])
    tensors["prefix_task_rows"][2, 0, 5] = np.inf
    files["adapter_model.safetensors"] = save(tensors)
    hub.add_repo("org/inf", files)
    shallow, _ = jsonl(run_cli("audit", "org/inf", "--json").stdout)
    assert shallow[0]["valid"] is True
    result = run_cli("audit", "org/inf", "--deep", "--json")
    rows, _ = jsonl(result.stdout)
    assert rows[0]["valid"] is False and "non-finite" in rows[0]["findings"] and result.exit_code == 1
    assert rows[0]["prompt_sha256"] is not None


def test_offline_hub_audit_is_a_row(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run_cli("audit", "org/anything", "--json")
    rows, _ = jsonl(result.stdout)
    assert result.exit_code == 1 and "offline" in rows[0]["error"]
    # the row keeps the revision and subfolder asked for, and its error does not name the repo again
    result = run_cli("audit", "org/anything@v2", "hf://org/other/sub", "--json")
    rows, _ = jsonl(result.stdout)
    assert [r["where"] for r in rows] == ["hf://org/anything@v2", "hf://org/other/sub"]
    assert all(r["error"].startswith("listing a Hub repo and reading its files needs the network") for r in rows), rows


def test_an_mpt_folder_in_a_prefix_store_has_the_hazard_code(tmp_path: Path) -> None:
    """The serving-hazard warning of validate/inspect, in the row's codes: an MPT folder beside
    TGIS prefixes (decoder.pt folders) would be served as P* for every task."""
    store = tmp_path / "store"
    copy_adapter("causal", store / "mpt")
    (store / "prefix-a").mkdir()
    (store / "prefix-a" / "decoder.pt").write_bytes(b"")
    rows, _ = jsonl(run_cli("audit", str(store), "--json").stdout)
    assert [r["findings"] for r in rows] == [["serving-hazard"]] and rows[0]["valid"] is True


def test_hub_bare_tensor_file(hub: FakeHub) -> None:
    """A bare MPT safetensors file in a Hub repo (no config): a row from its header, and with
    --deep from the downloaded file (values checked, P* hashed)."""
    hub.add_repo("org/bare", {"sources.safetensors": big_adapter(5)["adapter_model.safetensors"]})
    shallow, _ = jsonl(run_cli("audit", "org/bare", "--json").stdout)
    deep, _ = jsonl(run_cli("audit", "org/bare", "--deep", "--json").stdout)
    for rows in (shallow, deep):
        assert len(rows) == 1 and rows[0]["where"].endswith("/sources.safetensors")
        assert (rows[0]["num_tasks"], rows[0]["token_dim"], rows[0]["valid"]) == (8, 2048, True)
    assert shallow[0]["prompt_sha256"] is None and deep[0]["prompt_sha256"] is not None


def test_a_signal_stops_an_audit_whose_repo_listing_never_answers(tmp_path: Path) -> None:
    """A tester's finding: with an endpoint that accepts and never answers, no signal stopped
    ``audit org/x`` (the listing pool's exit waited for its worker); only SIGKILL did."""
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "MPT_TOOLS_DEBUG")},
        "HF_ENDPOINT": f"http://127.0.0.1:{silent.getsockname()[1]}",
        "HF_HOME": str(tmp_path / "hf_home"),
    }
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mpt_tools", "audit", "org/x"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )
        conn, _ = silent.accept()  # the listing's request has arrived: it is waiting for an answer
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        conn.close()
    finally:
        silent.close()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted by SIGTERM" in err
