"""Every command's ``--json`` output has exactly the keys of its TypedDict in ``mpt_tools.results``.

Each command runs on the shipped fixtures (valid and invalid sources, a differing diff, a failing
verify, push --dry-run of an init output, and, against the fake Hub, a Hub source and real pushes);
its JSON must have the command's ``schema``, every required key and no other, recursively through
the nested items (findings, files, tensors, tasks, checks, ...), with values of the declared kinds.
The README's generated command reference must list the same keys.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import types
import typing
from pathlib import Path
from typing import Any

import pytest
from conftest import FIXTURES, ROOT, run_cli, write_random_source

from mpt_tools.cli import cli
from mpt_tools.results import SCHEMAS, AuditRow, HubInfo, InitResult, schema_id

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hubserver import FakeHub, isolate_hf_environment, use_endpoint

NONE = type(None)

# id: (expected exit status, argv); {fx} is fixtures/, {tmp} a scratch folder shared by the runs,
# which go in this order (verify, diff and push read what init, rerank and convert wrote).
CASES: dict[str, tuple[int, list[str]]] = {
    "validate": (0, ["validate", "{fx}/causal"]),
    "validate-invalid": (1, ["validate", "{fx}/causal", "--num-tasks", "5"]),
    "inspect": (0, ["inspect", "{fx}/causal"]),
    "inspect-similarity-plot": (0, ["inspect", "{fx}/causal", "--similarity", "--plot", "{tmp}/similarity.png"]),
    "inspect-pickle": (0, ["inspect", "{fx}/causal_bin"]),
    "inspect-bare-file": (0, ["inspect", "{tmp}/bare.safetensors", "--no-norms"]),
    "inspect-invalid": (1, ["inspect", "{fx}/causal", "--num-tasks", "5", "--similarity"]),
    "init": (0, ["init", "{fx}/causal", "--mode", "average", "--out", "{tmp}/average"]),
    "validate-against": (
        0,
        ["validate", "{fx}/causal", "--against", "{tmp}/average", "--mode", "exact", "--task", "1"],
    ),
    "init-exact": (
        0,
        ["init", "{fx}/causal", "--mode", "exact", "--task", "2", "--target-tasks", "3", "--out", "{tmp}/e"],
    ),
    "init-shared": (0, ["init", "{fx}/seq2seq", "--mode", "shared", "--seed", "0", "--out", "{tmp}/shared"]),
    "init-verify": (0, ["init", "{fx}/causal_bf16", "--mode", "average", "--out", "{tmp}/verified", "--verify"]),
    "tasks": (0, ["tasks", "{fx}/causal", "--select", "2,0,0", "--out", "{tmp}/tasks"]),
    "rerank-down": (0, ["rerank", "{fx}/causal", "--num-ranks", "1", "--out", "{tmp}/rank1"]),
    "rerank-up": (0, ["rerank", "{fx}/causal", "--num-ranks", "4", "--out", "{tmp}/rank4"]),
    "convert-cast": (0, ["convert", "{fx}/causal", "--out", "{tmp}/bf16", "--dtype", "bfloat16"]),
    "convert-file": (0, ["convert", "{fx}/causal_bin/adapter_model.bin", "--out", "{tmp}/converted.safetensors"]),
    "export-prompt": (0, ["export-prompt", "{fx}/causal", "--task", "1", "--out", "{tmp}/prompt"]),
    "export-prompt-encoder": (
        0,
        ["export-prompt", "{fx}/seq2seq", "--task", "0", "--out", "{tmp}/enc", "--encoder-only"],
    ),
    "export": (0, ["export", "{fx}/causal", "--to", "trtllm", "--tasks", "2,0", "--out", "{tmp}/table"]),
    "pack": (0, ["pack", "--from", "{fx}/causal", "--tasks", "2,0", "--num-ranks", "1", "--out", "{tmp}/packed"]),
    "compat": (0, ["compat", "{fx}/causal", "--peft", "0.10.0", "--out", "{tmp}/compat"]),
    "compat-trap": (0, ["compat", "{tmp}/trap", "--peft", "0.21.2", "--out", "{tmp}/compat-trap"]),
    "compat-pickle": (0, ["compat", "{fx}/causal_bin", "--peft", "0.21.2", "--out", "{tmp}/compat-bin"]),
    "diff-identical": (0, ["diff", "{fx}/causal", "{fx}/causal"]),
    "diff-differing": (1, ["diff", "{fx}/causal", "{tmp}/rank1"]),
    "diff-dtypes": (1, ["diff", "{fx}/causal", "{tmp}/bf16"]),
    "diff-bare-file": (1, ["diff", "{fx}/causal", "{tmp}/converted.safetensors"]),
    "verify-source": (0, ["verify", "{fx}/causal", "--device", "cpu"]),
    "verify-target": (0, ["verify", "{tmp}/average", "--device", "cpu"]),
    "verify-failing": (1, ["verify", "{tmp}/average", "--device", "cpu", "--source", "{fx}/causal_bf16"]),
    "push-dry-run": (0, ["push", "{tmp}/average", "me/mpt-target", "--dry-run"]),
    "audit": (0, ["audit", "{fx}", "{tmp}/average", "--deep"]),  # JSON Lines: rows, then the summary
    "embed": (
        0,
        ["embed", "{fx}/causal", "--task", "1", "--text", "w1", "--base-model", "{tmp}/model16", "--out", "{tmp}/r.pt"],
    ),
}


# --- the check: keys (and kinds of values) against a type -----------------------------------------


def _scalar_ok(value: Any, tp: Any) -> bool:
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:  # JSON writes 1.0 as 1.0, but an int where a float is declared is still a number
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp is NONE:
        return value is None
    raise AssertionError(f"the test cannot check values of type {tp!r}")


def problems(value: Any, tp: Any, where: str, seen: dict[type, set[str]]) -> list[str]:
    """What is wrong with ``value`` as a ``tp``: missing or unknown keys of every TypedDict inside
    it, and values of the wrong kind. ``seen`` collects each TypedDict met, with the keys it had."""
    if tp is Any:
        return []
    if typing.is_typeddict(tp):
        if not isinstance(value, dict):
            return [f"{where}: expected an object ({tp.__name__}), got {value!r:.80}"]
        keys = set(value)
        seen.setdefault(tp, set()).update(keys)
        out = []
        missing = sorted(tp.__required_keys__ - keys)
        unknown = sorted(keys - tp.__required_keys__ - tp.__optional_keys__)
        if missing:
            out.append(f"{where}: missing {missing} (required by {tp.__name__})")
        if unknown:
            out.append(f"{where}: {unknown} are not keys of {tp.__name__}")
        hints = typing.get_type_hints(tp)
        for key in sorted(keys & set(hints)):
            out += problems(value[key], hints[key], f"{where}.{key}", seen)
        return out
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and NONE in args:
            return []
        options = [a for a in args if a is not NONE]
        assert len(options) == 1, f"{where}: the test only knows X | None unions, not {tp!r}"
        return problems(value, options[0], where, seen)
    if origin is list:
        if not isinstance(value, list):
            return [f"{where}: expected a list, got {value!r:.80}"]
        return [p for i, item in enumerate(value) for p in problems(item, args[0], f"{where}[{i}]", seen)]
    if origin is dict:
        if not isinstance(value, dict):
            return [f"{where}: expected an object, got {value!r:.80}"]
        return [p for k, item in value.items() for p in problems(item, args[1], f"{where}[{k!r}]", seen)]
    return [] if _scalar_ok(value, tp) else [f"{where}: expected {tp.__name__}, got {value!r:.80}"]


def check_output(command: str, stdout: str, seen: dict[type, set[str]] | None = None) -> dict[str, Any]:
    """The parsed JSON of ``mpt-tools COMMAND ... --json``, asserted to match the command's type
    (audit: JSON Lines, each row an AuditRow, the last line the summary)."""
    if command == "audit":
        *rows, last = stdout.splitlines()
        assert rows
        for i, line in enumerate(rows):
            row = json.loads(line)
            assert row["schema"] == "mpt-tools/audit-row/1"
            found = problems(row, AuditRow, f"audit row {i}", seen if seen is not None else {})
            assert not found, "\n".join(found)
        stdout = last
    data = json.loads(stdout)
    assert data["schema"] == schema_id(command)
    found = problems(data, SCHEMAS[command], command, seen if seen is not None else {})
    assert not found, "\n".join(found)
    return data


def typeddicts(tp: Any, out: set[type] | None = None) -> set[type]:
    """Every TypedDict reachable from ``tp`` (itself included)."""
    out = set() if out is None else out
    if typing.is_typeddict(tp):
        if tp in out:
            return out
        out.add(tp)
        for hint in typing.get_type_hints(tp).values():
            typeddicts(hint, out)
    for arg in typing.get_args(tp):
        typeddicts(arg, out)
    return out


# --- every command, locally ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run every case once, in order: id -> the CLI's result."""
    tmp = tmp_path_factory.mktemp("schemas")
    write_random_source(tmp / "bare.safetensors", n=3, t=4, r=2, d=8)
    from test_embed import tiny_model

    tiny_model(tmp / "model16", d=16)  # a GPT-2 shaped base model for the causal fixture (d = 16)
    shutil.copytree(FIXTURES / "causal", tmp / "trap")  # PEFT's init kept in its config: compat sets RANDOM
    config = json.loads((tmp / "trap" / "adapter_config.json").read_text())
    config.update(prompt_tuning_init="EXACT_SOURCE_TASK", prompt_tuning_init_state_dict_path="/gone/s.safetensors")
    (tmp / "trap" / "adapter_config.json").write_text(json.dumps(config))
    done: dict[str, Any] = {}
    with pytest.MonkeyPatch.context() as mp:  # what conftest's _isolate does for each test
        mp.setenv("HF_HOME", str(tmp / "hf_home"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("MPT_TOOLS_RAISE_UNEXPECTED", "1")
        for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "MPT_TOOLS_DEBUG"):
            mp.delenv(var, raising=False)
        for case, (_, argv) in CASES.items():
            args = [a.format(fx=FIXTURES, tmp=tmp) for a in argv]
            done[case] = run_cli(*args, "--json")
    return done


@pytest.mark.parametrize("case", list(CASES))
def test_json_keys_are_the_typeddicts(outputs: dict[str, Any], case: str) -> None:
    status, argv = CASES[case]
    result = outputs[case]
    assert result.exit_code == status, (result.exit_code, result.stderr)
    check_output(argv[0], result.stdout)


def test_the_runs_meet_every_type_and_optional_key(outputs: dict[str, Any]) -> None:
    """The cases above are enough: every nested type appears filled in (non-empty lists, non-null
    values) and every optional key is present at least once (init's push: see the Hub test)."""
    seen: dict[type, set[str]] = {}
    for case, (_, argv) in CASES.items():
        check_output(argv[0], outputs[case].stdout, seen)
    reachable = set().union(*(typeddicts(tp) for tp in SCHEMAS.values()))
    assert reachable - set(seen) == {HubInfo}, "no run has " + ", ".join(t.__name__ for t in reachable - set(seen))
    for tp, keys in seen.items():
        absent = tp.__optional_keys__ - keys - ({"push"} if tp is InitResult else set())
        assert not absent, f"no run has {tp.__name__}'s {sorted(absent)}"


def test_every_command_has_a_schema() -> None:
    assert set(SCHEMAS) == set(cli.commands)
    assert {argv[0] for _, argv in CASES.values()} == set(SCHEMAS)


# --- against the (fake) Hub: a Hub source, init --push and push -------------------------------------


def test_hub_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    isolate_hf_environment(monkeypatch, tmp_path / "hf_home")
    token = "hf_goodtoken"  # FakeHub's default user
    with FakeHub() as hub:
        use_endpoint(monkeypatch, hub.url)
        hub.add_repo("org/src", {p.name: p.read_bytes() for p in (FIXTURES / "causal").iterdir() if p.suffix != ".md"})
        seen: dict[type, set[str]] = {}
        result = run_cli("inspect", "org/src", "--json")
        assert result.exit_code == 0, result.stderr
        assert check_output("inspect", result.stdout, seen)["hub"] is not None
        out = tmp_path / "target"
        result = run_cli(
            "init", "org/src", "--mode", "average", "--out", out, "--push", "alice/t", "--token", token, "--json"
        )
        assert result.exit_code == 0, result.stderr
        assert check_output("init", result.stdout, seen)["push"]["commit"]
        result = run_cli("push", out, "alice/t2", "--token", token, "--json")
        assert result.exit_code == 0, result.stderr
        assert check_output("push", result.stdout, seen)["url"]
        assert HubInfo in seen and "push" in seen[InitResult]


# --- the README lists the same keys -------------------------------------------------------------------


def _split(text: str) -> list[str]:
    """Split at the commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "[{<"
        depth -= ch in "]}>"
        if ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    return [*parts, text[start:].strip()]


def parse_keys(text: str) -> dict[str, tuple[bool, Any]]:
    """``a, b?: [{c, d}], e: {KEY: {f}} | null, g?: <mpt-tools/x/1>`` -> {name: (optional, nested)}."""
    out = {}
    for entry in _split(text):
        name, _, value = entry.partition(":")
        optional = name.endswith("?")
        out[name.rstrip("?").strip()] = (optional, _parse_value(value.strip()) if value else None)
    return out


def _parse_value(value: str) -> Any:
    value = value.removesuffix(" | null")
    if value.startswith("<") and value.endswith(">"):
        return value[1:-1]  # another command's whole output
    if value.startswith("[") and value.endswith("]"):
        return _parse_value(value[1:-1])
    if value.startswith("{KEY: ") and value.endswith("}"):
        return _parse_value(value[len("{KEY: ") : -1])
    assert value.startswith("{") and value.endswith("}"), value
    return parse_keys(value[1:-1])


def key_tree(tp: Any, top: bool = True) -> Any:
    """The same tree from a TypedDict: keys, whether optional, and the nested TypedDict's tree
    (another command's result as its schema name)."""
    if typing.is_typeddict(tp):
        command = next((c for c, t in SCHEMAS.items() if t is tp), None)
        if command and not top:
            return schema_id(command)
        return {
            key: (key in tp.__optional_keys__, key_tree(hint, top=False))
            for key, hint in typing.get_type_hints(tp).items()
        }
    for arg in typing.get_args(tp):
        nested = key_tree(arg, top=False)
        if nested is not None:
            return nested
    return None


def test_readme_lists_the_keys_of_every_schema() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("<!-- cli-reference:start -->", 1)[1].split("<!-- cli-reference:end -->", 1)[0]
    lines = dict(re.findall(r"^JSON \(`(mpt-tools/[\w-]+/1)`\): `(.*)`$", block, flags=re.M))
    assert list(lines) == [schema_id(c) for c in SCHEMAS], "one JSON line per command, in order"
    for command, tp in SCHEMAS.items():
        assert parse_keys(lines[schema_id(command)]) == key_tree(tp), f"README's keys of {command} are stale"
    for command in SCHEMAS:  # and the help of every command is there
        assert f"#### `mpt-tools {command}`\n\n```text\nUsage: mpt-tools {command} [OPTIONS]" in block


@pytest.mark.parametrize("command", sorted(SCHEMAS))
def test_a_failing_command_prints_the_error_schema(tmp_path: Path, command: str) -> None:
    """Every command, failing on a missing source with --json: ``mpt-tools/error/1`` on stdout,
    matching :class:`~mpt_tools.results.ErrorResult`, and the one line on stderr."""
    from mpt_tools.results import ErrorResult

    missing = str(tmp_path / "missing.safetensors")
    out = str(tmp_path / "out")
    argv = {
        "init": ["init", missing, "--mode", "exact", "--out", out],
        "tasks": ["tasks", missing, "--select", "0", "--out", out],
        "rerank": ["rerank", missing, "--num-ranks", "1", "--out", out],
        "export-prompt": ["export-prompt", missing, "--task", "0", "--out", out],
        "export": ["export", missing, "--to", "peft", "--out", out],
        "pack": ["pack", missing, "--num-ranks", "1", "--task-type", "CAUSAL_LM", "--out", out],
        "convert": ["convert", missing, "--out", out],
        "compat": ["compat", missing, "--peft", "0.10.0", "--out", out],
        "diff": ["diff", missing, missing],
        "push": ["push", missing, "me/repo", "--dry-run"],
        "embed": ["embed", missing, "--task", "0", "--text", "x", "--base-model", missing, "--out", f"{out}.pt"],
    }.get(command, [command, missing])
    result = run_cli(*argv, "--json")
    assert result.exit_code == 1, result.stderr
    if command == "audit":  # audit goes on: the missing path is a row with its error, then the summary
        rows, summary = (json.loads(line) for line in result.stdout.splitlines())
        assert rows["error"] and summary["ok"] is False and summary["unreadable"] == 1
        assert len(result.stderr.strip().splitlines()) == 1
        return
    data = json.loads(result.stdout)
    assert data["schema"] == "mpt-tools/error/1" and data["command"] == command
    assert not problems(data, ErrorResult, command, {})
    assert len(result.stderr.strip().splitlines()) == 1
