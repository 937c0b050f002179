"""The target modes of ``init``: one table, one entry per mode.

A :class:`Mode` says everything about one way of starting a target from a source: its names (ours,
PEFT's ``prompt_tuning_init`` value, aliases), whether it copies the source's task factors (which
fixes the target's rank and lets ``--target-tasks K`` repeat them), the rules a plan must pass,
how its factors are built, what ``verify`` holds a target of that mode to, and how it is described
in output. ``init``, ``validate``, ``verify`` and the command line look modes up here
(:func:`get_mode`) and never branch on a mode's name; :func:`register` adds one.

The three built-in modes are PEFT's ``MultitaskPromptTuningInit`` values:

- ``average`` (AVERAGE_SOURCE_TASKS): the mean of the source task factors, bitwise PEFT's
  (``torch.mean(0, keepdim=True)`` in the source dtype), optionally over ``tasks`` with ``weights``;
- ``exact`` (EXACT_SOURCE_TASK): source task k's factors, bitwise;
- ``shared`` (ONLY_SOURCE_SHARED): P* only, fresh N(0, 0.02) factors from a recorded seed.

numpy and the factor math are imported inside the functions, so ``--help`` stays light.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from .errors import ConfigError, flag
from .findings import Finding
from .options import readable_fields

if TYPE_CHECKING:
    import numpy as np

    from .checkpoint import Checkpoint
    from .results import InitResult

MAX_TARGET_TASKS = 1_000_000


@readable_fields
class TargetPlan(NamedTuple):
    """The target ``init`` is asked for: the mode (any of its names), the source ``task`` (exact),
    the ``seed`` (shared), the target's ``num_tasks`` and ``num_ranks`` (None: 1 task, the source's
    rank), the source ``tasks`` and ``weights`` to average, and whether a negative ``task`` may
    count from the end as PEFT does. ``engine`` (auto, numpy or torch) and ``torch_threads`` (the
    torch thread count to reproduce; None: torch's default) choose how an average is computed
    (:func:`mpt_tools.factors.average_factors`)."""

    mode: str = "average"
    task: int | None = None
    seed: int | None = None
    num_tasks: int | None = None
    num_ranks: int | None = None
    tasks: list[int] | None = None
    weights: list[float] | None = None
    allow_negative_task: bool = False
    engine: str = "auto"
    torch_threads: int | None = None


class Expectation(NamedTuple):
    """What a target of a mode must hold, as ``verify`` checks it against the source.

    ``failures`` are (check, detail) pairs found before any tensor comparison (a recorded task that
    the source does not have). ``cols``/``rows`` are the expected factors: of one task, which every
    target task must equal (``per_task``), or of the whole target (checked as one ``factors``
    check); None when nothing can be expected. ``what`` describes them. ``prompt_equal`` asks for
    the rebuilt prompt to be bitwise the source task ``task``'s; ``similarity_over`` asks for the
    cosine similarity of the target prompt to every source task's, marking these tasks.
    """

    what: str = ""
    cols: np.ndarray | None = None
    rows: np.ndarray | None = None
    per_task: bool = True
    task: int | None = None
    failures: tuple[tuple[str, str], ...] = ()
    prompt_equal: bool = False
    similarity_over: set[int] | None = None


class RecordError(Exception):
    """A recorded ``mpt_tools.*`` value that cannot be what init wrote (hostile or hand-edited)."""

    def __init__(self, key: str, detail: str) -> None:
        super().__init__(detail)
        self.key, self.detail = key, detail


Layout = tuple[int, int, int, int]  # (N, T, r, d)
BuildFn = Callable[["Checkpoint", TargetPlan, int, int], "tuple[np.ndarray, np.ndarray, dict[str, Any]]"]
PlanFn = Callable[["Checkpoint", TargetPlan, list[str]], list[Finding]]
RecordFn = Callable[[dict[str, str]], dict[str, Any]]
ExpectFn = Callable[["Checkpoint", dict[str, Any], Layout], Expectation]
DescribeFn = Callable[["InitResult"], str]


def _no_rules(ckpt: Checkpoint, plan: TargetPlan, warnings: list[str]) -> list[Finding]:
    return []


def _no_record(meta: dict[str, str]) -> dict[str, Any]:
    return {}


class Mode(NamedTuple):
    """One target mode (see the module docstring).

    ``build(ckpt, plan, num_tasks, num_ranks)`` returns the float32 factors (cols, rows) and the
    fields init records for them (``task``, ``tasks``, ``weights``, ``seed``); a mode that
    ``copies_factors`` returns one task's factors and init repeats them ``num_tasks`` times.
    ``plan_rules`` returns the findings of a plan (and may add warnings); ``read_record`` parses
    what init recorded (raising :class:`RecordError`); ``expect`` says what ``verify`` holds a
    target to; ``describe`` is init's one-line account of the result. ``selects_tasks``: it takes
    ``--tasks``/``--weights``; ``takes_task``: it reads ``--task`` (elsewhere a warning says it is
    ignored, as PEFT ignores ``prompt_tuning_init_task``).
    """

    name: str
    peft_name: str
    summary: str
    copies_factors: bool
    build: BuildFn
    expect: ExpectFn
    describe: DescribeFn
    plan_rules: PlanFn = _no_rules
    read_record: RecordFn = _no_record
    selects_tasks: bool = False
    aliases: tuple[str, ...] = ()
    takes_task: bool = False

    def sizes(self, plan: TargetPlan, source_ranks: int | None) -> tuple[int, int | None]:
        """The target's (num_tasks, num_ranks): the plan's, else 1 task and the source's rank (1
        for a mode that draws its own factors from a source without any)."""
        fallback = None if self.copies_factors else 1
        # None means "not asked for"; 0 or a negative size is asked for, and refused by the plan rules
        tasks = 1 if plan.num_tasks is None else plan.num_tasks
        ranks = plan.num_ranks if plan.num_ranks is not None else source_ranks or fallback
        return tasks, ranks


MODES: dict[str, Mode] = {}


def register(mode: Mode) -> Mode:
    """Add ``mode`` to the table (replacing one of the same name); returns it."""
    MODES[mode.name] = mode
    return mode


def _key(text: str) -> str:
    return text.strip().lower().replace("-", "_")


def find_mode(name: str | None) -> Mode | None:
    """The mode called ``name`` (ours, PEFT's or an alias, any case), or None."""
    if not isinstance(name, str):
        return None
    key = _key(name)
    for mode in MODES.values():
        if key in (mode.name, _key(mode.peft_name), *map(_key, mode.aliases)):
            return mode
    return None


def mode_names() -> list[str]:
    """Our names of the registered modes, in table order."""
    return list(MODES)


def _spoken(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def get_mode(name: str) -> Mode:
    """The mode called ``name``; ConfigError naming every mode otherwise."""
    mode = find_mode(name)
    if mode is None:
        ours = _spoken(mode_names())
        peft = ", ".join(m.peft_name for m in MODES.values())
        raise ConfigError(f"unknown mode {name!r}: use {ours} (or {peft})")
    return mode


def canonical_mode(name: str) -> str:
    """Our name of the mode called ``name`` (see :func:`get_mode`)."""
    return get_mode(name).name


# --- shared pieces of the rules and records ----------------------------------------------------


def source_tasks(ckpt: Checkpoint) -> int | None:
    """The source's number of tasks, when its task factors have the expected rank."""
    cols = ckpt.shapes.get("prefix_task_cols")
    return cols[0] if cols and len(cols) == 3 else None


def _shown(text: str) -> str:
    """A recorded value for a message: repr'd, at most 40 characters."""
    return repr(text) if len(text) <= 40 else repr(text[:37]) + "..."


def _meta_list(meta: dict[str, str], key: str, kind: type) -> list[Any] | None:
    """A recorded comma-separated list of ``kind`` (int or float); None when absent or empty."""
    text = meta.get(key)
    if text is None or text == "":
        return None
    try:
        return [kind(v) for v in text.split(",")]
    except ValueError:
        what = "integers" if kind is int else "numbers"
        raise RecordError(key, f"recorded {key} {_shown(text)} is not a list of {what}") from None


def _meta_int(meta: dict[str, str], key: str, default: int | None = None) -> int | None:
    """A recorded non-negative integer (``default`` when absent)."""
    text = meta.get(key)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise RecordError(key, f"recorded {key} {_shown(text)} is not an integer") from None
    if value < 0:
        raise RecordError(key, f"recorded {key} {value} is negative")
    return value


# --- average -----------------------------------------------------------------------------------


def selection_rules(ckpt: Checkpoint, plan: TargetPlan, warnings: list[str]) -> list[Finding]:
    """The rules of ``tasks`` and ``weights``: tasks given, distinct and the source's; one finite,
    non-negative weight per averaged task, not all 0."""
    out: list[Finding] = []
    tasks, weights, src_n = plan.tasks, plan.weights, source_tasks(ckpt)
    if tasks is not None:
        if not tasks:
            out.append(
                Finding.error(
                    "usage",
                    "tasks",
                    "no tasks given",
                    expected="at least one task",
                    found="[]",
                    fix=flag("list tasks like 0,3,5", "list tasks like [0, 3, 5]"),
                )
            )
        if len(set(tasks)) != len(tasks):
            out.append(
                Finding.error(
                    "usage",
                    "tasks",
                    "a task is listed twice",
                    expected="distinct tasks",
                    found=tasks,
                    fix=f"list each task once (use {flag('--weights', 'TargetPlan(weights=...)')} to weigh one more)",
                )
            )
        bad = [t for t in tasks if src_n is not None and (t < 0 or t >= src_n)]
        if bad:
            assert src_n is not None
            out.append(
                Finding.error(
                    "task-range",
                    "tasks",
                    f"the source has {src_n} tasks",
                    expected=f"0..{src_n - 1}",
                    found=bad,
                    fix=f"pick tasks in 0..{src_n - 1}",
                )
            )
    if weights is not None:
        count = len(tasks) if tasks is not None else src_n
        if count is not None and len(weights) != count:
            out.append(
                Finding.error(
                    "usage",
                    "weights",
                    "need one weight per averaged task",
                    expected=count,
                    found=len(weights),
                    fix="give as many weights as tasks",
                )
            )
        if any(not math.isfinite(w) or w < 0 for w in weights) or not sum(weights) > 0:
            out.append(
                Finding.error(
                    "usage",
                    "weights",
                    "weights must be finite, non-negative, not all 0",
                    expected=">= 0",
                    found=weights,
                    fix="fix the weights",
                )
            )
    return out


def _average_build(ckpt: Checkpoint, plan: TargetPlan, n: int, r: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    from .factors import average_factors

    cols, rows = average_factors(ckpt, plan.tasks, plan.weights, engine=plan.engine, threads=plan.torch_threads)
    return cols, rows, {"tasks": plan.tasks, "weights": plan.weights}


def _average_record(meta: dict[str, str]) -> dict[str, Any]:
    return {"tasks": _meta_list(meta, "mpt_tools.tasks", int), "weights": _meta_list(meta, "mpt_tools.weights", float)}


def _average_expect(src: Checkpoint, record: dict[str, Any], layout: Layout) -> Expectation:
    import importlib.util

    from .factors import average_factors

    n_s = layout[0]
    tasks, weights = record["tasks"], record["weights"]
    plan = TargetPlan("average", tasks=tasks, weights=weights)
    bad = [f for f in selection_rules(src, plan, []) if f.level == "error"]
    if bad:
        failures = tuple(
            (f.field, f"recorded mpt_tools.{f.field}: {f.message} (expected {f.expected}, found {f.found})")
            for f in bad
        )
        return Expectation(failures=failures)
    # verify holds the target to torch's own mean when torch is here (it notices a torch whose
    # reduction order is no longer the one mpt_tools.torchmean reproduces), else to numpy's
    engine = "torch" if importlib.util.find_spec("torch") is not None else "auto"
    cols, rows = average_factors(src, tasks, weights, engine=engine)
    which = f"source tasks {tasks}" if tasks else f"all {n_s} source tasks"
    if weights:
        what = f"bitwise the weighted mean of {which} with weights {weights} (float64, rounded once)"
    else:
        what = f"bitwise the PEFT mean of {which}"
    return Expectation(what=what, cols=cols, rows=rows, similarity_over=set(tasks or range(n_s)))


def _average_describe(result: InitResult) -> str:
    meta = result["metadata"]
    tasks, weights = meta.get("mpt_tools.tasks"), meta.get("mpt_tools.weights")
    if weights:
        which = f"source tasks {tasks}" if tasks else "all source tasks"
        return f"weighted mean of {which} (weights {weights})"
    if tasks:
        return f"mean of source tasks {tasks}"
    return "mean of the source task factors"


# --- exact -------------------------------------------------------------------------------------


def _exact_rules(ckpt: Checkpoint, plan: TargetPlan, warnings: list[str]) -> list[Finding]:
    """The source task must exist; a negative one is refused (PEFT silently counts it from the
    end) unless ``allow_negative_task``, which resolves it with a warning."""
    src_n, task = source_tasks(ckpt), plan.task if plan.task is not None else 0
    if src_n is None or 0 <= task < src_n:
        return []
    resolved = src_n + task
    if task < 0 and plan.allow_negative_task:
        if resolved >= 0:
            warnings.append(f"task {task} resolves to task {resolved} of {src_n} (counting from the end)")
            return []
        return [
            Finding.error(
                "task-range",
                "task",
                f"the source has {src_n} tasks",
                expected=f"-{src_n}..{src_n - 1}",
                found=task,
                fix=f"pass a task in 0..{src_n - 1}",
            )
        ]
    if task < 0:
        return [
            Finding.error(
                "negative-task",
                "task",
                "negative task index: PEFT would silently take "
                + (f"task {resolved} (counting from the end)" if resolved >= 0 else "nothing"),
                expected=f"0..{src_n - 1}",
                found=task,
                fix=flag(
                    f"pass --task {resolved} (or, to init, --allow-negative-task to count from the end)",
                    f"pass task={resolved} (or, to init_adapter, TargetPlan(allow_negative_task=True)"
                    " to count from the end)",
                )
                if resolved >= 0
                else f"pass a task in 0..{src_n - 1}",
            )
        ]
    return [
        Finding.error(
            "task-range",
            "task",
            f"the source has {src_n} tasks",
            expected=f"0..{src_n - 1}",
            found=task,
            fix=f"pass a task in 0..{src_n - 1}",
        )
    ]


def _exact_build(ckpt: Checkpoint, plan: TargetPlan, n: int, r: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    from .factors import exact_factors

    k = 0 if plan.task is None else plan.task
    if k < 0:
        k += ckpt.shapes["prefix_task_cols"][0]
    cols, rows = exact_factors(ckpt, k)
    return cols, rows, {"task": k}


def _exact_record(meta: dict[str, str]) -> dict[str, Any]:
    return {"task": _meta_int(meta, "mpt_tools.task", 0)}


def _exact_expect(src: Checkpoint, record: dict[str, Any], layout: Layout) -> Expectation:
    from .factors import exact_factors

    k, n_s = record["task"], layout[0]
    if not k < n_s:
        failure = ("task", f"recorded task {k} is not a task of the source (0..{n_s - 1})")
        return Expectation(task=k, failures=(failure,))
    cols, rows = exact_factors(src, k)
    return Expectation(what=f"bitwise source task {k}", cols=cols, rows=rows, task=k, prompt_equal=True)


# --- shared ------------------------------------------------------------------------------------


def _shared_build(ckpt: Checkpoint, plan: TargetPlan, n: int, r: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    import numpy as np

    from .factors import random_factors

    seed = plan.seed
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % (1 << 63))  # type: ignore[operator]
    t, d = ckpt.shapes["prompt_embeddings"]
    cols, rows = random_factors(seed, n, t, r, d)
    return cols, rows, {"seed": seed}


def _shared_record(meta: dict[str, str]) -> dict[str, Any]:
    return {"seed": _meta_int(meta, "mpt_tools.seed")}


def _shared_expect(src: Checkpoint, record: dict[str, Any], layout: Layout) -> Expectation:
    from .factors import random_factors

    seed = record["seed"]
    if seed is None:
        return Expectation()
    cols, rows = random_factors(seed, *layout)
    return Expectation(what=f"bitwise the N(0, 0.02) draws of seed {seed}", cols=cols, rows=rows, per_task=False)


register(
    Mode(
        name="average",
        peft_name="AVERAGE_SOURCE_TASKS",
        summary="the mean of the source task factors (bitwise PEFT's), optionally of chosen tasks with weights",
        copies_factors=True,
        selects_tasks=True,
        build=_average_build,
        plan_rules=selection_rules,
        read_record=_average_record,
        expect=_average_expect,
        describe=_average_describe,
    )
)
register(
    Mode(
        name="exact",
        peft_name="EXACT_SOURCE_TASK",
        summary="the chosen source task's factors (bitwise PEFT's)",
        copies_factors=True,
        build=_exact_build,
        plan_rules=_exact_rules,
        read_record=_exact_record,
        expect=_exact_expect,
        describe=lambda result: f"source task {result['task']}",
        takes_task=True,
    )
)
register(
    Mode(
        name="shared",
        peft_name="ONLY_SOURCE_SHARED",
        summary="the shared prompt only, fresh N(0, 0.02) factors from a seed",
        copies_factors=False,
        build=_shared_build,
        read_record=_shared_record,
        expect=_shared_expect,
        describe=lambda result: f"shared prompt only, fresh factors from seed {result['seed']}",
    )
)
