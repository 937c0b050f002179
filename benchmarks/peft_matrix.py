"""Which PEFT releases load what mpt-tools writes, and read what they save: the measured matrix.

For each PEFT release (default: 0.10.0, 0.13.2, 0.14.0, 0.17.1 and the newest, the one in this
venv), with the transformers of its era:

- every adapter mpt-tools writes, from a GPT-2-shaped causal source and a T5-shaped seq2seq source
  (the shipped PEFT 0.21.2 saves ``fixtures/causal``, ``fixtures/causal_bin``, ``fixtures/seq2seq``):
  ``init`` average / exact / shared, ``tasks``, ``rerank``, ``convert``, ``export-prompt``
  (``--encoder-only`` for T5) and ``compat``; once by default, once with ``--peft-compat 0.10.0``
  and once for exactly that release (``--peft-compat RELEASE``, ``compat --peft RELEASE``);
- is loaded by both routes (``PeftModel.from_pretrained``, and ``MultitaskPromptTuningConfig``
  / ``PromptTuningConfig.from_pretrained`` + ``get_peft_model`` + ``set_peft_model_state_dict``)
  with ``tests/peft_load.py`` run by that release's python; the load, its error line and its
  warnings are recorded, and every task's prompt is compared bitwise with the newest release's;
- that release saves MPT sources of its own (GPT-2 and T5, ``.safetensors`` and ``.bin``);
  mpt-tools ``inspect``s and ``validate``s them and ``init``s from them (average, exact task 1),
  the targets are compared bitwise with that PEFT's own ``AVERAGE_SOURCE_TASKS`` /
  ``EXACT_SOURCE_TASK`` init reading the same file, and loaded back into that release.

Each old release gets its own venv under benchmarks/data/peft-venvs/ (git-ignored; made on first
use, about a minute each from the package registry, then reused), with ``--no-deps`` installs
pinned as .ci/run pins them; torch, numpy and safetensors come from this venv through a .pth file
placed after the venv's own packages. ``--python VERSION=PATH`` uses an existing interpreter.

    python benchmarks/peft_matrix.py                       # print the table (a few minutes)
    python benchmarks/peft_matrix.py --write-readme        # ... and put it in README.md
    python benchmarks/peft_matrix.py --releases 0.10.0,0.21.2 --out matrix.json
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FIXTURES = ROOT / "fixtures"
README = ROOT / "README.md"
VENVS = HERE / "data" / "peft-venvs"
PEFT_LOAD = ROOT / "tests" / "peft_load.py"
MARK_START, MARK_END = "<!-- peft-matrix:start -->", "<!-- peft-matrix:end -->"

# PEFT release: (transformers, tokenizers) of its era (the install recipe of the measured compat matrix)
ERA: dict[str, tuple[str, str]] = {
    "0.10.0": ("4.39.3", "0.15.2"),
    "0.13.2": ("4.45.2", "0.20.3"),
    "0.14.0": ("4.47.1", "0.21.4"),
    "0.17.1": ("4.55.4", "0.21.4"),
}
# what transformers < 5 needs beside it and this venv lacks (as .ci/run pins them)
COMMON = [
    "huggingface_hub==0.36.2",
    "requests==2.34.2",
    "charset-normalizer==3.5.3",
    "idna==3.20",
    "urllib3==2.8.0",
    "certifi",
]
NEWEST = importlib.metadata.version("peft")
DEFAULT_RELEASES = [*ERA, NEWEST]

# The sources, PEFT 0.21.2's own saves in fixtures/: arch -> folder (convert reads causal_bin for GPT-2)
D = 16  # token_dim of the fixtures and of the sources each release saves
SOURCES = {"gpt2": "causal", "t5": "seq2seq"}


def writers(arch: str, compat_release: str) -> dict[str, list[str]]:
    """The mpt-tools command lines (without --out) that write one adapter each from ``arch``'s source."""
    src = str(FIXTURES / SOURCES[arch])
    t5 = arch == "t5"
    return {
        "init-average": ["init", src, "--mode", "average"],
        "init-exact": ["init", src, "--mode", "exact", "--task", "1"],
        "init-shared": ["init", src, "--mode", "shared", "--seed", "0"],
        "tasks": ["tasks", src, "--select", "1,0" if t5 else "2,0"],
        "rerank": ["rerank", src, "--num-ranks", "3"],
        # pickle -> safetensors for GPT-2, float32 -> bfloat16 for T5
        "convert": ["convert", src, "--dtype", "bfloat16"] if t5 else ["convert", str(FIXTURES / "causal_bin")],
        "export-prompt": ["export-prompt", src, "--task", "1", *(["--encoder-only"] if t5 else [])],
        "compat": ["compat", src, "--peft", compat_release],
    }


