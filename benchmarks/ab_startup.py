"""A/B of commands between two checkouts, in one run (alternating, medians).

    git worktree add ../mpt-base REV && python benchmarks/ab_startup.py ../mpt-base
    python benchmarks/ab_startup.py ../mpt-base --heavy   # work-bound commands on the stress source

Start-up-bound commands run on fixtures/causal; ``--heavy`` runs work-bound ones on
``benchmarks/data/stress`` (made by ``benchmarks/bench_init.py``: 1000 tasks, 544 MB) instead.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = str(ROOT / "fixtures" / "causal")
COMMANDS = {
    "--help": ["--help"],
    "inspect": ["inspect", SRC],
    "validate": ["validate", SRC],
    "init exact": ["init", SRC, "--mode", "exact", "--task", "1", "--out", "{o}", "--force"],
}


STRESS = str(ROOT / "benchmarks" / "data" / "stress")
HEAVY = {
    "init average": ["init", STRESS, "--mode", "average", "--out", "{o}", "--force"],
    "convert bf16": ["convert", STRESS, "--dtype", "bfloat16", "--out", "{o}", "--force"],
    "tasks select": ["tasks", STRESS, "--select", "5,3,999", "--out", "{o}", "--force"],
    "validate": ["validate", STRESS],
}


def _children_cpu() -> float:
    """User + system CPU seconds of this process's finished children (less sensitive than wall
    time to other tenants of a shared machine)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(before: str, rounds: int = 11, commands: dict[str, list[str]] = COMMANDS) -> None:
    """Round 0 warms up; then every command on each tree in turn; print the medians and ratios."""
    trees = {"before": before, "after": str(ROOT)}
    samples: dict[tuple[str, str], list[float]] = {(c, t): [] for c in commands for t in trees}
    cpu: dict[tuple[str, str], list[float]] = {(c, t): [] for c in commands for t in trees}
    out = tempfile.mkdtemp()
    for r in range(rounds):
        for name, argv in commands.items():
            for label, tree in trees.items():
                args = [x.replace("{o}", f"{out}/{label}") for x in argv]
                env = {**os.environ, "PYTHONPATH": tree}
                # as after `pip install`: bytecode cached (round 0 writes it), not recompiled each run
                env.pop("PYTHONDONTWRITEBYTECODE", None)
                start, cpu0 = time.perf_counter(), _children_cpu()
                subprocess.run([sys.executable, "-m", "mpt_tools", *args], env=env, cwd=tree, capture_output=True)
                if r:
                    samples[(name, label)].append(time.perf_counter() - start)
                    cpu[(name, label)].append(_children_cpu() - cpu0)
    for name in commands:
        b, a = statistics.median(samples[(name, "before")]), statistics.median(samples[(name, "after")])
        cb, ca = statistics.median(cpu[(name, "before")]), statistics.median(cpu[(name, "after")])
        print(
            f"{name:12} wall: before {b:.3f} s  after {a:.3f} s  after/before {a / b:.2f}   "
            f"cpu (user+sys): before {cb:.3f} s  after {ca:.3f} s  after/before {ca / cb:.2f}"
        )


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3) or (len(sys.argv) == 3 and sys.argv[2] != "--heavy"):
        sys.exit("usage: python benchmarks/ab_startup.py BEFORE_CHECKOUT [--heavy]")
    if len(sys.argv) == 3:
        main(sys.argv[1], rounds=6, commands=HEAVY)
    else:
        main(sys.argv[1])
