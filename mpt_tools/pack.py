"""``pack``: fit one MPT adapter to N single-task prompts (the way back from ``export``).

Each input is one prompt ``P_k`` ([T, d]): a PEFT ``PROMPT_TUNING`` adapter (a folder, or a Hub
repo), a TGIS prefix folder (``decoder.pt``, and ``encoder.pt`` for an encoder-decoder model: rows
``0:nvt`` are the encoder's, ``nvt:2nvt`` the decoder's), a plain ``.npy``/``.pt``/``.safetensors``
tensor, or a task of an MPT adapter (its baked prompt ``P* * (cols[k] @ rows[k])``, computed as
PEFT's forward computes it). :func:`pack_prompts` reads them into one float64 tensor [N, T, d],
finds a shared prompt ``P*`` and per task rank-R factors ``U_k`` [T, R], ``V_k`` [R, d] minimising

    f = sum_k || P_k - P* * (U_k @ V_k) ||_F^2        (* elementwise)

(:func:`mpt_tools.als.als_fit`: alternating least squares, ``f`` never increases, never worse than
the baseline of ``P*`` = the mean prompt), casts ``P*`` and the factors to ``dtype`` and writes an
MPT adapter that ``validate``, ``init`` and ``verify`` accept; the relative errors reported are
those of the written values.

``shared`` fixes ``P*`` (a [T, d] tensor file, a prompt folder or an MPT adapter's
``prompt_embeddings``) and fits only the factors; ``append_to`` appends the new tasks to an MPT
adapter: its ``P*`` is fixed, its tasks are kept bitwise, and only the new tasks' factors are
fitted.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import numpy as np

from .als import CHUNK_BYTES, FitSettings, als_fit, prompt_errors, round_off_floors
from .checkpoint import Checkpoint, Source, download_missing, load_source
from .checks import require_valid
from .config import (
    CONFIG_NAME,
    PEFT_TYPE,
    PROMPT_TUNING_TYPE,
    TASK_TYPES,
    WEIGHTS_NAMES,
    MptConfig,
    read_config,
    target_config,
)
from .dtypes import UNIT_ROUND_OFF
from .errors import ConfigError, FormatError, MptToolsError, SourceError, ValidationError, flag
from .factors import MAX_TARGET_ELEMENTS
from .files import guard_output
from .findings import Finding, refusal
from .formats import (
    BARE_KEY,
    DTYPE_CHOICES,
    DTYPE_NAMES,
    FLOAT_DTYPES,
    PROMPT_SUFFIXES,
    Raw,
    canonical_dtype,
    from_torch,
    json_float,
    memory_limit,
    more_than_memory,
    normalise_keys,
    open_tensor_file,
    to_float32,
    to_float64,
    to_torch,
)
from .options import (
    HubOptions,
    SourceSpec,
    checked_index,
    checked_indices,
    checked_path,
    checked_positive,
    checked_seed,
    readable_fields,
)
from .progress import progress
from .prompts import plan_chunks, task_runs
from .version import __version__
from .writer import fit_for_peft, fit_note, provenance, write_adapter

if TYPE_CHECKING:  # types only: importing them costs start-up time
    from .results import PackedTask, PackResult

_CONFIG_FIELDS = (
    "base_model_name_or_path",
    "num_attention_heads",
    "num_layers",
    "revision",
    "tokenizer_name_or_path",
    "tokenizer_kwargs",
)
"""The fields the packed adapter's config takes from the first input that has a config."""
TGIS_FILES = ("encoder.pt", "decoder.pt")
SEQ2SEQ = "SEQ_2_SEQ_LM"
FACTORS = ("prefix_task_cols", "prefix_task_rows")


START_CHOICES = ("auto", "baseline")
"""The fit's starts (:attr:`PackOptions.start`)."""
RECOVER_NOTE_SECONDS = 1.0
"""A recovery that took this long and gave no better start gets a note naming ``--start baseline``."""


@readable_fields
class PackOptions(NamedTuple):
    """How :func:`pack_prompts` fits and writes.

    ``num_ranks``: R (default: ``append_to``'s; required otherwise). ``shared``: a [T, d] tensor
    file, a prompt folder or an MPT adapter whose ``prompt_embeddings`` becomes the fixed ``P*``.
    ``append_to``: an MPT adapter to append the new tasks to (its ``P*`` fixed, its tasks kept
    bitwise). ``task_type``: the adapter's task_type when no input states it (or to confirm theirs).
    ``dtype``: the stored dtype (default float32; ``append_to``'s own with it). ``seed``: seeds the
    unused rank directions of the baseline (0 to 2**64 - 1: a ConfigError otherwise). ``tol``: stop
    when an iteration lowers the objective by at most this fraction. ``max_iters``: the most
    iterations (0: the baseline itself). ``device``: auto (CUDA when available), cuda or cpu.
    ``peft_compat``: the PEFT release adapter_config.json is written for. ``chunk_bytes``: the bound
    on the fit's two work buffers (default per device: :data:`CHUNK_BYTES`). ``start``: ``auto``
    (also try ``P*`` recovered by :mod:`mpt_tools.recover` and its signs, and start from the best)
    or ``baseline`` (no recovery, whose search, on prompts too small for its linear routes, costs
    seconds on prompts that are not of the form, such as teacher prompts trained one by one: the
    mean prompt or its signs with the prompts' rms magnitudes, whichever fits better). ``hub``: how
    every input that is a Hub repo id or ``hf://`` URL is downloaded (PROMPTS, sources, ``shared``,
    ``append_to``). ``num_transformer_submodules``: 1 or 2, the adapter's when no input states it
    (bare tensors; an export folder's manifest states it) or to confirm theirs: 1 for the encoder
    half of a ``SEQ_2_SEQ_LM`` prompt (default: 2 for ``SEQ_2_SEQ_LM``, else 1)."""

    num_ranks: int | None = None
    shared: str | os.PathLike[str] | None = None
    append_to: Source | None = None
    task_type: str | None = None
    dtype: str | None = None
    seed: int = 0
    tol: float = 1e-6
    max_iters: int = 1000
    device: str = "auto"
    peft_compat: str | None = None
    chunk_bytes: int | None = None
    start: str = "auto"
    hub: HubOptions = HubOptions()
    num_transformer_submodules: int | None = None


