"""Benchmark the surgery and comparison commands on the stress source, as a user runs them.

Stress source: 1000 tasks, 100 x 2 virtual tokens, rank 16, token_dim 8192, float32 (the one
bench_init.py writes under benchmarks/data/stress). Every command runs in a fresh process; wall time
and peak RSS (ru_maxrss of the child) are the median of --runs rounds after one warm-up round, the
commands taken round robin. There is no competitor to pair with (PEFT has none of these operations),
so the table gives absolute figures, with the source's size beside them. Writes its section of
benchmarks/RESULTS.md.

    python benchmarks/bench_surgery.py             # 3 rounds (about 6 minutes on 2 cores)
    python benchmarks/bench_surgery.py --runs 5
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import write_section
from bench_init import MPT, make_source, sample
from bench_verify import machine


def commands(src: Path, out: Path) -> dict[str, list[str]]:
    """The command lines to time (outputs under ``out``, overwritten each round)."""
    s = str(src)
    return {
        "tasks --select 5,3,999": [*MPT, "tasks", s, "--select", "5,3,999", "--out", str(out / "tasks"), "--force"],
        "rerank --num-ranks 32 (pad)": [*MPT, "rerank", s, "--num-ranks", "32", "--out", str(out / "r32"), "--force"],
        "rerank --num-ranks 8 (SVD)": [*MPT, "rerank", s, "--num-ranks", "8", "--out", str(out / "r8"), "--force"],
        "convert": [*MPT, "convert", s, "--out", str(out / "c32"), "--force"],
        "convert --dtype bfloat16": [*MPT, "convert", s, "--out", str(out / "c16"), "--dtype", "bfloat16", "--force"],
        "export-prompt --task 7 --encoder-only": [
            *MPT,
            "export-prompt",
            s,
            "--task",
            "7",
            "--encoder-only",
            "--out",
            str(out / "ep"),
            "--force",
        ],
        "diff SOURCE SOURCE": [*MPT, "diff", s, s],
        "inspect --similarity --no-norms": [*MPT, "inspect", s, "--similarity", "--no-norms", "--json"],
        "init --mode average --verify (CPU)": [
            *MPT,
            "init",
            s,
            "--mode",
            "average",
            "--out",
            str(out / "avg"),
            "--verify",
            "--force",
        ],
    }


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and write its section of benchmarks/RESULTS.md."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="timed rounds after one warm-up round (>= 3)")
    parser.add_argument("--no-write", action="store_true", help="print, do not touch RESULTS.md")
    args = parser.parse_args(argv)
    if args.runs < 3:
        parser.error("--runs must be at least 3")
    src = make_source("stress")
    size = (src / "adapter_model.safetensors").stat().st_size
    out = Path(tempfile.mkdtemp(prefix="mpt-bench-surgery-"))
    try:
        cmds = commands(src, out)
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in cmds}
        for round_ in range(args.runs + 1):
            for name, argv_ in cmds.items():
                wall, peak = sample(argv_)
                if round_:  # round 0 is the warm-up
                    samples[name].append((wall, peak))
            print(f"round {round_}/{args.runs} done", flush=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    lines = [
        "## surgery and comparison commands on the stress source",
        "",
        f"Machine: {machine()}. Source: 1000 tasks, 100 x 2 virtual "
        f"tokens, rank 16, token_dim 8192, float32, {size / 1e6:.0f} MB. Median of {args.runs} rounds after a "
        "warm-up, each command a fresh process, round robin; peak RSS is the child's ru_maxrss.",
        "Reproduce: `python benchmarks/bench_surgery.py`",
        "",
        "| command | wall (s) | peak RSS (MiB) |",
        "| --- | ---: | ---: |",
    ]
    for name, values in samples.items():
        wall = statistics.median(v[0] for v in values)
        peak = statistics.median(v[1] for v in values)
        lines.append(f"| mpt-tools {name} | {wall:.2f} | {peak:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        write_section("surgery", text)


if __name__ == "__main__":
    main()
