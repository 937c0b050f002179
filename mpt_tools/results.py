"""What the library returns: one typed schema per command (``mpt-tools/<command>/1``), and the
helpers that keep values JSON-ready.

Every command's ``--json`` output is the library's result as it is: a plain dict whose keys are
those of one :class:`~typing.TypedDict` below (:data:`SCHEMAS` maps each command to its type).
The keys are listed in the order the output has them; nested items that have fixed keys (findings,
files, tensors, tasks, checks, ...) have their own type. ``tests/test_schemas.py`` checks every
command's real output against these types, and ``docs/make_cli_reference.py`` lists them in the
README. Types only: modules on the start-up path import them under TYPE_CHECKING.
"""

from __future__ import annotations

from typing import Any, TypedDict

# --- shared items ------------------------------------------------------------------------------


class FindingItem(TypedDict):
    """One finding (:meth:`mpt_tools.findings.Finding.to_dict`)."""

    level: str  # "error", "warning" or "info"
    code: str
    field: str
    message: str
    expected: Any
    found: Any
    fix: str


class WrittenResult(TypedDict):
    """The keys every command that writes an adapter starts its result with."""

    schema: str
    source: str
    source_sha256: str
    out: str
    files: list[str]  # the paths written


# --- validate ----------------------------------------------------------------------------------


class ValidateResult(TypedDict):
    """``mpt-tools/validate/1``."""

    schema: str
    source: str
    weights: str
    valid: bool
    mode: str | None
    against: str | None
    findings: list[FindingItem]


# --- inspect -----------------------------------------------------------------------------------


class FileEntry(TypedDict):
    """A file of a source: its role (weights or config), path, size and sha256."""

    role: str
    path: str
    bytes: int
    sha256: str


class TensorEntry(TypedDict):
    """A tensor of a source file: canonical key (None when ignored), stored name, dtype, shape."""

    key: str | None
    stored_as: str
    dtype: str
    shape: list[int]
    parameters: int


class DerivedSizes(TypedDict):
    num_transformer_submodules: int | None
    total_virtual_tokens: int | None


class ParameterCounts(TypedDict, total=False):
    """Parameter counts; only those the tensor shapes allow (none for a malformed source)."""

    shared: int
    per_task: int
    num_tasks: int
    total: int


class TaskNorms(TypedDict):
    """Frobenius norms of one task's factors and effective prompt (None when not finite)."""

    task: int
    cols_norm: float | None
    rows_norm: float | None
    prompt_norm: float | None


class HubInfo(TypedDict):
    """Where a Hub source came from (:func:`mpt_tools.hub.download.download_source`)."""

    repo_id: str
    revision: str | None
    commit: str | None
    subfolder: str | None
    url: str
    file: str
    sha256: str
    endpoint: str


class _InspectKeys(TypedDict):
    schema: str
    source: str
    format: str  # "safetensors" or "pickle"
    files: list[FileEntry]
    metadata: dict[str, str]
    tensors: list[TensorEntry]
    config: dict[str, Any]
    config_source: str
    assumed: dict[str, str]
    derived: DerivedSizes
    parameters: ParameterCounts
    valid: bool
    findings: list[FindingItem]
    tasks: list[TaskNorms] | None
    notes: list[str]
    hub: HubInfo | None


class InspectResult(_InspectKeys, total=False):
    """``mpt-tools/inspect/1``; ``similarity`` only with --similarity/--plot, ``plot`` only when
    the PNG was written."""

    similarity: list[list[float | None]] | None
    plot: str


# --- verify ------------------------------------------------------------------------------------


class Tolerance(TypedDict):
    rel_frobenius: float
    atol_per_element: float
    dtype_max: float


class LayoutSizes(TypedDict):
    num_tasks: int
    total_virtual_tokens: int
    num_ranks: int
    token_dim: int


class TaskCheck(TypedDict):
    """One task's rebuild against float64 (None where not finite)."""

    task: int
    max_abs_err: float | None
    rel_err: float | None
    max_abs: float | None
    headroom: float | None
    finite: bool
    inputs_finite: bool
    ok: bool


class TargetCheck(TypedDict):
    check: str
    ok: bool
    detail: str  # what the mode promises
    found: str | None  # on a failed bitwise check: how many values differ, and the largest difference


class SimilarityRow(TypedDict):
    """An average target's prompt against one source task's prompt."""

    task: int
    cosine: float | None
    rel_distance: float | None
    averaged: bool


