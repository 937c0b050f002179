"""Writing target adapters: PEFT-style files, provenance metadata, atomic and refusing to clobber."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from . import __version__
from .config import CONFIG_NAME, config_to_json
from .errors import WriteError
from .formats import Raw, atomic_write, safetensors_bytes

WEIGHTS_NAME = "adapter_model.safetensors"


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


def check_output_dir(out_dir: str | os.PathLike[str], *, force: bool, protected: list[str]) -> Path:
    """Refuse an output folder that would clobber files without ``force`` or touch a source.

    ``protected`` are source paths (files or folders) that must never be written.
    Nothing is created here.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise WriteError("exists and is not a directory", str(out))
    resolved = out.resolve()
    for item in protected:
        p = Path(item).resolve()
        folder = p if p.is_dir() else p.parent
        if resolved == folder:
            raise WriteError("is the source's own folder; mpt-tools never writes into a source", str(out))
    if not force:
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            if os.path.lexists(out / name):
                raise WriteError(f"{name} already exists here; pass --force to overwrite it", str(out))
    return out


def write_adapter(
    out_dir: str | os.PathLike[str],
    tensors: dict[str, Raw],
    config: dict[str, Any],
    metadata: dict[str, str],
    *,
    force: bool = False,
    protected: list[str] | None = None,
) -> list[str]:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` into ``out_dir``.

    Each file is written to a temp file in ``out_dir`` and renamed into place; on failure no
    partial file remains and a folder created here is removed. Returns the written paths.
    """
    out = check_output_dir(out_dir, force=force, protected=protected or [])
    blob = safetensors_bytes(tensors, metadata)
    text = config_to_json(config)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteError(f"cannot create folder: {exc.strerror or exc}", str(out)) from None
    try:
        atomic_write(out / WEIGHTS_NAME, blob)
        atomic_write(out / CONFIG_NAME, text)
    except BaseException:
        if created:
            for name in (WEIGHTS_NAME, CONFIG_NAME):
                with contextlib.suppress(OSError):
                    (out / name).unlink()
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    return [str(out / WEIGHTS_NAME), str(out / CONFIG_NAME)]
