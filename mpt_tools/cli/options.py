"""The options commands share, built in one place, and the pieces that make ``--help`` teach.

- :func:`source_options` adds the source flags (subfolder, config fields, Hub) and hands the command
  one frozen :class:`~mpt_tools.options.SourceSpec` instead of the location string;
  :func:`hub_options` does the same for commands that read two sources (one
  :class:`~mpt_tools.options.HubOptions`).
- :data:`OUT`, :data:`FORCE` and :data:`JSON` are the output flags; :class:`NumberList`,
  :class:`ModeChoice`, :class:`DtypeChoice` (names and aliases), :class:`PathText` (no empty path)
  and :data:`COUNT` / :data:`SEED` (no size below 1, no seed outside 0..2**64 - 1) are parameter types with
  clear errors.
- :class:`Command` also refuses a garbage value in one of mpt-tools' own environment variables
  (:func:`environment_problem`: one line, exit 1) before the command runs.
- :class:`Command` prints options in titled sections (:class:`Option`'s ``section``) and ends every
  ``--help`` with its examples.
- :class:`Command` gives every command ``-q/--quiet`` and turns the progress bars of
  :mod:`mpt_tools.progress` on only when stderr is a terminal and neither ``--json`` nor
  ``--quiet`` was given.

Nothing here imports numpy, torch or huggingface_hub: ``--help`` stays instant.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import click

from ..dtypes import DTYPE_CHOICES, canonical_dtype
from ..errors import ConfigError
from ..options import MAX_SEED, ConfigOverrides, HubOptions, SourceSpec, max_tensor_bytes
from ..progress import enable

F = Callable[..., Any]
TRAINING_DTYPES = list(DTYPE_CHOICES)
"""The dtypes adapters are trained in: ``--dtype``'s choices (:class:`DtypeChoice`)."""


SECTIONS = ("Options", "Source", "Target", "Output", "Hub", "Checks")  # the order of --help's sections


