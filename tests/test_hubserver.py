"""Tests of the fake Hub server, driven by the real huggingface_hub client."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    constants,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hubserver import (
    FakeHub,
    git_blob_sha1,
    isolate_hf_environment,
    record_retry_sleeps,
    sha256_hex,
)

TOKEN = "hf_goodtoken"  # FakeHub default: belongs to user "alice"
CONFIG = b'{"num_virtual_tokens": 8}'
WEIGHTS = b"\x00\x01" * 64


@pytest.fixture
def hf_cache(monkeypatch, tmp_path) -> Path:
    return isolate_hf_environment(monkeypatch, tmp_path / "hf_home")


@pytest.fixture
def hub(hf_cache):
    with FakeHub() as server:
        yield server


@pytest.fixture
def api(hub) -> HfApi:
    return HfApi(endpoint=hub.url, token=TOKEN)


@pytest.fixture
def source_repo(hub) -> str:
    hub.add_repo(
        "org/source",
        {"config.json": CONFIG, "adapter/weights.safetensors": WEIGHTS},
    )
    return "org/source"


def _download(hub, repo_id, filename, **kwargs) -> Path:
    return Path(hf_hub_download(repo_id, filename, endpoint=hub.url, **kwargs))


# --------------------------------------------------------------------- downloads


def test_download_by_revision_and_subfolder(hub, hf_cache, source_repo):
    first = hub.head(source_repo)
    second = hub.add_commit(source_repo, {"config.json": b"{}"}, branch="v2")
    hub.add_tag(source_repo, "v1.0", first)

    path = _download(hub, source_repo, "config.json")
    assert path.read_bytes() == CONFIG
    assert path.is_relative_to(hf_cache)
    assert path.parent.name == first  # snapshot dir named after X-Repo-Commit

    assert _download(hub, source_repo, "config.json", revision="v2").read_bytes() == b"{}"
    assert _download(hub, source_repo, "config.json", revision=second).read_bytes() == b"{}"
    tagged = _download(hub, source_repo, "config.json", revision="v1.0")
    assert tagged.read_bytes() == CONFIG

    weights = _download(hub, source_repo, "weights.safetensors", subfolder="adapter")
    assert weights.read_bytes() == WEIGHTS
    # LFS-like file: blob named after the sha256, regular file: after the git sha1.
    assert weights.resolve().name == sha256_hex(WEIGHTS)
    assert path.resolve().name == git_blob_sha1(CONFIG)
    assert hub.find_requests("HEAD", "/org/source/resolve/main/adapter/weights.safetensors")
    assert all(r.authorization is None for r in hub.requests)  # no token anywhere


def test_second_download_is_a_cache_hit(hub, source_repo):
    first = _download(hub, source_repo, "config.json")
    assert len(hub.find_requests("GET", "/resolve/")) == 1
    hub.clear_requests()

    assert _download(hub, source_repo, "config.json") == first
    assert [r.method for r in hub.requests] == ["HEAD"]  # metadata only, no body

    hub.clear_requests()
    commit = hub.head(source_repo)
    assert _download(hub, source_repo, "config.json", revision=commit) == first
    assert hub.requests == []  # pinned commit already cached: no request at all


def test_offline_reads_from_cache(hub, monkeypatch, source_repo):
    cached = _download(hub, source_repo, "config.json")
    hub.clear_requests()

    assert _download(hub, source_repo, "config.json", local_files_only=True) == cached
    with pytest.raises(LocalEntryNotFoundError):
        _download(hub, source_repo, "adapter/weights.safetensors", local_files_only=True)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets
    assert _download(hub, source_repo, "config.json") == cached
    assert hub.requests == []

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hub.close()  # server gone: falls back to the cache as well
    assert _download(hub, source_repo, "config.json", local_files_only=True) == cached


# --------------------------------------------------------------------- error mapping


@pytest.fixture
def protected_repos(hub):
    hub.add_repo("org/private", {"config.json": CONFIG}, private=True)
    hub.add_repo("org/gated", {"config.json": CONFIG}, gated=True)
    hub.add_repo("org/gated-closed", {"config.json": CONFIG}, gated="manual", authorized_users=["bob"])
    hub.add_repo("org/public", {"config.json": CONFIG})


@pytest.mark.parametrize(
    ("repo_id", "filename", "kwargs", "error", "status"),
    [
        ("org/missing", "config.json", {}, RepositoryNotFoundError, 401),
        ("org/missing", "config.json", {"token": TOKEN}, RepositoryNotFoundError, 404),
        ("org/private", "config.json", {}, RepositoryNotFoundError, 401),
        ("org/gated", "config.json", {}, GatedRepoError, 401),
        ("org/gated-closed", "config.json", {"token": TOKEN}, GatedRepoError, 403),
        ("org/public", "config.json", {"revision": "nope"}, RevisionNotFoundError, 404),
        ("org/public", "missing.json", {}, RemoteEntryNotFoundError, 404),
        ("org/public", "config.json", {"token": "hf_bad"}, HfHubHTTPError, 401),
    ],
)
def test_download_errors_map_to_hub_exceptions(hub, protected_repos, repo_id, filename, kwargs, error, status):
    with pytest.raises(error) as excinfo:
        _download(hub, repo_id, filename, **kwargs)
    assert type(excinfo.value) is error  # e.g. not GatedRepoError for a private repo
    assert excinfo.value.response.status_code == status
    if error is RemoteEntryNotFoundError:
        assert isinstance(excinfo.value, EntryNotFoundError)


def test_protected_repos_with_valid_token(hub, protected_repos):
    for repo_id in ("org/private", "org/gated"):
        path = _download(hub, repo_id, "config.json", token=TOKEN)
        assert path.read_bytes() == CONFIG
    api = HfApi(endpoint=hub.url)
    assert api.model_info("org/gated").gated == "auto"  # metadata stays public
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/private")
    assert api.model_info("org/private", token=TOKEN).private is True
    assert api.repo_exists("org/gated") and not api.repo_exists("org/private")


def test_server_errors_and_retries(hub, api, monkeypatch, source_repo):
    sleeps = record_retry_sleeps(monkeypatch)

    # Plain API GET: no retry at all.
    hub.fail_next(500, path="/api/models/")
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.model_info(source_repo)
    assert excinfo.value.response.status_code == 500
    assert sleeps == []

    # Paginated listing goes through http_backoff: 5 retries, then HfHubHTTPError.
    hub.clear_requests()
    hub.fail_next(503, count=100, path="/tree/")
    with pytest.raises(HfHubHTTPError) as excinfo:
        list(api.list_repo_tree(source_repo))
    assert excinfo.value.response.status_code == 503
    assert len(hub.find_requests("GET", "/tree/")) == 6
    assert sleeps == [1, 2, 4, 8, 8]
    hub.clear_faults()

    # Transient failures are absorbed by the retries.
    sleeps.clear()
    hub.fail_next(502, count=2, path="/tree/")
    assert {f.path for f in api.list_repo_tree(source_repo)} == {"adapter", "config.json"}
    assert sleeps == [1, 2]

    # hf_hub_download: 5xx on HEAD -> one quick try, then a retried one; if all
    # fail and nothing is cached it raises LocalEntryNotFoundError from HfHubHTTPError.
    sleeps.clear()
    hub.clear_requests()
    hub.fail_next(500, count=100, method="HEAD")
    with pytest.raises(LocalEntryNotFoundError) as excinfo:
        _download(hub, source_repo, "config.json")
    assert isinstance(excinfo.value.__cause__, HfHubHTTPError)
    assert len(hub.find_requests("HEAD")) == 1 + 6
    hub.clear_faults()

    hub.fail_next(500, method="HEAD")
    assert _download(hub, source_repo, "config.json").read_bytes() == CONFIG

    # A dropped connection on the GET is retried by http_get (1 s pause, recorded).
    sleeps.clear()
    hub.fail_next(method="GET", path="weights", disconnect=True)
    weights = _download(hub, source_repo, "adapter/weights.safetensors")
    assert weights.read_bytes() == WEIGHTS
    assert sleeps == [1]


def test_connection_refused(monkeypatch, hf_cache):
    sleeps = record_retry_sleeps(monkeypatch)
    dead = FakeHub()
    dead.close()  # nothing listens on this port any more
    with pytest.raises(LocalEntryNotFoundError) as excinfo:
        _download(dead, "org/any", "config.json")
    assert isinstance(excinfo.value.__cause__, httpx2.ConnectError)
    assert sleeps == [1, 2, 4, 8, 8]
    with pytest.raises(httpx2.ConnectError):
        HfApi(endpoint=dead.url).model_info("org/any")


def test_redirect_to_other_host_drops_authorization(hub, protected_repos):
    with FakeHub() as cdn:
        hub.redirect_files_to(cdn)
        path = _download(hub, "org/private", "config.json", token=TOKEN)
        assert path.read_bytes() == CONFIG

        (head,) = hub.find_requests("HEAD", "/resolve/")
        assert head.authorization == f"Bearer {TOKEN}"
        assert hub.find_requests("GET") == []  # body came from the other host
        (get,) = cdn.requests
        assert get.method == "GET" and get.path == f"/_cdn/{sha256_hex(CONFIG)}"
        assert get.authorization is None


def test_corrupted_content(hub, source_repo):
    hub.corrupt(source_repo, "config.json", "truncate")
    with pytest.raises(OSError, match="Consistency check failed"):
        _download(hub, source_repo, "config.json")

    # Same size, different bytes: the client only checks sizes, so this goes
    # through and callers must compare the hash with the ETag themselves.
    hub.corrupt(source_repo, "adapter/weights.safetensors", "flip")
    path = _download(hub, source_repo, "adapter/weights.safetensors")
    assert len(path.read_bytes()) == len(WEIGHTS)
    assert sha256_hex(path.read_bytes()) != path.resolve().name


def test_range_requests(hub, source_repo):
    url = f"{hub.url}/org/source/resolve/main/config.json"
    response = httpx2.get(url, headers={"Range": "bytes=2-5"})
    assert response.status_code == 206
    assert response.content == CONFIG[2:6]
    assert response.headers["Content-Range"] == f"bytes 2-5/{len(CONFIG)}"


def test_hf_endpoint_env_var_in_fresh_process(hub, hf_cache, source_repo):
    script = textwrap.dedent(
        """
        from huggingface_hub import hf_hub_download
        print(open(hf_hub_download("org/source", "config.json")).read())
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(hub.env(HF_HOME=str(hf_cache.parent)))
    out = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == CONFIG.decode()
    assert hub.find_requests("GET", "/org/source/resolve/main/config.json")


