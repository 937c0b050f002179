"""The ``mpt-tools`` command line: parse options, call the library, print results.

Errors from the library (MptToolsError) become one line on stderr and exit 1; usage errors
exit 2 (Click's own); no traceback reaches the user unless MPT_TOOLS_DEBUG=1.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from collections.abc import Callable
from typing import Any

import click

from . import __version__
from .errors import MptToolsError

F = Callable[..., Any]
# the dtypes adapters are trained in (mpt_tools.formats.DTYPE_CHOICES; not imported: numpy at start-up)
TRAINING_DTYPES = ["float32", "bfloat16", "float16"]


def _debug() -> bool:
    return os.environ.get("MPT_TOOLS_DEBUG", "") not in ("", "0")


class Group(click.Group):
    """A Click group that turns library errors into one line and exit 1."""

    def invoke(self, ctx: click.Context) -> Any:
        """Run the command; map MptToolsError (and anything unexpected) to exit 1."""
        try:
            return super().invoke(ctx)
        except MptToolsError as exc:
            if _debug():
                raise
            echo(f"error: {_one_line(str(exc))}", err=True)
            ctx.exit(1)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            echo("error: interrupted", err=True)
            ctx.exit(130)
        except BrokenPipeError:  # `mpt-tools inspect x | head`: the reader left; say nothing more
            with contextlib.suppress(OSError, ValueError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
            ctx.exit(1)
        except Exception as exc:  # a bug: still no traceback for users
            if _debug() or os.environ.get("MPT_TOOLS_RAISE_UNEXPECTED"):
                raise
            echo(
                f"error: internal error ({type(exc).__name__}: {_one_line(str(exc))}); "
                "set MPT_TOOLS_DEBUG=1 for a traceback and please report it",
                err=True,
            )
            ctx.exit(1)


# C0/C1 control characters (newlines, terminal escape sequences, ...) and the Unicode line and
# paragraph separators: tensor names, metadata and config values come from files that may be hostile.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escape(match: re.Match[str]) -> str:
    return ascii(match.group())[1:-1]


def echo(text: str = "", *, err: bool = False) -> None:
    """Print one line (stdout, or stderr with ``err``). Control characters in it, which can only
    come from file contents (a newline in a tensor name, a terminal escape sequence in metadata),
    are shown escaped (``\\n``, ``\\x1b``), so they can neither split the line nor reach the terminal."""
    click.echo(_CONTROL.sub(_escape, text), err=err)


def echo_lines(text: str) -> None:
    """Print text made of several lines of mpt-tools' own making, each through :func:`echo`."""
    for line in text.split("\n"):
        echo(line)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


def _source_option_list(with_sizes: bool) -> list[Callable[[F], F]]:
    sizes = [
        click.option("--num-tasks", "src_num_tasks", type=int, help="Override the source's num_tasks."),
        click.option("--num-ranks", "src_num_ranks", type=int, help="Override the source's num_ranks."),
    ]
    return [
        click.option("--subfolder", help="Named adapter saved under a subfolder of the directory or repo."),
        *(sizes if with_sizes else []),
        click.option("--num-virtual-tokens", type=int, help="Give or override num_virtual_tokens."),
        click.option("--token-dim", type=int, help="Give or override token_dim."),
        click.option("--num-transformer-submodules", type=int, help="Give or override nts (1 or 2)."),
        click.option("--task-type", help="Give or override task_type (e.g. CAUSAL_LM, SEQ_2_SEQ_LM)."),
        *hub_option_list(),
    ]


def source_options(func: F) -> F:
    """Options shared by every command that reads a SOURCE: subfolder, config fields, Hub."""
    return with_options(_source_option_list(with_sizes=True))(func)


def _plain_source_options(func: F) -> F:
    """source_options without --num-tasks/--num-ranks (for commands that set those themselves)."""
    return with_options(_source_option_list(with_sizes=False))(func)


def hub_option_list() -> list[Callable[[F], F]]:
    """Options for Hub sources."""
    return [
        click.option("--revision", help="Hub source: branch, tag or commit."),
        click.option("--token", help="Hub token (else HF_TOKEN or the stored login).", metavar="TOKEN"),
        click.option("--cache-dir", type=click.Path(file_okay=False), help="Hub cache folder."),
        click.option("--offline", is_flag=True, help="Hub source: use the local cache only."),
    ]


