"""Everything mpt-tools does with the Hugging Face Hub: download a source, check a base model, push.

Every ``huggingface_hub`` call of mpt-tools lives in this module, and ``huggingface_hub`` is
imported inside the functions only, so local commands never import it.

* :func:`download_source` fetches exactly ``adapter_config.json`` and one weights file (PEFT's
  order: ``adapter_model.safetensors``, else ``adapter_model.bin``) into the Hugging Face cache,
  checks the weights' sha256 against the Hub's LFS sha256 and returns the snapshot folder.
* :func:`base_model_findings` fetches only a base model's ``config.json`` and compares its hidden
  size with the adapter's ``token_dim``.
* :func:`push_adapter` uploads an adapter folder plus a generated model card in one commit.

Every failure is a :class:`~mpt_tools.errors.HubError` with one line naming the repo, revision
and file and what to do. A token never appears in any message, file or result.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from . import __version__
from .checks import check_source, errors, refusal
from .errors import HubError, MptToolsError, ValidationError
from .source import file_sha256, hash_file, load_source

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
PUSH_WEIGHTS = "adapter_model.safetensors"
CARD_NAME = "README.md"
HIDDEN_SIZE_KEYS = ("hidden_size", "d_model", "n_embd")
CARD_TAGS = ("peft", "multitask-prompt-tuning", "mpt-tools")

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_SHA1_RE = re.compile(r"[0-9a-f]{40}")
_HUB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?")
_TRUE = ("1", "on", "yes", "true")
_AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


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
            raise HubError("a repo id is org/name; write hf://org/name/SUBFOLDER or use --subfolder", spec)
    if not _HUB_ID_RE.fullmatch(repo_id or "") or ".." in repo_id or "--" in repo_id:
        raise HubError("not a valid Hub repo id: expected org/name or hf://org/name[@revision][/subfolder]", spec)
    if revision and url_rev and revision != url_rev:
        raise HubError(f"--revision {revision} contradicts the revision {url_rev} in the URL: give it once", spec)
    if subfolder and url_sub and subfolder.strip("/") != url_sub:
        raise HubError(f"--subfolder {subfolder} contradicts the subfolder {url_sub} in the URL: give it once", spec)
    sub = (subfolder or url_sub or "").strip("/") or None
    if sub and any(part in ("", ".", "..") for part in sub.split("/")):
        raise HubError("invalid subfolder", spec)
    return HubSpec(repo_id=repo_id, revision=revision or url_rev, subfolder=sub)


def _endpoint() -> str | None:
    """HF_ENDPOINT as set now (huggingface_hub itself reads it only at import time)."""
    value = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/")
    return value or None


def _endpoint_name() -> str:
    from huggingface_hub import constants

    return _endpoint() or str(constants.ENDPOINT).rstrip("/")


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


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence huggingface_hub's log lines and warnings (retry notices ...) during one call.

    The CLI promises one line on stderr per failure; MPT_TOOLS_DEBUG=1 keeps them.
    """
    if os.environ.get("MPT_TOOLS_DEBUG", "") not in ("", "0"):
        yield
        return
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


class _QuietBar:
    """Factory for a disabled progress bar: downloads of adapters are small, stderr stays clean."""

    @staticmethod
    def make() -> Any:
        from huggingface_hub.utils import tqdm as hf_tqdm

        class Quiet(hf_tqdm):  # type: ignore[misc, valid-type]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                kwargs["disable"] = True
                super().__init__(*args, **kwargs)

        return Quiet


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