def test_snapshot_download_follows_tree_pagination(hub, source_repo, hf_cache):
    hub.tree_page_size = 1
    folder = Path(snapshot_download(source_repo, endpoint=hub.url))
    assert (folder / "config.json").read_bytes() == CONFIG
    assert (folder / "adapter" / "weights.safetensors").read_bytes() == WEIGHTS
    tree_calls = hub.find_requests("GET", "/tree/")
    assert len(tree_calls) == 3  # adapter/, adapter/weights, config.json
    assert tree_calls[1].query["cursor"] == ["1"]


def test_dataset_repos(hub):
    hub.add_repo("org/data", {"train.csv": b"a,b\n1,2\n"}, repo_type="dataset")
    path = _download(hub, "org/data", "train.csv", repo_type="dataset")
    assert path.read_bytes() == b"a,b\n1,2\n"
    assert hub.find_requests("HEAD", "/datasets/org/data/resolve/main/train.csv")
    info = HfApi(endpoint=hub.url).dataset_info("org/data")
    assert [s.rfilename for s in info.siblings] == ["train.csv"]
    with pytest.raises(RepositoryNotFoundError):  # same id, wrong repo type
        _download(hub, "org/data", "train.csv")


# --------------------------------------------------------------------- metadata


def test_model_info_and_listing(hub, api, source_repo):
    info = api.model_info(source_repo, files_metadata=True)
    assert info.id == source_repo and info.sha == hub.head(source_repo)
    assert info.private is False and info.gated is False
    siblings = {s.rfilename: s for s in info.siblings}
    assert siblings["config.json"].size == len(CONFIG)
    assert siblings["config.json"].lfs is None
    assert siblings["adapter/weights.safetensors"].lfs.sha256 == sha256_hex(WEIGHTS)

    new = hub.add_commit(source_repo, {"notes.txt": b"hi"}, branch="dev")
    assert api.model_info(source_repo, revision="dev").sha == new
    with pytest.raises(RevisionNotFoundError):
        api.model_info(source_repo, revision="nope")

    tree = list(api.list_repo_tree(source_repo, "adapter", expand=True))
    assert [f.path for f in tree] == ["adapter/weights.safetensors"]
    assert tree[0].last_commit.oid == hub.head(source_repo)
    assert api.file_exists(source_repo, "config.json")
    assert not api.file_exists(source_repo, "nope.json")
    refs = api.list_repo_refs(source_repo)
    assert {b.name for b in refs.branches} == {"main", "dev"}
    commits = api.list_repo_commits(source_repo, revision="dev")
    assert [c.commit_id for c in commits] == [new, hub.head(source_repo)]
    assert api.whoami()["name"] == "alice"
    with pytest.raises(HfHubHTTPError):
        HfApi(endpoint=hub.url, token="hf_bad").whoami()


