"""The MPT adapter config: reading and writing adapter_config.json the way PEFT does.

The config is kept as the raw JSON object PEFT wrote (every field preserved), with typed,
validated accessors for the fields mpt-tools needs. Problems in field values are not raised here:
:func:`mpt_tools.checks.config_findings` reports them all at once. Only an unreadable file
(not JSON, not an object) raises :class:`~mpt_tools.errors.ConfigError`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, flag
from .options import checked_path
from .paths import read_small

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"  # what mpt-tools writes
WEIGHTS_NAMES = (WEIGHTS_NAME, "adapter_model.bin")  # what PEFT may have written, in the order looked for
ADAPTER_FILES = (WEIGHTS_NAME, CONFIG_NAME, "adapter_model.bin")  # the names that make a folder an adapter
PEFT_TYPE = "MULTITASK_PROMPT_TUNING"
PROMPT_TUNING_TYPE = "PROMPT_TUNING"  # one task's prompt: what export --to peft writes, what pack reads
TASK_TYPES = (
    "SEQ_CLS",
    "SEQ_2_SEQ_LM",
    "CAUSAL_LM",
    "TOKEN_CLS",
    "QUESTION_ANS",
    "FEATURE_EXTRACTION",
)
INIT_MODES = ("TEXT", "RANDOM", "AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED")
# PEFT's source-to-target inits: each re-reads prompt_tuning_init_state_dict_path whenever the adapter is built
SOURCE_INITS = INIT_MODES[2:]
SIZE_FIELDS = ("num_virtual_tokens", "num_transformer_submodules", "token_dim", "num_tasks", "num_ranks")
MAX_CONFIG_BYTES = 1 << 20

# The fields PEFT 0.21 writes for a MultitaskPromptTuningConfig, with its defaults.
PEFT_DEFAULTS: dict[str, Any] = {
    "auto_mapping": None,
    "base_model_name_or_path": None,
    "inference_mode": True,
    "modules_to_save": None,
    "num_attention_heads": None,
    "num_layers": None,
    "num_ranks": 1,
    "num_tasks": 1,
    "num_transformer_submodules": None,
    "num_virtual_tokens": None,
    "peft_type": PEFT_TYPE,
    "prompt_tuning_init": "RANDOM",
    "prompt_tuning_init_state_dict_path": None,
    "prompt_tuning_init_task": 0,
    "prompt_tuning_init_text": None,
    "revision": None,
    "task_type": None,
    "token_dim": None,
    "tokenizer_kwargs": None,
    "tokenizer_name_or_path": None,
}


def _valid_int(value: Any) -> int | None:
    """Return ``value`` if it is a positive int (not bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return None
    return value


@dataclass
class MptConfig:
    """An MPT adapter config: the raw JSON object plus where it came from.

    ``raw`` holds the fields exactly as read (or as given by flags); ``assumed`` lists the fields
    mpt-tools had to infer, with a reason, so commands can say what they assumed.
    """

    raw: dict[str, Any] = field(default_factory=dict)
    path: str | None = None
    assumed: dict[str, str] = field(default_factory=dict)
    overridden: list[str] = field(default_factory=list)

    def size(self, name: str) -> int | None:
        """A size field as a positive int, or None when absent or invalid."""
        return _valid_int(self.raw.get(name))

    def peft_size(self, name: str) -> int | None:
        """A size field as PEFT reads this config: the field, else PEFT's default where it has one
        (num_tasks and num_ranks: 1); None when invalid or without a default."""
        value = self.raw.get(name)
        return _valid_int(PEFT_DEFAULTS.get(name) if value is None else value)

    @property
    def task_type(self) -> str | None:
        """The task_type string, or None."""
        value = self.raw.get("task_type")
        return value if isinstance(value, str) else None

    @property
    def num_transformer_submodules(self) -> int | None:
        """nts as PEFT uses it: the field, else 2 for SEQ_2_SEQ_LM and 1 otherwise."""
        value = self.raw.get("num_transformer_submodules")
        if value is None:
            return 2 if self.task_type == "SEQ_2_SEQ_LM" else 1
        return _valid_int(value)

    @property
    def total_virtual_tokens(self) -> int | None:
        """T = num_virtual_tokens * num_transformer_submodules, or None when unknown."""
        nvt, nts = self.size("num_virtual_tokens"), self.num_transformer_submodules
        if nvt is None or nts is None:
            return None
        return nvt * nts

    def prompt_shape_problem(self, shape: tuple[int, ...]) -> str | None:
        """What a prompt-tuning adapter's ``prompt_embeddings`` of ``shape`` [rows, cols]
        contradicts in this config (rows: num_virtual_tokens x num_transformer_submodules; cols:
        token_dim), or None; a field the config lacks is not checked."""
        rows, cols = shape
        nvt, nts, dim = self.size("num_virtual_tokens"), self.num_transformer_submodules, self.size("token_dim")
        if nvt is not None and nts is not None and nvt * nts != rows:
            return (
                f"prompt_embeddings has {rows} rows but adapter_config.json says num_virtual_tokens "
                f"{nvt} x num_transformer_submodules {nts}"
            )
        if dim is not None and dim != cols:
            return f"prompt_embeddings has {cols} columns but adapter_config.json says token_dim {dim}"
        return None

    def expected_shapes(self) -> dict[str, tuple[int | None, ...]]:
        """The shapes the three tensors must have under this config (None: unknown)."""
        t, d = self.total_virtual_tokens, self.size("token_dim")
        n, r = self.size("num_tasks"), self.size("num_ranks")
        return {
            "prompt_embeddings": (t, d),
            "prefix_task_cols": (n, t, r),
            "prefix_task_rows": (n, r, d),
        }

    def with_overrides(self, overrides: dict[str, Any]) -> MptConfig:
        """A copy with the given fields replaced (None values are ignored)."""
        raw = dict(self.raw)
        done = list(self.overridden)
        for key, value in overrides.items():
            if value is not None:
                raw[key] = value
                done.append(key)
        return MptConfig(raw=raw, path=self.path, assumed=dict(self.assumed), overridden=done)

    def to_json(self) -> str:
        """The config serialised as PEFT writes it (indent 2, sorted keys, no final newline)."""
        return config_to_json(self.raw)


def config_to_json(data: dict[str, Any]) -> str:
    """Serialise a config dict exactly as PEFT's ``save_pretrained`` does."""
    return json.dumps(data, indent=2, sort_keys=True)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def read_config(path: str | os.PathLike[str]) -> MptConfig:
    """Read an adapter_config.json file (or a directory holding one) into an :class:`MptConfig`.

    Raises ConfigError when the file is missing, not a regular file (a FIFO, device or folder is
    refused without blocking), too large, not UTF-8 JSON or not an object.
    """
    p = Path(checked_path(path, "the config path"))
    if p.is_dir() and p.name != CONFIG_NAME:  # a folder named adapter_config.json is refused below
        p = p / CONFIG_NAME
    where = str(p)
    try:
        if not os.path.lexists(p):
            raise ConfigError("no such config file", where)
        data_bytes = read_small(p, MAX_CONFIG_BYTES, ConfigError)  # a regular file, opened without blocking
        if data_bytes is None:
            raise ConfigError(f"config is {p.stat().st_size} bytes, more than a config can be", where)
    except OSError as exc:
        raise ConfigError(f"cannot read config: {exc.strerror or exc}", where) from None
    return parse_config(data_bytes, where)


def parse_config(data_bytes: bytes, where: str) -> MptConfig:
    """An adapter_config.json's bytes (read from ``where``) as an :class:`MptConfig`; ConfigError
    when they are not UTF-8 JSON or not an object."""
    if len(data_bytes) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config is {len(data_bytes)} bytes, more than a config can be", where)
    try:
        text = data_bytes.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError("config is not UTF-8 text", where) from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        if isinstance(exc, json.JSONDecodeError):
            why = f"{exc.msg} at line {exc.lineno}"
        elif isinstance(exc, RecursionError):
            why = "nested too deeply"
        else:
            why = " ".join(str(exc).split())[:120]
        raise ConfigError(f"config is not valid JSON ({why})", where) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config must be a JSON object, found {type(data).__name__}", where)
    return MptConfig(raw=data, path=where)


def bare_config(shapes: dict[str, tuple[int, ...]], hints: dict[str, Any] | None = None) -> MptConfig:
    """Infer a config for a bare tensor file from its tensor shapes, recording every assumption.

    ``hints`` are the config flags the user gave (they win over inference).
    """
    hints = {k: v for k, v in (hints or {}).items() if v is not None}
    raw = dict(PEFT_DEFAULTS)
    assumed: dict[str, str] = {}
    pe = shapes.get("prompt_embeddings")
    cols = shapes.get("prefix_task_cols")
    rows = shapes.get("prefix_task_rows")
    t: int | None = None
    if pe is not None and len(pe) == 2:
        t, raw["token_dim"] = pe[0], pe[1]
    elif cols is not None and len(cols) == 3:
        t = cols[1]
    if rows is not None and len(rows) == 3 and raw.get("token_dim") is None:
        raw["token_dim"] = rows[2]
    if cols is not None and len(cols) == 3:
        raw["num_tasks"], raw["num_ranks"] = cols[0], cols[2]
    task_type = hints.get("task_type")
    nts = hints.get("num_transformer_submodules")
    if nts is None:
        nts = 2 if task_type == "SEQ_2_SEQ_LM" else 1
        if task_type is None:
            give = flag(
                "--task-type SEQ_2_SEQ_LM or --num-transformer-submodules 2",
                'ConfigOverrides(task_type="SEQ_2_SEQ_LM") or ConfigOverrides(num_transformer_submodules=2)',
            )
            assumed["num_transformer_submodules"] = (
                "1 (no adapter_config.json, and T cannot be split into num_virtual_tokens x "
                f"submodules from the tensors; give {give} for seq2seq)"
            )
    raw["num_transformer_submodules"] = nts
    if t is not None and "num_virtual_tokens" not in hints:
        raw["num_virtual_tokens"] = t // nts if isinstance(nts, int) and nts > 0 and t % nts == 0 else t
        assumed["num_virtual_tokens"] = f"{raw['num_virtual_tokens']} (T = {t} from the tensors)"
    if task_type is None:
        assumed["task_type"] = (
            f"unknown (no adapter_config.json; give {flag('--task-type', 'ConfigOverrides(task_type=...)')})"
        )
    for name in ("token_dim", "num_tasks", "num_ranks"):
        if name not in hints and raw.get(name) is not None:
            assumed[name] = f"{raw[name]} (from the tensor shapes)"
    cfg = MptConfig(raw=raw, path=None, assumed=assumed)
    return cfg.with_overrides(hints)


def target_config(source: MptConfig, num_tasks: int, num_ranks: int) -> dict[str, Any]:
    """The adapter_config.json dict for a target initialised from ``source``.

    Keeps every source field, sets num_tasks and num_ranks, and writes ``prompt_tuning_init``
    "RANDOM" with a null path, so PEFT never re-reads a source file when it loads the target.
    """
    raw = dict(PEFT_DEFAULTS)
    raw.update(source.raw)
    raw["peft_type"] = PEFT_TYPE
    raw["num_tasks"] = num_tasks
    raw["num_ranks"] = num_ranks
    raw["num_transformer_submodules"] = source.num_transformer_submodules
    raw["prompt_tuning_init"] = "RANDOM"
    raw["prompt_tuning_init_state_dict_path"] = None
    raw["prompt_tuning_init_task"] = 0
    raw["inference_mode"] = True
    return raw


# The fields PEFT 0.21 writes for a PromptTuningConfig (save_pretrained), with its defaults: the
# MultitaskPromptTuningConfig's fields less the four MPT ones.
_MPT_ONLY = ("num_ranks", "num_tasks", "prompt_tuning_init_state_dict_path", "prompt_tuning_init_task")


PROMPT_TUNING_DEFAULTS: dict[str, Any] = {
    **{k: v for k, v in PEFT_DEFAULTS.items() if k not in _MPT_ONLY},
    "num_transformer_submodules": 1,
    "peft_type": "PROMPT_TUNING",
}
