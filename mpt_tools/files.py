"""Files on disk: streamed sha256 with its cache, atomic writes, staging folders committed in one
step, and the one output guard every command uses before writing.

Every temporary file or staging folder is named ``.<output name>.mpt-tools-<pid>-<hex>.tmp`` and
held with an exclusive ``flock`` while its writer lives. A writer killed by SIGKILL cannot clean up,
so every writer first removes the stale ones of its output (:func:`remove_stale_staging`): those
older than the running process, whose lock is free and whose pid is not alive. Putting a finished
output in place (:func:`commit_staged`, :func:`atomic_write`) never replaces an output that another
process wrote meanwhile unless ``force`` says so: a new folder or file is renamed onto a name that
must not exist (``renameat2(RENAME_NOREPLACE)``, else ``link``), and files moved into an existing
folder are moved under an exclusive lock on that folder.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from .config import ADAPTER_FILES, CONFIG_NAME, WEIGHTS_NAME
from .errors import MptToolsError, SourceError, WriteError, flag
from .interrupts import cleanup, deferred
from .options import checked_path
from .paths import open_regular, read_small

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locks, the pid in the name still protects
    fcntl = None  # type: ignore[assignment]

PROCESS_START = time.time()
STAGING_PATTERN = re.compile(r"^\.(?P<name>.+)\.mpt-tools-(?P<pid>[0-9]+)-[0-9a-f]{12}\.tmp$")
_held: dict[str, int] = {}  # staging path -> the fd that holds its lock


NAME_MAX = 255
"""The most bytes of one file name (Linux, macOS and Windows file systems alike)."""
STEM_BYTES = 200
"""The most bytes of an output's name a staging name holds: with its 35 to 45 bytes of pid, random
part and suffix it stays under the 255 bytes a file name may have."""


def _force() -> str:
    """How a refusal names overwriting: ``--force`` or ``force=True``."""
    return flag("--force", "force=True")


def _stem(name: str) -> str:
    """``name``, or for a name too long to fit in a staging name, its first bytes and a hash of the
    whole (so two long names that share their start still get different staging names)."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) <= STEM_BYTES:
        return name
    import hashlib

    digest = hashlib.sha256(raw).hexdigest()[:12]
    head = raw[: STEM_BYTES - 13].decode("utf-8", "ignore")  # whole characters only
    return f"{head}~{digest}"


def staging_name(name: str) -> str:
    """A new hidden name for a temporary file or staging folder of the output ``name`` (a long one
    shortened: :func:`_stem`)."""
    random = os.urandom(6).hex()  # secrets.token_hex(6), without its imports
    return f".{_stem(name)}.mpt-tools-{os.getpid()}-{random}.tmp"


def _lock(fd: int, *, wait: bool) -> bool:
    """Take an exclusive flock on ``fd``: False if another process holds it (``wait=False``);
    True also where the filesystem has no locks."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
    return True


def _hold(path: str | os.PathLike[str]) -> None:
    """Hold the lock of a staging folder until :func:`_release`."""
    fd = os.open(path, os.O_RDONLY)
    _lock(fd, wait=False)
    _held[os.fspath(path)] = fd


def _release(path: str | os.PathLike[str]) -> None:
    fd = _held.pop(os.fspath(path), None)
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError):
        return True
    return True


def _is_stale(path: Path, pid: int) -> bool:
    """A staging entry left by a dead writer: older than this process, its writer's pid not
    alive, and its lock free (a writer in another pid namespace still holds it)."""
    if pid == os.getpid():
        return False
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if st.st_mtime >= PROCESS_START or _pid_alive(pid):
        return False
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return True  # a symlink or an unreadable entry of our own pattern: nobody can hold it
    try:
        return _lock(fd, wait=False)
    finally:
        os.close(fd)


def _staging_entries(out: Path) -> list[tuple[Path, int]]:
    """Staging entries of ``out``: beside it (named after it) and inside it (any)."""
    found: list[tuple[Path, int]] = []
    places: list[tuple[Path, str | None]] = [(out.parent, _stem(out.name))]
    if out.is_dir() and not out.is_symlink():
        places.append((out, None))
    for folder, name in places:
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    m = STAGING_PATTERN.match(entry.name)
                    if m and (name is None or m["name"] == name):
                        found.append((Path(entry.path), int(m["pid"])))
        except OSError:
            continue
    return found


def stale_staging(out: str | os.PathLike[str]) -> list[str]:
    """The stale staging files and folders of ``out`` (left by a killed writer), without removing
    them: ``inspect`` mentions them."""
    return sorted(str(p) for p, pid in _staging_entries(Path(out)) if _is_stale(p, pid))


def is_stale_staging(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a staging file or folder that a killed writer left behind (its name
    follows the staging pattern, its writer is gone and nothing holds its lock): ``audit`` lists
    the ones it meets."""
    m = STAGING_PATTERN.match(os.path.basename(path))
    return m is not None and _is_stale(Path(path), int(m["pid"]))


