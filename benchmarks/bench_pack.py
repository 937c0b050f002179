"""Benchmark ``mpt-tools pack`` (issue 13, item 6): 100 prompts of T = 100, d = 4096 at rank 4.

The prompts are the baked prompts of a rank-4 MPT-like adapter (P* N(0, 1); each task's product
``U_k V_k`` a modulation around one, as in a trained adapter) plus 1% Gaussian noise, so no exact
fit exists and the fit converges to the noise floor (relative objective about 1e-4). Seeded.

Rows (CPU now; the GPU rows in their own section, when a CUDA device is there):

- pack's fit (``mpt_tools.als.als_fit``, float64): the baseline, the median time per iteration,
  and iterations and time to convergence at ``--tol 1e-6``, with and without the line search and
  Anderson acceleration;
- ``mpt-tools pack`` end to end on the command line from 100 ``.npy`` files (read, fit, write),
  wall time and peak RSS (``_peak.py``);
- a plain-torch ALS written the obvious way: a Python loop over the tasks, each task's rows of U and
  columns of V by ``torch.linalg.lstsq`` (batched over the rows / columns of that task), P* by the
  same closed form, vectorised; from the same baseline, to the same stopping rule. Time per
  iteration (median), and to convergence (run, or, with ``--naive-iters N``, estimated from N
  iterations times the iterations plain ALS takes).

Both run with torch's default threads and with one thread (on the shared 2-core machine one thread
is faster for both: see the tables).

    python benchmarks/bench_pack.py              # about 15 minutes on 2 cores
    python benchmarks/bench_pack.py --quick      # 20 prompts of [20, 512], a smoke run
    python benchmarks/bench_pack.py --no-cpu     # the GPU rows only (benchmarks/gpu_checks.sh)
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from _results import RESULTS, write_section  # noqa: E402
from bench_verify import fmt_s, machine  # noqa: E402

FULL = {"n": 100, "t": 100, "d": 4096, "r": 4}
QUICK = {"n": 20, "t": 20, "d": 512, "r": 4}
NOISE = 0.01
TOL = 1e-6
DATA = HERE / "data" / "pack"


def make_prompts(n: int, t: int, d: int, r: int, seed: int = 0) -> np.ndarray:
    """[n, t, d] float32: a rank-r MPT-like adapter's prompts plus NOISE x their RMS of noise."""
    rng = np.random.default_rng(seed)
    pe = rng.standard_normal((t, d))
    cols = 0.3 * rng.standard_normal((n, t, r))
    rows = 0.3 * rng.standard_normal((n, r, d))
    cols[:, :, 0] += 1.0
    rows[:, 0, :] += 1.0
    prompts = pe * np.matmul(cols, rows)
    prompts += NOISE * prompts.std() * rng.standard_normal(prompts.shape)
    return prompts.astype(np.float32)


def fit_rows(p: Any, r: int, line_search: bool) -> dict[str, Any]:
    """pack's fit on the tensor ``p``: baseline time, per-iteration times, iterations, total."""
    from mpt_tools.als import CHUNK_BYTES, FitSettings, als_fit
    from mpt_tools.prompts import plan_chunks

    marks: list[float] = []
    chunk = plan_chunks(2 * p.shape[1] * p.shape[2] * 8, CHUNK_BYTES.get(p.device.type, CHUNK_BYTES["cpu"]))
    sync = _sync(p)
    sync()
    t0 = time.perf_counter()

    def advance(_: int) -> None:
        sync()
        marks.append(time.perf_counter())

    fit = als_fit(p, r, settings=FitSettings(0, TOL, 1000, chunk, line_search), advance=advance)
    sync()
    total = time.perf_counter() - t0
    steps = np.diff([t0, *marks])
    norm = float((p.double() ** 2).sum())
    return {
        "iterations": fit.iterations,
        "stopped": fit.stopped,
        "first_s": float(steps[0]) if len(steps) else 0.0,  # the baseline and the first iteration
        "per_iter_s": statistics.median(steps[1:]) if len(steps) > 1 else float("nan"),
        "total_s": total,
        "rel_objective": fit.history[-1] / norm,
        "baseline_rel": fit.history[0] / norm,
        "start": fit.start,
        "base_rel": float(fit.baseline_sq.sum()) / norm,
    }


def _sync(p: Any) -> Any:
    import torch

    return torch.cuda.synchronize if p.device.type == "cuda" else (lambda: None)


