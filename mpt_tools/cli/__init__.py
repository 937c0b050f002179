"""The ``mpt-tools`` command line: parse options, call the library, print results.

Errors from the library (MptToolsError) become one line on stderr and exit 1; usage errors
exit 2 (Click's own); no traceback reaches the user unless MPT_TOOLS_DEBUG=1.
"""

from __future__ import annotations

import contextlib
import os
import sys
from types import ModuleType
from typing import Any, NoReturn

import click

from ..errors import MptToolsError, cli_wording, debug
from ..options import HubOptions, SourceSpec
from ..version import __version__
from .options import (
    COUNT,
    FORCE,
    JSON,
    OUT,
    PEFT_COMPAT,
    SEED,
    Command,
    DtypeChoice,
    FloatRange,
    Int,
    IntRange,
    ModeChoice,
    NumberList,
    PathText,
    PeftRelease,
    Text,
    base_model_options,
    hub_options,
    option,
    source_options,
)


def _render() -> ModuleType:
    """The views (:mod:`mpt_tools.cli.render`), imported when a command prints: ``--help`` never does."""
    from . import render

    return render


def _written() -> str:
    """What this process put in place (and is still there), for an accurate account when it fails
    late."""
    from ..files import written

    done = written()
    return f"; already written: {', '.join(done)}" if done else "; nothing was written"


def _json_command(ctx: click.Context | None) -> str | None:
    """The command's name when ``--json`` was asked (None when not): known once the command
    began, else read from the command line (a usage error, a signal before the command began)."""
    if ctx is not None and "mpt_tools.json" in ctx.meta:
        return str(ctx.meta.get("mpt_tools.command", "")) if ctx.meta["mpt_tools.json"] else None
    argv = ctx.meta.get("mpt_tools.argv", []) if ctx is not None else sys.argv[1:]
    if "--json" not in argv:
        return None
    return next((a for a in argv if not a.startswith("-")), "")


def _report(ctx: click.Context | None, exc: BaseException, problem: str, message: str | None = None) -> None:
    """A failure's one line on stderr (first: stdout may be what fails), then with ``--json`` the
    ``mpt-tools/error/1`` object on stdout (``message``: its text, else the error's own), unless
    stdout cannot take it."""
    render = _render()
    render.echo(f"error: {problem}", err=True)
    command = _json_command(ctx)
    if command is not None:
        with contextlib.suppress(render.StdoutError):
            render.show_error(command, exc, message=message)


def _interrupted(ctx: click.Context | None, exc: KeyboardInterrupt) -> int:
    """Report an interruption (one line naming the signal and what was written; the error object
    under ``--json``); the exit status, 128 + the signal's number."""
    from ..interrupts import Interrupted

    what = exc.name if isinstance(exc, Interrupted) else "SIGINT"
    _report(ctx, exc, f"interrupted by {what}{_written()}", message=f"interrupted by {what}")
    return exc.exit_status if isinstance(exc, Interrupted) else 130


def _fresh_run() -> None:
    """Forget what an earlier command of this process wrote or printed (a test or a script may run
    several in one process); modules not imported yet have nothing to forget."""
    files, render = sys.modules.get("mpt_tools.files"), sys.modules.get("mpt_tools.cli.render")
    if files is not None:
        files.WRITTEN.clear()
        files.REMOVED_STALE.clear()
    if render is not None:
        render.reset()


def _note_stale() -> None:
    """Say (on stderr) which staging leftovers of killed runs this command removed."""
    files = sys.modules.get("mpt_tools.files")
    if files is not None and files.REMOVED_STALE:
        names = ", ".join(files.REMOVED_STALE)
        _render().echo(f"note: removed what an interrupted run had left: {names}", err=True)


class Group(click.Group):
    """A Click group that turns library errors into one line and exit 1."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Keep the command line: a usage error under ``--json`` still prints the error object."""
        ctx.meta["mpt_tools.argv"] = list(args)
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        """Run the command; map MptToolsError (and anything unexpected) to exit 1, a signal to
        128+signal, and a reader that left early to the command's own status.

        The library words its messages for the command line meanwhile (``--force``, not
        ``force=True``: :func:`~mpt_tools.errors.cli_wording`), its report of a failure included.
        Signals raise only while the command runs (:func:`~mpt_tools.interrupts.acting`): one that
        came before it began is acted on as it begins, and none interrupts the reporting below
        (the first one's cleanup runs to its end; a later one is ignored)."""
        with cli_wording():
            return self._invoke(ctx)

    def _invoke(self, ctx: click.Context) -> Any:
        """:meth:`invoke`, under the command line's wording."""
        from ..interrupts import Interrupted, acting, rearm, stopping

        rearm()  # a signal raised in an earlier command of this process (a test, a script) is done with
        try:
            with acting():
                _fresh_run()
                result = super().invoke(ctx)
                _note_stale()
                signum = stopping()
                if signum is not None:  # raised where it was swallowed (a __del__): it came all the same
                    raise Interrupted(signum)
            return result
        except MptToolsError as exc:
            if debug():
                raise
            _report(ctx, exc, _render().one_line(str(exc)))
            ctx.exit(1)
        except click.UsageError as exc:  # exit 2; with --json, the error object on stdout too
            command = None if debug() else _json_command(ctx)
            if command is not None:
                with contextlib.suppress(_render().StdoutError):  # Click's usage still goes to stderr
                    _render().show_error(command, exc)
            raise
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt as exc:
            ctx.exit(_interrupted(ctx, exc))
        except Exception as exc:  # a bug: still no traceback for users
            signum = stopping()
            if signum is not None:  # a signal that code in between turned into another error
                ctx.exit(_interrupted(ctx, Interrupted(signum)))
            render = _render()
            if isinstance(exc, render.StdoutError):  # no error object: stdout is what fails
                render.echo(f"error: cannot write to standard output ({exc.strerror or exc}){_written()}", err=True)
                ctx.exit(1)
            try:
                os.getcwd()
            except OSError:
                _report(ctx, exc, "the current folder no longer exists; cd to one that does")
                ctx.exit(1)
            if debug() or os.environ.get("MPT_TOOLS_RAISE_UNEXPECTED"):
                raise
            problem = (
                f"internal error ({type(exc).__name__}: {render.one_line(str(exc))}); "
                "set MPT_TOOLS_DEBUG=1 for a traceback and please report it"
            )
            _report(ctx, exc, problem, message=problem)
            ctx.exit(1)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mpt-tools")