def remove_stale_staging(out: str | os.PathLike[str]) -> list[str]:
    """Remove the stale staging files and folders of ``out`` (see the module docstring); returns
    what was removed. Every writer calls it before it writes ``out``."""
    removed: list[str] = []
    for path, pid in _staging_entries(Path(out)):
        if not _is_stale(path, pid):
            continue
        try:
            if path.is_dir() and not path.is_symlink():
                _rmtree(path)
            else:
                path.unlink()
        except OSError:
            continue
        removed.append(str(path))
    REMOVED_STALE.extend(removed)
    return removed


REMOVED_STALE: list[str] = []  # what this process removed, for the CLI to mention
WRITTEN: list[str] = []  # outputs this process put in place, for an accurate account on a late failure


def _record(path: str | os.PathLike[str]) -> None:
    """Note an output put in place in :data:`WRITTEN`, unless it lies in a staging folder (``init
    --verify`` commits into one first: the user never gets that one)."""
    if not any(STAGING_PATTERN.match(part) for part in Path(path).parts):
        WRITTEN.append(os.fspath(path))


def written() -> list[str]:
    """The outputs this process put in place that still exist: what a late failure or a signal
    reports as already written."""
    return [p for p in WRITTEN if os.path.lexists(p)]


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist, deepest first: what making it creates."""
    missing: list[Path] = []
    for p in (folder, *folder.parents):
        if os.path.lexists(p):
            break
        missing.append(p)
    return missing


def _remove_made(made: list[Path]) -> None:
    """Remove the folders an output made (:func:`_missing_folders`), deepest first, while they are
    empty: an output that failed leaves no empty parents behind; one that exists keeps them."""
    for folder in made:
        try:
            os.rmdir(folder)
        except OSError:
            return


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file (0o666 less the umask). The umask
    is read from /proc (Linux) where it can be: setting it to read it, the only portable way,
    changes it for a moment for every thread of the process."""
    return 0o666 & ~_umask()


def _umask() -> int:
    """The process umask, without changing it where /proc/self/status has it."""
    try:
        with open("/proc/self/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


Payload = bytes | str | list[bytes | memoryview]


def write_synced(tmp: str | os.PathLike[str], data: Payload) -> None:
    """Create the new file ``tmp`` (never an existing one) holding ``data`` (bytes, text, or a list
    of buffers written in order), fsynced, with the mode a normal write would give (not mkstemp's
    0600), locked while it is written. The caller chose the name first, so whatever stops this
    (an error, a signal) the caller's cleanup can remove it: there is no moment when it exists
    under a name nobody knows."""
    parts = [data.encode("utf-8")] if isinstance(data, str) else [data] if isinstance(data, bytes) else data
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "wb", buffering=0) as fh:
        _lock(fd, wait=False)  # held while it is written (the fd's lock ends with it)
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


