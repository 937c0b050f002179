"""Download a Hub source: parse its spec, fetch ``adapter_config.json`` and one weights file (PEFT's
order: ``adapter_model.safetensors``, else ``adapter_model.bin``) from one commit into the Hugging
Face cache, and check the weights' sha256 against the Hub's LFS sha256 (or git blob id).

Also the pieces the other Hub modules share: offline detection, token scrubbing, quiet
``huggingface_hub`` calls, and the mapping of Hub exceptions to one-line :class:`HubError` messages.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import os
import re
import shutil
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from ..config import CONFIG_NAME, MAX_CONFIG_BYTES, WEIGHTS_NAMES
from ..errors import ConfigError, HubError, debug, flag
from ..files import file_sha256, hash_file
from ..formats import PROMPT_SUFFIXES
from ..options import HubOptions
from ..results import HubInfo
from ..version import __version__

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_SHA1_RE = re.compile(r"[0-9a-f]{40}")


def _hash_kind(text: str) -> str | None:
    """ "sha256" or "git-sha1" when ``text`` is such a hash (an LFS file's or a git blob's id: what
    the Hub's ETag and a cached blob's name are), else None."""
    return "sha256" if _SHA256_RE.fullmatch(text) else "git-sha1" if _SHA1_RE.fullmatch(text) else None


_HUB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?")
_TRUE = ("1", "on", "yes", "true")


# --------------------------------------------------------------------------- specs and settings


@dataclass(frozen=True)
class HubSpec:
    """A parsed Hub source: repo id, requested revision (None: the default branch) and subfolder."""

    repo_id: str
    revision: str | None = None
    subfolder: str | None = None

    def url(self, revision: str | None = None, filename: str | None = None) -> str:
        """``hf://repo@revision[/subfolder][/filename]`` (the revision as given, else ``main``)."""
        text = f"hf://{self.repo_id}@{revision or self.revision or 'main'}"
        if self.subfolder:
            text += f"/{self.subfolder}"
        if filename:
            text += f"/{filename}"
        return text


_PATH_SUFFIXES = (*PROMPT_SUFFIXES, ".json")


def reads_as_model_id(text: str) -> bool:
    """Whether a base model that is no local path names a Hub model: ``hf://...``, or a repo id
    of one or two parts (``gpt2``, ``org/name``) with an optional ``@revision``; not a path
    (``/``, ``.``, ``~``, a backslash)."""
    if text.startswith("hf://"):
        return True
    if text.startswith(("/", ".", "~")) or "\\" in text:
        return False
    return _HUB_ID_RE.fullmatch(text.partition("@")[0]) is not None


def model_repo(text: str, revision: str | None = None) -> HubSpec:
    """A base model named on the Hub: ``org/name``, ``org/name@rev`` or ``hf://org/name[@rev]``
    (a model's files are at its repo's root: a subfolder is a ConfigError); ``revision`` (the
    command's) where the text names none."""
    spec = parse_spec(text, revision=revision)
    if spec.subfolder:
        raise ConfigError(f"a base model is a repo's root, not its subfolder {spec.subfolder!r}", text)
    return spec


def local_path_reason(text: str) -> str | None:
    """Why a SOURCE that does not exist reads as a local path rather than a Hub repo id, or None
    when it reads as a repo id (the Hub is then asked). The rule, in order:

    - ``hf://...`` is always the Hub;
    - it starts with ``/``, ``./``, ``../``, ``~`` or ``.``, or holds a backslash or a drive
      (``C:``): a path;
    - a part ends in a tensor-file or ``.json`` suffix: a path (a file name);
    - it has more or fewer parts than ``org/name``: a path (a Hub subfolder is written
      ``hf://org/name/SUB``);
    - ``org/name`` where ``org`` is an existing local folder: a path (``runs/sources`` with
      ``runs/`` here means a missing ``runs/sources``, not the repo ``runs/sources``);
    - any other ``org/name`` (also ``org/name@rev``) is a Hub repo id.
    """
    if text.startswith("hf://"):
        return None
    if text.startswith(("/", "~", ".")) or "\\" in text or re.match(r"[A-Za-z]:", text):
        return "it is written as a path"
    parts = text.split("/")
    if any(part.lower().endswith(_PATH_SUFFIXES) for part in parts):
        return "it names a file"
    if len(parts) != 2 or not all(parts):
        return "a Hub repo id is org/name"
    if os.path.isdir(parts[0]):
        return f"the folder {parts[0]!r} exists here"
    return None