def with_options(options: list[Callable[[F], F]]) -> Callable[[F], F]:
    """A decorator applying ``options`` in order (the first one listed first in --help)."""

    def decorate(func: F) -> F:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def base_model_option_list() -> list[Callable[[F], F]]:
    """Options of the base-model check (off by default: a local validate never touches the network)."""
    return [
        click.option(
            "--base-model",
            metavar="ID_OR_DIR",
            help="Check token_dim against this base model's config.json (Hub id or local folder).",
        ),
        click.option(
            "--check-base-model",
            is_flag=True,
            help="Check token_dim against the config's base_model_name_or_path (fetches its config.json).",
        ),
    ]


def _overrides(kw: dict[str, Any], *, with_counts: bool = True) -> dict[str, Any]:
    out = {
        "num_virtual_tokens": kw.pop("num_virtual_tokens", None),
        "token_dim": kw.pop("token_dim", None),
        "num_transformer_submodules": kw.pop("num_transformer_submodules", None),
        "task_type": kw.pop("task_type", None),
    }
    n, r = kw.pop("src_num_tasks", None), kw.pop("src_num_ranks", None)
    if with_counts:
        out["num_tasks"], out["num_ranks"] = n, r
    return out


def _hub(kw: dict[str, Any]) -> dict[str, Any]:
    return {
        "revision": kw.pop("revision", None),
        "token": kw.pop("token", None),
        "cache_dir": kw.pop("cache_dir", None),
        "offline": kw.pop("offline", False),
    }


def _print_findings(findings: list[dict[str, Any]]) -> None:
    from .checks import Finding

    for f in findings:
        echo("  " + Finding(**f).line())


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mpt-tools")
def cli() -> None:
    """Checkpoint conversion and surgery for Multitask Prompt Tuning (MPT) adapters.

    SOURCE is a .safetensors file, a .bin/.pt/.pth file (weights-only), a PEFT adapter
    directory, or a Hub repo id (org/name or hf://org/name[@revision][/subfolder]).
    """