def atomic_write(
    path: str | os.PathLike[str],
    data: Payload,
    *,
    replace: bool = True,
    check: Callable[[Path], None] | None = None,
    parents: bool = False,
    record: bool = True,
) -> None:
    """Write ``data`` to ``path`` atomically: a temp file in the same folder, fsync, then rename.

    With ``replace=False`` the rename fails when ``path`` exists by then (another process wrote
    it meanwhile): WriteError "already exists", and nothing is replaced. ``check`` is called with
    the temp file once it is synced, before the rename: what it raises stops the write. On any
    failure or signal the temp file is removed and ``path`` is left as it was. ``parents``: create
    the missing folders above ``path`` first (removed again, if still empty, when nothing was
    written). ``record``: note ``path`` in :data:`WRITTEN` (not for mpt-tools' own cache).
    """
    target = Path(path)
    tmp = os.path.join(target.parent, staging_name(target.name))  # named before it exists
    made = _missing_folders(target.parent) if parents else []

    def remove() -> None:
        if tmp:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        _remove_made(made)

    try:
        if made:
            target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(target)
        write_synced(tmp, data)
        if check is not None:
            check(Path(tmp))
        with deferred():
            if replace:
                os.replace(tmp, target)
            elif not rename_noreplace(tmp, target):
                raise WriteError(f"already exists (written by another process meanwhile); pass {_force()}", str(target))
            tmp, made = "", []
            if record:
                _record(target)
    except BaseException as exc:
        cleanup(remove)  # a second signal waits for the removal
        if isinstance(exc, OSError):
            raise WriteError(f"cannot write: {exc.strerror or exc}", str(target)) from None
        raise


def _rmtree(path: str | os.PathLike[str], ignore_errors: bool = False) -> None:
    """``shutil.rmtree``, imported only when a folder is removed (its compression modules cost
    start-up time every command would pay)."""
    import shutil

    shutil.rmtree(path, ignore_errors=ignore_errors)


_RENAME_NOREPLACE = 1
_renameat2: Any = None


def _libc_renameat2() -> Any:
    """``renameat2`` from the C library (Linux, glibc 2.28+), or False."""
    global _renameat2
    if _renameat2 is None:
        _renameat2 = False
        if os.uname().sysname == "Linux":
            try:
                import ctypes

                libc = ctypes.CDLL(None, use_errno=True)
                func = libc.renameat2
                func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                func.restype = ctypes.c_int
                _renameat2 = func
            except (OSError, AttributeError):
                _renameat2 = False
    return _renameat2


