"""Record every user-visible output of ``mpt-tools`` and compare two recordings byte for byte.

A refactoring tool, not a pytest module: it proves that a change which should not touch any output
(moving modules around) indeed changes no byte that a user sees.

Usage::

    python tests/snapshot_outputs.py record --tree PATH --out FILE.json [--jobs N] [--work DIR] [--only REGEX]
    python tests/snapshot_outputs.py compare BEFORE.json AFTER.json

``record`` runs every command below as ``sys.executable -m mpt_tools ARGS...`` in a subprocess (stdin
closed) with the checkout ``PATH`` first on ``PYTHONPATH`` (it checks that ``mpt_tools`` is imported from
there), and records per command: its argv, exit status, stdout and stderr (decoded as UTF-8 with
``errors="backslashreplace"``), every file it created or changed under its group's output area
(relative path -> sha256 and size), the files it removed, the directories it created, and whether its
inputs were left byte-identical. ``compare`` exits 0 when two recordings hold the same commands with
the same results; otherwise it prints each differing command with a short unified diff of every
differing field and exits 1.

The commands, in independent groups (each in its own folder under ``WORK/groups``, run in order within
the group, groups spread over ``--jobs`` processes):

1. ``readme-*``: every ``mpt-tools ...`` line of the code blocks of PATH's README.md (``# comments`` and
   ``&& ...`` stripped), one group per README section, plus the set-up line's ``mpt-tools init
   fixtures/causal ... --out mpt-target --force`` (its ``/tmp`` output moved into the group). Each
   group holds the names the README uses: ``sources`` (fixtures/causal), ``t5-sources``
   (fixtures/seq2seq), ``old/`` (fixtures/causal_bin's files), ``target_config.json``
   (fixtures/causal/adapter_config.json) and ``fixtures/``; a group that reads ``target`` or
   ``converted`` without making it first starts with a recorded ``setup:`` step that makes it
   (``init sources --mode average --out target``, ``convert sources --out converted``). Hub examples
   run offline (``HF_HUB_OFFLINE=1``, 30 s timeout): their error lines are recorded too.
2. ``corpus-*``: every command line of ``command_lines(case, out)`` in PATH's tests/test_bad_inputs.py
   (extracted from the source and run with a fixed ``FIXTURES`` and the hard-coded command names, so
   neither that module nor ``mpt_tools.cli`` is imported here) on every case of the hostile corpus
   of PATH's ``tests/corpus.py``, built once into ``WORK/corpus``.
3. ``fixtures-*``: for each good fixture (causal, causal_bf16, causal_fp16, causal_bin, seq2seq, and
   named with ``--subfolder sources``), human and ``--json`` variants of inspect (also
   ``--similarity``), validate (also ``--against`` the exact target ``--mode exact``), init average /
   exact / shared (``--seed``), verify of the source and of the average target, convert (file; folder
   with ``--dtype bfloat16``), tasks, rerank up and down, export-prompt, diff (identical and
   different); the causal fixture also gets the other options (weighted and K-task init, ``--verify``,
   verify of every target and in bfloat16/float16, refusals, float16 convert, ``--plot``, push
   ``--dry-run``, ...). Plus ``misc``: ``--version``.

``--help`` output is not recorded (help texts may change).

Determinism: the scratch root (``--work``, default ``/tmp/mpt-snapshot-work``) is wiped at start and
every path in it is the same in every run. The corpus commands name it in their arguments and
messages: ``compare`` spells each recording's own root ``<WORK>`` before comparing, so two recordings
made with different ``--work`` still compare (a root of another length could still shift a
fixed-width column; use the same ``--work`` to be safe, and never one that two runs share at once).
Each command runs with its group folder as cwd in a clean environment: ``HOME``, ``HF_HOME``,
``XDG_CACHE_HOME``, ``XDG_CONFIG_HOME``, ``MPLCONFIGDIR`` under ``WORK/home`` (matplotlib's font cache
is built there before the first command, so its one-off "building the font cache" line never shows),
``HF_HUB_OFFLINE=1``, ``MPT_TOOLS_NO_HASH_CACHE=1``, ``CUDA_VISIBLE_DEVICES=`` (verify's ``auto`` is
the CPU), ``OMP_NUM_THREADS=MKL_NUM_THREADS=1`` (float reductions in one fixed order),
``PYTHONHASHSEED=0``, ``LC_ALL=C.UTF-8``, ``COLUMNS=80``, ``PYTHONDONTWRITEBYTECODE=1``; no
``HF_TOKEN``, ``HF_ENDPOINT``, ``MPT_TOOLS_DEBUG`` or ``MPT_TOOLS_RAISE_UNEXPECTED``. Every shared
init passes ``--seed``.

Normalised (the only volatile output found by recording the baseline twice), in stdout and stderr:

- verify's human ``timings: read 0.79 ms, ... total 29.5 ms`` line: each duration (number and unit,
  ``ms`` or ``s``) becomes ``<time>``;
- verify's JSON ``"timings": {"read_s": ..., "total_s": ...}`` object (also under init ``--verify
  --json``'s ``"verify"``): each number becomes ``"<time>"``.

Nothing else is rewritten: file contents are hashed as written.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import difflib
import hashlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

SCHEMA = "mpt-tools/snapshot/1"
DEFAULT_WORK = Path("/tmp/mpt-snapshot-work")
WORK_MARKER = ".mpt-snapshot-work"
TIMEOUT_S = 300.0
HUB_TIMEOUT_S = 30.0

# The commands of the CLI that test_bad_inputs.command_lines may use, hard-coded on purpose: the
# recorder must not import mpt_tools.cli. Its 13 labels, for the check that nothing was dropped.
CLI_COMMANDS = frozenset(
    {"inspect", "validate", "init", "verify", "convert", "push", "tasks", "rerank", "export-prompt", "diff"}
)
CORPUS_LABELS = (
    "inspect",
    "validate",
    "init-average",
    "init-exact",
    "init-shared",
    "verify",
    "convert",
    "push-dry-run",
    "tasks",
    "rerank",
    "export-prompt",
    "diff",
    "similarity",
)

# (group suffix, source args, source path, num_ranks, the other adapter for a "different" diff)
FIXTURES: tuple[tuple[str, tuple[str, ...], str, int, str], ...] = (
    ("causal", ("causal",), "causal", 2, "causal_bf16"),
    ("causal_bf16", ("causal_bf16",), "causal_bf16", 2, "causal"),
    ("causal_fp16", ("causal_fp16",), "causal_fp16", 2, "causal"),
    ("causal_bin", ("causal_bin",), "causal_bin", 2, "causal"),
    ("seq2seq", ("seq2seq",), "seq2seq", 1, "causal"),
    ("named", ("named", "--subfolder", "sources"), "named/sources", 3, "causal"),
)

COMPARED_FIELDS = (
    "argv",
    "cwd",
    "exit",
    "timed_out",
    "stdout",
    "stderr",
    "files",
    "removed",
    "new_dirs",
    "inputs_unchanged",
    "inputs_changed",
)


@dataclass
class Step:
    """One command of a group: ``label`` (unique in the group) and the mpt-tools arguments."""

    label: str
    argv: list[str]
    timeout: float = TIMEOUT_S


@dataclass
class Group:
    """Commands that run in order in one folder.

    ``copies`` are (absolute source, path relative to the group folder) pairs copied in first;
    ``inputs`` are the paths (relative to the group folder, or absolute) that must stay unchanged;
    everything else under the group folder is the output area.
    """

    name: str
    steps: list[Step]
    copies: list[tuple[str, str]] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------

_DURATION = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)? (?:ms|s)\b")
_TIMINGS_LINE = re.compile(r"^([ \t]*timings: )(.*)$", re.M)
_TIMINGS_JSON = re.compile(r'"timings": \{[^{}]*\}')
_JSON_NUMBER = re.compile(r'("[A-Za-z_]+": )-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?')


def normalise(text: str) -> str:
    """Replace verify's timings (the only volatile output) with ``<time>``; see the module docstring."""
    text = _TIMINGS_LINE.sub(lambda m: m.group(1) + _DURATION.sub("<time>", m.group(2)), text)
    return _TIMINGS_JSON.sub(lambda m: _JSON_NUMBER.sub(r'\1"<time>"', m.group(0)), text)