class TaskSource(NamedTuple):
    """Tasks of an MPT adapter to pack (``--from SOURCE --tasks LIST``); ``tasks`` None: all."""

    source: Source
    tasks: Sequence[int] | None = None


class _Prompt(NamedTuple):
    """One input prompt as read: its label, kind, files, values and what it says of the model."""

    label: str
    kind: str  # "peft", "tgis", "tensor" or "mpt"
    files: list[str]
    array: np.ndarray | None  # [T, d]; None for an MPT task (baked later, in chunks)
    nts: int | None
    task_type: str | None
    config: dict[str, Any] | None
    dtype: str = "F32"  # the stored dtype tag (the coarser of TGIS's two files; F32 for an MPT task, baked in float32)


class _Shape(NamedTuple):
    """The (T, d) every prompt must have and where it was first seen."""

    rows: int
    cols: int
    where: str


# ---------------------------------------------------------------------------------------------
# reading the prompts
# ---------------------------------------------------------------------------------------------


def _from_source(what: str) -> str:
    """How a message says to give an MPT adapter's tasks to pack: ``--from`` or ``sources=``."""
    return flag(f"as --from {what} (--tasks LIST)", f"in sources=[({what}, TASKS)]")


def _tensor_of(tfile: Any, where: str) -> Raw:
    """The one prompt tensor of a file: its only tensor, or ``prompt_embeddings`` (a PEFT
    weights file); a file of MPT factors or of several other tensors is refused."""
    names = list(tfile.infos)
    keymap, _notes, _ignored = normalise_keys(names, where)
    if "prefix_task_cols" in keymap or "prefix_task_rows" in keymap:
        raise FormatError("holds MPT task factors: give it " + _from_source("FILE"), where)
    if "prompt_embeddings" in keymap:
        name = keymap["prompt_embeddings"]
    elif len(names) == 1:
        name = names[0]
    elif not names:
        raise FormatError("holds no tensor", where)
    else:
        shown = ", ".join(repr(n) for n in names[:4]) + (", ..." if len(names) > 4 else "")
        raise FormatError(
            f"holds {len(names)} tensors ({shown}): expected one [T, d] prompt or prompt_embeddings", where
        )
    info = tfile.infos[name]
    label = "the tensor" if name == BARE_KEY else f"tensor {name!r}"
    if info.dtype not in FLOAT_DTYPES:
        raise FormatError(f"{label} has dtype {info.dtype}: expected a float prompt", where)
    if len(info.shape) != 2 or 0 in info.shape:
        raise FormatError(f"{label} has shape {list(info.shape)}: expected a 2-D [T, d] prompt", where)
    raw: Raw = tfile.read(name)
    return raw


def _finite(array: np.ndarray, where: str) -> np.ndarray:
    bad = int(np.count_nonzero(~np.isfinite(array)))
    if bad:
        raise ValidationError(f"the prompt holds {bad} NaN/Inf values", where)
    return array


def _peft_folder(folder: Path) -> _Prompt:
    """A PEFT PROMPT_TUNING folder: adapter_config.json and adapter_model.safetensors/.bin."""
    cfg = read_config(folder / CONFIG_NAME)
    peft_type = cfg.raw.get("peft_type")
    if peft_type == PEFT_TYPE:
        raise SourceError("is a Multitask Prompt Tuning adapter: give it " + _from_source("SOURCE"), str(folder))
    if peft_type != PROMPT_TUNING_TYPE:
        raise SourceError(f"peft_type is {peft_type!r}: expected a PROMPT_TUNING adapter", str(folder))
    weights = next((folder / n for n in WEIGHTS_NAMES if os.path.lexists(folder / n)), None)
    if weights is None:
        raise SourceError("no adapter_model.safetensors or adapter_model.bin in this directory", str(folder))
    raw = _tensor_of(open_tensor_file(weights), str(weights))
    array = _finite(to_float32(raw) if raw.dtype != "F64" else raw.array.reshape(raw.shape), str(weights))
    problem = cfg.prompt_shape_problem(array.shape)
    if problem is not None:
        raise ValidationError(problem, str(weights))
    nts = cfg.num_transformer_submodules
    task_type = cfg.task_type
    if task_type is not None and task_type not in TASK_TYPES:
        raise ConfigError(f"unknown task_type {task_type!r}", cfg.path)
    files = [str(folder / CONFIG_NAME), str(weights)]
    return _Prompt(str(folder), "peft", files, array, nts, task_type, dict(cfg.raw), raw.dtype)


def _tgis_folder(folder: Path) -> _Prompt:
    """A TGIS prefix folder: ``decoder.pt`` (decoder-only), ``encoder.pt`` + ``decoder.pt``
    (encoder-decoder, 2 submodules: encoder rows first) or ``encoder.pt`` (encoder only)."""
    parts: dict[str, np.ndarray] = {}
    tags: list[str] = []
    for name in TGIS_FILES:
        path = folder / name
        if os.path.lexists(path):
            raw = _tensor_of(open_tensor_file(path, bare=True), str(path))
            parts[name] = _finite(to_float32(raw) if raw.dtype != "F64" else raw.array.reshape(raw.shape), str(path))
            tags.append(raw.dtype)
    files = [str(folder / n) for n in TGIS_FILES if n in parts]
    tag = max(tags, key=UNIT_ROUND_OFF.__getitem__)
    if len(parts) == 2:
        enc, dec = parts["encoder.pt"], parts["decoder.pt"]
        if enc.shape != dec.shape:
            raise ValidationError(
                f"encoder.pt is {list(enc.shape)} but decoder.pt is {list(dec.shape)}: the two halves of an "
                "encoder-decoder prompt have the same shape",
                str(folder),
            )
        return _Prompt(str(folder), "tgis", files, np.concatenate([enc, dec]), 2, "SEQ_2_SEQ_LM", None, tag)
    if "encoder.pt" in parts:
        return _Prompt(str(folder), "tgis", files, parts["encoder.pt"], 1, "SEQ_2_SEQ_LM", None, tag)
    return _Prompt(str(folder), "tgis", files, parts["decoder.pt"], 1, None, None, tag)


