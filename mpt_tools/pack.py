"""``pack``: fit one MPT adapter to N single-task prompts (the way back from ``export``).

Each input is one prompt ``P_k`` ([T, d]): a PEFT ``PROMPT_TUNING`` folder, a TGIS prefix folder
(``decoder.pt``, and ``encoder.pt`` for an encoder-decoder model: rows ``0:nvt`` are the encoder's,
``nvt:2nvt`` the decoder's), a plain ``.npy``/``.pt``/``.safetensors`` tensor, or a task of an MPT
adapter (its baked prompt ``P* * (cols[k] @ rows[k])``, computed as PEFT's forward computes it).
:func:`pack_prompts` finds a shared prompt ``P*`` and per task rank-R factors ``U_k`` [T, R],
``V_k`` [R, d] minimising

    f = sum_k || P_k - P* * (U_k @ V_k) ||_F^2        (* elementwise)

by alternating least squares with closed-form block updates, every one an exact minimiser of ``f``
over its block (up to a proximal term of relative size :data:`PROX`, which makes rank-deficient
blocks solvable and can only lower ``f`` further; see :func:`_prox_step`):

- each row ``t`` of ``U_k`` (R unknowns): ``P_k[t, :] ~ U_k[t, :] @ (V_k * P*[t, :])``;
- each column ``j`` of ``V_k`` (R unknowns): ``P_k[:, j] ~ (P*[:, j, None] * U_k) @ V_k[:, j]``;
- ``P*`` elementwise: ``P*[t, j] = sum_k P_k[t, j] W_k[t, j] / sum_k W_k[t, j]^2`` with
  ``W_k = U_k @ V_k``; where every ``W_k[t, j]`` is 0, ``f`` does not depend on ``P*[t, j]`` and it
  is kept.

After each iteration the line search of ALS tries a step beyond it (``x + i^(1/3) (x - x_prev)``
for every variable, Bro 1998) and keeps it only where ``f`` is lower. It gets out of swamps where
plain ALS crawls (3 exactly representable rank-2 prompts: relative objective 4e-12 after 300
iterations against 5e-8, ``test_the_line_search_gets_out_of_a_swamp``); on noisy prompts that
converge in a few iterations anyway it costs 20-35% more time per iteration
(``benchmarks/RESULTS.md``). Anderson acceleration's step (:class:`_Anderson`, from the last
:data:`ANDERSON_DEPTH` iterations) is tried too, on the same terms; near an exact fit, where both
crawl, it takes 2 to 9 times fewer iterations.

So ``f`` never increases (``tests/test_pack.py`` checks every block of every iteration). The fit
starts from the simple baseline: ``P*`` = the mean of the prompts (or the fixed ``--shared`` one),
and per task the rank-R truncated SVD of the ratio ``P_k / P*``, split evenly (``U sqrt(S)``,
``sqrt(S) V^T``). Entries where ``|P*| <= NEAR_ZERO * rms(P*)`` are near zero: there the ratio is
taken as 1 (its mean over the tasks wherever ``P*`` is the mean prompt). Rank components the SVD
leaves at zero get a seeded random column in ``U`` and a zero row in ``V``: the product, and so
the baseline, is unchanged, but the next update can use the direction. Since the fit starts from
the baseline and never increases ``f``, pack is never worse than the baseline.

ALS cannot flip the sign of an entry of ``P*``, and the mean prompt has about half of them wrong
when the factors have mean zero (as PEFT initialises them). So where ``P*`` is fitted the fit also
tries ``P*`` recovered by linear algebra (:mod:`mpt_tools.recover`: exact for baked rank-1
adapters, rank 2 with 2 tasks or more and rank R with (R+1)! - 1 tasks or more; a search at rank 3
with fewer), scaled to the prompts' magnitude, with factors as for the baseline; and ``P*`` with
the signs of the recovered one, and with those of the mean prompt, and the prompts' rms as
magnitudes (:meth:`_Als.signs_start`; the mean prompt's also with ``start`` ``baseline``). It
starts from whichever has the lowest ``f`` (``start``). The written ``P*`` is scaled, rows and columns by
positive factors the task factors absorb, to the prompts' magnitude (:meth:`_Als.scale_like_prompts`).

Every update is vectorised over the tasks in chunks (batched small solves in torch, float64, on
the GPU when there is one): memory is the prompts themselves plus two chunks of
``[tasks, T, d]`` (``chunk_bytes``), whatever N is. The fit is deterministic for a given
``seed`` (which only seeds the unused rank directions) and device. It stops when the relative
decrease of ``f`` over an iteration is at most ``tol``, when ``f`` is exact to float64 round-off,
when every task's relative error is within a quarter of the unit round-off of its input's dtype and
of the written dtype (:func:`round_off_floors`: more iterations would be lost in the cast), or after
``max_iters`` iterations. The factors are then balanced per task (the product's SVD split
evenly, exact up to round-off), cast to ``dtype`` and written as an MPT adapter that ``validate``,
``init`` and ``verify`` accept; the relative errors reported are those of the written values.

``shared`` fixes ``P*`` (a [T, d] tensor file, a prompt folder or an MPT adapter's
``prompt_embeddings``) and fits only the factors; ``append_to`` appends the new tasks to an MPT
adapter: its ``P*`` is fixed, its tasks are kept bitwise, and only the new tasks' factors are
fitted.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import numpy as np

from .checkpoint import Checkpoint, Source, download_missing, load_source
from .checks import require_valid
from .config import CONFIG_NAME, PEFT_TYPE, TASK_TYPES, WEIGHTS_NAMES, MptConfig, read_config, target_config
from .dtypes import UNIT_ROUND_OFF
from .errors import ConfigError, FormatError, MptToolsError, SourceError, ValidationError
from .files import guard_output
from .findings import Finding
from .formats import (
    BARE_KEY,
    DTYPE_CHOICES,
    DTYPE_NAMES,
    FLOAT_DTYPES,
    Raw,
    canonical_dtype,
    from_torch,
    json_float,
    memory_limit,
    normalise_keys,
    open_tensor_file,
    to_float32,
    to_float64,
    to_torch,
)
from .options import HubOptions, SourceSpec
from .progress import progress
from .prompts import plan_chunks, task_runs
from .recover import recover_starts
from .version import __version__
from .writer import fit_for_peft, fit_note, provenance, write_adapter

if TYPE_CHECKING:  # types only: importing them costs start-up time
    from .results import PackedTask, PackResult

NEAR_ZERO = 1e-6
"""Baseline: ``|P*[t, j]| <= NEAR_ZERO * rms(P*)`` is near zero (the ratio ``P_k / P*`` is 1 there)."""
NULL_RANK = 1e-12
"""Baseline: a rank component whose singular value is at most this times the largest is unused."""
PROX = 1e-10
"""Each block solve adds ``PROX * trace(G) / R`` times the distance to the current value (a
proximal term): it keeps rank-deficient blocks solvable and can only lower the objective."""
EXACT = 1e-20
"""The fit stops as exact when ``f <= EXACT * sum_k ||P_k||^2`` (relative error 1e-10)."""
ROUND_OFF_SHARE = 0.25
"""The fit stops as "round-off" once every task's relative error is at most this share of the
coarser unit round-off of its input's dtype and of the written dtypes (:func:`round_off_floors`)."""
SIGNS_SKIP = 1e-6
"""The starts from P*'s signs (:meth:`_Als.signs_start`) are not tried where a start's objective is
at most this times ``sum_k ||P_k||^2`` already (relative error 1e-3: theirs is far coarser)."""
CHUNK_BYTES = {"cpu": 256 << 20, "cuda": 2 << 30}
"""The default bound on the fit's two work buffers of ``[tasks, T, d]`` per device type."""
ANDERSON_DEPTH = 5
"""Anderson acceleration combines the last this many steps of ALS (:class:`_Anderson`)."""
ANDERSON_BYTES = {"cpu": 256 << 20, "cuda": 2 << 30}
"""The bound on Anderson acceleration's memory (``5 depth + 4`` copies of the variables: its
history and one step's work); a smaller depth where they are larger, none where not even depth 1
fits."""
ANDERSON_PAUSE = 32
"""After each rejected Anderson step the next is tried after twice as many iterations, at most
this many (it costs one objective evaluation: where it does not help, it costs almost nothing)."""
SMALL_RANK = 8
"""Up to this rank the batched R x R solves are unrolled (much faster than LAPACK calls on
millions of tiny systems); above it torch.linalg solves them."""
SMALL_CHUNK = 1 << 21
"""A CPU fit whose chunk holds fewer values than this ([tasks, T, d]) runs on one thread."""
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
FACTORS = ("prefix_task_cols", "prefix_task_rows")


