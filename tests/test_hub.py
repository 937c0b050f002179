"""Hub in and out (issue #3): sources from the Hub, push, the base-model check.

Everything runs against the real huggingface_hub client talking to tests/hubserver.py's FakeHub
on 127.0.0.1 (pointed at it with HF_ENDPOINT, which mpt-tools reads at call time).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
from conftest import FIXTURES, ROOT, run_cli
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hubserver import FakeHub, isolate_hf_environment, sha256_hex, use_endpoint

from mpt_tools.errors import HubError
from mpt_tools.hub.download import download_source, parse_spec
from mpt_tools.hub.push import push_adapter
from mpt_tools.options import HubOptions

TOKEN = "hf_goodtoken"  # FakeHub default: user "alice"
BAD_TOKEN = "hf_wrongtoken123"
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def adapter_files(name: str = "causal", prefix: str = "") -> dict[str, bytes]:
    folder = FIXTURES / name
    return {prefix + p.name: p.read_bytes() for p in folder.iterdir() if p.name != "README.md"}


@pytest.fixture
def hf_cache(monkeypatch, tmp_path) -> Path:
    return isolate_hf_environment(monkeypatch, tmp_path / "hf_home")


@pytest.fixture
def hub(hf_cache, monkeypatch):
    with FakeHub() as server:
        use_endpoint(monkeypatch, server.url)
        yield server


@pytest.fixture
def src(hub) -> str:
    hub.add_repo("org/src", adapter_files())
    return "org/src"


def inspect_json(*args: str):
    result = run_cli("inspect", *args, "--json", "--no-norms")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def tensors(folder: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """dtype, shape and raw bytes of every tensor (for bitwise comparison)."""
    with safe_open(str(folder / WEIGHTS), "np") as fh:
        return {k: (str(fh.get_tensor(k).dtype), fh.get_tensor(k).shape, fh.get_tensor(k).tobytes()) for k in fh.keys()}  # noqa: SIM118


def assert_one_error_line(result, *needles: str, secrets: tuple[str, ...] = (TOKEN, BAD_TOKEN)) -> str:
    assert result.exit_code == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("error: ")
    for needle in needles:
        assert needle in line, line
    for secret in secrets:
        assert secret not in result.stdout and secret not in result.stderr
    return line


# --------------------------------------------------------------------------- spec parsing


@pytest.mark.parametrize(
    ("spec", "kwargs", "expected"),
    [
        ("org/name", {}, ("org/name", None, None)),
        ("hf://org/name", {}, ("org/name", None, None)),
        ("hf://org/name@v2", {}, ("org/name", "v2", None)),
        ("hf://org/name@v2/sub/deeper", {}, ("org/name", "v2", "sub/deeper")),
        ("hf://org/name/sub", {}, ("org/name", None, "sub")),
        ("hf://org/name@refs/pr/3/sub", {}, ("org/name", "refs/pr/3", "sub")),
        ("hf://org/name@refs%2Fpr%2F3", {}, ("org/name", "refs/pr/3", None)),
        ("org/name@abc1234", {}, ("org/name", "abc1234", None)),
        ("hf://org/name@v2/sub", {"revision": "v2", "subfolder": "sub"}, ("org/name", "v2", "sub")),
        ("org/name", {"revision": "dev", "subfolder": "a"}, ("org/name", "dev", "a")),
        ("hf://gpt2", {}, ("gpt2", None, None)),
    ],
)
def test_parse_spec(spec, kwargs, expected):
    parsed = parse_spec(spec, **kwargs)
    assert (parsed.repo_id, parsed.revision, parsed.subfolder) == expected


@pytest.mark.parametrize(
    ("spec", "kwargs", "needle"),
    [
        ("hf://org/name@v1", {"revision": "v2"}, "contradicts"),
        ("hf://org/name/a", {"subfolder": "b"}, "contradicts"),
        ("hf://org/na me", {}, "not a valid"),
        ("hf://org/name@", {}, "empty revision"),
        ("hf://org/name/../x", {}, "invalid subfolder"),
    ],
)
def test_parse_spec_refuses(spec, kwargs, needle):
    with pytest.raises(HubError, match=needle):
        parse_spec(spec, **kwargs)


# --------------------------------------------------------------------------- downloads


def test_download_by_revision_tag_and_commit(hub, src):
    first = hub.head(src)
    second = hub.add_commit(src, adapter_files("causal_fp16"), branch="v2")
    hub.add_tag(src, "v1.0", first)
    sha_main = sha256_hex(adapter_files()[WEIGHTS])
    sha_v2 = sha256_hex(adapter_files("causal_fp16")[WEIGHTS])

    report = inspect_json(src)
    assert report["files"][0]["sha256"] == sha_main
    assert report["hub"]["commit"] == first
    assert report["hub"]["url"] == f"hf://{src}@{first}"
    assert report["hub"]["revision"] == "main"

    for args in (["--revision", "v2"], [f"hf://{src}@v2"], [f"hf://{src}@{second}"], [f"hf://{src}@{second[:10]}"]):
        cli_args = [src, *args] if args[0].startswith("--") else args
        report = inspect_json(*cli_args)
        assert report["files"][0]["sha256"] == sha_v2, args
        assert report["hub"]["commit"] == second
    report = inspect_json(f"hf://{src}@v1.0")
    assert report["hub"]["commit"] == first and report["files"][0]["sha256"] == sha_main


def test_download_subfolder_forms(hub):
    commit = hub.add_repo("org/named", adapter_files(prefix="first/") | adapter_files("seq2seq", prefix="second/"))
    hub.add_tag("org/named", "v1", commit)
    expected = sha256_hex(adapter_files("seq2seq")[WEIGHTS])
    for args in (
        ["org/named", "--subfolder", "second"],
        ["hf://org/named/second"],
        ["hf://org/named@v1/second"],
        [f"hf://org/named@{commit}/second"],
        ["hf://org/named@main", "--subfolder", "second"],
    ):
        report = inspect_json(*args)
        assert report["files"][0]["sha256"] == expected, args
        assert report["hub"]["subfolder"] == "second"
        assert report["hub"]["url"] == f"hf://org/named@{commit}/second"
        assert report["config"]["task_type"] == "SEQ_2_SEQ_LM"
    # Without the subfolder: a clear refusal that names the fix.
    result = run_cli("inspect", "org/named")
    assert_one_error_line(result, "org/named", "--subfolder")


def test_only_config_and_one_weights_file_are_fetched(hub):
    files = adapter_files() | {
        "adapter_model.bin": adapter_files("causal_bin")["adapter_model.bin"],
        "big.bin": os.urandom(4096),
        "README.md": b"# card",
        "other/adapter_model.safetensors": b"x" * 10,
    }
    hub.add_repo("org/many", files)
    folder, info = download_source("org/many")
    assert info["file"] == WEIGHTS  # safetensors wins, as in PEFT
    gets = sorted(r.path.rsplit("/", 1)[-1] for r in hub.find_requests("GET", "/resolve/"))
    assert gets == [CONFIG, WEIGHTS]
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG, WEIGHTS]
    assert (folder / WEIGHTS).read_bytes() == files[WEIGHTS]


def test_bin_fallback(hub):
    hub.add_repo("org/bin", adapter_files("causal_bin"))
    report = inspect_json("org/bin")
    assert report["format"] == "pickle"
    assert report["hub"]["file"] == "adapter_model.bin"
    gets = [r.path for r in hub.find_requests("GET", "/resolve/")]
    assert not any(p.endswith(WEIGHTS) for p in gets)


def test_cache_reuse(hub, src):
    inspect_json(src)
    assert len(hub.find_requests("GET", "/resolve/")) == 2
    hub.clear_requests()
    inspect_json(src)
    assert hub.find_requests("GET") == []  # no file fetched again
    assert [r.method for r in hub.requests] == ["HEAD"]  # only: where does main point now?
    hub.clear_requests()
    inspect_json(f"hf://{src}@{hub.head(src)}")
    assert hub.requests == []  # pinned commit, all cached: no request at all


def test_offline_from_cache(hub, src, monkeypatch):
    online = inspect_json(src)
    hub.clear_requests()
    offline = inspect_json(src, "--offline")
    assert hub.requests == []
    assert offline["hub"] == online["hub"]
    assert offline["files"][0]["sha256"] == online["files"][0]["sha256"]

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert inspect_json(src)["hub"]["commit"] == online["hub"]["commit"]
    assert hub.requests == []
    monkeypatch.delenv("HF_HUB_OFFLINE")

    hub.close()  # gone: --offline still works from the cache
    assert inspect_json(src, "--offline")["hub"]["commit"] == online["hub"]["commit"]


def test_library_download_source(hub, src, tmp_path):
    cache = tmp_path / "own_cache"
    folder, info = download_source(f"hf://{src}", hub=HubOptions(cache_dir=str(cache)))
    assert folder.is_relative_to(cache)
    assert (folder / WEIGHTS).read_bytes() == adapter_files()[WEIGHTS]
    assert info == {
        "repo_id": src,
        "revision": "main",
        "commit": hub.head(src),
        "subfolder": None,
        "url": f"hf://{src}@{hub.head(src)}",
        "file": WEIGHTS,
        "sha256": sha256_hex(adapter_files()[WEIGHTS]),
        "endpoint": hub.url,
    }


# --------------------------------------------------------------------------- errors


@pytest.fixture
def protected(hub):
    hub.add_repo("org/private", adapter_files(), private=True)
    hub.add_repo("org/gated", adapter_files(), gated=True)
    hub.add_repo("org/closed", adapter_files(), gated="manual", authorized_users=["bob"])
    hub.add_repo("org/public", adapter_files())
    hub.add_repo("org/empty", {"README.md": b"nothing"})


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["org/missing"], ["hf://org/missing@main", "repository not found", "--token"]),
        (["org/missing", "--token", TOKEN], ["org/missing", "repository not found"]),
        (["org/private"], ["org/private", "repository not found", "--token"]),
        (["org/gated"], ["org/gated", "gated", "request access"]),
        (["org/closed", "--token", TOKEN], ["org/closed", "gated", "not been granted"]),
        (["org/public", "--revision", "nope"], ["hf://org/public@nope", "revision not found"]),
        (["hf://org/public@nope"], ["hf://org/public@nope", "revision not found"]),
        (["org/empty"], ["org/empty", "no adapter_model.safetensors or adapter_model.bin"]),
        (["org/public", "--subfolder", "nope"], ["hf://org/public@", "/nope", "no adapter_model"]),
        (["org/public", "--offline"], ["org/public", "not in the local cache", "offline"]),
        (["org/public", "--token", BAD_TOKEN], ["org/public", "rejected the token"]),
    ],
)
def test_download_errors(protected, args, needles):
    result = run_cli("inspect", *args)
    assert_one_error_line(result, *needles)
    assert result.stdout == ""


def test_error_when_offline_by_environment(hub, protected, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run_cli("inspect", "org/public")
    assert_one_error_line(result, "org/public", "offline")
    assert hub.requests == []


def run_cli_process(*args: object, env: dict[str, str]) -> SimpleNamespace:
    """The CLI in a fresh process, configured only through huggingface_hub's documented
    environment variables, so its real retry back-off runs (about 23 s on a dead Hub)."""
    full = {k: v for k, v in os.environ.items() if k != "MPT_TOOLS_RAISE_UNEXPECTED"}
    full.update(env)
    proc = subprocess.run(
        [sys.executable, "-m", "mpt_tools", *map(str, args)], capture_output=True, text=True, cwd=ROOT, env=full
    )
    return SimpleNamespace(exit_code=proc.returncode, stdout=proc.stdout, stderr=proc.stderr)


def test_error_server_down(hub, protected, hf_cache):
    """The Hub answers 503 to everything: huggingface_hub retries (really), then one line."""
    hub.fail_next(503, count=1000)
    result = run_cli_process("validate", "org/public", "--token", TOKEN, env=hub.env(HF_HOME=str(hf_cache.parent)))
    assert_one_error_line(result, "org/public", "503", "try again later")
    assert len(hub.requests) > 1  # huggingface_hub's retries ran
    assert all(r.authorization == f"Bearer {TOKEN}" for r in hub.requests)


@pytest.mark.parametrize("status", [400, 404, 410, 418])
def test_error_other_4xx_names_the_status(hub, src, status):
    """A tester's finding: a 4xx other than 401/403/429 (or a 404 without the Hub's error code) was
    reported as "cannot connect ... check your network"."""
    hub.fail_next(status, count=1000)
    result = run_cli("validate", src)
    assert result.exit_code == 1 and f"the Hub answered HTTP {status} (" in result.stderr, result.stderr
    assert "cannot connect" not in result.stderr and result.stderr.count("\n") == 1


def test_error_connection_refused(hf_cache):
    dead = FakeHub()
    dead.close()
    out = hf_cache.parent / "out"
    result = run_cli_process(
        "init", "org/src", "--mode", "average", "--out", out, "--token", TOKEN,
        env=dead.env(HF_HOME=str(hf_cache.parent)),
    )  # fmt: skip
    assert_one_error_line(result, "org/src", "cannot connect", dead.url)
    assert not out.exists()


def test_token_from_environment(hub, protected, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    report = inspect_json("org/private")
    assert report["hub"]["repo_id"] == "org/private"
    assert {r.authorization for r in hub.requests} == {f"Bearer {TOKEN}"}
    assert TOKEN not in json.dumps(report)


def test_authorization_header_is_the_token(hub, protected):
    result = run_cli("inspect", "org/private", "--token", TOKEN, "--json")
    assert result.exit_code == 0, result.stderr
    assert hub.requests
    assert {r.authorization for r in hub.requests} == {f"Bearer {TOKEN}"}
    assert TOKEN not in result.stdout and TOKEN not in result.stderr


def test_redirect_to_other_host_drops_the_token(hub, protected):
    with FakeHub() as cdn:
        hub.redirect_files_to(cdn)
        report = inspect_json("org/private", "--token", TOKEN)
        assert report["files"][0]["sha256"] == sha256_hex(adapter_files()[WEIGHTS])
        assert hub.find_requests("GET") == []  # the bodies came from the other host
        assert {r.authorization for r in hub.requests} == {f"Bearer {TOKEN}"}
        assert len(cdn.requests) == 2
        assert all(r.authorization is None for r in cdn.requests)


def test_corrupted_download_is_rejected_and_removed(hub, src, hf_cache):
    hub.corrupt(src, WEIGHTS, "flip")  # same size: only the sha256 tells
    result = run_cli("inspect", src)
    assert_one_error_line(result, src, WEIGHTS, "sha256 mismatch", "run the command again")
    good = sha256_hex(adapter_files()[WEIGHTS])
    assert not list(hf_cache.rglob(good))  # the bad blob is gone from the cache
    assert not list(hf_cache.rglob(WEIGHTS))
    hub.uncorrupt(src, WEIGHTS)
    assert inspect_json(src)["files"][0]["sha256"] == good


def test_truncated_download_is_rejected(hub, src):
    hub.corrupt(src, WEIGHTS, "truncate")
    result = run_cli("inspect", src)
    assert_one_error_line(result, src, "corrupted")


# --------------------------------------------------------------------------- push


@pytest.fixture
def adapter(tmp_path) -> Path:
    out = tmp_path / "target"
    result = run_cli("init", FIXTURES / "causal", "--mode", "exact", "--task", "1", "--out", out)
    assert result.exit_code == 0, result.stderr
    return out


def _front_matter(card: str) -> str:
    assert card.startswith("---\n")
    return card.split("---\n")[1]


def test_push_to_new_repo(hub, adapter):
    result = run_cli("push", adapter, "alice/new", "--token", TOKEN)
    assert result.exit_code == 0, result.stderr
    files = hub.files("alice/new")
    assert set(files) == {".gitattributes", WEIGHTS, CONFIG, "README.md"}
    assert files[WEIGHTS] == (adapter / WEIGHTS).read_bytes()
    assert files[CONFIG] == (adapter / CONFIG).read_bytes()
    info = hub.commit_info("alice/new")
    assert info["files"] == sorted(files) and len(info["parents"]) == 1  # one commit after creation
    assert hub.commit_info("alice/new", info["parents"][0])["files"] == [".gitattributes"]
    assert f"{hub.url}/alice/new/commit/{info['oid']}" in result.stdout
    assert len(hub.find_requests("POST", "/commit/")) == 1
    card = files["README.md"].decode()
    front = _front_matter(card)
    for line in (
        "library_name: peft",
        "base_model: tiny-random/gpt2",
        "- base_model:adapter:tiny-random/gpt2",
        "- peft",
        "- multitask-prompt-tuning",
    ):
        assert line in front.splitlines(), front
    assert "EXACT_SOURCE_TASK" in card and "| task | `1` |" in card
    assert sha256_hex(files[WEIGHTS]) in card
    assert 'PeftModel.from_pretrained(base, "alice/new")' in card
    assert str(FIXTURES) not in card  # local paths stay local
    assert {r.authorization for r in hub.requests} == {f"Bearer {TOKEN}"}
    assert not hub.find_requests(path_contains="xet")


def test_push_private_repo(hub, adapter):
    result = run_cli("push", adapter, "alice/secret", "--private", "--token", TOKEN, "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["schema"] == "mpt-tools/push/1" and data["commit"] == hub.head("alice/secret")
    with pytest.raises(Exception):  # noqa: B017 - not visible without a token
        download_source("alice/secret")


def test_push_private_to_an_existing_public_repo_is_refused(hub, adapter):
    """A tester's finding: --private on an existing public repo pushed the files publicly (and the
    JSON said "private": true). It is refused before the commit; an existing private repo is fine."""
    before = hub.add_repo("alice/pub", {"keep.txt": b"k"})
    result = run_cli("push", adapter, "alice/pub", "--private", "--token", TOKEN)
    assert result.exit_code == 1 and "exists and is public" in result.stderr
    assert hub.head("alice/pub") == before and result.stderr.count("\n") == 1
    hub.add_repo("alice/priv", {"keep.txt": b"k"}, private=True)
    assert run_cli("push", adapter, "alice/priv", "--private", "--token", TOKEN).exit_code == 0


def test_push_to_existing_repo(hub, adapter):
    first = hub.add_repo("alice/existing", {"keep.txt": b"k", WEIGHTS: b"old"})
    result = run_cli("push", adapter, "alice/existing", "--token", TOKEN, "--commit-message", "New init")
    assert result.exit_code == 0, result.stderr
    files = hub.files("alice/existing")
    assert files["keep.txt"] == b"k" and files[WEIGHTS] == (adapter / WEIGHTS).read_bytes()
    info = hub.commit_info("alice/existing")
    assert info["parents"] == [first] and info["title"] == "New init" and info["author"] == "alice"


def test_push_again_unchanged_makes_no_commit_and_says_so(hub, adapter, tmp_path):
    assert run_cli("push", adapter, "alice/again", "--token", TOKEN).exit_code == 0
    head = hub.head("alice/again")
    commits = len(hub.find_requests("POST", "/commit/main"))
    again = run_cli("push", adapter, "alice/again", "--token", TOKEN, "--json")
    assert again.exit_code == 0, again.stderr
    data = json.loads(again.stdout)
    assert data["no_op"] is True and sorted(data["unchanged"]) == sorted([WEIGHTS, CONFIG, "README.md"])
    assert hub.head("alice/again") == head and data["commit"] == head
    assert len(hub.find_requests("POST", "/commit/main")) == commits  # no commit request at all
    text = run_cli("push", adapter, "alice/again", "--token", TOKEN)
    assert "nothing to push" in text.stdout and "pushed" not in text.stdout
    # Another adapter: only what changed goes up, and the summary says which file was unchanged.
    other = tmp_path / "other"
    assert run_cli("init", FIXTURES / "causal", "--mode", "exact", "--task", "2", "--out", other).exit_code == 0
    partial = run_cli("push", other, "alice/again", "--token", TOKEN)
    assert partial.exit_code == 0 and "(1 unchanged)" in partial.stdout, partial.stdout
    assert hub.head("alice/again") != head


def test_push_to_new_branch(hub, adapter):
    main = hub.add_repo("alice/branchy", {"a.txt": b"a"})
    result = run_cli("push", adapter, "alice/branchy", "--revision", "dev", "--token", TOKEN)
    assert result.exit_code == 0, result.stderr
    assert hub.head("alice/branchy") == main  # main untouched
    dev = hub.files("alice/branchy", "dev")
    assert {"a.txt", WEIGHTS, CONFIG, "README.md"} <= set(dev)
    assert 'revision="dev"' in dev["README.md"].decode()
    # The pushed branch is a source again.
    assert inspect_json("alice/branchy", "--revision", "dev")["hub"]["commit"] == hub.head("alice/branchy", "dev")


def test_push_pull_request(hub, adapter):
    main = hub.add_repo("alice/pr", {"a.txt": b"a"})
    result = run_cli("push", adapter, "alice/pr", "--create-pr", "--token", TOKEN)
    assert result.exit_code == 0, result.stderr
    assert f"{hub.url}/alice/pr/discussions/1" in result.stdout
    assert hub.head("alice/pr") == main
    assert [pr["num"] for pr in hub.pull_requests("alice/pr")] == [1]
    assert WEIGHTS in hub.files("alice/pr", "refs/pr/1")
    assert hub.find_requests("POST", "/commit/main")[0].query == {"create_pr": ["1"]}


def test_push_to_a_missing_pull_request_says_so(hub, adapter):
    """A tester's finding: ``--revision refs/pr/1`` with no such PR said "branch refs/pr/1 not found:
    push without --create-pr to create it", which cannot create it."""
    hub.add_repo("alice/nopr", {"a.txt": b"a"})
    result = run_cli("push", adapter, "alice/nopr", "--revision", "refs/pr/1", "--token", TOKEN)
    assert result.exit_code == 1 and "pull request refs/pr/1 not found" in result.stderr, result.stderr
    assert "--create-pr to open one" in result.stderr
    # no repo at all: refused before it is created (a failed push had left a new, empty repo)
    result = run_cli("push", adapter, "alice/none", "--revision", "refs/pr/1", "--token", TOKEN)
    assert result.exit_code == 1 and "the repo does not exist, so it has no pull request" in result.stderr
    assert not hub.repo_exists("alice/none")