class TargetReport(TypedDict):
    """A target written by init checked against its source's promise."""

    source: str
    source_sha256: str
    mode: str
    task: int | None
    checks: list[TargetCheck]
    similarity: list[SimilarityRow] | None


class Failure(TypedDict):
    task: int | None
    check: str  # non-finite-input, non-finite-prompt, overflow, tolerance or target-mismatch
    message: str


class Timings(TypedDict):
    read_s: float
    transfer_s: float
    rebuild_s: float
    total_s: float


class VerifyResult(TypedDict):
    """``mpt-tools/verify/1``."""

    schema: str
    path: str
    weights: str
    device: str
    dtype: str
    stored_dtype: str | None
    tolerance: Tolerance
    shape: LayoutSizes
    chunk_bytes: int
    tasks: list[TaskCheck]
    target: TargetReport | None
    ok: bool
    failures: list[Failure]
    notes: list[str]
    timings: Timings


# --- push --------------------------------------------------------------------------------------


class PushedFile(TypedDict):
    path: str
    bytes: int
    sha256: str


class PushResult(TypedDict):
    """``mpt-tools/push/1``; commit, commit_url, pr_url and url are None for a dry run; ``notes``
    says what a user may not expect (a README.md of the folder that the card replaces)."""

    schema: str
    folder: str
    repo_id: str
    revision: str | None
    create_pr: bool
    private: bool
    commit_message: str
    files: list[PushedFile]
    card: str
    dry_run: bool
    unchanged: list[str]
    no_op: bool
    commit: str | None
    commit_url: str | None
    pr_url: str | None
    url: str | None
    notes: list[str]


# --- init --------------------------------------------------------------------------------------


class _InitKeys(WrittenResult):
    mode: str
    peft_mode: str
    task: int | None
    seed: int | None
    num_tasks: int
    num_ranks: int
    shapes: dict[str, list[int]]
    metadata: dict[str, str]
    notes: list[str]
    warnings: list[str]
    version: str


class InitResult(_InitKeys, total=False):
    """``mpt-tools/init/1``; ``verify`` only with --verify, ``push`` only with --push."""

    verify: VerifyResult
    push: PushResult


# --- tasks, rerank, convert, export-prompt -----------------------------------------------------


class TasksResult(WrittenResult):
    """``mpt-tools/tasks/1``."""

    select: list[int]
    dropped: list[int]
    num_tasks: int
    num_ranks: int
    dtype: str
    warnings: list[str]
    notes: list[str]
    shapes: dict[str, list[int]]
    metadata: dict[str, str]
    version: str


class RerankTask(TypedDict):
    """How one task was reranked (pad, copy, truncate or svd) and its prompt's relative error."""

    task: int
    method: str
    relative_error: float | None
    singular_values: list[float] | None


class RerankResult(WrittenResult):
    """``mpt-tools/rerank/1``."""

    source_num_ranks: int
    num_ranks: int
    num_tasks: int
    exact: bool
    max_relative_error: float | None
    tasks: list[RerankTask]
    warnings: list[str]
    shapes: dict[str, list[int]]
    metadata: dict[str, str]
    notes: list[str]
    version: str


class CastReport(TypedDict):
    max_abs_error: float
    max_relative_error: float
    flushed_to_zero: int


class ConvertResult(WrittenResult):
    """``mpt-tools/convert/1``."""

    source_format: str
    dtype: str | None
    dtypes_before: dict[str, str]
    dtypes_after: dict[str, str]
    keys: dict[str, str]
    dropped: list[str]
    verified: str
    exact: bool
    max_cast_error: float
    casts: dict[str, CastReport]
    config_written: bool
    metadata: dict[str, str]
    warnings: list[str]
    notes: list[str]
    version: str


class ExportPromptResult(WrittenResult):
    """``mpt-tools/export-prompt/1``."""

    task: int
    encoder_only: bool
    peft_type: str
    num_virtual_tokens: int
    num_transformer_submodules: int
    prompt_norm: float
    warnings: list[str]
    shapes: dict[str, list[int]]
    metadata: dict[str, str]
    notes: list[str]
    version: str


# --- export ------------------------------------------------------------------------------------


class ExportedTask(TypedDict):
    """One exported task: its source index, name, position in the output (the TensorRT-LLM
    table's row) and files (relative to ``out``)."""

    task: int
    name: str
    index: int
    files: list[str]