def locate_prompt(path: str | os.PathLike[str], hub: HubOptions | None = None) -> tuple[str, str]:
    """Where an input is read and how it is named: a local path as it is (twice), or a Hub repo
    id / ``hf://`` URL downloaded as :func:`~mpt_tools.checkpoint.load_source` downloads a source
    (``adapter_config.json`` and one weights file, their hashes checked): its snapshot folder and
    ``hf://org/name@commit[/subfolder]``. Raises MptToolsError (one line) where neither exists."""
    text = checked_path(path, "a prompt")
    if os.path.lexists(text):
        return text, text
    folder, info = download_missing(text, None, hub or HubOptions())
    return str(folder), info["url"]


@contextmanager
def _named_as(local: str, label: str) -> Iterator[None]:
    """Errors raised inside name ``label`` where they named ``local`` (a Hub input's cache folder:
    its ``hf://`` URL is what the user gave)."""
    try:
        yield
    except MptToolsError as exc:
        if local != label and exc.path is not None and exc.path.startswith(local):
            exc.path = label + exc.path[len(local) :]
        raise


def read_prompt(path: str | os.PathLike[str], *, hub: HubOptions | None = None) -> _Prompt:
    """One single-task prompt from a PEFT PROMPT_TUNING folder (local, or a Hub repo id or
    ``hf://`` URL: :func:`locate_prompt`; labelled with its URL at the commit read), a TGIS prefix
    folder or a tensor file (``.npy``, ``.pt``/``.bin``/``.pth``, ``.safetensors``: one [T, d]
    tensor, or ``prompt_embeddings``), read through :func:`mpt_tools.formats.open_tensor_file`
    (bounds-checked, weights-only). Raises MptToolsError, naming the file, for anything else."""
    return _read_at(*locate_prompt(path, hub))


def _read_at(local: str, label: str) -> _Prompt:
    """The prompt at the local path ``local`` (:func:`locate_prompt`), named ``label``."""
    with _named_as(local, label):
        item = _read_local(local)
    return item if label == local else item._replace(label=label)


def _read_local(where: str) -> _Prompt:
    """:func:`read_prompt` of a local path (``where``, as given: it labels the prompt)."""
    p = Path(where)
    if os.path.islink(p) and not os.path.exists(p):
        raise SourceError("broken symlink or symlink loop", where)
    if p.is_dir():
        if os.path.lexists(p / CONFIG_NAME):
            return _peft_folder(p)
        if any(os.path.lexists(p / n) for n in TGIS_FILES):
            return _tgis_folder(p)
        raise SourceError(
            "not a prompt folder: expected adapter_config.json (PEFT prompt tuning) or decoder.pt/encoder.pt (TGIS)",
            where,
        )
    raw = _tensor_of(open_tensor_file(p, bare=True), where)
    array = _finite(to_float32(raw) if raw.dtype != "F64" else raw.array.reshape(raw.shape), where)
    return _Prompt(where, "tensor", [where], array, None, None, None, raw.dtype)


def _is_mpt(local: str) -> bool:
    """Whether the local folder or file ``local`` (:func:`locate_prompt`) holds an MPT adapter
    rather than one prompt."""
    p = Path(local)
    if os.path.islink(p) and not os.path.exists(p):
        raise SourceError("broken symlink or symlink loop", local)
    if p.is_dir():
        if not os.path.lexists(p / CONFIG_NAME):
            return False
        return read_config(p / CONFIG_NAME).raw.get("peft_type") == PEFT_TYPE
    tfile = open_tensor_file(p, bare=True)
    keymap, _notes, _ignored = normalise_keys(tfile.infos, str(p))
    return "prefix_task_cols" in keymap or "prefix_task_rows" in keymap


def _task_findings(tasks: Sequence[int], n: int) -> list[Finding]:
    if not tasks:
        return [Finding.error("usage", "tasks", "no tasks given", expected="at least one task", found="[]")]
    bad = [t for t in tasks if t < 0 or t >= n]
    if bad:
        return [
            Finding.error(
                "task-range",
                "tasks",
                f"the source has {n} tasks",
                expected=f"0..{n - 1}",
                found=bad,
                fix=f"pick tasks in 0..{n - 1}",
            )
        ]
    return []


def _load_mpt(source: Source, hub: HubOptions, tasks: Sequence[int] | None = None) -> Checkpoint:
    """An MPT adapter, checked (and ``tasks`` against its task count); a path or repo id given
    alone is read with ``hub``."""
    ckpt = load_source(source if isinstance(source, (Checkpoint, SourceSpec)) else SourceSpec.of(source, hub=hub))
    extra: list[Finding] = []
    cols = ckpt.shapes.get("prefix_task_cols")
    if tasks is not None and cols and len(cols) == 3:
        extra += _task_findings(tasks, cols[0])
    require_valid(ckpt, extra)
    return ckpt


def _mpt_prompt(ckpt: Checkpoint, task: int) -> _Prompt:
    cfg = ckpt.config
    raw = dict(cfg.raw) if ckpt.config_from_file else None
    nts = None if "num_transformer_submodules" in cfg.assumed else cfg.num_transformer_submodules
    label = f"{ckpt.where}#task{task}"
    return _Prompt(label, "mpt", [ckpt.weights_path], None, nts, cfg.task_type, raw)


def _bake(ckpt: Checkpoint, tasks: Sequence[int], out: Any, start: int) -> None:
    """Task ``tasks[i]``'s prompt ``P* * (cols[k] @ rows[k])`` into ``out[start + i]`` for every
    i, as PEFT's forward computes it (float32 torch matmul, then the product with P*), reading
    each run of consecutive tasks once; a prompt that overflows float32 is refused."""
    import torch

    pe = to_torch(ckpt.read("prompt_embeddings")).to(torch.float32)
    t, d = pe.shape
    r = ckpt.shapes["prefix_task_cols"][2]
    step = plan_chunks((t * r + r * d + t * d) * 4, 64 << 20)
    i = start
    for a, b in task_runs(list(tasks), step):
        cols = to_torch(ckpt.read_rows("prefix_task_cols", a, b)).to(torch.float32)
        rows = to_torch(ckpt.read_rows("prefix_task_rows", a, b)).to(torch.float32)
        prompts = torch.matmul(cols, rows)
        prompts *= pe
        finite = torch.isfinite(prompts.flatten(1)).all(1)
        if not bool(finite.all()):
            k = a + int((~finite).nonzero()[0])
            raise ValidationError("the task's prompt overflows float32 (NaN/Inf)", f"{ckpt.location}#task{k}")
        out[i : i + b - a] = prompts.to(out.device, out.dtype)
        i += b - a


