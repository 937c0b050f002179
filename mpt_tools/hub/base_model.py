"""A Hub base model's config.json against an adapter's token_dim."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError, MptToolsError, flag
from ..findings import Finding
from ..options import HubOptions
from ..paths import read_small
from .download import (
    _Fetch,
    _is_hub_exception,
    _map_error,
    is_offline,
    model_repo,
    reads_as_model_id,
)

HIDDEN_SIZE_KEYS = ("hidden_size", "d_model", "n_embd")
MAX_BASE_CONFIG_BYTES = 16 << 20  # a model's config.json is a few KB; multimodal ones tens of KB


_AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


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
    if os.path.exists(local):  # a folder, or a file (a FIFO or device is refused when read)
        cfg_path = local / "config.json" if local.is_dir() else local
        if not os.path.exists(cfg_path):
            return None, f"{local} has no config.json"
    elif not reads_as_model_id(name):
        return None, f"{name} is neither a local folder nor a Hub repo id"
    else:
        try:
            spec = model_repo(name, revision)  # gpt2, org/name, org/name@rev, hf://org/name[@rev]
        except MptToolsError as exc:
            return None, str(exc)
        fetch = _Fetch(spec, token, cache_dir, is_offline(offline))
        try:
            cfg_path = Path(fetch.download("config.json", spec.revision or "main", MAX_BASE_CONFIG_BYTES))
        except Exception as exc:
            if not _is_hub_exception(exc) and not isinstance(exc, OSError):
                raise
            err = _map_error(
                exc,
                where=spec.url(filename="config.json"),
                what="config.json",
                token=token,
                offline=fetch.offline,
            )
            return None, str(err)
    try:
        blob = read_small(cfg_path, MAX_BASE_CONFIG_BYTES, ConfigError)  # never blocks on a FIFO
        if blob is None:
            return None, f"{cfg_path}: config.json is over {MAX_BASE_CONFIG_BYTES:,} bytes, not a model config"
        data = json.loads(blob.decode("utf-8"))
    except ConfigError as exc:
        return None, str(exc)
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:
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
    from ..findings import Finding

    on_hub = not os.path.exists(Path(base_model).expanduser()) and reads_as_model_id(base_model)
    fix_unknown = "check the base model by hand" + (  # going online helps only a Hub id, not a local folder
        ", or run online (without " + flag("--offline", "HubOptions(offline=True)") + " or HF_HUB_OFFLINE)"
        if on_hub and is_offline(offline)
        else ""
    )
    config, problem = _base_config(
        base_model,
        revision=revision,
        token=token or None,
        cache_dir=os.fspath(cache_dir) if cache_dir is not None else None,
        offline=offline,
    )
    if config is None:
        return [Finding.warning("base-model", "base_model", f"cannot check the base model: {problem}", fix=fix_unknown)]
    hidden = _hidden_size(config)
    if hidden is None:
        return [
            Finding.warning(
                "base-model",
                "base_model",
                f"config.json of {base_model} names no hidden_size, d_model or n_embd",
                fix=fix_unknown,
            )
        ]
    key, size = hidden
    if token_dim is None:
        return [
            Finding.warning(
                "base-model",
                "token_dim",
                f"unknown token_dim; base model {base_model} has {key} {size}",
                expected=size,
                found=None,
                fix="give " + flag("--token-dim", "ConfigOverrides(token_dim=...)"),
            )
        ]
    if token_dim != size:
        return [
            Finding.error(
                "base-model",
                "token_dim",
                f"does not match the base model {base_model} ({key})",
                expected=size,
                found=token_dim,
                fix="use an adapter made for this base model, or name the right one with "
                + flag("--base-model", "base_model="),
            )
        ]
    return [
        Finding.info(
            "base-model", "token_dim", f"matches {key} of the base model {base_model}", expected=size, found=token_dim
        )
    ]


def base_model_name(ckpt: Any, base_model: str | None) -> str | None:
    """The base model a command checks: ``base_model`` (``--base-model``), else the config's
    ``base_model_name_or_path`` (None when neither names one)."""
    name = base_model or (getattr(ckpt.config, "raw", {}) or {}).get("base_model_name_or_path")
    return name if isinstance(name, str) and name.strip() else None


def local_model_paths(name: str | None) -> list[str]:
    """The base model as paths an output must not touch: its folder when ``name`` is a local one
    (an output there could replace the weights, config or tokenizer just read), else []."""
    if not name:
        return []
    local = Path(name).expanduser()
    return [str(local)] if local.is_dir() else []


def base_model_findings(
    ckpt: Any,
    base_model: str | None = None,
    *,
    hub: HubOptions | None = None,
) -> list[Finding]:
    """The base-model check for a loaded Checkpoint.

    ``base_model`` (``--base-model``) wins over the config's ``base_model_name_or_path`` (whose
    ``revision`` field is then used). The token, cache folder and offline switch come from ``hub``
    (default: those the checkpoint was loaded with); its ``revision`` is the source's and is not used.
    """
    from ..findings import Finding

    hub = hub or ckpt.hub_options
    name = base_model_name(ckpt, base_model)
    revision = None
    if not base_model:
        rev = (getattr(ckpt.config, "raw", {}) or {}).get("revision")
        revision = rev if isinstance(rev, str) and rev else None
    if name is None:
        return [
            Finding.warning(
                "base-model",
                "base_model_name_or_path",
                "the config names no base model: nothing to check",
                fix="pass " + flag("--base-model ID_OR_DIR", "base_model=ID_OR_DIR"),
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
        token=hub.token,
        cache_dir=hub.cache_dir,
        offline=hub.offline,
    )
