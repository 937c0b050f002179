"""Resolve a SOURCE (a tensor file, a PEFT adapter directory, or a Hub repo) into a Checkpoint:
its config plus lazy access to the three canonical tensors."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from .config import CONFIG_NAME, WEIGHTS_NAMES, MptConfig, bare_config, read_config
from .errors import MptToolsError, SourceError, flag
from .files import file_sha256
from .formats import DTYPE_NAMES, TENSOR_SUFFIXES, Raw, TensorFile, TensorInfo, normalise_keys, open_tensor_file
from .options import HubOptions, SourceSpec, checked_path
from .paths import not_regular_message

if TYPE_CHECKING:  # types only: importing them costs start-up time
    from .results import HubInfo


@dataclass
class Checkpoint:
    """An MPT source: where it is, its config and its tensors under canonical names.

    Tensors are read lazily from ``file``: ``read`` reads a whole tensor, ``read_rows`` a range
    of tasks. ``notes`` says what mpt-tools normalised or assumed on the way. ``hub`` describes the
    Hub download it came from; ``hub_options`` are the Hub options it was loaded with, which serve
    whatever else the same operation fetches (a base model's config, a recorded source).
    """

    location: str
    file: TensorFile
    config: MptConfig
    keymap: dict[str, str]
    notes: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    config_from_file: bool = False
    hub: HubInfo | None = None
    hub_options: HubOptions = field(default_factory=HubOptions)
    _sha256: str | None = field(default=None, repr=False)

    @property
    def weights_path(self) -> str:
        """Path of the weights file on disk."""
        return self.file.path

    @property
    def format(self) -> str:
        """ "safetensors" or "pickle"."""
        return self.file.format

    def info(self, name: str) -> TensorInfo | None:
        """The file entry of a canonical tensor, or None when it is missing."""
        original = self.keymap.get(name)
        return self.file.infos[original] if original is not None else None

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the canonical tensors present."""
        return {k: self.file.infos[v].shape for k, v in self.keymap.items()}

    def read(self, name: str) -> Raw:
        """Read a whole canonical tensor."""
        return self.file.read(self.keymap[name])

    @property
    def source_paths(self) -> list[str]:
        """The files this checkpoint was read from (weights, and config when there is one): what
        no command may write over or beside (see :func:`mpt_tools.writer.source_folders`)."""
        return [self.weights_path] + ([self.config.path] if self.config.path else [])

    @property
    def where(self) -> str:
        """How the source is named: its Hub URL at the resolved commit, or the location as given."""
        return self.hub["url"] if self.hub else self.location

    @property
    def weights_name(self) -> str:
        """The weights file as a path from :attr:`where`: its name, or ``sub/adapter_model.safetensors``
        for a local folder's named adapter (``--subfolder sub``), so the two lead back to the file."""
        if self.hub is None and os.path.isdir(self.location):
            return os.path.relpath(self.weights_path, self.location)
        return os.path.basename(self.weights_path)

    def provenance(self) -> dict[str, Any]:
        """Where an output came from, for its ``mpt_tools.*`` metadata: the source (its Hub URL at
        the resolved commit, or the location as given), weights file name, sha256, dtype, revision."""
        info = self.info("prompt_embeddings")
        return {
            "source": self.where,
            "source_file": self.weights_name,
            "source_sha256": self.sha256(),
            "source_dtype": DTYPE_NAMES.get(info.dtype, info.dtype) if info else None,
            "source_revision": self.hub.get("commit") if self.hub else None,
        }

    def map(self, name: str) -> Raw:
        """A canonical tensor, memory-mapped (see :meth:`mpt_tools.formats.TensorFile.map`)."""
        return self.file.map(self.keymap[name])

    def read_rows(self, name: str, start: int, stop: int, *, out: Any = None) -> Raw:
        """Read rows ``start:stop`` (tasks, for the factors) of a canonical tensor (into ``out``,
        a writable buffer, when given: see :meth:`mpt_tools.formats.TensorFile.read_rows`)."""
        return self.file.read_rows(self.keymap[name], start, stop, out=out)

    @contextmanager
    def row_reader(self, *, mapped: bool = False) -> Iterator[Callable[..., Raw]]:
        """:meth:`read_rows` for many reads in a row, on one open file (see
        :meth:`mpt_tools.formats.TensorFile.row_reader`): ``read(name, start, stop, out=None,
        columns=None)``; ``mapped``: views of a leased mapping where one can be had."""
        with self.file.row_reader(mapped=mapped) as read:

            def by_name(name: str, start: int, stop: int, out: Any = None, columns: Any = None) -> Raw:
                return read(self.keymap[name], start, stop, out=out, columns=columns)

            by_name.mapped = read.mapped  # type: ignore[attr-defined]
            yield by_name

    def sha256(self) -> str:
        """SHA-256 of the weights file, streamed: of the very file whose tensors were read
        (FormatError "changed while reading" when the path now holds another one)."""
        if self._sha256 is None:
            self._sha256 = file_sha256(self.file.path, self.file.identity)
        return self._sha256


def _missing(text: str) -> SourceError:
    """The error for a SOURCE that is neither an existing path nor a Hub repo id (see
    :func:`mpt_tools.hub.download.local_path_reason`), with the Hub spelling as a hint where
    the text could have been meant as one."""
    from .hub.download import local_path_reason

    reason = local_path_reason(text) or "it is not a Hub repo id"
    parts = text.split("/")
    hint = ""
    if len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~")):
        hint = f"; for the Hub repo of that name write hf://{text}"
    return SourceError(f"no such file or folder (read as a local path: {reason}{hint})", text)


def _not_file_or_folder(path: Path) -> str:
    """Why a SOURCE path that exists is neither a regular file nor a folder (a FIFO, a device...)."""
    try:
        return not_regular_message(path, os.stat(path).st_mode).replace("regular file", "regular file or folder")
    except OSError as exc:
        return f"cannot read it: {exc.strerror or exc}"


def _weights_in_dir(folder: Path) -> Path:
    for name in WEIGHTS_NAMES:
        candidate = folder / name
        if os.path.lexists(candidate):
            return candidate
    subs = sorted(p.name for p in folder.iterdir() if p.is_dir() and (p / CONFIG_NAME).is_file())
    add = flag("--subfolder NAME", "SourceSpec(..., subfolder=NAME)")
    hint = (
        f"; it has named adapters in subfolders ({', '.join(subs)}): add {add}, or name one as a folder"
        f" ({os.path.join(folder, subs[0])})"
        if subs
        else ""
    )
    raise SourceError(f"no adapter_model.safetensors or adapter_model.bin in this directory{hint}", str(folder))


def download_missing(text: str, subfolder: str | None, hub: HubOptions) -> tuple[Path, HubInfo]:
    """A SOURCE that is not a local path, from the Hub: its snapshot folder and Hub info (see
    :func:`mpt_tools.hub.download.download_source`). SourceError, without a Hub call, where the text
    reads as a local path (:func:`mpt_tools.hub.download.local_path_reason`); a Hub error on a bare
    ``org/name`` says that no local path of that name exists either."""
    from .hub.download import download_source, local_path_reason

    if local_path_reason(text) is not None:
        raise _missing(text)  # no Hub call: offline it would say "not in the cache", without network wait
    try:
        return download_source(text, subfolder=subfolder, hub=hub)
    except MptToolsError as exc:
        if not text.startswith("hf://") and _not_there(exc):  # `runs/sources` may have been meant as a local path
            exc.message += f" (read as a Hub repo id: there is no local file or folder {text!r} either)"
        raise


def _not_there(exc: MptToolsError) -> bool:
    """Whether a Hub error says the repo (or revision, or cached copy) is not there: only then may
    the text have been meant as a local path (a 503 or a gated repo answered as a repo)."""
    return "not found" in exc.message or "not in the local cache" in exc.message


Source = Union["Checkpoint", SourceSpec, str, os.PathLike[str]]
"""What every library function that reads a source takes: a loaded checkpoint, a spec or a path."""


def load_source(source: Source) -> Checkpoint:
    """Resolve a source into a :class:`Checkpoint` without reading tensor data.

    ``source`` is a :class:`~mpt_tools.options.SourceSpec` or its location alone: a
    ``.safetensors`` file, a ``.bin``/``.pt``/``.pth`` file (weights-only loading), a
    PEFT adapter directory (``subfolder`` for a named adapter), or a Hub repo id / ``hf://`` URL.
    The spec's ``overrides`` give or replace config fields. An existing local path
    wins over a repo id spelled the same way. A :class:`Checkpoint` is returned as it is, so every
    library function takes either.
    """
    if isinstance(source, Checkpoint):
        return source
    spec = SourceSpec.of(source)
    text, subfolder = checked_path(spec.location, "the source"), spec.subfolder
    if subfolder is not None and (os.path.isabs(subfolder) or ".." in Path(subfolder).parts):
        raise SourceError(f"subfolder {subfolder!r} must name a folder inside the adapter (not a path out of it)", text)
    path = Path(text)
    hub_info: HubInfo | None = None
    if not os.path.lexists(path):
        path, hub_info = download_missing(text, subfolder, spec.hub)
        subfolder = None
    try:
        return _open(spec, text, path, subfolder, hub_info)
    except MptToolsError as exc:  # a downloaded file: named as on the Hub, not by its cache path
        if hub_info is not None and exc.path and exc.path.startswith(str(path)):
            exc.path = hub_info["url"] + exc.path[len(str(path)) :]
        raise


def _open(spec: SourceSpec, text: str, path: Path, subfolder: str | None, hub_info: HubInfo | None) -> Checkpoint:
    """:func:`load_source` once the source is a local path (``path``, the Hub snapshot folder
    for a download)."""
    overrides = spec.overrides.as_dict()
    if os.path.islink(path) and not os.path.exists(path):
        raise SourceError("broken symlink or symlink loop", text)
    config_path: Path | None = None
    if path.is_dir():
        folder = path / subfolder if subfolder else path
        if subfolder and not folder.is_dir():
            raise SourceError(f"no subfolder {subfolder!r} here", str(path))
        weights = _weights_in_dir(folder)
        if (folder / CONFIG_NAME).exists() or os.path.lexists(folder / CONFIG_NAME):
            config_path = folder / CONFIG_NAME
    elif path.is_file():
        if subfolder:
            raise SourceError(flag("--subfolder", "subfolder") + " applies to an adapter directory, not a file", text)
        weights = path
        sibling = path.parent / CONFIG_NAME
        if path.name in WEIGHTS_NAMES and os.path.exists(sibling):  # not a regular file: read_config says
            config_path = sibling
    else:
        raise SourceError(_not_file_or_folder(path), text)
    if os.path.islink(weights) and not os.path.exists(weights):
        raise SourceError("broken symlink or symlink loop", str(weights))
    if weights.suffix.lower() not in TENSOR_SUFFIXES and path.is_dir():
        raise SourceError("unexpected weights file name", str(weights))
    tfile = open_tensor_file(weights)
    keymap, notes, ignored = normalise_keys(tfile.infos, tfile.path)
    shapes = {k: tfile.infos[v].shape for k, v in keymap.items()}
    if config_path is not None:
        config = read_config(config_path).with_overrides(overrides)
        from_file = True
    else:
        config = bare_config(shapes, overrides)
        from_file = False
        notes.append("no adapter_config.json: config inferred from the tensor shapes")
    ckpt = Checkpoint(
        location=text,
        file=tfile,
        config=config,
        keymap=keymap,
        notes=notes,
        ignored=ignored,
        config_from_file=from_file,
        hub=hub_info,
        hub_options=spec.hub,
    )
    if len(keymap) == 0 and len(tfile.infos) > 0:
        ckpt.notes.append("none of the keys is an MPT tensor: " + ", ".join(list(tfile.infos)[:5]))
    return ckpt
