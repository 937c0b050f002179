"""The ``mpt-tools`` command line: parse options, call the library, print results.

Errors from the library (MptToolsError) become one line on stderr and exit 1; usage errors
exit 2 (Click's own); no traceback reaches the user unless MPT_TOOLS_DEBUG=1.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from . import __version__
from .errors import MptToolsError

F = Callable[..., Any]


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
            click.echo(f"error: {_one_line(str(exc))}", err=True)
            ctx.exit(1)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            ctx.exit(130)
        except Exception as exc:  # a bug: still no traceback for users
            if _debug() or os.environ.get("MPT_TOOLS_RAISE_UNEXPECTED"):
                raise
            click.echo(
                f"error: internal error ({type(exc).__name__}: {_one_line(str(exc))}); "
                "set MPT_TOOLS_DEBUG=1 for a traceback and please report it",
                err=True,
            )
            ctx.exit(1)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


def source_options(func: F) -> F:
    """Options shared by every command that reads a SOURCE: subfolder, config fields, Hub."""
    options: list[Callable[[F], F]] = [
        click.option("--subfolder", help="Named adapter saved under a subfolder of the directory or repo."),
        click.option("--num-tasks", "src_num_tasks", type=int, help="Override the source's num_tasks."),
        click.option("--num-ranks", "src_num_ranks", type=int, help="Override the source's num_ranks."),
        click.option("--num-virtual-tokens", type=int, help="Give or override num_virtual_tokens."),
        click.option("--token-dim", type=int, help="Give or override token_dim."),
        click.option("--num-transformer-submodules", type=int, help="Give or override nts (1 or 2)."),
        click.option("--task-type", help="Give or override task_type (e.g. CAUSAL_LM, SEQ_2_SEQ_LM)."),
        *hub_option_list(),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def hub_option_list() -> list[Callable[[F], F]]:
    """Options for Hub sources."""
    return [
        click.option("--revision", help="Hub source: branch, tag or commit."),
        click.option("--token", help="Hub token (else HF_TOKEN or the stored login).", metavar="TOKEN"),
        click.option("--cache-dir", type=click.Path(file_okay=False), help="Hub cache folder."),
        click.option("--offline", is_flag=True, help="Hub source: use the local cache only."),
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
        click.echo("  " + Finding(**f).line())


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
    )
    if as_json:
        _echo_json(report)
    else:
        errs = [f for f in report["findings"] if f["level"] == "error"]
        warns = [f for f in report["findings"] if f["level"] == "warning"]
        state = "valid" if report["valid"] else "INVALID"
        click.echo(f"{report['source']}: {state} ({len(errs)} error(s), {len(warns)} warning(s))")
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
    click.echo(f"error: {report['source']}: {first['field']}: {first['message']}{detail}{more}", err=True)
    sys.exit(1)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


@cli.command()
@click.argument("source")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (schema in the README).")
@click.option("--no-norms", is_flag=True, help="Skip the per-task norms (reads only the header).")
@source_options
def inspect(source: str, as_json: bool, no_norms: bool, **kw: Any) -> None:
    """Describe SOURCE: files, sha256, tensors, config, parameters, findings, per-task norms."""
    from .pipeline import inspect_source

    report = inspect_source(
        source, overrides=_overrides(kw), subfolder=kw.pop("subfolder"), hub_options=_hub(kw), norms=not no_norms
    )
    if as_json:
        _echo_json(report)
        _exit_if_invalid(report)
        return
    click.echo(f"source: {report['source']} ({report['format']})")
    for f in report["files"]:
        click.echo(f"  {f['role']:<7} {f['path']}  {f['bytes']} bytes  sha256 {f['sha256']}")
    click.echo("tensors:")
    for t in report["tensors"]:
        label = t["key"] or "(ignored)"
        stored = f"  (stored as {t['stored_as']})" if t["stored_as"] != t["key"] else ""
        click.echo(f"  {label:<18} {t['dtype']:<9} {t['shape']!s:<16} {t['parameters']:>10} params{stored}")
    cfg = report["config"]
    click.echo(f"config: {report['config_source']}")
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
        click.echo(f"  {key:<27} {cfg.get(key)}")
    p = report["parameters"]
    if p:
        click.echo("parameters: " + ", ".join(f"{k} {v}" for k, v in p.items()))
    if report["findings"]:
        click.echo("findings:")
        _print_findings(report["findings"])
    else:
        click.echo("findings: none (valid)")
    if report["tasks"]:
        click.echo(f"{'task':>6} {'|U_k|':>10} {'|V_k|':>10} {'|P_k|':>10}")
        for t in report["tasks"]:
            click.echo(
                f"{t['task']:>6} {_fmt(t['cols_norm']):>10} {_fmt(t['rows_norm']):>10} {_fmt(t['prompt_norm']):>10}"
            )
    _exit_if_invalid(report)


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
@click.option("--subfolder", help="Named adapter saved under a subfolder of the directory or repo.")
@click.option("--num-virtual-tokens", type=int, help="Give or override num_virtual_tokens.")
@click.option("--token-dim", type=int, help="Give or override token_dim.")
@click.option("--num-transformer-submodules", type=int, help="Give or override nts (1 or 2).")
@click.option("--task-type", help="Give or override task_type.")
@functools.reduce(lambda f, o: o(f), reversed(hub_option_list()), lambda f: f)
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
    **kw: Any,
) -> None:
    """Write a ready-to-train target adapter initialised from SOURCE into --out.

    average and exact are bitwise what PEFT's own init computes; shared copies the shared prompt
    and draws fresh N(0, 0.02) factors from --seed. The adapter_config.json says
    prompt_tuning_init RANDOM with a null path, so PEFT loads the folder anywhere.
    """
    from .pipeline import init_adapter

    result = init_adapter(
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
        hub_options=_hub(kw),
    )
    for w in result["warnings"]:
        click.echo(f"warning: {w}", err=True)
    if as_json:
        _echo_json(result)
        return
    for note in result["notes"]:
        click.echo(f"note: {note}", err=True)
    how = {
        "average": "mean of the source task factors",
        "exact": f"source task {result['task']}",
        "shared": f"shared prompt only, fresh factors from seed {result['seed']}",
    }[result["mode"]]
    click.echo(f"wrote {result['out']} ({result['peft_mode']}: {how})")
    for path in result["files"]:
        click.echo(f"  {path}  ({os.path.getsize(path)} bytes)")
    for name, shape in result["shapes"].items():
        click.echo(f"  {name:<18} float32 {shape}")
    click.echo(
        f"  num_tasks {result['num_tasks']}, num_ranks {result['num_ranks']}, "
        f"source sha256 {result['source_sha256'][:16]}..."
    )


def main() -> None:
    """Entry point of the ``mpt-tools`` console script."""
    cli(prog_name="mpt-tools")


if __name__ == "__main__":
    main()
