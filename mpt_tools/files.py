"""Files on disk: streamed sha256 with its cache, atomic writes, staging folders committed in one
step, and the one output guard every command uses before writing."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

from .config import ADAPTER_FILES, CONFIG_NAME, WEIGHTS_NAME
from .errors import WriteError


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file (0o666 less the umask)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


Payload = bytes | str | list[bytes | memoryview]


def synced_temp_file(folder: str | os.PathLike[str], name: str, data: Payload) -> str:
    """Write ``data`` (bytes, text, or a list of buffers written in order) to a new temp file named
    after ``name`` in ``folder``, fsynced, with the mode a normal write would give (not mkstemp's
    0600). Returns its path; removes it on failure."""
    parts = [data.encode("utf-8")] if isinstance(data, str) else [data] if isinstance(data, bytes) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb", buffering=0) as fh:
            os.fchmod(fh.fileno(), file_mode())
            for part in parts:
                view = memoryview(part)
                while view.nbytes:
                    written = fh.write(view)
                    if not written:
                        raise OSError(5, "short write")
                    view = view[written:]
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def atomic_write(path: str | os.PathLike[str], data: Payload) -> None:
    """Write ``data`` to ``path`` atomically: a temp file in the same folder, fsync, then rename.

    On any failure the temp file is removed and ``path`` is left as it was.
    """
    target = Path(path)
    tmp = ""
    try:
        tmp = synced_temp_file(target.parent, target.name, data)
        os.replace(tmp, target)
    except BaseException as exc:
        if tmp:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(exc, OSError):
            raise WriteError(f"cannot write: {exc.strerror or exc}", str(target)) from None
        raise


def _hash_cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mpt-tools" / "sha256-v1.json"


def hash_file(path: str | os.PathLike[str], digest: Any) -> str:
    """Feed a file to a hashlib ``digest`` in 1 MiB blocks; its hex digest."""
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return str(digest.hexdigest())


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file, streamed, remembered per (path, size, mtime, ctime, inode).

    Hashing a large source on every run would read the whole file even when a command needs one
    task's bytes, so digests are cached in ``$XDG_CACHE_HOME/mpt-tools`` (``~/.cache``);
    ``MPT_TOOLS_NO_HASH_CACHE=1`` turns the cache off. Any change to the file changes its key.
    """
    real = os.path.realpath(path)
    st = os.stat(real)
    key = f"{real}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}|{st.st_dev}"
    use_cache = not os.environ.get("MPT_TOOLS_NO_HASH_CACHE") and st.st_size >= (1 << 20)
    cache_file = _hash_cache_path()
    cache: dict[str, str] = {}
    if use_cache:
        try:
            loaded = json.loads(cache_file.read_text())
            if isinstance(loaded, dict):
                cache = {k: v for k, v in loaded.items() if isinstance(k, str) and isinstance(v, str)}
        except (OSError, ValueError):
            cache = {}
        if key in cache:
            return cache[key]
    value = hash_file(real, hashlib.sha256())
    if use_cache:
        cache = {k: v for k, v in cache.items() if not k.startswith(real + "|")}
        cache[key] = value
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(cache_file, json.dumps(dict(list(cache.items())[-256:])))
        except Exception:  # a cache that cannot be written is only slower
            pass
    return value


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


def guard_output(
    path: str | os.PathLike[str], *, force: bool, protected: list[str], kind: Literal["dir", "file"] = "dir"
) -> Path:
    """The one output guard: refuse an output that would clobber files without ``force`` or touch
    a source, before any work is done. Nothing is created here.

    ``kind="dir"``: an adapter folder (refused when it is a file, a source's folder, or already
    holds adapter files without ``force``). ``kind="file"``: one file (refused when it is not a
    file, is a source file, lies in a source's folder, or exists without ``force``). ``protected``
    are source paths (files or folders) that must never be written.
    """
    out = Path(path)
    if kind == "file":
        if out.exists() and not out.is_file():
            raise WriteError("exists and is not a file", str(out))
        if out.resolve() in {Path(p).resolve() for p in protected}:
            raise WriteError("is the source file itself; mpt-tools never writes over a source", str(out))
        if out.resolve().parent in source_folders(protected):
            raise WriteError("is in the source's own folder; mpt-tools never writes into a source", str(out))
        if os.path.lexists(out) and not force:
            raise WriteError("already exists; pass --force to overwrite it", str(out))
        return out
    if out.exists() and not out.is_dir():
        raise WriteError("exists and is not a directory", str(out))
    if out.resolve() in source_folders(protected):
        raise WriteError("is the source's own folder; mpt-tools never writes into a source", str(out))
    if not force:
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            if os.path.lexists(out / name):
                raise WriteError(f"{name} already exists here; pass --force to overwrite it", str(out))
    return out


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
