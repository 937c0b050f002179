"""Benchmark `mpt-tools verify` end to end on GPU and CPU (not a test).

Generates the stress source (1000 tasks, 100 virtual tokens x 2 submodules = T 200, rank 16,
token_dim 8192, float32: ~544 MB) with numpy into benchmarks/data/ (git-ignored), then measures:

- GPU (when CUDA is available): end-to-end verify split into file read, host-to-device transfer
  and rebuild, against the floor measured in the same run: file bytes / pinned H2D bandwidth plus
  one plain-torch float32 rebuild pass (data already on the device);
- CPU: end-to-end verify split into read and rebuild, against one plain-torch float32 rebuild pass;
- CPU peak RSS of verify in a subprocess (ru_maxrss) against the ``import torch`` baseline
  + 2x the file size.

Timings are the median of ``--runs`` (>= 5) runs after one warm-up run; the file is in the page
cache after the warm-up, so "read" is a page-cache read. Writes its section into
benchmarks/RESULTS.md between ``<!-- verify:start -->`` and ``<!-- verify:end -->``.

    python benchmarks/bench_verify.py            # the full stress source
    python benchmarks/bench_verify.py --quick    # a small source, for a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import RESULTS, read_section, write_section

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
FULL = {"num_tasks": 1000, "num_virtual_tokens": 100, "nts": 2, "num_ranks": 16, "token_dim": 8192}
QUICK = {"num_tasks": 64, "num_virtual_tokens": 50, "nts": 2, "num_ranks": 8, "token_dim": 1024}


def make_source(params: dict[str, int], seed: int = 0) -> Path:
    """Write a float32 seq2seq MPT adapter of these sizes (streamed in chunks of tasks); reuse it
    when it already exists."""
    n, nvt, nts, r, d = (params[k] for k in ("num_tasks", "num_virtual_tokens", "nts", "num_ranks", "token_dim"))
    t = nvt * nts
    folder = DATA / f"stress-n{n}-t{t}-r{r}-d{d}"
    weights = folder / "adapter_model.safetensors"
    if weights.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {"prefix_task_cols": (n, t, r), "prefix_task_rows": (n, r, d), "prompt_embeddings": (t, d)}
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    pos = 0
    for name in sorted(sizes):  # one dtype: safetensors orders by name
        nbytes = int(np.prod(sizes[name])) * 4
        header[name] = {"dtype": "F32", "shape": list(sizes[name]), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    rng = np.random.default_rng(seed)
    tmp = weights.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)) + blob)
        for name in sorted(sizes):
            shape = sizes[name]
            scale = 1.0 if name == "prompt_embeddings" else 0.02
            step = 1 if name == "prompt_embeddings" else 64
            count = 1 if name == "prompt_embeddings" else shape[0]
            for start in range(0, count, step):
                rows = shape if name == "prompt_embeddings" else (min(step, count - start), *shape[1:])
                fh.write(rng.normal(0.0, scale, size=rows).astype("<f4").tobytes())
    tmp.rename(weights)
    config = {
        "num_ranks": r,
        "num_tasks": n,
        "num_transformer_submodules": nts,
        "num_virtual_tokens": nvt,
        "peft_type": "MULTITASK_PROMPT_TUNING",
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_state_dict_path": None,
        "task_type": "SEQ_2_SEQ_LM",
        "token_dim": d,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return folder


def median_runs(fn: Any, runs: int) -> list[Any]:
    """One warm-up call, then ``runs`` calls; returns their results."""
    fn()
    return [fn() for _ in range(runs)]


def med(values: list[float]) -> float:
    return float(statistics.median(values))


def bench_verify(folder: Path, device: str, runs: int, chunk_bytes: int | None = None) -> dict[str, float]:
    """Median timings of verify (library call, report timings plus wall)."""
    from mpt_tools.verification import verify

    def once() -> dict[str, float]:
        t0 = time.perf_counter()
        report = verify(folder, device=device, chunk_bytes=chunk_bytes)
        wall = time.perf_counter() - t0
        assert report["ok"], report["failures"][:3]
        return {**report["timings"], "wall_s": wall}

    results = median_runs(once, runs)
    return {k: med([r[k] for r in results]) for k in results[0]}


def plain_rebuild_pass(folder: Path, device: str, runs: int, chunk: int = 64) -> float:
    """Median time of one plain-torch float32 rebuild of every prompt with the data already on
    ``device`` (the compute floor)."""
    import torch

    from mpt_tools.checkpoint import load_source
    from mpt_tools.formats import to_torch

    ckpt = load_source(folder)
    dev = torch.device(device)
    pe = to_torch(ckpt.read("prompt_embeddings")).to(dev)
    cols = to_torch(ckpt.read("prefix_task_cols")).to(dev)
    rows = to_torch(ckpt.read("prefix_task_rows")).to(dev)
    n = cols.shape[0]

    def once() -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            for start in range(0, n, chunk):
                p = cols[start : start + chunk].bmm(rows[start : start + chunk])
                p.mul_(pe)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    return med(median_runs(once, runs))


def pinned_h2d_bandwidth(nbytes: int, runs: int) -> float:
    """Median pinned host-to-device bandwidth in bytes/s for a copy of ``nbytes``."""
    import torch

    host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")

    def once() -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    return nbytes / med(median_runs(once, runs))


RSS_PROBE = r"""
import resource, sys
import torch
if sys.argv[1] == "verify":
    from mpt_tools.verification import verify
    assert verify(sys.argv[2], device="cpu")["ok"]
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss(*args: str) -> int:
    """Peak RSS in bytes of a fresh interpreter running the probe (ru_maxrss is KiB on Linux)."""
    out = subprocess.run([sys.executable, "-c", RSS_PROBE, *args], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) * 1024