# --------------------------------------------------------------------------------------------
# The commands
# --------------------------------------------------------------------------------------------


def _slug(heading: str) -> str:
    """A group name from a README heading: ``mpt-tools tasks SOURCE --select LIST ...`` -> ``tasks-select``."""
    words = re.sub(r"\[.*?\]", " ", heading.replace("`", " ")).split()
    words = [w for w in words if w != "mpt-tools" and not re.fullmatch(r"[A-Z_]{1,}[0-9.A-Z_]*", w)]
    return re.sub(r"[^a-z0-9]+", "-", " ".join(words[:2]).lower()).strip("-") or "top"


def _readme_copies(fixtures: Path) -> list[tuple[str, str]]:
    """The names the README's examples use, as (source, destination) copies."""
    copies = [
        (str(fixtures / "causal"), "sources"),
        (str(fixtures / "seq2seq"), "t5-sources"),
        (str(fixtures / "causal" / "adapter_config.json"), "target_config.json"),
        (str(fixtures), "fixtures"),
    ]
    copies += [(str(p), f"old/{p.name}") for p in sorted((fixtures / "causal_bin").iterdir())]
    return copies


def _is_hub(argv: list[str]) -> bool:
    """A README example that would talk to the Hub (it runs offline, with a short timeout)."""
    if any(a in ("--check-base-model", "--base-model", "--push") or a.startswith("hf://") for a in argv):
        return True
    if argv[0] == "push" and "--dry-run" not in argv:
        return True
    first = argv[1] if len(argv) > 1 else ""
    return re.fullmatch(r"[\w-]+/[\w-]+", first) is not None  # org/name (local examples have dots or a slash)