def cli() -> None:
    """Checkpoint conversion and surgery for Multitask Prompt Tuning (MPT) adapters.

    SOURCE is a .safetensors file, a .bin/.pt/.pth file (weights-only), a PEFT adapter
    directory, or a Hub repo id (org/name or hf://org/name[@revision][/subfolder]).

    \b
    Examples:
      mpt-tools inspect sources
      mpt-tools init sources --mode average --out target --verify
      mpt-tools push target me/mpt-target --dry-run
    """


@cli.command(
    cls=Command,
    examples=[
        "mpt-tools validate sources",
        "mpt-tools validate sources --against target_config.json --mode average",
        "mpt-tools validate org/mpt-source --json",
    ],
)
@click.argument("source", type=Text())
@option("--against", section="Target", type=PathText(), help="Planned target adapter_config.json (file or folder).")
@option("--mode", section="Target", type=ModeChoice(), help="Planned target mode (PEFT's names work too).")
@option("--task", section="Target", type=Int(), help="Source task for --mode exact.")
@option(
    "--target-tasks",
    section="Target",
    type=COUNT,
    help="Planned target num_tasks, as init's --target-tasks (needs --mode or --against).",
)
@option(
    "--target-ranks",
    section="Target",
    type=COUNT,
    help="Planned target num_ranks, as init's --target-ranks (needs --mode or --against).",
)
@JSON
@source_options()
@base_model_options
def validate(
    source: SourceSpec,
    against: str | None,
    mode: str | None,
    task: int | None,
    target_tasks: int | None,
    target_ranks: int | None,
    as_json: bool,
    base_model: Any,
) -> None:
    """Check SOURCE (and a planned target) and report every problem at once.

    Exit 0 when valid, 1 when not.
    """
    from ..validation import validate as run

    if (target_tasks is not None or target_ranks is not None) and mode is None and against is None:
        raise click.UsageError("--target-tasks and --target-ranks plan a target: give --mode (or --against) too")
    if task is not None and mode is None and against is None:
        raise click.UsageError("--task picks the source task of --mode exact: give --mode exact too")
    report = run(
        source,
        against=against,
        mode=mode,
        task=task,
        base_model=base_model,
        num_tasks=target_tasks,
        num_ranks=target_ranks,
    )
    _render().show_json(report) if as_json else _render().validate_view(report)
    _render().exit_if_invalid(report)


@cli.command(
    cls=Command,
    examples=[
        "mpt-tools inspect sources",
        "mpt-tools inspect sources --similarity --plot similarity.png",
        "mpt-tools inspect hf://org/multi@v2/task-adapters --no-norms --json",
    ],
)
@click.argument("source", type=Text())
@JSON
@option("--no-norms", is_flag=True, help="Skip the per-task norms (reads only the header).")
@option("--similarity", is_flag=True, help="Print the task-by-task cosine similarity of the prompts.")
@option("--plot", section="Output", type=PathText(dir_okay=False), help="Draw the similarity matrix as a heatmap PNG.")
@option("--force", section="Output", is_flag=True, help="Overwrite an existing --plot file.")
@source_options()
def inspect(source: SourceSpec, as_json: bool, no_norms: bool, similarity: bool, plot: str | None, force: bool) -> None:
    """Describe SOURCE: files, sha256, tensors, config, parameters, findings, per-task norms."""
    from ..inspection import inspect_source

    report = inspect_source(source, norms=not no_norms, similarity=similarity, plot=plot, force=force)
    _render().show_json(report) if as_json else _render().inspect_view(report, similarity=similarity)
    _render().exit_if_invalid(report)


def _target_size(flag: str, value: int | None, old_flag: str, legacy: int | None) -> int | None:
    """A target size given by its own flag or by the deprecated spelling (both: they must agree)."""
    if value is not None and legacy is not None and value != legacy:
        raise click.UsageError(f"{flag} {value} and {old_flag} {legacy} disagree")
    if legacy is not None:
        _render().echo(f"note: {old_flag} is the deprecated spelling of {flag} (the target's size)", err=True)
    return value if value is not None else legacy