def rename_noreplace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> bool:
    """Rename ``src`` to ``dst`` only if ``dst`` does not exist, in one step; False if it exists.

    ``renameat2(RENAME_NOREPLACE)`` where the kernel and filesystem have it; else a file is
    hard-linked (``link`` fails on an existing name) and a folder renamed (``rename`` fails on a
    non-empty folder; an empty one holds nothing to lose).
    """
    func = _libc_renameat2()
    if func:
        import ctypes

        at_fdcwd = -100
        if func(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return True
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            return False
        if err not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
            raise OSError(err, os.strerror(err), os.fspath(dst))
    if os.path.isdir(src) and not os.path.islink(src):
        if os.path.lexists(dst) and not os.path.isdir(dst):
            return False
        try:
            os.rename(src, dst)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                return False
            raise
        return True
    try:
        os.link(src, dst)
    except FileExistsError:
        return False
    os.unlink(src)
    return True


def _hash_cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mpt-tools" / "sha256-v1.json"


def hash_file(path: str | os.PathLike[str], digest: Any, identity: tuple[int, ...] | None = None) -> str:
    """Feed a file to a hashlib ``digest`` in 1 MiB blocks; its hex digest. With ``identity``
    (:func:`mpt_tools.formats.file_identity` of the file a command read), FormatError "changed while
    reading" when the file hashed is another one, or changed while it was hashed."""
    with open_regular(path) as fh:  # a FIFO or device is refused, never read forever
        same_file(path, identity, os.fstat(fh.fileno()))
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
        same_file(path, identity, os.fstat(fh.fileno()))
    return str(digest.hexdigest())


def same_file(path: str | os.PathLike[str], identity: tuple[int, ...] | None, st: os.stat_result | None) -> None:
    """FormatError "changed while reading" when the file of ``st`` (its stat; None: ``path`` was
    not found) is not the one of ``identity`` (:func:`mpt_tools.formats.file_identity`, taken when a
    source was read); nothing to check without ``identity``."""
    if identity is None:
        return
    from .formats import changed_error, file_identity  # numpy: only where a source was read

    now = None if st is None else file_identity(st)
    if now != identity:
        raise changed_error(os.fspath(path), identity, now)


def file_sha256(path: str | os.PathLike[str], identity: tuple[int, ...] | None = None) -> str:
    """SHA-256 of a file, streamed, remembered per (path, size, mtime, ctime, inode).

    Hashing a large source on every run would read the whole file even when a command needs one
    task's bytes, so digests are cached in ``$XDG_CACHE_HOME/mpt-tools`` (``~/.cache``);
    ``MPT_TOOLS_NO_HASH_CACHE=1`` turns the cache off. Any change to the file changes its key.
    ``identity``: the file a command read (a source); the digest must be of that very file, else
    FormatError "changed while reading" (replaced, rewritten or removed since).
    """
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except FileNotFoundError:
        same_file(path, identity, None)  # removed since it was read: "changed while reading"
        raise
    same_file(path, identity, st)  # before the cache is asked: its key is of the file there now
    key = f"{real}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}|{st.st_dev}"
    use_cache = not os.environ.get("MPT_TOOLS_NO_HASH_CACHE") and st.st_size >= (1 << 20)
    cache_file = _hash_cache_path()
    cache: dict[str, str] = {}
    if use_cache:
        try:
            text = read_small(cache_file, 1 << 22)  # a regular file of at most 4 MiB, else ignored
            loaded = json.loads(text) if text else None
            if isinstance(loaded, dict):
                cache = {k: v for k, v in loaded.items() if isinstance(k, str) and isinstance(v, str)}
        except (OSError, ValueError, MptToolsError):
            cache = {}
        if key in cache:
            return cache[key]
    import hashlib  # only when the digest is not cached: a cached run skips its import

    value = hash_file(real, hashlib.sha256(), identity)
    if use_cache:
        cache = {k: v for k, v in cache.items() if not k.startswith(real + "|")}
        cache[key] = value
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(cache_file, json.dumps(dict(list(cache.items())[-256:])), record=False)
        except Exception:  # a cache that cannot be written is only slower
            pass
    return value


def _within(path: Path, folders: set[Path]) -> bool:
    """Whether ``path`` (resolved) is one of ``folders`` or lies anywhere below one."""
    return any(path.is_relative_to(folder) for folder in folders)


def resolved_source(path: str | os.PathLike[str]) -> Path:
    """``Path(path).resolve()`` of a source path; SourceError ``broken symlink or symlink loop``
    naming it, as reading it says, where it is or passes through a symlink loop (resolve() raises
    RuntimeError on Python 3.11 and 3.12, OSError ELOOP later)."""
    try:
        return Path(path).resolve()
    except (RuntimeError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno != errno.ELOOP:
            raise  # not a loop: a working folder deleted meanwhile (the CLI says so), ...
        raise SourceError("broken symlink or symlink loop", os.fspath(path)) from None


def source_folders(protected: list[str]) -> set[Path]:
    """The folders mpt-tools must not write into, given the source paths in ``protected``.

    A source folder is off limits, and so is the folder of a source file that is part of an adapter
    (an adapter_config.json beside it, or an adapter file name). A bare tensor file such as
    ``./sources.safetensors`` does not claim its folder: outputs may go next to it (never over it).
    A source path in a symlink loop is a SourceError naming it (:func:`resolved_source`).
    """
    folders: set[Path] = set()
    for item in protected:
        p = resolved_source(item)
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

    ``kind="dir"``: an adapter folder (refused when it is a file, a source's folder or inside one,
    or already holds adapter files without ``force``). ``kind="file"``: one file (refused when it
    is not a file, is a source file, lies in a source's folder or below it, or exists without
    ``force``). ``protected``
    are source paths (files or folders) that must never be written.
    """
    out = Path(checked_path(path, "the output"))
    long = next((p for p in out.parts if len(os.fsencode(p)) > NAME_MAX), None)
    if long is not None:
        raise WriteError(
            f"a name in it has {len(os.fsencode(long))} bytes, more than the {NAME_MAX} a file name may have",
            str(out)[:300],
        )
    try:
        resolved = out.resolve()
    except (RuntimeError, OSError) as exc:  # RuntimeError (Python 3.11, 3.12) or ELOOP: a symlink loop
        if isinstance(exc, OSError) and exc.errno != errno.ELOOP:
            raise  # not a loop: a working folder deleted meanwhile (the CLI says so), ...
        loop = "is or passes through a symbolic link that loops (or a chain of links too long to follow)"
        raise WriteError(loop, str(out)) from None
    blocker = _file_on_the_way(out)
    if blocker is not None:
        raise WriteError(f"cannot write: {blocker} is a file, not a folder", str(out))
    folders = source_folders(protected)
    if kind == "file":
        if out.exists() and not out.is_file():
            raise WriteError("exists and is not a file", str(out))
        if resolved in {resolved_source(p) for p in protected}:
            raise WriteError("is the source file itself; mpt-tools never writes over a source", str(out))
        if _within(resolved.parent, folders):
            raise WriteError("is in the source's own folder; mpt-tools never writes into a source", str(out))
        if os.path.lexists(out) and not force:
            raise WriteError(f"already exists; pass {_force()} to overwrite it", str(out))
        return out
    if out.exists() and not out.is_dir():
        raise WriteError("exists and is not a directory", str(out))
    if resolved in folders:
        raise WriteError("is the source's own folder; mpt-tools never writes into a source", str(out))
    if _within(resolved, folders):
        raise WriteError("is inside the source's folder; mpt-tools never writes into a source", str(out))
    if not force:
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            if os.path.lexists(out / name):
                raise WriteError(f"{name} already exists here; pass {_force()} to overwrite it", str(out))
    return out


def guard_entries(target: Path, entries: list[str], protected: list[str]) -> None:
    """Refuse entries of ``target`` (names an export writes there) that are a source or hold one:
    ``--force`` replaces a whole entry, so ``out=..`` with a task named like the source's folder
    would have replaced the source. An entry that is a symbolic link is replaced as a link (what
    it points to is not touched), so only the entry's own path counts."""
    base = target.resolve()
    sources = [resolved_source(p) for p in protected]
    for entry in entries:
        path = base / entry
        hit = next((s for s in sources if s == path or s.is_relative_to(path)), None)
        if hit is not None:
            what = "is a source" if hit == path else "is the source's folder" if hit.parent == path else f"holds {hit}"
            raise WriteError(f"{entry} here {what}; mpt-tools never writes over a source", str(target))


def _file_on_the_way(out: Path) -> Path | None:
    """The nearest existing folder above ``out`` that is not a folder (``plain/x`` where ``plain`` is
    a file), or None: creating ``out``'s missing parents would fail there."""
    for parent in out.parents:
        if os.path.lexists(parent):
            return None if parent.is_dir() else parent
    return None


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """fsync a folder (its entries, once renamed or created, survive a power cut); errors are ignored."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def staging_folder(out_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """A new, empty, hidden folder on ``out_dir``'s filesystem to build an output in, removed
    (with whatever is left in it) when the block ends: inside ``out_dir`` when it exists, else
    beside it (then renaming it to ``out_dir`` is one step, :func:`commit_staged`).

    Stale staging of ``out_dir`` is removed first. The folder is named before it is made and
    removed in the same ``finally``, so no error or signal can leave it behind (a second signal
    waits for the removal); it is held (locked) by this process while it exists. Missing parents
    of ``out_dir`` are created, and removed again (those still empty) when ``out_dir`` was not
    written. An OSError in the block (a full disk, a quota) is the one-line WriteError naming
    ``out_dir``.
    """
    out = Path(out_dir)
    base = out if out.exists() else out.parent
    staging = base / staging_name(out.name)
    made = _missing_folders(base)

    def remove() -> None:
        _release(staging)
        if os.path.lexists(staging):  # (committed: renamed away)
            _rmtree(staging, ignore_errors=True)
        if made and not os.path.lexists(out):
            _remove_made(made)

    try:
        remove_stale_staging(out)
        base.mkdir(parents=True, exist_ok=True)
        os.mkdir(staging)  # mode 0o777 less the umask, like a plain mkdir
        with contextlib.suppress(OSError):  # unlockable: the live pid in its name still protects it
            _hold(staging)
        yield staging
    except OSError as exc:
        raise WriteError(f"cannot write: {exc.strerror or exc}", str(out)) from None
    finally:
        cleanup(remove)  # a signal during the removal would leave half of it: it waits until done


def write_files(
    out_dir: str | os.PathLike[str],
    files: dict[str, Payload],
    *,
    force: bool,
    check: Callable[[Path], None] | None = None,
) -> None:
    """Write ``files`` (name to content) into ``out_dir`` as close to one atomic step as POSIX allows.

    Every file is written and fsynced in a :func:`staging_folder` first, then
    :func:`commit_staged` moves them into place: a new folder is either absent or complete, and in
    an existing one each file is always the old or the new one (they can disagree only between two
    back-to-back renames). ``check`` is called with the staging folder before anything is moved:
    what it raises stops the write. On a failure nothing is left behind and existing files are
    untouched.
    """
    out = Path(out_dir)
    with staging_folder(out) as staging:  # (an OSError: its WriteError naming out)
        for name, data in files.items():
            write_synced(staging / name, data)
        fsync_dir(staging)
        if check is not None:
            check(staging)
        commit_staged(staging, out, force=force)


def commit_staged(staging: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, force: bool) -> list[str]:
    """Move the files of a complete, fsynced :func:`staging_folder` into ``out_dir``.

    A missing ``out_dir`` is the staging folder renamed onto a name that must not exist (one atomic
    step: if another process created ``out_dir`` meanwhile, this falls through to the next case).
    Into an existing folder the files are renamed back to back under an exclusive lock on the
    folder (each always the old or the new one); without ``force`` an adapter that appeared there
    meanwhile is not replaced (WriteError "already exists"). Signals wait until the renames are
    done. The emptied staging folder is removed by its :func:`staging_folder` block. Returns the
    new paths.
    """
    src, out = Path(staging), Path(out_dir)
    names = sorted(p.name for p in src.iterdir())
    try:
        with deferred():
            if src.parent != out and rename_noreplace(src, out):
                _release(src)
            else:
                _move_into(src, out, names, force=force)
            fsync_dir(out)
            fsync_dir(out.parent)
            _record(out)
    except OSError as exc:
        raise WriteError(f"cannot write: {exc.strerror or exc}", str(out)) from None
    return [str(out / name) for name in names]


def _move_into(src: Path, out: Path, names: list[str], *, force: bool) -> None:
    """Rename the staged files into the existing folder ``out``, holding its lock."""
    try:
        fd = os.open(out, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except NotADirectoryError:
        raise WriteError("exists and is not a directory (created by another process meanwhile?)", str(out)) from None
    try:
        if os.fspath(out) not in _held:  # a staging folder of ours is locked already
            _lock(fd, wait=True)
        if not force:
            for name in (WEIGHTS_NAME, CONFIG_NAME):
                if name in names and os.path.lexists(out / name):
                    raise WriteError(
                        f"{name} already exists here (written by another process meanwhile); "
                        f"pass {_force()} to overwrite it",
                        str(out),
                    )
        for name in names:
            os.replace(src / name, out / name)
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2


def exchange(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Swap the two existing names ``a`` and ``b`` in one step (``renameat2(RENAME_EXCHANGE)``);
    False where the kernel or filesystem cannot (the caller then moves ``b`` aside first)."""
    func = _libc_renameat2()
    if not func:
        return False
    import ctypes

    at_fdcwd = -100
    if func(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), os.fspath(b))


def _manifest_last(folder: Path) -> list[str]:
    """The entries of a staging folder in the order they are moved: ``manifest.json`` last (a
    manifest in place means the entries it lists are too)."""
    names = sorted(p.name for p in folder.iterdir())
    if "manifest.json" in names:
        names.remove("manifest.json")
        names.append("manifest.json")
    return names


def replace_entries(
    staging: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    force: bool,
    prepare: Callable[[], None] | None = None,
) -> list[str]:
    """Move every entry (file or folder) of a complete, fsynced :func:`staging_folder` into
    ``out_dir`` under the same name: the export's tree of folders, where :func:`commit_staged`
    moves files only.

    A missing ``out_dir`` is the staging folder renamed onto it (one step). Into an existing
    folder the entries are moved back to back under an exclusive lock on it; an entry that
    exists there is refused without ``force`` (WriteError "already exists"), and with ``force``
    a folder is swapped for the new one in one step (``renameat2(RENAME_EXCHANGE)``, else moved
    aside first) and the old one removed, a file replaced by a rename. Entries of ``out_dir``
    with other names are left as they are. Signals wait until the moves are done.

    ``prepare`` (an export's manifest, merged with the one in ``out_dir``) writes into the staging
    folder what depends on ``out_dir``'s content: it runs first, and again under the lock when
    ``out_dir`` exists, so that two writers at once each merge what the other left.
    """
    src, out = Path(staging), Path(out_dir)
    if prepare is not None:
        prepare()
    names = _manifest_last(src)
    old: list[Path] = []
    try:
        with deferred():
            if src.parent != out and rename_noreplace(src, out):
                _release(src)
            else:
                fd = os.open(out, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
                try:
                    _lock(fd, wait=True)
                    if prepare is not None:
                        prepare()
                        names = _manifest_last(src)
                    taken = [n for n in names if os.path.lexists(out / n)]
                    if taken and not force:
                        raise WriteError(
                            f"{taken[0]} already exists here (written by another process meanwhile); "
                            f"pass {_force()} to overwrite it",
                            str(out),
                        )
                    for name in names:
                        new, dst = src / name, out / name
                        dst_dir = os.path.isdir(dst) and not os.path.islink(dst)
                        if new.is_dir() and dst_dir and exchange(new, dst):
                            old.append(new)  # the old folder now sits in the staging folder
                            continue
                        if os.path.lexists(dst) and (new.is_dir() or dst_dir):  # a rename cannot replace it
                            aside = src / f".old-{name}"
                            os.rename(dst, aside)
                            old.append(aside)
                        os.replace(new, dst)
                finally:
                    os.close(fd)
            fsync_dir(out)
            fsync_dir(out.parent)
            _record(out)
    except OSError as exc:
        raise WriteError(f"cannot write: {exc.strerror or exc}", str(out)) from None
    for path in old:  # the replaced folders (inside the staging folder, removed with it anyway)
        _rmtree(path, ignore_errors=True)
    return [str(out / name) for name in names]
