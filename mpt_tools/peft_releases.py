"""Which adapter_config.json keys each PEFT release knows, and configs that a release loads.

PEFT builds a config with ``Config(**json)``. Releases before 0.14 refuse a key they do not know
(``TypeError: __init__() got an unexpected keyword argument``); 0.14 and later drop it with a
warning. :data:`TABLE_PATH` (``peft_fields.json``, written by ``docs/make_peft_fields.py`` from
each release's own config classes) lists the fields and defaults of ``MultitaskPromptTuningConfig``
and ``PromptTuningConfig`` per release. :func:`fit_config` uses it to write a config that loads:

- by default, in every release of the table (portable): a key some release does not know is left
  out when it holds its default, which changes nothing for any release;
- with a release (``--peft-compat 0.13.2``), in exactly that one: keys it does not know are left
  out when they hold their default, and a value it cannot hold is refused (ConfigError).

``peft_version`` records which PEFT wrote a file; PEFT fills it in itself when it loads a config,
so it is never carried into a file mpt-tools writes, and ``compat`` drops it where unknown.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

TABLE_PATH = Path(__file__).with_name("peft_fields.json")
CLASS_OF = {"MULTITASK_PROMPT_TUNING": "MultitaskPromptTuningConfig", "PROMPT_TUNING": "PromptTuningConfig"}
WRITER_RECORDS = ("peft_version",)  # keys that record the writer; PEFT fills them in when it loads


@functools.lru_cache(maxsize=1)
def table() -> dict[str, dict[str, dict[str, Any]]]:
    """``{release: {config class: {field: default}}}``, oldest release first."""
    try:
        data = json.loads(TABLE_PATH.read_text())
    except (OSError, ValueError) as exc:  # a broken install
        raise ConfigError(f"cannot read the PEFT field table: {exc}", str(TABLE_PATH)) from None
    return dict(data["releases"])


def _key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


def releases() -> list[str]:
    """The PEFT releases of the table, oldest first."""
    return list(_sorted_releases())


@functools.lru_cache(maxsize=1)
def _sorted_releases() -> tuple[str, ...]:
    return tuple(sorted(table(), key=_key))


def supported_range() -> str:
    """``"0.10.0 to 0.21.2"``: the releases mpt-tools writes configs for."""
    known = releases()
    return f"{known[0]} to {known[-1]}"


def resolve_release(text: str) -> str:
    """The table's release that ``text`` names: exactly (``0.13.2``), or ``0.13`` for the oldest
    0.13.x. Raises ConfigError naming the releases it knows."""
    value = text.strip().removeprefix("v")
    known = releases()
    if value in known:
        return value
    same_minor = [r for r in known if r.startswith(value + ".") and value.count(".") == 1]
    if same_minor:
        return same_minor[0]
    raise ConfigError(
        f"PEFT release {text!r} is not one mpt-tools knows; give one of {', '.join(known)} "
        "(or X.Y for the oldest X.Y.z)"
    )


def fields(release: str, peft_type: str) -> dict[str, Any]:
    """The config fields (name to default) of ``peft_type``'s config class in ``release``."""
    return table()[release][CLASS_OF[peft_type]]


@functools.lru_cache(maxsize=4)
def known_keys(peft_type: str) -> frozenset[str]:
    """The config keys of ``peft_type`` that some release of the table knows."""
    return frozenset(key for release in _sorted_releases() for key in fields(release, peft_type))


def is_default(peft_type: Any, key: str, value: Any) -> bool:
    """Whether ``value`` is PEFT's default for ``key`` (in the newest release that has the field)
    of ``peft_type``'s config: a key absent from a config means that default to PEFT."""
    if peft_type not in CLASS_OF:
        return False
    for release in reversed(releases()):
        known = fields(release, peft_type)
        if key in known:
            return _same(value, known[key])
    return False


def _same(value: Any, default: Any) -> bool:
    """JSON equality that keeps bool and int apart (``true`` is not the default ``1``)."""
    if isinstance(value, bool) or isinstance(default, bool):
        return type(value) is type(default) and value == default
    return bool(value == default)