@cli.command(
    cls=Command,
    examples=[
        "mpt-tools init sources --mode average --out target",
        "mpt-tools init sources --mode average --tasks 0,2 --weights 1,3 --out target --verify",
        "mpt-tools init sources --mode exact --task 2 --target-tasks 4 --out target",
        "mpt-tools init org/mpt-source --revision v2 --mode shared --seed 0 --out target --push me/target",
    ],
)
@click.argument("source", type=Text())
@option(
    "--mode", section="Target", required=True, type=ModeChoice(), help="How the target starts (PEFT's names work too)."
)
@option("--task", section="Target", type=Int(), help="Source task for --mode exact (default 0).")
@option(
    "--allow-negative-task",
    section="Target",
    is_flag=True,
    help="Accept a negative --task, counted from the end as PEFT does (with a warning).",
)
@option(
    "--tasks", "task_list", section="Target", type=NumberList(int), help="average: only these source tasks, e.g. 0,3,5."
)
@option(
    "--weights",
    section="Target",
    type=NumberList(float),
    help="average: one non-negative weight per task (normalised).",
)
@option("--seed", section="Target", type=SEED, help="Seed for the fresh factors of --mode shared (recorded).")
@option(
    "--target-tasks",
    section="Target",
    type=COUNT,
    help="The target's num_tasks [default: 1]; average/exact: every task starts from the chosen factors.",
)
@option("--target-ranks", section="Target", type=COUNT, help="The target's num_ranks (shared; default the source's).")
@option("--num-tasks", "num_tasks", section="Target", type=COUNT, help="Deprecated spelling of --target-tasks.")
@option("--num-ranks", "num_ranks", section="Target", type=COUNT, help="Deprecated spelling of --target-ranks.")
@option(
    "--engine",
    section="Target",
    type=click.Choice(["auto", "numpy", "torch"]),
    default="auto",
    show_default=True,
    help="average: who computes torch's mean: numpy (same bits, no torch import), torch, or auto "
    "(numpy where proven bitwise, torch elsewhere).",
)
@option(
    "--torch-threads",
    section="Target",
    type=COUNT,
    help="average: the torch thread count whose bits to match (a PEFT run elsewhere) [default: torch's here].",
)
@OUT
@option("--force", section="Output", is_flag=True, help="Overwrite an existing adapter in --out.")
@JSON
@option(
    "--push",
    "push_to",
    section="Output",
    metavar="REPO_ID",
    type=Text(),
    help="Then push --out to this Hub repo (see `push`).",
)
@option("--private", section="Output", is_flag=True, help="With --push: create the repo private.")
@option("--create-pr", section="Output", is_flag=True, help="With --push: open a pull request instead of committing.")
@PEFT_COMPAT
@option(
    "--verify",
    "verify_after",
    section="Checks",
    is_flag=True,
    help="Verify the adapter against SOURCE before it goes into --out; on failure --out is left as it was.",
)
@source_options(sizes=False)
@base_model_options
def init(
    source: SourceSpec,
    mode: str,
    task: int | None,
    allow_negative_task: bool,
    task_list: list[int] | None,
    weights: list[float] | None,
    seed: int | None,
    target_tasks: int | None,
    target_ranks: int | None,
    num_tasks: int | None,
    num_ranks: int | None,
    engine: str,
    torch_threads: int | None,
    out: str,
    force: bool,
    as_json: bool,
    push_to: str | None,
    private: bool,
    create_pr: bool,
    peft_compat: str | None,
    verify_after: bool,
    base_model: str | bool | None,
) -> None:
    """Write a ready-to-train target adapter initialised from SOURCE into --out.

    average and exact are bitwise what PEFT's own init computes; shared copies the shared prompt
    and draws fresh N(0, 0.02) factors from --seed. The adapter_config.json says
    prompt_tuning_init RANDOM with a null path, so PEFT loads the folder anywhere.
    """
    from ..init import PushRequest, init_adapter
    from ..modes import TargetPlan

    plan = TargetPlan(
        mode,
        task=task,
        seed=seed,
        num_tasks=_target_size("--target-tasks", target_tasks, "--num-tasks", num_tasks),
        num_ranks=_target_size("--target-ranks", target_ranks, "--num-ranks", num_ranks),
        tasks=task_list,
        weights=weights,
        allow_negative_task=allow_negative_task,
        engine=engine,
        torch_threads=torch_threads,
    )
    push = PushRequest(push_to, private, create_pr) if push_to else None
    verify = "auto" if verify_after else None
    result = init_adapter(
        source, plan, out, force=force, base_model=base_model, verify=verify, push=push, peft_compat=peft_compat
    )
    for w in result["warnings"]:
        _render().echo(f"warning: {w}", err=True)
    _render().show_json(result) if as_json else _render().init_view(result)


@cli.command(
    "tasks",
    cls=Command,
    examples=[
        "mpt-tools tasks sources --select 2,0 --out two-tasks      # drops task 1, swaps 0 and 2",
        "mpt-tools tasks sources --select 0,0,1 --out three-tasks  # a new task 1 starts as a copy of task 0",
    ],
)
@click.argument("source", type=Text())
@option(
    "--select",
    required=True,
    type=NumberList(int),
    help="Source tasks for the new tasks 0, 1, ..., e.g. 2,0 (drops task 1).",
)
@OUT
@FORCE
@JSON
@PEFT_COMPAT
@source_options()
def tasks_cmd(
    source: SourceSpec, select: list[int], out: str, force: bool, as_json: bool, peft_compat: str | None
) -> None:
    """Select, reorder or drop the tasks of SOURCE into a new adapter in --out.

    New task i is source task SELECT[i]; values are copied bitwise in the source dtype and
    num_tasks in adapter_config.json follows.
    """
    from ..surgery import select_tasks

    result = select_tasks(source, select, out, force=force, peft_compat=peft_compat)
    _render().show_json(result) if as_json else _render().tasks_view(result)


@cli.command(
    cls=Command,
    examples=[
        "mpt-tools rerank sources --num-ranks 1 --out rank1      # lossy: prints each task's error",
        "mpt-tools rerank sources --num-ranks 8 --out rank8      # exact factors (zero padding)",
    ],
)
@click.argument("source", type=Text())
@option("--num-ranks", "num_ranks", required=True, type=COUNT, help="The new rank R.")
@OUT
@FORCE
@JSON
@PEFT_COMPAT
@source_options(sizes=False)
def rerank(source: SourceSpec, num_ranks: int, out: str, force: bool, as_json: bool, peft_compat: str | None) -> None:
    """Change the rank of SOURCE's task factors, into a new adapter in --out.

    Higher rank: zero padding (the factors bitwise, then zeros; PEFT's float32 prompt may differ in
    the last bits, see the README). Lower rank: per task the best rank-R approximation of
    cols[k] @ rows[k] (truncated SVD); the relative error of each task's prompt is reported.
    """
    from ..surgery import rerank as run

    result = run(source, num_ranks, out, force=force, peft_compat=peft_compat)
    _render().show_json(result) if as_json else _render().rerank_view(result)


