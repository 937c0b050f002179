"""Every human view of a result: what mpt-tools prints without ``--json``, in one place.

Each command's view is a function of the result the library returned (its ``--json`` is that
result as it is). Every line goes through :func:`echo`, which escapes control characters that a
hostile file could carry into a name, a config value or metadata.
"""

from __future__ import annotations

import errno
import json
import os
import re
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import click

from ..config import PEFT_TYPE
from ..findings import Finding

if TYPE_CHECKING:  # types only: --help does not import them
    from ..results import (
        AuditResult,
        AuditRow,
        CompatResult,
        ConvertResult,
        DiffResult,
        EmbedResult,
        ErrorResult,
        ExportPromptResult,
        ExportResult,
        FindingItem,
        InitResult,
        InspectResult,
        PackResult,
        PushResult,
        RerankResult,
        TasksResult,
        ValidateResult,
        VerifyResult,
    )

# C0/C1 control characters (newlines, terminal escape sequences, ...) and the Unicode line and
# paragraph separators: tensor names, metadata and config values come from files that may be hostile.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escape(match: re.Match[str]) -> str:
    return ascii(match.group())[1:-1]


class StdoutError(OSError):
    """Standard output cannot be written (a full device, an I/O error): not the input's fault,
    and what was written is still reported (on stderr)."""


_stdout_gone = False


def detach_stdout() -> None:
    """The reader of stdout left (``| head -1``): send the rest of the output nowhere, so the
    command finishes and exits with its own status."""
    global _stdout_gone
    _stdout_gone = True
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # AttributeError: no stdout at all (>&-)
        pass


def _out(text: str, *, err: bool = False) -> None:
    """Write a line to stdout (or stderr): a reader that left is no error; a failing stdout is
    :class:`StdoutError`."""
    if _stdout_gone and not err:
        return
    try:
        click.echo(text, err=err)
    except BrokenPipeError:
        if not err:
            detach_stdout()
    except OSError as exc:
        if err:
            return  # nowhere left to say it
        raise StdoutError(exc.errno, exc.strerror) from None


def write_stdout(data: bytes) -> None:
    """Write bytes (a payload for a pipe) to stdout as they are: a reader that left is no error;
    a failing stdout is :class:`StdoutError`."""
    if _stdout_gone:
        return
    stream = getattr(sys.stdout, "buffer", None)
    if stream is None:  # closed (>&-): the payload has nowhere to go
        raise StdoutError(errno.EBADF, "standard output is closed")
    try:
        stream.write(data)
        stream.flush()
    except BrokenPipeError:
        detach_stdout()
    except OSError as exc:
        raise StdoutError(exc.errno, exc.strerror) from None


def echo(text: str = "", *, err: bool = False) -> None:
    """Print one line (stdout, or stderr with ``err``). Control characters in it, which can only
    come from file contents (a newline in a tensor name, a terminal escape sequence in metadata),
    are shown escaped (``\\n``, ``\\x1b``), so they can neither split the line nor reach the terminal."""
    _out(_CONTROL.sub(_escape, text), err=err)


def echo_lines(text: str) -> None:
    """Print text made of several lines of mpt-tools' own making, each through :func:`echo`."""
    for line in text.split("\n"):
        echo(line)


