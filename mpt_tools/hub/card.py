"""The model card (README.md) pushed with an adapter."""

from __future__ import annotations

import json
import os
import re
from typing import Any

from ..config import PROMPT_TUNING_TYPE
from ..results import PushedFile
from .base_model import _AUTO_CLASSES
from .download import _HUB_ID_RE

CARD_NAME = "README.md"


CARD_TAGS = ("peft", "multitask-prompt-tuning", "mpt-tools")
PROMPT_TUNING_TAGS = ("peft", "prompt-tuning", "mpt-tools")


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
    return f"a local source ({os.path.basename(value.rstrip('/')) or value})"  # a file or a folder: not said


def _safe_inputs(value: str) -> str:
    """A recorded list of inputs (``pack``'s, comma-separated) for the card: Hub URLs as they are,
    local paths reduced to their last part (``teachers/qa#task0`` -> ``qa#task0``)."""
    items = []
    for item in value.split(","):
        if not item.startswith("hf://") and ("/" in item or os.sep in item):
            item = os.path.basename(item.rstrip("/" + os.sep)) or item
        items.append(item)
    return ", ".join(items)


_PATH_FIELDS = {"source": _safe_source, "append_to": _safe_source, "inputs": _safe_inputs, "shared": _safe_inputs}
"""Recorded fields that may hold local paths, with how the card shows them (never a local path)."""


def model_card(
    repo_id: str,
    config: dict[str, Any],
    metadata: dict[str, str],
    files: list[PushedFile],
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
    prompt_tuning = config.get("peft_type") == PROMPT_TUNING_TYPE  # one task baked from an MPT adapter
    lines += [f"- {t}" for t in (PROMPT_TUNING_TAGS if prompt_tuning else CARD_TAGS)]
    lines += ["---", ""]
    name = repo_id.split("/")[-1]
    on = f" on [{base_id}](https://huggingface.co/{base_id})" if base_id else ""
    tokens, dim = _plain(config.get("num_virtual_tokens"), 20), _plain(config.get("token_dim"), 20)
    sizes = f"{tokens} virtual tokens, token_dim {dim}"
    if prompt_tuning:
        summary = (
            f"A prompt-tuning adapter for [PEFT](https://github.com/huggingface/peft){on}: {sizes}, "
            f"task_type {_plain(config.get('task_type'), 40)}; one task's prompt, baked from a "
            "[Multitask Prompt Tuning](https://arxiv.org/abs/2303.02861) adapter."
        )
    else:
        summary = (
            "A [Multitask Prompt Tuning](https://arxiv.org/abs/2303.02861) (MPT) adapter for "
            f"[PEFT](https://github.com/huggingface/peft){on}: {_plain(config.get('num_tasks'), 20)} task(s), "
            f"{sizes}, rank {_plain(config.get('num_ranks'), 20)}, task_type {_plain(config.get('task_type'), 40)}."
        )
    lines += [f"# {name}", "", summary, "", "## How it was made", ""]
    prov = {k[len("mpt_tools.") :]: v for k, v in metadata.items() if k.startswith("mpt_tools.")}
    rows: list[tuple[str, Any]]
    version = _plain(prov.get("version", ""), 40)
    if "mode" in prov:
        intro = (
            f"Initialised with mpt-tools {version} "
            f"(`mpt-tools init --mode {_plain(prov['mode'], 40)}`) from a source MPT adapter."
        )
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
    elif "operation" in prov:  # tasks, rerank, convert, export, pack: every field each recorded
        intro = f"Made with mpt-tools {version} (`mpt-tools {_plain(prov['operation'], 40)}`)."
        rows = [
            (key.replace("_", " "), _PATH_FIELDS[key](value) if key in _PATH_FIELDS else value)
            for key, value in prov.items()
            if key not in ("version", "operation")
        ]
    else:
        intro, rows = "Not recorded: the weights carry no mpt-tools provenance metadata.", []
    lines += [intro, "", "| field | value |", "| --- | --- |"]
    lines += [f"| {_plain(key, 60)} | `{_plain(value)}` |" for key, value in rows if value is not None]
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
        *(
            ["# one task's prompt: no task_ids"]
            if prompt_tuning
            else [
                "# MPT needs the task of each example:",
                "# outputs = model(**batch, task_ids=torch.zeros(batch_size, dtype=torch.long))",
            ]
        ),
        "```",
        "",
        "To continue training, build the PEFT model from `adapter_config.json` and load these weights with "
        "`set_peft_model_state_dict` (PEFT does not reload prompt-learning adapters as trainable).",
        "",
    ]
    return "\n".join(lines)