@cli.command(
    cls=Command,
    examples=[
        "mpt-tools convert old/adapter_model.bin --out new/                  # folder: weights + config",
        "mpt-tools convert old/adapter_model.bin --out new.safetensors       # one file",
        "mpt-tools convert sources --out sources-bf16 --dtype bfloat16       # prints the max cast error",
    ],
)
@click.argument("source", type=Text())
@option(
    "--out",
    section="Output",
    required=True,
    type=PathText(),
    help="A file ending in .safetensors, or a folder (adapter_model.safetensors + adapter_config.json).",
)
@option("--dtype", type=DtypeChoice(), help="Cast every tensor.")
@FORCE
@JSON
@PEFT_COMPAT
@source_options()
def convert(
    source: SourceSpec, out: str, dtype: str | None, force: bool, as_json: bool, peft_compat: str | None
) -> None:
    """Convert SOURCE (.bin/.pt/.pth loaded weights-only, or .safetensors) to safetensors.

    Keys are normalised to the canonical names; the written file is read back and compared
    (bitwise for a plain conversion; the max cast error is reported for --dtype). Values out of
    float16's range are refused.
    """
    from ..conversion import convert as run

    result = run(source, out, dtype=dtype, force=force, peft_compat=peft_compat)
    _render().show_json(result) if as_json else _render().convert_view(result)


@cli.command(
    "export-prompt",
    cls=Command,
    examples=[
        "mpt-tools export-prompt sources --task 2 --out task2-prompt",
        "mpt-tools export-prompt t5-sources --task 0 --out t0 --encoder-only",
    ],
)
@click.argument("source", type=Text())
@option("--task", required=True, type=Int(), help="The source task to export.")
@OUT
@option(
    "--encoder-only",
    is_flag=True,
    help="Seq2seq with 2 submodules: export only the encoder half (what generate() uses).",
)
@FORCE
@JSON
@PEFT_COMPAT
@source_options()
def export_prompt(
    source: SourceSpec,
    task: int,
    out: str,
    encoder_only: bool,
    force: bool,
    as_json: bool,
    peft_compat: str | None,
) -> None:
    """Write task --task's prompt P* * (cols[k] @ rows[k]) as a plain PEFT PROMPT_TUNING adapter.

    `mpt-tools export SOURCE --to peft` writes the same folder for every task at once.
    """
    from ..surgery import export_prompt as run

    result = run(source, task, out, encoder_only=encoder_only, force=force, peft_compat=peft_compat)
    _render().show_json(result) if as_json else _render().export_view(result)


def _task_selection(ctx: click.Context, param: click.Parameter, value: str) -> list[int] | None:
    """``--tasks``: ``all`` (None) or a comma-separated list of task indices."""
    if value.strip().lower() == "all":
        return None
    try:
        return NumberList(int).convert(value, param, ctx)
    except click.BadParameter as exc:
        raise click.BadParameter(f"{exc.message} (or all)", ctx, param) from None


@cli.command(
    "export",
    cls=Command,
    examples=[
        "mpt-tools export sources --to tgis --out store/sources     # prefix_id sources/task_2 picks task 2",
        "mpt-tools export sources --to peft --tasks 0,2 --names qa,nli --out prompts",
        "mpt-tools export sources --to vllm --dtype bfloat16 --out embeds   # embeds/task_2.b64 for prompt_embeds",
        "mpt-tools export sources --to trtllm --out table            # prompt_table.npy, row k = task k",
        "mpt-tools export t5-sources --to tgis --caikit --max-prefix-len 64 --out store/t5",
    ],
)
@click.argument("source", type=Text())
@option(
    "--to",
    "to",
    required=True,
    type=click.Choice(["peft", "tgis", "vllm", "trtllm", "npy"]),
    help="peft: a PROMPT_TUNING folder per task; tgis: a TGIS prefix store (NAME/decoder.pt); vllm: "
    "NAME.pt and NAME.b64 for prompt_embeds; trtllm: prompt_table.npy [N, T, d]; npy: NAME.npy [T, d].",
)
@option(
    "--tasks",
    "task_list",
    metavar="all|LIST",
    default="all",
    show_default=True,
    callback=_task_selection,
    help="The tasks to bake, e.g. 0,3,5.",
)
@option(
    "--names",
    type=Text(),
    callback=lambda ctx, param, value: None if value is None else [v.strip() for v in value.split(",")],
    help="One name per task, comma-separated, e.g. qa,nli [default: task_<k>].",
)
@option(
    "--dtype",
    type=DtypeChoice(),
    default="float32",
    show_default=True,
    help="Stored dtype (peft, tgis, vllm) or the engine's (trtllm, npy stay float32); values must be finite in it.",
)
@option(
    "--encoder-only",
    is_flag=True,
    help="Seq2seq with 2 submodules: only the encoder half (peft, tgis, npy).",
)
@option("--caikit", is_flag=True, help="tgis: also write caikit-nlp's config.yml in each prefix folder.")
@option(
    "--max-prefix-len",
    type=COUNT,
    section="Checks",
    help="tgis: the server's MAX_PROMPT_PREFIX_LENGTH; longer prompts are refused.",
)
@option("--out", required=True, type=PathText(), section="Output", help="Output folder (made when missing).")
@option("--force", is_flag=True, section="Output", help="Replace the entries (and manifest.json) already in --out.")
@JSON
@PEFT_COMPAT
@source_options()
@base_model_options
def export_cmd(
    source: SourceSpec,
    to: str,
    task_list: list[int] | None,
    names: list[str] | None,
    dtype: str,
    encoder_only: bool,
    caikit: bool,
    max_prefix_len: int | None,
    out: str,
    force: bool,
    as_json: bool,
    peft_compat: str | None,
    base_model: str | bool | None,
) -> None:
    """Bake every task's prompt P* * (cols[k] @ rows[k]) (or --tasks) for a serving engine, into --out.

    Writes manifest.json (source, sha256, task -> files, T, d, dtype, how to serve it) and prints
    how to serve the result. Limits are checked before anything is written (fp16 overflow,
    TGIS's prefix length and even-row rule, d against --base-model, seq2seq where the engine
    cannot take it). export-prompt still writes one task as one PEFT folder.
    """
    from ..export import ExportOptions, export_prompts

    options = ExportOptions(
        dtype=dtype,
        encoder_only=encoder_only,
        max_prefix_len=max_prefix_len,
        caikit=caikit,
        base_model=base_model,
        peft_compat=peft_compat,
    )
    result = export_prompts(source, to, out, tasks=task_list, names=names, force=force, options=options)
    _render().show_json(result) if as_json else _render().export_all_view(result)


