"""``compat``: rewrite an adapter's config so that one PEFT release loads it; the weights are
copied bitwise.

PEFT releases before 0.14 refuse an adapter_config.json key they do not know, and later ones warn
about it (see :mod:`mpt_tools.peft_releases`). :func:`compat` reads an MPT or plain
PROMPT_TUNING adapter (written by any PEFT release or by mpt-tools), checks it as ``validate``
does, leaves out the keys the named release does not know when they hold their default (and
``peft_version`` where unknown), refuses a value that needs a newer release, and writes the
config and a byte-for-byte copy of the weights file into a new folder.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .checkpoint import Checkpoint, Source, load_source
from .checks import DEFAULTED_SIZES, require_valid
from .config import CONFIG_NAME, SOURCE_INITS, TASK_TYPES, WEIGHTS_NAME, WEIGHTS_NAMES, config_to_json
from .errors import ConfigError, FormatError, VerifyError, WriteError, flag
from .files import file_sha256, guard_output, same_file, write_files
from .findings import Finding
from .formats import DTYPE_NAMES, to_float64
from .paths import open_regular
from .peft_releases import fit_config, resolve_release
from .version import __version__

if TYPE_CHECKING:  # types only
    from .results import CompatResult, SetKey

FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
COPY_CHUNK = 64 << 20  # bytes read at a time when copying the weights


def prompt_tuning_findings(ckpt: Checkpoint) -> list[Finding]:
    """The problems of a plain PROMPT_TUNING adapter (one ``prompt_embeddings`` [T, d] tensor):
    the tensor's presence, rank, dtype and finite values, and its shape against the config."""
    cfg = ckpt.config
    out: list[Finding] = []
    task_type = cfg.raw.get("task_type")
    if task_type not in TASK_TYPES:
        out.append(
            Finding.error("task-type", "task_type", "not a PEFT task type", expected=list(TASK_TYPES), found=task_type)
        )
    info = ckpt.info("prompt_embeddings")
    if info is None:
        return [*out, Finding.error("missing-tensor", "prompt_embeddings", "a prompt tuning adapter holds it")]
    if len(info.shape) != 2 or 0 in info.shape:
        return [*out, Finding.error("shape", "prompt_embeddings", "must be [T, d]", found=list(info.shape))]
    if info.dtype not in FLOAT_DTYPES:
        dtype = DTYPE_NAMES.get(info.dtype, info.dtype)
        return [*out, Finding.error("dtype", "prompt_embeddings", "must be floating point", found=dtype)]
    nvt, nts, d = cfg.size("num_virtual_tokens"), cfg.num_transformer_submodules, cfg.raw.get("token_dim")
    if nvt is None or nts is None or nvt * nts != info.shape[0]:
        out.append(
            Finding.error(
                "config-shape",
                "num_virtual_tokens",
                "num_virtual_tokens x num_transformer_submodules must be the tensor's T",
                expected=info.shape[0],
                found=[cfg.raw.get("num_virtual_tokens"), cfg.raw.get("num_transformer_submodules")],
            )
        )
    if d is not None and d != info.shape[1]:
        out.append(
            Finding.error("config-shape", "token_dim", "differs from the tensor's d", expected=info.shape[1], found=d)
        )
    if not out and not np.isfinite(to_float64(ckpt.read("prompt_embeddings"))).all():
        out.append(Finding.error("non-finite", "prompt_embeddings", "holds NaN/Inf values"))
    return out


def _weights_name(ckpt: Checkpoint) -> str:
    """The name the copy of the weights file gets: the source's own (adapter_model.safetensors or
    adapter_model.bin), so PEFT finds it as it found the source's."""
    name = Path(ckpt.weights_path).name
    if name in WEIGHTS_NAMES:
        return name
    return WEIGHTS_NAME if name.lower().endswith(".safetensors") else WEIGHTS_NAMES[1]


def _guard_weights(out: Path, name: str, force: bool) -> None:
    """Refuse what write_adapter's guard does not see: an existing adapter_model.bin without
    ``force``, and an adapter_model.safetensors that PEFT would load instead of a copied .bin."""
    if name != WEIGHTS_NAME and os.path.lexists(out / WEIGHTS_NAME):
        raise WriteError(
            f"{WEIGHTS_NAME} is here and PEFT would load it instead of the copied {name}; "
            f"give an empty {flag('--out', 'out')}",
            str(out),
        )
    if not force and os.path.lexists(out / name):
        raise WriteError(f"{name} already exists here; pass {flag('--force', 'force=True')} to overwrite it", str(out))