def _readme_line(line: str) -> list[str] | None:
    """``mpt-tools ARGS`` of one code-block line, without ``# comments`` and ``&& ...``; else None."""
    line = line.strip()
    if not line.startswith("mpt-tools "):
        return None
    words = shlex.split(line.split("&&", 1)[0], comments=True)
    return words[1:] or None


def readme_groups(tree: Path, fixtures: Path) -> list[Group]:
    """One group per README section with ``mpt-tools`` examples (plus the set-up line's init)."""
    text = (tree / "README.md").read_text(encoding="utf-8")
    sections: dict[str, list[list[str]]] = {}
    heading = "top"
    for part in re.split(r"(```[a-z]*\n.*?```)", text, flags=re.S):
        if part.startswith("```"):
            lang, _, body = part[3:-3].partition("\n")
            if lang not in ("bash", "sh", "shell", ""):
                continue
            for line in body.splitlines():
                argv = _readme_line(line)
                if argv is None:
                    m = re.search(r"(?:^|[\s/])mpt-tools (init fixtures/\S+[^&#]*)", line)
                    if not m:
                        continue
                    argv = shlex.split(m.group(1))
                    if "--out" in argv:
                        argv[argv.index("--out") + 1] = "mpt-target"
                sections.setdefault(heading, []).append(argv)
        else:
            for m in re.finditer(r"^#{2,3} +(.+)$", part, flags=re.M):
                heading = m.group(1)
    groups = []
    for heading, commands in sections.items():
        steps: list[Step] = []
        made: set[str] = set()
        for argv in commands:
            outs = {argv[i + 1].rstrip("/") for i, a in enumerate(argv[:-1]) if a == "--out"}
            reads = {a.rstrip("/") for a in argv[1:] if not a.startswith("-")} - outs
            if "target" in reads and "target" not in made:
                steps.append(Step("setup: init sources --mode average --out target", _setup_target()))
                made.add("target")
            if "converted" in reads and "converted" not in made:
                steps.append(
                    Step("setup: convert sources --out converted", ["convert", "sources", "--out", "converted"])
                )
                made.add("converted")
            made |= outs
            steps.append(Step("mpt-tools " + shlex.join(argv), argv, HUB_TIMEOUT_S if _is_hub(argv) else TIMEOUT_S))
        inputs = ["sources", "t5-sources", "target_config.json", "fixtures", "old"]
        name = f"readme-{_slug(heading)}"
        while any(g.name == name for g in groups):
            name += "-2"
        groups.append(Group(name, _unique(steps), _readme_copies(fixtures), inputs))
    return groups


