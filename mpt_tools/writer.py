"""Writing target adapters: PEFT-style files, provenance metadata, atomic and refusing to clobber."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint
from .config import CONFIG_NAME, WEIGHTS_NAME, config_to_json
from .errors import ConfigError
from .files import guard_output, write_files
from .formats import Raw, safetensors_parts
from .peft_releases import Fit, fit_config, resolve_release
from .version import __version__


def provenance(fields: dict[str, Any]) -> dict[str, str]:
    """Safetensors metadata: ``format: pt`` plus ``mpt_tools.*`` provenance, all strings."""
    meta = {"format": "pt", "mpt_tools.version": __version__}
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        meta[f"mpt_tools.{key}"] = str(value)
    return meta


def fit_for_peft(config: dict[str, Any], peft_compat: str | None = None, where: str | None = None) -> Fit:
    """``config`` fitted to the PEFT releases an adapter is written for (see
    :func:`mpt_tools.peft_releases.fit_config`): every release from 0.10.0 on by default, exactly
    ``peft_compat`` (``"0.13.2"``) when given. Raises ConfigError (naming ``where``, the source the
    config comes from) when a value needs a newer release than ``peft_compat``: call it before any
    output is written."""
    try:
        return fit_config(config, resolve_release(peft_compat) if peft_compat is not None else None)
    except ConfigError as exc:
        if exc.path is None and where is not None:
            raise ConfigError(exc.message, where) from None
        raise


def fit_note(fit: Fit) -> str:
    """The note a writer adds for ``--peft-compat``: the release and the keys left out."""
    left = ", ".join(r["key"] for r in fit.removed) or "none"
    return f"adapter_config.json written for PEFT {fit.target} (keys left out: {left})"


def write_adapter(
    out_dir: str | os.PathLike[str],
    tensors: dict[str, Raw],
    config: dict[str, Any],
    metadata: dict[str, str],
    *,
    force: bool = False,
    protected: list[str] | None = None,
    check: Callable[[Path], None] | None = None,
) -> list[str]:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` into ``out_dir``.

    Written through :func:`write_files` (a new folder appears complete or not at all; in an existing
    one each file is replaced atomically; ``check``: called with the staged weights file before
    anything is moved into place). Returns the written paths.
    """
    out = guard_output(out_dir, force=force, protected=protected or [])
    blob = safetensors_parts(tensors, metadata)
    text = config_to_json(config)
    staged_check = None if check is None else (lambda staging: check(staging / WEIGHTS_NAME))
    write_files(out, {WEIGHTS_NAME: blob, CONFIG_NAME: text}, force=force, check=staged_check)
    return [str(out / WEIGHTS_NAME), str(out / CONFIG_NAME)]


def _result(
    schema: str, ckpt: Checkpoint, out: str | os.PathLike[str], files: list[str], **extra: Any
) -> dict[str, Any]:
    res: dict[str, Any] = {
        "schema": f"mpt-tools/{schema}/1",
        "source": ckpt.location,
        "source_sha256": ckpt.sha256(),
        "out": str(out),
        "files": files,
    }
    res.update(extra)
    res.setdefault("notes", list(ckpt.notes))
    res["version"] = __version__
    return res


def _write_and_report(
    operation: str,
    ckpt: Checkpoint,
    out: str | os.PathLike[str],
    tensors: dict[str, Raw],
    config: Fit,
    recorded: dict[str, Any],
    *,
    force: bool,
    **extra: Any,
) -> dict[str, Any]:
    """Write an adapter folder (``mpt_tools.*`` provenance: the operation, the source and
    ``recorded``; ``config`` fitted by :func:`fit_for_peft`, whose warnings and note join the
    result) and return the command's result: :func:`_result` with ``extra``, the tensor shapes and
    the metadata written."""
    extra["warnings"] = [*extra.get("warnings", []), *config.warnings]
    if config.exact:
        extra["notes"] = [*extra.get("notes", ckpt.notes), fit_note(config)]
    meta = provenance({"operation": operation, **ckpt.provenance(), **recorded})
    written = write_adapter(out, tensors, config.config, meta, force=force, protected=ckpt.source_paths)
    shapes = {k: list(v.shape) for k, v in tensors.items()}
    return _result(operation, ckpt, out, written, **extra, shapes=shapes, metadata=meta)