# --------------------------------------------------------------------- uploads


def _commit_payload(hub) -> list[dict]:
    (request,) = hub.find_requests("POST", "/commit/")
    return request.ndjson()


def test_create_repo(hub, api):
    url = api.create_repo("alice/adapter")
    assert url.repo_id == "alice/adapter"
    assert url.startswith(hub.url)
    assert set(hub.files("alice/adapter")) == {".gitattributes"}

    with pytest.raises(HfHubHTTPError) as excinfo:
        api.create_repo("alice/adapter")
    assert excinfo.value.response.status_code == 409
    assert api.create_repo("alice/adapter", exist_ok=True).repo_id == "alice/adapter"

    api.create_repo("alice/secret", private=True)
    assert api.model_info("alice/secret").private is True
    with pytest.raises(HfHubHTTPError) as excinfo:
        HfApi(endpoint=hub.url).create_repo("alice/other")
    assert excinfo.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.create_repo("someone-else/repo")
    assert excinfo.value.response.status_code == 403


def test_upload_folder_to_new_repo(hub, api, tmp_path):
    folder = tmp_path / "adapter"
    (folder / "sub").mkdir(parents=True)
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# Adapter\n")
    (folder / "adapter_config.json").write_bytes(CONFIG)
    (folder / "sub" / "adapter_model.safetensors").write_bytes(WEIGHTS)

    api.create_repo("alice/pushed")
    info = api.upload_folder(repo_id="alice/pushed", folder_path=folder)
    assert info.oid == hub.head("alice/pushed")
    assert info.commit_url == f"{hub.url}/alice/pushed/commit/{info.oid}"
    files = hub.files("alice/pushed")
    assert files["adapter_config.json"] == CONFIG
    assert files["sub/adapter_model.safetensors"] == WEIGHTS
    assert files["README.md"].startswith(b"---\nlicense: mit")

    payload = _commit_payload(hub)
    assert payload[0] == {
        "key": "header",
        "value": {"summary": "Upload folder using huggingface_hub", "description": ""},
    }
    entries = {item["value"]["path"]: item for item in payload[1:]}
    assert {item["key"] for item in entries.values()} == {"file"}  # inline, no LFS/Xet
    weights = entries["sub/adapter_model.safetensors"]["value"]
    assert base64.b64decode(weights["content"]) == WEIGHTS
    assert hub.find_requests("POST", "/api/validate-yaml")
    assert not hub.find_requests(path_contains="xet")
    for request in hub.requests:
        assert request.authorization == f"Bearer {TOKEN}"