def machine() -> str:
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{cpu}, {os.cpu_count()} cores visible, {mem:.0f} GiB RAM, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}, {platform.system()}"
    )


def fmt_s(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and write benchmarks/RESULTS.md."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small source, for a smoke run")
    parser.add_argument("--runs", type=int, default=5, help="timed runs after one warm-up (>= 5)")
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU part")
    parser.add_argument("--no-gpu", action="store_true", help="skip the GPU part")
    parser.add_argument("--no-write", action="store_true", help="print, do not touch RESULTS.md")
    args = parser.parse_args(argv)
    if args.runs < 5:
        parser.error("--runs must be at least 5")
    params = QUICK if args.quick else FULL
    t0 = time.perf_counter()
    folder = make_source(params)
    made = time.perf_counter() - t0
    rss: tuple[int, int] | None = None
    if not args.no_cpu:
        # First, while this process is small: on Linux a child's ru_maxrss starts from the RSS of
        # the process it was forked from (the high-water mark survives fork + exec).
        print("CPU peak RSS ...", flush=True)
        rss = peak_rss("baseline"), peak_rss("verify", str(folder))
    import torch

    weights = folder / "adapter_model.safetensors"
    size = weights.stat().st_size
    n, nvt, nts, r, d = (params[k] for k in ("num_tasks", "num_virtual_tokens", "nts", "num_ranks", "token_dim"))
    label = "quick" if args.quick else "full"
    print(f"source {folder} ({size / 1e6:.1f} MB; made or found in {made:.1f} s)", flush=True)
    lines = [
        f"## verify ({label} source)",
        "",
        f"`python benchmarks/bench_verify.py{' --quick' if args.quick else ''}`: source of {n} tasks, "
        f"T = {nvt} x {nts} = {nvt * nts}, rank {r}, token_dim {d}, float32, {size / 1e6:.1f} MB. "
        f"Median of {args.runs} runs after a warm-up; the file is in the page cache (read = page-cache "
        "read). verify = float32 rebuild + float64 reference + per-task metrics.",
        "",
    ]
    cuda = torch.cuda.is_available() and not args.no_gpu
    if cuda:
        print("GPU ...", flush=True)
        g = bench_verify(folder, "cuda", args.runs)
        bw = pinned_h2d_bandwidth(size, args.runs)
        plain = plain_rebuild_pass(folder, "cuda", args.runs)
        floor = size / bw + plain
        # smaller chunks: more kernel launches, but each pass over a chunk may stay in L2
        sweep = {
            mib: bench_verify(folder, "cuda", args.runs, chunk_bytes=mib << 20)["wall_s"] for mib in (512, 128, 32)
        }
        lines += [
            f"### GPU: {torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})",
            "",
            "| measure | median |",
            "| --- | --- |",
            f"| verify end to end (wall) | {fmt_s(g['wall_s'])} |",
            f"| - file read (host) | {fmt_s(g['read_s'])} |",
            f"| - host-to-device transfer (CUDA events) | {fmt_s(g['transfer_s'])} |",
            f"| - rebuild + reference + metrics (CUDA events) | {fmt_s(g['rebuild_s'])} |",
            f"| pinned H2D bandwidth | {bw / 1e9:.1f} GB/s |",
            f"| plain-torch float32 rebuild pass (data on device) | {fmt_s(plain)} |",
            f"| floor = file bytes / pinned H2D + plain pass | {fmt_s(floor)} |",
            f"| verify / floor | {g['wall_s'] / floor:.1f}x |",
            *(
                f"| verify with chunks of {mib} MiB (wall; / floor) | {fmt_s(w)}; {w / floor:.1f}x |"
                for mib, w in sweep.items()
            ),
            "",
        ]
    else:
        lines += ["### GPU", "", "GPU: not yet measured (no CUDA device in this run).", ""]
    if not args.no_cpu:
        print("CPU ...", flush=True)
        c = bench_verify(folder, "cpu", args.runs)
        plain = plain_rebuild_pass(folder, "cpu", args.runs)
        assert rss is not None
        base, peak = rss
        bound = base + 2 * size
        lines += [
            "### CPU",
            "",
            f"Machine: {machine()}.",
            "",
            "| measure | median |",
            "| --- | --- |",
            f"| verify end to end (wall) | {fmt_s(c['wall_s'])} |",
            f"| - file read | {fmt_s(c['read_s'])} |",
            f"| - rebuild + reference + metrics | {fmt_s(c['rebuild_s'])} |",
            f"| plain-torch float32 rebuild pass (one pass, no reference) | {fmt_s(plain)} |",
            f"| verify / plain pass | {c['wall_s'] / plain:.1f}x |",
            f"| peak RSS of verify (subprocess, ru_maxrss) | {peak / 2**20:.0f} MiB |",
            f"| `import torch` baseline RSS | {base / 2**20:.0f} MiB |",
            f"| bound: baseline + 2 x file size | {bound / 2**20:.0f} MiB ({'within' if peak <= bound else 'OVER'}) |",
            "",
        ]
    if args.no_cpu:  # the GPU run (benchmarks/gpu_checks.sh): keep the CPU rows measured before
        kept = (read_section("verify") or "").partition("### CPU")
        lines += [kept[1] + kept[2]] if kept[1] else []
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section("verify", text)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