def test_a_failed_push_says_it_left_a_new_repo(hub, adapter):
    hub.fail_next(500, count=100, path="/commit/")
    result = run_cli("push", adapter, "alice/p5", "--token", TOKEN)
    assert result.exit_code == 1 and "the repo alice/p5 was created and is left empty" in result.stderr
    hub.fail_next(500, count=100, path="/commit/")
    again = run_cli("push", adapter, "alice/p5", "--token", TOKEN)
    assert again.exit_code == 1 and "was created" not in again.stderr  # it existed this time


def test_push_says_a_readme_in_the_folder_is_not_pushed(hub, adapter):
    """A tester's finding: a README.md in DIR was silently replaced by the generated card."""
    (adapter / "README.md").write_text("# my notes\n")
    result = run_cli("push", adapter, "alice/notes", "--token", TOKEN)
    assert result.exit_code == 0 and f"note: {adapter / 'README.md'} is not pushed" in result.stdout
    assert hub.files("alice/notes")["README.md"] != b"# my notes\n"
    dry = json.loads(run_cli("push", adapter, "alice/notes", "--dry-run", "--json").stdout)
    assert dry["notes"] == [f"{adapter / 'README.md'} is not pushed: the generated model card is the repo's README.md"]


def test_push_dry_run_sends_nothing(hub, adapter):
    result = run_cli("push", adapter, "alice/dry", "--dry-run")
    assert result.exit_code == 0, result.stderr
    assert hub.requests == []
    assert not hub.repo_exists("alice/dry")
    weights = (adapter / WEIGHTS).read_bytes()
    assert sha256_hex(weights) in result.stdout and str(len(weights)) in result.stdout
    assert "library_name: peft" in result.stdout and "README.md" in result.stdout
    result = run_cli("push", adapter, "alice/dry", "--dry-run", "--json", "--token", TOKEN)
    data = json.loads(result.stdout)
    assert data["dry_run"] is True and data["commit"] is None
    assert [f["path"] for f in data["files"]] == [WEIGHTS, CONFIG, "README.md"]
    assert data["files"][2]["sha256"] == hashlib.sha256(data["card"].encode()).hexdigest()
    assert hub.requests == [] and TOKEN not in result.stdout