@cli.command()
@click.argument("source")
@click.option("--against", type=click.Path(), help="Planned target adapter_config.json (file or folder).")
@click.option("--mode", help="Target mode: average, exact, shared (or PEFT's names).")
@click.option("--task", type=int, help="Source task for --mode exact.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@source_options
@with_options(base_model_option_list())
def validate(source: str, against: str | None, mode: str | None, task: int | None, as_json: bool, **kw: Any) -> None:
    """Check SOURCE (and a planned target) and report every problem at once.

    Exit 0 when valid, 1 when not.
    """
    from .pipeline import validate as run

    report = run(
        source,
        against=against,
        mode=mode,
        task=task,
        overrides=_overrides(kw),
        subfolder=kw.pop("subfolder"),
        hub_options=_hub(kw),
        base_model=kw.pop("base_model", None),
        check_base_model=kw.pop("check_base_model", False),
    )
    if as_json:
        _echo_json(report)
    else:
        errs = [f for f in report["findings"] if f["level"] == "error"]
        warns = [f for f in report["findings"] if f["level"] == "warning"]
        state = "valid" if report["valid"] else "INVALID"
        plan = ""
        if report["mode"]:
            plan = f" with a planned {report['mode']} target" + (f" ({report['against']})" if report["against"] else "")
        echo(f"{report['source']}{plan}: {state} ({len(errs)} error(s), {len(warns)} warning(s))")
        _print_findings(report["findings"])
    _exit_if_invalid(report)


def _exit_if_invalid(report: dict[str, Any]) -> None:
    """After a report was printed: one line on stderr and exit 1 when it holds errors."""
    if report.get("valid", True):
        return
    errs = [f for f in report["findings"] if f["level"] == "error"]
    first = errs[0]
    detail = ""
    if first.get("expected") is not None or first.get("found") is not None:
        detail = f" (expected {first['expected']}, found {first['found']})"
    more = f" [and {len(errs) - 1} more]" if len(errs) > 1 else ""
    echo(f"error: {report['source']}: {first['field']}: {first['message']}{detail}{more}", err=True)
    sys.exit(1)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


@cli.command()
@click.argument("source")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (schema in the README).")
@click.option("--no-norms", is_flag=True, help="Skip the per-task norms (reads only the header).")
@click.option("--similarity", is_flag=True, help="Print the task-by-task cosine similarity of the prompts.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Draw the similarity matrix as a heatmap PNG.")
@click.option("--force", is_flag=True, help="Overwrite an existing --plot file.")
@source_options
def inspect(
    source: str, as_json: bool, no_norms: bool, similarity: bool, plot: str | None, force: bool, **kw: Any
) -> None:
    """Describe SOURCE: files, sha256, tensors, config, parameters, findings, per-task norms."""
    from .pipeline import inspect_source
    from .source import load_source

    ckpt = load_source(source, overrides=_overrides(kw), subfolder=kw.pop("subfolder"), hub_options=_hub(kw))
    report = inspect_source(ckpt, norms=not no_norms)
    sim_matrix = _add_similarity(report, ckpt, plot, force) if similarity or plot else None
    if as_json:
        _echo_json(report)
        _exit_if_invalid(report)
        return
    echo(f"source: {report['source']} ({report['format']})")
    for f in report["files"]:
        echo(f"  {f['role']:<7} {f['path']}  {f['bytes']} bytes  sha256 {f['sha256']}")
    echo("tensors:")
    for t in report["tensors"]:
        label = t["key"] or "(ignored)"
        stored = f"  (stored as {t['stored_as']})" if t["stored_as"] != t["key"] else ""
        echo(f"  {label:<18} {t['dtype']:<9} {t['shape']!s:<16} {t['parameters']:>10} params{stored}")
    cfg = report["config"]
    echo(f"config: {report['config_source']}")
    for key in (
        "peft_type",
        "task_type",
        "num_virtual_tokens",
        "num_transformer_submodules",
        "token_dim",
        "num_tasks",
        "num_ranks",
        "prompt_tuning_init",
        "base_model_name_or_path",
    ):
        echo(f"  {key:<27} {cfg.get(key)}")
    p = report["parameters"]
    if p:
        echo("parameters: " + ", ".join(f"{k} {v}" for k, v in p.items()))
    if report["findings"]:
        echo("findings:")
        _print_findings(report["findings"])
    else:
        echo("findings: none (valid)")
    if report["tasks"]:
        echo(f"{'task':>6} {'|U_k|':>10} {'|V_k|':>10} {'|P_k|':>10}")
        for t in report["tasks"]:
            echo(f"{t['task']:>6} {_fmt(t['cols_norm']):>10} {_fmt(t['rows_norm']):>10} {_fmt(t['prompt_norm']):>10}")
    if similarity and sim_matrix is not None:
        from .compare import format_similarity

        echo("task similarity (cosine of the effective prompts):")
        echo_lines(format_similarity(sim_matrix))
    if report.get("plot"):
        echo(f"wrote {report['plot']}")
    _exit_if_invalid(report)


def _average_how(meta: dict[str, str]) -> str:
    """'mean of ...' for init's summary line, from the provenance it recorded."""
    tasks, weights = meta.get("mpt_tools.tasks"), meta.get("mpt_tools.weights")
    if weights:
        return f"weighted mean of source tasks {tasks} (weights {weights})"
    if tasks:
        return f"mean of source tasks {tasks}"
    return "mean of the source task factors"


def _int_list(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip() != ""]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


def _float_list(value: str | None) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(v) for v in value.split(",") if v.strip() != ""]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from None


