"""Serving hazards: an MPT adapter folder laid out where a prompt-tuning consumer would read it.

IBM TGIS's prefix store, vLLM 0.5.1-0.9.x prompt adapters and TensorRT-LLM's LLM API read a PEFT
folder's ``prompt_embeddings`` without checking ``peft_type``. An MPT folder put where they look
is served with the shared prompt P* for every task, silently. ``validate`` and ``inspect`` warn
(code ``serving-hazard``) when the layout says that is about to happen, and name the export that
fixes it (``mpt-tools export --to tgis`` or ``--to peft``).

The checks are cheap: directory listings (the adapter folder, its parent) and a few ``stat``
calls on siblings, never a file's contents.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

from .checkpoint import Checkpoint
from .config import PEFT_TYPE
from .errors import flag
from .findings import Finding

TGIS_FILES = ("decoder.pt", "encoder.pt")
"""The bare-tensor files of a TGIS prefix folder (and of a caikit prompt-tuning module)."""
MAX_ENTRIES = 4096
"""The most entries of the parent folder looked at (a prefix store is a folder of prefixes)."""
MAX_SIBLINGS = 64
"""The most sibling folders whose TGIS files are looked for."""
MAX_NESTED = 16
"""In a sibling without TGIS files, the most of its subfolders looked into (TGIS takes nested
prefix ids, ``sources/task_0``: what ``mpt-tools export --to tgis --out STORE/sources`` writes)."""


def _names(folder: Path, limit: int = MAX_ENTRIES) -> list[os.DirEntry[str]]:
    """The first ``limit`` entries of ``folder`` (none when it cannot be listed)."""
    out: list[os.DirEntry[str]] = []
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                out.append(entry)
                if len(out) >= limit:
                    break
    except OSError:
        return []
    return out


def _inside(path: Path, root: str) -> bool:
    try:
        return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root))
    except (OSError, ValueError):
        return False


def _has_tgis_files(folder: str) -> bool:
    return any(os.path.exists(os.path.join(folder, name)) for name in TGIS_FILES)


def _subfolders(folder: str) -> Iterator[os.DirEntry[str]]:
    """The first :data:`MAX_NESTED` subfolders of ``folder``, listed as they are asked for."""
    return itertools.islice((e for e in _names(Path(folder)) if _is_dir(e)), MAX_NESTED)


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _prefix_folders(parent: Path) -> tuple[list[str], list[str]]:
    """The first ``MAX_SIBLINGS + 1`` subfolders of ``parent`` (sorted), and those of them that
    hold TGIS files, or whose subfolders do (the first :data:`MAX_NESTED` of them: nested prefix
    ids)."""
    folders: list[str] = []
    prefixes: list[str] = []
    for entry in sorted(_names(parent), key=lambda e: e.name):
        if len(folders) > MAX_SIBLINGS:
            break
        if not _is_dir(entry):
            continue
        folders.append(entry.name)
        if _has_tgis_files(entry.path) or any(_has_tgis_files(e.path) for e in _subfolders(entry.path)):
            prefixes.append(entry.name)
    return folders, prefixes


def hazard_evidence(
    folder: str | os.PathLike[str],
    environ: dict[str, str] | None = None,
    *,
    cache: dict[str, tuple[list[str], list[str]]] | None = None,
) -> list[str]:
    """Why an MPT adapter ``folder`` sits where a prompt-tuning consumer reads prompts, one line
    per sign (empty when there is none): TGIS's ``decoder.pt``/``encoder.pt`` beside it, the folder
    inside ``$PREFIX_STORE_PATH``, or sibling folders that are TGIS prefixes (its parent looks like
    a prefix store). ``cache`` keeps each parent's listing for the next sibling (``audit`` checks
    thousands of adapters side by side)."""
    env = os.environ if environ is None else environ
    here = Path(os.path.abspath(folder))  # ".", "x/.." and "x" are one folder, with one parent
    evidence: list[str] = []
    beside = sorted(e.name for e in _names(here) if e.name in TGIS_FILES)
    if beside:
        evidence.append(f"{', '.join(beside)} beside its adapter_config.json (a TGIS prefix folder)")
    store = env.get("PREFIX_STORE_PATH")
    if store and _inside(here, store):
        evidence.append(f"it is inside PREFIX_STORE_PATH={store}, TGIS's prefix store")
    key = str(here.parent)
    listed = cache.get(key) if cache is not None else None
    if listed is None:
        listed = _prefix_folders(here.parent)
        if cache is not None:
            cache[key] = listed
    others = [name for name in listed[0] if name != here.name][:MAX_SIBLINGS]
    prefixes = [name for name in listed[1] if name in others]
    if prefixes:
        shown = ", ".join(prefixes[:3]) + (", ..." if len(prefixes) > 3 else "")
        evidence.append(
            f"its parent folder looks like a TGIS prefix store ({len(prefixes)} sibling folder(s) "
            f"with decoder.pt/encoder.pt, in them or in their subfolders: {shown})"
        )
    return evidence


def serving_hazards(ckpt: Checkpoint, *, cache: dict[str, tuple[list[str], list[str]]] | None = None) -> list[Finding]:
    """The ``serving-hazard`` warning for a local MPT adapter folder laid out where TGIS (or
    another prompt-tuning consumer) would read it, naming the export that fixes it; nothing for
    a Hub source, a bare tensor file or another peft_type. ``cache``: see :func:`hazard_evidence`."""
    if ckpt.hub is not None or not ckpt.config_from_file or not ckpt.config.path:
        return []
    if ckpt.config.raw.get("peft_type") != PEFT_TYPE:
        return []
    folder = Path(ckpt.config.path).parent
    evidence = hazard_evidence(folder, cache=cache)
    if not evidence:
        return []
    return [
        Finding.warning(
            "serving-hazard",
            "peft_type",
            "an MPT adapter where prompt-tuning consumers read prompts: TGIS, vLLM 0.5-0.9 and "
            "TensorRT-LLM's LLM API take its prompt_embeddings (the shared prompt P*) without "
            "checking peft_type, so every task would be served with P*, silently",
            expected="baked per-task prompts",
            found="; ".join(evidence),
            fix="bake the tasks with "
            + flag(
                f"`mpt-tools export {folder} --to tgis --out STORE/NAME` (or --to peft)",
                f'export_prompts("{folder}", "tgis", "STORE/NAME") (or "peft")',
            )
            + " and serve those; keep the MPT folder out of the store",
        )
    ]