def parse_spec(spec: str, *, revision: str | None = None, subfolder: str | None = None) -> HubSpec:
    """Parse ``org/name``, ``org/name@rev`` or ``hf://org/name[@revision][/subfolder]``.

    A revision holding slashes is written percent-encoded (``@refs%2Fpr%2F1``); ``refs/pr/N``,
    ``refs/heads/X`` and ``refs/tags/X`` are also recognised unencoded. ``revision`` and
    ``subfolder`` (the CLI flags) may repeat what the URL says but not contradict it.
    """
    text = spec.strip()
    is_url = text.startswith("hf://")
    body = text[len("hf://") :] if is_url else text
    body = body.strip("/")
    url_rev: str | None = None
    url_sub: str | None = None
    if "@" in body:
        repo_id, _, rest = body.partition("@")
        segs = [s for s in rest.split("/") if s]
        if len(segs) >= 3 and segs[0] == "refs" and segs[1] in ("pr", "heads", "tags"):
            url_rev, segs = "/".join(segs[:3]), segs[3:]
        elif segs:
            url_rev, segs = unquote(segs[0]), segs[1:]
        url_sub = "/".join(segs) or None
        if not url_rev:
            raise HubError("empty revision after '@' in the Hub URL", spec)
    else:
        segs = [s for s in body.split("/") if s]
        repo_id = "/".join(segs[:2])
        url_sub = "/".join(segs[2:]) or None
        if not is_url and url_sub:
            use = flag("--subfolder", "SourceSpec(..., subfolder=SUBFOLDER)")
            raise HubError(f"a repo id is org/name; write hf://org/name/SUBFOLDER or use {use}", spec)
    if not _HUB_ID_RE.fullmatch(repo_id or "") or ".." in repo_id or "--" in repo_id:
        raise HubError("not a valid Hub repo id: expected org/name or hf://org/name[@revision][/subfolder]", spec)
    if revision and url_rev and revision != url_rev:
        given = flag(f"--revision {revision}", f"HubOptions(revision={revision!r})")
        raise HubError(f"{given} contradicts the revision {url_rev} in the URL: give it once", spec)
    if subfolder and url_sub and subfolder.strip("/") != url_sub:
        given = flag(f"--subfolder {subfolder}", f"subfolder={subfolder!r}")
        raise HubError(f"{given} contradicts the subfolder {url_sub} in the URL: give it once", spec)
    sub = (subfolder or url_sub or "").strip("/") or None
    if sub and any(part in ("", ".", "..") for part in sub.split("/")):
        raise HubError("invalid subfolder", spec)
    return HubSpec(repo_id=repo_id, revision=revision or url_rev, subfolder=sub)


def _endpoint() -> str | None:
    """HF_ENDPOINT as set now (huggingface_hub itself reads it only at import time)."""
    value = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/")
    return value or None


def _endpoint_name() -> str:
    """The endpoint as messages and results show it: without the user and password a URL may
    carry (``http://user:secret@mirror``)."""
    from huggingface_hub import constants

    return re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@", r"\1", _endpoint() or str(constants.ENDPOINT).rstrip("/"))


def is_offline(flag: bool = False) -> bool:
    """Offline when ``flag`` (--offline), HF_HUB_OFFLINE is set now, or huggingface_hub says so."""
    if flag or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _known_tokens(token: str | None) -> list[str]:
    """Every token that could end up in a message: the given one and the one huggingface_hub finds."""
    found = [token] if token else []
    with contextlib.suppress(Exception):
        from huggingface_hub import get_token

        stored = get_token()
        if stored:
            found.append(stored)
    return [t for t in found if t]


def scrub(text: str, tokens: list[str]) -> str:
    """``text`` with every token replaced by ``***`` (and any ``hf_...`` token-like word masked)."""
    for tok in tokens:
        text = text.replace(tok, "***")
    return re.sub(r"\bhf_[A-Za-z0-9]{30,}\b", "hf_***", text)


