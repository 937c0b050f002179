"""A fake Hugging Face Hub server for tests.

`FakeHub` runs a small HTTP server (stdlib ``ThreadingHTTPServer``) on 127.0.0.1 and
implements the subset of the Hub HTTP API that ``huggingface_hub`` (2.4) uses for
downloading files (``hf_hub_download``, ``snapshot_download``), reading repo metadata
(``model_info``, ``list_repo_tree``, ``list_repo_refs`` ...) and pushing content
(``create_repo``, ``create_commit``, ``upload_file``, ``upload_folder``,
``create_branch``, pull requests).

The real client is pointed at it with ``endpoint=hub.url`` (``HfApi(endpoint=...)``,
``hf_hub_download(..., endpoint=...)``) or, for a fresh interpreter, with the
``HF_ENDPOINT`` environment variable (see `FakeHub.env`). ``huggingface_hub`` reads
``HF_ENDPOINT`` once, at import time, so setting it from inside an already running
test process has no effect.

Xet storage is never offered: downloads carry no ``X-Xet-*`` headers (the client then
uses plain HTTP GET), and the preupload endpoint answers ``"regular"`` so uploaded
content travels inline (base64) in the NDJSON commit payload. Setting
`FakeHub.lfs_upload_threshold` makes preupload answer ``"lfs"`` for big files and
exercises the legacy git-LFS batch API instead; the client only takes that path when
Xet is disabled on its side (``huggingface_hub.constants.HF_HUB_DISABLE_XET = True``),
otherwise it would try a Xet upload, which this server cannot serve.

Example::

    with FakeHub() as hub:
        hub.add_repo("org/model", {"config.json": b"{}"})
        path = hf_hub_download("org/model", "config.json", endpoint=hub.url)

Helpers for pytest: `isolate_hf_environment` (temporary HF_HOME / cache / token, no
telemetry) and `record_retry_sleeps` (makes the client's retry back-off instant).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

__all__ = [
    "FakeHub",
    "RecordedRequest",
    "git_blob_sha1",
    "isolate_hf_environment",
    "record_retry_sleeps",
    "sha256_hex",
]

DEFAULT_GITATTRIBUTES = b"""*.bin filter=lfs diff=lfs merge=lfs -text
*.ckpt filter=lfs diff=lfs merge=lfs -text
*.h5 filter=lfs diff=lfs merge=lfs -text
*.msgpack filter=lfs diff=lfs merge=lfs -text
*.onnx filter=lfs diff=lfs merge=lfs -text
*.pt filter=lfs diff=lfs merge=lfs -text
*.pth filter=lfs diff=lfs merge=lfs -text
*.safetensors filter=lfs diff=lfs merge=lfs -text
"""

_REPO_TYPE_BY_PLURAL = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_API_SUBPATHS = {
    "revision",
    "tree",
    "refs",
    "commits",
    "commit",
    "preupload",
    "paths-info",
    "branch",
    "tag",
    "discussions",
    "xet-read-token",
    "xet-write-token",
    "lfs-files",
    "settings",
}
_HEX_RE = re.compile(r"[0-9a-fA-F]{7,40}")
_EMPTY_AGENT_REGISTRY = {"standardEnvVars": [], "harnesses": {}}


def git_blob_sha1(data: bytes) -> str:
    """Git object id of a blob (what the Hub uses as ETag for non-LFS files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _lfs_pointer(data: bytes) -> bytes:
    return (
        b"version https://git-lfs.github.com/spec/v1\n" + f"oid sha256:{sha256_hex(data)}\nsize {len(data)}\n".encode()
    )


def _now_iso() -> str:
    now = datetime.now(timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


@dataclass(frozen=True)
class RecordedRequest:
    """One request received by the server.

    ``path`` is the raw (still percent-encoded) path without the query string,
    ``query`` the parsed query string, ``headers`` has lower-cased names.
    """

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    host: str = ""

    def json(self) -> Any:
        return json.loads(self.body)

    def ndjson(self) -> list[Any]:
        return [json.loads(line) for line in self.body.splitlines() if line.strip()]

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")


@dataclass
class _Commit:
    oid: str
    parents: tuple[str, ...]
    files: dict[str, str]  # path -> sha256 of the content (key in FakeHub._blobs)
    title: str
    message: str
    author: str
    date: str


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool = False
    gated: bool | str = False
    authorized_users: set[str] | None = None
    branches: dict[str, str] = field(default_factory=dict)  # also holds refs/pr/N
    tags: dict[str, str] = field(default_factory=dict)
    commits: dict[str, _Commit] = field(default_factory=dict)
    discussions: dict[int, dict[str, Any]] = field(default_factory=dict)
    created_at: str = field(default_factory=_now_iso)

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0] if "/" in self.repo_id else ""


@dataclass
class _Fault:
    status: int
    remaining: int
    path: str | None
    method: str | None
    headers: dict[str, str]
    body: bytes | None
    disconnect: bool


class _HubError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}
        self.body = body


@dataclass
class _Response:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


def _json_response(obj: Any, status: int = 200, **headers: str) -> _Response:
    hdrs = {"Content-Type": "application/json; charset=utf-8", **headers}
    return _Response(status, hdrs, json.dumps(obj).encode())


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    hub: FakeHub


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    # HTTP/1.0: one request per connection. Keeps the shared httpx client of
    # huggingface_hub from holding keep-alive connections to a closed server.
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.server.hub._dispatch(self)

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

    def read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size_line = self.rfile.readline().strip()
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline().strip():  # trailers
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""