def _network_message(exc: BaseException, *, token_given: bool, writing: bool = False) -> str | None:
    """What to say about a connection problem or HTTP status found anywhere in the chain."""
    for item in _chain(exc):
        status = _status(item)
        if status is not None:
            if status >= 500:
                return f"the Hub answered HTTP {status} (server error), also after retries: try again later" + (
                    "" if writing else ", or use --offline with a cached copy"
                )
            if status == 429:
                return "the Hub answered HTTP 429 (rate limited): wait a moment and try again"
            if status == 401:
                if token_given:
                    return "the Hub rejected the token (HTTP 401): check --token / HF_TOKEN / `hf auth login`"
                return "the Hub asks for authentication (HTTP 401): pass --token, set HF_TOKEN or run `hf auth login`"
            if status == 403:
                return "access denied (HTTP 403): your token lacks the rights for this repo"
    for item in _chain(exc):
        if _is_network(item):
            if "timeout" in type(item).__name__.lower():
                return f"timed out reaching {_endpoint_name()}: check your network, proxy or HF_ENDPOINT"
            return f"cannot connect to {_endpoint_name()}: check your network, proxy or HF_ENDPOINT" + (
                "" if writing else ", or use --offline with a cached copy"
            )
    return None


def _map_error(exc: BaseException, *, where: str, what: str, token: str | None, offline: bool) -> HubError:
    """Turn a huggingface_hub (or network) exception into one HubError line."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
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
                "gated repo: request access on its Hub page, then pass --token (or set HF_TOKEN) "
                "of an account that has it"
            )
    elif isinstance(exc, RepositoryNotFoundError):
        if has_token:
            msg = "repository not found, or private and not visible to your token: check the name and the token"
        else:
            msg = (
                "repository not found (a private repo needs a token): check the name, or pass --token, "
                "set HF_TOKEN or run `hf auth login`"
            )
    elif isinstance(exc, RevisionNotFoundError):
        msg = "revision not found: check the branch, tag or commit (--revision or @REV)"
    elif isinstance(exc, RemoteEntryNotFoundError):
        msg = f"{what} not found in the repo at this revision: check the revision and --subfolder"
    elif isinstance(exc, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        net = _network_message(exc, token_given=has_token)
        if offline:
            msg = (
                f"{what} is not in the local cache and offline mode is on (--offline or HF_HUB_OFFLINE=1): "
                "run once online (or give --cache-dir of a cache that has it)"
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


@dataclass
class _Fetch:
    spec: HubSpec
    token: str | None
    cache_dir: str | None
    offline: bool

    def download(self, filename: str, revision: str) -> str:
        from huggingface_hub import hf_hub_download

        with _quiet():
            path = hf_hub_download(
                self.spec.repo_id,
                filename,
                subfolder=self.spec.subfolder,
                revision=revision,
                cache_dir=self.cache_dir,
                token=self.token,
                local_files_only=self.offline,
                endpoint=_endpoint(),
                tqdm_class=_QuietBar.make(),
                library_name="mpt-tools",
                library_version=__version__,
            )
        return str(path)

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
        if _SHA256_RE.fullmatch(name):
            return "sha256", name
        if _SHA1_RE.fullmatch(name):
            return "git-sha1", name
        return None
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
    revision: str | None = None,
    token: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    offline: bool = False,
) -> tuple[Path, dict[str, Any]]:
    """Download an MPT adapter from the Hub into the Hugging Face cache, as PEFT would read it.

    ``spec`` is ``org/name`` or ``hf://org/name[@revision][/subfolder]``. Only
    ``adapter_config.json`` and one weights file (``adapter_model.safetensors``, else
    ``adapter_model.bin``) are fetched, both from the same commit; the weights are checked against
    the Hub's sha256 (LFS) or git blob id. ``token`` defaults to HF_TOKEN / the stored login;
    ``offline`` (or HF_HUB_OFFLINE=1) reads the cache only. HF_ENDPOINT is honoured as set now.

    Returns ``(folder, hub_info)``: the snapshot folder (or its subfolder) holding the files, and
    ``{"repo_id", "revision", "commit", "subfolder", "url", "file", "sha256", "endpoint"}`` where
    ``url`` is ``hf://org/name@commit[/subfolder]``. Raises HubError with one line otherwise.
    """
    parsed = parse_spec(spec, revision=revision, subfolder=subfolder)
    fetch = _Fetch(
        spec=parsed,
        token=token or None,
        cache_dir=os.fspath(cache_dir) if cache_dir is not None else None,
        offline=is_offline(offline),
    )
    rev = parsed.revision or "main"
    config_path: str | None = None
    try:
        config_path = fetch.download(CONFIG_NAME, rev)
    except Exception as exc:
        if not _is_hub_exception(exc) and not isinstance(exc, OSError):
            raise
        from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError

        missing = isinstance(exc, RemoteEntryNotFoundError) or (
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
            from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError

            if isinstance(exc, RemoteEntryNotFoundError) or (
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
        hint = "" if parsed.subfolder else "; a named adapter lives in a subfolder: add --subfolder NAME"
        raise HubError(
            f"no adapter_model.safetensors or adapter_model.bin in the repo at this revision{hint}",
            parsed.url(pinned),
        )
    commit = commit or _commit_of(weights_path, parsed.subfolder)
    if config_path is not None:
        _verify(fetch, config_path, CONFIG_NAME, commit, parsed.url(pinned, filename=CONFIG_NAME))
    sha = _verify(fetch, weights_path, weights_name, commit, parsed.url(pinned, filename=weights_name))
    folder = Path(weights_path).parent
    info: dict[str, Any] = {
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


def _hidden_size(config: dict[str, Any]) -> tuple[str, int] | None:
    for holder in (config, config.get("text_config") or {}):
        if not isinstance(holder, dict):
            continue
        for key in HIDDEN_SIZE_KEYS:
            value = holder.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                return key, value
    return None


def _base_config(
    name: str, *, revision: str | None, token: str | None, cache_dir: str | None, offline: bool
) -> tuple[dict[str, Any] | None, str]:
    """(config.json of the base model or None, the problem when None)."""
    local = Path(name).expanduser()
    if local.is_dir() or local.is_file():
        cfg_path = local / "config.json" if local.is_dir() else local
        if not cfg_path.is_file():
            return None, f"{local} has no config.json"
    elif name.startswith(("/", ".", "~")) or os.sep in name.replace("/", "") or not _HUB_ID_RE.fullmatch(name):
        return None, f"{name} is neither a local folder nor a Hub repo id"
    else:
        fetch = _Fetch(HubSpec(name, revision), token, cache_dir, is_offline(offline))
        try:
            cfg_path = Path(fetch.download("config.json", revision or "main"))
        except Exception as exc:
            if not _is_hub_exception(exc) and not isinstance(exc, OSError):
                raise
            err = _map_error(
                exc,
                where=HubSpec(name, revision).url(filename="config.json"),
                what="config.json",
                token=token,
                offline=fetch.offline,
            )
            return None, str(err)
    try:
        data = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        return None, f"{cfg_path}: unreadable config.json ({type(exc).__name__})"
    if not isinstance(data, dict):
        return None, f"{cfg_path}: config.json is not a JSON object"
    return data, ""


def check_base_model(
    token_dim: int | None,
    base_model: str,
    *,
    revision: str | None = None,
    token: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    offline: bool = False,
) -> list[Any]:
    """Compare ``token_dim`` with the hidden size of ``base_model`` (a Hub id or a local folder).

    Only the base model's ``config.json`` is read (``hidden_size``, ``d_model`` or ``n_embd``, also
    under ``text_config``). Returns findings (code ``base-model``): an error on mismatch, a warning
    when the config cannot be had (offline and not cached, not found, no hidden size), an info
    line when it matches.
    """
    from .checks import Finding

    fix_unknown = "check the base model by hand, or run online without --offline"
    config, problem = _base_config(
        base_model,
        revision=revision,
        token=token or None,
        cache_dir=os.fspath(cache_dir) if cache_dir is not None else None,
        offline=offline,
    )
    if config is None:
        return [
            Finding("warning", "base-model", "base_model", f"cannot check the base model: {problem}", fix=fix_unknown)
        ]
    hidden = _hidden_size(config)
    if hidden is None:
        return [
            Finding(
                "warning",
                "base-model",
                "base_model",
                f"config.json of {base_model} names no hidden_size, d_model or n_embd",
                fix=fix_unknown,
            )
        ]
    key, size = hidden
    if token_dim is None:
        return [
            Finding(
                "warning",
                "base-model",
                "token_dim",
                f"unknown token_dim; base model {base_model} has {key} {size}",
                size,
                None,
                "give --token-dim",
            )
        ]
    if token_dim != size:
        return [
            Finding(
                "error",
                "base-model",
                "token_dim",
                f"does not match the base model {base_model} ({key})",
                size,
                token_dim,
                "use an adapter made for this base model, or name the right one with --base-model",
            )
        ]
    return [
        Finding("info", "base-model", "token_dim", f"matches {key} of the base model {base_model}", size, token_dim)
    ]


def base_model_findings(
    ckpt: Any,
    base_model: str | None = None,
    *,
    hub_options: dict[str, Any] | None = None,
) -> list[Any]:
    """The base-model check for a loaded Checkpoint.

    ``base_model`` (``--base-model``) wins over the config's ``base_model_name_or_path`` (whose
    ``revision`` field is then used). The token, cache folder and offline switch come from
    ``hub_options``; their ``revision`` is the source's and is not used here.
    """
    from .checks import Finding

    opts = hub_options or {}
    name = base_model
    revision = None
    if not name:
        raw = getattr(ckpt.config, "raw", {}) or {}
        name = raw.get("base_model_name_or_path")
        rev = raw.get("revision")
        revision = rev if isinstance(rev, str) and rev else None
    if not isinstance(name, str) or not name.strip():
        return [
            Finding(
                "warning",
                "base-model",
                "base_model_name_or_path",
                "the config names no base model: nothing to check",
                fix="pass --base-model ID_OR_DIR",
            )
        ]
    token_dim = ckpt.config.size("token_dim")
    if token_dim is None:
        pe = ckpt.shapes.get("prompt_embeddings")
        token_dim = pe[1] if pe and len(pe) == 2 else None
    return check_base_model(
        token_dim,
        name.strip(),
        revision=revision,
        token=opts.get("token"),
        cache_dir=opts.get("cache_dir"),
        offline=bool(opts.get("offline")),
    )


# --------------------------------------------------------------------------- push


def _card_value(value: str) -> str:
    return value if re.fullmatch(r"[A-Za-z0-9][\w.\-/:]*", value) else json.dumps(value)


def _plain(value: Any, limit: int = 200) -> str:
    """A recorded (possibly hostile) value as one line of plain text for the card or a commit
    message: whitespace collapsed, control characters, backticks and pipes replaced, at most
    ``limit`` characters."""
    text = "".join(ch if ch.isprintable() else " " for ch in str(value))
    text = " ".join(text.split()).replace("`", "'").replace("|", "/")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _safe_source(value: str) -> str:
    """A source for the card: Hub URLs as they are, local paths reduced to their file name."""
    if value.startswith("hf://"):
        return value
    return f"a local file ({os.path.basename(value.rstrip('/')) or value})"


def model_card(
    repo_id: str,
    config: dict[str, Any],
    metadata: dict[str, str],
    files: list[dict[str, Any]],
    *,
    revision: str | None = None,
) -> str:
    """The README.md pushed with an adapter: PEFT-style front matter plus how it was made and loaded.

    ``metadata`` is the safetensors metadata (``mpt_tools.*`` provenance written by ``init``).
    """
    base = config.get("base_model_name_or_path")
    base_id = base if isinstance(base, str) and _HUB_ID_RE.fullmatch(base) and ".." not in base else None
    lines = ["---", "library_name: peft"]
    if base_id:
        lines.append(f"base_model: {_card_value(base_id)}")
    lines.append("tags:")
    if base_id:
        lines.append(f"- {_card_value('base_model:adapter:' + base_id)}")
    lines += [f"- {t}" for t in CARD_TAGS]
    lines += ["---", ""]
    name = repo_id.split("/")[-1]
    n_tasks = config.get("num_tasks")
    lines += [
        f"# {name}",
        "",
        "A [Multitask Prompt Tuning](https://arxiv.org/abs/2303.02861) (MPT) adapter for "
        "[PEFT](https://github.com/huggingface/peft)"
        + (f" on [{base_id}](https://huggingface.co/{base_id})" if base_id else "")
        + f": {n_tasks} task(s), {config.get('num_virtual_tokens')} virtual tokens, "
        f"token_dim {config.get('token_dim')}, rank {config.get('num_ranks')}, task_type {config.get('task_type')}.",
        "",
        "## How it was made",
        "",
    ]
    prov = {k[len("mpt_tools.") :]: v for k, v in metadata.items() if k.startswith("mpt_tools.")}
    if "mode" in prov:
        lines += [
            f"Initialised with mpt-tools {_plain(prov.get('version', ''), 40)} "
            f"(`mpt-tools init --mode {_plain(prov['mode'], 40)}`) from a source MPT adapter.",
            "",
            "| field | value |",
            "| --- | --- |",
        ]
        rows = [
            ("source", _safe_source(prov["source"]) if "source" in prov else None),
            ("source revision", prov.get("source_revision")),
            ("source file", prov.get("source_file")),
            ("source sha256", prov.get("source_sha256")),
            ("source dtype", prov.get("source_dtype")),
            ("mode", prov.get("mode")),
            ("task", prov.get("task")),
            ("tasks", prov.get("tasks")),
            ("weights", prov.get("weights")),
            ("seed", prov.get("seed")),
            ("target tasks", prov.get("target_tasks")),
        ]
        lines += [f"| {k} | `{_plain(v)}` |" for k, v in rows if v is not None]
    else:
        lines.append("Not recorded: the weights carry no mpt-tools provenance metadata.")
        lines += ["", "| field | value |", "| --- | --- |"]
    for f in files:
        if f["path"] != CARD_NAME:
            lines.append(f"| {f['path']} sha256 | `{f['sha256']}` |")
    auto = _AUTO_CLASSES.get(str(config.get("task_type")), "AutoModel")
    rev_arg = f', revision="{revision}"' if revision else ""
    lines += [
        "",
        "## How to load",
        "",
        "```python",
        "import torch",
        "from peft import PeftModel",
        f"from transformers import {auto}",
        "",
        f'base = {auto}.from_pretrained("{base_id or "BASE_MODEL"}")',
        f'model = PeftModel.from_pretrained(base, "{repo_id}"{rev_arg})',
        "# MPT needs the task of each example:",
        "# outputs = model(**batch, task_ids=torch.zeros(batch_size, dtype=torch.long))",
        "```",
        "",
        "To continue training, build the PEFT model from `adapter_config.json` and load these weights with "
        "`set_peft_model_state_dict` (PEFT does not reload prompt-learning adapters as trainable).",
        "",
    ]
    return "\n".join(lines)


def _validate_repo_id(repo_id: str) -> None:
    if not _HUB_ID_RE.fullmatch(repo_id) or "/" not in repo_id or ".." in repo_id or "--" in repo_id:
        raise HubError("not a valid repo id to push to: expected org/name", repo_id)


def _push_error(exc: BaseException, *, where: str, token: str | None, revision: str | None) -> HubError:
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    tokens = _known_tokens(token)
    status = next((s for s in (_status(e) for e in _chain(exc)) if s is not None), None)
    if isinstance(exc, RevisionNotFoundError):
        msg = f"branch {revision} not found: push without --create-pr to create it"
    elif status == 401 and not tokens:
        msg = "pushing needs a write token: pass --token, set HF_TOKEN or run `hf auth login`"
    elif status == 401:
        msg = "the Hub rejected the token (HTTP 401): check --token / HF_TOKEN / `hf auth login`"
    elif status == 403:
        msg = "your token cannot write to this repo (HTTP 403): use a write token for it, or --create-pr"
    elif isinstance(exc, RepositoryNotFoundError):
        msg = "repository not found or not visible to your token"
    else:
        net = _network_message(exc, token_given=bool(tokens), writing=True)
        msg = net or f"push failed ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
    return HubError(scrub(msg, tokens), where)


def push_adapter(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Push an adapter folder to the Hub: weights, config and a generated model card in one commit.

    The folder is validated first (refused when invalid). The repo is created when missing
    (``private`` applies then) and the branch ``revision`` too (from the default branch);
    ``create_pr`` opens a pull request instead of committing to the branch. ``dry_run`` makes no
    request at all and returns what would be uploaded, with the card. ``token`` defaults to
    HF_TOKEN / the stored login. Returns ``{"schema": "mpt-tools/push/1", "repo_id", "revision",
    "files": [{"path", "bytes", "sha256"}], "card", "dry_run", "commit", "commit_url", "pr_url",
    "url"}``.
    """
    src = Path(folder)
    _validate_repo_id(repo_id)
    if not src.is_dir():
        raise HubError("not an adapter folder (push takes the folder written by `mpt-tools init`)", str(src))
    weights = src / PUSH_WEIGHTS
    config_file = src / CONFIG_NAME
    if not weights.is_file():
        hint = (
            ": convert it first with `mpt-tools convert DIR --out NEW_DIR`"
            if (src / "adapter_model.bin").exists()
            else ""
        )
        raise HubError(f"no {PUSH_WEIGHTS} here{hint}", str(src))
    if not config_file.is_file():
        raise HubError(f"no {CONFIG_NAME} here: PEFT cannot load an adapter without it", str(src))
    ckpt = load_source(src)
    problems = errors(check_source(ckpt))
    if problems:
        refused = refusal(str(src), problems)
        raise ValidationError(f"refusing to push: {refused.message}", refused.path, problems)
    config_bytes = config_file.read_bytes()
    try:
        config = json.loads(config_bytes)
    except ValueError:
        raise HubError(f"unreadable {CONFIG_NAME}", str(config_file)) from None
    weight_bytes = weights.read_bytes()
    files: list[dict[str, Any]] = [
        {"path": PUSH_WEIGHTS, "bytes": len(weight_bytes), "sha256": hashlib.sha256(weight_bytes).hexdigest()},
        {"path": CONFIG_NAME, "bytes": len(config_bytes), "sha256": hashlib.sha256(config_bytes).hexdigest()},
    ]
    tokens = _known_tokens(token) if not dry_run else ([token] if token else [])
    card = scrub(model_card(repo_id, config, dict(ckpt.file.metadata or {}), files, revision=revision), tokens)
    card_bytes = card.encode("utf-8")
    files.append({"path": CARD_NAME, "bytes": len(card_bytes), "sha256": hashlib.sha256(card_bytes).hexdigest()})
    mode = (ckpt.file.metadata or {}).get("mpt_tools.mode")
    shown = f" ({_plain(mode, 40)})" if mode else ""
    message = commit_message or f"Upload MPT adapter{shown} with mpt-tools {__version__}"
    where = f"hf://{repo_id}" + (f"@{revision}" if revision else "")
    result: dict[str, Any] = {
        "schema": "mpt-tools/push/1",
        "folder": str(src),
        "repo_id": repo_id,
        "revision": revision,
        "create_pr": create_pr,
        "private": private,
        "commit_message": message,
        "files": files,
        "card": card,
        "dry_run": dry_run,
        "unchanged": [],
        "no_op": False,
        "commit": None,
        "commit_url": None,
        "pr_url": None,
        "url": None,
    }
    if dry_run:
        return result
    if is_offline(False):
        raise HubError("cannot push in offline mode: unset HF_HUB_OFFLINE", where)
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=_endpoint(), token=token or None, library_name="mpt-tools", library_version=__version__)
    operations = [
        CommitOperationAdd(path_in_repo=PUSH_WEIGHTS, path_or_fileobj=weight_bytes),
        CommitOperationAdd(path_in_repo=CONFIG_NAME, path_or_fileobj=config_bytes),
        CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=card_bytes),
    ]
    try:
        with _quiet():
            repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
            if revision and revision != "main" and not create_pr and not revision.startswith("refs/pr/"):
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            info = api.create_commit(
                repo_id,
                operations,
                commit_message=message,
                commit_description=f"Pushed with mpt-tools {__version__}.",
                revision=revision,
                create_pr=create_pr or None,
            )
    except MptToolsError:
        raise
    except Exception as exc:
        if not _is_hub_exception(exc) and not isinstance(exc, (OSError, ValueError)):
            raise
        raise _push_error(exc, where=where, token=token, revision=revision) from None
    commit_info: Any = info
    # huggingface_hub leaves out files whose content the branch already has (comparing the hashes
    # it fetched); with none left it makes no commit and returns the branch head.
    unchanged = [
        op.path_in_repo
        for op in operations
        if getattr(op, "_remote_oid", None) is not None
        and getattr(op, "_remote_oid", None) == getattr(op, "_local_oid", None)
    ]
    result["unchanged"] = unchanged
    result["no_op"] = len(unchanged) == len(operations)
    result.update(
        {
            "commit": getattr(commit_info, "oid", None),
            "commit_url": getattr(commit_info, "commit_url", None),
            "pr_url": getattr(commit_info, "pr_url", None),
            "url": str(getattr(repo_url, "url", repo_url)),
        }
    )
    return result


