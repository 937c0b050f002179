"""Rebuild every task prompt ``P_k = P* * (U_k @ V_k)`` on a device and verify it.

:func:`verify` rebuilds the prompts of an adapter (a source or a target written by ``init``) in
the requested dtype on the GPU (CUDA) or the CPU, in chunks of whole tasks so that device and host
memory stay bounded, and compares each against a float64 reference computed on the same device
from the same stored factors. Per task it reports the max absolute error, the relative Frobenius
error, ``max |P_k|``, finiteness of the inputs and of the prompt, and the headroom
``max |P_k| / dtype max`` (a float16 prompt above 65504 overflows: a failure).

Tolerances (relative Frobenius error ``||P - P_ref||_F / ||P_ref||_F``, see ``TOLERANCES``) come
from measuring this code on CPU (torch 2.13): 8 tasks each of r in {1, 2, 4, 16, 64},
d in {64, 768, 4096}, T in {8, 100}, (P*, factor) scales (0.02, 0.02), (1, 0.02), (1, 0.3),
(30, 1), stored as float32, bfloat16 and float16 (360 configurations per compute dtype):

=========  =================  =======  ===================================================
compute    unit roundoff u    rtol     worst measured relative Frobenius error
=========  =================  =======  ===================================================
float32    2^-24 = 6.0e-8     1e-6     1.7e-7 (one rounded product, one rounded r-term sum)
float16    2^-11 = 4.9e-4     2e-3     6.4e-4 (inputs rounded to fp16, then the same)
bfloat16   2^-8  = 3.9e-3     2e-2     5.4e-3 (inputs rounded to bf16, then the same)
=========  =================  =======  ===================================================

Each rtol is 3-6x the worst case measured (about 4-5u for the half types), so a correct rebuild
does not trip it, while a wrong factor, a swapped task or a corrupted value (errors of order 1)
always does. The format reference measured the same order with plain torch on an H100 (8e-8 fp32,
5e-4 fp16, 4e-3 bf16). Prompts whose values are subnormal in float16 (below 6.1e-5, e.g. a
random-init target over a small P*) reach 5e-3 relative error from representation alone; an
absolute floor ``atol`` per element (4x the dtype's smallest subnormal, 2.4e-7 for float16) covers
them: a task passes when ``||E||_F <= rtol * ||P_ref||_F + atol * sqrt(T*d)``. A rebuild that is
not finite while the float64 reference is, or ``max |P_k|`` above the dtype's max (65504 for
float16), is an overflow failure; ``headroom`` reports ``max |P_k| / dtype max``. On CUDA, TF32
is switched off for the float32 matmuls while verifying (restored afterwards).

With ``source=`` (or the ``mpt_tools.source`` recorded by ``init`` while that path still exists
and still has the recorded sha256), :func:`verify` also checks that a target is what its mode
promises: exact -> P* and factors bitwise those of source task k (and the prompt bitwise equal);
average -> factors bitwise the means PEFT computes (``torch.mean(0, keepdim=True)`` in the source
dtype, then ``.float()``; ``mpt_tools.tasks``/``mpt_tools.weights`` honoured as in
:func:`mpt_tools.factors.average_factors`), plus per source task the cosine similarity and
relative distance of the target prompt to that task's prompt; shared -> P* bitwise equal (and the
factors bitwise those of the recorded seed).

torch is imported inside the functions only.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .checks import MODES, check_source, errors, refusal, task_runs
from .errors import MptToolsError, ValidationError, VerifyError
from .factors import average_factors, random_factors
from .formats import DTYPE_CHOICES, DTYPE_NAMES, Raw, canonical_dtype, to_float32, to_torch, torch_dtype
from .pipeline import init_adapter, json_float, selection_findings
from .source import Checkpoint, load_source
from .writer import check_output_dir, commit_staged, staging_folder

SCHEMA = "mpt-tools/verify/1"
# Relative Frobenius tolerance per compute dtype (see the module docstring for the measurements).
TOLERANCES: dict[str, float] = {"float32": 1e-6, "float16": 2e-3, "bfloat16": 2e-2}
# Absolute floor per element: 4x the smallest subnormal of the dtype (only matters for fp16).
ATOLS: dict[str, float] = {"float32": 4 * 2.0**-149, "float16": 4 * 2.0**-24, "bfloat16": 4 * 2.0**-133}
DTYPE_MAX: dict[str, float] = {"float32": 3.4028234663852886e38, "float16": 65504.0, "bfloat16": 3.3895313892515355e38}
# Working set per chunk on the device: the prompts in the compute dtype plus the float64 reference
# and error. The CPU default keeps the peak RSS well under 2x the file size of large sources.
DEFAULT_CHUNK_BYTES = {"cpu": 256 << 20, "cuda": 2 << 30}
FACTORS = ("prefix_task_cols", "prefix_task_rows")


class DeviceError(MptToolsError):
    """The requested device cannot be used (e.g. ``cuda`` without a CUDA device)."""


class VerificationFailed(VerifyError):
    """Verification ran and found failures; ``report`` is the full report (``ok`` is False)."""

    def __init__(self, message: str, path: str | None, report: dict[str, Any]) -> None:
        super().__init__(message, path)
        self.report = report


def resolve_device(device: str = "auto") -> Any:
    """The torch device for ``device``: ``auto`` is CUDA when available, else the CPU.

    Raises DeviceError for ``cuda`` (or ``cuda:N``) without a usable CUDA device.
    """
    import torch

    name = (device or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            why = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise DeviceError(f"--device {device}: CUDA is not available ({why}); use --device cpu or auto")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return dev
    raise DeviceError(f"unknown device {device!r}: use auto, cuda or cpu")


def _torch_dtype(dtype: str) -> Any:
    """The torch compute dtype for a dtype name or alias; ValidationError for any other."""
    name = canonical_dtype(dtype)
    if name not in DTYPE_CHOICES:
        raise ValidationError(f"unknown dtype {dtype!r}: use {', '.join(DTYPE_CHOICES)}")
    return torch_dtype(DTYPE_CHOICES[name])


@contextlib.contextmanager
def _exact_fp32_matmul(dev: Any) -> Iterator[None]:
    """Disable TF32 for float32 CUDA matmuls while verifying (restored afterwards)."""
    import torch

    if dev.type != "cuda":
        yield
        return
    mm = torch.backends.cuda.matmul
    if hasattr(mm, "fp32_precision"):
        old = mm.fp32_precision
        mm.fp32_precision = "ieee"
        try:
            yield
        finally:
            mm.fp32_precision = old
    else:  # older torch
        old_tf32 = mm.allow_tf32
        mm.allow_tf32 = False
        try:
            yield
        finally:
            mm.allow_tf32 = old_tf32


def _check_layout(ckpt: Checkpoint) -> tuple[int, int, int, int]:
    """(N, T, r, d) of a checkpoint with consistent P*, U, V; ValidationError otherwise."""
    shapes = ckpt.shapes
    missing = [k for k in ("prompt_embeddings", *FACTORS) if k not in shapes]
    if missing:
        raise ValidationError(f"cannot rebuild prompts: missing {', '.join(missing)}", ckpt.location)
    pe, cols, rows = shapes["prompt_embeddings"], shapes["prefix_task_cols"], shapes["prefix_task_rows"]
    if len(pe) != 2 or len(cols) != 3 or len(rows) != 3:
        raise ValidationError(f"cannot rebuild prompts: unexpected ranks of shapes {pe}, {cols}, {rows}", ckpt.location)
    t, d = pe
    n, t2, r = cols
    n2, r2, d2 = rows
    if (t2, n2, r2, d2) != (t, n, r, d):
        raise ValidationError(
            f"cannot rebuild prompts: shapes disagree (P* {list(pe)}, U {list(cols)}, V {list(rows)})", ckpt.location
        )
    for name in ("prompt_embeddings", *FACTORS):
        info = ckpt.info(name)
        if info is not None and info.dtype not in DTYPE_NAMES:
            raise ValidationError(f"{name} is {info.dtype}, not a float tensor", ckpt.location)
    if 0 in (n, t, r, d):
        raise ValidationError(f"cannot rebuild prompts: empty tensors (N={n}, T={t}, r={r}, d={d})", ckpt.location)
    return n, t, r, d


def _refuse_broken(ckpt: Checkpoint) -> None:
    """Raise ValidationError on the header/config errors every command refuses (values are the
    rebuild's own business: non-finite tasks are reported per task)."""
    problems = errors(check_source(ckpt, values=False))
    if problems:
        raise refusal(ckpt.location, problems)


class _Timer:
    """Host wall time for reads, and CUDA events (or host time on CPU) for transfer and rebuild."""

    def __init__(self, dev: Any) -> None:
        self.cuda = dev.type == "cuda"
        self.read_s = 0.0
        self.transfer_s = 0.0
        self.rebuild_s = 0.0
        self._pairs: dict[str, list[tuple[Any, Any]]] = {"transfer": [], "rebuild": []}

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.read_s += time.perf_counter() - t0

    @contextlib.contextmanager
    def device(self, kind: str) -> Iterator[None]:
        if self.cuda:
            import torch

            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._pairs[kind].append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            elapsed = time.perf_counter() - t0
            if kind == "transfer":
                self.transfer_s += elapsed
            else:
                self.rebuild_s += elapsed

    def finish(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.transfer_s += sum(s.elapsed_time(e) for s, e in self._pairs["transfer"]) / 1000
            self.rebuild_s += sum(s.elapsed_time(e) for s, e in self._pairs["rebuild"]) / 1000
            self._pairs = {"transfer": [], "rebuild": []}


def _host(raw: Raw, dev: Any) -> Any:
    """Host Raw -> torch tensor of the stored dtype, in pinned memory when ``dev`` is CUDA."""
    t = to_torch(raw)
    return t.pin_memory() if dev.type == "cuda" else t


def _upload(host: Any, dev: Any) -> Any:
    """Host tensor -> ``dev`` (a non-blocking copy from pinned memory on CUDA)."""
    return host.to(dev, non_blocking=True) if dev.type == "cuda" else host


def _to_device(raw: Raw, dev: Any) -> Any:
    """Host Raw -> device tensor of the stored dtype (pinned + non_blocking on CUDA)."""
    return _upload(_host(raw, dev), dev)


class _HostBuffers:
    """Reusable host buffers for one chunk of factors, pinned on CUDA, that the file is read
    straight into (no zero-filled or intermediate copy, no pinned allocation per chunk).

    On CUDA two sets alternate: while the device copies and rebuilds one chunk, the host reads the
    next into the other set. Before a set is refilled, :meth:`wait` blocks until the copies that
    read it (enqueued before :meth:`uploaded` recorded its event) have finished.
    """

    def __init__(self, ckpt: Checkpoint, tasks_per_chunk: int, dev: Any) -> None:
        import torch

        self.cuda = dev.type == "cuda"
        self.event: Any = None
        self.buffers = {}
        for name in FACTORS:
            info = ckpt.info(name)
            assert info is not None and info.shape
            row_bytes = info.nbytes // info.shape[0]
            size = row_bytes * tasks_per_chunk
            try:
                self.buffers[name] = torch.empty(size, dtype=torch.uint8, pin_memory=self.cuda)
            except RuntimeError:  # pinned memory refused (locked-memory limits): pageable, still correct
                self.buffers[name] = torch.empty(size, dtype=torch.uint8)

    def wait(self) -> None:
        """Block until the device has finished reading these buffers."""
        if self.event is not None:
            self.event.synchronize()
            self.event = None

    def read(self, ckpt: Checkpoint, name: str, start: int, stop: int) -> Any:
        """Rows ``start:stop`` of factor ``name``, read into this set's buffer, as a tensor view."""
        buf = self.buffers[name]
        raw = ckpt.read_rows(name, start, stop, out=buf.numpy())
        return buf[: raw.nbytes].view(torch_dtype(raw.dtype)).view(raw.shape)

    def uploaded(self) -> None:
        """Mark the end of the copies out of these buffers (CUDA: an event on the current stream)."""
        if self.cuda:
            import torch

            self.event = torch.cuda.Event()
            self.event.record()


def _rebuild(pe: Any, cols: Any, rows: Any, dtype: Any, out: Any = None) -> Any:
    """``P* * (U @ V)`` for a chunk of tasks in ``dtype`` (inputs are cast first), into ``out``
    when given."""
    import torch

    res = torch.bmm(cols.to(dtype), rows.to(dtype), out=out)
    res.mul_(pe.to(dtype))
    return res


def _fused_reductions(dev: Any) -> bool:
    """Whether to use the one-pass ``aminmax`` and mixed-dtype subtraction (CUDA: each is one
    kernel over the chunk) or separate ``amin``/``amax`` and a same-dtype subtraction after an
    upcast (CPU, where those are 2-4x faster). Both give bitwise the same results."""
    return bool(dev.type == "cuda")


def _min_max(flat: Any, fused: bool) -> tuple[Any, Any]:
    """Per-row (min, max) of a 2-D tensor; NaN propagates."""
    import torch

    if fused:
        low, high = torch.aminmax(flat, dim=1)
        return low, high
    return flat.amin(dim=1), flat.amax(dim=1)


def per_task_bytes(t: int, r: int, d: int, itemsize: int) -> int:
    """Working-set bytes of one task in a chunk: its prompt in the compute dtype, in float64 and
    (transiently, when the float64 error is formed) upcast to float64, plus its factors as
    stored, in the compute dtype and in float64 (at most)."""
    return t * d * (itemsize + 8 + 8) + (t * r + r * d) * (itemsize + 8 + 8)


def _plan(n: int, t: int, r: int, d: int, itemsize: int, chunk_bytes: int) -> int:
    """Tasks per chunk so that one chunk's working set stays within ``chunk_bytes``."""
    return max(1, min(n, chunk_bytes // max(1, per_task_bytes(t, r, d, itemsize))))


def _rebuild_checks(
    ckpt: Checkpoint,
    dev: Any,
    dtype_name: str,
    tasks: list[int],
    chunk_bytes: int,
    timer: _Timer,
    chunk_log: list[int] | None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], bool]:
    """Per-task metrics of the rebuild in ``dtype_name`` against float64; returns (tasks, failures, pe_ok)."""
    import torch

    n, t, r, d = _check_layout(ckpt)
    dtype = _torch_dtype(dtype_name)
    itemsize = torch.empty((), dtype=dtype).element_size()
    step = _plan(n, t, r, d, itemsize, chunk_bytes)
    rtol, atol, dmax = TOLERANCES[dtype_name], ATOLS[dtype_name], DTYPE_MAX[dtype_name]
    with timer.read():
        pe_host = _host(ckpt.read("prompt_embeddings"), dev)
    with timer.device("transfer"):
        pe_dev = _upload(pe_host, dev)
    with timer.device("rebuild"):
        pe64 = pe_dev.double()
        pe_ok_t = torch.isfinite(pe64).all()
    pe_c = pe_dev.to(dtype)
    # One float64 and one compute-dtype buffer, reused by every chunk: the working set stays
    # constant (and the allocator has nothing to fragment), whatever the number of tasks.
    rows_max = min(step, len(tasks)) if tasks else 0
    ref_buf = torch.empty((rows_max, t, d), dtype=torch.float64, device=dev)
    out_buf = torch.empty((rows_max, t, d), dtype=dtype, device=dev)
    fused = _fused_reductions(dev)
    # unfused (CPU): the prompt is upcast into its own float64 buffer before the subtraction
    up_buf = None if fused else torch.empty((rows_max, t, d), dtype=torch.float64, device=dev)
    # Per-task results, allocated once (long-lived small tensors made per chunk would pin the
    # heap between the chunks' large temporaries and let it grow with the number of tasks).
    stats = torch.zeros((7, len(tasks)), dtype=torch.float64, device=dev)
    pos = 0
    sets = [_HostBuffers(ckpt, rows_max, dev) for _ in range(2 if dev.type == "cuda" else 1)] if tasks else []
    for i, (start, stop) in enumerate(task_runs(tasks, step)):
        m = stop - start
        if chunk_log is not None:
            chunk_log.append(m)
        host = sets[i % len(sets)]
        host.wait()  # CUDA: the copies out of this set (two chunks ago) have finished
        with timer.read():  # straight from the file into (pinned) host buffers
            cols_host = host.read(ckpt, "prefix_task_cols", start, stop)
            rows_host = host.read(ckpt, "prefix_task_rows", start, stop)
        with timer.device("transfer"):
            cols = _upload(cols_host, dev)
            rows = _upload(rows_host, dev)
        host.uploaded()
        del cols_host, rows_host
        with timer.device("rebuild"):
            cols64, rows64 = cols.double(), rows.double()
            inputs_ok = torch.isfinite(cols64).all(dim=(1, 2)) & torch.isfinite(rows64).all(dim=(1, 2))
            ref = torch.bmm(cols64, rows64, out=ref_buf[:m])
            ref.mul_(pe64)
            del cols64, rows64
            prompt = _rebuild(pe_c, cols, rows, dtype, out=out_buf[:m])
            del cols, rows
            flat = ref.view(m, -1)
            low, high = _min_max(flat, fused)
            ref_finite = torch.isfinite(low) & torch.isfinite(high)
            max_abs = torch.maximum(low.abs(), high.abs())
            ref_norm = torch.linalg.vector_norm(flat, dim=1)
            # now the error (ref - prompt), in float64, in place (the upcast is exact either way)
            ref.sub_(prompt if up_buf is None else up_buf[:m].copy_(prompt))
            del prompt
            err_norm = torch.linalg.vector_norm(flat, dim=1)  # Inf/NaN when the prompt is not finite
            low, high = _min_max(flat, fused)
            err_max = torch.maximum(low.abs(), high.abs())  # NaN propagates, as in max |error|
            del ref, flat
            finite = torch.isfinite(err_norm)
            for row, value in enumerate((inputs_ok, finite, ref_finite, max_abs, ref_norm, err_norm, err_max)):
                stats[row, pos : pos + m] = value
            pos += m
    del ref_buf, out_buf, up_buf, sets
    with timer.device("rebuild"):
        host_stats = stats.cpu().numpy()
        pe_ok = bool(pe_ok_t.cpu())
    timer.finish()
    inputs_ok_a, finite_a, ref_finite_a, max_abs_a, ref_norm_a, err_norm_a, err_max_a = host_stats
    scale = math.sqrt(t * d)
    out: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    if not pe_ok:
        failures.append(
            {
                "task": None,
                "check": "non-finite-input",
                "message": "prompt_embeddings (P*) holds NaN/Inf values",
            }
        )
    for i, k in enumerate(tasks):
        rn, en = float(ref_norm_a[i]), float(err_norm_a[i])
        rel = en / rn if rn > 0 else (0.0 if en == 0 else math.inf)
        mx = float(max_abs_a[i])
        headroom = mx / dmax
        in_ok, fin_ok, ref_ok = bool(inputs_ok_a[i]), bool(finite_a[i]), bool(ref_finite_a[i])
        problems: list[tuple[str, str]] = []
        if not in_ok:
            problems.append(("non-finite-input", "U_k or V_k holds NaN/Inf values"))
        elif not pe_ok or not ref_ok:
            problems.append(("non-finite-prompt", "the float64 prompt is not finite"))
        elif not fin_ok or headroom > 1:
            problems.append(
                (
                    "overflow",
                    f"the {dtype_name} rebuild overflows: max |P_k| {mx:.6g} > {dtype_name} max {dmax:.6g}"
                    if headroom > 1
                    else f"the {dtype_name} rebuild holds Inf/NaN (U_k @ V_k overflows {dtype_name})",
                )
            )
        elif not en <= rtol * rn + atol * scale:
            problems.append(("tolerance", f"relative error {rel:.3g} exceeds {rtol:g} for {dtype_name}"))
        out.append(
            {
                "task": k,
                "max_abs_err": json_float(float(err_max_a[i])),
                "rel_err": json_float(rel),
                "max_abs": json_float(mx),
                "headroom": json_float(headroom),
                "finite": fin_ok and ref_ok,
                "inputs_finite": in_ok and pe_ok,
                "ok": not problems,
            }
        )
        for code, message in problems:
            failures.append({"task": k, "check": code, "message": message})
    return out, failures, pe_ok


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


class _BadRecord(Exception):
    """A recorded ``mpt_tools.*`` value that cannot be what init wrote (hostile or hand-edited)."""

    def __init__(self, key: str, detail: str) -> None:
        super().__init__(detail)
        self.key, self.detail = key, detail


def _shown(text: str) -> str:
    """A recorded value for a message: repr'd, at most 40 characters."""
    return repr(text) if len(text) <= 40 else repr(text[:37]) + "..."


def _meta_list(meta: dict[str, str], key: str, kind: type) -> list[Any] | None:
    """A recorded comma-separated list of ``kind`` (int or float); None when absent or empty."""
    text = meta.get(key)
    if text is None or text == "":
        return None
    try:
        return [kind(v) for v in text.split(",")]
    except ValueError:
        what = "integers" if kind is int else "numbers"
        raise _BadRecord(key, f"recorded {key} {_shown(text)} is not a list of {what}") from None


def _meta_int(meta: dict[str, str], key: str, default: int | None = None) -> int | None:
    """A recorded non-negative integer (``default`` when absent)."""
    text = meta.get(key)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise _BadRecord(key, f"recorded {key} {_shown(text)} is not an integer") from None
    if value < 0:
        raise _BadRecord(key, f"recorded {key} {value} is negative")
    return value


def _resolve_source(
    target: Checkpoint,
    source: str | os.PathLike[str] | Checkpoint | None,
    notes: list[str],
    hub_options: dict[str, Any],
) -> Checkpoint | None:
    """The source to compare against: the given one, or the recorded one while it still matches."""
    meta = target.file.metadata
    sha256 = meta.get("mpt_tools.source_sha256")
    if source is not None:
        ckpt = load_source(source, hub_options=hub_options)
        if sha256 and sha256 != ckpt.sha256():
            notes.append("the given source's sha256 differs from the one recorded by init")
        return ckpt
    recorded_path = meta.get("mpt_tools.source")
    if not recorded_path or "mpt_tools.mode" not in meta:
        return None
    if not recorded_path.startswith("hf://"):
        return _find_local_source(target, recorded_path, sha256, notes)
    # init recorded hf://org/name@commit[/subfolder]: use the Hub cache only (no download)
    try:
        ckpt = load_source(recorded_path, hub_options={**hub_options, "offline": True})
    except MptToolsError:
        notes.append(
            f"recorded source {recorded_path} is not in the local Hub cache; "
            f"pass --source {recorded_path} to download it and compare"
        )
        return None
    if sha256 and sha256 != ckpt.sha256():
        notes.append(f"recorded source {recorded_path} changed since init (sha256 differs); pass --source")
        return None
    return ckpt


def _find_local_source(
    target: Checkpoint, recorded_path: str, sha256: str | None, notes: list[str]
) -> Checkpoint | None:
    """The recorded local source, as init's working directory saw it: the path from here first,
    then (when relative, and init recorded a sha256 to recognise it by) from the target's folder
    and up to 8 of its parents, so a target verified from another directory still finds it."""
    candidates = [Path(recorded_path)]
    if sha256 and not os.path.isabs(recorded_path):
        folder = Path(os.path.abspath(target.weights_path)).parent
        candidates += [base / recorded_path for base in [folder, *folder.parents][:9]]
    seen: set[str] = set()
    changed: str | None = None
    unreadable: str | None = None
    for cand in candidates:
        if not os.path.exists(cand):
            continue
        key = os.path.realpath(cand)
        if key in seen:
            continue
        seen.add(key)
        try:
            ckpt = load_source(cand)
        except MptToolsError as exc:
            unreadable = unreadable or f"recorded source {recorded_path} cannot be read ({exc}); pass --source"
            continue
        if sha256 and sha256 != ckpt.sha256():
            changed = changed or str(cand)
            continue
        if str(cand) != recorded_path:
            notes.append(f"recorded source {recorded_path} found as {cand} (same sha256)")
        return ckpt
    if changed == recorded_path:
        notes.append(f"recorded source {changed} changed since init (sha256 differs); pass --source to compare")
    elif changed:
        notes.append(
            f"recorded source {recorded_path} not found with its recorded sha256 ({changed} has another); "
            "pass --source to compare"
        )
    elif unreadable:
        notes.append(unreadable)
    else:
        notes.append(f"recorded source {recorded_path} not found here; pass --source to compare against it")
    return None


def _cmp(name: str, ok: bool, detail: str) -> dict[str, Any]:
    return {"check": name, "ok": ok, "detail": detail}


def _target_checks(
    target: Checkpoint, src: Checkpoint, dev: Any, dtype_name: str, chunk_bytes: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Check that ``target`` is what its recorded mode promises against ``src``."""
    import torch

    meta = target.file.metadata
    recorded_mode = meta.get("mpt_tools.mode", "")
    mode = MODES.get(recorded_mode.lower())
    result: dict[str, Any] = {
        "source": src.location,
        "source_sha256": src.sha256(),
        "mode": mode or "unknown",
        "task": None,
        "checks": [],
        "similarity": None,
    }
    failures: list[dict[str, Any]] = []
    checks: list[dict[str, Any]] = result["checks"]

    def add(name: str, ok: bool, detail: str) -> None:
        checks.append(_cmp(name, ok, detail))
        if not ok:
            failures.append({"task": None, "check": "target-mismatch", "message": f"{name}: {detail}"})

    if mode is None:
        add("mode", False, f"recorded mpt_tools.mode {_shown(recorded_mode)} is not one of init's modes")
        return result, failures
    try:  # what init recorded about the selection: refuse values init cannot have written
        k = _meta_int(meta, "mpt_tools.task", 0) if mode == "exact" else None
        seed = _meta_int(meta, "mpt_tools.seed") if mode == "shared" else None
        tasks = _meta_list(meta, "mpt_tools.tasks", int) if mode == "average" else None
        weights = _meta_list(meta, "mpt_tools.weights", float) if mode == "average" else None
    except _BadRecord as exc:
        add(exc.key.removeprefix("mpt_tools."), False, exc.detail)
        return result, failures
    n_t, t_t, r_t, d_t = _check_layout(target)
    pe_t = to_float32(target.read("prompt_embeddings"))
    src_pe_shape = src.shapes.get("prompt_embeddings")
    if src_pe_shape != (t_t, d_t):
        add("prompt_embeddings", False, f"shape {list(pe_t.shape)} vs the source's {src_pe_shape}")
        return result, failures
    pe_s = to_float32(src.read("prompt_embeddings"))
    add("prompt_embeddings", _same_bits(pe_t, pe_s), "bitwise equal to the source's P*")
    cols_t = to_float32(target.read("prefix_task_cols"))
    rows_t = to_float32(target.read("prefix_task_rows"))
    if mode == "shared":
        if seed is not None:
            cols_e, rows_e = random_factors(seed, n_t, t_t, r_t, d_t)
            same = _same_bits(cols_t, cols_e) and _same_bits(rows_t, rows_e)
            add("factors", same, f"bitwise the N(0, 0.02) draws of seed {seed}")
        return result, failures
    n_s, t_s, r_s, d_s = _check_layout(src)
    if (t_s, r_s, d_s) != (t_t, r_t, d_t):
        add("factors", False, f"target (T, r, d) {(t_t, r_t, d_t)} vs source {(t_s, r_s, d_s)}")
        return result, failures
    if mode == "exact":
        assert k is not None
        result["task"] = k
        if not k < n_s:
            add("task", False, f"recorded task {k} is not a task of the source (0..{n_s - 1})")
            return result, failures
        cols_e = to_float32(src.read_rows("prefix_task_cols", k, k + 1))
        rows_e = to_float32(src.read_rows("prefix_task_rows", k, k + 1))
        what = f"bitwise source task {k}"
    else:
        bad = errors(selection_findings("average", n_s, tasks, weights, 1))
        for f in bad:
            add(f.field, False, f"recorded mpt_tools.{f.field}: {f.message} (expected {f.expected}, found {f.found})")
        if bad:
            return result, failures
        cols_e, rows_e = average_factors(src, tasks, weights)
        which = f"source tasks {tasks}" if tasks else f"all {n_s} source tasks"
        if weights:
            what = f"bitwise the weighted mean of {which} with weights {weights} (float64, rounded once)"
        else:
            what = f"bitwise the PEFT mean of {which}"
    same_cols = all(_same_bits(cols_t[i : i + 1], cols_e) for i in range(n_t))
    same_rows = all(_same_bits(rows_t[i : i + 1], rows_e) for i in range(n_t))
    add("prefix_task_cols", same_cols, what)
    add("prefix_task_rows", same_rows, what)
    dtype = _torch_dtype(dtype_name)
    pe_dev = _dev(pe_t, dev)
    p_target = _rebuild(pe_dev, _dev(cols_t[:1], dev), _dev(rows_t[:1], dev), dtype)
    if mode == "exact":
        p_src = _rebuild(_dev(pe_s, dev), _dev(cols_e, dev), _dev(rows_e, dev), dtype)
        add("prompt", bool(torch.equal(p_target, p_src)), f"{dtype_name} prompt bitwise equal to source task {k}'s")
        return result, failures
    # average: how close is the target prompt to each source task's prompt (float64)?
    averaged = set(tasks or range(n_s))
    p_t64 = _rebuild(pe_dev, _dev(cols_t[:1], dev), _dev(rows_t[:1], dev), torch.float64)
    t_norm = torch.linalg.vector_norm(p_t64)
    pe64 = _dev(pe_s, dev).double()
    step = _plan(n_s, t_s, r_s, d_s, 8, chunk_bytes)
    sims: list[dict[str, Any]] = []
    buf = torch.empty((min(step, n_s), t_s, d_s), dtype=torch.float64, device=dev)  # reused by every chunk
    target_flat = p_t64.reshape(-1)
    for start in range(0, n_s, step):
        stop = min(n_s, start + step)
        cols = _to_device(src.read_rows("prefix_task_cols", start, stop), dev).double()
        rows = _to_device(src.read_rows("prefix_task_rows", start, stop), dev).double()
        p = torch.bmm(cols, rows, out=buf[: stop - start]).mul_(pe64)
        flat = p.view(stop - start, -1)
        dots = flat @ target_flat  # no chunk-sized temporaries: a matrix-vector product,
        norms = torch.linalg.vector_norm(flat, dim=1)
        dist = torch.linalg.vector_norm(flat.sub_(target_flat), dim=1)  # and the difference in place
        cos = (dots / (norms * t_norm)).cpu().numpy()
        rel = (dist / norms).cpu().numpy()
        for i in range(stop - start):
            j = start + i
            sims.append(
                {
                    "task": j,
                    "cosine": json_float(float(cos[i])),
                    "rel_distance": json_float(float(rel[i])),
                    "averaged": j in averaged,
                }
            )
    result["similarity"] = sims
    return result, failures


def _dev(array: np.ndarray, dev: Any) -> Any:
    """A float32 host array as a device tensor (a private copy)."""
    import torch

    return torch.from_numpy(np.array(array, dtype=np.float32, copy=True, order="C")).to(dev)


def default_chunk_bytes(dev: Any) -> int:
    """The default bound on one chunk's working set: 256 MiB on the CPU; on CUDA 2 GiB, or a
    third of the device's free memory when that is less (never under 64 MiB; a chunk holds at
    least one task whatever the bound)."""
    if dev.type != "cuda":
        return DEFAULT_CHUNK_BYTES["cpu"]
    import torch

    free, _total = torch.cuda.mem_get_info(dev)
    return cuda_chunk_bytes(int(free))


def cuda_chunk_bytes(free: int) -> int:
    """The CUDA chunk bound for ``free`` bytes of free device memory (see :func:`default_chunk_bytes`)."""
    return int(max(64 << 20, min(DEFAULT_CHUNK_BYTES["cuda"], free // 3)))


@contextlib.contextmanager
def _out_of_memory_is_an_error(dev: Any, budget: int) -> Iterator[None]:
    """Turn running out of device or host memory into a one-line DeviceError."""
    import torch

    try:
        yield
    except RuntimeError as exc:
        cuda_oom = isinstance(exc, torch.OutOfMemoryError)
        if not cuda_oom and "can't allocate memory" not in str(exc):
            raise
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            hint = "free GPU memory (other processes?) or use --device cpu"
        else:
            hint = "free memory, or verify fewer --tasks at a time"
        raise DeviceError(
            f"{_describe_device(dev)} ran out of memory while verifying in chunks of up to {budget >> 20} MiB; {hint}"
        ) from None


def _describe_device(dev: Any) -> str:
    import torch

    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return "cpu"


def verify(
    path_or_checkpoint: str | os.PathLike[str] | Checkpoint,
    *,
    source: str | os.PathLike[str] | Checkpoint | None = None,
    device: str = "auto",
    dtype: str = "float32",
    tasks: list[int] | None = None,
    chunk_bytes: int | None = None,
    check: bool = True,
    chunk_log: list[int] | None = None,
    subfolder: str | None = None,
    overrides: dict[str, Any] | None = None,
    hub_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Rebuild every task prompt of an adapter on ``device`` in ``dtype`` and verify it.

    Returns the report (schema ``mpt-tools/verify/1``: device, dtype, tolerance, tasks, target,
    ok, failures, notes, timings). ``tasks`` restricts the rebuild to those tasks; ``chunk_bytes``
    bounds one chunk's working set (default: :func:`default_chunk_bytes`); ``chunk_log``, when
    given, receives the number of tasks of each chunk. With ``source`` (or the recorded
    ``mpt_tools.source``), a target is also checked against what its mode promises.

    When anything fails, raises :class:`VerificationFailed` (a VerifyError naming the failing
    tasks, with the full report as ``.report``) unless ``check`` is False, in which case the
    report is returned with ``ok`` False. Unreadable inputs raise other MptToolsErrors;
    ``device="cuda"`` without CUDA raises :class:`DeviceError`.

    ``subfolder``, ``overrides`` and ``hub_options`` are those of :func:`mpt_tools.source.load_source`
    for the adapter (it may be a Hub repo); the token, cache folder and offline switch of
    ``hub_options`` also serve ``source`` (whose revision and subfolder go in its ``hf://`` spec).
    """
    import torch

    t_start = time.perf_counter()
    dtype_name = canonical_dtype(dtype)
    _torch_dtype(dtype_name)  # validates
    dev = resolve_device(device)
    ckpt = load_source(path_or_checkpoint, subfolder=subfolder, overrides=overrides, hub_options=hub_options)
    _refuse_broken(ckpt)
    n, t, r, d = _check_layout(ckpt)
    if tasks is None:
        selected = list(range(n))
    else:
        bad = [k for k in tasks if not 0 <= k < n]
        if bad:
            raise ValidationError(f"--tasks {bad} out of range: the adapter has {n} tasks (0..{n - 1})", ckpt.location)
        selected = sorted(set(tasks))
    budget = chunk_bytes if chunk_bytes is not None else default_chunk_bytes(dev)
    if budget <= 0:
        raise ValidationError(f"chunk_bytes must be positive, got {budget}")
    notes: list[str] = []
    timer = _Timer(dev)
    target_report: dict[str, Any] | None = None
    with _exact_fp32_matmul(dev), torch.no_grad(), _out_of_memory_is_an_error(dev, budget):
        task_rows, failures, _ = _rebuild_checks(ckpt, dev, dtype_name, selected, budget, timer, chunk_log)
        src = _resolve_source(ckpt, source, notes, {**(hub_options or {}), "revision": None})
        if source is not None and "mpt_tools.mode" not in ckpt.file.metadata:
            failures.append(
                {
                    "task": None,
                    "check": "target-mismatch",
                    "message": "--source given but the adapter records no mpt_tools.mode (not written by init)",
                }
            )
        elif src is not None:
            target_report, target_failures = _target_checks(ckpt, src, dev, dtype_name, budget)
            failures += target_failures
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    info = ckpt.info("prompt_embeddings")
    src_dtype = DTYPE_NAMES.get(info.dtype, info.dtype) if info else None
    report = {
        "schema": SCHEMA,
        "path": ckpt.location,
        "weights": ckpt.weights_path,
        "device": _describe_device(dev),
        "dtype": dtype_name,
        "stored_dtype": src_dtype,
        "tolerance": {
            "rel_frobenius": TOLERANCES[dtype_name],
            "atol_per_element": ATOLS[dtype_name],
            "dtype_max": DTYPE_MAX[dtype_name],
        },
        "shape": {"num_tasks": n, "total_virtual_tokens": t, "num_ranks": r, "token_dim": d},
        "chunk_bytes": budget,
        "tasks": task_rows,
        "target": target_report,
        "ok": not failures,
        "failures": failures,
        "notes": notes,
        "timings": {
            "read_s": round(timer.read_s, 6),
            "transfer_s": round(timer.transfer_s, 6),
            "rebuild_s": round(timer.rebuild_s, 6),
            "total_s": round(time.perf_counter() - t_start, 6),
        },
    }
    if check and not report["ok"]:
        raise failure_error(report)
    return report


def failure_error(report: dict[str, Any]) -> VerificationFailed:
    """The one-line error for a failed report, naming the failing tasks and the first problem."""
    failures = report["failures"]
    tasks = sorted({f["task"] for f in failures if f["task"] is not None})
    first = failures[0]
    if tasks:
        shown = ", ".join(str(k) for k in tasks[:10]) + (f" (+{len(tasks) - 10} more)" if len(tasks) > 10 else "")
        head = f"verification failed for task(s) {shown}"
    else:
        head = "verification failed"
    where = f"task {first['task']}: " if first["task"] is not None else ""
    more = f" [{len(failures)} failure(s) in all]" if len(failures) > 1 else ""
    return VerificationFailed(f"{head}: {where}{first['check']}: {first['message']}{more}", report["path"], report)


def summary_line(report: dict[str, Any]) -> str:
    """One line: ok/FAILED, tasks, device, dtype, worst relative error, largest |P_k| against the
    dtype's largest value, target checks."""
    rels = [t["rel_err"] for t in report["tasks"] if t["rel_err"] is not None]
    peaks = [t["max_abs"] for t in report["tasks"] if t["max_abs"] is not None]
    worst = f"{max(rels):.2g}" if rels else "n/a"
    peak = f"{max(peaks):.3g}" if peaks else "n/a"
    state = "ok" if report["ok"] else "FAILED"
    line = (
        f"verify {state}: {len(report['tasks'])} task(s) on {report['device']} in {report['dtype']}, "
        f"worst rel err {worst} (tol {report['tolerance']['rel_frobenius']:g}), "
        f"max |P_k| {peak} (dtype max {report['tolerance']['dtype_max']:.4g})"
    )
    target = report.get("target")
    if target:
        passed = sum(c["ok"] for c in target["checks"])
        line += f"; {target['mode']} target vs source: {passed}/{len(target['checks'])} checks"
    return line


def _g(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _duration(seconds: float) -> str:
    """A duration for people: ``3.2 ms`` below a second, ``12.3 s`` above."""
    return f"{seconds * 1000:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def report_lines(report: dict[str, Any]) -> list[str]:
    """The report as a readable table (what ``mpt-tools verify`` prints without ``--json``)."""
    tol = report["tolerance"]
    lines = [
        f"verify {report['path']} on {report['device']} in {report['dtype']} "
        f"(stored {report['stored_dtype']}; rel tol {tol['rel_frobenius']:g}, dtype max {tol['dtype_max']:.6g})",
        f"{'task':>6} {'max|err|':>10} {'rel err':>10} {'max|P_k|':>10} {'headroom':>10} {'finite':>7}  status",
    ]
    for t in report["tasks"]:
        status = "ok" if t["ok"] else "FAIL"
        finite = "yes" if t["finite"] and t["inputs_finite"] else "NO"
        lines.append(
            f"{t['task']:>6} {_g(t['max_abs_err']):>10} {_g(t['rel_err']):>10} {_g(t['max_abs']):>10} "
            f"{_g(t['headroom']):>10} {finite:>7}  {status}"
        )
    target = report.get("target")
    if target:
        task = f" task {target['task']}" if target.get("task") is not None else ""
        lines.append(f"target vs source {target['source']} ({target['mode']}{task}):")
        for c in target["checks"]:
            lines.append(f"  {'ok  ' if c['ok'] else 'FAIL'} {c['check']:<18} {c['detail']}")
        if target.get("similarity"):
            lines.append(f"  {'source task':>11} {'cosine':>9} {'rel dist':>9}  averaged")
            for s in target["similarity"]:
                avg = "yes" if s["averaged"] else "no"
                lines.append(f"  {s['task']:>11} {_g(s['cosine']):>9} {_g(s['rel_distance']):>9}  {avg}")
    for note in report["notes"]:
        lines.append(f"note: {note}")
    for f in report["failures"]:
        where = f"task {f['task']}" if f["task"] is not None else "adapter"
        lines.append(f"failure: {where}: {f['check']}: {f['message']}")
    tm = report["timings"]
    lines.append(
        f"timings: read {_duration(tm['read_s'])}, transfer {_duration(tm['transfer_s'])}, "
        f"rebuild {_duration(tm['rebuild_s'])}, total {_duration(tm['total_s'])}"
    )
    lines.append(summary_line(report))
    return lines


def init_and_verify(
    source: str | os.PathLike[str],
    mode: str,
    out: str | os.PathLike[str],
    *,
    subfolder: str | None = None,
    overrides: dict[str, Any] | None = None,
    hub_options: dict[str, Any] | None = None,
    device: str = "auto",
    **init_kwargs: Any,
) -> dict[str, Any]:
    """Run :func:`mpt_tools.pipeline.init_adapter`, then :func:`verify` the written folder against
    the source; returns init's result with the verify report under ``"verify"``.

    The adapter is written and verified in a hidden :func:`mpt_tools.writer.staging_folder` and
    only then moved into place by :func:`mpt_tools.writer.commit_staged`. On a failed verification
    the staging folder is removed and ``out`` is left exactly as it was; then VerificationFailed is
    raised.
    """
    resolve_device(device)  # fail before writing anything
    ckpt = load_source(source, subfolder=subfolder, overrides=overrides, hub_options=hub_options)
    folder = Path(out)
    check_output_dir(folder, force=bool(init_kwargs.get("force")), protected=ckpt.source_paths)
    staging = staging_folder(folder)
    try:
        result = init_adapter(ckpt, mode, staging, **init_kwargs)
        report = verify(staging, source=ckpt, device=device, check=False)
        if not report["ok"]:
            err = failure_error(report)
            kept = " (nothing was written)" if not folder.exists() else f" ({folder} was left as it was)"
            raise VerificationFailed(err.message + kept, str(out), report)
        commit_staged(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for key, value in list(report.items()):  # name the final folder, not the staging one
        if isinstance(value, str) and value.startswith(str(staging)):
            report[key] = str(folder) + value[len(str(staging)) :]
    files = [str(folder / Path(f).name) for f in result["files"]]
    return {**result, "out": str(folder), "files": files, "verify": report}


__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "SCHEMA",
    "TOLERANCES",
    "DeviceError",
    "VerificationFailed",
    "cuda_chunk_bytes",
    "default_chunk_bytes",
    "failure_error",
    "init_and_verify",
    "per_task_bytes",
    "report_lines",
    "resolve_device",
    "summary_line",
    "verify",
]
