"""What a target written by ``init`` promises against its source: finding that source (given, or
recorded and recognised by sha256) and checking the target against its mode's promise."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import Checkpoint, Source, load_source
from ..errors import MptToolsError, flag
from ..formats import json_float, to_float32
from ..modes import RecordError, _shown, find_mode
from ..options import SourceSpec
from ..progress import chunk_starts
from ..results import Failure, SimilarityRow, TargetCheck, TargetReport
from .engine import _check_layout, _plan, _rebuild, _to_device, _torch_dtype


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def _difference(found: np.ndarray, expected: np.ndarray) -> str | None:
    """None when ``found`` holds ``expected``'s bits (``expected`` broadcast over a leading task
    axis); otherwise what differs: how many values, and the largest difference with its index."""
    if found.dtype != expected.dtype:
        return f"dtype {found.dtype} vs {expected.dtype}"
    try:
        want = np.broadcast_to(expected, found.shape)
    except ValueError:
        return f"shape {list(found.shape)} vs {list(expected.shape)}"
    kind = f"u{found.dtype.itemsize}"
    differ = found.view(kind) != want.view(kind)
    count = int(np.count_nonzero(differ))
    if count == 0:
        return None
    with np.errstate(invalid="ignore", over="ignore"):
        gap = np.where(differ, np.abs(found.astype(np.float64) - want.astype(np.float64)), 0.0)
    gap = np.nan_to_num(gap, nan=np.inf)  # a NaN on one side only is the largest difference there is
    where = tuple(int(i) for i in np.unravel_index(int(np.argmax(gap)), found.shape))
    index = ", ".join(str(i) for i in where)
    # each value in the fewest digits that tell it from every other value of its dtype (one ulp shows)
    return f"{count} of {found.size} values differ, the largest at [{index}]: {found[where]!s} vs {want[where]!s}"


def _source_flag() -> str:
    """How a message names verify's source argument: ``--source`` or ``source=...``."""
    return flag("--source", "source=...")


def _resolve_source(target: Checkpoint, source: Source | None, notes: list[str]) -> Checkpoint | None:
    """The source to compare against: the given one, or the recorded one while it still matches.

    A source given as a path or Hub id, and a recorded Hub source, are read with the target's Hub
    token, cache folder and offline switch (not its revision: a Hub source names its own)."""
    meta = target.file.metadata
    sha256 = meta.get("mpt_tools.source_sha256")
    hub = target.hub_options.replace(revision=None)
    if source is not None:
        ckpt = load_source(source if isinstance(source, (Checkpoint, SourceSpec)) else SourceSpec.of(source, hub))
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
        ckpt = load_source(SourceSpec(recorded_path, hub=hub.replace(offline=True)))
    except MptToolsError:
        notes.append(
            f"recorded source {recorded_path} is not in the local Hub cache; "
            f"pass {flag(f'--source {recorded_path}', f'source={recorded_path!r}')} to download it and compare"
        )
        return None
    if sha256 and sha256 != ckpt.sha256():
        notes.append(f"recorded source {recorded_path} changed since init (sha256 differs); pass {_source_flag()}")
        return None
    return ckpt