def push_summary(result: dict[str, Any]) -> list[str]:
    """Human-readable lines for a push result (the CLI prints them)."""
    where = result["repo_id"] + (f"@{result['revision']}" if result.get("revision") else "")
    lines: list[str] = []
    if result["dry_run"]:
        what = "open a pull request on" if result["create_pr"] else "push to"
        lines.append(f"dry run: would {what} {where} in one commit ({result['commit_message']!r}); nothing was sent")
        for f in result["files"]:
            lines.append(f"  {f['path']:<26} {f['bytes']:>10} bytes  sha256 {f['sha256']}")
        lines.append("model card (README.md):")
        lines += ["  " + line if line else "" for line in result["card"].splitlines()]
        return lines
    unchanged = set(result.get("unchanged") or [])
    if result.get("no_op"):
        lines.append(f"nothing to push: {where} already holds these exact files (no commit made)")
        lines.append(f"commit: {result['commit_url']}")
        return lines
    changed = len(result["files"]) - len(unchanged)
    same = f" ({len(unchanged)} unchanged)" if unchanged else ""
    lines.append(f"pushed {changed} file(s) to {where} in one commit{same}")
    for f in result["files"]:
        tag = "  (unchanged)" if f["path"] in unchanged else ""
        lines.append(f"  {f['path']:<26} {f['bytes']:>10} bytes  sha256 {f['sha256'][:16]}...{tag}")
    if result.get("pr_url"):
        lines.append(f"pull request: {result['pr_url']}")
    else:
        lines.append(f"commit: {result['commit_url']}")
    return lines


__all__ = [
    "HubSpec",
    "base_model_findings",
    "check_base_model",
    "download_source",
    "is_offline",
    "model_card",
    "parse_spec",
    "push_adapter",
    "push_summary",
]