def one_line(text: str) -> str:
    return " ".join(text.split())


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _g(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _duration(seconds: float) -> str:
    """A duration for people: ``3.2 ms`` below a second, ``12.3 s`` above."""
    return f"{seconds * 1000:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def summary_line(report: VerifyResult) -> str:
    """One line: ok/FAILED, tasks, device, dtype, worst relative error, largest |P_k| against the
    dtype's largest value, target checks."""
    rels = [t["rel_err"] for t in report["tasks"] if t["rel_err"] is not None]
    peaks = [t["max_abs"] for t in report["tasks"] if t["max_abs"] is not None]
    worst = f"{max(rels):.2g}" if rels else "n/a"
    peak = f"{max(peaks):.3g}" if peaks else "n/a"
    state = "ok" if report["ok"] else "FAILED"
    line = (
        f"verify {state}: {len(report['tasks'])} task(s) on {report['device']} in {report['dtype']}, "
        f"worst rel err {worst} (tol {report['tolerance']['rel_frobenius']:g}), "
        f"max |P_k| {peak} (dtype max {report['tolerance']['dtype_max']:.4g})"
    )
    target = report.get("target")
    if target:
        passed = sum(c["ok"] for c in target["checks"])
        line += f"; {target['mode']} target vs source: {passed}/{len(target['checks'])} checks"
    return line


def report_lines(report: VerifyResult) -> list[str]:
    """The report as a readable table (what ``mpt-tools verify`` prints without ``--json``)."""
    tol = report["tolerance"]
    lines = [
        f"verify {report['path']} on {report['device']} in {report['dtype']} "
        f"(stored {report['stored_dtype']}; rel tol {tol['rel_frobenius']:g}, dtype max {tol['dtype_max']:.6g})",
        f"{'task':>6} {'max|err|':>10} {'rel err':>10} {'max|P_k|':>10} {'headroom':>10} {'finite':>7}  status",
    ]
    for t in report["tasks"]:
        status = "ok" if t["ok"] else "FAIL"
        finite = "yes" if t["finite"] and t["inputs_finite"] else "NO"
        lines.append(
            f"{t['task']:>6} {_g(t['max_abs_err']):>10} {_g(t['rel_err']):>10} {_g(t['max_abs']):>10} "
            f"{_g(t['headroom']):>10} {finite:>7}  {status}"
        )
    target = report.get("target")
    if target:
        task = f" task {target['task']}" if target.get("task") is not None else ""
        lines.append(f"target vs source {target['source']} ({target['mode']}{task}):")
        for c in target["checks"]:
            found = f"; found {c['found']}" if c.get("found") else ""
            lines.append(f"  {'ok  ' if c['ok'] else 'FAIL'} {c['check']:<18} {c['detail']}{found}")
        if target.get("similarity"):
            lines.append(f"  {'source task':>11} {'cosine':>9} {'rel dist':>9}  averaged")
            for s in target["similarity"] or []:
                avg = "yes" if s["averaged"] else "no"
                lines.append(f"  {s['task']:>11} {_g(s['cosine']):>9} {_g(s['rel_distance']):>9}  {avg}")
    for note in report["notes"]:
        lines.append(f"note: {note}")
    for f in report["failures"]:
        where = f"task {f['task']}" if f["task"] is not None else "adapter"
        lines.append(f"failure: {where}: {f['check']}: {f['message']}")
    tm = report["timings"]
    lines.append(
        f"timings: read {_duration(tm['read_s'])}, transfer {_duration(tm['transfer_s'])}, "
        f"rebuild {_duration(tm['rebuild_s'])}, total {_duration(tm['total_s'])}"
    )
    lines.append(summary_line(report))
    return lines


def push_summary(result: PushResult) -> list[str]:
    """Human-readable lines for a push result (the CLI prints them)."""
    where = result["repo_id"] + (f"@{result['revision']}" if result.get("revision") else "")
    lines: list[str] = []
    if result["dry_run"]:
        what = "open a pull request on" if result["create_pr"] else "push to"
        lines.append(f"dry run: would {what} {where} in one commit ({result['commit_message']!r}); nothing was sent")
        for f in result["files"]:
            lines.append(f"  {f['path']:<26} {f['bytes']:>10} bytes  sha256 {f['sha256']}")
        lines.append("model card (README.md):")
        lines += ["  " + line if line else "" for line in result["card"].splitlines()]
        return lines + [f"note: {note}" for note in result.get("notes", [])]
    unchanged = set(result.get("unchanged") or [])
    if result.get("no_op"):
        lines.append(f"nothing to push: {where} already holds these exact files (no commit made)")
        lines.append(f"commit: {result['commit_url']}")
        return lines
    changed = len(result["files"]) - len(unchanged)
    same = f" ({len(unchanged)} unchanged)" if unchanged else ""
    lines.append(f"pushed {changed} file(s) to {where} in one commit{same}")
    for f in result["files"]:
        tag = "  (unchanged)" if f["path"] in unchanged else ""
        lines.append(f"  {f['path']:<26} {f['bytes']:>10} bytes  sha256 {f['sha256'][:16]}...{tag}")
    if result.get("pr_url"):
        lines.append(f"pull request: {result['pr_url']}")
    else:
        lines.append(f"commit: {result['commit_url']}")
    return lines + [f"note: {note}" for note in result.get("notes", [])]


def diff_view(report: DiffResult) -> None:
    """Print a diff report."""
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
    for cfg in report["config"]:
        echo(f"config {cfg['field']}: {cfg['a']!r} vs {cfg['b']!r}")
    if report["tensors"]:
        echo("tensors:")
        for name, t in report["tensors"].items():
            same = "bitwise equal" if t["bitwise_equal"] else f"max abs diff {t['max_abs_diff']:.4g}"
            extra = f", {t['nonfinite_mismatches']} NaN/Inf mismatches" if t["nonfinite_mismatches"] else ""
            echo(f"  {name:<18} {same}{extra}")
    prompts = report["prompts"]
    if prompts:
        echo(f"{'task':>6} {'max |dP_k|':>12} {'rel. diff':>12}")
        for row in prompts["tasks"]:
            echo(f"{row['task']:>6} {_fmt(row['max_abs_diff']):>12} {_fmt(row['relative_diff']):>12}")
        if len(prompts["tasks"]) >= _max_task_rows():
            echo(
                f"note: per-task rows stop at {_max_task_rows()} tasks; "
                f"the max |dP_k| over every task is {_fmt(prompts['max_abs_diff'])}"
            )
    if report["metadata"]:
        keys = ", ".join(item["key"] for item in report["metadata"][:4])
        more = ", ..." if len(report["metadata"]) > 4 else ""
        echo(f"metadata: {len(report['metadata'])} key(s) differ ({keys}{more}); not counted, see --json")
    echo("identical" if report["identical"] else f"different: {report['summary']}")


def _max_task_rows() -> int:
    """The most per-task rows a report lists (:data:`mpt_tools.prompts.MAX_TASK_ROWS`)."""
    from ..prompts import MAX_TASK_ROWS

    return MAX_TASK_ROWS


_json_shown = False


def reset() -> None:
    """Start a command's output afresh (nothing shown yet, stdout not detached)."""
    global _json_shown, _stdout_gone
    _json_shown = _stdout_gone = False


def show_json(data: Any) -> None:
    """The result as JSON on stdout (what ``--json`` prints)."""
    global _json_shown
    _json_shown = True
    _out(json.dumps(data, indent=2, sort_keys=False, default=str))


def show_error(command: str, exc: BaseException, *, message: str | None = None) -> None:
    """A failed command's ``--json``: the ``mpt-tools/error/1`` object on stdout (the one line
    still goes to stderr): the command, the error's kind, message (``message``, else the error's
    own: Click's full text for a usage error) and path, and what this process had written before it
    failed (and is still there)."""
    from ..files import written
    from ..version import __version__

    if _json_shown:  # the command printed its report (verify's failing one): stdout holds one document
        return
    if message is None:
        message = exc.format_message() if isinstance(exc, click.ClickException) else getattr(exc, "message", str(exc))
    path = getattr(exc, "path", None)
    report: ErrorResult = {
        "schema": "mpt-tools/error/1",
        "ok": False,
        "command": command,
        "error": {"type": type(exc).__name__, "message": message, "path": path if isinstance(path, str) else None},
        "written": written(),
        "version": __version__,
    }
    show_json(report)


def findings(items: list[FindingItem]) -> None:
    """One indented line per finding."""
    for f in items:
        echo("  " + Finding(**f).line())


def exit_if_invalid(report: ValidateResult | InspectResult) -> None:
    """After a report was printed: one line on stderr and exit 1 when it holds errors."""
    if report.get("valid", True):
        return
    errs = [f for f in report["findings"] if f["level"] == "error"]
    more = f" [and {len(errs) - 1} more]" if len(errs) > 1 else ""
    echo(f"error: {report['source']}: {Finding(**errs[0]).brief()}{more}", err=True)
    sys.exit(1)


def written(result: Mapping[str, Any], what: str, *, warnings: bool = True, dtype: str = "") -> None:
    """Warnings (unless already shown) and notes on stderr; then what was written, its files and
    the tensor shapes (each preceded by ``dtype`` when given)."""
    for w in result.get("warnings", []) if warnings else []:
        echo(f"warning: {w}", err=True)
    for note in result.get("notes", []):
        echo(f"note: {note}", err=True)
    echo(f"wrote {result['out']} ({what})")
    for path in result["files"]:
        try:
            size = f"{os.path.getsize(path)} bytes"
        except OSError:  # removed since (another process, a user): what was written is still said
            size = "no longer there"
        echo(f"  {path}  ({size})")
    for name, shape in result.get("shapes", {}).items():
        echo(f"  {name:<18} {dtype + ' ' if dtype else ''}{shape}")


def similarity_table(matrix: list[list[float | None]], digits: int = 3) -> str:
    """A similarity matrix (as in ``--json``: None where not finite) as a text table with task
    numbers on both axes."""
    n = len(matrix)
    width = max(digits + 4, len(str(n - 1)) + 1)
    head = f"{'task':>6} " + " ".join(f"{k:>{width}}" for k in range(n))
    lines = [head]
    for i in range(n):
        cells = " ".join(f"{'n/a':>{width}}" if v is None else f"{v:>{width}.{digits}f}" for v in matrix[i])
        lines.append(f"{i:>6} {cells}")
    return "\n".join(lines)


def validate_view(report: ValidateResult) -> None:
    """``validate``: the verdict, then every finding."""
    errs = [f for f in report["findings"] if f["level"] == "error"]
    warns = [f for f in report["findings"] if f["level"] == "warning"]
    state = "valid" if report["valid"] else "INVALID"
    plan = ""
    if report["mode"]:
        plan = f" with a planned {report['mode']} target" + (f" ({report['against']})" if report["against"] else "")
    echo(f"{report['source']}{plan}: {state} ({len(errs)} error(s), {len(warns)} warning(s))")
    findings(report["findings"])


_CONFIG_SHOWN = (
    "peft_type",
    "task_type",
    "num_virtual_tokens",
    "num_transformer_submodules",
    "token_dim",
    "num_tasks",
    "num_ranks",
    "prompt_tuning_init",
    "base_model_name_or_path",
)


def inspect_view(report: InspectResult, *, similarity: bool) -> None:
    """``inspect``: files, tensors, config, parameters, findings, per-task norms (and with
    ``similarity`` the similarity table)."""
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
    for key in _CONFIG_SHOWN:
        value = cfg.get(key)
        echo(f"  {key:<27} {'- (not set)' if value is None else value}")
    p = report["parameters"]
    if p:
        echo("parameters: " + ", ".join(f"{k} {v}" for k, v in p.items()))
    if report["findings"]:
        echo("findings:")
        findings(report["findings"])
    else:
        echo("findings: none (valid)")
    if report["tasks"]:
        echo(f"{'task':>6} {'|U_k|':>10} {'|V_k|':>10} {'|P_k|':>10}")
        for n in report["tasks"]:
            echo(f"{n['task']:>6} {_fmt(n['cols_norm']):>10} {_fmt(n['rows_norm']):>10} {_fmt(n['prompt_norm']):>10}")
        listed = f"per-task norms listed for the first {len(report['tasks'])} of "
        for note in report["notes"]:
            if note.startswith(listed):
                echo(f"note: {note}")
    matrix = report.get("similarity")
    if similarity and matrix is not None:
        echo("task similarity (cosine of the effective prompts):")
        echo_lines(similarity_table(matrix))
    if report.get("plot"):
        echo(f"wrote {report['plot']}")


def init_view(result: InitResult) -> None:
    """``init``: what was written and how (the mode's own account), then verify and push."""
    from ..modes import get_mode

    how = get_mode(result["mode"]).describe(result)
    written(result, f"{result['peft_mode']}: {how}", warnings=False, dtype="float32")
    echo(
        f"  num_tasks {result['num_tasks']}, num_ranks {result['num_ranks']}, "
        f"source sha256 {result['source_sha256'][:16]}..."
    )
    if "verify" in result:
        echo(summary_line(result["verify"]))
    if "push" in result:
        for line in push_summary(result["push"]):
            echo(line)


def tasks_view(result: TasksResult) -> None:
    """``tasks``: what was written and which source tasks were dropped."""
    written(result, f"tasks {','.join(map(str, result['select']))} of {result['source']}")
    if result["dropped"]:
        echo(f"  dropped source tasks {result['dropped']}")


def rerank_view(result: RerankResult) -> None:
    """``rerank``: what was written and each task's prompt error."""
    how = f"rank {result['source_num_ranks']} -> {result['num_ranks']}"
    written(result, how + (", exact" if result["exact"] else ", truncated SVD"))
    echo(f"{'task':>6} {'method':>9} {'rel. prompt error':>18}")
    for t in result["tasks"]:
        echo(f"{t['task']:>6} {t['method']:>9} {_fmt(t['relative_error']):>18}")


def convert_view(result: ConvertResult) -> None:
    """``convert``: what was written, each tensor's dtype change and the read-back check."""
    dtype = result["dtype"]
    written(result, f"{result['source_format']} -> safetensors" + (f", cast to {dtype}" if dtype else ""))
    for name, before in result["dtypes_before"].items():
        cast = result["casts"].get(name)
        err = f"  max cast error {cast['max_abs_error']:.4g}" if cast else ""
        echo(f"  {name:<18} {before} -> {result['dtypes_after'][name]}{err}")
    echo(f"  verified: read back {result['verified']}")


def export_view(result: ExportPromptResult) -> None:
    """``export-prompt``: what was written."""
    written(result, f"PROMPT_TUNING, task {result['task']}" + (", encoder half" if result["encoder_only"] else ""))


EXPORT_FORMATS = {
    "peft": "PEFT PROMPT_TUNING folders",
    "tgis": "TGIS prefix store",
    "vllm": "vLLM prompt_embeds tensors",
    "trtllm": "TensorRT-LLM prompt table",
    "npy": "float32 .npy prompts",
}
EXPORT_ROWS_SHOWN = 10


def export_all_view(result: ExportResult) -> None:
    """``export``: what was written (the first tasks, then a count), the manifest, how to serve."""
    for w in result["warnings"]:
        echo(f"warning: {w}", err=True)
    for note in result["notes"]:
        echo(f"note: {note}", err=True)
    dtype = result["dtype"]
    if result["file_dtype"] != dtype:
        dtype = f"{result['file_dtype']} (checked in {dtype})"
    echo(
        f"wrote {result['out']} ({EXPORT_FORMATS.get(result['format'], result['format'])}: "
        f"{result['num_tasks']} task(s), [{result['rows']}, {result['token_dim']}] {dtype} each)"
    )
    for item in result["tasks"][:EXPORT_ROWS_SHOWN]:
        row = f"  (row {item['index']})" if result["format"] == "trtllm" else ""
        echo(f"  task {item['task']:<5} -> {', '.join(item['files'])}{row}")
    if result["num_tasks"] > EXPORT_ROWS_SHOWN:
        echo(f"  ... and {result['num_tasks'] - EXPORT_ROWS_SHOWN} more task(s): see the manifest")
    echo(f"  manifest: {result['manifest']}")
    echo("serve:")
    for line in result["serve"]:
        echo(f"  {line}")


PACK_STOPS = {
    "tol": "converged (--tol)",
    "exact": "exact (float64 round-off)",
    "round-off": "within the dtypes' round-off",
    "max-iters": "--max-iters reached",
}


def pack_view(result: PackResult) -> None:
    """``pack``: what was written, the fit, and each task's relative error against the baseline's."""
    kept = f" ({result['kept_tasks']} kept from {result['append_to']})" if result["kept_tasks"] else ""
    shared = "P* fitted" if result["shared"] == "fitted" else f"P* of {result['shared']}"
    what = f"MPT adapter: {result['num_tasks']} task(s){kept}, rank {result['num_ranks']}, {shared}"
    written(result, what, dtype=result["dtype"])
    echo(
        f"fit: {result['iterations']} iteration(s) on {result['device']} in {_duration(result['fit_seconds'])}, "
        f"{PACK_STOPS.get(result['stopped'], result['stopped'])}; objective {result['objective']:.4g} "
        f"(baseline {result['baseline_objective']:.4g}"
        + (f", {result['start']} start {result['start_objective']:.4g})" if result["start"] != "baseline" else ")")
    )
    echo(f"{'task':>6} {'rel. error':>11} {'baseline':>11}  input")
    for item in result["tasks"][:EXPORT_ROWS_SHOWN]:
        errors = f"{_fmt(item['relative_error']):>11} {_fmt(item['baseline_error']):>11}"
        echo(f"{item['task']:>6} {errors}  {item['input']}")
    if len(result["tasks"]) > EXPORT_ROWS_SHOWN:
        echo(f"  ... and {len(result['tasks']) - EXPORT_ROWS_SHOWN} more task(s): see --json")
    echo(
        f"max relative error {_fmt(result['max_relative_error'])} "
        f"(baseline {_fmt(result['max_baseline_error'])}) over {result['inputs']} packed prompt(s)"
    )


def compat_view(result: CompatResult) -> None:
    """``compat``: what was written, and the config keys left out (with why) and kept."""
    written(result, f"{result['peft_type']} for PEFT {result['peft']}, weights copied byte for byte")
    for change in result["set"]:
        was = "absent" if change["was"] is None else json.dumps(change["was"])
        echo(f"  set {change['key']} = {json.dumps(change['value'])} (was {was}): {change['reason']}")
    for item in result["removed"]:
        echo(f"  removed {item['key']} = {json.dumps(item['value'])}: {item['reason']}")
    if not result["removed"] and not result["set"]:
        echo("  no key removed: PEFT " + result["peft"] + " loads the config as it was")
    echo(f"  kept {len(result['kept'])} keys: {', '.join(result['kept'])}")


def verify_view(report: VerifyResult) -> None:
    """``verify``: the report as a table."""
    echo_lines("\n".join(report_lines(report)))


def push_view(result: PushResult) -> None:
    """``push``: what was (or would be) sent."""
    for line in push_summary(result):
        echo(line)


# --- audit ---------------------------------------------------------------------------------------

AUDIT_COLUMNS = ("where", "type", "N", "T", "r", "d", "dtype", "valid", "findings", "PEFT", "hazard", "dup")
_SHORT_TYPES = {"MULTITASK_PROMPT_TUNING": "MPT", "PROMPT_TUNING": "PT"}


def show_json_line(data: Any) -> None:
    """One compact JSON object on its own line (``audit --json``: JSON Lines)."""
    global _json_shown
    _json_shown = True
    _out(json.dumps(data, separators=(",", ":"), default=str))


def _dup_labels(result: AuditResult) -> dict[str, list[str]]:
    """``where`` -> labels of its duplicate groups: ``w1`` (identical weights), ``p2`` (identical P*)."""
    labels: dict[str, list[str]] = {}
    for i, group in enumerate(result["duplicates"], 1):
        tag = ("w" if group["kind"] == "weights" else "p") + str(i)
        for where in group["adapters"]:
            labels.setdefault(where, []).append(tag)
    return labels


def _audit_cells(row: AuditRow, dups: list[str]) -> list[str]:
    """One row of the audit table, as text cells in :data:`AUDIT_COLUMNS` order."""

    def num(value: int | None) -> str:
        return "-" if value is None else str(value)

    valid = {True: "yes", False: "ERROR" if row["error"] and not row["findings"] else "no", None: "-"}[row["valid"]]
    peft = "-"
    if row["peft_oldest"]:
        peft = row["peft_oldest"] + ("+" if row["peft_newest"] else "")
    return [
        row["where"],
        _SHORT_TYPES.get(row["peft_type"] or "", row["peft_type"] or "?"),
        num(row["num_tasks"]),
        num(row["total_virtual_tokens"]),
        num(row["num_ranks"]),
        num(row["token_dim"]),
        row["dtype"] or "-",
        valid,
        ",".join(row["findings"]) or "-",
        peft,
        "P*" if row["serving_hazard"] else "-",
        ",".join(dups) or "-",
    ]


def _audit_summary_line(result: AuditResult) -> str:
    others = ", ".join(f"{k} {v}" for k, v in result["other_types"].items())
    text = f"{result['adapters']} adapter(s): {result['mpt']} MPT" + (f", other types: {others}" if others else "")
    text += f"; {result['invalid']} invalid, {result['unreadable']} unreadable"
    if result["duplicates"]:
        text += f"; {len(result['duplicates'])} duplicate group(s)"
    if result["interrupted"]:
        text += f"; interrupted by {result['interrupted']} (the rows above are what was audited)"
    return text


def _audit_after_table(result: AuditResult) -> list[str]:
    """What follows the audit table in text and Markdown: the errors, the duplicate groups (the
    ``dup`` column's labels), stale staging, what was skipped or left unchecked, and the legend of
    the ``hazard`` column."""
    lines = [f"error: {row['where']}: {one_line(row['error'])}" for row in result["rows"] if row["error"]]
    for i, group in enumerate(result["duplicates"], 1):
        what = "identical weights" if group["kind"] == "weights" else "identical P* (shared prompt)"
        lines.append(f"{'w' if group['kind'] == 'weights' else 'p'}{i}: {what}: {', '.join(group['adapters'])}")
    for path in result["stale_staging"]:
        lines.append(f"note: staging left by an interrupted mpt-tools run (the next writer removes it): {path}")
    for reason, count in result["skipped"].items():
        lines.append(f"note: {count} {reason}")
    for row in result["rows"]:  # an MPT row left unchecked (.bin weights without --deep): say why
        if row["valid"] is None and not row["error"] and row["peft_type"] == PEFT_TYPE:
            lines.extend(f"note: {row['where']}: {note}" for note in row["notes"])
    if any(r["serving_hazard"] for r in result["rows"]):
        lines.append(
            "note: hazard P*: a prompt-tuning server (TGIS, vLLM 0.5-0.9, TensorRT-LLM's LLM API) given this MPT"
            " folder serves P* for every task: serve `mpt-tools export` outputs; `serving-hazard` in findings:"
            " it is laid out where one reads it"
        )
    return lines


def audit_view(result: AuditResult) -> None:
    """``audit``: an aligned table, the errors, duplicate groups, stale staging and a summary."""
    dups = _dup_labels(result)
    table = [list(AUDIT_COLUMNS)] + [_audit_cells(r, dups.get(r["where"], [])) for r in result["rows"]]
    widths = [max(len(_CONTROL.sub(_escape, row[i])) for row in table) for i in range(len(AUDIT_COLUMNS))]
    for cells in table:
        echo("  ".join(_CONTROL.sub(_escape, c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())
    for line in _audit_after_table(result):
        echo(line)
    echo(_audit_summary_line(result))


def audit_csv(result: AuditResult) -> None:
    """``audit --csv``: every row field (lists joined by ``;``), one line per adapter."""
    import csv
    import io

    from ..results import AuditRow

    fields = [k for k in AuditRow.__annotations__ if k != "schema"] + ["duplicates"]
    dups = _dup_labels(result)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(fields)
    for row in result["rows"]:
        values: list[Any] = []
        for key in fields:
            value = dups.get(row["where"], []) if key == "duplicates" else row[key]  # type: ignore[literal-required]
            if isinstance(value, list):
                value = ";".join(value)
            elif isinstance(value, bool):
                value = "true" if value else "false"
            values.append("" if value is None else value)
        writer.writerow(values)
    for line in buffer.getvalue().rstrip("\n").split("\n"):
        echo(line)


def code_span(text: str) -> str:
    """``text`` as a Markdown code span that holds it whole: fenced by one more backtick than its
    longest run of them (a name with a backtick broke the span), padded where it starts or ends
    with one."""
    longest = max((len(run) for run in re.findall("`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def audit_markdown(result: AuditResult) -> None:
    """``audit --markdown``: a GitHub table, for a model card or an issue, what the text view says
    under its table (as a list), and the summary."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    dups = _dup_labels(result)
    echo("| " + " | ".join(AUDIT_COLUMNS) + " |")
    echo("|" + "---|" * len(AUDIT_COLUMNS))
    for row in result["rows"]:
        cells = _audit_cells(row, dups.get(row["where"], []))
        cells[0] = code_span(cells[0])
        echo("| " + " | ".join(cell(c) for c in cells) + " |")
    echo("")
    after = _audit_after_table(result)  # a list under the table: the dup labels, the legend...
    for line in after:
        echo(f"- {line}")
    if after:
        echo("")
    echo(_audit_summary_line(result))


def embed_view(result: EmbedResult, *, err: bool = False) -> None:
    """``embed``: what was written (to stderr with ``err``: the payload went to stdout), and how
    to send it."""
    target = result["out"] or (
        "standard output (its reader left before the end)" if _stdout_gone else "standard output"
    )
    echo(
        f"wrote {target} ({result['format']}): [{result['rows']}, "
        f"{result['token_dim']}] {result['dtype']} = task {result['task']}'s prompt ({result['prompt_rows']} rows) "
        f"+ {len(result['token_ids'])} token(s)",
        err=err,
    )
    echo(
        f"  embeddings: {result['embedding']}, {result['bytes_read']:,} of {result['matrix_bytes']:,} bytes read",
        err=err,
    )
    hints = {
        "pt": "vLLM offline: llm.generate({'prompt_embeds': torch.load(FILE)}) (serve with --enable-prompt-embeds)",
        "vllm": 'vLLM server (--enable-prompt-embeds): POST /v1/completions with "prompt_embeds": the file\'s text',
        "sglang": "SGLang: POST /generate with the file's JSON (input_embeds) plus sampling_params",
    }
    echo(f"  {hints[result['format']]}", err=err)
