"""What the audit asks the Hub, without downloading weights: the PEFT repos of a user or an
organisation, a repo's file listing at one commit (sizes and LFS sha256 included), small files
(adapter configs) and safetensors headers.

Headers are read the way huggingface_hub's ``parse_safetensors_file_metadata`` reads them: one
ranged GET of the first 100,000 bytes, and a second ranged GET only when the header is longer.
The bytes are then checked by mpt-tools' own parser (:func:`mpt_tools.formats.parse_header`),
which holds them to safetensors' rules (huggingface_hub's parser accepts headers safetensors
refuses), so a header gets the same verdict on the Hub as in a local file. Every request goes
through huggingface_hub's HTTP session (its endpoint, token, user agent and retries).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from typing import Any, NamedTuple

from ..errors import HubError, flag
from ..formats import MAX_HEADER
from ..options import HubOptions
from .download import _endpoint, _is_hub_exception, _map_error, _quiet, is_offline

FIRST_RANGE = 100_000  # huggingface_hub's first header read (bytes 0-100000)


class RepoFile(NamedTuple):
    """One file of a repo listing: path, size in bytes, and the LFS sha256 (None for a file kept
    in git, whose content hash the Hub gives only as a git blob id)."""

    path: str
    size: int
    sha256: str | None


class RepoListing(NamedTuple):
    """A repo at one commit: every file, by path."""

    repo_id: str
    commit: str
    files: dict[str, RepoFile]


def _offline_check(hub: HubOptions, where: str) -> None:
    if is_offline(hub.offline):
        raise HubError(
            "listing a Hub repo and reading its files needs the network, and offline mode is on "
            f"({flag('--offline', 'HubOptions(offline=True)')} or HF_HUB_OFFLINE=1)",
            where,
        )


def _api(hub: HubOptions) -> Any:
    from huggingface_hub import HfApi

    from ..version import __version__

    return HfApi(endpoint=_endpoint(), token=hub.token, library_name="mpt-tools", library_version=__version__)


def _call(what: str, where: str, hub: HubOptions, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` with huggingface_hub quiet and its exceptions as one HubError."""
    try:
        with _quiet():
            return fn(*args, **kwargs)
    except HubError as exc:
        if exc.path is None:
            exc.path = where
        raise
    except Exception as exc:
        if _is_hub_exception(exc):
            raise _map_error(exc, where=where, what=what, token=hub.token, offline=False) from None
        if isinstance(exc, (ValueError, TypeError, KeyError, AttributeError)):  # JSON that is not the Hub's
            raise HubError(
                f"the Hub's answer cannot be read ({type(exc).__name__}): a broken or hostile HF_ENDPOINT?", where
            ) from None
        raise


def author_repos(author: str, hub: HubOptions) -> list[str]:
    """The ids of the model repos of ``author`` (a user or an organisation) that the Hub lists as
    PEFT repos (library ``peft``), sorted."""
    _offline_check(hub, author)

    def ids() -> list[str]:
        return sorted(m.id for m in _api(hub).list_models(author=author, filter="peft"))

    return list(_call(f"the models of {author}", author, hub, ids))


def list_repo(repo_id: str, hub: HubOptions) -> RepoListing:
    """``repo_id`` at ``hub.revision`` (default branch when None): its commit and every file with
    its size and LFS sha256 (one request)."""
    _offline_check(hub, repo_id)
    info = _call(
        "the repo listing", repo_id, hub, _api(hub).model_info, repo_id, revision=hub.revision, files_metadata=True
    )
    files: dict[str, RepoFile] = {}
    for sib in info.siblings or []:
        lfs = getattr(sib, "lfs", None)
        sha = getattr(lfs, "sha256", None) if lfs is not None else None
        size = getattr(lfs, "size", None) if lfs is not None else None
        files[sib.rfilename] = RepoFile(sib.rfilename, int(size if size is not None else sib.size or 0), sha)
    return RepoListing(repo_id, str(info.sha), files)


READ_TIMEOUT = 60.0  # seconds without a byte before a ranged read fails (the client's own default is none)