class FakeHub:
    """In-memory fake of the Hugging Face Hub, served over HTTP on 127.0.0.1.

    Attributes meant to be set by tests:

    * ``valid_tokens``: token -> user name. Unknown bearer tokens get 401.
    * ``orgs``: user name -> organisations the user may write to.
    * ``lfs_suffixes`` / ``lfs_threshold``: which files are served like LFS files
      (ETag = sha256, ``X-Linked-Etag`` / ``X-Linked-Size``, ``lfs`` in listings).
    * ``lfs_upload_threshold``: if set, preupload answers "lfs" for files at least
      this big (the client must have Xet disabled, see module docstring).
    * ``tree_page_size``: page size of tree listings (pagination via Link header).
    * ``models_page_size``: page size of ``/api/models`` listings (the same).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.valid_tokens: dict[str, str] = {"hf_goodtoken": "alice"}
        self.orgs: dict[str, list[str]] = {}
        self.lfs_suffixes: tuple[str, ...] = (
            ".bin",
            ".ckpt",
            ".h5",
            ".msgpack",
            ".onnx",
            ".pt",
            ".pth",
            ".safetensors",
        )
        self.lfs_threshold = 10 * 1024 * 1024
        self.lfs_upload_threshold: int | None = None
        self.tree_page_size = 1000
        self.models_page_size = 1000
        self.bytes_sent = 0  # response body bytes sent (what a test can hold a header-only read to)

        self._lock = threading.RLock()
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._blobs: dict[str, bytes] = {}  # sha256 -> content
        self._cdn_blobs: dict[str, bytes] = {}  # served under /_cdn/<sha256>
        self._requests: list[RecordedRequest] = []
        self._faults: list[_Fault] = []
        self._corrupt: dict[tuple[str, str, str], str] = {}
        self._redirect_target: FakeHub | str | None = None
        self._redirect_lfs_only = False
        self._counter = itertools.count(1)

        self._server = _Server((host, port), _Handler)
        self._server.hub = self
        self.host = host
        self.port = self._server.server_address[1]
        self.url = f"http://{host}:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"FakeHub-{self.port}",
            daemon=True,
        )
        self._closed = False
        self._thread.start()

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> FakeHub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop serving and release the port (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __repr__(self) -> str:
        return f"FakeHub(url={self.url!r}, repos={sorted(r for _, r in self._repos)})"

    def env(self, **extra: str) -> dict[str, str]:
        """Environment variables pointing a *new* Python process at this server."""
        return {
            "HF_ENDPOINT": self.url,
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            **extra,
        }

    # ------------------------------------------------------------------ test setup

    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes | str] | None = None,
        *,
        private: bool = False,
        gated: bool | str = False,
        branch: str = "main",
        repo_type: str = "model",
        authorized_users: set[str] | list[str] | None = None,
        commit_message: str = "initial commit",
    ) -> str:
        """Create a repo whose first commit (on ``branch``) holds exactly ``files``.

        ``gated`` may be True (stored as "auto") or "auto"/"manual". Private and gated
        repos are readable by every valid token, or only by ``authorized_users`` if
        given. Returns the commit id.
        """
        with self._lock:
            key = (repo_type, repo_id)
            if key in self._repos:
                raise ValueError(f"{repo_type} repo {repo_id} already exists")
            repo = _Repo(
                repo_type=repo_type,
                repo_id=repo_id,
                private=private,
                gated="auto" if gated is True else gated,
                authorized_users=set(authorized_users) if authorized_users is not None else None,
            )
            self._repos[key] = repo
            oid = self._new_commit(repo, None, _encode_files(files or {}), commit_message, "", "fakehub")
            repo.branches[branch] = oid
            return oid

    def add_commit(
        self,
        repo_id: str,
        files: dict[str, bytes | str] | None = None,
        branch: str = "main",
        *,
        deletions: tuple[str, ...] | list[str] = (),
        repo_type: str = "model",
        message: str = "update",
    ) -> str:
        """Commit ``files`` (added/overwritten) and ``deletions`` on ``branch``
        (created from the default branch if missing). Returns the commit id."""
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            parent = repo.branches.get(branch) or repo.branches.get("main")
            content = dict(repo.commits[parent].files) if parent else {}
            for path, data in _encode_files(files or {}).items():
                content[path] = self._put_blob(data)
            for path in deletions:
                content.pop(path)
            oid = self._new_commit_from_tree(repo, parent, content, message, "", "fakehub")
            repo.branches[branch] = oid
            return oid

    def add_branch(self, repo_id: str, branch: str, revision: str = "main", *, repo_type: str = "model") -> str:
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            repo.branches[branch] = self._resolve(repo, revision)
            return repo.branches[branch]

    def add_tag(self, repo_id: str, tag: str, revision: str = "main", *, repo_type: str = "model") -> str:
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            repo.tags[tag] = self._resolve(repo, revision)
            return repo.tags[tag]

    def set_repo(
        self,
        repo_id: str,
        *,
        repo_type: str = "model",
        private: bool | None = None,
        gated: bool | str | None = None,
        authorized_users: set[str] | list[str] | None = None,
    ) -> None:
        """Change visibility / gating / access list of an existing repo."""
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            if private is not None:
                repo.private = private
            if gated is not None:
                repo.gated = "auto" if gated is True else gated
            if authorized_users is not None:
                repo.authorized_users = set(authorized_users)

    # ------------------------------------------------------------------ inspection

    def repo_exists(self, repo_id: str, *, repo_type: str = "model") -> bool:
        with self._lock:
            return (repo_type, repo_id) in self._repos

    def files(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> dict[str, bytes]:
        """Content of the repo at ``revision`` (branch, tag, refs/pr/N or commit id)."""
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            commit = repo.commits[self._resolve(repo, revision)]
            return {p: self._blobs[s] for p, s in sorted(commit.files.items())}

    def head(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> str:
        """Commit id that ``revision`` points to."""
        with self._lock:
            return self._resolve(self._get_repo(repo_type, repo_id), revision)

    def refs(self, repo_id: str, *, repo_type: str = "model") -> dict[str, str]:
        """Branches (including refs/pr/N) and tags (as refs/tags/X) -> commit id."""
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            out = dict(repo.branches)
            out.update({f"refs/tags/{t}": c for t, c in repo.tags.items()})
            return out

    def commit_info(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> dict[str, Any]:
        """title, message, author, parents, date and file paths of a commit."""
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            c = repo.commits[self._resolve(repo, revision)]
            return {
                "oid": c.oid,
                "title": c.title,
                "message": c.message,
                "author": c.author,
                "parents": list(c.parents),
                "date": c.date,
                "files": sorted(c.files),
            }

    def pull_requests(self, repo_id: str, *, repo_type: str = "model") -> list[dict[str, Any]]:
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            return [dict(d) for d in repo.discussions.values() if d["isPullRequest"]]

    @property
    def requests(self) -> list[RecordedRequest]:
        """Snapshot of the recorded requests (oldest first)."""
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()
            self.bytes_sent = 0

    def find_requests(self, method: str | None = None, path_contains: str | None = None) -> list[RecordedRequest]:
        """Recorded requests filtered by method and by a substring of the path
        (matched against both the raw and the percent-decoded path)."""
        return [
            r
            for r in self.requests
            if (method is None or r.method == method.upper())
            and (path_contains is None or path_contains in r.path or path_contains in unquote(r.path))
        ]

    # ------------------------------------------------------------------ faults

    def fail_next(
        self,
        status: int = 500,
        count: int = 1,
        *,
        path: str | None = None,
        method: str | None = None,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        disconnect: bool = False,
    ) -> None:
        """Answer the next ``count`` matching requests with ``status``.

        ``path`` is a substring of the raw or decoded request path, ``method`` an
        HTTP method; ``None`` matches anything. ``disconnect=True`` closes the
        connection without any response instead (a network error client-side).
        """
        with self._lock:
            self._faults.append(
                _Fault(
                    status=status,
                    remaining=count,
                    path=path,
                    method=method.upper() if method else None,
                    headers=dict(headers or {}),
                    body=body,
                    disconnect=disconnect,
                )
            )

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def redirect_files_to(self, target: FakeHub | str | None, *, lfs_only: bool = False) -> None:
        """Make ``/resolve/`` answer 302 to ``<target>/_cdn/<sha256>`` (a "CDN").

        With a `FakeHub` target the served bytes are registered on it, so it can
        answer the redirected GET. With a URL string the target must serve that path
        itself (e.g. a FakeHub whose `put_blob` got the content). The redirect carries
        ``X-Repo-Commit``, ``ETag``/``X-Linked-Etag`` and ``X-Linked-Size`` like the
        real Hub does for LFS files. ``None`` switches redirects off.
        """
        with self._lock:
            self._redirect_target = target
            self._redirect_lfs_only = lfs_only

    def put_blob(self, data: bytes, sha256: str | None = None) -> str:
        """Serve ``data`` under ``/_cdn/<sha256>`` (sha256 of data unless given)."""
        key = sha256 or sha256_hex(data)
        with self._lock:
            self._cdn_blobs[key] = data
        return key

    def corrupt(self, repo_id: str, path: str, mode: str = "truncate", *, repo_type: str = "model") -> None:
        """Serve wrong bytes for ``path`` on GET while HEAD metadata stays correct.

        ``mode``: "truncate" (one byte short), "extend" (one extra byte) -> the size
        no longer matches ``Content-Length``/``X-Linked-Size`` of the HEAD call; "flip"
        (same size, first byte flipped) -> only the hash differs from the ETag.
        ``Content-Length`` of the GET always matches the (wrong) body actually sent.
        """
        if mode not in ("truncate", "extend", "flip"):
            raise ValueError(f"unknown corruption mode {mode!r}")
        with self._lock:
            self._corrupt[(repo_type, repo_id, path)] = mode

    def uncorrupt(self, repo_id: str, path: str, *, repo_type: str = "model") -> None:
        with self._lock:
            self._corrupt.pop((repo_type, repo_id, path), None)

    # ------------------------------------------------------------------ internals: storage

    def _get_repo(self, repo_type: str, repo_id: str) -> _Repo:
        try:
            return self._repos[(repo_type, repo_id)]
        except KeyError:
            raise KeyError(f"no {repo_type} repo {repo_id!r} on {self.url}") from None

    def _put_blob(self, data: bytes) -> str:
        key = sha256_hex(data)
        self._blobs[key] = data
        return key

    def _new_commit(
        self,
        repo: _Repo,
        parent: str | None,
        files: dict[str, bytes],
        title: str,
        message: str,
        author: str,
    ) -> str:
        tree = {path: self._put_blob(data) for path, data in files.items()}
        return self._new_commit_from_tree(repo, parent, tree, title, message, author)

    def _new_commit_from_tree(
        self,
        repo: _Repo,
        parent: str | None,
        tree: dict[str, str],
        title: str,
        message: str,
        author: str,
    ) -> str:
        seed = json.dumps([repo.repo_id, parent, sorted(tree.items()), title, next(self._counter)])
        oid = hashlib.sha1(seed.encode()).hexdigest()
        repo.commits[oid] = _Commit(
            oid=oid,
            parents=(parent,) if parent else (),
            files=dict(tree),
            title=title,
            message=message,
            author=author,
            date=_now_iso(),
        )
        return oid

    def _resolve(self, repo: _Repo, revision: str) -> str:
        rev = revision
        if rev in repo.branches:
            return repo.branches[rev]
        if rev.startswith("refs/heads/") and rev[11:] in repo.branches:
            return repo.branches[rev[11:]]
        if rev.startswith("refs/tags/"):
            rev = rev[10:]
        if rev in repo.tags:
            return repo.tags[rev]
        if _HEX_RE.fullmatch(rev):
            matches = [oid for oid in repo.commits if oid.startswith(rev.lower())]
            if len(matches) == 1:
                return matches[0]
        raise _HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")

    def _is_lfs(self, path: str, size: int) -> bool:
        return path.endswith(self.lfs_suffixes) or size >= self.lfs_threshold

    def _base_url(self, repo: _Repo) -> str:
        return f"{self.url}/{_URL_PREFIX[repo.repo_type]}{repo.repo_id}"

    # ------------------------------------------------------------------ internals: auth

    def _user(self, req: RecordedRequest) -> str | None:
        auth = req.headers.get("authorization")
        if not auth:
            return None
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else auth.strip()
        user = self.valid_tokens.get(token)
        if user is None:
            raise _HubError(401, "Invalid credentials in Authorization header")
        return user

    def _has_access(self, repo: _Repo, user: str | None) -> bool:
        if user is None:
            return False
        if repo.authorized_users is None:
            return True
        return user in repo.authorized_users or self._can_write_ns(user, repo.namespace)

    def _can_write_ns(self, user: str, namespace: str) -> bool:
        return namespace == user or namespace in self.orgs.get(user, [])

    def _repo_not_found(self, user: str | None) -> _HubError:
        return _HubError(
            401 if user is None else 404,
            "Repository not found",
            code="RepoNotFound",
        )

    def _read_repo(self, repo_type: str, repo_id: str, user: str | None, *, files: bool) -> _Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise self._repo_not_found(user)
        if repo.private and not self._has_access(repo, user):
            raise self._repo_not_found(user)
        if files and repo.gated and not self._has_access(repo, user):
            if user is None:
                raise _HubError(
                    401,
                    f"Access to {repo_type} {repo_id} is restricted. You must have access to"
                    " it and be authenticated to access it. Please log in.",
                    code="GatedRepo",
                )
            raise _HubError(
                403,
                f"Access to {repo_type} {repo_id} is restricted and you are not in the"
                " authorized list. Visit the repo page to ask for access.",
                code="GatedRepo",
            )
        return repo

    def _write_repo(self, repo_type: str, repo_id: str, user: str | None, *, pr: bool = False) -> _Repo:
        repo = self._read_repo(repo_type, repo_id, user, files=True)
        if user is None:
            raise _HubError(401, "You must be authenticated to write to this repository")
        if not pr and not self._can_write_ns(user, repo.namespace):
            raise _HubError(403, f"You don't have the rights to write to {repo_type}s/{repo_id}")
        return repo

    # ------------------------------------------------------------------ internals: HTTP

    def _dispatch(self, handler: _Handler) -> None:
        split = urlsplit(handler.path)
        body = handler.read_body()
        req = RecordedRequest(
            method=handler.command,
            path=split.path,
            query=parse_qs(split.query, keep_blank_values=True),
            headers={k.lower(): v for k, v in handler.headers.items()},
            body=body,
            host=self.url,
        )
        with self._lock:
            self._requests.append(req)
            fault = self._take_fault(req)
        if fault is not None and fault.disconnect:
            handler.close_connection = True
            return
        if fault is not None:
            fault_body = fault.body
            if fault_body is None:
                fault_body = json.dumps({"error": f"Injected fault {fault.status}"}).encode()
            resp = _Response(
                fault.status,
                {"Content-Type": "application/json", **fault.headers},
                fault_body,
            )
        else:
            try:
                with self._lock:
                    resp = self._route(req)
            except _HubError as err:
                resp = self._error_response(err)
            except Exception as err:  # pragma: no cover - bug in the fake itself
                resp = _json_response({"error": f"FakeHub internal error: {err!r}"}, 500)
        with self._lock:
            if req.method != "HEAD":
                self.bytes_sent += len(resp.body)
        self._send(handler, req, resp)

    def _take_fault(self, req: RecordedRequest) -> _Fault | None:
        for fault in self._faults:
            if fault.method and fault.method != req.method:
                continue
            if fault.path and fault.path not in req.path and fault.path not in unquote(req.path):
                continue
            fault.remaining -= 1
            if fault.remaining <= 0:
                self._faults.remove(fault)
            return fault
        return None

    @staticmethod
    def _error_response(err: _HubError) -> _Response:
        headers = {"X-Error-Message": err.message, **err.headers}
        if err.code:
            headers["X-Error-Code"] = err.code
        return _json_response(err.body or {"error": err.message}, err.status, **headers)

    @staticmethod
    def _send(handler: _Handler, req: RecordedRequest, resp: _Response) -> None:
        try:
            handler.send_response(resp.status)
            headers = dict(resp.headers)
            headers.setdefault("Content-Length", str(len(resp.body)))
            headers.setdefault("X-Request-Id", f"fakehub-{id(req):x}")
            for name, value in headers.items():
                handler.send_header(name, value)
            handler.end_headers()
            if req.method != "HEAD" and resp.body:
                handler.wfile.write(resp.body)
        except (BrokenPipeError, ConnectionResetError):  # client went away
            pass

    def _route(self, req: RecordedRequest) -> _Response:
        segs = [s for s in req.path.split("/") if s != ""]
        if not segs:
            return _json_response({"fakehub": True})
        if segs[0] == "api":
            return self._route_api(req, segs[1:])
        if segs[0] == "_cdn" and len(segs) == 2 and req.method in ("GET", "HEAD"):
            return self._serve_cdn(req, segs[1])
        if segs[0] == "_lfs" and len(segs) >= 2:
            return self._lfs_object(req, segs[1:])

        repo_type = "model"
        rest = segs
        if segs[0] in ("datasets", "spaces") and len(segs) > 1:
            repo_type = _REPO_TYPE_BY_PLURAL[segs[0]]
            rest = segs[1:]
        if req.method in ("GET", "HEAD"):
            candidates = []
            if len(rest) >= 4 and rest[2] == "resolve":
                candidates.append(2)
            if len(rest) >= 3 and rest[1] == "resolve":
                candidates.append(1)
            if candidates:
                idx = candidates[0]
                for c in candidates:
                    if (repo_type, "/".join(unquote(s) for s in rest[:c])) in self._repos:
                        idx = c
                        break
                repo_id = "/".join(unquote(s) for s in rest[:idx])
                return self._resolve_file(req, repo_type, repo_id, rest[idx + 1 :])
        joined = "/".join(rest)
        if joined.endswith(".git/info/lfs/objects/batch") and req.method == "POST":
            repo_id = unquote(joined[: -len(".git/info/lfs/objects/batch")])
            return self._lfs_batch(req, repo_type, repo_id)
        raise _HubError(404, f"Not found: {req.path}")

    def _route_api(self, req: RecordedRequest, segs: list[str]) -> _Response:
        m = req.method
        if segs == ["whoami-v2"] and m == "GET":
            return self._whoami(req)
        if segs == ["agent-harnesses"] and m == "GET":
            return _json_response(_EMPTY_AGENT_REGISTRY)
        if segs == ["validate-yaml"] and m == "POST":
            return self._validate_yaml(req)
        if segs == ["models"] and m == "GET":
            return self._list_models(req)
        if segs == ["repos", "create"] and m == "POST":
            return self._create_repo(req)
        if segs == ["repos", "delete"] and m == "DELETE":
            return self._delete_repo(req)
        if segs and segs[0] in _REPO_TYPE_BY_PLURAL and len(segs) >= 2:
            repo_type = _REPO_TYPE_BY_PLURAL[segs[0]]
            repo_id, rest = self._split_repo_id(repo_type, segs[1:])
            return self._route_repo_api(req, repo_type, repo_id, rest)
        raise _HubError(404, f"Not found: {req.path}")

    def _split_repo_id(self, repo_type: str, segs: list[str]) -> tuple[str, list[str]]:
        parts = [unquote(s) for s in segs]
        if len(parts) >= 2 and (repo_type, f"{parts[0]}/{parts[1]}") in self._repos:
            return f"{parts[0]}/{parts[1]}", segs[2:]
        if (repo_type, parts[0]) in self._repos:
            return parts[0], segs[1:]
        if len(parts) >= 2 and parts[1] not in _API_SUBPATHS:
            return f"{parts[0]}/{parts[1]}", segs[2:]
        return parts[0], segs[1:]

    @staticmethod
    def _split_revision(segs: list[str]) -> tuple[str, list[str]]:
        """First revision in ``segs`` (may be percent-encoded or a raw refs/pr/N)."""
        if not segs:
            return "main", []
        if segs[0] == "refs" and len(segs) >= 3 and segs[1] in ("pr", "heads", "tags"):
            return "/".join(segs[:3]), segs[3:]
        return unquote(segs[0]), segs[1:]

    def _route_repo_api(self, req: RecordedRequest, repo_type: str, repo_id: str, rest: list[str]) -> _Response:
        m = req.method
        user = self._user(req)
        if not rest and m == "GET":
            return self._repo_info(req, repo_type, repo_id, "main", user)
        head, tail = rest[0] if rest else "", rest[1:]
        if head == "revision" and m == "GET":
            revision, _ = self._split_revision(tail)
            return self._repo_info(req, repo_type, repo_id, revision, user)
        if head == "tree" and m == "GET":
            revision, path_segs = self._split_revision(tail)
            path = "/".join(unquote(s) for s in path_segs).strip("/")
            return self._tree(req, repo_type, repo_id, revision, path, user)
        if head == "paths-info" and m == "POST":
            revision, _ = self._split_revision(tail)
            return self._paths_info(req, repo_type, repo_id, revision, user)
        if head == "refs" and m == "GET":
            return self._list_refs(req, repo_type, repo_id, user)
        if head == "commits" and m == "GET":
            revision, _ = self._split_revision(tail)
            return self._list_commits(repo_type, repo_id, revision, user)
        if head == "preupload" and m == "POST":
            revision, _ = self._split_revision(tail)
            return self._preupload(req, repo_type, repo_id, revision, user)
        if head == "commit" and m == "POST":
            revision, _ = self._split_revision(tail)
            return self._commit(req, repo_type, repo_id, revision, user)
        if head == "branch" and m in ("POST", "DELETE"):
            branch, _ = self._split_revision(tail)
            return self._branch(req, repo_type, repo_id, branch, user)
        if head == "tag" and m == "POST":
            revision, _ = self._split_revision(tail)
            return self._create_tag(req, repo_type, repo_id, revision, user)
        if head == "discussions" and m == "POST" and not tail:
            return self._create_discussion(req, repo_type, repo_id, user)
        if head == "discussions" and m == "GET" and len(tail) == 1:
            return self._discussion_details(repo_type, repo_id, int(tail[0]), user)
        if head in ("xet-read-token", "xet-write-token"):
            raise _HubError(501, "FakeHub does not implement Xet storage")
        raise _HubError(404, f"Not found: {req.path}")

    # ------------------------------------------------------------------ endpoints: files

    def _resolve_file(self, req: RecordedRequest, repo_type: str, repo_id: str, segs: list[str]) -> _Response:
        user = self._user(req)
        repo = self._read_repo(repo_type, repo_id, user, files=True)
        revision, path_segs = self._split_revision(segs)
        commit_oid = self._resolve(repo, revision)
        path = unquote("/".join(path_segs))
        commit = repo.commits[commit_oid]
        if path not in commit.files:
            raise _HubError(
                404,
                "Entry not found",
                code="EntryNotFound",
                headers={"X-Repo-Commit": commit_oid},
            )
        blob_sha = commit.files[path]
        data = self._blobs[blob_sha]
        lfs = self._is_lfs(path, len(data))
        etag = blob_sha if lfs else git_blob_sha1(data)
        headers = {
            "X-Repo-Commit": commit_oid,
            "ETag": f'"{etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f'inline; filename="{path.rsplit("/", 1)[-1]}"',
        }
        if lfs:
            headers["X-Linked-Etag"] = f'"{etag}"'
            headers["X-Linked-Size"] = str(len(data))

        served = _corrupt_bytes(data, self._corrupt.get((repo_type, repo_id, path)))
        target = self._redirect_target
        if target is not None and (lfs or not self._redirect_lfs_only):
            if isinstance(target, FakeHub):
                target.put_blob(served, blob_sha)
                base = target.url
            else:
                base = target.rstrip("/")
            headers.setdefault("X-Linked-Etag", f'"{etag}"')
            headers.setdefault("X-Linked-Size", str(len(data)))
            headers["Location"] = f"{base}/_cdn/{blob_sha}"
            return _Response(302, headers, b"")
        if req.method == "HEAD":
            headers["Content-Length"] = str(len(data))
            return _Response(200, headers, b"")
        return _ranged(req, served, headers)

    def _serve_cdn(self, req: RecordedRequest, key: str) -> _Response:
        data = self._cdn_blobs.get(key)
        if data is None:
            data = self._blobs.get(key)
        if data is None:
            return _Response(404, {"Content-Type": "text/plain"}, b"NoSuchKey")
        headers = {"Content-Type": "application/octet-stream", "ETag": f'"{key}"'}
        if req.method == "HEAD":
            headers["Content-Length"] = str(len(data))
            return _Response(200, headers, b"")
        return _ranged(req, data, headers)

    # ------------------------------------------------------------------ endpoints: info

    def _file_entry(self, repo: _Repo, commit: _Commit, path: str, expand: bool) -> dict[str, Any]:
        data = self._blobs[commit.files[path]]
        entry: dict[str, Any] = {"type": "file", "path": path, "size": len(data)}
        if self._is_lfs(path, len(data)):
            pointer = _lfs_pointer(data)
            entry["oid"] = git_blob_sha1(pointer)
            entry["lfs"] = {
                "oid": sha256_hex(data),
                "size": len(data),
                "pointerSize": len(pointer),
            }
        else:
            entry["oid"] = git_blob_sha1(data)
        if expand:
            entry["lastCommit"] = self._last_commit(repo, commit, path, is_dir=False)
        return entry

    def _dir_entry(self, repo: _Repo, commit: _Commit, path: str, expand: bool) -> dict[str, Any]:
        prefix = path + "/"
        listing = sorted((p, s) for p, s in commit.files.items() if p.startswith(prefix))
        entry: dict[str, Any] = {
            "type": "directory",
            "path": path,
            "size": 0,
            "oid": hashlib.sha1(json.dumps(listing).encode()).hexdigest(),
        }
        if expand:
            entry["lastCommit"] = self._last_commit(repo, commit, path, is_dir=True)
        return entry

    def _last_commit(self, repo: _Repo, commit: _Commit, path: str, *, is_dir: bool) -> dict[str, str]:
        def state(c: _Commit) -> Any:
            if is_dir:
                return sorted((p, s) for p, s in c.files.items() if p.startswith(path + "/"))
            return c.files.get(path)

        current = commit
        while current.parents:
            parent = repo.commits[current.parents[0]]
            if state(parent) != state(current):
                break
            current = parent
        return {"id": current.oid, "title": current.title, "date": current.date}

    def _repo_info(
        self,
        req: RecordedRequest,
        repo_type: str,
        repo_id: str,
        revision: str,
        user: str | None,
    ) -> _Response:
        repo = self._read_repo(repo_type, repo_id, user, files=False)
        commit = repo.commits[self._resolve(repo, revision)]
        blobs = req.query.get("blobs", ["false"])[-1].lower() in ("1", "true")
        siblings = []
        for path in sorted(commit.files):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                entry = self._file_entry(repo, commit, path, expand=False)
                sibling["size"] = entry["size"]
                sibling["blobId"] = entry["oid"]
                if "lfs" in entry:
                    sibling["lfs"] = {
                        "sha256": entry["lfs"]["oid"],
                        "size": entry["lfs"]["size"],
                        "pointerSize": entry["lfs"]["pointerSize"],
                    }
            siblings.append(sibling)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(f"{repo_type}/{repo_id}".encode()).hexdigest()[:24],
            "id": repo_id,
            "author": repo.namespace or None,
            "sha": commit.oid,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": repo.gated,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(len(self._blobs[s]) for s in commit.files.values()),
        }
        if repo_type == "model":
            info["modelId"] = repo_id
        return _json_response(info)

    def _list_models(self, req: RecordedRequest) -> _Response:
        """``GET /api/models``: the model repos visible to the caller, filtered by ``author`` and
        by ``filter`` tags (a repo is tagged ``peft`` when its main branch has an
        adapter_config.json, as the Hub detects the library), ``limit`` per page, pages linked
        by a ``Link: rel="next"`` header with a cursor, as the Hub paginates."""
        user = self._user(req)
        author = req.query.get("author", [None])[-1]
        wanted = set(req.query.get("filter", []))
        found = []
        for (repo_type, repo_id), repo in sorted(self._repos.items()):
            if repo_type != "model" or (author is not None and repo.namespace != author):
                continue
            if not self._has_access(repo, user) and repo.private:
                continue
            commit = repo.commits[repo.branches.get("main") or next(iter(repo.branches.values()))]
            tags = ["peft"] if any(p.rpartition("/")[2] == "adapter_config.json" for p in commit.files) else []
            if wanted - set(tags):
                continue
            found.append(
                {
                    "_id": hashlib.sha1(f"model/{repo_id}".encode()).hexdigest()[:24],
                    "id": repo_id,
                    "modelId": repo_id,
                    "private": repo.private,
                    "tags": tags,
                    "library_name": "peft" if tags else None,
                    "sha": commit.oid,
                    "createdAt": repo.created_at,
                }
            )
        cursor = int(req.query.get("cursor", ["0"])[-1] or 0)
        page_size = max(1, int(req.query.get("limit", [str(self.models_page_size)])[-1]))
        page = found[cursor : cursor + page_size]
        headers = {}
        if cursor + page_size < len(found):
            query = [(k, v) for k, vs in req.query.items() if k != "cursor" for v in vs]
            query.append(("cursor", str(cursor + page_size)))
            headers["Link"] = f'<{self.url}{req.path}?{urlencode(query)}>; rel="next"'
        return _json_response(page, **headers)

    def _tree(
        self,
        req: RecordedRequest,
        repo_type: str,
        repo_id: str,
        revision: str,
        path: str,
        user: str | None,
    ) -> _Response:
        repo = self._read_repo(repo_type, repo_id, user, files=False)
        commit = repo.commits[self._resolve(repo, revision)]
        recursive = req.query.get("recursive", ["false"])[-1].lower() in ("1", "true")
        expand = req.query.get("expand", ["false"])[-1].lower() in ("1", "true")
        prefix = f"{path}/" if path else ""
        under = [p for p in commit.files if p.startswith(prefix)]
        if path and not under:
            raise _HubError(
                404,
                f"Entry not found: {path}",
                code="EntryNotFound",
                headers={"X-Repo-Commit": commit.oid},
            )
        dirs: set[str] = set()
        files: list[str] = []
        for p in under:
            rel_parts = p[len(prefix) :].split("/")
            if len(rel_parts) == 1:
                files.append(p)
                continue
            if recursive:
                files.append(p)
                for i in range(1, len(rel_parts)):
                    dirs.add(prefix + "/".join(rel_parts[:i]))
            else:
                dirs.add(prefix + rel_parts[0])
        entries = [self._dir_entry(repo, commit, d, expand) for d in sorted(dirs)]
        entries += [self._file_entry(repo, commit, f, expand) for f in sorted(files)]

        cursor = int(req.query.get("cursor", ["0"])[-1] or 0)
        page_size = max(1, self.tree_page_size)
        page = entries[cursor : cursor + page_size]
        headers = {}
        if cursor + page_size < len(entries):
            query = urlencode(
                {
                    "recursive": str(recursive).lower(),
                    "expand": str(expand).lower(),
                    "cursor": cursor + page_size,
                }
            )
            headers["Link"] = f'<{self.url}{req.path}?{query}>; rel="next"'
        return _json_response(page, **headers)

    def _paths_info(
        self,
        req: RecordedRequest,
        repo_type: str,
        repo_id: str,
        revision: str,
        user: str | None,
    ) -> _Response:
        repo = self._read_repo(repo_type, repo_id, user, files=False)
        commit = repo.commits[self._resolve(repo, revision)]
        if "json" in req.headers.get("content-type", ""):
            form = {k: v if isinstance(v, list) else [v] for k, v in req.json().items()}
            form = {k: [str(x) for x in v] for k, v in form.items()}
        else:
            form = parse_qs(req.body.decode(), keep_blank_values=True)
        expand = form.get("expand", ["false"])[-1].lower() in ("1", "true")
        out = []
        for path in form.get("paths", []):
            path = path.strip("/")
            if path in commit.files:
                out.append(self._file_entry(repo, commit, path, expand))
            elif any(p.startswith(path + "/") for p in commit.files):
                out.append(self._dir_entry(repo, commit, path, expand))
        return _json_response(out)

    def _list_refs(self, req: RecordedRequest, repo_type: str, repo_id: str, user: str | None) -> _Response:
        repo = self._read_repo(repo_type, repo_id, user, files=False)
        branches = [
            {"name": b, "ref": f"refs/heads/{b}", "targetCommit": c}
            for b, c in repo.branches.items()
            if not b.startswith("refs/")
        ]
        tags = [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": c} for t, c in repo.tags.items()]
        out: dict[str, Any] = {"branches": branches, "tags": tags, "converts": []}
        if req.query.get("include_prs"):
            out["pullRequests"] = [
                {"name": b, "ref": b, "targetCommit": c} for b, c in repo.branches.items() if b.startswith("refs/pr/")
            ]
        return _json_response(out)

    def _list_commits(self, repo_type: str, repo_id: str, revision: str, user: str | None) -> _Response:
        repo = self._read_repo(repo_type, repo_id, user, files=False)
        oid: str | None = self._resolve(repo, revision)
        out = []
        while oid:
            c = repo.commits[oid]
            out.append(
                {
                    "id": c.oid,
                    "title": c.title,
                    "message": c.message,
                    "date": c.date,
                    "authors": [{"user": c.author}],
                }
            )
            oid = c.parents[0] if c.parents else None
        return _json_response(out)

    def _whoami(self, req: RecordedRequest) -> _Response:
        user = self._user(req)
        if user is None:
            raise _HubError(401, "Invalid credentials in Authorization header")
        return _json_response(
            {
                "type": "user",
                "id": hashlib.sha1(user.encode()).hexdigest()[:24],
                "name": user,
                "fullname": user.title(),
                "email": f"{user}@example.invalid",
                "emailVerified": True,
                "isPro": False,
                "orgs": [{"type": "org", "name": o} for o in self.orgs.get(user, [])],
                "auth": {
                    "type": "access_token",
                    "accessToken": {"displayName": "fakehub", "role": "write"},
                },
            }
        )

    def _validate_yaml(self, req: RecordedRequest) -> _Response:
        payload = req.json()
        content = payload.get("content") or ""
        errors: list[dict[str, str]] = []
        match = re.match(r"\A\s*---\s*\n(.*?)\n---\s*(\n|\Z)", content, re.DOTALL)
        if match:
            try:
                import yaml

                data = yaml.safe_load(match.group(1))
                if data is not None and not isinstance(data, dict):
                    errors.append({"message": "Metadata must be a YAML mapping"})
            except ImportError:  # pragma: no cover - pyyaml missing
                pass
            except Exception as err:  # yaml.YAMLError
                errors.append({"message": f"Invalid YAML: {err}"})
        if errors:
            return _json_response({"errors": errors, "warnings": []}, 400)
        return _json_response({"errors": [], "warnings": []})

    # ------------------------------------------------------------------ endpoints: write

    def _create_repo(self, req: RecordedRequest) -> _Response:
        user = self._user(req)
        if user is None:
            raise _HubError(401, "Invalid username or password.")
        payload = req.json()
        name = payload.get("name")
        if not name:
            raise _HubError(400, "Missing repo name")
        namespace = payload.get("organization") or user
        repo_type = payload.get("type") or "model"
        if repo_type not in _URL_PREFIX:
            raise _HubError(400, f"Unsupported repo type {repo_type}")
        repo_id = f"{namespace}/{name}"
        url = f"{self.url}/{_URL_PREFIX[repo_type]}{repo_id}"
        if (repo_type, repo_id) in self._repos:
            raise _HubError(
                409,
                f"You already created this {repo_type} repo",
                body={"error": f"You already created this {repo_type} repo", "url": url},
            )
        if not self._can_write_ns(user, namespace):
            raise _HubError(403, f"You don't have the rights to create a repo in {namespace}")
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        repo = _Repo(repo_type=repo_type, repo_id=repo_id, private=private)
        self._repos[(repo_type, repo_id)] = repo
        repo.branches["main"] = self._new_commit(
            repo, None, {".gitattributes": DEFAULT_GITATTRIBUTES}, "initial commit", "", user
        )
        return _json_response({"url": url, "name": repo_id, "id": repo.created_at})

    def _delete_repo(self, req: RecordedRequest) -> _Response:
        user = self._user(req)
        payload = req.json()
        namespace = payload.get("organization") or user
        repo_type = payload.get("type") or "model"
        repo_id = f"{namespace}/{payload.get('name')}"
        self._write_repo(repo_type, repo_id, user)
        del self._repos[(repo_type, repo_id)]
        return _json_response({})

    def _preupload(
        self,
        req: RecordedRequest,
        repo_type: str,
        repo_id: str,
        revision: str,
        user: str | None,
    ) -> _Response:
        create_pr = req.query.get("create_pr", ["0"])[-1] == "1"
        repo = self._write_repo(repo_type, repo_id, user, pr=create_pr or _is_pr(revision))
        commit = repo.commits[self._resolve(repo, revision)]
        out = []
        for f in req.json().get("files", []):
            path, size = f["path"], int(f.get("size", 0))
            mode = "regular"
            if self.lfs_upload_threshold is not None and size >= self.lfs_upload_threshold:
                mode = "lfs"
            entry: dict[str, Any] = {"path": path, "uploadMode": mode, "shouldIgnore": False}
            if path in commit.files:
                data = self._blobs[commit.files[path]]
                entry["oid"] = sha256_hex(data) if mode == "lfs" else git_blob_sha1(data)
            out.append(entry)
        return _json_response({"files": out, "commitOid": commit.oid})

    def _commit(
        self,
        req: RecordedRequest,
        repo_type: str,
        repo_id: str,
        revision: str,
        user: str | None,
    ) -> _Response:
        create_pr = req.query.get("create_pr", ["0"])[-1] == "1"
        repo = self._write_repo(repo_type, repo_id, user, pr=create_pr or _is_pr(revision))
        assert user is not None
        try:
            items = [json.loads(line) for line in req.body.splitlines() if line.strip()]
        except ValueError as err:
            raise _HubError(400, f"Invalid NDJSON payload: {err}") from None
        header = next((i["value"] for i in items if i.get("key") == "header"), None)
        if header is None or not header.get("summary"):
            raise _HubError(400, "Missing commit header / summary")
        parent_commit = header.get("parentCommit")

        if create_pr:
            base_head = self._resolve(repo, revision)
            if parent_commit:
                base_head = self._resolve(repo, parent_commit)
            ref = None
        else:
            branch = revision[11:] if revision.startswith("refs/heads/") else revision
            if branch not in repo.branches:
                raise _HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
            base_head = repo.branches[branch]
            if parent_commit and not base_head.startswith(parent_commit.lower()):
                raise _HubError(
                    412,
                    f"A commit has happened since {parent_commit}. Please refresh and try again.",
                )
            ref = branch

        tree = dict(repo.commits[base_head].files)
        new_blobs: dict[str, bytes] = {}
        for item in items:
            key, value = item.get("key"), item.get("value") or {}
            if key == "header":
                continue
            path = value.get("path", "")
            if key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise _HubError(400, f"Unsupported encoding for {path}")
                data = base64.b64decode(value.get("content", ""))
                sha = sha256_hex(data)
                new_blobs[sha] = data
                tree[path] = sha
            elif key == "lfsFile":
                oid = value.get("oid", "")
                if oid not in self._blobs:
                    raise _HubError(422, f"LFS object {oid} for {path} was not uploaded to FakeHub")
                tree[path] = oid
            elif key == "deletedFile":
                if path not in tree:
                    raise _HubError(
                        404,
                        f"A file with this name doesn't exist: {path}",
                        code="EntryNotFound",
                    )
                del tree[path]
            elif key == "deletedFolder":
                prefix = path.rstrip("/") + "/"
                doomed = [p for p in tree if p.startswith(prefix)]
                if not doomed:
                    raise _HubError(
                        404,
                        f"A folder with this name doesn't exist: {path}",
                        code="EntryNotFound",
                    )
                for p in doomed:
                    del tree[p]
            else:
                raise _HubError(400, f"Unsupported commit operation {key!r}")

        pr_url = None
        if create_pr:
            num = self._open_discussion(repo, header["summary"], header.get("description") or "", user, True, base_head)
            ref = f"refs/pr/{num}"
            pr_url = f"{self._base_url(repo)}/discussions/{num}"
        self._blobs.update(new_blobs)
        oid = self._new_commit_from_tree(
            repo, base_head, tree, header["summary"], header.get("description") or "", user
        )
        assert ref is not None
        repo.branches[ref] = oid
        return _json_response(
            {
                "success": True,
                "commitOid": oid,
                "commitUrl": f"{self._base_url(repo)}/commit/{oid}",
                "commitMessage": header["summary"],
                "hookOutput": "",
                "pullRequestUrl": pr_url,
            }
        )

    def _open_discussion(
        self,
        repo: _Repo,
        title: str,
        description: str,
        user: str,
        is_pr: bool,
        base_head: str | None,
    ) -> int:
        num = max(repo.discussions, default=0) + 1
        repo.discussions[num] = {
            "num": num,
            "title": title,
            "description": description,
            "isPullRequest": is_pr,
            "status": "open",
            "author": user,
            "createdAt": _now_iso(),
            "base": "refs/heads/main",
        }
        if is_pr and base_head is not None:
            repo.branches[f"refs/pr/{num}"] = base_head
        return num

    def _create_discussion(self, req: RecordedRequest, repo_type: str, repo_id: str, user: str | None) -> _Response:
        repo = self._read_repo(repo_type, repo_id, user, files=False)
        if user is None:
            raise _HubError(401, "You must be authenticated to open a discussion")
        payload = req.json()
        is_pr = bool(payload.get("pullRequest"))
        num = self._open_discussion(
            repo,
            payload.get("title") or "",
            payload.get("description") or "",
            user,
            is_pr,
            self._resolve(repo, "main") if is_pr else None,
        )
        return _json_response({"num": num, "url": {"web": f"{self._base_url(repo)}/discussions/{num}"}})

    def _discussion_details(self, repo_type: str, repo_id: str, num: int, user: str | None) -> _Response:
        repo = self._read_repo(repo_type, repo_id, user, files=False)
        d = repo.discussions.get(num)
        if d is None:
            raise _HubError(404, f"Discussion {num} not found")
        return _json_response(
            {
                "num": num,
                "title": d["title"],
                "status": d["status"],
                "isPullRequest": d["isPullRequest"],
                "author": {"name": d["author"]},
                "createdAt": d["createdAt"],
                "repo": {"name": repo.repo_id, "type": repo.repo_type},
                "events": [
                    {
                        "id": hashlib.sha1(f"{repo_id}{num}".encode()).hexdigest()[:24],
                        "type": "comment",
                        "createdAt": d["createdAt"],
                        "author": {"name": d["author"]},
                        "data": {
                            "edited": False,
                            "hidden": False,
                            "latest": {"raw": d["description"]},
                        },
                    }
                ],
                "changes": {"base": d["base"]},
                "filesWithConflicts": [],
                "diff": "",
            }
        )

    def _branch(
        self,
        req: RecordedRequest,
        repo_type: str,
        repo_id: str,
        branch: str,
        user: str | None,
    ) -> _Response:
        repo = self._write_repo(repo_type, repo_id, user)
        if req.method == "DELETE":
            if branch not in repo.branches:
                raise _HubError(404, f"Invalid rev id: {branch}", code="RevisionNotFound")
            if branch == "main":
                raise _HubError(403, "Cannot delete the default branch")
            del repo.branches[branch]
            return _json_response({})
        if branch in repo.branches:
            raise _HubError(409, "Reference already exists")
        payload = req.json() if req.body else {}
        start = payload.get("startingPoint") or "main"
        repo.branches[branch] = self._resolve(repo, start)
        return _json_response({})

    def _create_tag(
        self,
        req: RecordedRequest,
        repo_type: str,
        repo_id: str,
        revision: str,
        user: str | None,
    ) -> _Response:
        repo = self._write_repo(repo_type, repo_id, user)
        tag = req.json().get("tag")
        if not tag:
            raise _HubError(400, "Missing tag name")
        if tag in repo.tags:
            raise _HubError(409, "Tag already exists")
        repo.tags[tag] = self._resolve(repo, revision)
        return _json_response({})

    # ------------------------------------------------------------------ endpoints: LFS

    def _lfs_batch(self, req: RecordedRequest, repo_type: str, repo_id: str) -> _Response:
        user = self._user(req)
        payload = req.json()
        self._write_repo(repo_type, repo_id, user, pr=True)
        if payload.get("operation") != "upload":
            raise _HubError(400, "FakeHub only implements LFS uploads")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj["oid"], obj["size"]
            out: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self._blobs:
                out["actions"] = {
                    "upload": {"href": f"{self.url}/_lfs/{oid}", "header": {}},
                    "verify": {"href": f"{self.url}/_lfs/{oid}/verify", "header": {}},
                }
            objects.append(out)
        return _json_response(
            {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
            **{"Content-Type": "application/vnd.git-lfs+json"},
        )

    def _lfs_object(self, req: RecordedRequest, segs: list[str]) -> _Response:
        oid = segs[0]
        if req.method == "PUT" and len(segs) == 1:
            if sha256_hex(req.body) != oid:
                raise _HubError(400, f"Uploaded content does not match sha256 {oid}")
            self._blobs[oid] = req.body
            return _Response(200, {"ETag": f'"{oid}"'}, b"")
        if req.method == "POST" and segs[1:] == ["verify"]:
            if oid not in self._blobs:
                raise _HubError(404, f"LFS object {oid} not found")
            return _json_response({})
        raise _HubError(404, f"Not found: {req.path}")


# ---------------------------------------------------------------------- helpers


def _encode_files(files: dict[str, bytes | str]) -> dict[str, bytes]:
    return {path.strip("/"): data.encode() if isinstance(data, str) else bytes(data) for path, data in files.items()}


def _is_pr(revision: str) -> bool:
    return revision.startswith("refs/pr/")


def _corrupt_bytes(data: bytes, mode: str | None) -> bytes:
    if mode is None:
        return data
    if mode == "truncate":
        return data[:-1] if data else b"x"
    if mode == "extend":
        return data + b"\0"
    # flip: same size, different content
    if not data:
        return data
    return bytes([data[0] ^ 0xFF]) + data[1:]


def _ranged(req: RecordedRequest, data: bytes, headers: dict[str, str]) -> _Response:
    range_header = req.headers.get("range")
    if not range_header:
        return _Response(200, headers, data)
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", range_header)
    if not m or (not m.group(1) and not m.group(2)):
        return _Response(200, headers, data)
    size = len(data)
    if m.group(1):
        start = int(m.group(1))
        end = int(m.group(2)) if m.group(2) else size - 1
    else:
        start, end = max(0, size - int(m.group(2))), size - 1
    end = min(end, size - 1)
    if start >= size or start > end:
        return _Response(416, {**headers, "Content-Range": f"bytes */{size}"}, b"")
    return _Response(
        206,
        {**headers, "Content-Range": f"bytes {start}-{end}/{size}"},
        data[start : end + 1],
    )


def isolate_hf_environment(monkeypatch: Any, home: str | Path) -> Path:
    """Point huggingface_hub at a throw-away HF_HOME for the duration of a test.

    Sets the environment variables (for subprocesses) *and* the matching
    ``huggingface_hub.constants`` attributes, since the library reads them once at
    import time. Removes any token from the environment (HF_TOKEN ...), disables
    telemetry (which also stops the user-agent code from fetching the AI agent
    registry from the default endpoint) and offline mode. Returns the hub cache dir.
    """
    from huggingface_hub import constants

    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    hub_cache = home / "hub"
    for var in (
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_TOKEN_PATH",
        "HF_OIDC_RESOURCE",
        "HF_OIDC_ID_TOKEN",
        "HF_ENDPOINT",
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "HF_ASSETS_CACHE",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN",
        "HF_HUB_ETAG_TIMEOUT",
        "HF_HUB_DOWNLOAD_TIMEOUT",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_XET_CACHE", str(home / "xet"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    for name, value in {
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(hub_cache),
        "HUGGINGFACE_HUB_CACHE": str(hub_cache),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HUGGINGFACE_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
        "CHECK_FOR_UPDATE_DONE_PATH": str(home / ".check_for_update_done"),
        "CHECK_FOR_SKILL_UPDATE_DONE_PATH": str(home / ".check_for_skill_update_done"),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
    }.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)
    return hub_cache


class _InstantTime:
    """Stand-in for the ``time`` module whose ``sleep`` only records the delay."""

    def __init__(self, real: Any, sleeps: list[float]) -> None:
        self._real = real
        self._sleeps = sleeps

    def sleep(self, seconds: float) -> None:
        self._sleeps.append(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def record_retry_sleeps(monkeypatch: Any) -> list[float]:
    """Make huggingface_hub's retry back-off instant; returns the requested delays.

    ``http_backoff`` sleeps 1, 2, 4, 8, 8 s between its 5 retries on 408/429/5xx and
    network errors, and ``http_get`` sleeps 1 s before resuming a broken download.
    There is no public knob for that, so this swaps the ``time`` module seen by
    ``huggingface_hub.utils._http`` and ``huggingface_hub.file_download`` for a
    proxy whose ``sleep`` returns immediately (the global ``time.sleep`` is left
    alone). Undone by ``monkeypatch`` at the end of the test.
    """
    import time

    from huggingface_hub import file_download
    from huggingface_hub.utils import _http

    sleeps: list[float] = []
    proxy = _InstantTime(time, sleeps)
    monkeypatch.setattr(_http, "time", proxy)
    monkeypatch.setattr(file_download, "time", proxy)
    return sleeps


def use_endpoint(monkeypatch: Any, url: str) -> None:
    """Point mpt-tools and huggingface_hub at ``url``: ``HF_ENDPOINT`` (read by mpt-tools at each
    call, and by subprocesses) and ``huggingface_hub.constants.ENDPOINT``, which huggingface_hub
    reads once at import time, as a process started with ``HF_ENDPOINT`` set has it (before 1.0
    some of its code, the URL of a commit for one, reads only the constant)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setattr(constants, "ENDPOINT", url.rstrip("/"))
    template = url.rstrip("/") + "/{repo_id}/resolve/{revision}/{filename}"  # made from ENDPOINT at import
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    from huggingface_hub import file_download

    if hasattr(file_download, "HUGGINGFACE_CO_URL_TEMPLATE"):  # before 1.0: imported by name at import time
        monkeypatch.setattr(file_download, "HUGGINGFACE_CO_URL_TEMPLATE", template)