def _read_checked(path: str, sha256: str, identity: tuple[int, ...] | None) -> list[bytes | memoryview]:
    """The bytes of ``path`` (read, not memory-mapped: a file truncated meanwhile cannot raise
    SIGBUS), in chunks; FormatError "changed while reading" when it is no longer the file the
    source was read from (``identity``: replaced or removed), VerifyError when the bytes are not
    the ``sha256`` the source was read with (the file changed since), before anything is written."""
    digest = hashlib.sha256()
    parts: list[bytes | memoryview] = []
    try:
        with open_regular(path) as fh:
            same_file(path, identity, os.fstat(fh.fileno()))
            while chunk := fh.read(COPY_CHUNK):
                digest.update(chunk)
                parts.append(chunk)
    except FileNotFoundError:  # removed since the source was read
        same_file(path, identity, None)
        raise FormatError("cannot read file: it was removed", path) from None
    if digest.hexdigest() != sha256:
        raise VerifyError("changed while it was read (its sha256 differs); nothing was written", path)
    return parts


def _repaired(ckpt: Checkpoint) -> tuple[dict[str, Any], list[SetKey]]:
    """The source's config with what keeps every PEFT release from loading the folder set right,
    and each change: num_tasks and num_ranks left out where the tensors hold another count than
    PEFT's default 1; PEFT's source-to-target init (which re-reads its source file on every load)
    as RANDOM with a null path, as every writer of mpt-tools writes it."""
    raw = dict(ckpt.config.raw)
    changes: list[SetKey] = []

    def put(key: str, value: Any, reason: str) -> None:
        changes.append({"key": key, "value": value, "was": raw.get(key), "reason": reason})
        raw[key] = value

    if raw.get("peft_type") != "PROMPT_TUNING":
        for key, (tensor, dim) in DEFAULTED_SIZES.items():
            shape = ckpt.shapes.get(tensor)
            if raw.get(key) is None and shape and len(shape) == 3 and shape[dim] != 1:
                put(key, shape[dim], "absent, PEFT takes 1, which does not fit the tensors")
        init = raw.get("prompt_tuning_init")
        if init in SOURCE_INITS:
            path = raw.get("prompt_tuning_init_state_dict_path")
            put("prompt_tuning_init", "RANDOM", f"{init} re-reads {path!r} on every load (the weights are what load)")
            if path is not None:
                put("prompt_tuning_init_state_dict_path", None, "read by the source-to-target init only")
    return raw, changes


def compat_adapter(
    source: Source,
    peft: str,
    out: str | os.PathLike[str],
    *,
    force: bool = False,
) -> CompatResult:
    """Write ``source``'s adapter into ``out`` with a config that PEFT release ``peft`` loads.

    ``source`` is an adapter folder (local, a named subfolder, or a Hub repo) of an MPT or plain
    PROMPT_TUNING adapter; it is checked as ``validate`` checks it (every value too) and refused
    when invalid. Keys ``peft`` does not know are left out when they hold their default
    (``peft_version`` always, where unknown); a value that needs a newer release raises
    ConfigError naming every such key, before anything is written. The weights file is copied
    byte for byte under its own name and its sha256 checked after writing. Returns the result
    (schema ``mpt-tools/compat/1``): the keys removed (with the value and why) and kept.
    """
    release = resolve_release(peft)
    ckpt = load_source(source)
    if not ckpt.config_from_file:
        raise ConfigError(
            "has no adapter_config.json: compat rewrites an adapter folder's config "
            + flag(
                "(for a bare tensor file use `init`, `tasks` or `convert` with --peft-compat)",
                "(for a bare tensor file use init_adapter(), select_tasks() or convert() with peft_compat=)",
            ),
            ckpt.location,
        )
    peft_type = ckpt.config.raw.get("peft_type")
    if peft_type == "PROMPT_TUNING":
        warnings = require_valid(ckpt, findings=prompt_tuning_findings(ckpt))
    else:
        warnings = require_valid(ckpt)  # MPT: every check of validate (a wrong peft_type included)
    raw, repaired = _repaired(ckpt)
    try:
        fit = fit_config(raw, release, keep_records=True)
    except ConfigError as exc:  # name the adapter whose config it is
        raise ConfigError(exc.message, ckpt.where) from None
    warnings += fit.warnings
    folder = guard_output(out, force=force, protected=ckpt.source_paths)
    name = _weights_name(ckpt)
    _guard_weights(folder, name, force)
    source_sha = ckpt.sha256()
    parts = _read_checked(ckpt.weights_path, source_sha, ckpt.file.identity)
    write_files(folder, {name: parts, CONFIG_NAME: config_to_json(fit.config)}, force=force)
    written = [str(folder / name), str(folder / CONFIG_NAME)]
    copy_sha = file_sha256(folder / name)
    if copy_sha != source_sha:
        raise VerifyError(f"the copied {name} differs from the source's (sha256 {copy_sha})", str(folder))
    result: dict[str, Any] = {
        "schema": "mpt-tools/compat/1",
        "source": ckpt.location,
        "source_sha256": source_sha,
        "out": str(out),
        "files": written,
        "peft": release,
        "peft_type": peft_type,
        "changed": bool(fit.removed or repaired),
        "set": repaired,
        "removed": fit.removed,
        "kept": fit.kept,
        "weights_sha256": copy_sha,
        "warnings": warnings,
        "notes": list(ckpt.notes),
        "version": __version__,
    }
    return result  # type: ignore[return-value]