@dataclass
class Fit:
    """A config fitted to PEFT releases: ``config`` to write, the keys ``removed`` (with the value
    they held and why), the keys ``kept``, and ``warnings`` for values some releases cannot read."""

    config: dict[str, Any]
    target: str  # the release, or "0.10.0 to 0.21.2" for every release of the table
    exact: bool = False  # written for one release (--peft-compat)
    removed: list[dict[str, Any]] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def fit_config(raw: dict[str, Any], release: str | None = None, *, keep_records: bool = False) -> Fit:
    """``raw`` (an adapter_config.json object) with the keys left out that keep it from loading.

    ``release`` None: every release of the table must load it; a value that only newer releases
    know is kept, with a warning naming the oldest release that reads it. ``release`` given (see
    :func:`resolve_release`): that release must load it; such values raise one ConfigError that
    names them all. Keys no
    release of the table knows are left out, with a warning. ``keep_records`` keeps
    ``peft_version`` where the target knows it (``compat`` of a PEFT-written file); writers never
    keep it. Raises ConfigError for a peft_type other than MPT or PROMPT_TUNING.
    """
    peft_type = raw.get("peft_type")
    if not isinstance(peft_type, str) or peft_type not in CLASS_OF:
        raise ConfigError(
            f"peft_type {peft_type!r}: mpt-tools fits only MULTITASK_PROMPT_TUNING and PROMPT_TUNING configs"
        )
    every = releases()
    targets = [release] if release is not None else every
    label = release if release is not None else supported_range()
    known_by = {r: fields(r, peft_type) for r in every}
    fit = Fit(config={}, target=label, exact=release is not None)
    refused: list[str] = []
    for key, value in raw.items():
        readers = [r for r in every if key in known_by[r]]
        known_to_target = all(key in known_by[r] for r in targets)
        if key in WRITER_RECORDS and not (keep_records and known_to_target):
            fit.removed.append({"key": key, "value": value, "reason": "PEFT fills it in when it loads the config"})
            continue
        if known_to_target:
            fit.config[key] = value
            fit.kept.append(key)
            continue
        if not readers:
            why = f"no PEFT release from {supported_range()} knows it"
            fit.removed.append({"key": key, "value": value, "reason": why})
            fit.warnings.append(f"left out {key}={json.dumps(value)}: {why}")
            continue
        default = known_by[readers[-1]][key]
        if _same(value, default):
            fit.removed.append({"key": key, "value": value, "reason": f"holds its default; PEFT {_span(readers)} only"})
            continue
        newer = [r for r in readers if release is None or _key(r) > _key(release)]
        if release is not None:
            refused.append(
                f"{key}={json.dumps(value)} needs PEFT {newer[0] + ' or later' if newer else _span(readers)}"
            )
            continue
        fit.config[key] = value
        fit.kept.append(key)
        fit.warnings.append(
            f"{key}={json.dumps(value)} needs PEFT {_span(readers)}; other releases refuse or ignore the field"
        )
    if refused:
        raise ConfigError(
            f"PEFT {release} cannot load this config: {'; '.join(refused)}, and {release} does not know "
            f"{'that field' if len(refused) == 1 else 'those fields'} (target a release that has it)"
        )
    return fit


STRICT_BEFORE = (0, 14, 0)  # releases before this refuse a config key they do not know


def loading_releases(raw: dict[str, Any]) -> list[str]:
    """The releases of the table that load the adapter_config.json object ``raw`` (oldest
    first): releases before 0.14 refuse any key they do not know (TypeError), later ones drop it
    with a warning. Empty for a peft_type other than MPT or PROMPT_TUNING (not in the table)."""
    peft_type = raw.get("peft_type")
    if not isinstance(peft_type, str) or peft_type not in CLASS_OF:
        return []
    return [r for r in _sorted_releases() if _key(r) >= STRICT_BEFORE or fields(r, peft_type).keys() >= raw.keys()]


def _span(readers: list[str]) -> str:
    """``"0.17.0 or later"`` or ``"0.12.0 to 0.15.2"`` for the releases that know a key."""
    every = releases()
    if readers[-1] == every[-1]:
        return f"{readers[0]} or later"
    return f"{readers[0]} to {readers[-1]}"