def test_invalid_model_card_is_rejected(api):
    api.create_repo("alice/card")
    with pytest.raises(ValueError, match="Invalid metadata"):
        api.upload_file(
            path_or_fileobj=b"---\n- just\n- a list\n---\n",
            path_in_repo="README.md",
            repo_id="alice/card",
        )


def test_create_commit_on_existing_repo(hub, api):
    first = hub.add_repo("alice/existing", {"keep.txt": b"k", "old.txt": b"o"})
    info = api.create_commit(
        "alice/existing",
        [
            CommitOperationAdd("new.txt", b"n"),
            CommitOperationAdd("keep.txt", b"k"),  # unchanged: dropped by the client
            CommitOperationDelete("old.txt"),
        ],
        commit_message="Update",
        commit_description="details",
        parent_commit=first,
    )
    assert hub.files("alice/existing") == {"keep.txt": b"k", "new.txt": b"n"}
    details = hub.commit_info("alice/existing")
    assert details["parents"] == [first] and details["oid"] == info.oid
    assert (details["title"], details["message"], details["author"]) == (
        "Update",
        "details",
        "alice",
    )
    keys = [(i["key"], i["value"].get("path")) for i in _commit_payload(hub)[1:]]
    assert keys == [("file", "new.txt"), ("deletedFile", "old.txt")]

    with pytest.raises(HfHubHTTPError) as excinfo:  # stale parent commit
        api.create_commit(
            "alice/existing",
            [CommitOperationAdd("x.txt", b"x")],
            commit_message="stale",
            parent_commit=first,
        )
    assert excinfo.value.response.status_code == 412
    with pytest.raises(RemoteEntryNotFoundError):
        api.create_commit("alice/existing", [CommitOperationDelete("ghost.txt")], commit_message="rm")
    with pytest.raises(RepositoryNotFoundError):
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x", repo_id="alice/nope")