def _task_lists(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> list[list[int] | None]:
    """``--tasks`` given once per ``--from``: each ``all`` (None) or a list of task indices."""
    return [_task_selection(ctx, param, v) for v in value]


@cli.command(
    "pack",
    cls=Command,
    examples=[
        "mpt-tools pack prompts/qa prompts/nli prompts/sum --num-ranks 2 --out packed  # PEFT prompt tuning",
        "mpt-tools pack store/qa store/nli --task-type CAUSAL_LM --num-ranks 2 --out packed  # TGIS decoder.pt",
        "mpt-tools pack --from mpt-a --from mpt-b --tasks all --tasks 0,2 --num-ranks 4 --out merged",
        "mpt-tools pack new-task/ --append-to sources --out sources-plus   # sources' tasks kept bitwise",
        "mpt-tools pack a.npy b.npy --shared sources --num-ranks 2 --task-type CAUSAL_LM --out ab",
        "mpt-tools pack teachers/* --num-ranks 2 --start baseline --out packed  # PEFT folders trained one by one",
        "mpt-tools pack org/qa-prompt hf://org/nli-prompt@v1 --num-ranks 2 --out packed  # from the Hub",
    ],
)
@click.argument("prompts", metavar="[PROMPTS]...", nargs=-1, type=Text())
@option(
    "--from",
    "from_sources",
    metavar="SOURCE",
    multiple=True,
    type=Text(),
    section="Source",
    help="An MPT adapter whose tasks' prompts are packed too, after PROMPTS (repeatable: merges adapters).",
)
@option(
    "--tasks",
    "task_lists",
    metavar="all|LIST",
    multiple=True,
    callback=_task_lists,
    section="Source",
    help="The tasks of each --from, in order: one --tasks per --from [default: all tasks].",
)
@option("--num-ranks", type=COUNT, section="Target", help="The rank R of every task [default: --append-to's].")
@option(
    "--shared",
    metavar="FILE_OR_ADAPTER",
    type=Text(),
    section="Target",
    help="Fix P* to this [T, d] tensor (a file, a prompt folder, an MPT adapter's P*); fit only the factors.",
)
@option(
    "--append-to",
    metavar="SOURCE",
    type=Text(),
    section="Target",
    help="Append the new tasks to this MPT adapter: its P* fixed, its tasks kept bitwise.",
)
@option(
    "--task-type",
    type=Text(),
    section="Target",
    help="task_type (e.g. CAUSAL_LM) when no input states it (bare tensors, a TGIS decoder.pt).",
)
@option(
    "--num-transformer-submodules",
    section="Target",
    type=IntRange(1, 2),
    help="1 or 2, when no input states it (bare tensors): 1 for the encoder half of a SEQ_2_SEQ_LM prompt"
    " [default: 2 for SEQ_2_SEQ_LM, else 1].",
)
@option("--seed", type=SEED, default=0, show_default=True, help="Seeds the start's unused rank directions.")
@option(
    "--tol",
    type=FloatRange(min=0),
    default=1e-6,
    show_default=True,
    help="Stop when an iteration lowers the objective by at most this fraction (or when every task's error"
    " is within a quarter of the round-off of its input's dtype and the written one).",
)
@option(
    "--max-iters",
    type=IntRange(min=0),
    default=1000,
    show_default=True,
    help="The most iterations (0: write the start).",
)
@option(
    "--start",
    type=click.Choice(["auto", "baseline"]),
    default="auto",
    show_default=True,
    help="auto: also try P* recovered by linear algebra and start from the best; baseline: skip the"
    " recovery (seconds where it searches, on small prompts trained one by one) and start from the mean"
    " prompt or its signs with the prompts' rms magnitudes.",
)
@option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
@OUT
@option(
    "--dtype",
    section="Output",
    type=DtypeChoice(),
    help="Stored dtype [default: float32; with --append-to the adapter's].",
)
@FORCE
@JSON
@PEFT_COMPAT
@hub_options
def pack_cmd(
    prompts: tuple[str, ...],
    from_sources: tuple[str, ...],
    task_lists: list[list[int] | None],
    num_ranks: int | None,
    shared: str | None,
    append_to: str | None,
    task_type: str | None,
    num_transformer_submodules: int | None,
    seed: int,
    tol: float,
    max_iters: int,
    start: str,
    device: str,
    out: str,
    dtype: str | None,
    force: bool,
    as_json: bool,
    peft_compat: str | None,
    hub: HubOptions,
) -> None:
    """Fit one MPT adapter to single-task prompts: P_k ~ P* * (U_k @ V_k), into --out.

    PROMPTS are PEFT prompt-tuning adapters (folders, or Hub repos: org/name or
    hf://org/name@rev/sub), TGIS prefix folders (decoder.pt, + encoder.pt for encoder-decoder
    models), [T, d] tensor files (.npy, .pt, .safetensors) or `mpt-tools export` folders (every task
    in its manifest.json, in task order); --from adds the tasks of MPT
    adapters. The Hub flags apply to every Hub input. Task i of the adapter is the i-th prompt, then the --from tasks.
    Alternating least squares from the baseline (P* = the mean prompt, factors from a truncated
    SVD of P_k / P*) or, where its objective is lower, from P* recovered by linear algebra
    (exact for baked adapters of rank 1, and of rank 2 to 7 from 2 tasks where T or d is at
    least C(2R, R) + 1 and the other 2R; on smaller prompts at ranks 2 and 3, by a search
    that most often finds it; --start baseline skips it), on the GPU when there is one; the
    objective never increases, so the fit is never worse than the baseline. Prints each task's
    relative error and the baseline's.
    """
    from ..pack import PackOptions, TaskSource, pack_prompts

    if task_lists and not from_sources:
        raise click.UsageError("--tasks selects the tasks of a --from SOURCE: give --from too")
    if task_lists and len(task_lists) != len(from_sources):
        raise click.UsageError(f"give one --tasks per --from ({len(from_sources)} --from, {len(task_lists)} --tasks)")
    if not prompts and not from_sources:
        raise click.UsageError("give PROMPTS to pack, or --from SOURCE")
    if num_ranks is None and append_to is None:
        raise click.UsageError("give --num-ranks R (or --append-to SOURCE, whose rank the new tasks take)")
    if num_transformer_submodules == 2 and task_type is not None and task_type != "SEQ_2_SEQ_LM":
        raise click.UsageError(
            "--num-transformer-submodules 2 (encoder rows, then decoder rows) is for SEQ_2_SEQ_LM prompts,"
            f" not --task-type {task_type}"
        )
    lists = task_lists or [None] * len(from_sources)
    sources = [TaskSource(SourceSpec(s, hub=hub), t) for s, t in zip(from_sources, lists, strict=True)]
    options = PackOptions(
        num_ranks=num_ranks,
        shared=shared,
        append_to=append_to,
        task_type=task_type,
        dtype=dtype,
        seed=seed,
        tol=tol,
        max_iters=max_iters,
        device=device,
        peft_compat=peft_compat,
        start=start,
        hub=hub,
        num_transformer_submodules=num_transformer_submodules,
    )
    result = pack_prompts(prompts, out, sources=sources, options=options, force=force)
    _render().show_json(result) if as_json else _render().pack_view(result)


@cli.command(
    cls=Command,
    examples=[
        "mpt-tools compat sources --peft 0.10.0 --out sources-peft0.10  # a PEFT-written folder, for 0.10.0",
        "mpt-tools compat org/mpt-adapter --peft 0.13 --out local --json  # 0.13: the oldest 0.13.x",
    ],
)
@click.argument("adapter", type=Text())
@option(
    "--peft",
    "peft",
    required=True,
    type=PeftRelease(),
    help="The PEFT release that must load the adapter, e.g. 0.10.0 (X.Y: the oldest X.Y.z).",
)
@OUT
@FORCE
@JSON
@option(
    "--subfolder",
    section="Source",
    type=Text(),
    help="Named adapter saved under a subfolder of the directory or repo.",
)
@hub_options
def compat(
    adapter: str, peft: str, out: str, force: bool, as_json: bool, subfolder: str | None, hub: HubOptions
) -> None:
    """Rewrite ADAPTER's adapter_config.json so that PEFT release --peft loads it, into --out.

    ADAPTER is an MPT or PROMPT_TUNING adapter folder written by any PEFT release or by
    mpt-tools (or a Hub repo); it is checked first. Keys the release does not know are left out
    when they hold their default (peft_version always); a value that needs a newer release is
    refused. The weights file is copied byte for byte. Prints the keys removed and kept.
    """
    from ..compat import compat_adapter as run

    result = run(SourceSpec(adapter, subfolder=subfolder, hub=hub), peft, out, force=force)
    _render().show_json(result) if as_json else _render().compat_view(result)


@cli.command(
    cls=Command,
    examples=[
        "mpt-tools embed target --task 0 --text 'Translate: hello' --base-model gpt2 --out req.pt",
        'mpt-tools embed sources --task 2 --text "$PROMPT" --base-model ./llama --to vllm --out req.b64',
        "mpt-tools embed sources --task 1 --text 'Hi' --base-model org/model --to sglang --out req.json",
    ],
)
@click.argument("source", type=Text())
@option("--task", required=True, type=IntRange(min=0), help="The MPT task whose prompt goes first.")
@option("--text", required=True, type=Text(), help="The request's text, tokenized by the base model's tokenizer.json.")
@option(
    "--base-model",
    "base_model",
    required=True,
    type=Text(),
    help="The model served: a local folder or a Hub repo id (its tokenizer.json and input embeddings).",
)
@option(
    "--to",
    "to",
    section="Output",
    type=click.Choice(["pt", "vllm", "sglang"]),
    default="pt",
    show_default=True,
    help="pt: torch.save of the tensor (vLLM offline); vllm: its base64 (HTTP); sglang: JSON input_embeds.",
)
@option(
    "--out",
    required=True,
    type=PathText(dir_okay=False, allow_dash=True),
    section="Output",
    help="The file to write; - for stdout (the report goes to stderr).",
)
@FORCE
@JSON
@source_options()
def embed(
    source: SourceSpec,
    task: int,
    text: str,
    base_model: str,
    to: str,
    out: str,
    force: bool,
    as_json: bool,
) -> None:
    """Write a serving engine's input for one request: task --task's prompt, then the text's embeddings.

    The tensor is cat(P_k, E[ids]) [T + n, d]: P_k as PEFT computes it, cast to the embedding's
    dtype, and the rows of the base model's input embedding matrix for the text's token ids
    (special tokens as the model's tokenizer.json adds them). Only those rows are read, locally or
    from the Hub. Fed as inputs_embeds (vLLM prompt_embeds, SGLang input_embeds), the base model
    gives what the PEFT MPT model gives with task_ids=[K]. Needs the tokenizers package.
    """
    if out == "-":
        if as_json:
            raise click.UsageError("--json and --out - would both write to stdout: give --out FILE for --json")
        if to == "pt" and sys.stdout is not None and sys.stdout.isatty():
            raise click.UsageError("--to pt is binary: redirect stdout (> req.pt, | ...) or give --out FILE")
        from ..embed import embed_payload

        payload, result = embed_payload(source, task, text, base_model, to=to, hub=source.hub)
        _render().write_stdout(payload)
        _render().embed_view(result, err=True)
        return
    from ..embed import embed_request as run

    result = run(source, task, text, base_model, out, to=to, force=force, hub=source.hub)
    _render().show_json(result) if as_json else _render().embed_view(result)


@cli.command(
    cls=Command,
    examples=[
        "mpt-tools audit runs/                              # every adapter under runs/, headers only",
        "mpt-tools audit runs/ --deep --markdown > audit.md # values too; a table for an issue",
        "mpt-tools audit --author my-org --json | jq 'select(.valid == false)'",
        "mpt-tools audit org/mpt-sources org/mpt-target@v2 --csv > hub.csv",
    ],
)
@click.argument("targets", metavar="PATH_OR_REPO...", nargs=-1, type=Text())
@option(
    "--author",
    "authors",
    metavar="ORG",
    multiple=True,
    type=Text(),
    help="Also every PEFT model repo of this Hub user or organisation (repeatable).",
)
@option(
    "--deep",
    section="Checks",
    is_flag=True,
    help="Also read the values: NaN/Inf and float32 bounds, sha256 of local weights and of P*, .bin files.",
)
@option(
    "--jobs",
    type=IntRange(1, 256),
    help="Adapters audited at once [default: the number of CPUs; at most 8 Hub requests at once].",
)
@option(
    "--json",
    "as_json",
    is_flag=True,
    section="Output",
    help="JSON Lines: one row per adapter as it is done, then a summary line.",
)
@option("--csv", "as_csv", is_flag=True, section="Output", help="CSV: every field, one line per adapter.")
@option(
    "--markdown", "as_markdown", is_flag=True, section="Output", help="A Markdown table, its notes listed, the summary."
)
@hub_options
def audit(
    targets: tuple[str, ...],
    authors: tuple[str, ...],
    deep: bool,
    jobs: int | None,
    as_json: bool,
    as_csv: bool,
    as_markdown: bool,
    hub: HubOptions,
) -> None:
    """Audit every adapter under folders, in Hub repos and in a Hub author's PEFT repos.

    One row per adapter: where, type, N, T, r, d, dtype, validity and finding codes, the PEFT
    releases that load it, the serving hazard (an MPT folder that prompt-tuning servers would
    serve as P* for every task) and duplicates. Without --deep only configs and safetensors
    headers are read (no weights are downloaded from the Hub). Exit 1 when any adapter has an
    error; Ctrl-C prints the summary of what was audited so far.
    """
    from ..audit import audit_adapters as run

    if not targets and not authors:
        raise click.UsageError("give at least one PATH_OR_REPO or --author ORG")
    if as_json + as_csv + as_markdown > 1:
        raise click.UsageError("--json, --csv and --markdown are exclusive: give one")
    render = _render()
    on_row = render.show_json_line if as_json else None
    result = run(targets, authors=authors, deep=deep, jobs=jobs, hub=hub, on_row=on_row, keep_rows=not as_json)
    if as_json:
        render.show_json_line({k: v for k, v in result.items() if k != "rows"})
    elif as_csv:
        render.audit_csv(result)
    elif as_markdown:
        render.audit_markdown(result)
    else:
        render.audit_view(result)
    if result["interrupted"]:
        import signal

        from ..interrupts import Interrupted

        raise Interrupted(int(signal.Signals[result["interrupted"]]))
    bad = result["invalid"] + result["unreadable"]
    if bad:
        render.echo(f"error: {bad} of {result['adapters']} adapter(s) have errors (see the rows above)", err=True)
        sys.exit(1)


@cli.command(
    cls=Command,
    examples=[
        "mpt-tools diff sources/ converted/ && echo same",
        "mpt-tools diff target/ org/mpt-target --json",
    ],
)
@click.argument("a", type=Text())
@click.argument("b", type=Text())
@JSON
@hub_options
def diff(a: str, b: str, as_json: bool, hub: HubOptions) -> None:
    """Compare adapters A and B: keys, shapes, dtypes, config, values, per-task prompts.

    Exit 0 when identical, 1 when they differ (the report still goes to stdout, a one-line
    summary to stderr) or when one cannot be read.
    """
    from ..compare import diff as run

    report = run(SourceSpec(a, hub=hub), SourceSpec(b, hub=hub))
    _render().show_json(report) if as_json else _render().diff_view(report)
    if not report["identical"]:
        _render().echo(f"differ: {report['a']} vs {report['b']}: {report['summary']}", err=True)
        sys.exit(1)


@cli.command(
    "verify",
    cls=Command,
    examples=[
        "mpt-tools verify target --dtype bfloat16",
        "mpt-tools verify target --source sources --device cpu --json",
        "mpt-tools verify sources --tasks 0,3,5",
    ],
)
@click.argument("path", type=Text())
@option(
    "--source",
    type=Text(),
    help="Check the target against this source (default: the one init recorded, if present).",
)
@option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
@option(
    "--dtype",
    type=DtypeChoice(),
    default="float32",
    show_default=True,
    help="Dtype of the rebuild (compared against float64).",
)
@option("--tasks", "task_list", type=NumberList(int), help="Only these tasks, e.g. 0,3,5.")
@option(
    "--json", "as_json", section="Output", is_flag=True, help="Machine-readable report (schema mpt-tools/verify/1)."
)
@source_options("path")
def verify_cmd(
    path: SourceSpec, source: str | None, device: str, dtype: str, task_list: list[int] | None, as_json: bool
) -> None:
    """Rebuild every task prompt of PATH on the GPU (or CPU) and check it against float64.

    PATH is a local adapter or a Hub repo (the source flags apply to it; --token, --cache-dir and
    --offline also to a Hub --source). Also checks a target written by `init` against its source.
    Prints the report; exit 1 with one line on stderr naming the failing tasks when anything fails.
    """
    from ..errors import VerificationFailed
    from ..verification import verify as run

    show = _render().show_json if as_json else _render().verify_view
    try:
        report = run(path, source=source, device=device, dtype=dtype, tasks=task_list)
    except VerificationFailed as exc:
        show(exc.report)
        raise
    show(report)


@cli.command(
    cls=Command,
    examples=[
        "mpt-tools push target/ me/mpt-target --dry-run          # what would be sent; sends nothing",
        "mpt-tools push target/ me/mpt-target --private          # creates the repo if needed",
        "mpt-tools push target/ org/shared --create-pr           # a pull request instead of a commit",
    ],
)
@click.argument("folder", metavar="DIR", type=PathText())
@click.argument("repo_id", type=Text())
@option("--private", is_flag=True, help="Create the repo private (when missing); an existing public repo is refused.")
@option("--revision", metavar="BRANCH", type=Text(), help="Push to this branch (created from main when missing).")
@option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
@option("--commit-message", metavar="M", help="Commit title (default names the mode and version).")
@option("--token", metavar="TOKEN", help="Hub write token (else HF_TOKEN or the stored login).")
@option("--dry-run", is_flag=True, help="Print what would be uploaded (files, sha256, card); send nothing.")
@JSON
def push(
    folder: str,
    repo_id: str,
    private: bool,
    revision: str | None,
    create_pr: bool,
    commit_message: str | None,
    token: str | None,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Push the adapter in DIR to the Hub repo REPO_ID in one commit.

    DIR is an MPT adapter (what init wrote), or one task's prompt-tuning folder (export --to peft,
    export-prompt). DIR is validated first. Uploads adapter_model.safetensors, adapter_config.json and a generated
    model card (README.md: base model, tags, how the adapter was made and how to load it); creates
    the repo and branch when missing. Prints the commit URL (or the pull request URL).
    """
    from ..hub.push import push_adapter

    result = push_adapter(
        folder,
        repo_id,
        private=private,
        revision=revision,
        create_pr=create_pr,
        commit_message=commit_message,
        token=token,
        dry_run=dry_run,
    )
    _render().show_json(result) if as_json else _render().push_view(result)


def main() -> None:
    """Run the command line (the ``mpt-tools`` console script and ``python -m mpt_tools`` call it
    through :func:`mpt_tools.__main__.main`, which installs the signal handlers first).

    Signals are noted, not raised, outside the command itself: one that came while the command
    line started is acted on before the arguments are parsed; one that came while Click exited,
    after the command succeeded, when it ends (its line, 128+N); after a command that failed and
    said so, a late one changes nothing.

    When the command has run, the process ends at once (``os._exit``, after stdout and stderr
    are flushed), as mypy's does: every file it wrote is already closed and synced, and a normal
    exit would spend 25-60 ms freeing objects (numpy's modules among them) that the OS frees
    anyway. A traceback (``MPT_TOOLS_DEBUG=1``) still takes the normal way out."""
    from .. import interrupts

    interrupts.install(act=False)  # again: main() may be called without mpt_tools.__main__
    _open_closed_std_fds()
    code: object = None
    try:
        try:
            with interrupts.acting():  # a signal while Python and the command line started
                pass
            cli(prog_name="mpt-tools")
        except SystemExit as exc:
            code = exc.code
        finally:
            if code not in (None, 0):  # the command failed and said so: a signal since changes nothing
                interrupts.take_pending()
            with interrupts.acting():  # a signal while Click exited (after a success)
                _flush_stdout()
    except KeyboardInterrupt as exc:
        code = _interrupted(None, exc)
    _hard_exit(code)


def _open_closed_std_fds() -> None:
    """Point a closed stdin, stdout or stderr (``>&-``) at /dev/null, so that no file this command
    opens gets its number (something writing to fd 1 would write into it). ``sys.stdout`` stays
    None: what would be printed goes nowhere and the command succeeds silently."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            try:
                null = os.open(os.devnull, os.O_RDWR)
                if null != fd:
                    os.dup2(null, fd)
                    os.close(null)
            except OSError:
                pass


def _hard_exit(code: object) -> NoReturn:
    """``sys.exit(code)``'s status and message, without the interpreter's teardown."""
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # what sys.exit does with a message: print it, status 1
        if sys.stderr is not None:
            with contextlib.suppress(OSError, ValueError):
                print(code, file=sys.stderr)
        status = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):  # None when closed (>&-)
            stream.flush()
    os._exit(status & 0xFF)  # as the OS reports sys.exit(status): -1 is 255


def _flush_stdout() -> None:
    """Flush stdout now, so that a reader that left early costs no message at exit."""
    if sys.stdout is None:  # closed (>&-): nothing was printed
        return
    try:
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):
        _render().detach_stdout()
    except OSError:
        pass


if __name__ == "__main__":
    main()