def _setup_target() -> list[str]:
    return ["init", "sources", "--mode", "average", "--out", "target"]


def _unique(steps: list[Step]) -> list[Step]:
    """Make the labels unique within a group (``label #2`` for a repeat)."""
    seen: dict[str, int] = {}
    for step in steps:
        seen[step.label] = seen.get(step.label, 0) + 1
        if seen[step.label] > 1:
            step.label = f"{step.label} #{seen[step.label]}"
    return steps


def _load_module(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _command_lines_function(test_file: Path, fixtures: Path, case_type: type) -> Any:
    """``command_lines`` from test_bad_inputs.py, compiled alone: FIXTURES and ``cli.commands`` fixed."""
    tree = ast.parse(test_file.read_text(encoding="utf-8"))
    funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "command_lines"]
    if len(funcs) != 1:
        raise SystemExit(f"{test_file}: no single command_lines function")
    module = ast.Module(body=[*ast.parse("from __future__ import annotations").body, funcs[0]], type_ignores=[])
    namespace: dict[str, Any] = {
        "Path": Path,
        "Case": case_type,
        "FIXTURES": fixtures,
        "cli": SimpleNamespace(commands=CLI_COMMANDS),
    }
    exec(compile(module, str(test_file), "exec"), namespace)
    return namespace["command_lines"]


def corpus_groups(tree: Path, work: Path, fixtures: Path) -> tuple[list[Group], dict[str, Any]]:
    """Build the hostile corpus once into ``WORK/corpus``; one group per case."""
    corpus = _load_module(tree / "tests" / "corpus.py", "_snapshot_corpus")
    root = work / "corpus"
    cases = corpus.build_corpus(root)
    command_lines = _command_lines_function(tree / "tests" / "test_bad_inputs.py", fixtures, corpus.Case)
    groups = []
    for case in cases:
        out = work / "groups" / f"corpus-{case.name}" / "out"
        lines = command_lines(case, out)
        unknown = set(lines) - set(CORPUS_LABELS)
        if unknown:
            print(f"note: command_lines has new labels {sorted(unknown)}", file=sys.stderr)
        case_dir = root / Path(case.path).relative_to(root).parts[0]
        steps = [Step(label, [str(a) for a in argv]) for label, argv in lines.items()]
        groups.append(Group(f"corpus-{case.name}", steps, [], [str(case_dir), str(fixtures / "causal")]))
    info = {"cases": len(cases), "sha256": _digest(_tree_state(root))}
    return groups, info