_QUIET_LOCK = threading.Lock()
_quiet_depth = 0
_quiet_level = logging.NOTSET
_quiet_bars: bool | None = None  # the "huggingface_hub" bar group's own setting before (None: unset)
_BAR_GROUP = "huggingface_hub"  # its download bars are "huggingface_hub.http_get" and ".xet_get"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence huggingface_hub's log lines, warnings (retry notices ...) and progress bars during
    one call: downloads of adapters are small, and the CLI promises one line on stderr per failure.
    The bars are switched off by their group, as every huggingface_hub release since 0.34 reads it
    (``tqdm_class`` came with 1.0), and the group's own setting is put back. MPT_TOOLS_DEBUG=1 keeps
    them all.
    """
    global _quiet_depth, _quiet_level, _quiet_bars
    if debug():
        yield
        return
    import huggingface_hub.utils.logging  # noqa: F401  (its import sets the logger's level: first, not inside)

    # the module itself: huggingface_hub.utils exports a class under the same name
    bars = importlib.import_module("huggingface_hub.utils.tqdm")

    logger = logging.getLogger("huggingface_hub")
    with _QUIET_LOCK:  # audit's threads: the first in silences, the last out restores
        if _quiet_depth == 0:
            _quiet_level = logger.level
            logger.setLevel(logging.CRITICAL + 1)
            _quiet_bars = bars.progress_bar_states.get(_BAR_GROUP)
            bars.progress_bar_states[_BAR_GROUP] = False
        _quiet_depth += 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        with _QUIET_LOCK:
            _quiet_depth -= 1
            if _quiet_depth == 0:
                logger.setLevel(_quiet_level)
                if _quiet_bars is None:
                    bars.progress_bar_states.pop(_BAR_GROUP, None)
                else:
                    bars.progress_bar_states[_BAR_GROUP] = _quiet_bars


# --------------------------------------------------------------------------- error mapping


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in out and len(out) < 10:
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    code = getattr(response, "status_code", None)
    return code if isinstance(code, int) else None


def _is_network(exc: BaseException) -> bool:
    module = type(exc).__module__ or ""
    return module.startswith(("httpx", "httpcore", "requests", "urllib3")) or isinstance(
        exc, (ConnectionError, TimeoutError)
    )


def _phrase(status: int) -> str:
    """The reason phrase of an HTTP status ("Not Found"), or "client error"."""
    import http

    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "client error"


def _offline_flag() -> str:
    """How a message names the offline switch: ``--offline`` or ``HubOptions(offline=True)``."""
    return flag("--offline", "HubOptions(offline=True)")


def token_flag(writing: bool = False) -> str:
    """How a message names the Hub token: ``--token``, or ``token=`` (push) / ``HubOptions(token=...)``."""
    return flag("--token", "token=" if writing else "HubOptions(token=...)")


def _network_message(exc: BaseException, *, token_given: bool, writing: bool = False) -> str | None:
    """What to say about a connection problem or HTTP status found anywhere in the chain."""
    offline = "" if writing else f", or use {_offline_flag()} with a cached copy"
    token = token_flag(writing)
    for item in _chain(exc):
        status = _status(item)
        if status is not None:
            if status >= 500:
                return f"the Hub answered HTTP {status} (server error): try again later{offline}"
            if status == 429:
                return "the Hub answered HTTP 429 (rate limited): wait a moment and try again"
            if status == 401:
                if token_given:
                    return f"the Hub rejected the token (HTTP 401): check {token} / HF_TOKEN / `hf auth login`"
                return f"the Hub asks for authentication (HTTP 401): pass {token}, set HF_TOKEN or run `hf auth login`"
            if status == 403:
                return "access denied (HTTP 403): your token lacks the rights for this repo"
            if 400 <= status < 500:  # not a connection problem: say what the server said
                return f"the Hub answered HTTP {status} ({_phrase(status)}): check the repo, revision and file"
    for item in _chain(exc):
        if _is_network(item):
            return _transport_message(item, offline)
    return None


def _redirect_loop() -> str:
    return f"{_endpoint_name()} redirected too many times (a redirect loop): check HF_ENDPOINT or the mirror"


def _transport_message(item: BaseException, offline: str) -> str:
    """One line for a transport failure (httpx, httpx2, requests or urllib3 alike, by class name):
    a connection that broke off mid-answer, a redirect loop or a URL of another scheme is not
    "cannot connect"."""
    name = type(item).__name__
    text = str(item).lower()
    endpoint = _endpoint_name()
    if "timeout" in name.lower():
        return f"timed out reaching {endpoint}: check your network, proxy or HF_ENDPOINT"
    if name == "TooManyRedirects":
        return _redirect_loop()
    if name in ("UnsupportedProtocol", "InvalidSchema", "MissingSchema", "InvalidURL"):
        return f"{endpoint} gave a URL that is not http(s) (in HF_ENDPOINT or a redirect): check HF_ENDPOINT"
    if name in ("ChunkedEncodingError", "IncompleteRead", "ProtocolError") or "complete message body" in text:
        return f"the connection to {endpoint} broke off before the whole answer came: run the command again"
    if "without sending a response" in text or "connection aborted" in text:
        return f"{endpoint} closed the connection without answering: try again later{offline}"
    if name in ("RemoteProtocolError", "DecodingError", "ContentDecodingError"):
        return f"{endpoint} sent an answer that is not valid HTTP ({name}): check HF_ENDPOINT or the mirror"
    return f"cannot connect to {endpoint}: check your network, proxy or HF_ENDPOINT{offline}"


def remote_missing(exc: BaseException) -> bool:
    """Whether the Hub said the file is not there (HTTP 404 of a file): ``RemoteEntryNotFoundError``
    from huggingface_hub 1.0 on; before it, an ``EntryNotFoundError`` that is not the local cache's."""
    from huggingface_hub import errors

    remote = getattr(errors, "RemoteEntryNotFoundError", None)
    if remote is not None:
        return isinstance(exc, remote)
    return isinstance(exc, errors.EntryNotFoundError) and not isinstance(exc, errors.LocalEntryNotFoundError)