class ExportResult(WrittenResult):
    """``mpt-tools/export/1``: ``rows`` and ``token_dim`` are each prompt's [T, d] as written;
    ``dtype`` the dtype checked (and stored, for peft, tgis and vllm), ``file_dtype`` the files'."""

    format: str
    manifest: str
    tasks: list[ExportedTask]
    num_tasks: int
    rows: int
    token_dim: int
    dtype: str
    file_dtype: str
    encoder_only: bool
    serve: list[str]
    warnings: list[str]
    notes: list[str]
    version: str


# --- pack --------------------------------------------------------------------------------------


class PackedTask(TypedDict):
    """One packed prompt: its task in the written adapter, the input it came from (a path, or
    ``SOURCE#task<k>``), its kind (peft, tgis, tensor, mpt), the files read, and the relative
    errors ``||P_k - P_hat_k|| / ||P_k||`` of the written adapter and of the baseline."""

    task: int
    input: str
    kind: str
    files: list[str]
    relative_error: float | None
    baseline_error: float | None


class PackResult(TypedDict):
    """``mpt-tools/pack/1``: ``objective`` is sum_k ||P_k - P* * (U_k V_k)||^2 of the fit
    (float64), ``history`` its value after each iteration (``history[0]``: the start's);
    ``start`` is the start of lowest objective: baseline (the mean prompt), recovered (the
    algebraic start), signs (its signs with the prompts' rms as magnitudes) or mean-signs (the
    mean prompt's signs so); ``recover_seconds`` the time that recovery took (0 with ``--start baseline`` or a
    fixed P*); ``stopped`` is tol, exact, round-off (every task within a quarter of the
    unit round-off of its input's dtype and of the written one) or max-iters; ``extrapolated``
    and ``accelerated`` count the iterations that took the line search's step and Anderson's;
    ``kept_tasks`` the tasks of ``append_to`` kept first."""

    schema: str
    out: str
    files: list[str]
    inputs: int
    num_tasks: int
    kept_tasks: int
    num_ranks: int
    num_virtual_tokens: int
    num_transformer_submodules: int
    token_dim: int
    task_type: str
    dtype: str
    shared: str
    append_to: str | None
    device: str
    seed: int
    iterations: int
    extrapolated: int
    accelerated: int
    stopped: str
    objective: float
    baseline_objective: float
    start: str
    start_objective: float
    history: list[float]
    max_relative_error: float | None
    max_baseline_error: float | None
    tasks: list[PackedTask]
    fit_seconds: float
    recover_seconds: float
    total_seconds: float
    warnings: list[str]
    notes: list[str]
    shapes: dict[str, list[int]]
    metadata: dict[str, str]
    version: str


# --- compat ------------------------------------------------------------------------------------


class RemovedKey(TypedDict):
    """A config key compat (or a writer) left out: the value it held and why."""

    key: str
    value: Any
    reason: str


class SetKey(TypedDict):
    """A config value compat set so that PEFT loads the folder: the value, the one it replaced
    (None: absent) and why."""

    key: str
    value: Any
    was: Any
    reason: str


class CompatResult(WrittenResult):
    """``mpt-tools/compat/1``: ``set``, ``removed`` and ``kept`` are adapter_config.json keys; the
    weights are a byte-for-byte copy (``weights_sha256`` = ``source_sha256``)."""

    peft: str  # the PEFT release the config was written for
    peft_type: str
    changed: bool
    set: list[SetKey]
    removed: list[RemovedKey]
    kept: list[str]
    weights_sha256: str
    warnings: list[str]
    notes: list[str]
    version: str


# --- diff --------------------------------------------------------------------------------------


class KeySets(TypedDict):
    only_a: list[str]
    only_b: list[str]


class KeyDiff(TypedDict):
    """One key whose value (stored name, shape, dtype or metadata value) differs: in A, in B."""

    key: str
    a: Any
    b: Any


class ConfigFieldDiff(TypedDict):
    field: str
    a: Any
    b: Any


class ConfigFiles(TypedDict):
    a: str | None
    b: str | None


class Sha256s(TypedDict):
    a: str
    b: str


class TensorDiff(TypedDict):
    max_abs_diff: float
    bitwise_equal: bool
    nonfinite_mismatches: int


class PromptTaskDiff(TypedDict):
    task: int
    max_abs_diff: float | None
    relative_diff: float | None


class PromptDiff(TypedDict):
    max_abs_diff: float | None
    tasks: list[PromptTaskDiff]


