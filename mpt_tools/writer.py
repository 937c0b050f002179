"""Writing target adapters: PEFT-style files, provenance metadata, atomic and refusing to clobber."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from . import __version__
from .config import CONFIG_NAME, config_to_json
from .errors import WriteError
from .formats import Payload, Raw, safetensors_parts, synced_temp_file

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


ADAPTER_FILES = (WEIGHTS_NAME, CONFIG_NAME, "adapter_model.bin")


def source_folders(protected: list[str]) -> set[Path]:
    """The folders mpt-tools must not write into, given the source paths in ``protected``.

    A source folder is off limits, and so is the folder of a source file that is part of an adapter
    (an adapter_config.json beside it, or an adapter file name). A bare tensor file such as
    ``./sources.safetensors`` does not claim its folder: outputs may go next to it (never over it).
    """
    folders: set[Path] = set()
    for item in protected:
        p = Path(item).resolve()
        if p.is_dir():
            folders.add(p)
        elif p.name in ADAPTER_FILES or (p.parent / CONFIG_NAME).exists():
            folders.add(p.parent)
    return folders


def check_output_dir(out_dir: str | os.PathLike[str], *, force: bool, protected: list[str]) -> Path:
    """Refuse an output folder that would clobber files without ``force`` or touch a source.

    ``protected`` are source paths (files or folders) that must never be written.
    Nothing is created here.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise WriteError("exists and is not a directory", str(out))
    if out.resolve() in source_folders(protected):
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

    Written through :func:`write_files` (a new folder appears complete or not at all; in an existing
    one each file is replaced atomically). Returns the written paths.
    """
    out = check_output_dir(out_dir, force=force, protected=protected or [])
    blob = safetensors_parts(tensors, metadata)
    text = config_to_json(config)
    write_files(out, {WEIGHTS_NAME: blob, CONFIG_NAME: text})
    return [str(out / WEIGHTS_NAME), str(out / CONFIG_NAME)]


def _fsync_dir(folder: str | os.PathLike[str]) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def staging_folder(out_dir: str | os.PathLike[str]) -> Path:
    """A new, empty, hidden folder on ``out_dir``'s filesystem to build an output in: inside
    ``out_dir`` when it exists, else beside it (then renaming it to ``out_dir`` is one step)."""
    out = Path(out_dir)
    base = out if out.exists() else out.parent
    base.mkdir(parents=True, exist_ok=True)
    staging = base / f".{out.name}.{secrets.token_hex(6)}.tmp"
    os.mkdir(staging)  # mode 0o777 less the umask, like a plain mkdir
    return staging


def write_files(out_dir: str | os.PathLike[str], files: dict[str, Payload]) -> None:
    """Write ``files`` (name to content) into ``out_dir`` as close to one atomic step as POSIX allows.

    Every file is written and fsynced in a :func:`staging_folder` first, then
    :func:`commit_staged` moves them into place: a new folder is either absent or complete, and in
    an existing one each file is always the old or the new one (they can disagree only between two
    back-to-back renames). On a failure nothing is left behind and existing files are untouched.
    """
    out = Path(out_dir)
    try:
        staging = staging_folder(out)
        try:
            for name, data in files.items():
                os.replace(synced_temp_file(staging, name, data), staging / name)
            _fsync_dir(staging)
            commit_staged(staging, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as exc:
        raise WriteError(f"cannot write: {exc.strerror or exc}", str(out)) from None


def commit_staged(staging: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> list[str]:
    """Move the files of a complete, fsynced :func:`staging_folder` into ``out_dir``.

    A missing ``out_dir`` is the staging folder renamed (one atomic step); in an existing one the
    files are renamed back to back, each always the old or the new one (the emptied staging folder
    is the caller's to remove). Returns the new paths.
    """
    src, out = Path(staging), Path(out_dir)
    names = sorted(p.name for p in src.iterdir())
    try:
        if not out.exists():
            os.rename(src, out)
        else:
            for name in names:
                os.replace(src / name, out / name)
        _fsync_dir(out)
        _fsync_dir(out.parent)
    except OSError as exc:
        raise WriteError(f"cannot write: {exc.strerror or exc}", str(out)) from None
    return [str(out / name) for name in names]