def naive_als(p: Any, r: int, max_iters: int) -> dict[str, Any]:
    """Plain-torch ALS the obvious way (see the module docstring), from pack's own baseline."""
    import torch

    from mpt_tools.als import _Als

    als = _Als(p, r, None, p.shape[0])
    als.baseline(0)
    shared, cols, rows = als.shared.clone(), als.cols.clone(), als.rows.clone()
    del als
    n = p.shape[0]
    sync = _sync(p)

    def objective() -> float:
        return float(sum(((p[k] - shared * (cols[k] @ rows[k])) ** 2).sum() for k in range(n)))

    history = [objective()]
    steps = []
    for _ in range(max_iters):
        sync()
        t0 = time.perf_counter()
        for k in range(n):
            a = (rows[k][None, :, :] * shared[:, None, :]).transpose(1, 2)  # [T, d, r]: row t's system
            cols[k] = torch.linalg.lstsq(a, p[k][:, :, None]).solution[..., 0]
            a = shared.T[:, :, None] * cols[k][None, :, :]  # [d, T, r]: column j's system
            rows[k] = torch.linalg.lstsq(a, p[k].T[:, :, None]).solution[..., 0].T
        w = torch.bmm(cols, rows)
        num, den = (p * w).sum(0), (w * w).sum(0)
        shared = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), shared)
        del w
        f = objective()
        sync()
        steps.append(time.perf_counter() - t0)
        previous = history[-1]
        history.append(f)
        if previous - f <= TOL * previous:
            break
    norm = float((p**2).sum())
    return {
        "iterations": len(steps),
        "per_iter_s": statistics.median(steps),
        "total_s": sum(steps),
        "converged": history[-2] - history[-1] <= TOL * history[-2],
        "rel_objective": history[-1] / norm,
    }


def threads(count: int | None) -> Any:
    """Set torch's CPU threads (None: leave them); returns the count in use."""
    import torch

    if count is not None:
        torch.set_num_threads(count)
    return torch.get_num_threads()


def cli_end_to_end(prompts: np.ndarray, r: int) -> tuple[float, float, int]:
    """``mpt-tools pack`` on the command line from .npy files: wall seconds, peak RSS (MiB), files."""
    import shutil

    DATA.mkdir(parents=True, exist_ok=True)
    folder = DATA / f"prompts-{prompts.shape[0]}x{prompts.shape[1]}x{prompts.shape[2]}"
    if not folder.is_dir() or len(list(folder.glob("*.npy"))) != prompts.shape[0]:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        for k, prompt in enumerate(prompts):
            np.save(folder / f"task{k:03d}.npy", prompt)
    files = sorted(str(f) for f in folder.glob("*.npy"))
    out = DATA / "packed"
    argv = [sys.executable, str(HERE / "_peak.py"), sys.executable, "-m", "mpt_tools", "pack", *files]
    argv += ["--num-ranks", str(r), "--task-type", "CAUSAL_LM", "--device", "cpu", "--out", str(out)]
    argv += ["--force", "--quiet"]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"mpt-tools pack failed: {proc.stderr}")
    wall = float(proc.stdout.split("WALL ")[1].split()[0])
    peak = float(proc.stdout.split("PEAK ")[1].split()[0])
    return wall, peak, len(files)