class Option(click.Option):
    """A Click option that belongs to a titled section of ``--help`` (default: Options)."""

    def __init__(self, *args: Any, section: str = "Options", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.section = section


def option(*decls: str, section: str = "Options", **kwargs: Any) -> Callable[[F], F]:
    """``click.option`` in a ``section`` of the help (one of :data:`SECTIONS`)."""
    return click.option(*decls, cls=Option, section=section, **kwargs)


def _note_quiet(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """Record ``--quiet`` in the context's shared ``meta`` (the command's function never sees it)."""
    ctx.meta["mpt_tools.quiet"] = bool(value)
    return value


def quiet_option() -> Option:
    """``-q/--quiet``, which every :class:`Command` gets: no progress bar."""
    return Option(
        ["-q", "--quiet"],
        is_flag=True,
        expose_value=False,
        callback=_note_quiet,
        section="Output",
        help="No progress bar (bars show only when stderr is a terminal).",
    )


def stderr_is_terminal() -> bool:
    """Whether standard error is a terminal (False when it is closed, missing or a pipe)."""
    try:
        return bool(sys.stderr is not None and sys.stderr.isatty())
    except (AttributeError, ValueError, OSError):
        return False


class Command(click.Command):
    """A command whose ``--help`` groups options by section and ends with an Examples section,
    with ``-q/--quiet`` added to its options."""

    def __init__(self, *args: Any, examples: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.examples = list(examples)
        self.params.append(quiet_option())

    def invoke(self, ctx: click.Context) -> Any:
        """Run the command, first noting (in the context's shared ``meta``) its name and whether
        ``--json`` was asked, so a failure can be reported as JSON too, and turning progress bars
        on only when stderr is a terminal and neither ``--json`` nor ``--quiet`` was given (off
        again afterwards)."""
        ctx.meta["mpt_tools.command"] = ctx.info_name or self.name
        ctx.meta["mpt_tools.json"] = bool(ctx.params.get("as_json"))
        quiet = ctx.meta.get("mpt_tools.quiet", False)
        problem = environment_problem()  # a garbage value in our own variables: one line, exit 1
        if problem is not None:
            from ..errors import ConfigError

            raise ConfigError(problem)
        enable(not quiet and not ctx.meta["mpt_tools.json"] and stderr_is_terminal())
        try:
            return super().invoke(ctx)
        finally:
            enable(False)

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """Write the options, one section per title, in the order they first appear."""
        sections: dict[str, list[tuple[str, str]]] = {title: [] for title in SECTIONS}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx) if isinstance(param, click.Option) else None
            if record is not None:
                sections.setdefault(getattr(param, "section", "Options"), []).append(record)
        for title, rows in sections.items():
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """Write the examples (and any epilog)."""
        super().format_epilog(ctx, formatter)
        if self.examples:
            with formatter.section("Examples"):
                for example in self.examples:  # as written: a command line must not be rewrapped
                    formatter.write(f"{'':>{formatter.current_indent}}{example}\n")


class NumberList(click.ParamType):
    """A comma-separated list of numbers of one ``kind`` (``0,3,5``; ``1,0.5``); blanks around
    items are allowed; an empty list (an unset shell variable), an empty item (``0,,1``, ``0,1,``),
    Python's digit grouping (``1_0``, perhaps a typo of ``1,0``), non-ASCII digits or anything else
    is a usage error naming the value."""

    name = "LIST"

    def __init__(self, kind: type[int] | type[float]) -> None:
        self.kind = kind

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> list[Any]:
        """The list, or a usage error naming the value."""
        if isinstance(value, list):
            return value
        what = "integers" if self.kind is int else "numbers"
        items = str(value).split(",")
        if str(value).strip() == "":
            self.fail(f"empty list (an unset shell variable?): give comma-separated {what}", param, ctx)
        if any(v.strip() == "" for v in items):
            self.fail(f"an empty item in {value!r}: give comma-separated {what}, e.g. 0,3,5", param, ctx)
        try:
            if any("_" in v or not v.isascii() for v in items):  # not int()'s 1_0 (a typo of 1,0?) or ３
                raise ValueError
            return [self.kind(v) for v in items]
        except ValueError:
            self.fail(f"expected comma-separated {what}, got {value!r}", param, ctx)


class PathText(click.Path):
    """A path (``click.Path``) that may not be empty: ``--out "$UNSET"`` would otherwise mean the
    current directory; nor, where it names a file (``dir_okay=False``), end in a slash, which
    names a folder. A usage error naming the option."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        """The path, or a usage error when it is empty or only blanks, or a file's ends in a slash."""
        if isinstance(value, str) and value.strip() == "":
            self.fail("empty path (an unset shell variable?): give a file or folder name", param, ctx)
        if isinstance(value, str) and not self.dir_okay and value.endswith(("/", os.sep)):
            self.fail(f"{value!r} ends in a slash, so it names a folder: give a file name", param, ctx)
        return super().convert(value, param, ctx)


class Text(click.ParamType):
    """A string that may not be empty (a source, a repo id, a subfolder, a revision): ``""`` from
    an unset shell variable is a usage error, not the current directory or "no value"."""

    name = "TEXT"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        """The text, or a usage error when it is empty or only blanks."""
        if isinstance(value, str) and value.strip() == "":
            self.fail("empty value (an unset shell variable?)", param, ctx)
        return value


class DtypeChoice(click.Choice):  # type: ignore[type-arg]
    """``--dtype``: float32, bfloat16 or float16, or an alias of one (``fp32``, ``bf16``, ``fp16``,
    ``half``, ``torch.bfloat16``, any case), as the library takes them; converts to the name."""

    def __init__(self) -> None:
        super().__init__(TRAINING_DTYPES)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        """The dtype's name, or click's usage error listing the choices."""
        return super().convert(canonical_dtype(value) if isinstance(value, str) else value, param, ctx)


def _ascii_integer(value: Any) -> bool:
    """Whether a command-line value reads as an integer in ASCII digits (not ``int()``'s ``0_1``
    or ``１``); a value that is no string (a default) passes."""
    return not isinstance(value, str) or re.fullmatch(r"\s*[-+]?[0-9]+\s*", value, re.ASCII) is not None


class IntRange(click.IntRange):
    """``click.IntRange`` whose error for a value that is no integer says "not a valid integer"
    (click's own says "not a valid integer range"), and that takes ASCII digits only: not
    ``int()``'s ``0_1`` (a typo?) or ``１``, as the lists refuse them."""

    name = "integer"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        """The integer, or a usage error naming the value."""
        if not _ascii_integer(value):
            self.fail(f"{value!r} is not a valid integer.", param, ctx)
        return super().convert(value, param, ctx)


class Int(click.types.IntParamType):
    """An integer (``type=int``) in ASCII digits only, as :class:`IntRange`."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        """The integer, or a usage error naming the value."""
        if not _ascii_integer(value):
            self.fail(f"{value!r} is not a valid integer.", param, ctx)
        return super().convert(value, param, ctx)


class FloatRange(click.FloatRange):
    """``click.FloatRange`` that takes ASCII numbers only (not ``float()``'s ``1_0`` or ``１``)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        """The number, or a usage error naming the value."""
        if isinstance(value, str) and ("_" in value or not value.isascii()):
            self.fail(f"{value!r} is not a valid float.", param, ctx)
        return super().convert(value, param, ctx)


COUNT = IntRange(min=1)
"""A size a flag asks for (tasks, ranks, virtual tokens, token_dim): an integer >= 1."""


class SeedRange(IntRange):
    """:class:`IntRange` of the seeds, 0 to :data:`~mpt_tools.options.MAX_SEED`, shown as
    ``0<=x<2**64`` (in --help and in the error) rather than by its 20 digits."""

    def _describe_range(self) -> str:
        return "0<=x<2**64"


SEED = SeedRange(min=0, max=MAX_SEED)
"""A seed: an integer from 0 to 2**64 - 1 (:data:`mpt_tools.options.MAX_SEED`: numpy's generators
refuse negative seeds, torch's overflow above; init records it), the library's rule."""


def environment_problem(environ: Any = None) -> str | None:
    """What is wrong with mpt-tools' own environment variables (``os.environ`` or ``environ``), as
    one line, or None. ``MPT_TOOLS_MAX_TENSOR_BYTES`` must be a positive integer number of bytes
    when set (:func:`mpt_tools.options.max_tensor_bytes`); the switches (``MPT_TOOLS_DEBUG``,
    ``MPT_TOOLS_NO_HASH_CACHE``) take any value."""
    try:
        max_tensor_bytes(environ)
    except ConfigError as exc:
        return exc.message
    return None


class ModeChoice(click.ParamType):
    """A target mode from :mod:`mpt_tools.modes` (ours, PEFT's or an alias, any case); converts to
    our name. The choices shown are the table's, so a registered mode is a choice too."""

    name = "MODE"

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        """``[average|exact|shared]``: the modes of the table."""
        from ..modes import mode_names

        return "[" + "|".join(mode_names()) + "]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        """Our name of the mode, or a usage error listing every mode."""
        from ..errors import ConfigError
        from ..modes import canonical_mode

        try:
            return canonical_mode(str(value))
        except ConfigError as exc:
            self.fail(exc.message, param, ctx)


class PeftRelease(click.ParamType):
    """A PEFT release of mpt-tools' field table (``0.13.2``, or ``0.13`` for the oldest 0.13.x);
    converts to the release; anything else is a usage error listing the releases."""

    name = "VERSION"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        """The release, or a usage error naming the known ones."""
        from ..errors import ConfigError
        from ..peft_releases import resolve_release

        try:
            return resolve_release(str(value))
        except ConfigError as exc:
            self.fail(exc.message, param, ctx)


PEFT_COMPAT = option(
    "--peft-compat",
    section="Output",
    type=PeftRelease(),
    help="Write adapter_config.json for exactly this PEFT release, e.g. 0.13.2 "
    "(default: one that every release from 0.10.0 on loads).",
)

OUT = option("--out", required=True, type=PathText(), section="Output", help="Output adapter folder.")
FORCE = option("--force", is_flag=True, section="Output", help="Overwrite an existing output.")
JSON = option("--json", "as_json", is_flag=True, section="Output", help="Machine-readable output.")


def with_options(options: Sequence[Callable[[F], F]]) -> Callable[[F], F]:
    """A decorator applying ``options`` in order (the first one listed first in --help)."""

    def decorate(func: F) -> F:
        for item in reversed(options):
            func = item(func)
        return func

    return decorate


_HUB_OPTIONS = (
    option("--revision", section="Hub", type=Text(), help="Hub source: branch, tag or commit."),
    option("--token", section="Hub", metavar="TOKEN", help="Hub token (else HF_TOKEN or the stored login)."),
    option("--cache-dir", section="Hub", type=PathText(file_okay=False), help="Hub cache folder."),
    option("--offline", section="Hub", is_flag=True, help="Hub source: use the local cache only."),
)
_SIZE_OPTIONS = (
    option("--num-tasks", "src_num_tasks", section="Source", type=COUNT, help="Override the source's num_tasks."),
    option("--num-ranks", "src_num_ranks", section="Source", type=COUNT, help="Override the source's num_ranks."),
)
_CONFIG_OPTIONS = (
    option("--num-virtual-tokens", section="Source", type=COUNT, help="Give or override num_virtual_tokens."),
    option("--token-dim", section="Source", type=COUNT, help="Give or override token_dim."),
    option(
        "--num-transformer-submodules",
        section="Source",
        type=IntRange(1, 2),
        help="Give or override nts (1 or 2).",
    ),
    option("--task-type", section="Source", help="Give or override task_type (e.g. CAUSAL_LM, SEQ_2_SEQ_LM)."),
)


def _hub_from(kw: dict[str, Any]) -> HubOptions:
    return HubOptions(
        revision=kw.pop("revision"), token=kw.pop("token"), cache_dir=kw.pop("cache_dir"), offline=kw.pop("offline")
    )


def hub_options(func: F) -> F:
    """Add the Hub flags; the command receives them as one ``hub: HubOptions``."""

    @functools.wraps(func)
    def command(**kw: Any) -> Any:
        return func(hub=_hub_from(kw), **kw)

    return with_options(_HUB_OPTIONS)(command)


def source_options(argument: str = "source", *, sizes: bool = True) -> Callable[[F], F]:
    """Add the flags that say how to read the source named by ``argument`` (subfolder, config
    fields, with ``sizes`` the source's num_tasks/num_ranks, Hub); the command receives ``argument``
    as one frozen :class:`~mpt_tools.options.SourceSpec`."""

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def command(**kw: Any) -> Any:
            overrides = ConfigOverrides(
                num_virtual_tokens=kw.pop("num_virtual_tokens"),
                token_dim=kw.pop("token_dim"),
                num_transformer_submodules=kw.pop("num_transformer_submodules"),
                task_type=kw.pop("task_type"),
                num_tasks=kw.pop("src_num_tasks") if sizes else None,
                num_ranks=kw.pop("src_num_ranks") if sizes else None,
            )
            spec = SourceSpec(kw.pop(argument), subfolder=kw.pop("subfolder"), overrides=overrides, hub=_hub_from(kw))
            return func(**{argument: spec}, **kw)

        subfolder = option(
            "--subfolder",
            section="Source",
            type=Text(),
            help="Named adapter saved under a subfolder of the directory or repo.",
        )
        return with_options([subfolder, *(_SIZE_OPTIONS if sizes else ()), *_CONFIG_OPTIONS, *_HUB_OPTIONS])(command)

    return decorate


def base_model_options(func: F) -> F:
    """The base-model check flags; the command receives ``base_model``: None (no check, the
    default: a local validate never touches the network), True (the config's base model) or a
    Hub id / local folder."""

    @functools.wraps(func)
    def command(**kw: Any) -> Any:
        named, from_config = kw.pop("base_model"), kw.pop("check_base_model")
        return func(base_model=named if named is not None else (True if from_config else None), **kw)

    return with_options(
        [
            option(
                "--base-model",
                section="Checks",
                metavar="ID_OR_DIR",
                type=Text(),
                help="Check token_dim against this base model's config.json (Hub id or local folder).",
            ),
            option(
                "--check-base-model",
                section="Checks",
                is_flag=True,
                help="Check token_dim against the config's base_model_name_or_path (fetches its config.json).",
            ),
        ]
    )(command)