def test_create_branch_and_commit_to_it(hub, api, tmp_path):
    base = hub.add_repo("alice/branchy", {"a.txt": b"a"})
    api.create_branch("alice/branchy", branch="feature/x")
    assert hub.head("alice/branchy", "feature/x") == base
    assert hub.find_requests("POST", "/branch/feature%2Fx")

    api.upload_file(
        path_or_fileobj=b"b",
        path_in_repo="b.txt",
        repo_id="alice/branchy",
        revision="feature/x",
    )
    assert hub.files("alice/branchy", "feature/x") == {"a.txt": b"a", "b.txt": b"b"}
    assert hub.files("alice/branchy") == {"a.txt": b"a"}

    (tmp_path / "c.txt").write_bytes(b"c")
    api.upload_folder(repo_id="alice/branchy", folder_path=tmp_path, revision="feature/x")
    assert "c.txt" in hub.files("alice/branchy", "feature/x")

    with pytest.raises(HfHubHTTPError) as excinfo:
        api.create_branch("alice/branchy", branch="feature/x")
    assert excinfo.value.response.status_code == 409
    api.create_branch("alice/branchy", branch="feature/x", exist_ok=True)
    api.create_branch("alice/branchy", branch="pinned", revision=base)
    with pytest.raises(RevisionNotFoundError):
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x", repo_id="alice/branchy", revision="nope")


def test_create_pr(hub, api, tmp_path):
    hub.add_repo("alice/pr", {"a.txt": b"a"})
    info = api.create_commit(
        "alice/pr",
        [CommitOperationAdd("b.txt", b"b")],
        commit_message="Add b",
        create_pr=True,
    )
    assert info.pr_url == f"{hub.url}/alice/pr/discussions/1"
    assert (info.pr_revision, info.pr_num) == ("refs/pr/1", 1)
    assert hub.files("alice/pr") == {"a.txt": b"a"}
    assert hub.files("alice/pr", "refs/pr/1") == {"a.txt": b"a", "b.txt": b"b"}
    assert hub.find_requests("POST", "/commit/main")[0].query == {"create_pr": ["1"]}

    path = _download(hub, "alice/pr", "b.txt", revision="refs/pr/1")
    assert path.read_bytes() == b"b"
    assert hub.find_requests("HEAD", "/resolve/refs%2Fpr%2F1/b.txt")

    folder = tmp_path / "pr2"
    folder.mkdir()
    (folder / "c.txt").write_bytes(b"c")
    info = api.upload_folder(repo_id="alice/pr", folder_path=folder, create_pr=True)
    assert info.pr_revision == "refs/pr/2"
    assert hub.files("alice/pr", "refs/pr/2") == {"a.txt": b"a", "c.txt": b"c"}
    assert [pr["num"] for pr in hub.pull_requests("alice/pr")] == [1, 2]


def test_lfs_batch_upload_when_xet_is_disabled(hub, api, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # HF_HUB_DISABLE_XET=1
    hub.lfs_upload_threshold = 10
    hub.add_repo("alice/lfs", {})
    big = os.urandom(1000)
    api.create_commit(
        "alice/lfs",
        [CommitOperationAdd("big.bin", big), CommitOperationAdd("small.txt", b"s")],
        commit_message="lfs",
    )
    assert hub.files("alice/lfs") == {"big.bin": big, "small.txt": b"s"}
    assert hub.find_requests("POST", "alice/lfs.git/info/lfs/objects/batch")
    (put,) = hub.find_requests("PUT", "/_lfs/")
    assert put.body == big and put.authorization is None
    keys = {i["key"]: i["value"] for i in _commit_payload(hub)[1:]}
    assert keys["lfsFile"]["oid"] == hashlib.sha256(big).hexdigest()
    assert keys["file"]["path"] == "small.txt"