def table(label: str, ours: dict[str, Any], plain: dict[str, Any], naive: dict[str, Any] | None) -> list[str]:
    lines = [
        f"#### {label}",
        "",
        "| implementation | first iteration (with the baseline) | per iteration (median) | iterations | "
        "to convergence | final relative objective |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    rows = (("pack (ALS + line search + Anderson)", ours), ("pack, both off (plain ALS)", plain))
    for name, row in rows:
        lines.append(
            f"| {name} | {fmt_s(row['first_s'])} | {fmt_s(row['per_iter_s'])} | {row['iterations']} "
            f"({row['stopped']}) | {fmt_s(row['total_s'])} | {row['rel_objective']:.3g} |"
        )
    if naive is not None:
        if naive["converged"]:
            to_conv = fmt_s(naive["total_s"])
            its = str(naive["iterations"])
        else:
            estimate = naive["per_iter_s"] * plain["iterations"]
            to_conv = f"{fmt_s(estimate)} (estimated: per iteration x plain ALS's {plain['iterations']})"
            its = f"{naive['iterations']} run"
        lines.append(
            f"| plain torch, per-task loop + `torch.linalg.lstsq` | - | {fmt_s(naive['per_iter_s'])} | {its} | "
            f"{to_conv} | {naive['rel_objective']:.3g} |"
        )
        naive_total = naive["total_s"] if naive["converged"] else naive["per_iter_s"] * plain["iterations"]
        lines.append("")
        lines.append(
            f"pack / plain torch, per iteration: {naive['per_iter_s'] / ours['per_iter_s']:.1f}x faster; "
            f"to convergence: {naive_total / ours['total_s']:.1f}x faster."
        )
    lines.append("")
    return lines


def reading(legs: dict[int, tuple[dict[str, Any], dict[str, Any], dict[str, Any]]], default: int) -> list[str]:
    """What the tables say: threads against one thread, and what the line search cost or saved."""
    out = []
    if default in legs and 1 in legs and default != 1:
        many, one = legs[default][2]["per_iter_s"], legs[1][2]["per_iter_s"]
        fair = 1 if one <= many else default
        out.append(
            f"The plain-torch loop takes {fmt_s(many)} per iteration with torch's {default} threads and "
            f"{fmt_s(one)} with one (its many small `torch.linalg.lstsq` calls), so the {fair}-thread table is "
            "the fair comparison."
        )
    if legs:
        ours = next(iter(legs.values()))[0]
        out.append(
            f"pack started from its {ours['start']} start (relative objective {ours['baseline_rel']:.3g}, the mean"
            f" prompt's {ours['base_rel']:.3g}); the plain-torch loop starts from the mean prompt, so its time to"
            " convergence also counts the iterations a better start saves."
        )
    for count, (ours, plain, _naive) in legs.items():
        cost = ours["per_iter_s"] / plain["per_iter_s"] - 1
        out.append(
            f"With {count} thread(s) the line search and Anderson's step took {ours['iterations']} iterations where"
            f" plain ALS took {plain['iterations']}, at {cost:+.0%} time per iteration (they try up to two more"
            " points per iteration)."
        )
    return [" ".join(out), ""] if out else []


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and write benchmarks/RESULTS.md (sections pack and pack-gpu)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20 prompts of [20, 512], a smoke run")
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU part")
    parser.add_argument("--no-gpu", action="store_true", help="skip the GPU part")
    parser.add_argument("--naive-iters", type=int, help="run the plain-torch ALS this many iterations only")
    parser.add_argument("--no-write", action="store_true", help="print, do not touch RESULTS.md")
    args = parser.parse_args(argv)
    params = QUICK if args.quick else FULL
    n, t, d, r = (params[k] for k in ("n", "t", "d", "r"))
    prompts = make_prompts(n, t, d, r)
    import torch

    head = (
        f"`python benchmarks/bench_pack.py{' --quick' if args.quick else ''}`: {n} prompts of [{t}, {d}] at rank "
        f"{r}, the baked prompts of a rank-{r} MPT-like adapter plus {NOISE:.0%} noise (no exact fit); "
        f"--tol {TOL:g}, float64 fit."
    )
    naive_iters = args.naive_iters if args.naive_iters is not None else 1000
    if not args.no_cpu:
        p = torch.from_numpy(prompts.astype(np.float64))
        lines = ["## pack: 100 single-task prompts into one MPT adapter" if not args.quick else "## pack (quick)", ""]
        lines += [head, "", f"Machine: {machine()}.", ""]
        default = threads(None)
        legs: dict[int, tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = {}
        for count in (default, 1) if default != 1 else (1,):
            threads(count)
            print(f"CPU, {count} thread(s): pack ...", flush=True)
            ours = fit_rows(p, r, True)
            plain = fit_rows(p, r, False)
            print(f"CPU, {count} thread(s): plain torch ...", flush=True)
            naive = naive_als(p, r, naive_iters)
            rows = table(f"CPU, {count} torch thread(s)", ours, plain, naive)
            print("\n".join(rows), flush=True)
            lines += rows
            legs[count] = (ours, plain, naive)
        threads(default)
        lines += reading(legs, default)
        print("CPU: mpt-tools pack end to end ...", flush=True)
        wall, peak, count = cli_end_to_end(prompts, r)
        size = prompts.nbytes / 2**20
        lines += [
            f"`mpt-tools pack` on the command line, {count} `.npy` files ({size:.0f} MiB of float32) to an "
            f"adapter, default threads: {fmt_s(wall)} wall (Python and torch start-up, reading, the fit, "
            f"writing), peak RSS {peak:.0f} MiB (the prompts in float64: {2 * size:.0f} MiB).",
            "",
        ]
        text = "\n".join(lines)
        print(text)
        if not args.no_write:
            write_section("pack" if not args.quick else "pack-quick", text)
    if torch.cuda.is_available() and not args.no_gpu:
        p = torch.from_numpy(prompts.astype(np.float64)).cuda()
        print("GPU: pack ...", flush=True)
        fit_rows(p, r, True)  # warm-up (CUDA context, kernels)
        ours = fit_rows(p, r, True)
        plain = fit_rows(p, r, False)
        print("GPU: plain torch ...", flush=True)
        naive = naive_als(p, r, args.naive_iters if args.naive_iters is not None else 20)
        lines = [f"## pack on the GPU: {torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})", "", head, ""]
        lines += table("GPU, float64", ours, plain, naive)
        text = "\n".join(lines)
        print(text)
        if not args.no_write:
            write_section("pack-gpu" if not args.quick else "pack-gpu-quick", text)
    elif not args.no_write and not args.no_cpu and not args.quick:
        write_section("pack-gpu", "## pack on the GPU\n\nGPU: not yet measured (no CUDA device in this run).\n")
    if not args.no_write:
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
