"""Where a source is and how to read it, as frozen, typed objects.

A command line builds these once (``mpt_tools.cli.options.source_options``); the library takes a
:class:`SourceSpec`, a loaded :class:`~mpt_tools.checkpoint.Checkpoint` or a plain path wherever
it reads a source, and hands the spec unchanged to
:func:`~mpt_tools.checkpoint.load_source`, the only reader of its fields.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple, TypeVar

from .errors import ConfigError

# NamedTuples rather than frozen dataclasses: as immutable and typed, and about six times cheaper to
# define, which every command pays at start-up (benchmarks/RESULTS.md, start-up A/B).

_T = TypeVar("_T", bound=type)


def readable_fields(cls: _T) -> _T:
    """Show a NamedTuple's field types in ``help()`` and ``inspect.signature`` as written
    (``'int | None'``), not as the ``ForwardRef('int | None')`` that postponed annotations leave.
    The text is kept, not evaluated: evaluating costs every command's start-up about a millisecond."""
    hints = cls.__new__.__annotations__
    for name, hint in hints.items():
        hints[name] = getattr(hint, "__forward_arg__", hint)
    return cls


@readable_fields
class HubOptions(NamedTuple):
    """How to reach a Hub source: ``revision`` (branch, tag or commit), ``token`` (else HF_TOKEN or
    the stored login), ``cache_dir`` (else the Hugging Face cache) and ``offline`` (cache only)."""

    revision: str | None = None
    token: str | None = None
    cache_dir: str | None = None
    offline: bool = False

    def replace(self, **changes: Any) -> HubOptions:
        """A copy with ``changes`` (e.g. ``offline=True``)."""
        return self._replace(**changes)


@readable_fields
class ConfigOverrides(NamedTuple):
    """Config fields to give or replace (None leaves a field as the source has it)."""

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    task_type: str | None = None
    num_tasks: int | None = None
    num_ranks: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """The given fields only, by config name."""
        return {k: v for k, v in self._asdict().items() if v is not None}


@readable_fields
class SourceSpec(NamedTuple):
    """A source to load: ``location`` (a tensor file, an adapter folder, or a Hub repo id /
    ``hf://`` URL), an optional named-adapter ``subfolder``, config ``overrides`` and ``hub`` options."""

    location: str
    subfolder: str | None = None
    overrides: ConfigOverrides = ConfigOverrides()
    hub: HubOptions = HubOptions()

    @classmethod
    def of(cls, source: str | os.PathLike[str] | SourceSpec, hub: HubOptions | None = None) -> SourceSpec:
        """``source`` as a spec; a plain path or repo id gets ``hub`` (default: no Hub options)."""
        if isinstance(source, SourceSpec):
            return source
        return cls(checked_path(source, "the source"), hub=hub or HubOptions())


# The library's own argument checks: what the command line's parameter types refuse (an empty path,
# a list that is a string), refused the same way, as one-line ConfigErrors, for library callers.


def checked_path(value: Any, what: str) -> str:
    """``os.fspath(value)``; ConfigError naming ``what`` where it is not a path (None, a number) or
    is empty (an unset variable: never the current directory)."""
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError(f"{what} must be a path (str or os.PathLike), not {type(value).__name__}")
    text = os.fspath(value)
    if not isinstance(text, str):
        raise ConfigError(f"{what} must be a text path, not bytes")
    if text.strip() == "":
        raise ConfigError(f"{what} is an empty path (an unset variable?): give a file or folder name")
    return text


def checked_index(value: Any, what: str) -> int:
    """``value`` as an int; ConfigError naming ``what`` for a bool, a float, a string (``"2"``)..."""
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise ConfigError(f"{what} must be an integer, not {value!r:.40}") from None


def checked_positive(value: Any, what: str) -> int:
    """``value`` as an int of at least 1 (a byte budget, a number of workers); ConfigError naming
    ``what`` otherwise (0 is not "the default": pass None for that)."""
    number = checked_index(value, what)
    if number < 1:
        raise ConfigError(f"{what} must be at least 1, not {number}")
    return number


MAX_SEED = 2**64 - 1
"""The largest seed: every generator mpt-tools seeds takes 0 to 2**64 - 1 (numpy's ``default_rng``
for init's shared factors, torch's ``Generator.manual_seed`` for pack's start; torch overflows above
it, and neither takes a negative seed). The one rule for ``--seed`` and the library's ``seed``."""


def checked_seed(value: Any, what: str = "seed") -> int:
    """``value`` as an int in 0..:data:`MAX_SEED`; ConfigError naming ``what`` otherwise (a bool, a
    float, a negative or too large number)."""
    number = checked_index(value, what)
    if not 0 <= number <= MAX_SEED:
        raise ConfigError(
            f"{what} must be an integer from 0 to 2**64 - 1 (what numpy's and torch's generators take), not {number}"
        )
    return number


def checked_indices(value: Any, what: str) -> list[int]:
    """``value`` (a list, tuple, range...) as a list of ints; ConfigError naming ``what`` for a
    string (``"0,2"``: the command line's spelling), a single number or a non-integer item."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ConfigError(f"{what} must be a list of integers, e.g. [0, 2], not {value!r:.40}")
    return [checked_index(v, f"{what}[{i}]") for i, v in enumerate(value)]


def checked_numbers(value: Any, what: str) -> list[float]:
    """``value`` as a list of floats; ConfigError naming ``what`` for a string or a non-number."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ConfigError(f"{what} must be a list of numbers, e.g. [1, 0.5], not {value!r:.40}")
    out = []
    for i, v in enumerate(value):
        if isinstance(v, bool) or (not isinstance(v, (int, float)) and not hasattr(v, "__float__")):
            raise ConfigError(f"{what}[{i}] must be a number, not {v!r:.40}")
        out.append(float(v))
    return out


def max_tensor_bytes(environ: Mapping[str, str] | None = None) -> int | None:
    """``MPT_TOOLS_MAX_TENSOR_BYTES`` (of ``os.environ`` or ``environ``) as a number of bytes, or
    None when unset or empty; ConfigError (one line) when it is not a positive integer. The one
    reading of the variable: :func:`mpt_tools.formats.memory_limit` and the CLI's check before a
    command runs both call it."""
    text = (os.environ if environ is None else environ).get("MPT_TOOLS_MAX_TENSOR_BYTES")
    if not text:
        return None
    digits = text.strip()
    value = int(digits) if digits.isascii() and digits.isdigit() else 0  # not int()'s 1_000, ٣٠٠٠ or +5
    if value < 1:
        shown = repr(text) if len(text) <= 40 else repr(text[:37]) + "..."
        raise ConfigError(f"MPT_TOOLS_MAX_TENSOR_BYTES={shown} is not a positive number of bytes: fix it or unset it")
    return value