@cli.command()
@click.argument("source")
@click.option(
    "--mode",
    required=True,
    help="average, exact or shared (or AVERAGE_SOURCE_TASKS, EXACT_SOURCE_TASK, ONLY_SOURCE_SHARED).",
)
@click.option("--out", required=True, type=click.Path(), help="Output adapter folder.")
@click.option("--task", type=int, help="Source task for --mode exact (default 0).")
@click.option(
    "--allow-negative-task",
    is_flag=True,
    help="Accept a negative --task, counted from the end as PEFT does (with a warning).",
)
@click.option("--seed", type=int, help="Seed for the fresh factors of --mode shared (recorded).")
@click.option("--num-tasks", "num_tasks", type=int, help="Target num_tasks (shared; 1 for average/exact).")
@click.option("--num-ranks", "num_ranks", type=int, help="Target num_ranks (shared; default the source's).")
@click.option("--tasks", "task_list", help="average: only these source tasks, e.g. 0,3,5.")
@click.option("--weights", help="average: one non-negative weight per --tasks entry (normalised).")
@click.option(
    "--target-tasks",
    type=int,
    default=1,
    show_default=True,
    help="average/exact: write a K-task target, every task starting from the chosen factors.",
)
@click.option("--force", is_flag=True, help="Overwrite an existing adapter in --out.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--verify",
    "verify_after",
    is_flag=True,
    help="Verify the adapter against SOURCE before it goes into --out; on failure --out is left as it was.",
)
@_plain_source_options
@with_options(base_model_option_list())
@click.option("--push", "push_to", metavar="REPO_ID", help="Then push --out to this Hub repo (see `push`).")
@click.option("--private", is_flag=True, help="With --push: create the repo private.")
@click.option("--create-pr", is_flag=True, help="With --push: open a pull request instead of committing.")
def init(
    source: str,
    mode: str,
    out: str,
    task: int | None,
    allow_negative_task: bool,
    seed: int | None,
    num_tasks: int | None,
    num_ranks: int | None,
    task_list: str | None,
    weights: str | None,
    target_tasks: int,
    force: bool,
    as_json: bool,
    verify_after: bool,
    **kw: Any,
) -> None:
    """Write a ready-to-train target adapter initialised from SOURCE into --out.

    average and exact are bitwise what PEFT's own init computes; shared copies the shared prompt
    and draws fresh N(0, 0.02) factors from --seed. The adapter_config.json says
    prompt_tuning_init RANDOM with a null path, so PEFT loads the folder anywhere.
    """
    from .pipeline import init_adapter

    run: Callable[..., dict[str, Any]] = init_adapter
    if verify_after:
        from .rebuild import init_and_verify

        run = init_and_verify

    hub = _hub(kw)
    result = run(
        source,
        mode,
        out,
        task=task,
        seed=seed,
        num_tasks=num_tasks,
        num_ranks=num_ranks,
        force=force,
        allow_negative_task=allow_negative_task,
        tasks=_int_list(task_list),
        weights=_float_list(weights),
        target_tasks=target_tasks,
        overrides=_overrides(kw, with_counts=False),
        subfolder=kw.pop("subfolder"),
        hub_options=hub,
        base_model=kw.pop("base_model", None),
        check_base_model=kw.pop("check_base_model", False),
    )
    for w in result["warnings"]:
        echo(f"warning: {w}", err=True)
    if kw.get("push_to"):
        result["push"] = _push_after_init(result["out"], kw, hub.get("token"))
    if as_json:
        _echo_json(result)
        return
    how = {
        "average": _average_how(result["metadata"]),
        "exact": f"source task {result['task']}",
        "shared": f"shared prompt only, fresh factors from seed {result['seed']}",
    }[result["mode"]]
    _report_written(result, f"{result['peft_mode']}: {how}", warnings=False, dtype="float32")
    echo(
        f"  num_tasks {result['num_tasks']}, num_ranks {result['num_ranks']}, "
        f"source sha256 {result['source_sha256'][:16]}..."
    )
    if "verify" in result:
        from .rebuild import summary_line

        echo(summary_line(result["verify"]))
    if "push" in result:
        from .hub import push_summary

        for line in push_summary(result["push"]):
            echo(line)


# --- task surgery and comparison (issue #5) -------------------------------------------------