def _map_error(exc: BaseException, *, where: str, what: str, token: str | None, offline: bool) -> HubError:
    """Turn a huggingface_hub (or network) exception into one HubError line."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    tokens = _known_tokens(token)
    has_token = bool(tokens)
    if isinstance(exc, GatedRepoError):
        if _status(exc) == 403:
            msg = "gated repo and your account has not been granted access: request it on the repo's Hub page"
        else:
            msg = (
                f"gated repo: request access on its Hub page, then pass {token_flag()} (or set HF_TOKEN) "
                "of an account that has it"
            )
    elif isinstance(exc, RepositoryNotFoundError):
        if has_token:
            msg = "repository not found, or private and not visible to your token: check the name and the token"
        else:
            msg = (
                f"repository not found (a private repo needs a token): check the name, or pass {token_flag()}, "
                "set HF_TOKEN or run `hf auth login`"
            )
    elif isinstance(exc, RevisionNotFoundError):
        revision = flag("--revision", "HubOptions(revision=...)")
        msg = f"revision not found: check the branch, tag or commit ({revision} or @REV)"
    elif remote_missing(exc):
        msg = (
            f"{what} not found in the repo at this revision: check the revision and {flag('--subfolder', 'subfolder')}"
        )
    elif isinstance(exc, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        net = _network_message(exc, token_given=has_token)
        if offline:
            msg = (
                f"{what} is not in the local cache and offline mode is on ({_offline_flag()} or HF_HUB_OFFLINE=1): "
                f"run once online (or give {flag('--cache-dir', 'HubOptions(cache_dir=...)')} of a cache that has it)"
            )
        else:
            msg = net or f"could not ask the Hub about {what} and it is not cached: check your connection"
    elif isinstance(exc, HFValidationError):
        msg = "not a valid Hub repo id or revision: expected org/name or hf://org/name[@revision][/subfolder]"
    elif isinstance(exc, OSError) and "consistency check failed" in str(exc).lower():
        msg = f"the download of {what} was corrupted (size differs from the Hub's): run the command again"
    else:
        net = _network_message(exc, token_given=has_token)
        msg = net or f"{what}: Hub request failed ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
    return HubError(scrub(msg, tokens), scrub(where, tokens))


def _is_hub_exception(exc: BaseException) -> bool:
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled

    return isinstance(exc, (HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled)) or any(
        _is_network(e) or (isinstance(e, OSError) and "consistency check failed" in str(e).lower()) for e in _chain(exc)
    )


# --------------------------------------------------------------------------- downloads


def _free_space(cache_dir: str | None) -> tuple[str, int | None]:
    """The Hub cache folder (``cache_dir`` or huggingface_hub's) and the free bytes on its disk,
    measured at its nearest existing folder (None when that cannot be measured)."""
    from huggingface_hub import constants

    cache = cache_dir or constants.HF_HUB_CACHE
    folder = Path(cache).absolute()
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    try:
        return cache, shutil.disk_usage(folder).free
    except OSError:
        return cache, None


@contextlib.contextmanager
def _loop_is_hub_error(where: str) -> Iterator[None]:
    """huggingface_hub before 1.0 follows a HEAD's relative redirects by recursion, without end on
    a loop: its RecursionError is the redirect loop it is."""
    try:
        yield
    except RecursionError:
        raise HubError(_redirect_loop(), where) from None


@dataclass
class _Fetch:
    spec: HubSpec
    token: str | None
    cache_dir: str | None
    offline: bool

    def download(self, filename: str, revision: str, limit: int | None = None) -> str:
        """``filename`` at ``revision`` into the cache, its local path. An uncached file is first
        looked at (HEAD): refused before any byte is written when its ETag is no content hash, it
        is over ``limit`` bytes (a config), or it would not fit in the cache's free space."""
        from huggingface_hub import hf_hub_download

        if not self.offline and not self._cached(filename, revision):
            self._check_head(filename, revision, limit)
        with _quiet(), _loop_is_hub_error(self.spec.url(revision, filename)):
            path = hf_hub_download(
                self.spec.repo_id,
                filename,
                subfolder=self.spec.subfolder,
                revision=revision,
                cache_dir=self.cache_dir,
                token=self.token,
                local_files_only=self.offline,
                endpoint=_endpoint(),
                library_name="mpt-tools",
                library_version=__version__,
            )
        self._check_blob(str(path), filename)
        return str(path)

    def _cached(self, filename: str, revision: str) -> bool:
        """Whether ``filename`` at ``revision`` is in the cache already (no request is made then)."""
        from huggingface_hub import try_to_load_from_cache

        path = f"{self.spec.subfolder}/{filename}" if self.spec.subfolder else filename
        try:
            return isinstance(
                try_to_load_from_cache(self.spec.repo_id, path, cache_dir=self.cache_dir, revision=revision), str
            )
        except Exception:
            return False

    def _check_head(self, filename: str, revision: str, limit: int | None) -> None:
        """Refuse, before anything is written, a file whose ETag is no content hash (huggingface_hub
        names the cached blob after it, so a hostile endpoint's ``../../x`` would write outside the
        cache, and no hash could be checked), one over ``limit`` bytes, and one larger than the
        cache's free space (huggingface_hub only warns, then fills the disk)."""
        from huggingface_hub import get_hf_file_metadata, hf_hub_url

        url = hf_hub_url(
            self.spec.repo_id, filename, subfolder=self.spec.subfolder, revision=revision, endpoint=_endpoint()
        )
        try:
            with _quiet():
                meta = get_hf_file_metadata(url, token=self.token)
        except Exception:  # not found, offline, a server error: the download says it, as it always has
            return
        etag = meta.etag or ""
        if _hash_kind(etag) is None:
            sent = f"ETag {etag[:40]!r} for it, not a content hash" if etag else "no ETag (content hash) for it"
            raise HubError(
                f"the Hub sent {sent}: refusing to download it (a broken or hostile HF_ENDPOINT?)",
                self.spec.url(revision, filename),
            )
        size = meta.size
        if size is None:
            return
        if limit is not None and size > limit:
            raise HubError(
                f"the file is {size:,} bytes on the Hub, more than {filename} can be ({limit:,} bytes): not downloaded",
                self.spec.url(revision, filename),
            )
        cache, free = _free_space(self.cache_dir)
        if free is not None and size > free:
            raise HubError(
                f"the file is {size:,} bytes and the cache at {cache} has {free:,} bytes free: free some space or "
                f"give {flag('--cache-dir', 'HubOptions(cache_dir=...)')} on a larger disk",
                self.spec.url(revision, filename),
            )

    def _check_blob(self, path: str, filename: str) -> None:
        """The downloaded file must be a blob of this repo's cache named by its hash; otherwise (an
        endpoint that changed its ETag between requests) the snapshot's link is removed and the
        download refused."""
        target = Path(path).resolve()
        parts = Path(path).parts
        at = len(parts) - 1 - parts[::-1].index("snapshots") if "snapshots" in parts else None
        blobs = (Path(*parts[:at]) / "blobs").resolve() if at else None  # <repo folder>/snapshots/<commit>/...
        if not Path(path).is_symlink() or blobs is None:
            return  # a cache without symlinks (Windows): the hash check after the download still runs
        if target.parent != blobs or _hash_kind(target.name) is None:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise HubError(
                f"the download was stored as {target}, outside the cache's blobs or not named by a content "
                "hash (the endpoint's ETag): refused (a broken or hostile HF_ENDPOINT?)",
                self.spec.url(None, filename),
            )

    def known_missing(self, filename: str, revision: str) -> bool:
        """True when the cache records that ``filename`` does not exist at ``revision``."""
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.file_download import _CACHED_NO_EXIST

        path = f"{self.spec.subfolder}/{filename}" if self.spec.subfolder else filename
        try:
            found = try_to_load_from_cache(self.spec.repo_id, path, cache_dir=self.cache_dir, revision=revision)
        except Exception:
            return False
        return found is _CACHED_NO_EXIST


def _commit_of(path: str, subfolder: str | None) -> str | None:
    """The commit id from a cache path ``.../snapshots/<commit>/[sub/]filename``."""
    parts = Path(path).parts
    depth = 1 + (len(subfolder.split("/")) if subfolder else 0)
    if len(parts) >= depth + 2 and parts[-depth - 2] == "snapshots":
        return parts[-depth - 1]
    return None


def _git_blob_sha1(path: str | os.PathLike[str]) -> str:
    return hash_file(path, hashlib.sha1(b"blob %d\0" % os.path.getsize(path)))


def _expected_hash(fetch: _Fetch, local: str, path_in_repo: str, commit: str | None) -> tuple[str, str] | None:
    """("sha256"|"git-sha1", hex) the Hub gave for this file, or None when it gave none.

    The cache stores each file as ``blobs/<etag>`` (the ETag / X-Linked-Etag of the download:
    the LFS sha256 for LFS files, the git blob id otherwise). Without symlinks in the cache the
    Hub is asked (paths-info) when online.
    """
    p = Path(local)
    if p.is_symlink():
        name = p.resolve().name
        kind = _hash_kind(name)
        return (kind, name) if kind is not None else None
    if fetch.offline or commit is None:
        return None
    from huggingface_hub import HfApi

    try:
        with _quiet():
            infos = HfApi(endpoint=_endpoint()).get_paths_info(
                fetch.spec.repo_id, [path_in_repo], revision=commit, token=fetch.token
            )
    except Exception:
        return None
    for info in infos:
        lfs = getattr(info, "lfs", None)
        sha = getattr(lfs, "sha256", None) if lfs is not None else None
        if isinstance(sha, str) and _SHA256_RE.fullmatch(sha):
            return "sha256", sha
        blob = getattr(info, "blob_id", None)
        if isinstance(blob, str) and _SHA1_RE.fullmatch(blob):
            return "git-sha1", blob
    return None


def _verify(fetch: _Fetch, local: str, filename: str, commit: str | None, where: str) -> str:
    """Check a downloaded file against the Hub's hash; on mismatch remove it from the cache and fail.

    Returns the file's sha256.
    """
    path_in_repo = f"{fetch.spec.subfolder}/{filename}" if fetch.spec.subfolder else filename
    expected = _expected_hash(fetch, local, path_in_repo, commit)
    actual = file_sha256(local)  # also remembered for the command's own sha256 of the source
    if expected is None:
        return actual
    kind, value = expected
    found = actual if kind == "sha256" else _git_blob_sha1(local)
    if found == value:
        return actual
    p = Path(local)
    blob = p.resolve()
    for doomed in (p, blob):
        with contextlib.suppress(OSError):
            doomed.unlink()
    raise HubError(
        f"{kind} mismatch: the Hub says {value[:16]}..., the downloaded file has {found[:16]}...; "
        "the corrupted copy was removed from the cache: run the command again",
        where,
    )


def download_source(
    spec: str,
    *,
    subfolder: str | None = None,
    hub: HubOptions | None = None,
) -> tuple[Path, HubInfo]:
    """Download an MPT adapter from the Hub into the Hugging Face cache, as PEFT would read it.

    ``spec`` is ``org/name`` or ``hf://org/name[@revision][/subfolder]``. Only
    ``adapter_config.json`` and one weights file (``adapter_model.safetensors``, else
    ``adapter_model.bin``) are fetched, both from the same commit; the weights are checked against
    the Hub's sha256 (LFS) or git blob id. ``hub.token`` defaults to HF_TOKEN / the stored login;
    ``hub.offline`` (or HF_HUB_OFFLINE=1) reads the cache only; ``hub.revision`` picks the revision.
    HF_ENDPOINT is honoured as set now.

    Returns ``(folder, hub_info)``: the snapshot folder (or its subfolder) holding the files, and
    ``{"repo_id", "revision", "commit", "subfolder", "url", "file", "sha256", "endpoint"}`` where
    ``url`` is ``hf://org/name@commit[/subfolder]``. Raises HubError with one line otherwise.
    """
    if not isinstance(spec, str):
        raise ConfigError(
            f"download_source takes a Hub repo id (org/name or hf://org/name...), not {spec!r:.80}; "
            "load_source reads local adapters"
        )
    hub = hub or HubOptions()
    token = hub.token
    parsed = parse_spec(spec, revision=hub.revision, subfolder=subfolder)
    fetch = _Fetch(
        spec=parsed,
        token=token or None,
        cache_dir=os.fspath(hub.cache_dir) if hub.cache_dir is not None else None,
        offline=is_offline(hub.offline),
    )
    rev = parsed.revision or "main"
    config_path: str | None = None
    try:
        config_path = fetch.download(CONFIG_NAME, rev, MAX_CONFIG_BYTES)
    except Exception as exc:
        if not _is_hub_exception(exc) and not isinstance(exc, OSError):
            raise
        from huggingface_hub.errors import LocalEntryNotFoundError

        missing = remote_missing(exc) or (
            isinstance(exc, LocalEntryNotFoundError) and fetch.offline and fetch.known_missing(CONFIG_NAME, rev)
        )
        if not missing:
            raise _map_error(
                exc, where=parsed.url(filename=CONFIG_NAME), what=CONFIG_NAME, token=token, offline=fetch.offline
            ) from None
    commit = _commit_of(config_path, parsed.subfolder) if config_path else None
    pinned = commit or rev
    weights_path: str | None = None
    weights_name = WEIGHTS_NAMES[0]
    last_error: BaseException | None = None
    for name in WEIGHTS_NAMES:
        weights_name = name
        try:
            weights_path = fetch.download(name, pinned)
            break
        except Exception as exc:
            if not _is_hub_exception(exc) and not isinstance(exc, OSError):
                raise
            from huggingface_hub.errors import LocalEntryNotFoundError

            if remote_missing(exc) or (
                isinstance(exc, LocalEntryNotFoundError) and fetch.offline and name != WEIGHTS_NAMES[-1]
            ):
                last_error = exc
                continue
            raise _map_error(
                exc, where=parsed.url(pinned, filename=name), what=name, token=token, offline=fetch.offline
            ) from None
    if weights_path is None:
        from huggingface_hub.errors import LocalEntryNotFoundError

        if isinstance(last_error, LocalEntryNotFoundError):
            raise _map_error(
                last_error,
                where=parsed.url(pinned, filename=WEIGHTS_NAMES[0]),
                what="adapter_model.safetensors/.bin",
                token=token,
                offline=True,
            ) from None
        add = flag("--subfolder NAME", "SourceSpec(..., subfolder=NAME)")
        hint = "" if parsed.subfolder else f"; a named adapter lives in a subfolder: add {add}"
        raise HubError(
            f"no adapter_model.safetensors or adapter_model.bin in the repo at this revision{hint}",
            parsed.url(pinned),
        )
    commit = commit or _commit_of(weights_path, parsed.subfolder)
    if config_path is not None:
        _verify(fetch, config_path, CONFIG_NAME, commit, parsed.url(pinned, filename=CONFIG_NAME))
    sha = _verify(fetch, weights_path, weights_name, commit, parsed.url(pinned, filename=weights_name))
    folder = Path(weights_path).parent
    info: HubInfo = {
        "repo_id": parsed.repo_id,
        "revision": rev,
        "commit": commit,
        "subfolder": parsed.subfolder,
        "url": parsed.url(commit or rev),
        "file": weights_name,
        "sha256": sha,
        "endpoint": _endpoint_name(),
    }
    return folder, info


# --------------------------------------------------------------------------- base-model check


# --------------------------------------------------------------------------- push