def _get(repo_id: str, commit: str, path: str, hub: HubOptions, first: int, last: int) -> tuple[bytes, int | None]:
    """Bytes ``first..last`` of a file at a commit (fewer when it ends first) and the file's size
    (None when the server did not say)."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    from ..version import __version__

    url = hf_hub_url(repo_id, path, revision=commit, endpoint=_endpoint())
    headers = build_hf_headers(token=hub.token, library_name="mpt-tools", library_version=__version__)
    headers["range"] = f"bytes={first}-{last}"

    def fetch() -> tuple[bytes, int | None]:
        session: Any = get_session()
        if hasattr(session, "stream"):  # httpx (huggingface_hub 1.0 on)
            with session.stream("GET", url, headers=headers, timeout=READ_TIMEOUT) as response:
                if response.status_code >= 400 and response.status_code != 416:
                    response.read()  # the error's text, for its message
                    hf_raise_for_status(response)
                return _ranged(response.status_code, response.headers, response.iter_bytes(), first, last)
        response = session.get(url, headers=headers, stream=True, timeout=READ_TIMEOUT)  # requests (0.x)
        try:
            if response.status_code != 416:
                hf_raise_for_status(response)
            return _ranged(response.status_code, response.headers, response.iter_content(1 << 16), first, last)
        finally:
            response.close()

    return tuple(_call(path, f"{repo_id}@{commit[:12]}/{path}", hub, fetch))  # type: ignore[return-value]


def _ranged(status: int, headers: Any, chunks: Iterator[bytes], first: int, last: int) -> tuple[bytes, int | None]:
    """Bytes ``first..last`` of a streamed answer to a range request, and the file's size (None
    when the server did not say). A 206 holds just the range; a server that ignores ranges (a
    mirror or a proxy) answers 200 with the whole file, which is read only up to ``last`` (not
    into memory whole) and from ``first`` on (its bytes start at 0); 416 is a range past the end
    (an empty file)."""
    content_range = headers.get("content-range", "")
    total_text = content_range.rpartition("/")[2]
    total = int(total_text) if total_text.isdigit() else None
    if status == 206:  # the range sent must be the one asked for (or its start, cut at the file's end)
        sent = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", content_range)
        if sent is None or int(sent.group(1)) != first or int(sent.group(2)) > last:
            raise HubError(f"the Hub answered bytes {first}-{last} with {content_range or 'no Content-Range'!r}")
    if status == 416:
        return b"", total if total is not None else 0
    skip = first if status == 200 else 0
    want = last - first + 1
    if total is None and status == 200:
        length = headers.get("content-length", "")
        total = int(length) if length.isdigit() else None
    got = bytearray()
    for chunk in chunks:
        if skip:
            dropped = min(skip, len(chunk))
            chunk, skip = chunk[dropped:], skip - dropped
        got += chunk[: want - len(got)]
        if len(got) >= want:
            break  # the rest of a whole-file answer is never read
    return bytes(got), total


def read_small(repo_id: str, commit: str, path: str, hub: HubOptions, limit: int) -> bytes:
    """A small file (an adapter config) at a commit, one request; HubError when it is over ``limit``."""
    data, size = _get(repo_id, commit, path, hub, 0, limit)
    if len(data) > limit or (size is not None and size > limit):
        raise HubError(f"{path} is {size or len(data)} bytes, more than a config can be", f"{repo_id}@{commit[:12]}")
    return data


def read_header(repo_id: str, commit: str, path: str, hub: HubOptions) -> tuple[bytes, int]:
    """The JSON header of a safetensors file at a commit, and the file's size: one ranged request
    of the first 100,000 bytes, a second one only for a longer header. HubError when the file is
    too short, or its header claims more than safetensors allows."""
    where = f"hf://{repo_id}@{commit[:12]}/{path}"
    first, size = _get(repo_id, commit, path, hub, 0, FIRST_RANGE)
    if size is None:
        size = len(first)
    if len(first) < 8:
        raise HubError(f"the file is {size} bytes, too short for a safetensors header", where)
    (n,) = struct.unpack("<Q", first[:8])
    if n > MAX_HEADER:
        raise HubError(f"header claims {n} bytes, over the {MAX_HEADER}-byte limit", where)
    if 8 + n > size:
        raise HubError(f"header claims {n} bytes but the file has {size - 8} after the length (truncated?)", where)
    if 8 + n <= len(first):
        return first[8 : 8 + n], size
    rest, _ = _get(repo_id, commit, path, hub, 8, 8 + n - 1)
    if len(rest) != n:
        raise HubError(f"the Hub sent {len(rest)} of the header's {n} bytes", where)
    return rest, size


def download_file(repo_id: str, commit: str, path: str, hub: HubOptions) -> str:
    """One file of a repo at a commit into the Hugging Face cache (``audit --deep`` of a bare
    tensor file); its local path."""
    from .download import HubSpec, _Fetch

    fetch = _Fetch(HubSpec(repo_id, commit), hub.token, hub.cache_dir, offline=False)
    return str(_call(path, f"hf://{repo_id}@{commit[:12]}/{path}", hub, fetch.download, path, commit))


def read_range(repo_id: str, commit: str, path: str, hub: HubOptions, first: int, last: int) -> bytes:
    """Bytes ``first..last`` (inclusive) of a file at a commit: one ranged request (``embed``
    reads the rows of an embedding matrix this way)."""
    data, _ = _get(repo_id, commit, path, hub, first, last)
    if len(data) != last - first + 1:
        raise HubError(f"the Hub sent {len(data)} of {last - first + 1} bytes", f"hf://{repo_id}@{commit[:12]}/{path}")
    return data
