"""``push``: an adapter folder and its model card to the Hub in one commit."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from ..checkpoint import load_source
from ..checks import require_valid
from ..config import CONFIG_NAME, PROMPT_TUNING_TYPE, WEIGHTS_NAME, MptConfig, read_config
from ..errors import HubError, MptToolsError, flag
from ..formats import open_safetensors
from ..results import PushedFile, PushResult
from ..version import __version__
from .card import CARD_NAME, _plain, model_card
from .download import (
    _HUB_ID_RE,
    _chain,
    _endpoint,
    _is_hub_exception,
    _known_tokens,
    _network_message,
    _quiet,
    _status,
    is_offline,
    scrub,
)


def _validate_repo_id(repo_id: str) -> None:
    if not _HUB_ID_RE.fullmatch(repo_id) or "/" not in repo_id or ".." in repo_id or "--" in repo_id:
        raise HubError("not a valid repo id to push to: expected org/name", repo_id)


def _create_pr() -> str:
    """How a message names opening a pull request: ``--create-pr`` or ``create_pr=True``."""
    return flag("--create-pr", "create_pr=True")


def _push_error(exc: BaseException, *, where: str, token: str | None, revision: str | None) -> HubError:
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    tokens = _known_tokens(token)
    status = next((s for s in (_status(e) for e in _chain(exc)) if s is not None), None)
    if isinstance(exc, RevisionNotFoundError) and revision and revision.startswith("refs/pr/"):
        msg = f"pull request {revision} not found: push to an open one, or {_create_pr()} to open one"
    elif isinstance(exc, RevisionNotFoundError):
        msg = f"branch {revision} not found: push without {_create_pr()} to create it"
    elif status == 401 and not tokens:
        msg = f"pushing needs a write token: pass {flag('--token', 'token=')}, set HF_TOKEN or run `hf auth login`"
    elif status == 401:
        msg = f"the Hub rejected the token (HTTP 401): check {flag('--token', 'token=')} / HF_TOKEN / `hf auth login`"
    elif status == 403:
        msg = f"your token cannot write to this repo (HTTP 403): use a write token for it, or {_create_pr()}"
    elif isinstance(exc, RepositoryNotFoundError):
        msg = "repository not found or not visible to your token"
    else:
        net = _network_message(exc, token_given=bool(tokens), writing=True)
        msg = net or f"push failed ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
    return HubError(scrub(msg, tokens), where)


def _check_prompt_tuning(weights: Path, config: MptConfig) -> dict[str, str]:
    """A PEFT prompt-tuning folder (what ``export --to peft`` and ``export-prompt`` write) that PEFT
    loads: one float ``prompt_embeddings`` of the shape ``config`` says, every value finite;
    ValidationError (one line, "refusing to push") otherwise. Returns the weights' metadata."""
    import numpy as np

    from ..errors import ValidationError
    from ..formats import DTYPE_NAMES, to_float32

    def refuse(problem: str) -> ValidationError:
        return ValidationError(f"refusing to push: {problem}", str(weights))

    tfile = open_safetensors(weights)
    names = list(tfile.infos)
    if len(names) != 1 or not names[0].endswith("prompt_embeddings"):
        raise refuse(f"a prompt-tuning adapter holds one tensor, prompt_embeddings; found {names[:5]}")
    info = tfile.infos[names[0]]
    if info.dtype not in DTYPE_NAMES:
        raise refuse(f"prompt_embeddings is {info.dtype}, not a float dtype PEFT trains in")
    if config.total_virtual_tokens is None or config.size("token_dim") is None:
        raise refuse("adapter_config.json lacks a positive num_virtual_tokens, num_transformer_submodules or token_dim")
    problem = config.prompt_shape_problem(info.shape) if len(info.shape) == 2 else "prompt_embeddings is not 2-D"
    if problem is not None:
        raise refuse(problem)
    if not np.isfinite(to_float32(tfile.read(names[0]))).all():
        raise refuse("prompt_embeddings holds NaN or Inf")
    return dict(tfile.metadata or {})


