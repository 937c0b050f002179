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


def write_files(out_dir: str | os.PathLike[str], files: dict[str, Payload]) -> None:
    """Write ``files`` (name to content) into ``out_dir`` as close to one atomic step as POSIX allows.

    A new folder is built complete under a temp name beside it and renamed into place, so it is
    either absent or complete. In an existing folder every file is first written and fsynced under a
    temp name, then all are renamed into place back to back: each file is always the old or the new
    one, and the window in which they disagree is the few microseconds between two renames. On a
    failure no temp file or folder is left behind and the existing files are untouched.
    """
    out = Path(out_dir)
    try:
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp_dir = out.parent / f".{out.name}.{secrets.token_hex(6)}.tmp"
            os.mkdir(tmp_dir)  # mode 0o777 less the umask, like a plain mkdir
            try:
                for name, data in files.items():
                    os.replace(synced_temp_file(tmp_dir, name, data), tmp_dir / name)
                _fsync_dir(tmp_dir)
                os.rename(tmp_dir, out)
            except BaseException:
                shutil.rmtree(tmp_dir, ignore_errors=True)
                raise
            _fsync_dir(out.parent)
            return
        temps: dict[str, str] = {}
        try:
            for name, data in files.items():
                temps[name] = synced_temp_file(out, name, data)
            for name in list(temps):
                os.replace(temps[name], out / name)
                del temps[name]
        finally:
            for tmp in temps.values():
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        _fsync_dir(out)
    except OSError as exc:
        raise WriteError(f"cannot write: {exc.strerror or exc}", str(out)) from None


def commit_staged(staging: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> list[str]:
    """Move the files of a complete, fsynced ``staging`` folder (beside ``out_dir``) into place.

    A missing ``out_dir`` is the staging folder renamed (one atomic step); in an existing one the
    files are renamed back to back, each always the old or the new one. Returns the new paths.
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