START_CHOICES = ("auto", "baseline")
"""The fit's starts (:attr:`PackOptions.start`)."""
RECOVER_NOTE_SECONDS = 1.0
"""A recovery that took this long and gave no better start gets a note naming ``--start baseline``."""


class PackOptions(NamedTuple):
    """How :func:`pack_prompts` fits and writes.

    ``num_ranks``: R (default: ``append_to``'s; required otherwise). ``shared``: a [T, d] tensor
    file, a prompt folder or an MPT adapter whose ``prompt_embeddings`` becomes the fixed ``P*``.
    ``append_to``: an MPT adapter to append the new tasks to (its ``P*`` fixed, its tasks kept
    bitwise). ``task_type``: the adapter's task_type when no input states it (or to confirm
    theirs). ``dtype``: the stored dtype (default float32; ``append_to``'s own with it).
    ``seed``: seeds the unused rank directions of the baseline. ``tol``: stop when an iteration
    lowers the objective by at most this fraction. ``max_iters``: the most iterations (0: the
    baseline itself). ``device``: auto (CUDA when available), cuda or cpu. ``peft_compat``: the
    PEFT release adapter_config.json is written for. ``chunk_bytes``: the bound on the fit's two
    work buffers (default per device: :data:`CHUNK_BYTES`). ``start``: ``auto`` (also try ``P*``
    recovered by :mod:`mpt_tools.recover` and its signs, and start from the best) or ``baseline``
    (no recovery, whose search, on prompts too small for its linear routes, costs seconds on
    prompts that are not of the form, such as teacher prompts trained one by one: the mean prompt
    or its signs with the prompts' rms magnitudes, whichever fits better). ``hub``: how every
    input that is a Hub repo id or ``hf://`` URL is downloaded (PROMPTS, sources, ``shared``,
    ``append_to``)."""

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


def _tensor_of(tfile: Any, where: str) -> Raw:
    """The one prompt tensor of a file: its only tensor, or ``prompt_embeddings`` (a PEFT
    weights file); a file of MPT factors or of several other tensors is refused."""
    names = list(tfile.infos)
    keymap, _notes, _ignored = normalise_keys(names, where)
    if "prefix_task_cols" in keymap or "prefix_task_rows" in keymap:
        raise FormatError("holds MPT task factors: give it as --from FILE (--tasks LIST)", where)
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
        raise SourceError("is a Multitask Prompt Tuning adapter: give it as --from SOURCE (--tasks LIST)", str(folder))
    if peft_type != "PROMPT_TUNING":
        raise SourceError(f"peft_type is {peft_type!r}: expected a PROMPT_TUNING adapter", str(folder))
    weights = next((folder / n for n in WEIGHTS_NAMES if os.path.lexists(folder / n)), None)
    if weights is None:
        raise SourceError("no adapter_model.safetensors or adapter_model.bin in this directory", str(folder))
    raw = _tensor_of(open_tensor_file(weights), str(weights))
    array = _finite(to_float32(raw) if raw.dtype != "F64" else raw.array.reshape(raw.shape), str(weights))
    nts = cfg.num_transformer_submodules
    nvt = cfg.size("num_virtual_tokens")
    if nvt is not None and nts is not None and nvt * nts != array.shape[0]:
        raise ValidationError(
            f"prompt_embeddings has {array.shape[0]} rows but adapter_config.json says num_virtual_tokens "
            f"{nvt} x num_transformer_submodules {nts}",
            str(weights),
        )
    token_dim = cfg.size("token_dim")
    if token_dim is not None and token_dim != array.shape[1]:
        raise ValidationError(
            f"prompt_embeddings has {array.shape[1]} columns but adapter_config.json says token_dim {token_dim}",
            str(weights),
        )
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
    text = os.fspath(path)
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


def _is_mpt(path: str | os.PathLike[str], hub: HubOptions) -> bool:
    """Whether ``path`` (a local folder or file, or a Hub repo: downloaded to tell) holds an MPT
    adapter rather than one prompt."""
    local, label = locate_prompt(path, hub)
    p = Path(local)
    with _named_as(local, label):
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


