"""``export``: bake every task's prompt ``P_k = P* * (cols[k] @ rows[k])`` for a serving engine.

No serving engine reads MPT factors: each one that serves soft prompts wants task k's baked
prompt ([T, d]) in its own layout. :func:`export_prompts` writes the chosen tasks (all by default)
in one call, for one of :data:`FORMATS`:

- ``peft``: one PEFT ``PROMPT_TUNING`` folder per task (``<out>/<name>/``), as ``export-prompt``
  writes one;
- ``tgis``: an IBM TGIS prefix store, ``<out>/<name>/decoder.pt`` (+ ``encoder.pt`` for an
  encoder-decoder model) holding bare, contiguous CPU tensors; ``caikit`` adds caikit-nlp's
  ``config.yml`` so each folder also loads as a caikit prompt-tuning module;
- ``vllm``: ``<out>/<name>.pt`` (``torch.save`` of the tensor) and ``<out>/<name>.b64`` (base64
  of exactly those bytes), what vLLM's ``prompt_embeds`` takes offline and over HTTP;
- ``trtllm``: ``<out>/prompt_table.npy``, float32 ``[N, T, d]``, row i = the i-th exported task
  (TensorRT-LLM's prompt table, ``prompt_tasks`` index);
- ``npy``: ``<out>/<name>.npy``, float32 ``[T, d]``, for hand-written hosts.

Every prompt is computed as PEFT's forward computes it (parameters upcast to float32, then
``torch.matmul(cols[k:k+1], rows[k:k+1])`` and an in-place product with P*), so a PEFT folder
gives bitwise PEFT's MPT prompt. The factors are read in chunks of tasks (at most
``chunk_bytes`` each) and each prompt is written as soon as it is made, so memory stays bounded
whatever the number of tasks. Every limit is checked before anything is written (task indices and
names, seq2seq where the engine cannot take it, TGIS's length and even-row rules, ``d`` against
``--base-model``, values that would be Inf after the cast to ``dtype``); everything is built in a
staging folder and moved into ``out`` at the end, with ``manifest.json`` (source, sha256, task ->
files, T, d, dtype, how to serve it) last. Nothing in ``out`` is replaced without ``force``.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import shlex
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from .checkpoint import Checkpoint, Source, load_source
from .checks import config_findings, prompt_findings, require_valid, tensor_findings, value_findings
from .config import CONFIG_NAME, WEIGHTS_NAME, config_to_json
from .dtypes import DTYPE_MAX, canonical_dtype
from .errors import ConfigError, MptToolsError, SourceError, WriteError, flag
from .files import fsync_dir, guard_entries, guard_output, replace_entries, staging_folder, write_synced
from .findings import Finding, errors, refusal
from .formats import DTYPE_CHOICES, from_torch, safetensors_parts, to_torch
from .options import checked_indices, checked_positive, readable_fields
from .paths import read_small
from .progress import progress
from .prompts import CHUNK_BYTES, plan_chunks, task_runs
from .surgery import prompt_tuning_config, seq2seq_decoder_finding
from .version import __version__
from .writer import fit_for_peft, fit_note, provenance

if TYPE_CHECKING:  # types only: importing them costs start-up time
    from .results import ExportedTask, ExportResult

FORMATS = ("peft", "tgis", "vllm", "trtllm", "npy")
"""The export formats, in the order ``--help`` lists them."""
MANIFEST = "manifest.json"
MANIFEST_SCHEMA = "mpt-tools/export-manifest/1"
TABLE = "prompt_table.npy"
CAIKIT_CONFIG = "config.yml"
CAIKIT_MODULE = {  # caikit-nlp's PeftPromptTuning module (caikit_nlp/modules/text_generation/peft_prompt_tuning.py)
    "module_id": "6655831b-960a-4dc5-8df4-867026e2cd41",
    "name": "Peft generation",
    "version": "0.1.0",
    "module_class": "caikit_nlp.modules.text_generation.peft_prompt_tuning.PeftPromptTuning",
}
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}")
"""A name of an exported task (a file or folder name): no path, no leading dot."""
TGIS_NAME = re.compile(r"[A-Za-z0-9_-]{1,200}")
"""A TGIS prefix id part (TGIS takes ``[/\\w-]+``; the folder's name is the ``prefix_id``)."""
TGIS_PREFIX_ID = re.compile(r"[/\w\-]+")
"""The prefix ids TGIS accepts (``VALID_PREFIX_ID_PATTERN``, fullmatch)."""
# The smallest float32 magnitude that is Inf after the cast (round to nearest even: the halfway
# point between the largest finite value and the next power of two rounds up).
CAST_LIMITS = {"float16": 65520.0, "bfloat16": 2.0**128 - 2.0**119}
SEQ2SEQ = "SEQ_2_SEQ_LM"


@readable_fields
class ExportOptions(NamedTuple):
    """How :func:`export_prompts` writes.

    ``dtype``: the dtype the prompts are stored in (``peft``, ``tgis``, ``vllm``) or that the
    engine casts them to (``trtllm``, ``npy``: the files stay float32); every value must be finite
    in it. ``encoder_only``: seq2seq with 2 submodules, only the encoder half (rows 0:nvt; peft,
    tgis, npy). ``max_prefix_len``: TGIS's ``MAX_PROMPT_PREFIX_LENGTH``, checked against every
    file's rows. ``caikit``: also write caikit-nlp's config.yml (tgis). ``base_model``: a Hub id or
    local folder (True: the config's base model) whose hidden size ``d`` must equal.
    ``peft_compat``: the PEFT release the peft folders' adapter_config.json is written for.
    ``chunk_bytes``: the most bytes of factors read at once."""

    dtype: str = "float32"
    encoder_only: bool = False
    max_prefix_len: int | None = None
    caikit: bool = False
    base_model: str | bool | None = None
    peft_compat: str | None = None
    chunk_bytes: int = CHUNK_BYTES


class _Layout(NamedTuple):
    """What one exported task becomes: its files as ``(relative path with {name}, first row, stop
    row)`` of its prompt, the dtype the files hold, and whether the model is encoder-decoder."""

    parts: list[tuple[str, int, int]]  # per task, "{name}" filled in later
    file_dtype: str
    seq2seq: bool


def _usage(field: str, message: str, found: Any, fix: str, expected: Any = None) -> Finding:
    return Finding.error("usage", field, message, expected=expected, found=found, fix=fix)


def _to(fmt: str) -> str:
    """export_prompts' ``to`` argument in Python: ``to="tgis"``."""
    return f'to="{fmt}"'


def _encoder_only() -> str:
    """How a message names the encoder half: ``--encoder-only`` or ``ExportOptions(encoder_only=True)``."""
    return flag("--encoder-only", "ExportOptions(encoder_only=True)")


def _layout(fmt: str, ckpt: Checkpoint, opts: ExportOptions, extra: list[Finding]) -> _Layout | None:
    """The files of one task in ``fmt`` (None when the source's sizes are unknown), adding the
    findings that refuse the export to ``extra``."""
    pe = ckpt.shapes.get("prompt_embeddings")
    if not pe or len(pe) != 2:
        return None
    t = pe[0]
    nts = ckpt.config.num_transformer_submodules or 1
    nvt = ckpt.config.size("num_virtual_tokens") or (t // nts)
    split = nts == 2
    seq2seq = split or ckpt.config.task_type == SEQ2SEQ
    if opts.encoder_only and (not split or fmt in ("vllm", "trtllm")):
        why = (
            "applies to seq2seq adapters with 2 transformer submodules"
            if not split
            else flag(f"--to {fmt}", _to(fmt)) + " takes none"
        )
        extra.append(_usage("encoder_only", why, nts if not split else fmt, "drop " + _encoder_only()))
    if fmt in ("vllm", "trtllm"):
        engine = "vLLM's prompt_embeds" if fmt == "vllm" else "TensorRT-LLM's prompt table"
        refused = decoder_only_finding(ckpt, engine)
        if refused is not None:
            extra.append(refused)
    enc = (0, nvt) if split else (0, t)
    if fmt == "peft":
        if split and not opts.encoder_only:
            fix = f"pass {_encoder_only()} to export the encoder half (what generate() uses)"
            fix += ", or " + flag("--to tgis", _to("tgis")) if nvt % 2 == 0 else ""  # TGIS refuses an odd prefix length
            extra.append(seq2seq_decoder_finding(fix))
        a, b = enc if opts.encoder_only else (0, t)
        return _Layout([(f"{{name}}/{WEIGHTS_NAME}", a, b), (f"{{name}}/{CONFIG_NAME}", a, b)], opts.dtype, seq2seq)
    if fmt == "tgis":
        if not seq2seq:
            parts = [("{name}/decoder.pt", 0, t)]
        elif split and not opts.encoder_only:
            parts = [("{name}/encoder.pt", 0, nvt), ("{name}/decoder.pt", nvt, t)]
        else:
            parts = [("{name}/encoder.pt", *enc)]
        return _Layout(parts, opts.dtype, seq2seq)
    if fmt == "vllm":
        return _Layout([("{name}.pt", 0, t), ("{name}.b64", 0, t)], opts.dtype, seq2seq)
    if fmt == "trtllm":
        return _Layout([(TABLE, 0, t)], "float32", seq2seq)
    a, b = enc if opts.encoder_only else (0, t)
    return _Layout([("{name}.npy", a, b)], "float32", seq2seq)


def decoder_only_finding(ckpt: Checkpoint, engine: str) -> Finding | None:
    """The refusal of an encoder-decoder adapter (task_type SEQ_2_SEQ_LM, or 2 transformer
    submodules) where ``engine`` serves decoder-only models (vLLM's prompt_embeds, TensorRT-LLM's
    prompt table, the input ``embed`` builds); None for a decoder-only adapter. The fix names only
    the exports that take this adapter (``--encoder-only`` needs 2 submodules)."""
    split = ckpt.config.num_transformer_submodules == 2
    if not split and ckpt.config.task_type != SEQ2SEQ:
        return None
    if split:
        fix = flag(
            "export it --to tgis, --to peft --encoder-only or --to npy",
            f"export it {_to('tgis')}, {_to('peft')} with {_encoder_only()} or {_to('npy')}",
        )
    else:
        fix = flag(
            "export it --to tgis, --to peft or --to npy", f"export it {_to('tgis')}, {_to('peft')} or {_to('npy')}"
        )
    return Finding.error(
        "seq2seq",
        "num_transformer_submodules" if split else "task_type",
        f"{engine} serves decoder-only models; this adapter is for an encoder-decoder model",
        expected=1 if split else "CAUSAL_LM",
        found=ckpt.config.num_transformer_submodules if split else ckpt.config.task_type,
        fix=fix,
    )


def _tgis_rules(layout: _Layout, opts: ExportOptions, first: int, extra: list[Finding]) -> None:
    """TGIS's own limits on a prefix tensor: rows <= MAX_PROMPT_PREFIX_LENGTH (when given) and,
    for an encoder-decoder model, an even number of rows."""
    for path, a, b in layout.parts:
        rows, file = b - a, path.split("/")[-1]
        if opts.max_prefix_len is not None and rows > opts.max_prefix_len:
            extra.append(
                Finding.error(
                    "tgis-length",
                    "max_prefix_len",
                    f"TGIS refuses a prefix longer than MAX_PROMPT_PREFIX_LENGTH: task {first}'s {file} "
                    f"(every task's) would hold {rows} rows",
                    expected=f"<= {opts.max_prefix_len}",
                    found=rows,
                    fix="raise MAX_PROMPT_PREFIX_LENGTH on the server (and "
                    + flag("--max-prefix-len", "ExportOptions(max_prefix_len=...)")
                    + ")",
                )
            )
        if layout.seq2seq and rows % 2:
            extra.append(
                Finding.error(
                    "tgis-even-rows",
                    "num_virtual_tokens",
                    f"TGIS refuses an odd prefix length for encoder-decoder models: task {first}'s {file} "
                    f"(every task's) would hold {rows} rows",
                    expected="an even number of rows",
                    found=rows,
                    fix=flag(
                        "export it --to peft --encoder-only or --to npy",
                        f"export it {_to('peft')} with {_encoder_only()} or {_to('npy')}",
                    )
                    + ", or train an even num_virtual_tokens",
                )
            )


def _names_findings(fmt: str, tasks: list[int], names: list[str], n: int) -> list[Finding]:
    """Task indices in range and listed once; one valid, distinct name per task."""
    out: list[Finding] = []
    if not tasks:
        fix = flag("list tasks like 0,2 or give all", "list tasks like [0, 2] or give all (tasks=None)")
        out.append(_usage("tasks", "no tasks given", "[]", fix, "at least one task"))
    bad = [k for k in tasks if k < 0 or k >= n]
    if bad:
        out.append(
            Finding.error(
                "task-range",
                "tasks",
                f"the source has {n} tasks",
                expected=f"0..{n - 1}",
                found=bad[:10],
                fix=f"pick tasks in 0..{n - 1}",
            )
        )
    seen: set[int] = set()
    twice = sorted({k for k in tasks if k in seen or seen.add(k)})  # type: ignore[func-returns-value]
    if twice:
        out.append(_usage("tasks", "a task is listed more than once", twice[:10], "list each task once"))
    if len(names) != len(tasks):
        out.append(
            _usage(
                "names",
                "one name per exported task",
                len(names),
                "give as many " + flag("--names", "names") + " as tasks",
                expected=len(tasks),
            )
        )
    rule, what = (TGIS_NAME, "letters, digits, _ and -") if fmt == "tgis" else (NAME, "letters, digits, _, . and -")
    reserved = {MANIFEST, MANIFEST.split(".")[0], TABLE, TABLE.split(".")[0]}  # the export's own files
    wrong = [x for x in names if not rule.fullmatch(x) or x.casefold() in reserved]
    if wrong:
        out.append(
            _usage(
                "names",
                f"a name must be 1-200 of {what}, not starting with . or - (and not {MANIFEST} or {TABLE}, "
                "with or without the extension)",
                wrong[:5],
                "rename them",
            )
        )
    folded = [name.casefold() for name in names]  # QA and qa are one file on macOS and Windows
    if len(set(folded)) != len(folded):
        repeated = sorted({name for name, key in zip(names, folded, strict=True) if folded.count(key) > 1})
        out.append(_usage("names", "names must be distinct, ignoring case", repeated[:5], "rename the repeats"))
    return out


def _source_findings(ckpt: Checkpoint, bounds: dict[str, Any], chunk_bytes: int) -> list[Finding]:
    """:func:`mpt_tools.checks.check_source`'s findings, keeping the bounds its value scan gathers
    (per task max_t sum_r |cols|, max |rows|; max |P*|) for the cast check."""
    out = config_findings(ckpt.config, ckpt.config_from_file) + tensor_findings(ckpt)
    out += value_findings(ckpt, chunk_bytes, bounds=bounds)
    if not errors(out):
        out += prompt_findings(ckpt, chunk_bytes, bounds=bounds)
    return out


def cast_overflow(prompt: Any, dtype: str) -> float | None:
    """The largest |value| of a float32 ``prompt`` that is not finite once cast to ``dtype``, or
    None when every value is finite there. Its max and min decide (two passes in numpy, no
    temporaries: torch's isfinite costs ~30x more); the cast itself only when one is beyond."""
    import torch

    arr = prompt.numpy()
    with np.errstate(all="ignore"):
        peak = max(float(arr.max()), -float(arr.min())) if arr.size else 0.0
    if peak < CAST_LIMITS.get(dtype, np.inf):  # False for NaN too
        return None
    cast_ = prompt.to(getattr(torch, dtype))
    bad = prompt[~torch.isfinite(cast_)]
    return float(bad.abs().max()) if bad.numel() else float("nan")


def _cast_finding(task: int, peak: float, dtype: str) -> Finding:
    return Finding.error(
        "cast-overflow",
        "dtype",
        f"task {task}'s prompt holds {peak:.5g}, which is Inf in {dtype}",
        expected=f"|P_k| <= {DTYPE_MAX[dtype]:.5g}",
        found=f"{peak:.5g}",
        fix="export with "
        + flag("--dtype float32", 'ExportOptions(dtype="float32")')
        + (flag(" or bfloat16", ' or "bfloat16"') if dtype == "float16" else ""),
    )


def task_prompts(ckpt: Checkpoint, tasks: Sequence[int], chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[int, Any]]:
    """``(k, P_k)`` for each task of ``tasks`` in order, P_k a float32 torch tensor [T, d] computed
    as PEFT's forward computes it: parameters upcast to float32, ``torch.matmul`` of task k's
    ``[1, T, r]`` and ``[1, r, d]`` factors, then the elementwise product with P*. The factors are
    read in runs of consecutive tasks of at most ``chunk_bytes``."""
    import torch

    pe = to_torch(ckpt.read("prompt_embeddings")).to(torch.float32)
    _n, t, r = ckpt.shapes["prefix_task_cols"]
    d = ckpt.shapes["prompt_embeddings"][1]
    # per task: the factors as stored (at most 8 bytes a value) and as float32
    step = plan_chunks((t * r + r * d) * (8 + 4), chunk_bytes)
    for a, b in task_runs(list(tasks), step):
        cols = to_torch(ckpt.read_rows("prefix_task_cols", a, b)).to(torch.float32)
        rows = to_torch(ckpt.read_rows("prefix_task_rows", a, b)).to(torch.float32)
        for i in range(b - a):
            # PEFT: prompt_embeddings *= task_prompts; the product times P* in place is the same
            # (an IEEE product does not depend on the order of its factors), without a copy of P*
            prompt = torch.matmul(cols[i : i + 1].clone(), rows[i : i + 1].clone())
            prompt.mul_(pe)
            yield a + i, prompt[0]


def _cast_check(ckpt: Checkpoint, tasks: list[int], dtype: str, bounds: dict[str, Any], chunk: int) -> Finding | None:
    """Before anything is written: the first task whose prompt would hold Inf in ``dtype``. A
    per-task bound from the value scan (max|P*| * max_t sum_r |cols| * max |rows|) clears most
    tasks; only the others are computed."""
    limit = CAST_LIMITS.get(dtype)
    if limit is None or not {"cols", "rows"} <= set(bounds):
        return None
    idx = np.asarray(tasks, dtype=np.int64)
    with np.errstate(all="ignore"):
        bound = bounds["cols"][idx] * bounds["rows"][idx] * bounds.get("pe_max", 0.0) * (1 + 1e-6)
    suspects = [int(k) for k in idx[~(bound < limit)]]
    for k, prompt in task_prompts(ckpt, suspects, chunk):
        peak = cast_overflow(prompt, dtype)
        if peak is not None:
            return _cast_finding(k, peak, dtype)
    return None


# --- writing -----------------------------------------------------------------------------------


def _npy_header(shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` header ``numpy.save`` writes for a C-order float32 array of ``shape``."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _torch_bytes(tensor: Any) -> bytes:
    """``torch.save`` of a bare tensor, as bytes (the tensor owns its storage: see the caller)."""
    import torch

    buf = io.BytesIO()
    torch.save(tensor, buf)
    return buf.getvalue()


def _yaml(data: dict[str, Any]) -> str:
    """A flat mapping as YAML (keys sorted, each value a JSON scalar, which YAML reads as the same
    value): what caikit's ``yaml.safe_load`` reads."""
    return "".join(f"{key}: {json.dumps(data[key], ensure_ascii=True)}\n" for key in sorted(data))


def caikit_config(ckpt: Checkpoint, files: dict[str, str], dtype: str, task: int) -> str:
    """caikit-nlp's config.yml for one TGIS prefix folder: the keys its ``PeftPromptTuning.save``
    writes (module id, name, version and class; base model, eos token, verbalizer, tuning and task
    type, trained dtype, output model types, the ENCODER and DECODER file names), so
    ``PeftPromptTuningTGIS.load`` hands the files to TGIS under the folder's name. The eos token is
    unknown here (null; caikit accepts none)."""
    kinds = [kind for kind in ("ENCODER", "DECODER") if files.get(kind)]
    data: dict[str, Any] = {
        **CAIKIT_MODULE,
        "base_model_config": {},
        "base_model_name": ckpt.config.raw.get("base_model_name_or_path") or "",
        "eos_token": None,
        "has_base_model": False,
        "verbalizer": "{{input}}",
        "tuning_type": "PROMPT_TUNING",
        "task_type": ckpt.config.task_type or "CAUSAL_LM",
        "trained_torch_dtype": dtype,
        "output_model_types": json.dumps(kinds),
        "ENCODER": files.get("ENCODER", ""),
        "DECODER": files.get("DECODER", ""),
        "mpt_tools_version": __version__,
        "mpt_tools_source_sha256": ckpt.sha256(),
        "mpt_tools_task": task,
    }
    return _yaml(data)


class _Writer:
    """Writes each task's files into the staging folder as the prompts come."""

    def __init__(self, fmt: str, ckpt: Checkpoint, stage: Path, layout: _Layout, opts: ExportOptions, n: int) -> None:
        self.fmt, self.ckpt, self.stage, self.layout, self.opts = fmt, ckpt, stage, layout, opts
        self.written: list[str] = []  # relative paths
        self.table: Any = None
        if fmt == "peft":
            nvt = ckpt.config.size("num_virtual_tokens")
            rows = layout.parts[0][2] - layout.parts[0][1]
            nts = 1 if opts.encoder_only else (ckpt.config.num_transformer_submodules or 1)
            self.fit = fit_for_peft(prompt_tuning_config(ckpt, nvt or rows // nts, nts), opts.peft_compat, ckpt.where)
            self.config_text = config_to_json(self.fit.config)
        if fmt == "trtllm":
            t, d = layout.parts[0][2], ckpt.shapes["prompt_embeddings"][1]
            path = stage / TABLE
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
            fd = os.open(path, flags, 0o666)  # the kernel takes the umask off, as for every file written
            self.table = os.fdopen(fd, "wb")
            self.table.write(_npy_header((n, t, d)))
            self.written.append(TABLE)

    def _file(self, rel: str, data: Any) -> None:
        path = self.stage / rel
        path.parent.mkdir(exist_ok=True)
        write_synced(path, data)
        self.written.append(rel)

    def add(self, k: int, name: str, prompt: Any) -> list[str]:
        """Write task ``k`` (float32 ``prompt`` [T, d]) as ``name``; its relative paths."""
        import torch

        fmt, opts = self.fmt, self.opts
        parts = [(p.format(name=name), a, b) for p, a, b in self.layout.parts]
        if fmt == "trtllm":
            self.table.write(memoryview(prompt.numpy()).cast("B"))
            return [TABLE]
        if fmt == "npy":
            rel, a, b = parts[0]
            arr = np.ascontiguousarray(prompt[a:b].numpy())
            self._file(rel, [_npy_header(arr.shape), arr.reshape(-1).view(np.uint8).data])
            return [rel]
        stored = prompt.to(getattr(torch, opts.dtype))
        if fmt == "peft":
            (weights, a, b), (config, _, _) = parts
            meta = provenance(
                {
                    "operation": "export",
                    **self.ckpt.provenance(),
                    "format": "peft",
                    "task": k,
                    "encoder_only": "true" if opts.encoder_only else None,
                }
            )
            tensor = from_torch(stored[a:b].contiguous(), copy=False)
            self._file(weights, safetensors_parts({"prompt_embeddings": tensor}, meta))
            self._file(config, self.config_text)
            return [weights, config]
        if fmt == "vllm":
            (pt, a, b), (b64, _, _) = parts
            data = _torch_bytes(stored[a:b].contiguous().clone())
            self._file(pt, data)
            self._file(b64, base64.b64encode(data))
            return [pt, b64]
        # tgis: bare tensors, each a fresh contiguous CPU tensor (a saved view keeps its whole storage)
        files: dict[str, str] = {}
        out = []
        for rel, a, b in parts:
            self._file(rel, _torch_bytes(stored[a:b].contiguous().clone()))
            files["ENCODER" if rel.endswith("encoder.pt") else "DECODER"] = rel.split("/")[-1]
            out.append(rel)
        if opts.caikit:
            rel = f"{name}/{CAIKIT_CONFIG}"
            self._file(rel, caikit_config(self.ckpt, files, opts.dtype, k))
            out.append(rel)
        return out

    def close(self) -> None:
        if self.table is not None:
            self.table.flush()
            os.fsync(self.table.fileno())
            self.table.close()
            self.table = None


def _fsync_tree(root: Path) -> None:
    """fsync every folder under ``root`` (its files were fsynced when written)."""
    for folder, _dirs, _files in os.walk(root):
        try:
            fd = os.open(folder, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


def serve_lines(
    fmt: str, out: str, names: list[str], tasks: list[int], rows: int, d: int, longest: int, seq2seq: bool = False
) -> list[str]:
    """How to serve what was written, with the first exported task as the example (``rows`` per
    prompt, ``longest``: the most rows one file holds; ``seq2seq``: an encoder-decoder model's,
    which PEFT serves from a prompt-tuning folder and TGIS from its own files only)."""
    k, name = tasks[0], names[0]
    store, prefix = os.path.dirname(os.path.abspath(out)), os.path.basename(os.path.abspath(out))
    if fmt == "peft" and seq2seq:
        return [
            f'PEFT: PeftModel.from_pretrained(base_model, "{out}/{name}") serves task {k} (no task_ids)',
            "an encoder-decoder prompt: TGIS reads one from decoder.pt/encoder.pt (--to tgis), not from a PEFT"
            " folder; vLLM and TensorRT-LLM serve decoder-only models",
        ]
    if fmt == "peft":
        return [
            f'PEFT: PeftModel.from_pretrained(base_model, "{out}/{name}") serves task {k} (no task_ids)',
            f"TGIS: copy {out}/{name} into $PREFIX_STORE_PATH (causal LMs only), request prefix_id={name!r}",
            f"vLLM 0.5.1-0.9.x: --enable-prompt-adapter --max-prompt-adapter-token {rows} "
            f"--prompt-adapters {name}={out}/{name}; request model={name!r}",
            f'TensorRT-LLM LLM API: PromptAdapterRequest("{name}", 1, "{out}/{name}")',
        ]
    if fmt == "tgis" and not TGIS_PREFIX_ID.fullmatch(prefix):  # ids under the parent would be refused
        return [
            f"TGIS: PREFIX_STORE_PATH={shlex.quote(os.path.abspath(out))} (and MAX_PROMPT_PREFIX_LENGTH >= "
            f"{longest}); a request picks task {k} with prefix_id={name!r}",
        ]
    if fmt == "tgis":  # (paths quoted as a shell needs them: a space, a quote)
        return [
            f"TGIS: PREFIX_STORE_PATH={shlex.quote(store)} (and MAX_PROMPT_PREFIX_LENGTH >= {longest}); "
            f"a request picks task {k} with prefix_id={prefix + '/' + name!r}",
            f"(or PREFIX_STORE_PATH={shlex.quote(os.path.abspath(out))} and prefix_id={name!r})",
        ]
    if fmt == "vllm":
        return [
            "vLLM: vllm serve BASE_MODEL --enable-prompt-embeds (offline: LLM(..., enable_prompt_embeds=True))",
            f'HTTP: POST /v1/completions with "prompt_embeds": the text of {out}/{name}.b64 (task {k})',
            f'offline: llm.generate({{"prompt_embeds": torch.load("{out}/{name}.pt", weights_only=True)}})',
            "for PEFT's placement send cat(P_k, embeddings of the tokenized text, BOS first)",
        ]
    if fmt == "trtllm":
        n = len(tasks)
        return [
            f"TensorRT-LLM (TensorRT backend): trtllm-build ... --max_prompt_embedding_table_size >= {n * rows} "
            f"(N*T = {n}*{rows})",
            f"run.py --prompt_table_path {out}/{TABLE} --prompt_tasks 0 --num_prepend_vtokens {rows}: "
            f"index i = row i of the table (row 0 = task {k})",
        ]
    return [
        f'numpy.load("{out}/{name}.npy") is task {k}\'s prompt, float32 [{rows}, {d}]: '
        "llama.cpp llama_batch.embd, SGLang input_embeds (prepend it to the text's embeddings)"
    ]


def export_prompts(
    source: Source,
    to: str,
    out: str | os.PathLike[str],
    *,
    tasks: Sequence[int] | None = None,
    names: Sequence[str] | None = None,
    force: bool = False,
    options: ExportOptions | None = None,
) -> ExportResult:
    """Bake the prompts of ``tasks`` (default: every task) of ``source`` into ``out`` in format
    ``to`` (one of :data:`FORMATS`), named ``names`` (default ``task_<k>``), with ``manifest.json``.

    See the module docstring for the formats and :class:`ExportOptions` for the options. Raises
    ValidationError (nothing written) for a source that fails its checks or a limit the engine
    would refuse, WriteError for an output that exists without ``force``.
    """
    opts = options or ExportOptions()
    if not isinstance(opts, ExportOptions):
        raise ConfigError(f"options must be an ExportOptions, not {type(opts).__name__}")
    if isinstance(opts.dtype, str) and canonical_dtype(opts.dtype) in DTYPE_CHOICES:
        opts = opts._replace(dtype=canonical_dtype(opts.dtype))  # the aliases every --dtype takes
    chosen_tasks = None if tasks is None else checked_indices(tasks, "tasks")
    opts = opts._replace(chunk_bytes=checked_positive(opts.chunk_bytes, "chunk_bytes"))
    if names is not None and (isinstance(names, str) or not all(isinstance(x, str) for x in names)):
        raise ConfigError(f"names must be a list of names, e.g. ['qa', 'nli'], not {names!r:.40}")
    ckpt = load_source(source)
    extra: list[Finding] = []
    if to not in FORMATS:
        extra.append(_usage("to", "unknown format", to, "use one of " + ", ".join(FORMATS), ", ".join(FORMATS)))
    if opts.dtype not in DTYPE_CHOICES:
        extra.append(_usage("dtype", "unknown dtype", opts.dtype, "use float32, bfloat16 or float16"))
    for field, given, fmt in (
        ("max_prefix_len", opts.max_prefix_len is not None, "tgis"),
        ("caikit", opts.caikit, "tgis"),
        ("peft_compat", opts.peft_compat is not None, "peft"),
    ):
        if given and to != fmt:
            why = flag(f"applies to --to {fmt}", f"applies with {_to(fmt)} only")
            fix = "drop " + flag(f"--{field.replace('_', '-')}", f"ExportOptions({field}=...)")
            extra.append(_usage(field, why, to, fix))
    cols = ckpt.shapes.get("prefix_task_cols")
    n = cols[0] if cols and len(cols) == 3 else 0
    chosen = list(range(n)) if chosen_tasks is None else chosen_tasks
    labels = [f"task_{k}" for k in chosen] if names is None else list(names)
    layout = _layout(to, ckpt, opts, extra) if to in FORMATS else None
    if cols and len(cols) == 3:
        extra += _names_findings(to, chosen, labels, n)
    if layout is not None and to == "tgis":
        _tgis_rules(layout, opts, chosen[0] if chosen else 0, extra)
    bounds: dict[str, Any] = {}
    found = _source_findings(ckpt, bounds, opts.chunk_bytes) + extra
    checks_model = opts.base_model is not None and opts.base_model is not False
    given_model = None if opts.base_model is True or not checks_model else str(opts.base_model)
    if checks_model and not errors(found):
        from .hub.base_model import base_model_findings

        found += base_model_findings(ckpt, given_model)
    warnings = require_valid(ckpt, findings=found)
    assert layout is not None
    overflow = _cast_check(ckpt, chosen, opts.dtype, bounds, opts.chunk_bytes)
    if overflow is not None:
        raise refusal(ckpt.location, [overflow])
    entries = _entries(to, labels)
    protected = list(ckpt.source_paths)
    if checks_model:  # a local model folder the check read is a source too
        from .hub.base_model import base_model_name, local_model_paths

        protected += local_model_paths(base_model_name(ckpt, given_model))
    target = _guard(out, entries, force=force, protected=protected)
    d = ckpt.shapes["prompt_embeddings"][1]
    rows = _rows(layout)
    items: list[ExportedTask] = []
    with staging_folder(target) as stage:  # (a full disk: one line naming target, nothing left)
        writer = _Writer(to, ckpt, stage, layout, opts, len(chosen))
        try:
            with progress(len(chosen), flag(f"export --to {to}", f"export_prompts({_to(to)})")) as advance:
                for i, (k, prompt) in enumerate(task_prompts(ckpt, chosen, opts.chunk_bytes)):
                    peak = cast_overflow(prompt, opts.dtype)
                    if peak is not None:  # the bound above let it through only at the very edge
                        raise refusal(ckpt.location, [_cast_finding(k, peak, opts.dtype)])
                    files = writer.add(k, labels[i], prompt)
                    items.append({"task": k, "name": labels[i], "index": i, "files": files})
                    advance(1)
        finally:
            writer.close()
        longest = max(b - a for _p, a, b in layout.parts)
        serve = serve_lines(to, str(out), labels, chosen, rows, d, longest, layout.seq2seq)
        notes = list(ckpt.notes)
        if to == "trtllm":
            notes.append(
                "TensorRT-LLM's prompt table belongs to its TensorRT-engine backend, which TensorRT-LLM main "
                "removed in 2026: use a release from before the removal (or "
                + flag("--to peft", _to("peft"))
                + " for its LLM API)"
            )
        if to == "peft" and writer.fit.exact:
            notes.append(fit_note(writer.fit))
        if to == "npy" and layout.seq2seq and not opts.encoder_only and (ckpt.config.num_transformer_submodules == 2):
            notes.append("seq2seq: rows 0:nvt of each file are the encoder prompt, rows nvt:2nvt the decoder prompt")
        manifest = _manifest(to, ckpt, items, rows, d, layout, opts, serve)
        _fsync_tree(stage)
        left: list[str] = []  # an earlier export's tasks that stay but are not in the manifest

        def merged() -> None:
            """The manifest: this export's tasks after an earlier export's that it leaves in place.
            Run again under the folder's lock (another export may have finished meanwhile)."""
            kept, unlisted = _earlier(target, manifest)
            left[:] = unlisted
            whole = {**manifest, "tasks": kept + manifest["tasks"]}
            with contextlib.suppress(FileNotFoundError):  # written before the lock was taken
                os.unlink(stage / MANIFEST)
            write_synced(stage / MANIFEST, json.dumps(whole, indent=2) + "\n")
            fsync_dir(stage)

        replace_entries(stage, target, force=force, prepare=merged)
        if left:
            shown = ", ".join(left[:5]) + (f" (+{len(left) - 5} more)" if len(left) > 5 else "")
            warnings.append(
                f"{len(left)} task(s) of an earlier export stay in {out} but not in its manifest (another "
                f"source, format or dtype): {shown}; export into an empty folder to have only this one"
            )
    if to == "peft":
        warnings += writer.fit.warnings
    prefix = os.path.basename(os.path.abspath(out))
    if to == "tgis" and not TGIS_PREFIX_ID.fullmatch(prefix):
        warnings.append(
            f"the folder name {prefix!r} cannot be part of a TGIS prefix id (TGIS takes [/\\w-]+, so "
            f"prefix_id={prefix + '/' + labels[0]!r} would be refused): serve the folder itself as "
            f"PREFIX_STORE_PATH (prefix_id={labels[0]!r}), or name it without dots and spaces"
        )
    written = [str(Path(out) / rel) for rel in writer.written] + [str(Path(out) / MANIFEST)]
    result: ExportResult = {
        "schema": "mpt-tools/export/1",
        "source": ckpt.location,
        "source_sha256": ckpt.sha256(),
        "out": str(out),
        "files": written,
        "format": to,
        "manifest": str(Path(out) / MANIFEST),
        "tasks": items,
        "num_tasks": len(items),
        "rows": rows,
        "token_dim": d,
        "dtype": opts.dtype,
        "file_dtype": layout.file_dtype,
        "encoder_only": opts.encoder_only,
        "serve": serve,
        "warnings": warnings,
        "notes": notes,
        "version": __version__,
    }
    return result


def _rows(layout: _Layout) -> int:
    """Rows of one prompt as exported (all files of a task together)."""
    spans = {(a, b) for _p, a, b in layout.parts}
    return sum(b - a for a, b in spans)


def _entries(fmt: str, names: list[str]) -> list[str]:
    """The top-level entries of ``out`` an export writes (manifest.json included)."""
    if fmt in ("peft", "tgis"):
        entries = list(names)
    elif fmt == "vllm":
        entries = [f"{x}{ext}" for x in names for ext in (".pt", ".b64")]
    elif fmt == "trtllm":
        entries = [TABLE]
    else:
        entries = [f"{x}.npy" for x in names]
    return [*entries, MANIFEST]


def _guard(out: str | os.PathLike[str], entries: list[str], *, force: bool, protected: list[str]) -> Path:
    """The output guard of an export: ``out`` is a folder (or new) and not the source's; without
    ``force`` none of the entries it would write exists there."""
    target = guard_output(out, force=True, protected=protected)  # not a file, not the source's folder
    guard_entries(target, entries, protected)  # no entry is (or holds) a source
    if target.is_dir() and not force:
        for entry in entries:
            if os.path.lexists(target / entry):
                raise WriteError(
                    f"{entry} already exists here; pass {flag('--force', 'force=True')} to overwrite it", str(target)
                )
    return target


def _manifest(
    fmt: str,
    ckpt: Checkpoint,
    items: list[ExportedTask],
    rows: int,
    d: int,
    layout: _Layout,
    opts: ExportOptions,
    serve: list[str],
) -> dict[str, Any]:
    """``manifest.json``: where it came from, what each task became and how to serve it."""
    data: dict[str, Any] = {
        "schema": MANIFEST_SCHEMA,
        "format": fmt,
        "source": ckpt.where,
        "source_file": ckpt.weights_name,
        "source_sha256": ckpt.sha256(),
        "base_model": ckpt.config.raw.get("base_model_name_or_path"),
        "task_type": ckpt.config.task_type,
        "num_virtual_tokens": ckpt.config.size("num_virtual_tokens"),
        "num_transformer_submodules": ckpt.config.num_transformer_submodules,
        "encoder_only": opts.encoder_only,
        "T": rows,
        "d": d,
        "dtype": opts.dtype,
        "file_dtype": layout.file_dtype,
        "rows_of_each_file": {
            p.replace("{name}", "<name>"): [a, b] for p, a, b in layout.parts if not p.endswith(CONFIG_NAME)
        },
        "tasks": [{"task": it["task"], "name": it["name"], "index": it["index"], "files": it["files"]} for it in items],
        "serve": serve,
        "mpt_tools_version": __version__,
    }
    return data


MANIFEST_BYTES = 64 << 20
"""The largest earlier manifest.json read back (a 1000-task manifest is about 200 kB)."""
_SAME_EXPORT = ("schema", "format", "source_sha256", "dtype", "file_dtype", "T", "d", "encoder_only")


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``manifest.json`` of an export folder, read bounded: None where the folder has none;
    SourceError (one line) where it is not an export manifest (its schema, a list of tasks)."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        raw = read_small(path, MANIFEST_BYTES, SourceError)
        data = json.loads(raw) if raw is not None else None
    except (ValueError, RecursionError):
        data = None
    if not isinstance(data, dict) or data.get("schema") != MANIFEST_SCHEMA or not isinstance(data.get("tasks"), list):
        raise SourceError(f"{MANIFEST} is not an mpt-tools export manifest ({MANIFEST_SCHEMA})", path)
    return data


def manifest_files(task: Any) -> list[str] | None:
    """A manifest task entry's files, paths inside the export folder; None where the entry names
    none, or one outside the folder (a manifest is read from disk, so possibly hostile)."""
    files = task.get("files") if isinstance(task, dict) else None
    if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
        return None
    inside = all(Path(f).parts and not Path(f).is_absolute() and ".." not in Path(f).parts for f in files)
    return files if inside else None


def _earlier(target: Path, data: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """The tasks of an earlier export into ``target`` (its manifest.json) that this one leaves in
    place: kept in the new manifest when that export is of the same source, format and dtype (and
    their files are all there); otherwise their names, for a warning. Nothing for a table
    (``trtllm``: rewritten whole) or an earlier manifest that cannot be read."""
    if data["format"] == "trtllm":
        return [], []
    try:
        old = read_manifest(target)
    except MptToolsError:
        return [], []
    if old is None:
        return [], []
    new_names = {t["name"] for t in data["tasks"]}
    left: list[dict[str, Any]] = []
    for task in old["tasks"]:
        files = manifest_files(task)
        if files is None or not isinstance(task.get("name"), str) or task["name"] in new_names:
            continue
        if all(os.path.lexists(target / f) for f in files):
            left.append(task)
    if all(old.get(key) == data.get(key) for key in _SAME_EXPORT):
        return left, []
    return [], [task["name"] for task in left]