# ---------------------------------------------------------------------------------------------
# the operation
# ---------------------------------------------------------------------------------------------


def _usage(field: str, message: str, found: Any, fix: str, expected: Any = None) -> Finding:
    return Finding.error("usage", field, message, expected=expected, found=found, fix=fix)


def _option_findings(opts: PackOptions, count: int) -> list[Finding]:
    """Problems of the options themselves (checked before anything is read)."""
    out: list[Finding] = []
    if count == 0:
        fix = flag("give PROMPTS or --from SOURCE", "give prompts or sources=[(SOURCE, TASKS)]")
        out.append(_usage("prompts", "nothing to pack", 0, fix, ">= 1 prompt"))
    if opts.num_ranks is None and opts.append_to is None:
        why = flag("is required (without --append-to)", "is required (without PackOptions(append_to=...))")
        out.append(_usage("num_ranks", why, None, "give " + flag("--num-ranks R", "PackOptions(num_ranks=R)"), ">= 1"))
    if opts.num_ranks is not None and opts.num_ranks < 1:
        fix = flag("pass --num-ranks 1 or more", "pass PackOptions(num_ranks=1) or more")
        out.append(_usage("num_ranks", "must be positive", opts.num_ranks, fix, ">= 1"))
    if opts.shared is not None and opts.append_to is not None:
        why = flag("--append-to", "append_to") + " fixes P* to the adapter's own"
        both = flag("--shared or --append-to", "shared or append_to")
        fix = flag("drop --shared (or --append-to)", "drop shared= (or append_to=)")
        out.append(_usage("shared", why, os.fspath(opts.shared), fix, both))
    if not (opts.tol >= 0 and math.isfinite(opts.tol)):
        fix = "pass e.g. " + flag("--tol 1e-6", "PackOptions(tol=1e-6)")
        out.append(_usage("tol", "must be a finite number >= 0", opts.tol, fix, ">= 0"))
    if opts.max_iters < 0:
        fix = "pass e.g. " + flag("--max-iters 1000", "PackOptions(max_iters=1000)")
        out.append(_usage("max_iters", "must be >= 0", opts.max_iters, fix, ">= 0"))
    if opts.chunk_bytes is not None:
        checked_positive(opts.chunk_bytes, "chunk_bytes")
    checked_seed(opts.seed)  # before the fit: torch's generator overflows above 2**64 - 1
    if opts.dtype is not None and canonical_dtype(opts.dtype) not in DTYPE_CHOICES:
        choices = ", ".join(DTYPE_CHOICES)
        out.append(_usage("dtype", "unknown dtype", opts.dtype, f"use one of {choices}", choices))
    if opts.start not in START_CHOICES:
        choices = ", ".join(START_CHOICES)
        out.append(_usage("start", "unknown start", opts.start, f"use one of {choices}", choices))
    if opts.task_type is not None and opts.task_type not in TASK_TYPES:
        types = ", ".join(TASK_TYPES)
        fix = "give e.g. " + flag("--task-type CAUSAL_LM", 'PackOptions(task_type="CAUSAL_LM")')
        out.append(_usage("task_type", "unknown task type", opts.task_type, fix, types))
    nts = opts.num_transformer_submodules
    if nts is not None and checked_index(nts, "num_transformer_submodules") not in (1, 2):
        fix = "pass " + flag("--num-transformer-submodules 1 or 2", "PackOptions(num_transformer_submodules=1) or 2")
        out.append(_usage("num_transformer_submodules", "must be 1 or 2", nts, fix, "1 or 2"))
    elif nts == 2 and opts.task_type is not None and opts.task_type != SEQ2SEQ:
        out.append(_two_submodules_finding(opts.task_type, _task_type_option()))
    return out


def _nts_option(nts: int) -> str:
    """How a message names the submodules asked for: ``--num-transformer-submodules N`` or
    ``PackOptions(num_transformer_submodules=N)``."""
    return flag(f"--num-transformer-submodules {nts}", f"PackOptions(num_transformer_submodules={nts})")


def _task_type_option() -> str:
    return flag("--task-type", "PackOptions.task_type")


def _two_submodules_finding(task_type: str, where: str) -> Finding:
    """2 submodules asked for prompts whose task type (stated by ``where``) is not SEQ_2_SEQ_LM."""
    return _usage(
        "num_transformer_submodules",
        f"2 (encoder rows, then decoder rows) is for {SEQ2SEQ} prompts, but the task_type is {task_type!r} "
        f"(from {where})",
        2,
        "drop " + _nts_option(2) + " (or give " + flag(f"--task-type {SEQ2SEQ}", f'task_type="{SEQ2SEQ}"') + ")",
        1,
    )


class _Model(NamedTuple):
    """What the packed adapter's config says of the model."""

    task_type: str
    nts: int
    config: dict[str, Any]
    warnings: list[str]


def _agree(field: str, value: Any, label: str, agreed: Any, agreed_from: str) -> tuple[Any, str]:
    """The value of ``field`` agreed so far (and who stated it first), after input ``label``
    states ``value`` (None: says nothing); a different value is one ValidationError naming it."""
    if value is None:
        return agreed, agreed_from
    if agreed is None:
        return value, label
    if value != agreed:
        raise ValidationError(
            f"{field} {value!r} differs from {agreed_from}'s {agreed!r}: pack prompts of one model", label
        )
    return agreed, agreed_from