def _fixture_steps(src: tuple[str, ...], path: str, rank: int, other: str, json_: bool, extras: bool) -> list[Step]:
    """The good-fixture commands for one source (``src`` as arguments, ``path`` as a plain path)."""
    j = ["--json"] if json_ else []
    s = list(src)
    o = "out"
    cmds: list[list[str]] = [
        ["inspect", *s],
        ["inspect", *s, "--similarity"],
        ["validate", *s],
        ["init", *s, "--mode", "average", "--out", f"{o}/avg"],
        ["init", *s, "--mode", "exact", "--task", "1", "--out", f"{o}/exact"],
        ["init", *s, "--mode", "shared", "--seed", "0", "--out", f"{o}/shared"],
        ["validate", *s, "--against", f"{o}/exact", "--mode", "exact"],
        ["verify", *s],
        ["verify", f"{o}/avg"],
        ["convert", *s, "--out", f"{o}/conv.safetensors"],
        ["convert", *s, "--out", f"{o}/conv-bf16", "--dtype", "bfloat16"],
        ["tasks", *s, "--select", "1,0", "--out", f"{o}/sel"],
        ["rerank", *s, "--num-ranks", str(rank + 2), "--out", f"{o}/up"],
        ["rerank", *s, "--num-ranks", "1", "--out", f"{o}/down"],
        ["export-prompt", *s, "--task", "1", "--out", f"{o}/prompt1"],
        ["diff", path, path],
        ["diff", path, other],
    ]
    if path == "seq2seq":
        cmds.append(["export-prompt", *s, "--task", "1", "--encoder-only", "--out", f"{o}/prompt1-enc"])
    if extras:
        cmds += [
            ["inspect", *s, "--no-norms"],
            ["inspect", *s, "--similarity", "--plot", f"{o}/sim.png"],
            ["inspect", *s, "--similarity", "--plot", f"{o}/sim.png"],
            ["validate", *s, "--mode", "average"],
            ["validate", *s, "--against", "causal", "--mode", "exact"],
            ["validate", *s, "--against", "causal/adapter_config.json", "--mode", "shared"],
            ["validate", *s, "--against", "seq2seq", "--mode", "exact", "--task", "5"],
            ["init", *s, "--mode", "average", "--tasks", "0,2", "--weights", "0.25,0.75", "--out", f"{o}/wavg"],
            ["init", *s, "--mode", "exact", "--task", "2", "--target-tasks", "2", "--out", f"{o}/exact-k2"],
            [
                "init",
                *s,
                "--mode",
                "shared",
                "--seed",
                "7",
                "--num-tasks",
                "2",
                "--num-ranks",
                "1",
                "--out",
                f"{o}/sh2",
            ],
            ["init", *s, "--mode", "average", "--out", f"{o}/avg"],
            ["init", *s, "--mode", "average", "--out", f"{o}/avg", "--force", "--verify"],
            ["init", *s, "--mode", "exact", "--task", "-1", "--out", f"{o}/neg"],
            ["init", *s, "--mode", "exact", "--task", "-1", "--allow-negative-task", "--out", f"{o}/neg"],
            ["verify", f"{o}/exact"],
            ["verify", f"{o}/shared"],
            ["verify", f"{o}/wavg"],
            ["verify", f"{o}/exact-k2"],
            ["verify", f"{o}/sh2"],
            ["verify", f"{o}/avg", "--source", other],
            ["verify", *s, "--dtype", "bfloat16"],
            ["verify", *s, "--dtype", "float16", "--tasks", "0,2"],
            ["convert", *s, "--out", f"{o}/conv-fp16.safetensors", "--dtype", "float16"],
            ["rerank", f"{o}/up", "--num-ranks", str(rank), "--out", f"{o}/updown"],
            ["export-prompt", *s, "--task", "7", "--out", f"{o}/prompt7"],
            ["diff", path, f"{o}/conv.safetensors"],
            ["diff", path, f"{o}/up"],
            ["diff", f"{o}/avg", f"{o}/exact"],
            ["push", f"{o}/avg", "me/mpt-target", "--dry-run"],
            ["push", f"{o}/shared", "me/mpt-target", "--dry-run"],
            ["inspect", f"{o}/exact-k2"],
        ]
    return _unique([Step(shlex.join(c + j), c + j) for c in cmds])