def _stamp(*paths: Path) -> list[tuple[int, int, int, int, int]]:
    """Each file's identity and last change (inode, size, modification and change times): a write
    in place or a rename over it changes the stamp."""
    out = []
    for path in paths:
        st = os.stat(path)
        out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return out


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
) -> PushResult:
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
    if not os.path.lexists(src):
        raise HubError("no such folder", str(src))
    if not os.path.isdir(src):  # (False, not an OSError, for a name too long)
        raise HubError(
            flag(
                "not an adapter folder (push takes one: what `mpt-tools init` writes, or a task that "
                "`mpt-tools export --to peft` baked)",
                "not an adapter folder (push_adapter() takes one: what init_adapter() writes, or a task that "
                'export_prompts(..., to="peft") baked)',
            ),
            str(src),
        )
    weights = src / WEIGHTS_NAME
    config_file = src / CONFIG_NAME
    if not weights.is_file():
        hint = (
            ": convert it first with " + flag("`mpt-tools convert DIR --out NEW_DIR`", "convert(DIR, NEW_DIR)")
            if (src / "adapter_model.bin").exists()
            else ""
        )
        raise HubError(f"no {WEIGHTS_NAME} here{hint}", str(src))
    if not config_file.is_file():
        raise HubError(f"no {CONFIG_NAME} here: PEFT cannot load an adapter without it", str(src))
    stamp = _stamp(weights, config_file)  # what is checked must be what is sent
    parsed = read_config(config_file)  # bounded, one line for a hostile file
    config, config_bytes = dict(parsed.raw), config_file.read_bytes()
    weight_bytes = weights.read_bytes()
    prompt_tuning = config.get("peft_type") == PROMPT_TUNING_TYPE
    if prompt_tuning:  # one task's baked prompt (export --to peft, export-prompt)
        metadata = _check_prompt_tuning(weights, parsed)
    else:
        ckpt = load_source(src)
        require_valid(ckpt, refusing="push")
        metadata = dict(ckpt.file.metadata or {})
    if _stamp(weights, config_file) != stamp:  # a rename over a file, or a write in it, changes its stamp
        raise HubError("changed while it was checked (a writer at work?); nothing was pushed: push it again", str(src))
    files: list[PushedFile] = [
        {"path": WEIGHTS_NAME, "bytes": len(weight_bytes), "sha256": hashlib.sha256(weight_bytes).hexdigest()},
        {"path": CONFIG_NAME, "bytes": len(config_bytes), "sha256": hashlib.sha256(config_bytes).hexdigest()},
    ]
    tokens = _known_tokens(token) if not dry_run else ([token] if token else [])
    card = scrub(model_card(repo_id, config, metadata, files, revision=revision), tokens)
    card_bytes = card.encode("utf-8")
    files.append({"path": CARD_NAME, "bytes": len(card_bytes), "sha256": hashlib.sha256(card_bytes).hexdigest()})
    mode = metadata.get("mpt_tools.mode")
    shown = f" ({_plain(mode, 40)})" if mode else ""
    kind = "prompt-tuning adapter" if prompt_tuning else "MPT adapter"
    message = commit_message or f"Upload {kind}{shown} with mpt-tools {__version__}"
    where = f"hf://{repo_id}" + (f"@{revision}" if revision else "")
    result: PushResult = {
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
        "notes": [],
    }
    if (src / CARD_NAME).exists():
        result["notes"].append(f"{src / CARD_NAME} is not pushed: the generated model card is the repo's {CARD_NAME}")
    if dry_run:
        return result
    if is_offline(False):
        raise HubError("cannot push in offline mode: unset HF_HUB_OFFLINE", where)
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=_endpoint(), token=token or None, library_name="mpt-tools", library_version=__version__)
    operations = [
        CommitOperationAdd(path_in_repo=WEIGHTS_NAME, path_or_fileobj=weight_bytes),
        CommitOperationAdd(path_in_repo=CONFIG_NAME, path_or_fileobj=config_bytes),
        CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=card_bytes),
    ]
    from huggingface_hub.errors import RepositoryNotFoundError

    created = False
    try:
        with _quiet():
            try:
                existing: Any = api.repo_info(repo_id)
            except RepositoryNotFoundError:
                existing = None
            if existing is not None and private and not getattr(existing, "private", True):
                private_flag = flag("--private", "private=True")
                raise HubError(
                    f"the repo exists and is public, and {private_flag} applies only to a repo push creates: "
                    f"nothing was pushed; make it private on its Hub page (Settings), or push without {private_flag}",
                    where,
                )
            if existing is None and revision and revision.startswith("refs/pr/"):
                raise HubError(
                    f"the repo does not exist, so it has no pull request {revision}; nothing was pushed", where
                )
            repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
            created = existing is None
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
        error = _push_error(exc, where=where, token=token, revision=revision)
        if created:  # a failed push should not leave a new, empty repo unmentioned
            error.message += f"; the repo {repo_id} was created and is left empty"
        raise error from None
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