def _model(prompts: list[_Prompt], opts: PackOptions, shape: _Shape, append: Checkpoint | None) -> _Model:
    """task_type, num_transformer_submodules and the other config fields, agreed by every input
    that states them (and by ``append``'s config, ``--task-type`` and ``--num-transformer-submodules``):
    a disagreement is one error naming the input. Where none states the submodules, 2 for
    SEQ_2_SEQ_LM and 1 otherwise. The other fields come from the first input with a config
    (``append``'s)."""
    warnings: list[str] = []
    task_type, task_from = opts.task_type, _task_type_option()
    nts, nts_from = (
        opts.num_transformer_submodules,
        flag("--num-transformer-submodules", "PackOptions.num_transformer_submodules"),
    )
    config: dict[str, Any] = {}
    config_from = ""
    if append is not None:
        stated = append.config.task_type
        if stated is not None and opts.task_type is not None and opts.task_type != stated:
            given = flag(f"--task-type {opts.task_type!r}", f"PackOptions(task_type={opts.task_type!r})")
            raise ValidationError(f"task_type is {stated!r}, not {given}", append.location)
        if stated is not None:
            task_type, task_from = stated, append.location
        has = append.config.num_transformer_submodules
        if has is not None and nts is not None and nts != has:
            raise ValidationError(f"num_transformer_submodules is {has}, not {_nts_option(nts)}", append.location)
        if has is not None:
            nts, nts_from = has, append.location
        config, config_from = dict(append.config.raw), append.location
    for item in prompts:
        task_type, task_from = _agree("task_type", item.task_type, item.label, task_type, task_from)
        nts, nts_from = _agree("num_transformer_submodules", item.nts, item.label, nts, nts_from)
        if item.config is not None:
            if not config:
                config, config_from = item.config, item.label
            elif item.config.get("base_model_name_or_path") != config.get("base_model_name_or_path"):
                warnings.append(
                    f"{item.label} names base model {item.config.get('base_model_name_or_path')!r} and "
                    f"{config_from} {config.get('base_model_name_or_path')!r}: the adapter says the latter"
                )
    if task_type is None:
        raise ConfigError(
            "no input states the task type (bare tensors, a TGIS decoder.pt): give "
            + flag("--task-type, e.g. CAUSAL_LM", 'PackOptions(task_type=...), e.g. "CAUSAL_LM"'),
            "pack",
        )
    if opts.num_transformer_submodules == 2 and task_type != SEQ2SEQ:
        raise refusal("pack", [_two_submodules_finding(task_type, task_from)])
    hint = ""
    if nts is None:  # no input states it: the task type's default, which an encoder-only prompt is not
        nts = 2 if task_type == SEQ2SEQ else 1
        if nts == 2:
            hint = f" ({SEQ2SEQ}'s default; for the encoder half alone give {_nts_option(1)})"
    if shape.rows % nts:
        raise ValidationError(
            f"the prompts have {shape.rows} rows, which {nts} transformer submodules cannot split{hint}", shape.where
        )
    raw = {k: config[k] for k in _CONFIG_FIELDS if k in config} if append is None else dict(config)
    raw.update(
        task_type=task_type,
        num_transformer_submodules=nts,
        num_virtual_tokens=shape.rows // nts,
        token_dim=shape.cols,
    )
    return _Model(task_type, nts, raw, warnings)


def _check_shape(shape: _Shape | None, dims: tuple[int, ...], where: str) -> _Shape:
    """The shape every prompt must have (``dims``, when it is the first), or an error naming ``where``."""
    if len(dims) != 2:
        raise ValidationError(f"the prompt has shape {list(dims)}: expected [T, d]", where)
    rows, cols = dims
    if shape is None:
        return _Shape(rows, cols, where)
    if (rows, cols) != (shape.rows, shape.cols):
        raise ValidationError(
            f"the prompt is [{rows}, {cols}] but {shape.where} is [{shape.rows}, {shape.cols}]: every prompt "
            "must have the same shape [T, d]",
            where,
        )
    return shape


class _Stated(NamedTuple):
    """What an export's manifest.json says of its prompts: the task_type and the transformer
    submodules of each file (1 where it holds the encoder half alone); None: it says nothing."""

    task_type: str | None
    nts: int | None


class _Plan(NamedTuple):
    """The inputs, located and (besides the prompt files) loaded and checked: per prompt where it
    is read and its label (:func:`locate_prompt`: a Hub one is downloaded), the adapter appended
    to, the fixed P* and where it came from, the MPT sources with their tasks, every input path
    (for the output guard) and the [T, d] they fix."""

    located: list[tuple[str, str]]
    append: Checkpoint | None
    fixed: np.ndarray | None
    shared_label: str
    checkpoints: list[tuple[Checkpoint, list[int]]]
    protected: list[str]
    shape: _Shape | None
    stated: dict[str, _Stated]  # per prompt path of an export folder: what its manifest.json records


def _exported(folder: str) -> tuple[list[str], _Stated] | None:
    """The prompts of an ``mpt-tools export`` folder (its manifest.json, in the order of the source's
    tasks) and what it records of them (:class:`_Stated`: the task_type, and the submodules: 1 where
    ``encoder_only`` is true, the source's ``num_transformer_submodules`` otherwise); None where
    ``folder`` is not one (no manifest, or a prompt folder itself)."""
    from .export import MANIFEST, manifest_files, read_manifest

    if not os.path.isdir(folder) or os.path.lexists(os.path.join(folder, CONFIG_NAME)):
        return None
    data = read_manifest(folder)
    if data is None:
        return None
    if data.get("format") == "trtllm":
        raise SourceError(
            "a TensorRT-LLM prompt table (one file of every task): pack reads one prompt per input; "
            + flag("export --to npy", 'export_prompts(..., to="npy")')
            + " gives one file per task",
            folder,
        )
    path = os.path.join(folder, MANIFEST)
    prompts: list[tuple[int, int, str]] = []
    for position, task in enumerate(data["tasks"]):
        files = manifest_files(task)
        if files is None:
            raise SourceError(f"task entry {position} names no files, or one outside the folder", path)
        index = task.get("task")
        if not isinstance(index, int) or isinstance(index, bool):
            raise SourceError(f"task entry {position} has no task index", path)
        parts = Path(files[0]).parts
        if len(parts) > 1:  # a folder per task (peft, tgis)
            prompts.append((index, position, os.path.join(folder, parts[0])))
        else:  # a file per task (npy; vllm: the .pt, not its base64)
            tensor = next((f for f in files if Path(f).suffix in PROMPT_SUFFIXES), files[0])
            prompts.append((index, position, os.path.join(folder, tensor)))
    task_type = data.get("task_type") if isinstance(data.get("task_type"), str) else None
    nts = data.get("num_transformer_submodules")
    if data.get("encoder_only") is True:  # rows 0:nvt of a 2-submodule prompt, the encoder's
        nts = 1
    elif isinstance(nts, bool) or nts not in (1, 2):
        nts = None
    return [p for _k, _i, p in sorted(prompts)], _Stated(task_type, nts)