def fixture_groups(fixtures: Path) -> list[Group]:
    """Two groups (human and --json) per good fixture; each holds a copy of every fixture."""
    names = ("causal", "causal_bf16", "causal_fp16", "causal_bin", "seq2seq", "named")
    copies = [(str(fixtures / n), n) for n in names]
    groups = []
    for suffix, src, path, rank, other in FIXTURES:
        for json_ in (False, True):
            steps = _fixture_steps(src, path, rank, other, json_, extras=suffix == "causal")
            name = f"fixtures-{suffix}-{'json' if json_ else 'human'}"
            groups.append(Group(name, steps, copies, list(names)))
    return groups


def misc_groups() -> list[Group]:
    """Commands that need no input."""
    return [Group("misc", [Step("--version", ["--version"])])]


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _tree_state(root: Path, skip: frozenset[Path] = frozenset()) -> dict[str, Any]:
    """Every entry under ``root`` (symlinks not followed): relpath -> {"sha256", "size"} for files,
    "symlink:TARGET", "dir" or "other". Paths in ``skip`` (and what is under them) are left out."""
    state: dict[str, Any] = {}
    if root.is_symlink() or root.is_file():
        return {".": _entry(root)}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d not in skip]
        for name in sorted(dirnames + filenames):
            p = here / name
            if p in skip:
                continue
            state[p.relative_to(root).as_posix()] = _entry(p)
    return dict(sorted(state.items()))


def _entry(p: Path) -> Any:
    if p.is_symlink():
        return "symlink:" + os.readlink(p)
    if p.is_dir():
        return "dir"
    if p.is_file():
        try:
            return {"sha256": _sha256(p), "size": p.stat().st_size}
        except OSError as exc:
            return f"unreadable:{type(exc).__name__}"
    return "other"


def _digest(state: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


def command_env(tree: Path, work: Path) -> dict[str, str]:
    """The clean, fixed environment every command runs in."""
    home = work / "home"
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "HF_HOME": str(home / ".cache" / "huggingface"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "MPLCONFIGDIR": str(home / ".config" / "matplotlib"),
        "MPLBACKEND": "Agg",
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "MPT_TOOLS_NO_HASH_CACHE": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONHASHSEED": "0",
        "PYTHONPATH": str(tree),
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONIOENCODING": "utf-8",
        "LC_ALL": "C.UTF-8",
        "LANG": "C.UTF-8",
        "COLUMNS": "80",
        "TERM": "dumb",
        "TRANSFORMERS_VERBOSITY": "error",
    }


def run_group(group: Group, work: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    """Set up ``group``'s folder and run its steps in order; one record per step."""
    gdir = work / "groups" / group.name
    gdir.mkdir(parents=True)
    for src, dst in group.copies:
        target = gdir / dst
        target.parent.mkdir(parents=True, exist_ok=True)
        if Path(src).is_dir():
            shutil.copytree(src, target, symlinks=True)
        else:
            shutil.copy2(src, target)
    inputs = [Path(p) if Path(p).is_absolute() else gdir / p for p in group.inputs]
    skip = frozenset(p for p in inputs if p.is_relative_to(gdir))
    records = []
    for step in group.steps:
        before_inputs = {str(p): _tree_state(p) for p in inputs}
        before = _tree_state(gdir, skip)
        timed_out = False
        t0 = time.monotonic()
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "mpt_tools", *step.argv],
                cwd=gdir,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=step.timeout,
            )
            code, out, err = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as exc:
            timed_out, code = True, None
            out, err = exc.stdout or b"", exc.stderr or b""
        after = _tree_state(gdir, skip)
        changed_inputs = []
        for p, state in before_inputs.items():
            now = _tree_state(Path(p))
            changed_inputs += [f"{p}/{k}" for k in sorted(set(state) | set(now)) if state.get(k) != now.get(k)]
        records.append(
            {
                "group": group.name,
                "label": step.label,
                "argv": step.argv,
                "cwd": gdir.relative_to(work).as_posix(),
                "exit": code,
                "timed_out": timed_out,
                "stdout": normalise(out.decode("utf-8", errors="backslashreplace")),
                "stderr": normalise(err.decode("utf-8", errors="backslashreplace")),
                "files": {k: v for k, v in after.items() if v != "dir" and before.get(k) != v},
                "removed": sorted(k for k in before if k not in after),
                "new_dirs": sorted(k for k, v in after.items() if v == "dir" and k not in before),
                "inputs_unchanged": not changed_inputs,
                "inputs_changed": changed_inputs,
                "seconds": round(time.monotonic() - t0, 2),  # diagnostic only, never compared
            }
        )
    return records


