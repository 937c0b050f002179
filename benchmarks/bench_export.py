"""Benchmark ``mpt-tools export`` of all 1000 tasks of the stress source to each format, against a
plain numpy script that computes the same prompts and writes the same number of bytes.

Stress source (bench_init.py writes it under benchmarks/data/stress): 1000 tasks, 100 x 2 virtual
tokens, rank 16, token_dim 8192, float32. It is read as a causal adapter of 200 virtual tokens
(``--task-type CAUSAL_LM --num-transformer-submodules 1 --num-virtual-tokens 200``) so that every
format (vLLM and TensorRT-LLM take no seq2seq) writes 1000 prompts of [200, 8192] float32: 6.55 GB,
plus base64 for vllm. Each run is a fresh process (wall time and peak RSS of the child); its output
is removed before the next run, so the disk never holds more than one.

The numpy script is what a user would write: the source memory-mapped, per task
``pe * (cols[k] @ rows[k])`` in numpy, ``numpy.save`` of it per task (``.npy`` files; for
``trtllm`` one table, rows appended to its file; for ``vllm`` also base64 of each file's bytes), every
file fsynced as mpt-tools does. It writes as many bytes as mpt-tools, in numpy's format, not the
engines' (a safetensors or ``torch.save`` file holds a header of its own around the same bytes).

    python benchmarks/bench_export.py              # 1 round, about 8 minutes on 2 cores
    python benchmarks/bench_export.py --runs 3 --formats tgis,npy
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
from bench_init import MPT, PY, make_source, sample
from bench_verify import machine

FORMATS = ("peft", "tgis", "vllm", "trtllm", "npy")
CAUSAL = ["--task-type", "CAUSAL_LM", "--num-transformer-submodules", "1", "--num-virtual-tokens", "200"]

NUMPY = r"""
import base64, json, os, struct, sys
import numpy as np
src, fmt, out = sys.argv[1], sys.argv[2], sys.argv[3]
with open(src, "rb") as fh:
    n = struct.unpack("<Q", fh.read(8))[0]
    header = json.loads(fh.read(n))
def tensor(name):
    info = header[name]
    a, b = info["data_offsets"]
    return np.memmap(src, dtype=np.float32, mode="r", offset=8 + n + a, shape=tuple(info["shape"]))
pe, cols, rows = tensor("prompt_embeddings"), tensor("prefix_task_cols"), tensor("prefix_task_rows")
os.makedirs(out, exist_ok=True)
def synced(path, write):
    with open(path, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
if fmt == "trtllm":
    with open(os.path.join(out, "prompt_table.npy"), "wb") as fh:
        np.lib.format.write_array_header_1_0(
            fh, {"descr": "<f4", "fortran_order": False, "shape": (cols.shape[0], *pe.shape)}
        )
        for k in range(cols.shape[0]):
            fh.write((pe * (cols[k] @ rows[k])).tobytes())
        fh.flush()
        os.fsync(fh.fileno())
else:
    for k in range(cols.shape[0]):
        prompt = pe * (cols[k] @ rows[k])
        path = os.path.join(out, f"task_{k}.npy")
        synced(path, lambda fh: np.save(fh, prompt))
        if fmt == "vllm":
            data = open(path, "rb").read()
            synced(path[:-4] + ".b64", lambda fh: fh.write(base64.b64encode(data)))
"""


def du(path: Path) -> int:
    """Bytes of the files under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and write its section of benchmarks/RESULTS.md."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1, help="timed rounds (each about 8 minutes)")
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated formats to time")
    parser.add_argument("--no-write", action="store_true", help="print, do not touch RESULTS.md")
    args = parser.parse_args(argv)
    formats = [f for f in args.formats.split(",") if f]
    src = make_source("stress")
    weights = src / "adapter_model.safetensors"
    tmp = Path(tempfile.mkdtemp(prefix="mpt-bench-export-"))
    script = tmp / "numpy_export.py"
    script.write_text(NUMPY)
    rows: dict[str, dict[str, list[float]]] = {}
    try:
        for round_ in range(args.runs):
            for fmt in formats:
                out = tmp / fmt
                ours = [*MPT, "export", str(src), *CAUSAL, "--to", fmt, "--out", str(out), "--quiet"]
                wall, peak = sample(ours)
                size = du(out)
                shutil.rmtree(out)
                base_wall, base_peak = sample([PY, str(script), str(weights), fmt, str(out)])
                base_size = du(out)
                shutil.rmtree(out)
                got = rows.setdefault(fmt, {"wall": [], "peak": [], "bwall": [], "bpeak": []})
                got["wall"].append(wall)
                got["peak"].append(peak)
                got["bwall"].append(base_wall)
                got["bpeak"].append(base_peak)
                got["size"], got["bsize"] = [size], [base_size]
                print(
                    f"round {round_} {fmt}: {wall:.1f} s {peak:.0f} MiB ({size / 1e9:.2f} GB); "
                    f"numpy {base_wall:.1f} s {base_peak:.0f} MiB ({base_size / 1e9:.2f} GB)",
                    flush=True,
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = statistics.median
    lines = [
        "## export: all 1000 tasks of the stress source to each format",
        "",
        f"Machine: {machine()}. Source: 1000 tasks, rank 16, token_dim 8192, float32, read as 200 causal "
        "virtual tokens (every format writes 1000 prompts of [200, 8192] float32). Each run a fresh process "
        f"(median of {args.runs} round(s)); peak RSS is the child's ru_maxrss. Against a plain numpy script "
        "that computes the same prompts and writes as many bytes (`numpy.save` per task, the table's rows "
        "appended to one file, base64 for vllm), each file fsynced as mpt-tools does (see the script in "
        "bench_export.py).",
        "Reproduce: `python benchmarks/bench_export.py`",
        "",
        "| --to | mpt-tools wall (s) | peak RSS (MiB) | written (GB) "
        "| numpy wall (s) | numpy peak RSS (MiB) | numpy written (GB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for fmt, got in rows.items():
        lines.append(
            f"| {fmt} | {med(got['wall']):.1f} | {med(got['peak']):.0f} | {got['size'][0] / 1e9:.2f} | "
            f"{med(got['bwall']):.1f} | {med(got['bpeak']):.0f} | {got['bsize'][0] / 1e9:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        write_section("export", text)


if __name__ == "__main__":
    main()