def _add_similarity(report: dict[str, Any], ckpt: Any, plot: str | None, force: bool) -> Any:
    """Add the task similarity matrix (and the plot) to an inspect report; return the matrix."""
    from .compare import plot_similarity, require_matplotlib, similarity_json, task_similarity
    from .errors import ValidationError

    if plot:
        require_matplotlib()  # before the (possibly long) similarity computation
    try:
        matrix = task_similarity(ckpt)
    except ValidationError:
        if plot:
            raise
        report["similarity"] = None
        return None
    report["similarity"] = similarity_json(matrix)
    if plot and not report.get("valid", True):
        # exit 1 means nothing written: an invalid source gets its report, not a picture.
        report.setdefault("notes", []).append(f"{plot} not written: the source has errors")
        return matrix
    if plot:
        title = f"task similarity: {ckpt.location}"
        report["plot"] = plot_similarity(matrix, plot, title=title, force=force, protected=ckpt.source_paths)
    return matrix


def _source_kw(kw: dict[str, Any], *, with_counts: bool = True) -> dict[str, Any]:
    return {
        "overrides": _overrides(kw, with_counts=with_counts),
        "subfolder": kw.pop("subfolder"),
        "hub_options": _hub(kw),
    }


def _report_written(result: dict[str, Any], what: str, *, warnings: bool = True, dtype: str = "") -> None:
    """Warnings (unless already shown) and notes on stderr; then what was written, its files and
    the tensor shapes (each preceded by ``dtype`` when given)."""
    for w in result.get("warnings", []) if warnings else []:
        echo(f"warning: {w}", err=True)
    for note in result.get("notes", []):
        echo(f"note: {note}", err=True)
    echo(f"wrote {result['out']} ({what})")
    for path in result["files"]:
        echo(f"  {path}  ({os.path.getsize(path)} bytes)")
    for name, shape in result.get("shapes", {}).items():
        echo(f"  {name:<18} {dtype + ' ' if dtype else ''}{shape}")


_OUT = click.option("--out", required=True, type=click.Path(), help="Output adapter folder.")
_FORCE = click.option("--force", is_flag=True, help="Overwrite an existing output.")
_JSON = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


@cli.command("tasks")
@click.argument("source")
@click.option("--select", required=True, help="Source tasks for the new tasks 0, 1, ..., e.g. 2,0 (drops task 1).")
@_OUT
@_FORCE
@_JSON
@source_options
def tasks_cmd(source: str, select: str, out: str, force: bool, as_json: bool, **kw: Any) -> None:
    """Select, reorder or drop the tasks of SOURCE into a new adapter in --out.

    New task i is source task SELECT[i]; values are copied bitwise in the source dtype and
    num_tasks in adapter_config.json follows.
    """
    from .surgery import select_tasks

    chosen = _int_list(select) or []
    result = select_tasks(source, chosen, out, force=force, **_source_kw(kw))
    if as_json:
        _echo_json(result)
        return
    _report_written(result, f"tasks {','.join(map(str, chosen))} of {result['source']}")
    if result["dropped"]:
        echo(f"  dropped source tasks {result['dropped']}")


@cli.command()
@click.argument("source")
@click.option("--num-ranks", "num_ranks", required=True, type=int, help="The new rank R.")
@_OUT
@_FORCE
@_JSON
@_plain_source_options
def rerank(source: str, num_ranks: int, out: str, force: bool, as_json: bool, **kw: Any) -> None:
    """Change the rank of SOURCE's task factors, into a new adapter in --out.

    Higher rank: zero padding, every prompt exactly the source's. Lower rank: per task the best
    rank-R approximation of cols[k] @ rows[k] (truncated SVD); the relative error of each task's
    prompt is reported.
    """
    from .surgery import rerank as run

    result = run(source, num_ranks, out, force=force, **_source_kw(kw, with_counts=False))
    if as_json:
        _echo_json(result)
        return
    how = f"rank {result['source_num_ranks']} -> {result['num_ranks']}"
    _report_written(result, how + (", exact" if result["exact"] else ", truncated SVD"))
    echo(f"{'task':>6} {'method':>9} {'rel. prompt error':>18}")
    for t in result["tasks"]:
        echo(f"{t['task']:>6} {t['method']:>9} {_fmt(t['relative_error']):>18}")


