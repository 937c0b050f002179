"""``audit``: every adapter under local folders, in Hub repos and in the PEFT repos of a Hub user
or organisation, one row each, in parallel.

What is an adapter: a folder with an ``adapter_config.json`` (its weights are
``adapter_model.safetensors``, else ``adapter_model.bin``), at any depth, named subfolders
included; and a bare tensor file that holds MPT tensors (``sources.safetensors``). Folders whose
name starts with a dot are not entered (``.git``, caches, staging); staging leftovers of killed
mpt-tools runs are listed in the summary.

By default only configs and safetensors headers are read (on the Hub: one listing request per
repo, the config, and a ranged read of the header, so no weights are downloaded). ``deep`` adds
what needs the values: NaN/Inf and the float32 bounds (read in chunks of tasks), the sha256 of
local files and of P* (for duplicates), and ``.bin`` files. Other PEFT adapter types get a row
with their type and are left out of the MPT checks. A file that cannot be read, or a hostile
one, is a row with its error; the audit never stops early, and an interrupt returns what was
audited so far.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from .checks import check_source, config_findings, tensor_findings
from .config import CONFIG_NAME, MAX_CONFIG_BYTES, PEFT_TYPE, WEIGHTS_NAME, WEIGHTS_NAMES, parse_config, read_config
from .errors import ConfigError, MptToolsError, flag
from .files import file_sha256, is_stale_staging
from .findings import Finding, errors
from .formats import DTYPE_NAMES, TENSOR_SUFFIXES, normalise_keys, parse_header
from .hazards import serving_hazards
from .interrupts import deferred
from .options import HubOptions, checked_positive
from .peft_releases import loading_releases
from .progress import progress
from .version import __version__

if TYPE_CHECKING:  # types only
    from .checkpoint import Checkpoint
    from .config import MptConfig
    from .hub.listing import RepoListing
    from .results import AuditResult, AuditRow, DuplicateGroup

_LISTINGS: dict[str, tuple[list[str], list[str]]] = {}  # parent folder -> its subfolders (serving hazard)
HUB_CONCURRENCY = 8  # requests in flight towards the Hub at most, whatever --jobs says
ROW_SCHEMA = "mpt-tools/audit-row/1"
SUMMARY_SCHEMA = "mpt-tools/audit/1"


class _Job(NamedTuple):
    """One thing to audit: a local adapter ``folder`` or tensor ``file``, or a ``hub`` adapter
    (``path`` is its subfolder or file in the repo, "" for the root; ``listing`` the repo at a
    commit)."""

    kind: str
    where: str
    path: str
    listing: RepoListing | None = None
    explicit: bool = False  # named on the command line (a file with no MPT tensors is then an error)


class _Found:
    """What discovery found besides jobs: rows for roots that could not be listed, stale
    staging leftovers, and counts of files left out (by reason)."""

    def __init__(self) -> None:
        self.rows: list[AuditRow] = []
        self.stale: list[str] = []
        self.skipped: dict[str, int] = {}

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def _row(where: str, origin: str) -> AuditRow:
    """An empty row for ``where`` (``origin`` "local" or "hub")."""
    return {
        "schema": ROW_SCHEMA,
        "where": where,
        "origin": origin,
        "peft_type": None,
        "task_type": None,
        "num_tasks": None,
        "total_virtual_tokens": None,
        "num_ranks": None,
        "token_dim": None,
        "dtype": None,
        "bytes": None,
        "sha256": None,
        "prompt_sha256": None,
        "valid": None,
        "findings": [],
        "error": None,
        "peft_oldest": None,
        "peft_newest": None,
        "reload_trap": False,
        "serving_hazard": False,
        "base_model": None,
        "notes": [],
    }


def _failed(row: AuditRow, exc: BaseException) -> AuditRow:
    """``row`` as the row of an adapter that could not be read: the error in one line."""
    if isinstance(exc, MptToolsError):  # the path only when it is not the row's own; a file in it by its name
        where = row["where"]
        if exc.path in (None, where):
            text = exc.message
        elif exc.path is not None and exc.path.startswith(where.rstrip("/") + "/"):
            text = f"{exc.path[len(where.rstrip('/')) + 1 :]}: {exc.message}"
        else:
            text = str(exc)
    else:  # a bug, or a resource the OS refused: still one row, never a stopped audit
        text = f"internal error ({type(exc).__name__}: {exc})"
    row["error"] = " ".join(text.split())
    row["valid"] = False
    return row


# --- discovery -------------------------------------------------------------------------------------


def _walk(root: Path, deep: bool, found: _Found) -> Iterator[_Job]:
    """The adapters under the folder ``root`` (not following symlinked folders)."""

    def onerror(exc: OSError) -> None:
        where = str(exc.filename) if exc.filename else str(root)
        row = _failed(_row(where, "local"), MptToolsError(f"cannot list this folder: {exc.strerror or exc}", where))
        found.rows.append(row)

    for folder, dirnames, filenames in os.walk(root, onerror=onerror):
        here = Path(folder)
        for name in [*dirnames, *filenames]:
            if name.startswith(".") and ".mpt-tools-" in name and is_stale_staging(here / name):
                found.stale.append(str(here / name))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        adapter = CONFIG_NAME in filenames
        if adapter:
            yield _Job("folder", str(here), str(here))
        for name in sorted(filenames):
            if name.startswith(".") or Path(name).suffix.lower() not in TENSOR_SUFFIXES:
                continue
            if adapter and name in WEIGHTS_NAMES:
                continue  # the adapter's own weights
            if name.lower().endswith(".safetensors") or deep:
                yield _Job("file", str(here / name), str(here / name))
            else:
                found.skip(f".bin/.pt/.pth files not read ({_deep()} reads them)")


def _hub_jobs(listing: RepoListing, subfolder: str | None) -> Iterator[_Job]:
    """The adapters of a listed repo: every folder with an adapter_config.json (under
    ``subfolder`` when given), and bare safetensors files outside adapter folders."""
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    folders = {p.rpartition("/")[0] for p in listing.files if p.rpartition("/")[2] == CONFIG_NAME}
    base = f"hf://{listing.repo_id}@{listing.commit[:12]}"
    for folder in sorted(folders):
        if (folder + "/").startswith(prefix) or folder == prefix.rstrip("/"):
            yield _Job("hub", f"{base}/{folder}" if folder else base, folder, listing)
    for path in sorted(listing.files):
        parent, _, name = path.rpartition("/")
        own_weights = parent in folders and name == WEIGHTS_NAME
        if name.endswith(".safetensors") and not own_weights and path.startswith(prefix):
            yield _Job("hub", f"{base}/{path}", path, listing)


def _text(value: object, what: str) -> str:
    """A target or author as text: a str, or the path of an ``os.PathLike``; a ConfigError otherwise."""
    if isinstance(value, (str, os.PathLike)):
        text = os.fspath(value)
        if isinstance(text, str):
            return text
    raise ConfigError(f"{what}: expected paths or repo ids as text, got {type(value).__name__} {value!r:.60}")


def _is_hub_spec(text: str) -> bool:
    """Whether a PATH_OR_REPO argument names a Hub repo (it is no local path, and reads as one)."""
    from .hub.download import local_path_reason

    return not os.path.lexists(text) and (text.startswith("hf://") or local_path_reason(text) is None)


# --- one row -----------------------------------------------------------------------------------------


def _fill(row: AuditRow, ckpt: Checkpoint, findings: list[Finding]) -> None:
    """The sizes, dtype and verdict of an MPT checkpoint into ``row``."""
    shapes = ckpt.shapes
    pe, cols = shapes.get("prompt_embeddings"), shapes.get("prefix_task_cols")
    if pe is not None and len(pe) == 2:
        row["total_virtual_tokens"], row["token_dim"] = pe
    if cols is not None and len(cols) == 3:
        row["num_tasks"], row["num_ranks"] = cols[0], cols[2]
    info = ckpt.info("prompt_embeddings")
    if info is not None:
        row["dtype"] = DTYPE_NAMES.get(info.dtype, info.dtype)
    _verdict(row, findings)


def _codes(findings: list[Finding]) -> list[str]:
    """The codes of the errors and warnings (info notes are left out), sorted, once each."""
    return sorted({f.code for f in findings if f.level != "info"})


def _verdict(row: AuditRow, findings: list[Finding]) -> None:
    """The finding codes, validity and first error of ``row``."""
    row["findings"] = _codes(findings)
    bad = errors(findings)
    row["valid"] = not bad
    row["reload_trap"] = any(f.code == "reload-trap" for f in findings)
    if bad and row["error"] is None:
        row["error"] = f"{len(bad)} error(s); first: {bad[0].field}: {bad[0].message}"


def _deep() -> str:
    """How a note names reading every weights file: ``--deep`` or ``deep=True``."""
    return flag("--deep", "deep=True")


def _config_only(row: AuditRow, cfg: MptConfig) -> AuditRow:
    """The row of an MPT adapter whose ``.bin`` weights are not read (no --deep): the config's
    findings; valid unknown (None) unless the config alone has an error."""
    row["notes"].append(f"weights not read (.bin: {_deep()} reads them)")
    findings = config_findings(cfg, True)
    _verdict(row, findings)
    if not errors(findings):
        row["valid"] = None
    return row


def _config_fields(row: AuditRow, raw: dict[str, Any]) -> None:
    """What the config says: types, base model, the PEFT releases that load it."""
    row["peft_type"] = raw.get("peft_type") if isinstance(raw.get("peft_type"), str) else None
    row["task_type"] = raw.get("task_type") if isinstance(raw.get("task_type"), str) else None
    base = raw.get("base_model_name_or_path")
    row["base_model"] = base if isinstance(base, str) else None
    loaders = loading_releases(raw)
    if loaders:
        row["peft_oldest"], row["peft_newest"] = loaders[0], loaders[-1]


def _prompt_sha(ckpt: Checkpoint) -> str | None:
    if ckpt.info("prompt_embeddings") is None:
        return None
    return hashlib.sha256(ckpt.read("prompt_embeddings").array.tobytes()).hexdigest()


def _audit_local(job: _Job, deep: bool) -> AuditRow | None:
    """The row of a local adapter folder or tensor file (None: a tensor file with no MPT tensors)."""
    from .checkpoint import load_source

    row = _row(job.where, "local")
    try:
        if job.kind == "file" and os.path.isfile(job.path):
            row["bytes"] = os.stat(job.path).st_size
        if job.kind == "folder":
            folder = Path(job.path)
            cfg = read_config(folder / CONFIG_NAME)
            _config_fields(row, cfg.raw)
            weights = next((folder / n for n in WEIGHTS_NAMES if os.path.lexists(folder / n)), None)
            if weights is not None:
                row["bytes"] = os.stat(weights).st_size if os.path.exists(weights) else None
            if row["peft_type"] != PEFT_TYPE:
                row["notes"].append("not an MPT adapter: listed by type, not checked")
                if deep and weights is not None:
                    row["sha256"] = file_sha256(weights)
                return row
            row["serving_hazard"] = weights is not None
            if weights is not None and weights.suffix == ".bin" and not deep:
                return _config_only(row, cfg)
        ckpt = load_source(job.path)
        if job.kind == "file":
            if not ckpt.keymap and not job.explicit:
                return None  # found in a tree, not an adapter: a model's weights, optimizer state...
            if not ckpt.keymap:  # named on the command line: say what it is
                raise MptToolsError("holds no MPT tensors (prompt_embeddings, prefix_task_cols/rows)", job.where)
            row["peft_type"] = PEFT_TYPE
            row["bytes"] = ckpt.file.size
            row["notes"].append("bare tensor file: config inferred from the tensor shapes")
        findings = check_source(ckpt, values=deep) + serving_hazards(ckpt, cache=_LISTINGS)  # listings only
        _fill(row, ckpt, findings)
        if deep:
            row["sha256"] = ckpt.sha256()
            row["prompt_sha256"] = _prompt_sha(ckpt)
    except Exception as exc:
        return _failed(row, exc)
    return row


def _audit_hub(job: _Job, deep: bool, hub: HubOptions, gate: threading.Semaphore) -> AuditRow | None:
    """The row of a Hub adapter (a folder with a config, or a bare safetensors file)."""
    from .checkpoint import Checkpoint
    from .hub import listing as hl

    listing = job.listing
    assert listing is not None
    row = _row(job.where, "hub")
    repo, commit = listing.repo_id, listing.commit
    try:
        is_file = job.path.endswith(".safetensors") and f"{job.path}/{CONFIG_NAME}" not in listing.files
        prefix = "" if is_file or not job.path else job.path + "/"
        names = [prefix + n for n in WEIGHTS_NAMES if prefix + n in listing.files]
        weights = job.path if is_file else next(iter(names), None)
        if weights is not None:
            row["bytes"] = listing.files[weights].size
            row["sha256"] = listing.files[weights].sha256
        raw: dict[str, Any] = {}
        if not is_file:
            with gate:
                cfg_bytes = hl.read_small(repo, commit, prefix + CONFIG_NAME, hub, MAX_CONFIG_BYTES)
            cfg = parse_config(cfg_bytes, f"{job.where}/{CONFIG_NAME}")
            raw = cfg.raw
            _config_fields(row, raw)
            if row["peft_type"] != PEFT_TYPE:
                row["notes"].append("not an MPT adapter: listed by type, not checked")
                return row
            row["serving_hazard"] = weights is not None
            if weights is None:
                raise MptToolsError("no adapter_model.safetensors or adapter_model.bin in this folder", job.where)
        assert weights is not None
        if deep or weights.endswith(".bin"):
            if not deep:
                return _config_only(row, cfg)
            from .checkpoint import load_source
            from .options import SourceSpec

            location = f"hf://{repo}@{commit}"
            with gate:
                if is_file:
                    ckpt = load_source(hl.download_file(repo, commit, job.path, hub))
                else:
                    ckpt = load_source(SourceSpec(location, subfolder=job.path or None, hub=hub))
        else:
            with gate:
                blob, size = hl.read_header(repo, commit, weights, hub)
            where = f"hf://{repo}@{commit[:12]}/{weights}"
            tfile = parse_header(where, blob, size, check_memory=False)
            keymap, notes, ignored = normalise_keys(tfile.infos, where)
            if is_file:
                from .config import bare_config

                shapes = {k: tfile.infos[v].shape for k, v in keymap.items()}
                cfg = bare_config(shapes)
            ckpt = Checkpoint(job.where, tfile, cfg, keymap, notes, ignored, config_from_file=not is_file)
        if is_file:
            if not ckpt.keymap:
                return None
            row["peft_type"] = PEFT_TYPE
            row["notes"].append("bare tensor file: config inferred from the tensor shapes")
        findings = check_source(ckpt) if deep else [*config_findings(ckpt.config, not is_file), *tensor_findings(ckpt)]
        _fill(row, ckpt, findings)
        if deep:
            row["prompt_sha256"] = _prompt_sha(ckpt)
    except Exception as exc:
        return _failed(row, exc)
    return row


# --- the whole audit -----------------------------------------------------------------------------------


class _Tally:
    """The summary, taken in row by row: counts, and the sha256 keys for duplicate groups. The
    rows themselves are kept only when ``keep`` (a table needs them all; JSON Lines does not, so
    its memory stays flat however many adapters there are)."""

    def __init__(self, keep: bool) -> None:
        self.keep = keep
        self.rows: list[AuditRow] = []
        self.adapters = self.mpt = self.invalid = self.unreadable = 0
        self.others: dict[str, int] = {}
        self.by: dict[str, dict[str, list[str]]] = {"weights": {}, "shared_prompt": {}}

    def add(self, row: AuditRow) -> None:
        """Count one row (and keep it when asked)."""
        if self.keep:
            self.rows.append(row)
        self.adapters += 1
        kind = row["peft_type"]
        if kind == PEFT_TYPE:
            self.mpt += 1
        elif kind is not None:
            self.others[kind] = self.others.get(kind, 0) + 1
        if row["valid"] is False:
            if row["error"] is not None and not row["findings"]:
                self.unreadable += 1
            else:
                self.invalid += 1
        for group, value in (("weights", row["sha256"]), ("shared_prompt", row["prompt_sha256"])):
            if value:
                self.by[group].setdefault(value, []).append(row["where"])

    def duplicates(self) -> list[DuplicateGroup]:
        """Groups of adapters with identical weights (same sha256), then identical P* (same bytes)."""
        return [
            {"kind": kind, "sha256": value, "adapters": sorted(wheres)}
            for kind, by in self.by.items()
            for value, wheres in sorted(by.items())
            if len(wheres) > 1
        ]


def _discover(
    targets: Iterable[str], authors: Iterable[str], deep: bool, hub: HubOptions, jobs: int, found: _Found
) -> list[_Job]:
    """Every job: local folders walked, Hub repos (given, and every PEFT repo of each author)
    listed in parallel."""
    from .hub.download import parse_spec
    from .hub.listing import author_repos, list_repo

    out: list[_Job] = []
    repos: list[tuple[str, str | None, str | None]] = []  # (repo id, revision, subfolder)
    bare: dict[tuple[str, str | None, str | None], str] = {}  # a repo given as org/name: the text
    for text in targets:
        if not _is_hub_spec(text):
            path = Path(text)
            if os.path.isdir(path):  # (False, not an OSError, for a name too long)
                before = len(out) + len(found.rows)
                out.extend(_walk(path, deep, found))
                if len(out) + len(found.rows) == before:
                    why = "no adapter here (no adapter_config.json, no safetensors file)"
                    found.rows.append(_failed(_row(text, "local"), MptToolsError(why, text)))
            else:
                out.append(_Job("file", text, text, explicit=True))
            continue
        try:
            spec = parse_spec(text)
        except MptToolsError as exc:
            found.rows.append(_failed(_row(text, "hub"), exc))
            continue
        repos.append((spec.repo_id, spec.revision, spec.subfolder))
        if not text.startswith("hf://"):
            bare[repos[-1]] = text
    for author in authors:
        label = flag(f"--author {author}", f"author {author}")
        try:
            owned = author_repos(author, hub)
        except MptToolsError as exc:
            found.rows.append(_failed(_row(label, "hub"), exc))
            continue
        if not owned:  # a typo, or an author with no adapters: either way nothing was audited
            why = "no PEFT model repos of this user or organisation on the Hub (is the name right?)"
            found.rows.append(_failed(_row(label, "hub"), MptToolsError(why, author)))
        repos.extend((repo_id, None, None) for repo_id in owned)

    def listed(item: tuple[str, str | None, str | None]) -> list[_Job]:
        repo_id, revision, subfolder = item
        listing = list_repo(repo_id, hub._replace(revision=revision or hub.revision))
        jobs_here = list(_hub_jobs(listing, subfolder))
        if not jobs_here:
            where = f"hf://{repo_id}@{listing.commit[:12]}" + (f"/{subfolder}" if subfolder else "")
            raise MptToolsError("no adapter (no adapter_config.json, no safetensors file) in this repo", where)
        return jobs_here

    pool = ThreadPoolExecutor(max_workers=max(1, min(jobs, HUB_CONCURRENCY)))
    try:  # not `with`: its exit waits for a listing the Hub never answers, so no signal could stop it
        for item, future in [(item, pool.submit(listed, item)) for item in dict.fromkeys(repos)]:
            try:
                out.extend(future.result())
            except Exception as exc:
                repo_id, revision, subfolder = item
                where = f"hf://{repo_id}" + (f"@{revision}" if revision else "")
                where += f"/{subfolder}" if subfolder else ""
                if isinstance(exc, MptToolsError) and exc.path == repo_id:  # the row names it already
                    exc.path = where
                if isinstance(exc, MptToolsError) and item in bare and "not found" in exc.message:  # meant locally?
                    exc.message += f" (read as a Hub repo id: there is no local file or folder {bare[item]!r} either)"
                found.rows.append(_failed(_row(where, "hub"), exc))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return _once(out)


def _once(jobs: list[_Job]) -> list[_Job]:
    """Each adapter once, as first named: ``runs runs/a``, ``org/x hf://org/x@main`` or two links
    to one folder name one adapter (its own duplicate otherwise)."""
    seen: set[tuple[str, ...]] = set()
    out = []
    for job in jobs:
        if job.listing is not None:
            key: tuple[str, ...] = ("hub", job.listing.repo_id, job.listing.commit, job.path)
        else:
            key = ("local", os.path.realpath(job.path))
        if key not in seen:
            seen.add(key)
            out.append(job)
    return out


def audit_adapters(
    targets: Iterable[str] = (),
    *,
    authors: Iterable[str] = (),
    deep: bool = False,
    jobs: int | None = None,
    hub: HubOptions | None = None,
    on_row: Callable[[AuditRow], None] | None = None,
    keep_rows: bool = True,
) -> AuditResult:
    """Audit every adapter under ``targets`` (local folders and files, Hub repo ids or
    ``hf://`` URLs) and in the PEFT repos of each of ``authors``; one row per adapter.

    ``jobs`` rows are audited at once (default: the number of CPUs; Hub requests are capped at
    :data:`HUB_CONCURRENCY`). ``on_row`` is called with each row as soon as it is done (in the
    calling thread). ``deep`` adds the value checks, sha256 of local weights and of P*, and
    ``.bin`` files. An interrupt (Ctrl-C, SIGTERM) stops the audit and returns what was done,
    with ``interrupted`` naming the signal. The result's ``rows`` are sorted by ``where``;
    ``keep_rows`` False leaves them out (``on_row`` had them), so memory does not grow with the
    number of adapters.
    """
    hub = hub or HubOptions()
    targets = [targets] if isinstance(targets, (str, os.PathLike)) else targets  # one, not its characters
    authors = [authors] if isinstance(authors, str) else authors
    targets = [_text(t, "targets") for t in targets]  # a Path is a path, as its text
    authors = [_text(a, "authors") for a in authors]
    jobs = (os.cpu_count() or 1) if jobs is None else checked_positive(jobs, "jobs")
    _LISTINGS.clear()  # folder listings are kept for one audit only
    found = _Found()
    result: AuditResult = {
        "schema": SUMMARY_SCHEMA,
        "ok": True,
        "adapters": 0,
        "mpt": 0,
        "other_types": {},
        "invalid": 0,
        "unreadable": 0,
        "duplicates": [],
        "stale_staging": [],
        "skipped": {},
        "deep": deep,
        "interrupted": None,
        "version": __version__,
        "rows": [],
    }
    tally = _Tally(keep_rows)

    def take(row: AuditRow | None) -> None:
        if row is None:
            return
        with deferred():  # an interrupt never falls between counting a row and handing it on
            tally.add(row)
            if on_row is not None:
                on_row(row)

    gate = threading.Semaphore(HUB_CONCURRENCY)
    try:
        todo = _discover(targets, authors, deep, hub, jobs, found)
        for row in found.rows:
            take(row)
        with progress(len(todo), "audit", unit="adapter") as advance:
            pool = ThreadPoolExecutor(max_workers=jobs)
            try:
                pending: set[Future[AuditRow | None]] = set()
                queue = iter(todo)
                for job in queue:  # a bounded window: 10,000 adapters are never 10,000 futures
                    pending.add(pool.submit(_audit_one, job, deep, hub, gate))
                    if len(pending) >= 4 * jobs:
                        done, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for future in done:
                            take(future.result())
                            advance(1)
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        take(future.result())
                        advance(1)
            finally:
                pool.shutdown(wait=False, cancel_futures=True)
    except KeyboardInterrupt as exc:
        from .interrupts import Interrupted

        result["interrupted"] = exc.name if isinstance(exc, Interrupted) else "SIGINT"
    return _summarise(result, tally, found)


def _audit_one(job: _Job, deep: bool, hub: HubOptions, gate: threading.Semaphore) -> AuditRow | None:
    """One job's row (never raises)."""
    if job.kind == "hub":
        return _audit_hub(job, deep, hub, gate)
    return _audit_local(job, deep)


def _summarise(result: AuditResult, tally: _Tally, found: _Found) -> AuditResult:
    """``result`` with the summary of ``tally`` and its rows, sorted by where."""
    result["rows"] = sorted(tally.rows, key=lambda r: r["where"])
    result["adapters"] = tally.adapters
    result["mpt"] = tally.mpt
    result["other_types"] = dict(sorted(tally.others.items()))
    result["unreadable"] = tally.unreadable
    result["invalid"] = tally.invalid
    result["duplicates"] = tally.duplicates()
    result["stale_staging"] = sorted(found.stale)
    result["skipped"] = dict(sorted(found.skipped.items()))
    result["ok"] = tally.invalid + tally.unreadable == 0 and result["interrupted"] is None
    return result
