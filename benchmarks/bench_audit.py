"""Benchmark ``mpt-tools audit`` (issue 14, item 6).

Local: a generated tree of MPT adapter folders (benchmarks/data/audit-tree, git-ignored), audited
header-only at several sizes up to 10,000 adapters: adapters per second and peak RSS (flat as the
count grows), against the shell loop a user writes today (``for d in tree/*; do mpt-tools inspect
--json $d; done``), timed on the first ``--loop`` adapters of the same tree in the same run.

Hub: ``--repos`` repos (1,000) on the loopback FakeHub of tests/hubserver.py, each a ~1 MB MPT
adapter, audited with ``--author``: requests and response bytes per repo (no weights are sent:
the header read is a 100 kB range), wall time at ``--jobs`` 1 and 8.

    python benchmarks/bench_audit.py             # about 5 minutes on 2 cores
    python benchmarks/bench_audit.py --quick     # 1,000 adapters, 100 repos (a smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from _results import write_section  # noqa: E402
from bench_verify import machine  # noqa: E402

from mpt_tools.formats import from_numpy, safetensors_bytes  # noqa: E402

DATA = HERE / "data" / "audit-tree"
PY = sys.executable


def adapter_files(rng: np.random.Generator, n: int, t: int, r: int, d: int) -> dict[str, bytes]:
    tensors = {
        "prompt_embeddings": rng.standard_normal((t, d), dtype=np.float32),
        "prefix_task_cols": rng.standard_normal((n, t, r), dtype=np.float32),
        "prefix_task_rows": rng.standard_normal((n, r, d), dtype=np.float32),
    }
    config = {
        "peft_type": "MULTITASK_PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": t,
        "num_transformer_submodules": 1,
        "num_tasks": n,
        "num_ranks": r,
        "token_dim": d,
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_state_dict_path": None,
        "inference_mode": True,
        "base_model_name_or_path": "gpt2",
    }
    return {
        "adapter_config.json": json.dumps(config, indent=2).encode(),
        "adapter_model.safetensors": safetensors_bytes({k: from_numpy(v) for k, v in tensors.items()}),
    }


def make_tree(count: int) -> Path:
    """``count`` adapter folders (4 tasks, T=20, r=2, d=256, ~30 kB each) in groups of 100."""
    marker = DATA / f".complete-{count}"
    if marker.exists():
        return DATA
    shutil.rmtree(DATA, ignore_errors=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = DATA / f"group{i // 100:03d}" / f"run{i:05d}"
        folder.mkdir(parents=True)
        for name, data in adapter_files(rng, 4, 20, 2, 256).items():
            (folder / name).write_bytes(data)
    marker.touch()
    return DATA


def targets(count: int) -> list[str]:
    """The group folders holding the first ``count`` adapters (count a multiple of 100)."""
    return [str(DATA / f"group{g:03d}") for g in range(count // 100)]


def peak_run(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MiB) and stdout of one run, measured by _peak.py."""
    proc = subprocess.run(
        [PY, str(HERE / "_peak.py"), *argv], capture_output=True, text=True, cwd=ROOT, env=env or os.environ.copy()
    )
    lines = proc.stdout.splitlines()
    wall = float(next(x for x in lines if x.startswith("WALL ")).split()[1])
    peak = float(next(x for x in lines if x.startswith("PEAK ")).split()[1])
    out = "\n".join(x for x in lines if not x.startswith(("WALL ", "PEAK ")))
    return wall, peak, out