@cli.command()
@click.argument("source")
@click.option(
    "--out",
    required=True,
    type=click.Path(),
    help="A file ending in .safetensors, or a folder (adapter_model.safetensors + adapter_config.json).",
)
@click.option("--dtype", type=click.Choice(TRAINING_DTYPES), help="Cast every tensor.")
@_FORCE
@_JSON
@source_options
def convert(source: str, out: str, dtype: str | None, force: bool, as_json: bool, **kw: Any) -> None:
    """Convert SOURCE (.bin/.pt/.pth loaded weights-only, or .safetensors) to safetensors.

    Keys are normalised to the canonical names; the written file is read back and compared
    (bitwise for a plain conversion; the max cast error is reported for --dtype). Values out of
    float16's range are refused.
    """
    from .surgery import convert as run

    result = run(source, out, dtype=dtype, force=force, **_source_kw(kw))
    if as_json:
        _echo_json(result)
        return
    _report_written(result, f"{result['source_format']} -> safetensors" + (f", cast to {dtype}" if dtype else ""))
    for name, before in result["dtypes_before"].items():
        cast = result["casts"].get(name)
        err = f"  max cast error {cast['max_abs_error']:.4g}" if cast else ""
        echo(f"  {name:<18} {before} -> {result['dtypes_after'][name]}{err}")
    echo(f"  verified: read back {result['verified']}")


@cli.command("export-prompt")
@click.argument("source")
@click.option("--task", required=True, type=int, help="The source task to export.")
@_OUT
@click.option(
    "--encoder-only",
    is_flag=True,
    help="Seq2seq with 2 submodules: export only the encoder half (what generate() uses).",
)
@_FORCE
@_JSON
@source_options
def export_prompt(source: str, task: int, out: str, encoder_only: bool, force: bool, as_json: bool, **kw: Any) -> None:
    """Write task --task's prompt P* * (cols[k] @ rows[k]) as a plain PEFT PROMPT_TUNING adapter."""
    from .surgery import export_prompt as run

    result = run(source, task, out, encoder_only=encoder_only, force=force, **_source_kw(kw))
    if as_json:
        _echo_json(result)
        return
    _report_written(result, f"PROMPT_TUNING, task {task}" + (", encoder half" if encoder_only else ""))


@cli.command()
@click.argument("a")
@click.argument("b")
@_JSON
@with_options(hub_option_list())
def diff(a: str, b: str, as_json: bool, **kw: Any) -> None:
    """Compare adapters A and B: keys, shapes, dtypes, config, values, per-task prompts.

    Exit 0 when identical, 1 when they differ (the report still goes to stdout, a one-line
    summary to stderr) or when one cannot be read.
    """
    from .compare import diff as run

    report = run(a, b, hub_options=_hub(kw))
    if as_json:
        _echo_json(report)
    else:
        _print_diff(report)
    if not report["identical"]:
        echo(f"differ: {report['a']} vs {report['b']}: {report['summary']}", err=True)
        sys.exit(1)


def _print_diff(report: dict[str, Any]) -> None:
    echo(f"a: {report['a']}  sha256 {report['sha256']['a'][:16]}...")
    echo(f"b: {report['b']}  sha256 {report['sha256']['b'][:16]}...")
    for side in ("only_a", "only_b"):
        for key in report["keys"][side]:
            echo(f"key only in {side[-1].upper()}: {key}")
    for item in report["renamed"]:
        echo(f"note: {item['key']} is stored as {item['a']!r} in A and {item['b']!r} in B")
    for item in report["shapes"]:
        echo(f"shape {item['key']}: {item['a']} vs {item['b']}")
    for item in report["dtypes"]:
        echo(f"dtype {item['key']}: {item['a']} vs {item['b']}")
    files = report["config_files"]
    if (files["a"] is None) != (files["b"] is None):
        echo(f"config: A {files['a'] or '(none: inferred)'} vs B {files['b'] or '(none: inferred)'}")
    for item in report["config"]:
        echo(f"config {item['field']}: {item['a']!r} vs {item['b']!r}")
    if report["tensors"]:
        echo("tensors:")
        for name, t in report["tensors"].items():
            same = "bitwise equal" if t["bitwise_equal"] else f"max abs diff {t['max_abs_diff']:.4g}"
            extra = f", {t['nonfinite_mismatches']} NaN/Inf mismatches" if t["nonfinite_mismatches"] else ""
            echo(f"  {name:<18} {same}{extra}")
    prompts = report["prompts"]
    if prompts:
        echo(f"{'task':>6} {'max |dP_k|':>12} {'rel. diff':>12}")
        for t in prompts["tasks"]:
            echo(f"{t['task']:>6} {_fmt(t['max_abs_diff']):>12} {_fmt(t['relative_diff']):>12}")
    if report["metadata"]:
        keys = ", ".join(item["key"] for item in report["metadata"][:4])
        more = ", ..." if len(report["metadata"]) > 4 else ""
        echo(f"metadata: {len(report['metadata'])} key(s) differ ({keys}{more}); not counted, see --json")
    echo("identical" if report["identical"] else f"different: {report['summary']}")


