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
import time
from collections.abc import Iterator
from typing import Any

from .. import prompts
from ..checkpoint import Checkpoint
from ..dtypes import DTYPE_MAX
from ..errors import DeviceError, ValidationError, flag
from ..formats import DTYPE_CHOICES, DTYPE_NAMES, Raw, canonical_dtype, json_float, to_torch, torch_dtype
from ..progress import tracked
from ..prompts import plan_chunks, task_runs
from ..results import Failure, TaskCheck

SCHEMA = "mpt-tools/verify/1"
# Relative Frobenius tolerance per compute dtype (see the module docstring for the measurements).
TOLERANCES: dict[str, float] = {"float32": 1e-6, "float16": 2e-3, "bfloat16": 2e-2}
# Absolute floor per element: 4x the smallest subnormal of the dtype (only matters for fp16).
ATOLS: dict[str, float] = {"float32": 4 * 2.0**-149, "float16": 4 * 2.0**-24, "bfloat16": 4 * 2.0**-133}
# Working set per chunk on the device: the prompts in the compute dtype plus the float64 reference
# and error. The CPU default keeps the peak RSS well under 2x the file size of large sources.
DEFAULT_CHUNK_BYTES = {"cpu": 256 << 20, "cuda": 2 << 30}
FACTORS = ("prefix_task_cols", "prefix_task_rows")


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
            given, use = (
                flag(f"--device {device}", f'device="{device}"'),
                flag("--device cpu or auto", 'device="cpu" or "auto"'),
            )
            raise DeviceError(f"{given}: CUDA is not available ({why}); use {use}")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            given = flag(f"--device {device}", f'device="{device}"')
            raise DeviceError(f"{given}: only {torch.cuda.device_count()} CUDA device(s) visible")
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
    return min(n, plan_chunks(per_task_bytes(t, r, d, itemsize), chunk_bytes))


def _rebuild_checks(
    ckpt: Checkpoint,
    dev: Any,
    dtype_name: str,
    tasks: list[int],
    chunk_bytes: int,
    timer: _Timer,
    chunk_log: list[int] | None,
) -> tuple[list[TaskCheck], list[Failure], str | None]:
    """Per-task metrics of the rebuild in ``dtype_name`` against float64; returns (tasks, failures,
    note): at most :data:`mpt_tools.prompts.MAX_TASK_ROWS` task rows and failures are listed, the
    note (else None) sums up the rest."""
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
        pe_peak_t = pe64.abs().max() if pe64.numel() else pe64.new_zeros(())
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
    runs = tracked(task_runs(tasks, step), len(tasks), "verify", size=lambda run: run[1] - run[0])
    for i, (start, stop) in enumerate(runs):
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
        pe_peak = float(pe_peak_t.cpu())
    timer.finish()
    inputs_ok_a, finite_a, ref_finite_a, max_abs_a, ref_norm_a, err_norm_a, err_max_a = host_stats
    scale = math.sqrt(t * d)
    out: list[TaskCheck] = []
    failures: list[Failure] = []
    if not pe_ok:
        failures.append(
            {
                "task": None,
                "check": "non-finite-input",
                "message": "prompt_embeddings (P*) holds NaN/Inf values",
            }
        )
    cap = prompts.MAX_TASK_ROWS  # rows listed: memory stays bounded for millions of tasks
    unlisted = unlisted_failing = unlisted_failures = 0
    worst: tuple[float, int] | None = None
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
                    else f"the {dtype_name} rebuild holds Inf/NaN (P* holds {pe_peak:.6g}, beyond {dtype_name} max "
                    f"{dmax:.6g}, so its {dtype_name} cast is Inf)"
                    if pe_peak > dmax
                    else f"the {dtype_name} rebuild holds Inf/NaN (U_k @ V_k overflows {dtype_name})",
                )
            )
        elif not en <= rtol * rn + atol * scale:
            problems.append(("tolerance", f"relative error {rel:.3g} exceeds {rtol:g} for {dtype_name}"))
        if len(out) >= cap:
            unlisted += 1
            unlisted_failing += bool(problems)
            if worst is None or not rel <= worst[0]:
                worst = (rel, k)
            for code, message in problems:
                if len(failures) < cap:
                    failures.append({"task": k, "check": code, "message": message})
                else:
                    unlisted_failures += 1
            continue
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
    note = None
    if unlisted:
        assert worst is not None
        note = (
            f"per-task rows listed for the first {len(out)} of {len(tasks)} tasks (at most {cap}); over the "
            f"other {unlisted}: {unlisted_failing} failing, worst relative error {worst[0]:.3g} (task {worst[1]})"
        )
        if unlisted_failures:
            note += f"; {unlisted_failures} more failure(s) not listed"
    return out, failures, note


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
            hint = "free GPU memory (other processes?) or use " + flag("--device cpu", 'device="cpu"')
        else:
            hint = "free memory, or verify fewer " + flag("--tasks", "tasks") + " at a time"
        raise DeviceError(
            f"{_describe_device(dev)} ran out of memory while verifying in chunks of up to {budget >> 20} MiB; {hint}"
        ) from None


def _describe_device(dev: Any) -> str:
    import torch

    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return "cpu"