def test_hostile_provenance_cannot_reshape_the_card(hf_cache, adapter):
    """mpt_tools.* metadata is copied into the card: newlines, pipes and backticks in it cannot add
    lines, break the table or leave its code span; long values are cut."""
    from mpt_tools.checkpoint import load_source
    from mpt_tools.formats import safetensors_bytes

    ckpt = load_source(adapter)
    tensors = {k: ckpt.read(k) for k in ("prompt_embeddings", "prefix_task_cols", "prefix_task_rows")}
    evil = "x`\n\n# Injected\n[click](http://evil.example) | y\r\x1b[31m"
    meta = {
        **ckpt.file.metadata,
        "mpt_tools.mode": "exact" + evil,
        "mpt_tools.source": "hf://org/src@" + evil,
        "mpt_tools.source_sha256": "a" * 5000,
        "mpt_tools.version": evil,
    }
    (adapter / WEIGHTS).write_bytes(safetensors_bytes(tensors, meta))
    result = run_cli("push", adapter, "alice/dry", "--dry-run", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    card = data["card"]
    assert "\n# Injected" not in card and "\x1b" not in card and "\r" not in card
    rows = [line for line in card.splitlines() if line.startswith("| ")]
    assert rows and all(line.count("|") == 3 and line.count("`") in (0, 2) for line in rows), rows
    assert max(len(line) for line in rows) < 260
    assert "\n" not in data["commit_message"] and "`" not in data["commit_message"]


@pytest.mark.parametrize(
    ("operation", "argv"),
    [
        ("tasks", ["tasks", "{fx}/causal", "--select", "2,0", "--out", "{out}"]),
        ("rerank", ["rerank", "{fx}/causal", "--num-ranks", "1", "--out", "{out}"]),
        ("convert", ["convert", "{fx}/causal", "--dtype", "bfloat16", "--out", "{out}"]),
        ("pack", ["pack", "--from", "{fx}/causal", "--num-ranks", "2", "--out", "{out}"]),
    ],
)
def test_the_card_says_how_every_operation_made_the_adapter(hf_cache, tmp_path, operation, argv):
    """Not only init's outputs: the card shows what every writer recorded (it said "Not recorded"
    for a packed adapter), with local paths reduced to their last part."""
    out = tmp_path / "made"
    made = run_cli(*[a.replace("{fx}", str(FIXTURES)).replace("{out}", str(out)) for a in argv])
    assert made.exit_code == 0, made.stderr
    result = run_cli("push", out, "alice/made", "--dry-run", "--json")
    assert result.exit_code == 0, result.stderr
    card = json.loads(result.stdout)["card"]
    assert f"(`mpt-tools {operation}`)" in card and "Not recorded" not in card
    assert str(FIXTURES) not in card and str(tmp_path) not in card  # no local path is published
    rows = [line for line in card.splitlines() if line.startswith("| ")]
    assert all(line.count("|") == 3 for line in rows), rows
    if operation == "pack":
        assert "| inputs | `causal#task0, causal#task1, causal#task2` |" in card
        assert "| num ranks | `2` |" in card
    else:
        assert "| source | `a local source (causal)` |" in card


def test_push_dry_run_without_any_server(hf_cache, adapter, monkeypatch):
    use_endpoint(monkeypatch, "http://127.0.0.1:9")  # nothing listens: a request would fail
    result = run_cli("push", adapter, "alice/dry", "--dry-run")
    assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize(
    ("repo", "token", "needles"),
    [
        ("alice/x", None, ["hf://alice/x", "needs a write token"]),
        ("alice/x", BAD_TOKEN, ["hf://alice/x", "rejected the token"]),
        ("bob/x", TOKEN, ["hf://bob/x", "cannot write", "403"]),
    ],
)
def test_push_errors(hub, adapter, repo, token, needles):
    if repo.startswith("bob/"):
        hub.add_repo(repo, {"a.txt": b"a"})
    args = ["push", adapter, repo] + (["--token", token] if token else [])
    assert_one_error_line(run_cli(*args), *needles)


def test_push_refuses_an_invalid_adapter(hub, adapter, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(adapter, bad)
    cfg = json.loads((bad / CONFIG).read_text())
    cfg["peft_type"] = "LORA"
    (bad / CONFIG).write_text(json.dumps(cfg))
    assert_one_error_line(run_cli("push", bad, "alice/bad", "--token", TOKEN), "refusing to push", "peft_type")
    assert_one_error_line(run_cli("push", tmp_path / "nope", "alice/bad", "--token", TOKEN), "no such folder")
    assert_one_error_line(run_cli("push", FIXTURES / "causal_bin", "alice/bad"), "convert")
    assert_one_error_line(run_cli("push", adapter, "not a repo"), "not a valid repo id")
    assert hub.requests == []


def test_push_a_baked_task_and_load_it_back_with_peft(hub, tmp_path):
    """A prompt-tuning folder that export wrote (one task's baked prompt) is pushed with its own card,
    and PEFT loads the pushed files with bitwise the MPT adapter's prompt of that task."""
    baked = tmp_path / "baked"
    assert run_cli("export", FIXTURES / "causal", "--to", "peft", "--out", baked).exit_code == 0
    result = run_cli("push", baked / "task_2", "alice/task2", "--token", TOKEN, "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["commit_message"].startswith("Upload prompt-tuning adapter with mpt-tools")
    files = hub.files("alice/task2")
    assert files[WEIGHTS] == (baked / "task_2" / WEIGHTS).read_bytes()
    card = files["README.md"].decode()
    assert "- prompt-tuning" in _front_matter(card).splitlines() and "multitask" not in _front_matter(card)
    assert "A prompt-tuning adapter for [PEFT]" in card and "task_ids=" not in card
    assert "(`mpt-tools export`)" in card and "| task | `2` |" in card and str(FIXTURES) not in card
    local = tmp_path / "pulled"  # the repo's files as the Hub serves them
    local.mkdir()
    for name, data in files.items():
        (local / name).write_bytes(data)
    import torch
    from peft import PeftModel
    from peft_oracle import tiny_model  # (sets HF_HUB_OFFLINE: imported once the Hub is done with)

    model = PeftModel.from_pretrained(tiny_model("CAUSAL_LM"), local)
    pushed = model.get_prompt(batch_size=1)[0]
    mpt = PeftModel.from_pretrained(tiny_model("CAUSAL_LM"), str(FIXTURES / "causal"))
    assert torch.equal(pushed, mpt.get_prompt(batch_size=1, task_ids=torch.tensor([2]))[0])


def test_push_refuses_a_prompt_tuning_folder_peft_cannot_load(hub, tmp_path):
    import numpy as np

    from mpt_tools.formats import from_numpy, safetensors_bytes

    baked = tmp_path / "baked"
    assert run_cli("export-prompt", FIXTURES / "causal", "--task", "0", "--out", baked).exit_code == 0
    good = (baked / WEIGHTS).read_bytes()
    cases = {
        "shape": (
            {"prompt_embeddings": np.zeros((5, 16), np.float32)},
            "prompt_embeddings has 5 rows but adapter_config.json says num_virtual_tokens 4"
            " x num_transformer_submodules 1",
        ),
        "nan": ({"prompt_embeddings": np.full((4, 16), np.nan, np.float32)}, "NaN or Inf"),
        "two": (
            {"prompt_embeddings": np.zeros((4, 16), np.float32), "x": np.zeros(1, np.float32)},
            "holds one tensor, prompt_embeddings",
        ),
    }
    for tensors, needle in cases.values():
        raw = {k: from_numpy(v) for k, v in tensors.items()}
        (baked / WEIGHTS).write_bytes(safetensors_bytes(raw, {"format": "pt"}))
        assert_one_error_line(run_cli("push", baked, "alice/bad", "--token", TOKEN), "refusing to push", needle)
    (baked / WEIGHTS).write_bytes(good[:100])  # truncated: the hardened reader's one line
    assert_one_error_line(run_cli("push", baked, "alice/bad", "--token", TOKEN), WEIGHTS)
    assert hub.requests == []


# --------------------------------------------------------------------------- round trip and secrecy


def test_round_trip_init_push_init(hub, src, tmp_path):
    first_out, second_out = tmp_path / "first", tmp_path / "second"
    commit = hub.head(src)
    result = run_cli(
        "init", src, "--mode", "average", "--out", first_out, "--push", "alice/avg", "--private", "--token", TOKEN
    )
    assert result.exit_code == 0, result.stderr
    assert "commit: " in result.stdout
    with safe_open(str(first_out / WEIGHTS), "pt") as fh:
        meta = fh.metadata()
    assert meta["mpt_tools.source"] == f"hf://{src}@{commit}"
    assert meta["mpt_tools.source_revision"] == commit
    pushed = hub.files("alice/avg")
    assert pushed[WEIGHTS] == (first_out / WEIGHTS).read_bytes()
    card = pushed["README.md"].decode()
    assert f"hf://{src}@{commit}" in card and "AVERAGE_SOURCE_TASKS" in card

    result = run_cli("init", "alice/avg", "--mode", "exact", "--task", "0", "--out", second_out, "--token", TOKEN)
    assert result.exit_code == 0, result.stderr
    assert tensors(first_out) == tensors(second_out)  # bitwise
    with safe_open(str(second_out / WEIGHTS), "pt") as fh:
        assert fh.metadata()["mpt_tools.source"] == f"hf://alice/avg@{hub.head('alice/avg')}"

    # The token is nowhere: not in written files, pushed files, metadata, config or card.
    for path in [*first_out.iterdir(), *second_out.iterdir()]:
        assert TOKEN.encode() not in path.read_bytes(), path
    for repo in ("alice/avg", src):
        for name, data in hub.files(repo).items():
            assert TOKEN.encode() not in data, (repo, name)
    assert TOKEN not in result.stdout and TOKEN not in result.stderr


def test_verify_finds_a_recorded_hub_source_in_the_cache_only(hub, src, tmp_path, hf_cache):
    out = tmp_path / "t"
    assert run_cli("init", src, "--mode", "exact", "--task", "1", "--out", out).exit_code == 0
    hub.clear_requests()
    result = run_cli("verify", out, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["target"]["source"].startswith(f"hf://{src}@")
    assert report["target"]["task"] == 1 and all(c["ok"] for c in report["target"]["checks"])
    assert hub.requests == []  # pinned commit from the cache: nothing asked of the Hub

    shutil.rmtree(hf_cache)  # not cached any more: a note, still no request, no download
    result = run_cli("verify", out, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["target"] is None and hub.requests == []
    assert any("not in the local Hub cache" in n and "--source hf://" in n for n in report["notes"])
    result = run_cli("verify", out, "--source", report["notes"][0].split("--source ")[1].split()[0], "--json")
    assert result.exit_code == 0, result.stderr
    assert all(c["ok"] for c in json.loads(result.stdout)["target"]["checks"])


def test_verify_an_adapter_on_the_hub_against_a_hub_source(hub, src, tmp_path):
    """verify PATH and --source may both be Hub repos: the Hub flags (--revision, --subfolder for
    PATH; --token, --offline for both) work as for every other command."""
    out = tmp_path / "t"
    assert run_cli("init", src, "--mode", "average", "--out", out).exit_code == 0
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    hub.add_repo("alice/private-target", {f"v1/{k}": v for k, v in files.items()}, private=True)
    first = run_cli("verify", "alice/private-target", "--subfolder", "v1", "--source", src, "--token", TOKEN, "--json")
    assert first.exit_code == 0, first.stderr
    report = json.loads(first.stdout)
    assert report["target"]["mode"] == "average" and all(c["ok"] for c in report["target"]["checks"])
    assert report["path"] == "alice/private-target" and TOKEN not in first.stdout
    hub.clear_requests()
    again = run_cli("verify", "hf://alice/private-target/v1", "--source", src, "--offline", "--json")
    assert again.exit_code == 0, again.stderr
    assert hub.requests == [] and json.loads(again.stdout)["target"] == report["target"]
    # no token, and a cache folder without it (a cached copy would be used, as huggingface_hub does)
    denied = run_cli("verify", "alice/private-target", "--subfolder", "v1", "--cache-dir", tmp_path / "empty")
    assert_one_error_line(denied, "hf://alice/private-target")


def test_init_push_json_and_pr(hub, adapter, tmp_path):
    hub.add_repo("alice/target", {"a.txt": b"a"})
    out = tmp_path / "pr"
    result = run_cli(
        "init",
        FIXTURES / "causal",
        "--mode",
        "shared",
        "--seed",
        "3",
        "--out",
        out,
        "--push",
        "alice/target",
        "--create-pr",
        "--token",
        TOKEN,
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["push"]["pr_url"] == f"{hub.url}/alice/target/discussions/1"
    card = hub.files("alice/target", "refs/pr/1")["README.md"].decode()
    assert "| seed | `3` |" in card and "ONLY_SOURCE_SHARED" in card
    assert "a local source (causal)" in card and str(FIXTURES) not in card


def test_init_push_failure_says_the_adapter_was_written(hub, tmp_path):
    out = tmp_path / "kept"
    result = run_cli("init", FIXTURES / "causal", "--mode", "average", "--out", out, "--push", "alice/x")
    assert_one_error_line(result, "needs a write token", "was written to", "mpt-tools push")
    assert (out / WEIGHTS).is_file()


def test_library_push_adapter(hub, adapter):
    dry = push_adapter(adapter, "alice/lib", dry_run=True)
    assert dry["dry_run"] and hub.requests == []
    done = push_adapter(adapter, "alice/lib", token=TOKEN, revision="v1")
    assert done["commit"] == hub.head("alice/lib", "v1")
    assert (
        done["card"]
        == hub.files("alice/lib", "v1")["README.md"].decode()
        == dry["card"].replace(
            'PeftModel.from_pretrained(base, "alice/lib")',
            'PeftModel.from_pretrained(base, "alice/lib", revision="v1")',
        )
    )


# --------------------------------------------------------------------------- base-model check


def _base_repo(hub, config: dict) -> None:
    hub.add_repo("tiny-random/gpt2", {"config.json": json.dumps(config).encode(), "model.safetensors": b"x" * 64})


def _findings(result) -> list[dict]:
    return [f for f in json.loads(result.stdout)["findings"] if f["code"] == "base-model"]


@pytest.mark.parametrize("spelled", ["hf://tiny-random/gpt2", "tiny-random/gpt2@main", "hf://tiny-random/gpt2@main"])
def test_base_model_in_hub_source_spelling(hub, spelled):
    """A tester's finding: ``--base-model hf://org/name`` was "neither a local folder nor a Hub repo id"."""
    _base_repo(hub, {"n_embd": 16})
    result = run_cli("validate", FIXTURES / "causal", "--base-model", spelled, "--json")
    assert result.exit_code == 0, result.stderr
    [finding] = _findings(result)
    assert finding["level"] == "info", finding


@pytest.mark.parametrize("key", ["n_embd", "hidden_size", "d_model"])
def test_base_model_check_matches(hub, key):
    _base_repo(hub, {key: 16})
    result = run_cli("validate", FIXTURES / "causal", "--check-base-model", "--json")
    assert result.exit_code == 0, result.stderr
    (finding,) = _findings(result)
    assert finding["level"] == "info" and finding["expected"] == 16
    gets = [r.path for r in hub.find_requests("GET", "/resolve/")]
    assert gets == ["/tiny-random/gpt2/resolve/main/config.json"]  # only the config, no weights


def test_base_model_check_mismatch(hub, tmp_path):
    _base_repo(hub, {"hidden_size": 32})
    result = run_cli("validate", FIXTURES / "causal", "--check-base-model", "--json")
    assert result.exit_code == 1
    (finding,) = _findings(result)
    assert finding["level"] == "error" and (finding["expected"], finding["found"]) == (32, 16)
    result = run_cli("validate", FIXTURES / "causal", "--check-base-model")
    assert "base model tiny-random/gpt2" in result.stdout and "token_dim" in result.stderr
    out = tmp_path / "refused"
    result = run_cli("init", FIXTURES / "causal", "--mode", "average", "--out", out, "--check-base-model")
    assert_one_error_line(result, "token_dim", "base model")
    assert not out.exists()


def test_base_model_local_folder(tmp_path, hub):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"text_config": {"hidden_size": 16}}))
    result = run_cli("validate", FIXTURES / "causal", "--base-model", base, "--json")
    assert result.exit_code == 0 and _findings(result)[0]["level"] == "info"
    (base / "config.json").write_text(json.dumps({"d_model": 8}))
    result = run_cli("validate", FIXTURES / "causal", "--base-model", base, "--json")
    assert result.exit_code == 1 and _findings(result)[0]["level"] == "error"
    out = tmp_path / "t"
    result = run_cli("init", FIXTURES / "causal", "--mode", "exact", "--out", out, "--base-model", base)
    assert_one_error_line(result, "token_dim")
    assert hub.requests == []


def test_base_model_unavailable_is_a_warning(hub, monkeypatch, tmp_path):
    result = run_cli("validate", FIXTURES / "causal", "--check-base-model", "--json")  # not on the Hub
    assert result.exit_code == 0, result.stderr
    (finding,) = _findings(result)
    assert finding["level"] == "warning" and "repository not found" in finding["message"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run_cli("validate", FIXTURES / "causal", "--base-model", "org/uncached", "--json")
    assert result.exit_code == 0
    (finding,) = _findings(result)
    assert finding["level"] == "warning" and "offline" in finding["message"]
    assert "run online (without --offline or HF_HUB_OFFLINE)" in finding["fix"]
    for local in (tmp_path / "nope", FIXTURES):  # a local path: going online would not help
        (finding,) = _findings(run_cli("validate", FIXTURES / "causal", "--base-model", local, "--json"))
        assert finding["level"] == "warning" and "online" not in finding["fix"], finding


def test_base_model_offline_by_default_in_tests(tmp_path):
    """conftest sets HF_HUB_OFFLINE=1: the check warns and validate still passes."""
    result = run_cli("validate", FIXTURES / "causal", "--check-base-model")
    assert result.exit_code == 0, result.stderr
    assert "warning: base_model: cannot check the base model" in result.stdout
    out = tmp_path / "t"
    result = run_cli("init", FIXTURES / "causal", "--mode", "average", "--out", out, "--check-base-model")
    assert result.exit_code == 0 and "cannot check the base model" in result.stderr
    assert (out / WEIGHTS).is_file()


def test_local_commands_never_import_huggingface_hub(tmp_path):
    script = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from mpt_tools.cli import cli\n"
        f"r = CliRunner().invoke(cli, ['validate', {str(FIXTURES / 'causal')!r}])\n"
        "assert r.exit_code == 0, r.output\n"
        f"r = CliRunner().invoke(cli, ['init', {str(FIXTURES / 'causal')!r}, '--mode', 'average', "
        f"'--out', {str(tmp_path / 'o')!r}])\n"
        "assert r.exit_code == 0, r.output\n"
        "r = CliRunner().invoke(cli, ['push', " + repr(str(tmp_path / "o")) + ", 'alice/x', '--dry-run'])\n"
        "assert r.exit_code == 0, r.output\n"
        "print('huggingface_hub' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


@pytest.mark.skipif(
    int(huggingface_hub.__version__.split(".")[0]) < 1,
    reason="huggingface_hub before 1.0 does not read HF_HUB_DISABLE_SYMLINKS (its cache always links)",
)
def test_corruption_caught_without_symlinks_in_the_cache(hub, src, hf_cache):
    """A cache without symlinks (Windows) keeps no etag-named blob: the Hub's paths-info is asked."""
    env = hub.env(HF_HOME=str(hf_cache.parent), HF_HUB_DISABLE_SYMLINKS="1")
    hub.corrupt(src, WEIGHTS, "flip")
    result = run_cli_process("inspect", src, env=env)
    assert_one_error_line(result, src, "sha256 mismatch")
    assert hub.find_requests("POST", "/paths-info/")
    assert not [p for p in hf_cache.rglob(WEIGHTS) if not p.is_symlink()]
    hub.uncorrupt(src, WEIGHTS)
    done = run_cli_process("inspect", src, "--json", "--no-norms", env=env)
    assert done.exit_code == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["files"][0]["sha256"] == sha256_hex(adapter_files()[WEIGHTS])
    assert not Path(report["files"][0]["path"]).is_symlink()


def test_pull_request_against_a_missing_branch(hub, adapter):
    hub.add_repo("alice/prb", {"a.txt": b"a"})
    result = run_cli("push", adapter, "alice/prb", "--revision", "nope", "--create-pr", "--token", TOKEN)
    assert_one_error_line(result, "hf://alice/prb@nope", "branch nope not found", "without --create-pr")
    assert hub.pull_requests("alice/prb") == []


def test_repo_without_config_online_then_offline(hub):
    hub.add_repo("org/bare", {WEIGHTS: adapter_files()[WEIGHTS]})
    result = run_cli("inspect", "org/bare", "--json", "--no-norms", "--num-virtual-tokens", "4")
    assert result.exit_code == 0, result.stderr
    online = json.loads(result.stdout)
    assert online["config_source"] == "inferred from the tensor shapes"
    hub.clear_requests()
    result = run_cli("inspect", "org/bare", "--json", "--no-norms", "--num-virtual-tokens", "4", "--offline")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["hub"] == online["hub"]
    assert hub.requests == []


def test_an_existing_local_path_wins_over_a_repo_id(hub, src, tmp_path, monkeypatch):
    """`org/src` names a local folder here and a Hub repo there: the local folder is read, no request."""
    local = tmp_path / "org" / "src"
    shutil.copytree(FIXTURES / "seq2seq", local)
    monkeypatch.chdir(tmp_path)
    before = len(hub.requests)
    data = inspect_json("org/src")
    assert data["hub"] is None and data["config"]["task_type"] == "SEQ_2_SEQ_LM"
    assert len(hub.requests) == before
    # gone locally, folder `org` included (with `org/` still here, `org/src` reads as a missing local
    # path: see test_arguments.py::test_a_missing_path_says_no_such_file_at_once): now the Hub repo
    shutil.rmtree(tmp_path / "org")
    data = inspect_json("org/src")
    assert data["hub"]["repo_id"] == "org/src" and data["config"]["task_type"] == "CAUSAL_LM"


# --------------------------------------------------------------------------- pack from the Hub


@pytest.fixture
def prompt_repos(hub, tmp_path) -> dict[str, Path]:
    """PEFT prompt-tuning adapters as export-prompt bakes them: tasks 0-2 of the causal fixture
    (pt0-pt2) and task 0 of its float16 copy (pt3), on the Hub as org/pt0 (main), org/pt1 (pt1 at
    tag v1, then main moved on to pt3) and org/pt2 (in the subfolder `named`, private); the local
    folders by name."""
    local = {}
    for k, fixture in enumerate(["causal"] * 3 + ["causal_fp16"]):
        folder = tmp_path / f"pt{k}"
        result = run_cli("export-prompt", FIXTURES / fixture, "--task", str(k % 3), "--out", folder)
        assert result.exit_code == 0, result.stderr
        local[f"pt{k}"] = folder
    files = {k: {p.name: p.read_bytes() for p in f.iterdir() if p.name != "README.md"} for k, f in local.items()}
    hub.add_repo("org/pt0", files["pt0"])
    hub.add_tag("org/pt1", "v1", hub.add_repo("org/pt1", files["pt1"]))
    hub.add_commit("org/pt1", files["pt3"])
    hub.add_repo("org/pt2", {f"named/{name}": data for name, data in files["pt2"].items()}, private=True)
    return local


def test_pack_reads_prompt_tuning_adapters_from_the_hub(hub, prompt_repos, tmp_path):
    """PROMPTS may be Hub repos (org/name, hf://org/name@rev, hf://org/name/sub; --token for a
    private one): the adapter is byte for byte the one packed from the same folders on disk, each
    task's input is its URL at the commit read, and --offline packs them again from the cache."""
    from_disk = run_cli(
        "pack", prompt_repos["pt0"], prompt_repos["pt1"], prompt_repos["pt2"], "--num-ranks", "2",
        "--out", tmp_path / "disk", "--json",
    )  # fmt: skip
    assert from_disk.exit_code == 0, from_disk.stderr
    inputs = ["org/pt0", "hf://org/pt1@v1", "hf://org/pt2/named"]
    result = run_cli("pack", *inputs, "--num-ranks", "2", "--token", TOKEN, "--out", tmp_path / "hub", "--json")
    assert result.exit_code == 0, result.stderr
    data, disk = json.loads(result.stdout), json.loads(from_disk.stdout)
    commits = [hub.head("org/pt0"), hub.head("org/pt1", "v1"), hub.head("org/pt2")]
    assert [t["input"] for t in data["tasks"]] == [
        f"hf://org/pt0@{commits[0]}",
        f"hf://org/pt1@{commits[1]}",
        f"hf://org/pt2@{commits[2]}/named",
    ]
    assert [t["kind"] for t in data["tasks"]] == ["peft"] * 3
    assert [t["relative_error"] for t in data["tasks"]] == [t["relative_error"] for t in disk["tasks"]]
    assert tensors(tmp_path / "hub") == tensors(tmp_path / "disk")
    disk_cfg = json.loads((tmp_path / "disk" / CONFIG).read_text())
    assert json.loads((tmp_path / "hub" / CONFIG).read_text()) == disk_cfg
    assert {r.authorization for r in hub.requests} == {f"Bearer {TOKEN}"}
    assert TOKEN not in result.stdout + result.stderr
    meta = safe_open(str(tmp_path / "hub" / WEIGHTS), "np").metadata()
    assert f"hf://org/pt1@{commits[1]}" in meta["mpt_tools.inputs"]

    hub.clear_requests()
    again = run_cli(
        "pack", f"hf://org/pt0@{commits[0]}", "hf://org/pt1@v1", "hf://org/pt2/named", "--num-ranks", "2",
        "--offline", "--out", tmp_path / "offline", "--json",
    )  # fmt: skip
    assert again.exit_code == 0, again.stderr
    assert hub.requests == []
    assert tensors(tmp_path / "offline") == tensors(tmp_path / "disk")


def test_pack_shows_a_bar_while_it_downloads_prompts(hub, prompt_repos, tmp_path, capsys):
    """Hub prompts are downloaded under a bar (bars on, as on a terminal), one step per prompt."""
    from mpt_tools import PackOptions, pack_prompts, progress

    progress.enable(True)
    try:
        pack_prompts(["org/pt0", "org/pt1"], tmp_path / "out", options=PackOptions(num_ranks=2, max_iters=1))
    finally:
        progress.enable(False)
    err = capsys.readouterr().err
    assert "download:" in err and "/2" in err and "prompt/s" in err


def test_pack_takes_hub_adapters_for_every_input(hub, src, prompt_repos, tmp_path):
    """--from, --shared and --append-to read Hub MPT adapters, --shared a Hub prompt too (its P* is
    then that prompt, bitwise): the same bytes as from the local folders; Hub inputs are named by
    their URL at the commit read (tasks and the fixed P*)."""
    local_src = FIXTURES / "causal"
    for flags, local_flags in (
        (["--from", src], ["--from", local_src]),
        (["--append-to", src], ["--append-to", local_src]),
        (["--shared", src, "--num-ranks", "2"], ["--shared", local_src, "--num-ranks", "2"]),
        (["--shared", "org/pt0", "--num-ranks", "2"], ["--shared", prompt_repos["pt0"], "--num-ranks", "2"]),
    ):
        name = flags[0].strip("-") + flags[1].replace("/", "-")
        hub_run = run_cli("pack", "org/pt1", *flags, "--num-ranks", "2", "--out", tmp_path / name, "--json")
        local_run = run_cli(
            "pack", prompt_repos["pt3"], *local_flags, "--num-ranks", "2", "--out", tmp_path / f"{name}-local"
        )  # org/pt1's main is pt3
        assert hub_run.exit_code == 0, (flags, hub_run.stderr)
        assert local_run.exit_code == 0, (flags, local_run.stderr)
        assert tensors(tmp_path / name) == tensors(tmp_path / f"{name}-local"), flags
    commit, pt0 = hub.head(src), hub.head("org/pt0")
    labels = json.loads(
        run_cli("pack", "org/pt1", "--from", src, "--num-ranks", "2", "--out", tmp_path / "l", "--json").stdout
    )
    assert [t["input"] for t in labels["tasks"]] == [f"hf://org/pt1@{hub.head('org/pt1')}"] + [
        f"hf://{src}@{commit}#task{k}" for k in range(3)
    ]
    for shared, label in ((src, f"hf://{src}@{commit}"), ("org/pt0", f"hf://org/pt0@{pt0}")):
        result = run_cli(
            "pack", "org/pt1", "--shared", shared, "--num-ranks", "2", "--out", tmp_path / "s", "--force", "--json"
        )
        assert json.loads(result.stdout)["shared"] == label
    pe = tensors(FIXTURES / "causal")["prompt_embeddings"][2]
    assert tensors(tmp_path / f"shared{src.replace('/', '-')}")["prompt_embeddings"][2] == pe
    assert tensors(tmp_path / f"append-to{src.replace('/', '-')}")["prompt_embeddings"][2] == pe


def test_pack_hub_errors_are_one_line_and_write_nothing(hub, src, prompt_repos, tmp_path):
    """Missing, private, offline, an MPT adapter given as a prompt; and hostile weights on the Hub
    (a pickle that would run code, a truncated safetensors file, their hashes right): one line
    naming the repo at its commit and the file, nothing written, nothing run."""
    from corpus import exec_payload

    config = (prompt_repos["pt0"] / CONFIG).read_bytes()
    sentinel = tmp_path / "pwned"
    evil = hub.add_repo("org/evil", {CONFIG: config, "adapter_model.bin": exec_payload(sentinel)})
    good = (prompt_repos["pt0"] / WEIGHTS).read_bytes()
    short = hub.add_repo("org/short", {CONFIG: config, WEIGHTS: good[: len(good) - 8]})
    out = tmp_path / "out"
    cases = [
        (["org/evil"], [f"hf://org/evil@{evil}/adapter_model.bin"]),
        (["org/short"], [f"hf://org/short@{short}/{WEIGHTS}"]),
        (["org/missing"], ["hf://org/missing@main", "repository not found"]),
        (["hf://org/pt2/named"], ["org/pt2", "repository not found", "--token"]),  # private, no token
        ([src], [f"hf://{src}@{hub.head(src)}", "Multitask Prompt Tuning", "--from SOURCE"]),
        (["org/pt0", "--offline", "--cache-dir", str(tmp_path / "empty")], ["org/pt0", "not in the local cache"]),
        (["hf://org/pt1@nope"], ["hf://org/pt1@nope", "revision not found"]),
    ]
    for args, needles in cases:
        result = run_cli("pack", *args, "--num-ranks", "2", "--out", out)
        assert_one_error_line(result, *needles)
        assert not out.exists(), args
    assert not sentinel.exists()


@pytest.mark.parametrize("what", ["weights", "config"])
def test_push_refuses_a_folder_that_changes_while_it_is_checked(hub, adapter, tmp_path, monkeypatch, what):
    """A tester's race: push validated the folder, then read the files again to upload them, so a
    file swapped in between (NaN weights) was pushed. A change between the first read and the end
    of the checks is refused, and nothing is sent."""
    import shutil

    import mpt_tools.hub.push as push_module

    bad = tmp_path / "bad"
    shutil.copytree(adapter, bad)
    if what == "config":
        config = json.loads((bad / "adapter_config.json").read_text())
        (bad / "adapter_config.json").write_text(json.dumps({**config, "num_virtual_tokens": 99}))
    name = "adapter_model.safetensors" if what == "weights" else "adapter_config.json"
    real = push_module.require_valid

    def swapping(*args, **kwargs):
        done = real(*args, **kwargs)
        os.replace(shutil.copy(bad / name, adapter / f".{name}.new"), adapter / name)
        return done

    monkeypatch.setattr(push_module, "require_valid", swapping)
    with pytest.raises(HubError, match="changed while it was checked"):
        push_adapter(adapter, "alice/race", token=TOKEN)
    assert not hub.repo_exists("alice/race")


def test_quiet_holds_when_huggingface_hub_is_first_imported_inside_and_across_threads():
    """A tester's finding: ``audit --author`` printed huggingface_hub's retry log. Importing
    huggingface_hub inside the quiet block reset its logger's level; and two threads' blocks that
    overlapped restored the level while the other still ran."""
    code = (
        "import logging\n"
        "from mpt_tools.hub.download import _quiet\n"
        "log = logging.getLogger('huggingface_hub')\n"
        "with _quiet():\n"
        "    from huggingface_hub import HfApi\n"
        "    assert log.level > logging.CRITICAL, log.level\n"
        "a, b = _quiet(), _quiet()\n"
        "a.__enter__(); b.__enter__(); a.__exit__(None, None, None)\n"
        "assert log.level > logging.CRITICAL  # b is still in its block\n"
        "b.__exit__(None, None, None)\n"
        "assert log.level <= logging.CRITICAL\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MPT_TOOLS_DEBUG"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr


def test_a_downloaded_files_content_error_names_it_on_the_hub(hub):
    """A tester's finding: a bad file of a Hub source was named by its cache path
    (``~/.cache/huggingface/hub/models--org--x/snapshots/...``); it is named as on the Hub."""
    hub.add_repo("org/badcfg", {**adapter_files(), "adapter_config.json": b"{not json"})
    commit = hub.head("org/badcfg")
    result = run_cli("validate", "org/badcfg")
    assert result.exit_code == 1 and result.stderr.startswith(f"error: hf://org/badcfg@{commit}/adapter_config.json: ")
    assert "snapshots" not in result.stderr


@pytest.mark.parametrize("etag", ["../../../../../../{tmp}/PWNED", "not-a-hash-1"])
def test_an_etag_that_is_no_hash_is_refused_before_anything_is_written(hub, src, tmp_path, etag):
    """A hostile endpoint's ETag names the cached blob (huggingface_hub writes ``blobs/<etag>``):
    ``../../x`` wrote the download outside the cache, and a name that is no hash skipped the check."""
    etag = etag.format(tmp=str(tmp_path).lstrip("/"))
    weights = (FIXTURES / "causal" / "adapter_model.safetensors").read_bytes()
    commit = hub.head("org/src")
    headers = {"ETag": f'"{etag}"', "X-Linked-Etag": f'"{etag}"', "X-Repo-Commit": commit}
    hub.fail_next(200, count=20, path="adapter_model.safetensors", headers=headers, body=weights)
    result = run_cli("inspect", "org/src", "--no-norms")
    assert result.exit_code == 1 and "not a content hash" in result.stderr, result.stderr
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "PWNED.lock").exists()


def test_endpoint_credentials_are_never_printed(hub, src, monkeypatch):
    """A tester's finding: ``HF_ENDPOINT=http://user:secret@mirror`` was printed whole in errors and
    in inspect's JSON."""
    use_endpoint(monkeypatch, hub.url.replace("http://", "http://user:s3cr3tpw@"))
    result = run_cli("inspect", src, "--json", "--no-norms")
    assert "s3cr3tpw" not in result.stdout + result.stderr
    dead = FakeHub()
    dead.close()
    use_endpoint(monkeypatch, dead.url.replace("http://", "http://user:s3cr3tpw@"))
    result = run_cli("inspect", "org/other", "--no-norms")
    assert result.exit_code == 1 and "cannot connect" in result.stderr and "s3cr3tpw" not in result.stderr


def test_an_unreadable_hub_answer_is_a_hub_error(hub, src):
    """A tester's finding: a listing answered with HTML or a JSON list was an internal error."""
    hub.fail_next(200, count=20, path="/api/models/org/src", headers={"Content-Type": "application/json"}, body=b"[1]")
    result = run_cli("audit", src, "--json")
    rows = [json.loads(line) for line in result.stdout.splitlines()][:-1]
    assert "the Hub's answer cannot be read" in rows[0]["error"] and "internal error" not in rows[0]["error"]


@pytest.mark.parametrize(
    ("fault", "said"),
    [
        ({"status": 302, "headers": {"Location": "/org/src/resolve/main/adapter_config.json"}}, "a redirect loop"),
        ({"status": 200, "method": "GET", "headers": {"Content-Length": "5000"}, "body": b"{}"}, "broke off before"),
        ({"disconnect": True}, "closed the connection without answering"),
    ],
    ids=["redirect-loop", "short-body", "no-answer"],
)
def test_a_broken_answer_is_named_not_cannot_connect(hub, src, fault, said):
    """A tester's finding: a redirect loop, a body shorter than its Content-Length and a connection
    closed without an answer all said "cannot connect", which sent users to check their network."""
    hub.fail_next(count=10_000, path="adapter_config.json", **fault)
    result = run_cli("inspect", src, "--no-norms")
    assert result.exit_code == 1 and said in result.stderr and "cannot connect" not in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_an_endpoint_that_is_no_http_url_is_named(hub, src, monkeypatch):
    use_endpoint(monkeypatch, "ftp://mirror.example")
    result = run_cli("inspect", src, "--no-norms")
    assert result.exit_code == 1 and "ftp://mirror.example gave a URL that is not http(s)" in result.stderr


def test_an_answer_without_etag_says_so(hub, src):
    hub.fail_next(302, count=100, path="adapter_config.json", headers={"Location": "ftp://elsewhere.example/x"})
    result = run_cli("inspect", src, "--no-norms")
    assert result.exit_code == 1 and "the Hub sent no ETag (content hash) for it" in result.stderr, result.stderr


def test_a_config_over_its_limit_is_refused_before_it_is_downloaded(hub):
    """No download size cap: a hostile endpoint's 2 MiB adapter_config.json was downloaded whole
    (it could be gigabytes), then refused; the HEAD's size refuses it before a byte is fetched."""
    config = json.loads((FIXTURES / "causal" / "adapter_config.json").read_text())
    big = json.dumps({**config, "padding": "x" * (2 << 20)}).encode()
    hub.add_repo("org/big", {**adapter_files(), "adapter_config.json": big})
    result = run_cli("inspect", "org/big", "--no-norms")
    assert result.exit_code == 1 and "more than adapter_config.json can be (1,048,576 bytes)" in result.stderr
    assert not hub.find_requests("GET", "adapter_config.json")


def test_a_file_larger_than_the_caches_free_space_is_not_downloaded(hub, src, hf_cache, monkeypatch):
    """huggingface_hub only warns when a download will not fit, then fills the disk."""
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=1000))
    result = run_cli("inspect", src, "--no-norms")
    assert result.exit_code == 1 and "bytes free: free some space or give --cache-dir" in result.stderr, result.stderr
    assert not hub.find_requests("GET", "adapter_model.safetensors")  # 1008 bytes; the config is smaller
    assert not list(hf_cache.rglob(sha256_hex(adapter_files()[WEIGHTS]) + "*"))