# --- verify (issue #4) ----------------------------------------------------------------------


@cli.command("verify")
@click.argument("path")
@click.option("--source", help="Check the target against this source (default: the one init recorded, if present).")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
@click.option(
    "--dtype",
    type=click.Choice(TRAINING_DTYPES),
    default="float32",
    show_default=True,
    help="Dtype of the rebuild (compared against float64).",
)
@click.option("--tasks", "task_list", help="Only these tasks, e.g. 0,3,5.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report (schema mpt-tools/verify/1).")
@source_options
def verify_cmd(
    path: str, source: str | None, device: str, dtype: str, task_list: str | None, as_json: bool, **kw: Any
) -> None:
    """Rebuild every task prompt of PATH on the GPU (or CPU) and check it against float64.

    PATH is a local adapter or a Hub repo (the source flags apply to it; --token, --cache-dir and
    --offline also to a Hub --source). Also checks a target written by `init` against its source.
    Prints the report; exit 1 with one line on stderr naming the failing tasks when anything fails.
    """
    from .rebuild import VerificationFailed, report_lines
    from .rebuild import verify as run

    def show(report: dict[str, Any]) -> None:
        if as_json:
            _echo_json(report)
        else:
            echo_lines("\n".join(report_lines(report)))

    try:
        report = run(path, source=source, device=device, dtype=dtype, tasks=_int_list(task_list), **_source_kw(kw))
    except VerificationFailed as exc:
        show(exc.report)
        raise
    show(report)


# --- the Hub (issue #3) ---------------------------------------------------------------------


@cli.command()
@click.argument("folder", metavar="DIR", type=click.Path())
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private (when it does not exist yet).")
@click.option("--revision", metavar="BRANCH", help="Push to this branch (created from main when missing).")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
@click.option("--commit-message", metavar="M", help="Commit title (default names the mode and version).")
@click.option("--token", metavar="TOKEN", help="Hub write token (else HF_TOKEN or the stored login).")
@click.option("--dry-run", is_flag=True, help="Print what would be uploaded (files, sha256, card); send nothing.")
@_JSON
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

    DIR is validated first. Uploads adapter_model.safetensors, adapter_config.json and a generated
    model card (README.md: base model, tags, how the adapter was made and how to load it); creates
    the repo and branch when missing. Prints the commit URL (or the pull request URL).
    """
    from .hub import push_adapter, push_summary

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
    if as_json:
        _echo_json(result)
        return
    for line in push_summary(result):
        echo(line)


def _push_after_init(out: str, kw: dict[str, Any], token: str | None) -> dict[str, Any]:
    """init --push: push the folder just written; on failure say that it was written."""
    from .errors import HubError
    from .hub import push_adapter

    try:
        return push_adapter(
            out, kw["push_to"], private=kw.get("private", False), create_pr=kw.get("create_pr", False), token=token
        )
    except HubError as exc:
        raise HubError(
            f"{exc.message} (the adapter was written to {out}: push it with `mpt-tools push {out} {kw['push_to']}`)",
            exc.path,
        ) from None


def main() -> None:
    """Entry point of the ``mpt-tools`` console script."""
    cli(prog_name="mpt-tools")


if __name__ == "__main__":
    main()