def _find_local_source(
    target: Checkpoint, recorded_path: str, sha256: str | None, notes: list[str]
) -> Checkpoint | None:
    """The recorded local source, as init's working directory saw it: the path from here first,
    then (when relative, and init recorded a sha256 to recognise it by) from the target's folder
    and up to 8 of its parents, so a target verified from another directory still finds it."""
    # a named adapter: init recorded the folder, and the weights as sub/adapter_model.safetensors
    subfolder = os.path.dirname(target.file.metadata.get("mpt_tools.source_file", "")) or None
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
            ckpt = load_source(SourceSpec(str(cand), subfolder=subfolder) if subfolder and cand.is_dir() else cand)
        except MptToolsError as exc:
            unreadable = unreadable or f"recorded source {recorded_path} cannot be read ({exc}); pass {_source_flag()}"
            continue
        if sha256 and sha256 != ckpt.sha256():
            changed = changed or str(cand)
            continue
        if str(cand) != recorded_path:
            notes.append(f"recorded source {recorded_path} found as {cand} (same sha256)")
        return ckpt
    if changed == recorded_path:
        notes.append(f"recorded source {changed} changed since init (sha256 differs); pass {_source_flag()} to compare")
    elif changed:
        notes.append(
            f"recorded source {recorded_path} not found with its recorded sha256 ({changed} has another); "
            f"pass {_source_flag()} to compare"
        )
    elif unreadable:
        notes.append(unreadable)
    else:
        notes.append(f"recorded source {recorded_path} not found here; pass {_source_flag()} to compare against it")
    return None


def _cmp(name: str, ok: bool, detail: str, found: str | None = None) -> TargetCheck:
    return {"check": name, "ok": ok, "detail": detail, "found": found}


def _target_checks(
    target: Checkpoint, src: Checkpoint, dev: Any, dtype_name: str, chunk_bytes: int
) -> tuple[TargetReport, list[Failure]]:
    """Check that ``target`` is what its recorded mode promises (:meth:`Mode.expect`) against ``src``."""
    import torch

    meta = target.file.metadata
    recorded_mode = meta.get("mpt_tools.mode", "")
    mode = find_mode(recorded_mode)
    result: TargetReport = {
        "source": src.location,
        "source_sha256": src.sha256(),
        "mode": mode.name if mode else "unknown",
        "task": None,
        "checks": [],
        "similarity": None,
    }
    failures: list[Failure] = []
    checks: list[TargetCheck] = result["checks"]

    def add(name: str, ok: bool, detail: str, found: str | None = None) -> None:
        checks.append(_cmp(name, ok, detail, found))
        if not ok:
            said = f"expected {detail}, found {found}" if found else detail
            failures.append({"task": None, "check": "target-mismatch", "message": f"{name}: {said}"})

    def compare(name: str, found: np.ndarray, want: np.ndarray, detail: str) -> None:
        difference = _difference(found, want)
        add(name, difference is None, detail, difference)

    if mode is None:
        add("mode", False, f"recorded mpt_tools.mode {_shown(recorded_mode)} is not one of init's modes")
        return result, failures
    try:  # what init recorded about the target: refuse values init cannot have written
        record = mode.read_record(meta)
    except RecordError as exc:
        add(exc.key.removeprefix("mpt_tools."), False, exc.detail)
        return result, failures
    layout_t = _check_layout(target)
    _, t_t, _, d_t = layout_t
    pe_t = to_float32(target.read("prompt_embeddings"))
    src_pe_shape = src.shapes.get("prompt_embeddings")
    if src_pe_shape != (t_t, d_t):
        add("prompt_embeddings", False, f"shape {list(pe_t.shape)} vs the source's {src_pe_shape}")
        return result, failures
    pe_s = to_float32(src.read("prompt_embeddings"))
    compare("prompt_embeddings", pe_t, pe_s, "bitwise equal to the source's P*")
    cols_t = to_float32(target.read("prefix_task_cols"))
    rows_t = to_float32(target.read("prefix_task_rows"))
    layout_s = layout_t
    if mode.copies_factors:
        layout_s = _check_layout(src)
        if layout_s[1:] != layout_t[1:]:
            add("factors", False, f"target (T, r, d) {layout_t[1:]} vs source {layout_s[1:]}")
            return result, failures
    expected = mode.expect(src, record, layout_t if not mode.copies_factors else layout_s)
    if expected.task is not None:
        result["task"] = expected.task
    for name, detail in expected.failures:
        add(name, False, detail)
    if expected.failures or expected.cols is None or expected.rows is None:
        return result, failures
    if not expected.per_task:
        differ = {"prefix_task_cols": _difference(cols_t, expected.cols)}
        differ["prefix_task_rows"] = _difference(rows_t, expected.rows)
        found = "; ".join(f"{name} {said}" for name, said in differ.items() if said)
        add("factors", not found, expected.what, found or None)
        return result, failures
    cols_differ = _difference(cols_t, expected.cols)
    rows_differ = _difference(rows_t, expected.rows)
    what = expected.what
    if mode.name == "average" and (cols_differ or rows_differ):
        what = _average_mismatch(src, record, cols_t[:1], rows_t[:1], what)
    add("prefix_task_cols", cols_differ is None, what, cols_differ)
    add("prefix_task_rows", rows_differ is None, what, rows_differ)
    dtype = _torch_dtype(dtype_name)
    pe_dev = _dev(pe_t, dev)
    p_target = _rebuild(pe_dev, _dev(cols_t[:1], dev), _dev(rows_t[:1], dev), dtype)
    if expected.prompt_equal:
        p_src = _rebuild(_dev(pe_s, dev), _dev(expected.cols, dev), _dev(expected.rows, dev), dtype)
        detail = f"{dtype_name} prompt bitwise equal to source task {expected.task}'s"
        compare("prompt", p_target.cpu().float().numpy(), p_src.cpu().float().numpy(), detail)
    if expected.similarity_over is not None:
        p_t64 = _rebuild(pe_dev, _dev(cols_t[:1], dev), _dev(rows_t[:1], dev), torch.float64)
        result["similarity"] = _similarity(src, pe_s, p_t64, expected.similarity_over, dev, chunk_bytes)
    return result, failures