def _where(ckpt: Checkpoint) -> str:
    """How an MPT input is named: its Hub URL at the commit read, or its location as given."""
    return ckpt.hub["url"] if ckpt.hub else ckpt.location


def _mpt_prompt(ckpt: Checkpoint, task: int) -> _Prompt:
    cfg = ckpt.config
    raw = dict(cfg.raw) if ckpt.config_from_file else None
    nts = None if "num_transformer_submodules" in cfg.assumed else cfg.num_transformer_submodules
    label = f"{_where(ckpt)}#task{task}"
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
# the fit
# ---------------------------------------------------------------------------------------------


class FitSettings(NamedTuple):
    """The fit's stopping rule, seed and chunking (see :class:`PackOptions`); ``chunk_tasks``:
    tasks per chunk of the work buffers (default: all); ``line_search`` off: plain ALS (the
    benchmark's comparison; no Anderson acceleration either); ``anderson``: the depth of
    Anderson acceleration (0: none); ``signs`` off: no start from P*'s signs with the prompts'
    rms magnitudes (:meth:`_Als.signs_start`; the benchmark's "mean prompt alone");
    ``round_off``: per task, the relative error at or below which the fit stops as "round-off"
    once every task is there (:func:`round_off_floors`; None: never)."""

    seed: int = 0
    tol: float = 1e-6
    max_iters: int = 1000
    chunk_tasks: int | None = None
    line_search: bool = True
    recover: bool = True
    round_off: tuple[float, ...] | None = None
    anderson: int = ANDERSON_DEPTH
    signs: bool = True


class FitResult(NamedTuple):
    """What :func:`als_fit` found: ``shared`` [T, d], ``cols`` [N, T, R], ``rows`` [N, R, d]
    (float64, on the prompts' device), per task the squared errors of the baseline and of the
    fit, the objective after each iteration (``history[0]``: the start's), the iterations run,
    how many of them took the extrapolated step, why the fit stopped ("tol", "exact",
    "round-off" or "max-iters"), where it started (the one of lowest objective: "baseline";
    "recovered", the algebraic start of :mod:`mpt_tools.recover`; "signs", its signs with the
    prompts' rms as magnitudes; "mean-signs", the mean prompt's signs so), the seconds the
    recovery took (0 where it was not tried), and how many iterations took Anderson's step."""

    shared: Any
    cols: Any
    rows: Any
    baseline_sq: Any
    fit_sq: Any
    history: list[float]
    iterations: int
    extrapolated: int
    stopped: str
    start: str
    recover_seconds: float = 0.0
    accelerated: int = 0


def round_off_floors(inputs: Sequence[str], written: Sequence[str]) -> tuple[float, ...]:
    """Per input prompt (its dtype tag in ``inputs``: F64, F32, F16 or BF16), the relative error
    at which more fitting is lost in rounding: :data:`ROUND_OFF_SHARE` times the coarser unit
    round-off of that input's dtype and of the ``written`` tensors' dtypes. Below it the fit
    matches the prompt closer than the prompt's own rounding tells (the values it was rounded
    from are not known better), and casting ``P*`` and the factors to the written dtype costs
    about its unit round-off anyway (0.75 to 0.85 of it measured for float32 adapters): a fit
    error of a quarter of that adds about 4% to the written error, in quadrature, which is all
    that further iterations could take off (measured: the written error 0.96 to 1.11 times that of
    a fit run on to --tol, as the cast's own error varies between equally good factors;
    ``test_the_round_off_stop_costs_little``)."""
    out = max(UNIT_ROUND_OFF[tag] for tag in written)
    return tuple(ROUND_OFF_SHARE * max(UNIT_ROUND_OFF[tag], out) for tag in inputs)


def _floors_sq(prompts: Any, round_off: Sequence[float] | None) -> Any:
    """Per task, the squared error at which the fit stops as "round-off" (``round_off[k]^2
    ||P_k||^2``; None: never)."""
    import torch

    if round_off is None:
        return None
    if len(round_off) != prompts.shape[0]:
        raise ValueError(f"round_off has {len(round_off)} floors for {prompts.shape[0]} prompts: one per prompt")
    share = torch.tensor(round_off, dtype=prompts.dtype, device=prompts.device)
    return torch.linalg.vector_norm(prompts, dim=(1, 2)).square() * share.square()


@contextmanager
def _small_linalg(device: Any, small: bool = True) -> Iterator[None]:
    """One CPU thread for many tiny problems (batched eigh, QR, the unrolled R x R solves, a
    whole fit of small prompts when ``small``): with torch's OpenMP threads on each tiny
    operation, two cores ran them 2-10x slower than one (a [6, 8, 2] @ [6, 2, 32] bmm: 9 ms with
    two threads, 0.01 ms with one). Nothing changes on a GPU."""
    import torch

    with _threads(device, 1 if small else torch.get_num_threads()):
        yield


@contextmanager
def _threads(device: Any, count: int) -> Iterator[None]:
    """``count`` CPU threads for torch inside (nothing changes on a GPU)."""
    import torch

    if device.type != "cpu" or count == torch.get_num_threads():
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _prox_step(a: Any, c: Any, x: Any) -> Any:
    """The step ``delta = (A + lam I)^-1 (c - A x)`` for a batch of symmetric positive
    semi-definite R x R blocks, laid out blocks-first: ``a`` [R, R, *batch], ``c`` and the current
    value ``x`` [R, *batch]; ``lam = PROX * trace(A) / R`` (at least the smallest normal float).

    Block ``f(x) = x^T A x - 2 c^T x + const`` (one row of U or column of V), ``x + delta``
    minimises ``f(x + delta) + lam |delta|^2``, so ``f(x + delta) <= f(x) - lam |delta|^2 <= f(x)``:
    never an increase, also where ``A`` is singular (an unused rank, a zero row of P*), and the
    exact block minimiser ``A^-1 c`` as ``lam / eig(A)`` vanishes. Up to :data:`SMALL_RANK` the
    Cholesky factorisation is unrolled over the batch (elementwise operations on contiguous slabs);
    above it torch.linalg solves."""
    import torch

    r = a.shape[0]
    tiny = torch.finfo(a.dtype).tiny
    lam = sum(a[i, i] for i in range(r)) * (PROX / r)
    lam = lam.clamp_min(tiny)
    rhs = [c[i] - sum(a[i, j] * x[j] for j in range(r)) for i in range(r)]
    if r > SMALL_RANK:
        eye = torch.eye(r, dtype=a.dtype, device=a.device)
        blocks = a.movedim((0, 1), (-2, -1)) + lam[..., None, None] * eye
        factor, _info = torch.linalg.cholesky_ex(blocks)
        step = torch.cholesky_solve(torch.stack(rhs, dim=-1).unsqueeze(-1), factor).squeeze(-1)
        return step.movedim(-1, 0)
    low: list[list[Any]] = [[None] * r for _ in range(r)]
    for i in range(r):
        for j in range(i + 1):
            s = a[i, j] + lam if i == j else a[i, j]
            for k in range(j):
                s = s - low[i][k] * low[j][k]
            low[i][j] = torch.sqrt(s.clamp_min(tiny)) if i == j else s / low[j][j]
    y: list[Any] = []
    for i in range(r):
        s = rhs[i]
        for k in range(i):
            s = s - low[i][k] * y[k]
        y.append(s / low[i][i])
    step_: list[Any] = [None] * r
    for i in reversed(range(r)):
        s = y[i]
        for k in range(i + 1, r):
            s = s - low[k][i] * step_[k]
        step_[i] = s / low[i][i]
    return torch.stack(step_)