def _prepare_work(work: Path) -> None:
    """Wipe the scratch root (only one this tool made, or an empty/absent one) and recreate it."""
    if work.exists():
        if not (work / WORK_MARKER).exists() and any(work.iterdir()):
            raise SystemExit(f"{work} exists and was not made by this tool: refusing to wipe it")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / WORK_MARKER).write_text("scratch folder of tests/snapshot_outputs.py; wiped by every record\n")
    (work / "groups").mkdir()
    (work / "home").mkdir()


def _check_tree(tree: Path, env: dict[str, str], work: Path) -> dict[str, str]:
    """mpt_tools (and the versions around it) as the commands will import them."""
    probe = (
        "import json, mpt_tools, numpy, torch, safetensors, click\n"
        "try:\n import matplotlib; import matplotlib.pyplot; mpl = matplotlib.__version__\n"
        "except ImportError:\n mpl = None\n"
        "print(json.dumps({'mpt_tools': mpt_tools.__file__, 'version': mpt_tools.__version__,"
        " 'torch': torch.__version__, 'numpy': numpy.__version__, 'safetensors': safetensors.__version__,"
        " 'click': click.__version__, 'matplotlib': mpl}))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], cwd=work, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(f"cannot import mpt_tools from {tree}:\n{proc.stderr}")
    info = json.loads(proc.stdout)
    if not Path(info["mpt_tools"]).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"mpt_tools comes from {info['mpt_tools']}, not from {tree}")
    return info