class DiffResult(TypedDict):
    """``mpt-tools/diff/1``."""

    schema: str
    a: str
    b: str
    identical: bool
    differences: int
    summary: str
    keys: KeySets
    renamed: list[KeyDiff]
    shapes: list[KeyDiff]
    dtypes: list[KeyDiff]
    config_files: ConfigFiles
    config: list[ConfigFieldDiff]
    tensors: dict[str, TensorDiff]
    prompts: PromptDiff | None
    metadata: list[KeyDiff]
    sha256: Sha256s


# --- embed -------------------------------------------------------------------------------------


class EmbedResult(TypedDict):
    """``mpt-tools/embed/1``: ``rows`` = ``prompt_rows`` + len(``token_ids``); ``embedding`` is
    ``file:tensor``; ``bytes_read`` of the matrix's ``matrix_bytes`` (only the rows the ids need); ``out`` is None
    for :func:`~mpt_tools.embed.embed_payload` (and ``--out -``: the payload went to stdout)."""

    schema: str
    source: str
    task: int
    base_model: str
    base_model_commit: str | None
    embedding: str
    token_ids: list[int]
    rows: int
    prompt_rows: int
    token_dim: int
    dtype: str
    bytes_read: int
    matrix_bytes: int
    format: str
    out: str | None
    version: str


# --- audit -------------------------------------------------------------------------------------


class AuditRow(TypedDict):
    """``mpt-tools/audit-row/1``: one adapter (``--json`` prints one per line as each is done).

    ``where`` is a path, or ``hf://repo@commit/subfolder``. Sizes: N, T (rows of P*, all
    submodules), r, d. ``sha256`` is the weights file's (the Hub's LFS sha256; locally with
    --deep), ``prompt_sha256`` that of P*'s bytes (--deep). ``valid``: None when not checked
    (another PEFT type, or .bin weights without --deep). ``peft_oldest``/``peft_newest``: the
    PEFT releases (of mpt-tools' table) that load the config. ``serving_hazard``: an MPT folder
    that prompt-tuning consumers (TGIS, vLLM 0.5-0.9, TensorRT-LLM) would serve as P* for every task."""

    schema: str
    where: str
    origin: str  # "local" or "hub"
    peft_type: str | None
    task_type: str | None
    num_tasks: int | None
    total_virtual_tokens: int | None
    num_ranks: int | None
    token_dim: int | None
    dtype: str | None
    bytes: int | None
    sha256: str | None
    prompt_sha256: str | None
    valid: bool | None
    findings: list[str]  # finding codes
    error: str | None
    peft_oldest: str | None
    peft_newest: str | None
    reload_trap: bool
    serving_hazard: bool
    base_model: str | None
    notes: list[str]


class DuplicateGroup(TypedDict):
    """Adapters with identical weights (``kind`` "weights") or an identical P* ("shared_prompt")."""

    kind: str
    sha256: str
    adapters: list[str]


class AuditSummary(TypedDict):
    """``mpt-tools/audit/1``: the last line of ``audit --json``, after the rows."""

    schema: str
    ok: bool
    adapters: int
    mpt: int
    other_types: dict[str, int]
    invalid: int
    unreadable: int
    duplicates: list[DuplicateGroup]
    stale_staging: list[str]
    skipped: dict[str, int]
    deep: bool
    interrupted: str | None
    version: str


class AuditResult(AuditSummary):
    """What :func:`mpt_tools.audit.audit_adapters` returns: the summary and its ``rows``, sorted by where."""

    rows: list[AuditRow]


class ErrorDetail(TypedDict):
    """What failed: the exception's class name, its message and the file or location it is about."""

    type: str
    message: str
    path: str | None


class ErrorResult(TypedDict):
    """``mpt-tools/error/1``: what any command prints with ``--json`` when it fails (exit 1)."""

    schema: str
    ok: bool
    command: str
    error: ErrorDetail
    written: list[str]
    version: str


# --- the table ---------------------------------------------------------------------------------

SCHEMAS: dict[str, type] = {
    "validate": ValidateResult,
    "inspect": InspectResult,
    "init": InitResult,
    "tasks": TasksResult,
    "rerank": RerankResult,
    "convert": ConvertResult,
    "export-prompt": ExportPromptResult,
    "export": ExportResult,
    "pack": PackResult,
    "compat": CompatResult,
    "audit": AuditSummary,
    "embed": EmbedResult,
    "diff": DiffResult,
    "verify": VerifyResult,
    "push": PushResult,
}
"""Each command's result type; its ``--json`` has ``"schema": "mpt-tools/<command>/1"``."""


def schema_id(command: str) -> str:
    """The schema name of a command's ``--json`` output."""
    return f"mpt-tools/{command}/1"
