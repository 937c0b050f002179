"""Benchmark pack's recovered start with few tasks (issue 13's round trip): the routes of
``mpt_tools.recover`` that need few tasks (the pair route from 2 tasks, the kernel route from R + 1,
and the search on prompts too small for them), against the fit from the mean prompt alone
(``FitSettings(recover=False, signs=False)``), measured in the same run on the same prompts.

Each case is a set of seeded adapters: P* N(0, 1), factors N(0, 0.02) (mean zero, as PEFT
initialises them), baked to float32 prompts; and prompts that are not of the form (N(0, 1), as
teacher prompts trained one by one are, for the fit), where the search finds nothing and costs its
tries. Per case: how many adapters come back within 1e-5 relative error (every task), and the
median time of the whole fit (``als_fit``, float64, torch's default threads, with the stops pack
uses: ``--tol`` 1e-6 and the round-off of float32 prompts and adapter), with and without the
recovered start, and the median iterations.

    python benchmarks/bench_recover.py            # about 4 minutes on 2 cores
    python benchmarks/bench_recover.py --quick    # 2 adapters per case, small shapes
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _results import write_section  # noqa: E402
from bench_verify import fmt_s, machine  # noqa: E402

# (label, tasks, T, d, rank, adapters, of the form)
FULL = [
    ("2 tasks, rank 2, [20, 64] (pair route)", 2, 20, 64, 2, 10, True),
    ("2 tasks, rank 2, [100, 4096] (pair route)", 2, 100, 4096, 2, 3, True),
    ("2 tasks, rank 3, [40, 40] (pair route)", 2, 40, 40, 3, 10, True),
    ("3 tasks, rank 3, [40, 40] (pair route)", 3, 40, 40, 3, 10, True),
    ("2 tasks, rank 4, [20, 256] (pair route)", 2, 20, 256, 4, 5, True),
    ("2 tasks, rank 5, [16, 1024] (pair route)", 2, 16, 1024, 5, 3, True),
    ("2 tasks, rank 6, [16, 1024] (pair route)", 2, 16, 1024, 6, 3, True),
    ("2 tasks, rank 7, [16, 4096] (pair route)", 2, 16, 4096, 7, 2, True),
    ("5 tasks, rank 3, [40, 40] (kernel route)", 5, 40, 40, 3, 10, True),
    ("5 tasks, rank 4, [20, 256] (kernel route)", 5, 20, 256, 4, 5, True),
    ("6 tasks, rank 5, [16, 1024] (kernel route)", 6, 16, 1024, 5, 3, True),
    ("2 tasks, rank 2, [6, 6] (search)", 2, 6, 6, 2, 10, True),
    ("3 tasks, rank 3, [12, 20] (search)", 3, 12, 20, 3, 10, True),
    ("2 random prompts, rank 2, [20, 64] (pair route)", 2, 20, 64, 2, 3, False),
    ("3 random prompts, rank 3, [20, 64] (pair route)", 3, 20, 64, 3, 3, False),
    ("5 random prompts, rank 3, [20, 64] (kernel route)", 5, 20, 64, 3, 3, False),
    ("3 random prompts, rank 3, [12, 20] (search)", 3, 12, 20, 3, 3, False),
]
QUICK = [(label, n, min(t, 20), min(d, 64), r, 2, form) for label, n, t, d, r, _, form in FULL[::2]]


def prompts(n: int, t: int, d: int, r: int, seed: int, form: bool) -> Any:
    """[n, t, d] float64 torch: baked float32 prompts of a zero-mean rank-r adapter, or N(0, 1)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    if not form:
        return torch.randn(n, t, d, generator=g, dtype=torch.float64).float().double()
    pe = torch.randn(t, d, generator=g, dtype=torch.float64)
    u = 0.02 * torch.randn(n, t, r, generator=g, dtype=torch.float64)
    v = 0.02 * torch.randn(n, r, d, generator=g, dtype=torch.float64)
    return (pe * (u @ v)).float().double()


def run_case(n: int, t: int, d: int, r: int, adapters: int, form: bool) -> dict[str, tuple[int, float, float, float]]:
    """Per start ("recovered", "mean"): adapters back within 1e-5, median fit time, worst error,
    median iterations."""
    from mpt_tools.als import FitSettings, als_fit, round_off_floors

    floors = round_off_floors(["F32"] * n, ["F32"])  # what pack stops at: float32 prompts and adapter
    out: dict[str, tuple[int, float, float, float]] = {}
    for name, recover in (("recovered", True), ("mean", False)):
        ok, times, worst, iters = 0, [], 0.0, []
        for seed in range(adapters):
            p = prompts(n, t, d, r, seed, form)
            start = time.perf_counter()
            fit = als_fit(p, r, settings=FitSettings(recover=recover, round_off=floors, signs=recover))
            times.append(time.perf_counter() - start)
            err = float((fit.fit_sq / p.square().sum((1, 2))).sqrt().max())
            ok += err < 1e-5
            worst = max(worst, err)
            iters.append(fit.iterations)
        out[name] = (ok, statistics.median(times), worst, statistics.median(iters))
    return out


def main(argv: list[str] | None = None) -> None:
    """Run the cases and write their section of benchmarks/RESULTS.md."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 adapters per case, small shapes")
    args = parser.parse_args(argv)
    cases = QUICK if args.quick else FULL
    lines = [
        "## pack's recovered start with few tasks (pair route, kernel route, search)",
        "",
        f"Machine: {machine()}. `benchmarks/bench_recover.py`{' --quick' if args.quick else ''}. Zero-mean",
        "adapters (factors N(0, 0.02)) baked to float32, and prompts that are not of the form (N(0, 1)).",
        "Back: adapters whose every task comes back within 1e-5 relative error; time: median of the",
        "whole fit (`als_fit`, float64, stopping as pack does: `--tol` 1e-6, or every task within a",
        "quarter of float32's round-off, 2^-26), with the recovered start and from the mean prompt alone.",
        "",
        "| case | adapters | back: recovered start | mean prompt | fit: recovered start | mean prompt"
        " | iterations: recovered start | mean prompt | worst error from the mean prompt |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, n, t, d, r, adapters, form in cases:
        got = run_case(n, t, d, r, adapters, form)
        rec, mean = got["recovered"], got["mean"]
        row = (
            f"| {label} | {adapters} | {rec[0]} | {mean[0]} | {fmt_s(rec[1])} | {fmt_s(mean[1])}"
            f" | {rec[3]:g} | {mean[3]:g} | {mean[2]:.2g} |"
        )
        print(row, flush=True)
        lines.append(row)
    write_section("recover", "\n".join(lines))


if __name__ == "__main__":
    main()