def _chunk_errors(p: Any, shared: Any, cols: Any, rows: Any, buffer: Any) -> Any:
    """Per task of a chunk, ``||P_k - P* * (U_k @ V_k)||_F^2``, with ``buffer`` ([k, T, d]) as
    the one work array."""
    import torch

    w = torch.bmm(cols, rows, out=buffer)
    w.mul_(shared).sub_(p)
    return torch.linalg.vector_norm(w, dim=(1, 2)).square()


def prompt_errors(p: Any, shared: Any, cols: Any, rows: Any, *, chunk: int | None = None, buffer: Any = None) -> Any:
    """Per task ``||P_k - P* * (U_k @ V_k)||_F^2`` (float64 torch tensors: ``p`` [N, T, d],
    ``shared`` [T, d], ``cols`` [N, T, R], ``rows`` [N, R, d]), in chunks of ``chunk`` tasks
    that share one work array (``buffer``, else allocated)."""
    import torch

    n = p.shape[0]
    step = max(1, min(chunk or n, n))
    if buffer is None:
        buffer = torch.empty(step, *p.shape[1:], dtype=p.dtype, device=p.device)
    out = torch.empty(n, dtype=p.dtype, device=p.device)
    for a in range(0, n, step):
        b = min(n, a + step)
        out[a:b] = _chunk_errors(p[a:b], shared, cols[a:b], rows[a:b], buffer[: b - a])
    return out


def _top_directions(ratio: Any, rank: int) -> tuple[Any, Any, Any]:
    """The rank-``rank`` truncated SVD of each ``ratio[k]`` ([T, d]), split evenly: ``cols``
    [k, T, m] and ``rows`` [k, m, d] (m = min(rank, T, d)) with ``cols @ rows`` the projection of
    ``ratio[k]`` on its top m singular directions, and each direction's singular value [k, m].
    The directions are the top eigenvectors of the smaller Gram matrix (``R R^T`` or ``R^T R``,
    a symmetric eigenproblem of min(T, d)): a [100, 4096] SVD costs 0.7 s on two cores, this
    30 ms. A product of projections is exact whatever the accuracy of the weakest directions."""
    import torch

    t, d = ratio.shape[1:]
    m = min(rank, t, d)
    if t <= d:
        _vals, vecs = torch.linalg.eigh(torch.bmm(ratio, ratio.transpose(1, 2)))
        left = vecs[:, :, t - m :].flip(-1)  # [k, T, m], the strongest first
        right = torch.bmm(left.transpose(1, 2), ratio)  # [k, m, d] = S V^T
        sing = torch.linalg.vector_norm(right, dim=2)
        root = sing.sqrt()
        safe = torch.where(root > 0, root, torch.ones_like(root))
        return left * root[:, None, :], right / safe[:, :, None], sing
    _vals, vecs = torch.linalg.eigh(torch.bmm(ratio.transpose(1, 2), ratio))
    right = vecs[:, :, d - m :].flip(-1).transpose(1, 2)  # [k, m, d]
    left = torch.bmm(ratio, right.transpose(1, 2))  # [k, T, m] = U S
    sing = torch.linalg.vector_norm(left, dim=1)
    root = sing.sqrt()
    safe = torch.where(root > 0, root, torch.ones_like(root))
    return left / safe[:, None, :], right * root[:, :, None], sing