def _average_mismatch(src: Checkpoint, record: dict[str, Any], cols: np.ndarray, rows: np.ndarray, what: str) -> str:
    """``what``, naming the cause when an average target is numpy's reproduction of torch's mean
    (mpt_tools.torchmean) but not the mean that this torch computes: its reduction order changed,
    or the target was made for another thread count."""
    from ..factors import average_factors

    try:
        cols_n, rows_n = average_factors(src, record["tasks"], record["weights"], engine="numpy")
    except MptToolsError:
        return what
    if not (_same_bits(cols, cols_n) and _same_bits(rows, rows_n)):
        return what
    import torch

    return (
        f"{what}: the target holds mpt-tools' numpy reproduction of torch's mean, which torch "
        f"{torch.__version__} on {torch.get_num_threads()} threads does not give (its reduction order "
        f"differs, or the target was made for another {flag('--torch-threads', 'TargetPlan(torch_threads=...)')}); "
        + flag("init --engine torch", 'init_adapter() with TargetPlan(engine="torch")')
        + " writes torch's"
    )


def _similarity(
    src: Checkpoint, pe_s: np.ndarray, p_t64: Any, marked: set[int], dev: Any, chunk_bytes: int
) -> list[SimilarityRow]:
    """Per source task: the cosine similarity and relative distance (float64) of the target prompt
    ``p_t64`` to that task's prompt, and whether the task is among ``marked`` (the averaged ones)."""
    import torch

    n_s, t_s, r_s, d_s = _check_layout(src)
    t_norm = torch.linalg.vector_norm(p_t64)
    pe64 = _dev(pe_s, dev).double()
    step = _plan(n_s, t_s, r_s, d_s, 8, chunk_bytes)
    sims: list[SimilarityRow] = []
    buf = torch.empty((min(step, n_s), t_s, d_s), dtype=torch.float64, device=dev)  # reused by every chunk
    target_flat = p_t64.reshape(-1)
    for start in chunk_starts(n_s, step, "source similarity"):
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
                    "averaged": j in marked,
                }
            )
    return sims


def _dev(array: np.ndarray, dev: Any) -> Any:
    """A float32 host array as a device tensor (a private copy)."""
    import torch

    return torch.from_numpy(np.array(array, dtype=np.float32, copy=True, order="C")).to(dev)