FIT_COPIES = 4
"""Float64 copies of the task factors the fit holds at once (current, previous, a trial point,
work): what its memory check counts, with one task's normal equations ([R, R, max(T, d)])."""


def _num_ranks() -> str:
    """How a message names pack's rank: ``--num-ranks`` or ``PackOptions.num_ranks``."""
    return flag("--num-ranks", "PackOptions.num_ranks")


def _check_factor_size(tasks: int, fitted: int, rank: int, shape: Any) -> None:
    """Refuse, before the fit, a rank whose factors cannot be written (more values than
    :data:`MAX_TARGET_ELEMENTS`, as ``rerank`` refuses it) or fitted in memory."""
    per_task = rank * (shape.rows + shape.cols)
    if tasks * per_task > MAX_TARGET_ELEMENTS:
        raise ValidationError(
            f"num_ranks: {tasks} task(s) at rank {rank} would hold {tasks * per_task:,} factor values, more "
            f"than {MAX_TARGET_ELEMENTS:,}: lower {_num_ranks()} (rank {min(shape.rows, shape.cols)} fits any prompt)",
            "pack",
        )
    need = (fitted * per_task * FIT_COPIES + rank * rank * max(shape.rows, shape.cols)) * 8
    if need > memory_limit():
        raise ValidationError(
            f"num_ranks: fitting {fitted} task(s) at rank {rank} needs {need:,} bytes in float64, "
            + more_than_memory()
            + f": lower {_num_ranks()}",
            "pack",
        )


def _plan(prompts: Sequence[str | os.PathLike[str]], sources: list[TaskSource], opts: PackOptions) -> _Plan:
    stated: dict[str, _Stated] = {}
    expanded: list[str | os.PathLike[str]] = []
    folders: list[str] = []
    for given in prompts:  # an export folder: its tasks' prompts, in the source's task order
        exported = _exported(checked_path(given, "a prompt"))
        if exported is None:
            expanded.append(given)
            continue
        folders.append(os.fspath(given))
        expanded += exported[0]
        stated.update(dict.fromkeys(exported[0], exported[1]))
    prompts = expanded
    located: list[tuple[str, str]] = []
    remote = sum(not os.path.lexists(os.fspath(p)) for p in prompts)
    with progress(remote, "download", unit="prompt") as advance:  # a bar where 2 or more are Hub repos
        for path in prompts:
            located.append(locate_prompt(path, opts.hub))
            if located[-1][0] != located[-1][1]:
                advance(1)
    # nothing written into an input: a prompt's folder (or file), an export folder, and below
    # the --shared and --append-to sources as given (a TGIS folder's decoder.pt alone claims no folder)
    protected = [local for local, _label in located] + folders
    append = _load_mpt(opts.append_to, opts.hub) if opts.append_to is not None else None
    fixed: np.ndarray | None = None
    shared_label = "fitted"
    shape: _Shape | None = None
    if append is not None:
        protected += append.source_paths
        if append.hub is None:
            protected.append(append.location)
        fixed = to_float64(append.read("prompt_embeddings"))
        shared_label = append.location
    elif opts.shared is not None:
        # one download where it is a Hub repo; named as given, or by its URL at the commit read
        local, shared_label = locate_prompt(checked_path(opts.shared, "shared"), opts.hub)
        if _is_mpt(local):
            with _named_as(local, shared_label):
                ckpt = _load_mpt(local, opts.hub)
            fixed, files = to_float64(ckpt.read("prompt_embeddings")), ckpt.source_paths
        else:
            item = _read_at(local, shared_label)
            assert item.array is not None
            fixed, files = item.array, item.files
        protected += [local, *files]
    if fixed is not None:
        shape = _Shape(int(fixed.shape[0]), int(fixed.shape[1]), shared_label)
    checkpoints = []
    for source in sources:
        tasks = None if source.tasks is None else [int(t) for t in source.tasks]
        ckpt = _load_mpt(source.source, opts.hub, tasks)
        protected += ckpt.source_paths
        checkpoints.append((ckpt, tasks if tasks is not None else list(range(ckpt.shapes["prefix_task_cols"][0]))))
    return _Plan(located, append, fixed, shared_label, checkpoints, protected, shape, stated)


def _read_all(plan: _Plan, dev: Any) -> tuple[Any, list[_Prompt], _Shape]:
    """Every prompt, in order (the files, then the sources' tasks), into one float64 tensor
    [N, T, d] on ``dev``, each checked against the shape of the first (or of the fixed P*) as it
    is read; the tensor is allocated once the shape is known, after a memory check."""
    import torch

    n = len(plan.located) + sum(len(tasks) for _, tasks in plan.checkpoints)
    shape = plan.shape
    held: list[Any] = []

    def tensor(where: str) -> Any:
        assert shape is not None
        if not held:
            need = n * shape.rows * shape.cols * 8
            if need > memory_limit():
                raise ValidationError(
                    f"{n} prompts of [{shape.rows}, {shape.cols}] need {need:,} bytes in float64, "
                    + more_than_memory(),
                    where,
                )
            held.append(torch.empty(n, shape.rows, shape.cols, dtype=torch.float64, device=dev))
        return held[0]

    items: list[_Prompt] = []
    for i, (local, label) in enumerate(plan.located):
        item = _read_at(local, label)
        said = plan.stated.get(local)
        if said is not None:  # a bare tensor of an export: its manifest says what the tensor does not
            item = item._replace(
                task_type=item.task_type if item.task_type is not None else said.task_type,
                nts=item.nts if item.nts is not None else said.nts,
            )
        assert item.array is not None
        shape = _check_shape(shape, item.array.shape, item.label)
        tensor(item.label)[i] = torch.from_numpy(np.array(item.array, dtype=np.float64)).to(dev)
        items.append(item._replace(array=None))
    position = len(plan.located)
    for ckpt, tasks in plan.checkpoints:
        shape = _check_shape(shape, ckpt.shapes["prompt_embeddings"], ckpt.location)
        _bake(ckpt, tasks, tensor(ckpt.location), position)
        items += [_mpt_prompt(ckpt, k) for k in tasks]
        position += len(tasks)
    assert shape is not None
    return tensor(shape.where), items, shape