class _Als:
    """The ALS state and its chunked passes over the prompts ``p`` [N, T, d] (float64)."""

    def __init__(self, p: Any, rank: int, shared: Any, chunk: int) -> None:
        import torch

        self.p = p
        self.n, self.t, self.d = p.shape
        self.r = rank
        self.fixed = shared is not None
        self.shared = shared.clone() if shared is not None else p.mean(0)
        self.cols = torch.zeros(self.n, self.t, rank, dtype=p.dtype, device=p.device)
        self.rows = torch.zeros(self.n, rank, self.d, dtype=p.dtype, device=p.device)
        self.chunk = max(1, min(chunk, self.n))
        self.buf_q = torch.empty(self.chunk, self.t, self.d, dtype=p.dtype, device=p.device)
        self.buf_w = torch.empty_like(self.buf_q)
        self.moved = False

    def chunks(self) -> list[tuple[int, int]]:
        return [(a, min(self.n, a + self.chunk)) for a in range(0, self.n, self.chunk)]

    def baseline(self, seed: int) -> None:
        """P* as given or the mean prompt; factors from the truncated SVD of ``P_k / P*``."""
        import torch

        ps = self.shared
        rms = float(torch.linalg.vector_norm(ps)) / math.sqrt(max(1, ps.numel()))
        near = ps.abs() <= NEAR_ZERO * rms
        safe = torch.where(near, torch.ones_like(ps), ps)
        gen = torch.Generator().manual_seed(seed)  # on the CPU: the same draws on every device and chunking
        draws = torch.randn(self.n, self.t, self.r, generator=gen, dtype=self.p.dtype).to(self.p.device)
        draws /= torch.linalg.vector_norm(draws, dim=1, keepdim=True).clamp_min(torch.finfo(draws.dtype).tiny)
        for a, b in self.chunks():
            ratio = torch.div(self.p[a:b], safe, out=self.buf_q[: b - a])
            ratio.masked_fill_(near, 1.0)
            with _small_linalg(ratio.device):
                cols, rows, sing = _top_directions(ratio, self.r)
            m = sing.shape[1]
            self.cols[a:b, :, :m] = cols
            self.rows[a:b, :m] = rows
            unused = torch.ones(b - a, self.r, dtype=torch.bool, device=sing.device)
            unused[:, :m] = sing <= NULL_RANK * sing[:, :1]
            self.cols[a:b] = torch.where(unused[:, None, :], draws[a:b], self.cols[a:b])
            self.rows[a:b] = self.rows[a:b].masked_fill(unused[:, :, None], 0.0)

    def errors(self) -> Any:
        """Per task ``||P_k - P* * (U_k @ V_k)||_F^2`` of the current state."""
        return prompt_errors(self.p, self.shared, self.cols, self.rows, chunk=self.chunk, buffer=self.buf_w)

    def sweep(self, trace: list[tuple[str, float]] | None = None) -> None:
        """One iteration: every task's U, then its V (one pass over the tasks), then P*."""
        import torch

        ps = self.shared
        sq = ps * ps
        num = torch.zeros_like(ps) if not self.fixed else None
        den = torch.zeros_like(ps) if not self.fixed else None
        after_u = after_v = 0.0
        r, t, d = self.r, self.t, self.d
        for a, b in self.chunks():
            n = b - a
            p, cols, rows = self.p[a:b], self.cols[a:b], self.rows[a:b]
            q = torch.mul(p, ps, out=self.buf_q[:n])
            # rows of U: A[k, t] = sum_j P*[t, j]^2 V_k[:, j] V_k[:, j]^T, c = (P* * P_k)[t] @ V_k^T
            outer = (rows[:, :, None, :] * rows[:, None, :, :]).reshape(n * r * r, d)
            gram = (outer @ sq.T).reshape(n, r, r, t).permute(1, 2, 0, 3)  # [R, R, n, T]
            rhs = torch.bmm(q, rows.transpose(1, 2)).permute(2, 0, 1)  # [R, n, T]
            with _small_linalg(p.device):
                cols += _prox_step(gram.contiguous(), rhs, cols.permute(2, 0, 1)).permute(1, 2, 0)
            if trace is not None:
                after_u += float(_chunk_errors(p, ps, cols, rows, self.buf_w[:n]).sum())
            # columns of V: A[k, j] = sum_t P*[t, j]^2 U_k[t] U_k[t]^T, c = U_k^T (P* * P_k)[:, j]
            ut = cols.transpose(1, 2)
            outer = (ut[:, :, None, :] * ut[:, None, :, :]).reshape(n * r * r, t)
            gram = (outer @ sq).reshape(n, r, r, d).permute(1, 2, 0, 3)  # [R, R, n, d]
            rhs = torch.bmm(ut, q).transpose(0, 1)  # [R, n, d]
            with _small_linalg(p.device):
                rows += _prox_step(gram.contiguous(), rhs, rows.transpose(0, 1)).transpose(0, 1)
            if trace is not None:
                after_v += float(_chunk_errors(p, ps, cols, rows, self.buf_w[:n]).sum())
            if num is not None and den is not None:
                w = torch.bmm(cols, rows, out=self.buf_w[:n])
                num += torch.mul(p, w, out=q).sum(0)
                den += torch.mul(w, w, out=q).sum(0)
        if trace is not None:
            trace += [("U", after_u), ("V", after_v)]
        if num is not None and den is not None:
            moved = den > 0
            self.shared = torch.where(moved, num / torch.where(moved, den, torch.ones_like(den)), ps)

    def extrapolate(self, before: Any, step: float, errors: Any) -> Any:
        """The line search of ALS (Bro, 1998): try ``before + step * (now - before)`` for every
        variable (P* only when it is fitted) and keep it only when its objective is lower than
        the current one (``errors``: per task, so the objective still never increases); returns
        the per-task errors of the state kept and sets ``moved``."""
        self.moved = False
        shared = self.shared if self.fixed else before[0] + step * (self.shared - before[0])
        cols = before[1] + step * (self.cols - before[1])
        rows = before[2] + step * (self.rows - before[2])
        tried = prompt_errors(self.p, shared, cols, rows, chunk=self.chunk, buffer=self.buf_w)
        if float(tried.sum()) < float(errors.sum()):
            self.shared, self.cols, self.rows, self.moved = shared, cols, rows, True
            return tried
        return errors

    def balance(self) -> None:
        """Per task, the product's SVD split evenly (``U sqrt(S)``, ``sqrt(S) V^T``): the same
        product up to round-off, factors of equal scale."""
        import torch

        with _small_linalg(self.p.device):
            qc, rc = torch.linalg.qr(self.cols)
            qr_, rr = torch.linalg.qr(self.rows.transpose(1, 2))
            u, s, vh = torch.linalg.svd(rc @ rr.transpose(1, 2), full_matrices=False)
        root = s.sqrt()
        k = s.shape[-1]
        cols = torch.zeros_like(self.cols)
        rows = torch.zeros_like(self.rows)
        cols[:, :, :k] = (qc @ u) * root[:, None, :]
        rows[:, :k] = root[:, :, None] * (vh @ qr_.transpose(1, 2))
        self.cols, self.rows = cols, rows

    @functools.cached_property
    def prompt_rms(self) -> Any:
        """``sqrt(mean_k P_k^2)`` [T, d], in chunks of tasks (once: the prompts do not change)."""
        import torch

        rms = torch.zeros(self.t, self.d, dtype=self.p.dtype, device=self.p.device)
        for a, b in self.chunks():
            rms += self.p[a:b].square().sum(0)
        return (rms / self.n).sqrt()

    @staticmethod
    def signs_start(shared: Any, rms: Any) -> Any:
        """``P*`` with the signs of ``shared`` (+ where it is 0) and magnitudes ``rms`` (the
        prompts', :attr:`prompt_rms`): ALS cannot flip a sign, so the signs are what a start
        decides, and magnitudes near the prompts' keep the ratios ``P_k / P*`` of the baseline's
        factors of order one (the mean of prompts whose signs differ is small, and the ratios to
        it are large and noisy)."""
        import torch

        return torch.where(shared < 0, -1.0, 1.0).to(shared.dtype) * rms

    def scale_like_prompts(self) -> None:
        """Fix the gauge: ``P*`` is defined up to a positive scaling of each row and each column,
        ``P* * (a b^T)``, that the factors absorb (``U_k / a``, ``V_k / b``). Choose the one whose
        ``|P*|`` is closest, in log scale, to the prompts' rms ``sqrt(mean_k P_k^2)``: the
        two-way additive fit of the log ratio, over the entries where both are non-zero, each
        scale rounded to a power of two: so the product ``P* * (U_k V_k)`` is unchanged to the bit
        (barring overflow to infinity or underflow to subnormals). (The recovered start has a gauge
        of its own, ``P* = 1`` on one row and one column; this gives every fit the prompts'
        magnitude.)"""
        import torch

        rms = self.prompt_rms
        mag = self.shared.abs()
        used = (mag > 0) & (rms > 0)
        gap = torch.where(used, torch.log(torch.where(used, rms, 1.0)) - torch.log(torch.where(used, mag, 1.0)), 0.0)
        weight = used.to(gap.dtype)
        row_n = weight.sum(1).clamp_min(1.0)
        row = gap.sum(1) / row_n  # [T]
        col = ((gap - row[:, None]) * weight).sum(0) / weight.sum(0).clamp_min(1.0)  # [d]
        by_row, by_col = torch.exp2(torch.round(row / math.log(2))), torch.exp2(torch.round(col / math.log(2)))
        if not (bool(torch.isfinite(by_row).all()) and bool(torch.isfinite(by_col).all())):
            return
        shared = self.shared * by_row[:, None] * by_col[None, :]
        cols = self.cols / by_row[None, :, None]
        rows = self.rows / by_col[None, None, :]
        if all(bool(torch.isfinite(x).all()) for x in (shared, cols, rows)):
            self.shared, self.cols, self.rows = shared, cols, rows