def env() -> dict[str, str]:
    """The environment of every child: offline, no user site, no PYTHONPATH, quiet transformers."""
    e = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONNOUSERSITE="1")
    e.pop("PYTHONPATH", None)
    return e


def run(argv: list[str], *, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, env=env(), timeout=timeout, cwd=ROOT)


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def mpt(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the mpt-tools CLI of this venv."""
    return run([sys.executable, "-m", "mpt_tools", *args])


# --- the environments -------------------------------------------------------------------------


def pins(release: str) -> list[str]:
    transformers, tokenizers = ERA[release]
    return [f"peft=={release}", f"transformers=={transformers}", f"tokenizers=={tokenizers}", *COMMON]


def purelib(python: str) -> str:
    return run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()


def make_venv(release: str) -> tuple[str, float]:
    """The python of a cached venv for ``release`` (made if missing); and the seconds it took."""
    folder = VENVS / f"peft-{release}"
    stamp = folder / "mpt-tools-matrix.json"
    python = folder / "bin" / "python"
    want = {"pins": pins(release), "python": platform.python_version()}
    if stamp.is_file() and python.exists() and json.loads(stamp.read_text()) == want:
        return str(python), 0.0
    start = time.perf_counter()
    shutil.rmtree(folder, ignore_errors=True)
    base = getattr(sys, "_base_executable", sys.executable)  # the same Python as this venv: torch is shared
    print(f"  making {folder.relative_to(ROOT)} ({' '.join(pins(release))})", file=sys.stderr, flush=True)
    for argv in (
        [base, "-m", "venv", str(folder)],
        [str(python), "-m", "pip", "install", "-q", "--no-deps", *pins(release)],
    ):
        proc = run(argv)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(argv[:4])}...: {last_line(proc.stderr)}")
    # torch, numpy, safetensors, accelerate ... from this venv, after the venv's own packages
    (Path(purelib(str(python))) / "zz-mpt-tools-main-venv.pth").write_text(purelib(sys.executable) + "\n")
    stamp.write_text(json.dumps(want))
    return str(python), time.perf_counter() - start


def versions(python: str) -> dict[str, str]:
    code = (
        "import json, platform, peft, torch, transformers; print(json.dumps({'peft': peft.__version__, "
        "'transformers': transformers.__version__, 'torch': torch.__version__, "
        "'python': platform.python_version()}))"
    )
    proc = run([python, "-c", code])
    if proc.returncode:
        raise RuntimeError(f"{python}: cannot import peft/transformers/torch: {last_line(proc.stderr)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- run inside a release's venv: save sources with that PEFT and do its own init from them ------


def side(out: Path) -> None:
    """(In the release's venv.) Save an MPT source per shape and format with this PEFT, and print
    the sha256 of PEFT's own init (average, exact task 1) read from each saved file."""
    sys.path.insert(0, str(ROOT / "tests"))
    import peft
    import torch
    from peft_oracle import peft_init, tiny_model

    def sha(t: Any) -> str:
        return hashlib.sha256(t.detach().to(torch.float32).contiguous().numpy().tobytes()).hexdigest()

    result: dict[str, Any] = {"peft": peft.__version__, "sources": {}}
    for seed, (arch, task_type) in enumerate((("gpt2", "CAUSAL_LM"), ("t5", "SEQ_2_SEQ_LM"))):
        cfg = peft.MultitaskPromptTuningConfig(
            task_type=task_type, num_virtual_tokens=4, num_tasks=3, num_ranks=2, token_dim=D
        )
        model = peft.get_peft_model(tiny_model(task_type, D), cfg)
        enc = model.prompt_encoder["default"]
        gen = torch.Generator().manual_seed(100 + seed)
        with torch.no_grad():
            enc.embedding.weight.copy_(torch.randn(enc.embedding.weight.shape, generator=gen))
            enc.prefix_task_cols.copy_(torch.randn(enc.prefix_task_cols.shape, generator=gen) * 0.5)
            enc.prefix_task_rows.copy_(torch.randn(enc.prefix_task_rows.shape, generator=gen) * 0.5)
        for fmt, safe in (("safetensors", True), ("bin", False)):
            folder = out / f"{arch}-{fmt}"
            model.save_pretrained(str(folder), safe_serialization=safe)
            weights = folder / f"adapter_model.{fmt}"
            inits = {}
            for mode, peft_mode, task in (("average", "AVERAGE_SOURCE_TASKS", 0), ("exact", "EXACT_SOURCE_TASK", 1)):
                got = peft_init(str(weights), peft_mode, task_type=task_type, nvt=4, r=2, d=D, task=task)
                inits[mode] = {k: sha(v) for k, v in got.items()}
            result["sources"][f"{arch}-{fmt}"] = {"path": str(folder), "inits": inits}
    print(json.dumps(result), flush=True)


# --- the matrix --------------------------------------------------------------------------------


def write_set(root: Path, extra: list[str], compat_release: str, *, with_compat: bool = True) -> dict[str, str]:
    """Write every adapter of both sources under ``root``; {name: folder}."""
    out: dict[str, str] = {}
    for arch in SOURCES:
        for name, argv in writers(arch, compat_release).items():
            if name == "compat" and not with_compat:
                continue
            folder = root / f"{arch}-{name}"
            line = [*argv, "--out", str(folder), *([] if name == "compat" else extra)]
            proc = mpt(*line)
            if proc.returncode:
                raise RuntimeError(f"mpt-tools {' '.join(line)}: {last_line(proc.stderr)}")
            out[f"{arch}-{name}"] = str(folder)
    return out


def load_all(python: str, folders: list[str]) -> dict[str, dict[str, Any]]:
    """tests/peft_load.py run by ``python`` on ``folders``; {folder: {route: outcome}}."""
    proc = run([python, str(PEFT_LOAD), *folders])
    if proc.returncode:
        raise RuntimeError(f"peft_load.py failed: {last_line(proc.stderr)}")
    rows = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return {row["path"]: row["routes"] for row in rows}


def tensor_sha(folder: Path) -> dict[str, str]:
    from safetensors.numpy import load_file

    files = list(folder.glob("adapter_model.safetensors"))
    if files:
        state = load_file(str(files[0]))
    else:
        import torch

        state = {k: v.numpy() for k, v in torch.load(str(folder / "adapter_model.bin"), weights_only=True).items()}
    return {k: hashlib.sha256(v.astype("float32").tobytes()).hexdigest() for k, v in state.items()}


def own_sources(python: str, work: Path, release: str) -> tuple[dict[str, Any], list[str]]:
    """This release saves sources; mpt-tools reads them and inits from them. The results, and the
    init targets (to load back into the release)."""
    out = work / f"own-{release}"
    proc = run([python, str(Path(__file__).resolve()), "--side", str(out)])
    if proc.returncode:
        raise RuntimeError(f"saving sources with PEFT {release}: {last_line(proc.stderr)}")
    saved = json.loads(proc.stdout.strip().splitlines()[-1])
    checks: list[dict[str, Any]] = []
    targets: list[str] = []
    for key, src in saved["sources"].items():
        insp = mpt("inspect", src["path"], "--json")
        checks.append({"source": key, "what": "inspect", "ok": insp.returncode == 0, "error": last_line(insp.stderr)})
        val = mpt("validate", src["path"], "--json")
        findings = json.loads(val.stdout).get("findings", []) if val.stdout.strip() else ["no output"]
        ok = val.returncode == 0 and not findings
        err = last_line(val.stderr) or "; ".join(str(f) for f in findings)
        checks.append({"source": key, "what": "validate", "ok": ok, "error": "" if ok else err})
        for mode, extra in (("average", []), ("exact", ["--task", "1"])):
            target = out / f"target-{key}-{mode}"
            init = mpt("init", src["path"], "--mode", mode, *extra, "--out", str(target))
            row: dict[str, Any] = {"source": key, "what": f"init {mode}", "ok": init.returncode == 0}
            row["error"] = last_line(init.stderr) if init.returncode else ""
            if init.returncode == 0:
                targets.append(str(target))
                row["bitwise"] = tensor_sha(target) == src["inits"][mode]
            checks.append(row)
    return {"peft": saved["peft"], "checks": checks}, targets


def summarize(
    release: str, loads: dict[str, dict[str, Any]], sets: dict[str, dict[str, str]], ref: dict[str, list[str]]
) -> dict[str, Any]:
    """Counts per set of adapters: load by both routes, prompts bitwise the newest's, warnings, errors."""
    summary: dict[str, Any] = {}
    for set_name, folders in sets.items():
        n = len(folders)
        loaded = bitwise = warned = 0
        errors: set[str] = set()
        warnings: set[str] = set()
        for name, folder in folders.items():
            routes = loads[folder]
            if all(r["ok"] for r in routes.values()):
                loaded += 1
            if all(r["ok"] and r["prompts"] == ref[name] for r in routes.values()):
                bitwise += 1
            msgs = [w for r in routes.values() for w in r["warnings"]]
            warned += bool(msgs)
            warnings.update(msgs)
            errors.update(r["error"] for r in routes.values() if r["error"])
        summary[set_name] = {
            "n": n,
            "load": loaded,
            "bitwise": bitwise,
            "warned": warned,
            "warnings": sorted(warnings),
            "errors": sorted(errors),
        }
    return summary


def frac(a: int, n: int) -> str:
    return f"{'yes' if a == n else '**no**'} {a}/{n}"


def short(msg: str, width: int = 110) -> str:
    msg = re.sub(r"\s+", " ", msg)
    return msg if len(msg) <= width else msg[: width - 3] + "..."


def control_cell(ctl: dict[str, Any]) -> str:
    """How PEFT's own newest saves fare: shows that the harness sees a refusal or a warning."""
    if ctl["load"] < ctl["n"]:
        kinds = sorted({e.split(":", 1)[0] for e in ctl["errors"]})
        return f"load {ctl['load']}/{ctl['n']} ({', '.join(kinds)})"
    return f"load {ctl['load']}/{ctl['n']}, bitwise {ctl['bitwise']}/{ctl['n']}, warn {ctl['warned']}/{ctl['n']}"


def table(results: dict[str, Any]) -> str:
    """The Markdown table and what it was measured on."""
    head = [
        "PEFT (transformers)",
        "mpt-tools adapters load, both routes",
        f"prompts bitwise = {results['newest']}",
        "warnings",
        "`--peft-compat 0.10.0`: load, bitwise",
        "`--peft-compat` / `compat --peft` this release: load, bitwise, no warning",
        "this PEFT's sources: `inspect`, `validate`, `init` (.safetensors + .bin)",
        "`init` bitwise = this PEFT's init",
        "those targets load back here",
        "control: PEFT 0.21.2's own saves (the fixtures)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    notes: list[str] = []
    for release, row in results["releases"].items():
        label = f"{release} ({row['versions']['transformers']})" if "versions" in row else release
        if "failed" in row:
            lines.append(f"| {label} | " + " | ".join(["not run"] * (len(head) - 1)) + " |")
            notes.append(f"PEFT {release}: {short(row['failed'], 300)}")
            continue
        s = row["summary"]
        d, c10, ex, own, ctl = s["default"], s["compat-0.10.0"], s["exact"], s["own-targets"], s["control"]
        same = (
            f"reference (routes equal {row['routes_equal']}/{d['n']})"
            if release == results["newest"]
            else frac(d["bitwise"], d["n"])
        )
        warn = "none" if not d["warned"] else f"**{d['warned']}/{d['n']} warn**"
        exact_ok = ex["bitwise"] == ex["n"] and not ex["warned"]
        exact = f"{'yes' if exact_ok else '**no**'} {ex['bitwise']}/{ex['n']}" + (
            f", {ex['warned']} warn" if ex["warned"] else ""
        )
        checks = row["own"]["checks"]
        read_ok = sum(ch["ok"] for ch in checks)
        inits = [ch for ch in checks if ch["what"].startswith("init")]
        cells = [
            label,
            frac(d["load"], d["n"]),
            same,
            warn,
            f"{frac(c10['load'], c10['n'])}, {c10['bitwise']}/{c10['n']}",
            exact,
            frac(read_ok, len(checks)),
            frac(sum(bool(ch.get("bitwise")) for ch in inits), len(inits)),
            frac(own["load"], own["n"]),
            control_cell(ctl),
        ]
        lines.append("| " + " | ".join(cells) + " |")
        for set_name, sm in s.items():
            where = "control (expected)" if set_name == "control" else set_name
            for err in sm["errors"]:
                notes.append(f"PEFT {release}, {where}: error `{short(err)}`")
            for w in sm["warnings"]:
                notes.append(f"PEFT {release}, {where}: warning `{short(w)}`")
        for ch in checks:
            if not ch["ok"] or ch.get("bitwise") is False:
                notes.append(f"PEFT {release}, source {ch['source']}, {ch['what']}: {ch['error'] or 'not bitwise'}")
    m = results["machine"]
    text = [
        f"Measured {m['date']} by `python benchmarks/peft_matrix.py` in {m['wall_s']:.0f} s on {m['machine']} "
        f"(Python {m['python']}, torch {m['torch']}, mpt-tools {m['mpt_tools']} at `{m['commit']}`). "
        f"Adapters per release: {results['counts']}. Regenerate this table with "
        "`python benchmarks/peft_matrix.py --write-readme`.",
        "",
        *lines,
    ]
    if notes:
        text += ["", "Errors and warnings seen:", "", *[f"- {n}" for n in notes]]
    return "\n".join(text) + "\n"


def write_readme(text: str) -> None:
    readme = README.read_text()
    if MARK_START not in readme or MARK_END not in readme:
        raise SystemExit(f"README.md lacks the markers {MARK_START} ... {MARK_END}")
    head, rest = readme.split(MARK_START, 1)
    tail = rest.split(MARK_END, 1)[1]
    README.write_text(f"{head}{MARK_START}\n{text.rstrip()}\n{MARK_END}{tail}")


def machine(wall: float) -> dict[str, Any]:
    commit = run(["git", "rev-parse", "--short", "HEAD"]).stdout.strip() or "unknown"
    if run(["git", "status", "--porcelain", "--untracked-files=no"]).stdout.strip():
        commit += " + local changes"
    return {
        "date": time.strftime("%Y-%m-%d"),
        "wall_s": wall,
        "machine": f"{platform.machine()} Linux, {os.cpu_count()} cores, CPU only",
        "python": platform.python_version(),
        "torch": importlib.metadata.version("torch"),
        "mpt_tools": importlib.metadata.version("mpt-tools"),
        "commit": commit,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--releases", default=",".join(DEFAULT_RELEASES), help="PEFT releases, comma-separated")
    parser.add_argument(
        "--python", action="append", default=[], metavar="VERSION=PATH", help="use this interpreter for a release"
    )
    parser.add_argument("--out", type=Path, help="write the raw results as JSON here")
    parser.add_argument("--write-readme", action="store_true", help="replace the table between the README markers")
    parser.add_argument("--keep", type=Path, help="write the adapters here and keep them (default: a temp dir)")
    parser.add_argument("--from", dest="from_json", type=Path, help="render the table of an earlier --out dump")
    parser.add_argument("--side", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:
        side(args.side)
        return 0
    if args.from_json:
        text = table(json.loads(args.from_json.read_text()))
        print(text)
        if args.write_readme:
            write_readme(text)
        return 0

    start = time.perf_counter()
    releases = [r.strip() for r in args.releases.split(",") if r.strip()]
    given = dict(p.split("=", 1) for p in args.python)
    for r in releases:
        if r != NEWEST and r not in ERA and r not in given:
            parser.error(f"no recipe for PEFT {r}: pass --python {r}=PATH (known: {', '.join(ERA)})")
    work = args.keep or Path(tempfile.mkdtemp(prefix="peft-matrix-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        print("writing adapters with mpt-tools ...", file=sys.stderr, flush=True)
        default = write_set(work / "default", [], "0.10.0")
        compat10 = write_set(work / "compat-0.10.0", ["--peft-compat", "0.10.0"], "0.10.0", with_compat=False)
        exact = {r: write_set(work / f"exact-{r}", ["--peft-compat", r], r) for r in releases}
        # the control: the sources themselves, as PEFT 0.21.2 saved them (with modules_to_save, peft_version)
        control = {f"{arch}-source": str(FIXTURES / fixture) for arch, fixture in SOURCES.items()}

        # the reference: the newest release (this venv) on the default adapters
        print(f"loading in PEFT {NEWEST} (this venv, the reference) ...", file=sys.stderr, flush=True)
        ref_loads = load_all(sys.executable, [*default.values(), *control.values()])
        ref = {name: ref_loads[f]["from_pretrained"]["prompts"] for name, f in {**default, **control}.items()}

        results: dict[str, Any] = {"newest": NEWEST, "releases": {}}
        for release in releases:
            row: dict[str, Any] = {}
            results["releases"][release] = row
            try:
                if release in given:
                    python, row["install_s"] = given[release], 0.0
                elif release == NEWEST:
                    python, row["install_s"] = sys.executable, 0.0
                else:
                    python, row["install_s"] = make_venv(release)
                row["python"] = python
                row["versions"] = versions(python)
                if row["versions"]["peft"] != release:
                    raise RuntimeError(f"{python} has PEFT {row['versions']['peft']}, not {release}")
                print(f"PEFT {release} ({row['versions']['transformers']}) ...", file=sys.stderr, flush=True)
                t0 = time.perf_counter()
                row["own"], targets = own_sources(python, work, release)
                sets = {"default": default, "compat-0.10.0": compat10, "exact": exact[release], "control": control}
                folders = [f for s in sets.values() for f in s.values()] + targets
                loads = load_all(python, folders)
                own_set = {Path(t).name: t for t in targets}
                # a target is compared with itself (loaded by both routes, same prompts); init bitwise is checked above
                own_ref = {name: loads[t]["from_pretrained"]["prompts"] for name, t in own_set.items()}
                ref_all = {**ref, **own_ref}
                row["summary"] = summarize(release, loads, {**sets, "own-targets": own_set}, ref_all)
                row["routes_equal"] = sum(
                    loads[f]["from_pretrained"]["ok"]
                    and loads[f]["from_pretrained"]["prompts"] == loads[f]["config"]["prompts"]
                    for f in default.values()
                )
                row["loads"] = {f: loads[f] for f in folders}
                row["seconds"] = time.perf_counter() - t0
            except Exception as exc:  # a release that cannot be installed or run is a row of the table
                row["failed"] = f"{type(exc).__name__}: {exc}"
                print(f"  PEFT {release}: {row['failed']}", file=sys.stderr, flush=True)
        results["counts"] = (
            f"{len(default)} written by default, {len(compat10)} with `--peft-compat 0.10.0`, "
            f"{len(next(iter(exact.values())))} for exactly that release, "
            f"8 `init` targets from the release's own sources, {len(control)} control"
        )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    results["machine"] = machine(time.perf_counter() - start)
    text = table(results)
    print(text)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    if args.write_readme:
        write_readme(text)
        print("README.md updated", file=sys.stderr)
    return 1 if any("failed" in r for r in results["releases"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