def _cast(tensor: Any, tag: str, what: str) -> Raw:
    """A float64 tensor cast to the dtype ``tag`` (round to nearest even, as torch casts),
    refused when a value is not finite there."""
    import torch

    from .formats import torch_dtype

    cast_ = tensor.to(torch_dtype(tag)).cpu()
    if not bool(torch.isfinite(cast_).all()):
        peak = float(tensor.abs().max())
        raise ValidationError(
            f"the packed {what} reach |x| = {peak:.4g}, which is not finite in {DTYPE_NAMES[tag]}; nothing written; "
            "write float32 (" + flag("--dtype float32", 'PackOptions(dtype="float32")') + ")",
            "pack",
        )
    return from_torch(cast_)


def _dtypes(opts: PackOptions, append: Checkpoint | None) -> dict[str, str]:
    """The stored dtype tag of each tensor: ``--dtype`` (float32 by default), or the appended
    adapter's own (kept bitwise; a different ``--dtype`` is refused)."""
    names = ("prompt_embeddings", "prefix_task_cols", "prefix_task_rows")
    if append is None:
        tag = DTYPE_CHOICES[canonical_dtype(opts.dtype) if opts.dtype is not None else "float32"]
        return {name: tag for name in names}
    tags = {name: cast(Any, append.info(name)).dtype for name in names}
    if opts.dtype is not None:
        wanted = DTYPE_CHOICES[canonical_dtype(opts.dtype)]
        other = next((t for t in tags.values() if t != wanted), None)
        if other is not None:
            raise ValidationError(
                f"its tensors are kept bitwise in {DTYPE_NAMES.get(other, other)}: drop "
                + flag(f"--dtype {DTYPE_NAMES[wanted]}", f'PackOptions(dtype="{DTYPE_NAMES[wanted]}")')
                + " (or convert the adapter first)",
                append.location,
            )
    return tags


def _rel(sq: float, norm_sq: float) -> float | None:
    """``sqrt(sq / norm_sq)``, a relative error (0 for an exact zero prompt; None when undefined)."""
    if norm_sq > 0:
        return json_float(math.sqrt(sq / norm_sq))
    return 0.0 if sq == 0 else None


def _task_source(item: Any) -> TaskSource:
    """A ``sources`` item: a :class:`TaskSource`, a ``(source, tasks)`` pair, or a source alone
    (all its tasks); tasks checked as a list of integers."""
    if isinstance(item, (str, os.PathLike, SourceSpec, Checkpoint)):
        return TaskSource(item, None)
    if isinstance(item, tuple) and len(item) == 2:
        source, tasks = item
        return TaskSource(source, None if tasks is None else checked_indices(tasks, f"the tasks of {source}"))
    raise ConfigError(f"a source to pack must be a path, a SourceSpec or a (source, tasks) pair, not {item!r:.60}")