class _Anderson:
    """Anderson acceleration of the ALS map ``g`` (one :meth:`_Als.sweep`; Walker and Ni 2011,
    type II, as De Sterck's N-GMRES accelerates ALS for tensor decompositions): from the last
    ``depth`` + 1 pairs ``(x_i, g(x_i))``, with ``F_i = g(x_i) - x_i``, the step ``g_k - dG gamma``
    where ``gamma`` minimises ``|F_k - dF gamma|`` (``dF``, ``dG``: differences of consecutive
    ``F`` and ``g``). The fit keeps it only where the objective is lower, so nothing can
    increase; where it does not help the tries back off (:data:`ANDERSON_PAUSE`). Near an exact
    fit, where ALS and its line search crawl, it takes 2 to 9 times fewer iterations (measured:
    ``test_anderson_gets_through_the_crawl``). The variables are P* (when it is fitted) and every
    task's factors, flattened; the history holds ``2 depth + 2`` copies and a step builds
    ``3 depth + 2`` more (the residuals, their differences and those of ``g``, the step)."""

    def __init__(self, als: _Als, depth: int, budget: int) -> None:
        size = als.cols.numel() + als.rows.numel() + (0 if als.fixed else als.shared.numel())
        fits = (budget // max(1, 8 * size) - 4) // 5
        self.depth = max(0, min(depth, fits))
        self.xs: list[Any] = []
        self.gs: list[Any] = []
        self.pause = self.wait = 0
        self.kept = 0  # the steps that lowered the objective

    def _flat(self, als: _Als, state: tuple[Any, Any, Any]) -> Any:
        import torch

        parts = [state[1].reshape(-1), state[2].reshape(-1)]
        return torch.cat(parts if als.fixed else [state[0].reshape(-1), *parts])

    def record(self, als: _Als, before: tuple[Any, Any, Any]) -> None:
        """Add the pair (``before``, the state after the sweep)."""
        if not self.depth:
            return
        self.xs = [*self.xs[-self.depth :], self._flat(als, before)]
        self.gs = [*self.gs[-self.depth :], self._flat(als, (als.shared, als.cols, als.rows))]

    def step(self, als: _Als) -> tuple[Any, Any, Any] | None:
        """The accelerated (P*, cols, rows), or None (too little history, a pause, no progress)."""
        import torch

        if self.wait > 0:
            self.wait -= 1
            return None
        if len(self.xs) < 2:
            return None
        res = [g - x for g, x in zip(self.gs, self.xs, strict=True)]
        d_f = torch.stack([b - a for a, b in itertools.pairwise(res)], 1)
        d_g = torch.stack([b - a for a, b in itertools.pairwise(self.gs)], 1)
        gram = d_f.T @ d_f
        scale = float(torch.trace(gram))
        if not scale > 0 or not math.isfinite(scale):
            return None
        gram += (1e-12 * scale) * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        gamma = torch.linalg.solve(gram, d_f.T @ res[-1])
        x = self.gs[-1] - d_g @ gamma
        if not bool(torch.isfinite(x).all()):
            return None
        a = 0 if als.fixed else als.shared.numel()
        b = a + als.cols.numel()
        shared = als.shared if als.fixed else x[:a].reshape(als.shared.shape)
        return shared, x[a:b].reshape(als.cols.shape), x[b:].reshape(als.rows.shape)

    def attempt(self, als: _Als, errors: Any) -> tuple[bool, Any]:
        """Try :meth:`step` from ``als`` (whose per-task errors are ``errors``): moves ``als`` there
        where the objective is lower; returns whether a step was tried and the per-task errors of
        the state kept. A rejected step pauses the tries twice as long as the last (at most
        :data:`ANDERSON_PAUSE`), a kept one ends the pause."""
        jump = self.step(als)
        if jump is None:
            return False, errors
        tried = prompt_errors(als.p, *jump, chunk=als.chunk, buffer=als.buf_w)
        better = float(tried.sum()) < float(errors.sum())
        self.pause = 0 if better else min(ANDERSON_PAUSE, max(1, 2 * self.pause))
        self.wait = self.pause
        if not better:
            return True, errors
        als.shared, als.cols, als.rows = jump
        self.kept += 1
        return True, tried


def als_fit(
    prompts: Any,
    num_ranks: int,
    *,
    shared: Any = None,
    settings: FitSettings | None = None,
    trace: list[tuple[str, float]] | None = None,
    advance: Callable[[int], None] | None = None,
) -> FitResult:
    """Fit ``P* * (U_k @ V_k)`` to ``prompts`` (a float64 torch tensor [N, T, d], on any
    device) by alternating least squares from the baseline (see the module docstring).

    ``shared`` ([T, d], same dtype and device) fixes P*. ``trace``, when given, receives
    ``(block, objective)`` after every block update of every iteration ("U", "V", "P*" or "-"
    with a fixed P*, then "extrapolate": after the line search), starting with
    ``("baseline", f0)``: what the monotonicity test reads. ``advance(1)`` is called after each
    iteration (a progress bar)."""

    import torch

    settings = settings or FitSettings()
    chunk = settings.chunk_tasks or prompts.shape[0]
    small = min(chunk, prompts.shape[0]) * prompts.shape[1] * prompts.shape[2] < SMALL_CHUNK
    threads = torch.get_num_threads()
    with _small_linalg(prompts.device, small):
        return _fit(prompts, num_ranks, shared, settings, trace, advance, threads)


def _fit(
    prompts: Any,
    num_ranks: int,
    shared: Any,
    settings: FitSettings,
    trace: list[tuple[str, float]] | None,
    advance: Callable[[int], None] | None,
    threads: int,
) -> FitResult:
    """:func:`als_fit` itself; the recovery runs on ``threads`` CPU threads, even in a fit of
    small prompts (its systems are not tiny: 2 tasks [16, 1024] at rank 6 recovered in 2.1 s on
    one thread of two cores, 1.5 s on both; none ran slower on both)."""
    import torch

    chunk = settings.chunk_tasks or prompts.shape[0]
    als = _Als(prompts, num_ranks, shared, chunk)
    als.baseline(settings.seed)
    total = float(torch.linalg.vector_norm(prompts)) ** 2  # (einsum: 50x slower on the CPU)
    baseline_sq = errors = als.errors()
    history = [float(baseline_sq.sum())]
    if trace is not None:
        trace.append(("baseline", history[0]))
    start = "baseline"
    recovers = settings.recover and not als.fixed
    recover_started = time.perf_counter()
    with _threads(prompts.device, threads):
        found = recover_starts(prompts, num_ranks, chunk) if recovers else []
    recover_seconds = time.perf_counter() - recover_started if recovers else 0.0
    # the recovered candidates (more than one where the recovery could not tell them apart), then
    # the signs of the first and of the mean prompt with the prompts' rms as magnitudes (not tried
    # where a start is within SIGNS_SKIP already: they start far coarser)
    starts = [("recovered", candidate) for candidate in found]
    if settings.signs and not als.fixed:
        rms = als.prompt_rms
        starts += [("signs", als.signs_start(found[0], rms))] if found else []
        starts += [("mean-signs", als.signs_start(als.shared, rms))]
    for name, candidate in starts:
        if name != "recovered" and history[0] <= SIGNS_SKIP * total:
            continue
        kept = als.shared, als.cols.clone(), als.rows.clone()  # baseline() fills the factors in place
        als.shared = candidate
        # its gauge (1 on a row and a column) can be far from the prompts' magnitudes, and
        # baseline() counts as zero what is small against P*'s rms
        als.scale_like_prompts()
        als.baseline(settings.seed)
        tried = als.errors()
        if float(tried.sum()) < history[0]:
            start, history[0], errors = name, float(tried.sum()), tried
        else:
            als.shared, als.cols, als.rows = kept
    if starts and trace is not None:
        trace.append(("start", history[0]))
    iterations = extrapolated = 0
    anderson_bytes = ANDERSON_BYTES.get(prompts.device.type, ANDERSON_BYTES["cpu"])
    anderson = _Anderson(als, settings.anderson if settings.line_search else 0, anderson_bytes)
    floors = _floors_sq(prompts, settings.round_off)

    def done(errors: Any, f: float) -> str | None:
        """Why the fit is done at per-task ``errors`` (objective ``f``), if it is."""
        if f <= EXACT * total:
            return "exact"
        if floors is not None and bool((errors <= floors).all()):
            return "round-off"
        return None

    stopped = done(errors, history[0]) or "max-iters"
    if stopped == "max-iters":
        for _ in range(settings.max_iters):
            before = (als.shared, als.cols.clone(), als.rows.clone()) if settings.line_search else None
            als.sweep(trace)
            iterations += 1
            errors = als.errors()
            f = float(errors.sum())
            if trace is not None:
                trace.append(("-" if als.fixed else "P*", f))
            if settings.line_search:
                assert before is not None
                anderson.record(als, before)
                errors = als.extrapolate(before, iterations ** (1 / 3), errors)
                f = float(errors.sum())
                extrapolated += als.moved
                if trace is not None:
                    trace.append(("extrapolate", f))
                tried_step, errors = anderson.attempt(als, errors)
                f = float(errors.sum())
                if tried_step and trace is not None:
                    trace.append(("anderson", f))
            previous = history[-1]
            history.append(f)
            if advance is not None:
                advance(1)
            reason = done(errors, f) or ("tol" if previous - f <= settings.tol * previous else None)
            if reason is not None:
                stopped = reason
                break
    if not als.fixed:
        als.scale_like_prompts()
    als.balance()
    return FitResult(
        als.shared,
        als.cols,
        als.rows,
        baseline_sq,
        als.errors(),
        history,
        iterations,
        extrapolated,
        stopped,
        start,
        recover_seconds,
        anderson.kept,
    )


# ---------------------------------------------------------------------------------------------
# the operation
# ---------------------------------------------------------------------------------------------


def _usage(field: str, message: str, found: Any, fix: str, expected: Any = None) -> Finding:
    return Finding.error("usage", field, message, expected=expected, found=found, fix=fix)


def _option_findings(opts: PackOptions, count: int) -> list[Finding]:
    """Problems of the options themselves (checked before anything is read)."""
    out: list[Finding] = []
    if count == 0:
        out.append(_usage("prompts", "nothing to pack", 0, "give PROMPTS or --from SOURCE", ">= 1 prompt"))
    if opts.num_ranks is None and opts.append_to is None:
        out.append(_usage("num_ranks", "is required (without --append-to)", None, "give --num-ranks R", ">= 1"))
    if opts.num_ranks is not None and opts.num_ranks < 1:
        out.append(_usage("num_ranks", "must be positive", opts.num_ranks, "pass --num-ranks 1 or more", ">= 1"))
    if opts.shared is not None and opts.append_to is not None:
        why = "--append-to fixes P* to the adapter's own"
        both = "--shared or --append-to"
        out.append(_usage("shared", why, os.fspath(opts.shared), "drop --shared (or --append-to)", both))
    if not (opts.tol >= 0 and math.isfinite(opts.tol)):
        out.append(_usage("tol", "must be a finite number >= 0", opts.tol, "pass e.g. --tol 1e-6", ">= 0"))
    if opts.max_iters < 0:
        out.append(_usage("max_iters", "must be >= 0", opts.max_iters, "pass e.g. --max-iters 1000", ">= 0"))
    if opts.seed < 0:
        out.append(_usage("seed", "must be >= 0", opts.seed, "pass a non-negative seed", ">= 0"))
    if opts.dtype is not None and canonical_dtype(opts.dtype) not in DTYPE_CHOICES:
        choices = ", ".join(DTYPE_CHOICES)
        out.append(_usage("dtype", "unknown dtype", opts.dtype, f"use one of {choices}", choices))
    if opts.start not in START_CHOICES:
        choices = ", ".join(START_CHOICES)
        out.append(_usage("start", "unknown start", opts.start, f"use one of {choices}", choices))
    if opts.task_type is not None and opts.task_type not in TASK_TYPES:
        types = ", ".join(TASK_TYPES)
        out.append(_usage("task_type", "unknown task type", opts.task_type, "give e.g. --task-type CAUSAL_LM", types))
    return out


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
    that states them (and by ``append``'s config and ``--task-type``): a disagreement is one error
    naming the input. The other fields come from the first input with a config (``append``'s)."""
    warnings: list[str] = []
    task_type, task_from = opts.task_type, "--task-type"
    nts: int | None = None
    nts_from = ""
    config: dict[str, Any] = {}
    config_from = ""
    if append is not None:
        stated = append.config.task_type
        if stated is not None and opts.task_type is not None and opts.task_type != stated:
            raise ValidationError(f"task_type is {stated!r}, not --task-type {opts.task_type!r}", append.location)
        if stated is not None:
            task_type, task_from = stated, append.location
        nts, nts_from = append.config.num_transformer_submodules, append.location
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
            "no input states the task type (bare tensors, a TGIS decoder.pt): give --task-type, e.g. CAUSAL_LM",
            "pack",
        )
    if nts is None:
        nts = 2 if task_type == "SEQ_2_SEQ_LM" else 1
    if shape.rows % nts:
        raise ValidationError(
            f"the prompts have {shape.rows} rows, which {nts} transformer submodules cannot split", shape.where
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


def _plan(prompts: Sequence[str | os.PathLike[str]], sources: list[TaskSource], opts: PackOptions) -> _Plan:
    located: list[tuple[str, str]] = []
    remote = sum(not os.path.lexists(os.fspath(p)) for p in prompts)
    with progress(remote, "download", unit="prompt") as advance:  # a bar where 2 or more are Hub repos
        for path in prompts:
            located.append(locate_prompt(path, opts.hub))
            if located[-1][0] != located[-1][1]:
                advance(1)
    protected = [local for local, _label in located]
    append = _load_mpt(opts.append_to, opts.hub) if opts.append_to is not None else None
    fixed: np.ndarray | None = None
    shared_label = "fitted"
    shape: _Shape | None = None
    if append is not None:
        protected += append.source_paths
        fixed = to_float64(append.read("prompt_embeddings"))
        shared_label = append.location
    elif opts.shared is not None:
        shared_label = os.fspath(opts.shared)
        if _is_mpt(shared_label, opts.hub):
            ckpt = _load_mpt(shared_label, opts.hub)
            fixed, files, shared_label = to_float64(ckpt.read("prompt_embeddings")), ckpt.source_paths, _where(ckpt)
        else:
            local, label = locate_prompt(shared_label, opts.hub)
            item = _read_at(local, label)
            assert item.array is not None
            fixed, files = item.array, item.files
            shared_label = shared_label if local == label else label
        protected += files
    if fixed is not None:
        shape = _Shape(int(fixed.shape[0]), int(fixed.shape[1]), shared_label)
    checkpoints = []
    for source in sources:
        tasks = None if source.tasks is None else [int(t) for t in source.tasks]
        ckpt = _load_mpt(source.source, opts.hub, tasks)
        protected += ckpt.source_paths
        checkpoints.append((ckpt, tasks if tasks is not None else list(range(ckpt.shapes["prefix_task_cols"][0]))))
    return _Plan(located, append, fixed, shared_label, checkpoints, protected, shape)


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
                    f"{n} prompts of [{shape.rows}, {shape.cols}] need {need:,} bytes in float64, more than this "
                    f"machine's memory ({memory_limit():,} bytes)",
                    where,
                )
            held.append(torch.empty(n, shape.rows, shape.cols, dtype=torch.float64, device=dev))
        return held[0]

    items: list[_Prompt] = []
    for i, (local, label) in enumerate(plan.located):
        item = _read_at(local, label)
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
            "write float32 (--dtype float32)",
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
                f"its tensors are kept bitwise in {DTYPE_NAMES.get(other, other)}: drop --dtype "
                f"{DTYPE_NAMES[wanted]} (or convert the adapter first)",
                append.location,
            )
    return tags


def _rel(sq: float, norm_sq: float) -> float | None:
    """``sqrt(sq / norm_sq)``, a relative error (0 for an exact zero prompt; None when undefined)."""
    if norm_sq > 0:
        return json_float(math.sqrt(sq / norm_sq))
    return 0.0 if sq == 0 else None


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
    task_sources = [TaskSource(*s) for s in sources]
    problems = _option_findings(opts, len(prompts) + len(task_sources))
    if problems:
        from .findings import refusal

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
            raise ValidationError(f"num_ranks is {rank}, not --num-ranks {opts.num_ranks}", append.location)
    else:
        rank = cast(int, opts.num_ranks)
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
    if fitted.exact:
        notes.append(fit_note(fitted))
    if fit.stopped == "max-iters" and opts.max_iters > 0:
        notes.append(f"stopped after --max-iters {opts.max_iters} iterations, still improving by more than --tol")
    tried = fit.recover_seconds > 0  # 0: not tried (--start baseline, a fixed P*)
    if tried and fit.start in ("baseline", "mean-signs") and fit.recover_seconds >= RECOVER_NOTE_SECONDS:
        notes.append(
            f"the recovery of P* took {fit.recover_seconds:.1f} s and gave no better start"
            " (the prompts are not P* * (U_k V_k) at this rank, or its search missed): --start baseline skips it"
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