def local_bench(sizes: list[int], loop: int, runs: int) -> str:
    make_tree(max(sizes))
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    lines = [
        "| adapters | audit wall (s, median) | adapters/s | peak RSS (MiB) |",
        "| ---: | ---: | ---: | ---: |",
    ]
    rates = {}
    for size in sizes:
        walls, peaks = [], []
        for _ in range(runs):
            wall, peak, out = peak_run([PY, "-m", "mpt_tools", "audit", *targets(size), "--json"], env)
            summary = json.loads(out.splitlines()[-1])
            assert summary["adapters"] == size and summary["ok"], summary
            walls.append(wall)
            peaks.append(peak)
        wall, peak = statistics.median(walls), max(peaks)
        rates[size] = size / wall
        lines.append(f"| {size:,} | {wall:.2f} | {size / wall:,.0f} | {peak:.0f} |")
    folders = sorted((DATA / "group000").iterdir())[:loop]
    script = (
        "for d in " + " ".join(str(f) for f in folders) + '; do "$PY" -m mpt_tools inspect --json "$d" >/dev/null; done'
    )
    loop_walls = []
    for _ in range(max(1, runs // 2)):
        t0 = time.perf_counter()
        subprocess.run(["bash", "-c", script], check=True, cwd=ROOT, env=dict(env, PY=PY))
        loop_walls.append(time.perf_counter() - t0)
    loop_rate = loop / statistics.median(loop_walls)
    biggest = max(sizes)
    lines.append("")
    lines.append(
        f"Shell loop of `mpt-tools inspect --json` (one process per adapter), same tree, first {loop} adapters: "
        f"{loop_rate:,.1f} adapters/s (median of {len(loop_walls)}). `audit` at {biggest:,}: "
        f"**{rates[biggest] / loop_rate:,.0f}x** the loop's rate."
    )
    return "\n".join(lines)


def hub_bench(repos: int, runs: int) -> str:
    from hubserver import FakeHub

    files = adapter_files(np.random.default_rng(1), 8, 100, 1, 2048)  # ~0.9 MB of weights
    weights = len(files["adapter_model.safetensors"])
    lines = [
        "| --jobs | wall (s, median) | repos/s | requests per repo | response bytes per repo |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    with tempfile.TemporaryDirectory() as home, FakeHub() as hub:
        for i in range(repos):
            hub.add_repo(f"bench/adapter-{i:04d}", files)
        env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HOME=home, HF_HUB_DISABLE_TELEMETRY="1")
        env.pop("HF_HUB_OFFLINE", None)
        for jobs in (1, 8):
            walls, per_req, per_bytes = [], [], []
            for _ in range(runs):
                hub.clear_requests()
                wall, _, out = peak_run(
                    [PY, "-m", "mpt_tools", "audit", "--author", "bench", "--jobs", str(jobs), "--json"], env
                )
                summary = json.loads(out.splitlines()[-1])
                assert summary["adapters"] == repos and summary["invalid"] == 0 and summary["unreadable"] == 0, summary
                walls.append(wall)
                per_req.append(len(hub.requests) / repos)
                per_bytes.append(hub.bytes_sent / repos)
            wall = statistics.median(walls)
            lines.append(
                f"| {jobs} | {wall:.2f} | {repos / wall:,.0f} | {statistics.median(per_req):.2f} | "
                f"{statistics.median(per_bytes):,.0f} |"
            )
    lines.append("")
    lines.append(
        f"{repos:,} repos on the loopback FakeHub (tests/hubserver.py, real huggingface_hub client), each one MPT "
        f"adapter of {weights:,} bytes of weights; `audit --author bench`. Per repo: the listing page share, "
        "`model_info` with file metadata, the config, and one 100 kB ranged read of the header; no weights "
        "are sent. The server runs in the benchmark's process on the same 2 cores."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmarks and write their section of benchmarks/RESULTS.md."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1,000 adapters, 100 repos, 1 run each")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--loop", type=int, default=50, help="adapters in the shell-loop comparison")
    args = parser.parse_args(argv)
    sizes = [1000] if args.quick else [1000, 3000, 10000]
    runs = 1 if args.quick else args.runs
    local = local_bench(sizes, 20 if args.quick else args.loop, runs)
    print(local)
    hub = hub_bench(100 if args.quick else 1000, runs)
    print(hub)
    text = (
        "## audit: 10,000 local adapters and 1,000 Hub repos, header-only (issue 14)\n\n"
        f"Machine: {machine()}. `python benchmarks/bench_audit.py`; every run a fresh process, "
        "wall and peak RSS from `_peak.py`; default `--jobs` (the CPU count).\n\n"
        "### Local tree (4 tasks, T=20, r=2, d=256 per adapter; 100 adapters per group folder)\n\n"
        f"{local}\n\n### Hub (`--author`)\n\n{hub}\n"
    )
    if not args.quick:
        write_section("audit", text)


if __name__ == "__main__":
    main()