def pack_prompts(
    prompts: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    sources: Sequence[TaskSource | tuple[Source, Sequence[int] | None]] = (),
    options: PackOptions | None = None,
    force: bool = False,
) -> PackResult:
    """Fit one MPT adapter to single-task prompts and write it into ``out``.

    ``prompts`` are PEFT PROMPT_TUNING folders, TGIS prefix folders or [T, d] tensor files
    (``.npy``, ``.pt``/``.bin``/``.pth``, ``.safetensors``); ``sources`` add the tasks of MPT
    adapters (``(source, tasks)``; tasks None: all). The packed adapter's task i is the i-th
    prompt, then the sources' tasks in order (after ``options.append_to``'s own tasks). Every
    input and option is checked before anything is fitted or written: one error names the file
    and the problem. Returns the ``mpt-tools/pack/1`` result: per task the relative error
    ``||P_k - P_hat_k|| / ||P_k||`` of the written adapter and of the baseline, the iterations,
    the objective after each one and why the fit stopped. See the module docstring for the fit.
    """
    import torch

    from .verification.engine import resolve_device

    started = time.perf_counter()
    opts = options or PackOptions()
    if not isinstance(opts, PackOptions):
        raise ConfigError(f"options must be a PackOptions, not {type(opts).__name__}")
    if isinstance(prompts, (str, os.PathLike)):
        prompts = [prompts]  # one prompt, not its characters
    task_sources = [_task_source(s) for s in sources]
    problems = _option_findings(opts, len(prompts) + len(task_sources))
    if problems:
        raise refusal("pack", problems)
    dev = resolve_device(opts.device)
    plan = _plan(prompts, task_sources, opts)
    guard_output(out, force=force, protected=plan.protected)
    p, read, shape = _read_all(plan, dev)
    append = plan.append
    model = _model(read, opts, shape, append)
    kept = append.shapes["prefix_task_cols"][0] if append is not None else 0
    if append is not None:
        rank = append.shapes["prefix_task_cols"][2]
        if opts.num_ranks is not None and opts.num_ranks != rank:
            given = flag(f"--num-ranks {opts.num_ranks}", f"PackOptions(num_ranks={opts.num_ranks})")
            raise ValidationError(f"num_ranks is {rank}, not {given}", append.location)
    else:
        rank = cast(int, opts.num_ranks)
    _check_factor_size(kept + len(read), len(read), rank, shape)
    if plan.fixed is not None:
        _finite(plan.fixed, plan.shared_label)
    tags = _dtypes(opts, append)
    n = len(read)
    fitted = fit_for_peft(target_config(MptConfig(raw=model.config), kept + n, rank), opts.peft_compat)
    shared = torch.from_numpy(np.array(plan.fixed, dtype=np.float64)).to(dev) if plan.fixed is not None else None
    budget = opts.chunk_bytes or CHUNK_BYTES.get(dev.type, CHUNK_BYTES["cpu"])
    chunks = plan_chunks(2 * shape.rows * shape.cols * 8, budget)
    floors = round_off_floors([item.dtype for item in read], list(tags.values()))
    settings = FitSettings(opts.seed, opts.tol, opts.max_iters, chunks, recover=opts.start == "auto", round_off=floors)
    fit_started = time.perf_counter()
    with progress(opts.max_iters, "pack", unit="iter") as advance:
        fit = als_fit(p, rank, shared=shared, settings=settings, advance=advance)
    fit_seconds = time.perf_counter() - fit_started
    # what is written, and the errors of exactly that
    tensors = {
        "prompt_embeddings": append.read("prompt_embeddings")
        if append is not None
        else _cast(fit.shared, tags["prompt_embeddings"], "shared prompt P*"),
        "prefix_task_cols": _cast(fit.cols, tags["prefix_task_cols"], "task factors (cols)"),
        "prefix_task_rows": _cast(fit.rows, tags["prefix_task_rows"], "task factors (rows)"),
    }
    stored = [to_torch(tensors[k]).to(dev, torch.float64) for k in ("prompt_embeddings", *FACTORS)]
    sq = prompt_errors(p, *stored, chunk=settings.chunk_tasks).tolist()
    norms = torch.linalg.vector_norm(p, dim=(1, 2)).square().tolist()
    base_sq = fit.baseline_sq.tolist()
    del p, stored
    if append is not None:
        for name in FACTORS:
            old, new = append.read(name), tensors[name]
            arr = np.ascontiguousarray(np.concatenate([old.array.reshape(old.shape), new.array]))
            tensors[name] = Raw(old.dtype, tuple(arr.shape), arr)
    tasks_out: list[PackedTask] = [
        {
            "task": kept + i,
            "input": item.label,
            "kind": item.kind,
            "files": item.files,
            "relative_error": _rel(sq[i], norms[i]),
            "baseline_error": _rel(base_sq[i], norms[i]),
        }
        for i, item in enumerate(read)
    ]
    errs = [t["relative_error"] for t in tasks_out if t["relative_error"] is not None]
    base_errs = [t["baseline_error"] for t in tasks_out if t["baseline_error"] is not None]
    labels = [item.label for item in read]
    meta = provenance(
        {
            "operation": "pack",
            "inputs": ",".join(labels[:20]) + (f",... ({n} in all)" if n > 20 else ""),
            "num_inputs": n,
            "shared": plan.shared_label,
            "append_to": append.location if append is not None else None,
            "append_to_sha256": append.sha256() if append is not None else None,
            "num_ranks": rank,
            "seed": opts.seed,
            "iterations": fit.iterations,
            "objective": f"{fit.history[-1]:.6g}",
            "max_relative_error": f"{max(errs):.6g}" if errs else None,
        }
    )
    notes: list[str] = []
    above = [t["task"] for t in tasks_out if (t["relative_error"] or 0.0) > (t["baseline_error"] or 0.0)]
    if above:  # the fit never is (in float64): the cast to the stored dtype is
        notes.append(
            f"{len(above)} task(s) written with a larger error than the baseline's: the baseline's errors are of"
            f" float64 values, the written ones include the cast to {DTYPE_NAMES[tags['prefix_task_cols']]}"
            " (about its unit round-off, relative)"
        )
    if fitted.exact:
        notes.append(fit_note(fitted))
    if fit.stopped == "max-iters" and opts.max_iters > 0:
        iters = flag(f"--max-iters {opts.max_iters}", f"max_iters={opts.max_iters}")
        notes.append(f"stopped after {iters} iterations, still improving by more than {flag('--tol', 'tol')}")
    tried = fit.recover_seconds > 0  # 0: not tried (--start baseline, a fixed P*)
    if tried and fit.start in ("baseline", "mean-signs") and fit.recover_seconds >= RECOVER_NOTE_SECONDS:
        notes.append(
            f"the recovery of P* took {fit.recover_seconds:.1f} s and gave no better start"
            " (the prompts are not P* * (U_k V_k) at this rank, or its search missed): "
            + flag("--start baseline", 'PackOptions(start="baseline")')
            + " skips it"
        )
    files = write_adapter(out, tensors, fitted.config, meta, force=force, protected=plan.protected)
    result = {
        "schema": "mpt-tools/pack/1",
        "out": str(out),
        "files": files,
        "inputs": n,
        "num_tasks": kept + n,
        "kept_tasks": kept,
        "num_ranks": rank,
        "num_virtual_tokens": shape.rows // model.nts,
        "num_transformer_submodules": model.nts,
        "token_dim": shape.cols,
        "task_type": model.task_type,
        "dtype": DTYPE_NAMES[tags["prefix_task_cols"]],
        "shared": plan.shared_label,
        "append_to": append.location if append is not None else None,
        "device": str(dev),
        "seed": opts.seed,
        "iterations": fit.iterations,
        "extrapolated": fit.extrapolated,
        "accelerated": fit.accelerated,
        "stopped": fit.stopped,
        "objective": fit.history[-1],
        "baseline_objective": float(fit.baseline_sq.sum()),
        "start": fit.start,
        "start_objective": fit.history[0],
        "history": fit.history,
        "max_relative_error": max(errs) if errs else None,
        "max_baseline_error": max(base_errs) if base_errs else None,
        "tasks": tasks_out,
        "fit_seconds": fit_seconds,
        "recover_seconds": fit.recover_seconds,
        "total_seconds": time.perf_counter() - started,
        "warnings": [*model.warnings, *fitted.warnings],
        "notes": notes,
        "shapes": {k: list(v.shape) for k, v in tensors.items()},
        "metadata": meta,
        "version": __version__,
    }
    return cast("PackResult", result)