def record(tree: Path, out: Path, work: Path, jobs: int, only: str | None) -> int:
    """Run every command against ``tree`` and write the recording to ``out``."""
    tree = tree.resolve()
    started = time.monotonic()
    _prepare_work(work)
    env = command_env(tree, work)
    versions = _check_tree(tree, env, work)  # also builds matplotlib's font cache in WORK/home
    shutil.copytree(tree / "fixtures", work / "fixtures")
    fixtures = work / "fixtures"
    corpus, corpus_info = corpus_groups(tree, work, fixtures)
    groups = fixture_groups(fixtures) + readme_groups(tree, fixtures) + misc_groups() + corpus
    if only:
        groups = [g for g in groups if re.search(only, g.name)]
    names = [g.name for g in groups]
    if len(set(names)) != len(names):
        raise SystemExit("duplicate group names")
    results: dict[str, list[dict[str, Any]]] = {}
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(run_group, g, work, env): g.name for g in groups}  # longest groups first
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            results[futures[future]] = future.result()
            print(f"\r{done}/{len(groups)} groups", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    commands: dict[str, dict[str, Any]] = {}
    for name in names:
        for rec in results[name]:
            commands[f"{name} :: {rec['label']}"] = rec
    fixtures_state = _tree_state(fixtures)
    data = {
        "schema": SCHEMA,
        "tree": str(tree),
        "work": str(work),
        "python": sys.version.split()[0],
        "versions": versions,
        "env": {k: v for k, v in env.items() if k not in ("PATH", "PYTHONPATH")},
        "corpus": corpus_info,
        "fixtures_sha256": _digest(fixtures_state),
        "groups": {name: len(results[name]) for name in names},
        "seconds": round(time.monotonic() - started, 1),
        "commands": commands,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    print(f"recorded {len(commands)} commands in {len(names)} groups in {data['seconds']} s: {out}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------------
# Comparing
# --------------------------------------------------------------------------------------------


def _lines(value: Any) -> list[str]:
    if isinstance(value, str):
        return value.splitlines() or [""]
    return json.dumps(value, indent=1, sort_keys=True).splitlines()


def _short_diff(a: Any, b: Any, name: str, max_lines: int = 40) -> list[str]:
    lines = list(difflib.unified_diff(_lines(a), _lines(b), f"before/{name}", f"after/{name}", n=2, lineterm=""))
    if len(lines) > max_lines:
        lines = [*lines[:max_lines], f"... ({len(lines) - max_lines} more diff lines)"]
    return lines


def _rebase(value: Any, work: str) -> Any:
    """``value`` with the recording's scratch root spelled ``<WORK>`` (in strings and dict keys)."""
    if isinstance(value, str):
        return value.replace(work, "<WORK>")
    if isinstance(value, list):
        return [_rebase(v, work) for v in value]
    if isinstance(value, dict):
        return {_rebase(k, work): _rebase(v, work) for k, v in value.items()}
    return value


def compare(before_path: Path, after_path: Path) -> int:
    """Print every command whose recorded results differ; 0 when none does, else 1."""
    before = json.loads(before_path.read_text(encoding="utf-8"))
    after = json.loads(after_path.read_text(encoding="utf-8"))
    for data, path in ((before, before_path), (after, after_path)):
        if data.get("schema") != SCHEMA:
            raise SystemExit(f"{path}: not a {SCHEMA} recording")
    differing = 0
    if before["work"] != after["work"]:
        print(f"note: scratch roots differ ({before['work']} vs {after['work']}): both compared as <WORK>")
    for key in ("corpus", "fixtures_sha256", "env"):
        if _rebase(before.get(key), before["work"]) != _rebase(after.get(key), after["work"]):
            print(f"note: {key} differs: {before.get(key)!r} vs {after.get(key)!r}")
    b_cmds, a_cmds = before["commands"], after["commands"]
    for key in b_cmds.keys() - a_cmds.keys():
        print(f"MISSING in after: {key}")
        differing += 1
    for key in a_cmds.keys() - b_cmds.keys():
        print(f"NEW in after: {key}")
        differing += 1
    for key in b_cmds:
        if key not in a_cmds:
            continue
        b, a = _rebase(b_cmds[key], before["work"]), _rebase(a_cmds[key], after["work"])
        fields = [f for f in COMPARED_FIELDS if b.get(f) != a.get(f)]
        if not fields:
            continue
        differing += 1
        print(f"DIFFERS: {key}\n  argv: mpt-tools {shlex.join(b['argv'])}  (cwd {b['cwd']})")
        for f in fields:
            for line in _short_diff(b.get(f), a.get(f), f):
                print("  " + line)
    total = len(b_cmds.keys() | a_cmds.keys())
    if differing:
        print(f"{differing} of {total} commands differ")
        return 1
    print(f"identical: {total} commands")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command line: ``record`` or ``compare``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="run every command against a checkout and record the outputs")
    rec.add_argument("--tree", type=Path, required=True, help="checkout of the repository to run")
    rec.add_argument("--out", type=Path, required=True, help="the recording (JSON) to write")
    rec.add_argument("--jobs", type=int, default=2, help="groups run in parallel (default 2)")
    rec.add_argument("--work", type=Path, default=DEFAULT_WORK, help=f"scratch root, wiped (default {DEFAULT_WORK})")
    rec.add_argument("--only", help="only the groups whose name matches this regex (for debugging)")
    cmp = sub.add_parser("compare", help="compare two recordings; exit 1 when they differ")
    cmp.add_argument("before", type=Path)
    cmp.add_argument("after", type=Path)
    args = parser.parse_args(argv)
    if args.command == "record":
        return record(args.tree, args.out, args.work.absolute(), max(1, args.jobs), args.only)
    return compare(args.before, args.after)


if __name__ == "__main__":
    sys.exit(main())
