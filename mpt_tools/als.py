"""The fit behind ``pack``: one shared prompt ``P*`` [T, d] and per task rank-R factors ``U_k``
[T, R], ``V_k`` [R, d] for N prompts ``P_k`` ([N, T, d], float64 torch, on any device), minimising

    f = sum_k || P_k - P* * (U_k @ V_k) ||_F^2        (* elementwise)

by alternating least squares with closed-form block updates, every one an exact minimiser of ``f``
over its block (up to a proximal term of relative size :data:`PROX`, which makes rank-deficient
blocks solvable and can only lower ``f`` further; see :func:`_prox_step`):

- each row ``t`` of ``U_k`` (R unknowns): ``P_k[t, :] ~ U_k[t, :] @ (V_k * P*[t, :])``;
- each column ``j`` of ``V_k`` (R unknowns): ``P_k[:, j] ~ (P*[:, j, None] * U_k) @ V_k[:, j]``;
- ``P*`` elementwise: ``P*[t, j] = sum_k P_k[t, j] W_k[t, j] / sum_k W_k[t, j]^2`` with
  ``W_k = U_k @ V_k``; where every ``W_k[t, j]`` is 0, ``f`` does not depend on ``P*[t, j]`` and it
  is kept.

After each iteration the line search of ALS tries a step beyond it (``x + i^(1/3) (x - x_prev)``
for every variable, Bro 1998) and keeps it only where ``f`` is lower. It gets out of swamps where
plain ALS crawls (3 exactly representable rank-2 prompts: relative objective 4e-12 after 300
iterations against 5e-8, ``test_the_line_search_gets_out_of_a_swamp``); on noisy prompts that
converge in a few iterations anyway it costs 20-35% more time per iteration
(``benchmarks/RESULTS.md``). Anderson acceleration's step (:class:`_Anderson`, from the last
:data:`ANDERSON_DEPTH` iterations) is tried too, on the same terms; near an exact fit, where both
crawl, it takes 2 to 9 times fewer iterations.

So ``f`` never increases (``tests/test_pack.py`` checks every block of every iteration). The fit
starts from the simple baseline: ``P*`` = the mean of the prompts (or the fixed ``--shared`` one),
and per task the rank-R truncated SVD of the ratio ``P_k / P*``, split evenly (``U sqrt(S)``,
``sqrt(S) V^T``). Entries where ``|P*| <= NEAR_ZERO * rms(P*)`` are near zero: there the ratio is
taken as 1 (its mean over the tasks wherever ``P*`` is the mean prompt). Rank components the SVD
leaves at zero get a seeded random column in ``U`` and a zero row in ``V``: the product, and so
the baseline, is unchanged, but the next update can use the direction. Since the fit starts from
the baseline and never increases ``f``, it is never worse than the baseline.

ALS cannot flip the sign of an entry of ``P*``, and the mean prompt has about half of them wrong
when the factors have mean zero (as PEFT initialises them). So where ``P*`` is fitted the fit also
tries ``P*`` recovered by linear algebra (:mod:`mpt_tools.recover`: exact for baked rank-1
adapters, rank 2 with 2 tasks or more and rank R with (R+1)! - 1 tasks or more; a search at rank 3
with fewer), scaled to the prompts' magnitude, with factors as for the baseline; and ``P*`` with
the signs of the recovered one, and with those of the mean prompt, and the prompts' rms as
magnitudes (:meth:`_Als.signs_start`; the mean prompt's also without the recovery,
``FitSettings.recover`` off). It starts from whichever has the lowest ``f`` (``FitResult.start``).
The fitted ``P*`` is scaled, rows and columns by positive factors the task factors absorb, to the
prompts' magnitude (:meth:`_Als.scale_like_prompts`).

Every update is vectorised over the tasks in chunks (batched small solves in torch, float64, on
the GPU when there is one): memory is the prompts themselves plus two chunks of
``[tasks, T, d]`` (``FitSettings.chunk_tasks``), whatever N is. The fit is deterministic for a given
``seed`` (which only seeds the unused rank directions) and device. It stops when the relative
decrease of ``f`` over an iteration is at most ``tol``, when every task's error is exact to float64
round-off (:data:`EXACT`, relative to that task's own prompt: against the sum over the tasks, a
task of 1e30 made a task of 1 "exact" at any error), when every task's relative error is within a
quarter of the unit round-off of its input's dtype and of the written dtype
(:func:`round_off_floors`: more iterations would be lost in the cast), or after ``max_iters``
iterations. The factors are then balanced per task (the product's SVD split
evenly, exact up to round-off), ready to be cast to the written dtype
(:mod:`mpt_tools.pack` reads the prompts, calls :func:`als_fit`, casts and writes the adapter).
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

from .dtypes import UNIT_ROUND_OFF
from .factors import on_torch_threads
from .recover import on_host, recover_starts

NEAR_ZERO = 1e-6
"""Baseline: ``|P*[t, j]| <= NEAR_ZERO * rms(P*)`` is near zero (the ratio ``P_k / P*`` is 1 there)."""
NULL_RANK = 1e-12
"""Baseline: a rank component whose singular value is at most this times the largest is unused."""
PROX = 1e-10
"""Each block solve adds ``PROX * trace(G) / R`` times the distance to the current value (a
proximal term): it keeps rank-deficient blocks solvable and can only lower the objective."""
EXACT = 1e-20
"""The fit stops as exact when every task's ``||P_k - P* * (U_k V_k)||^2 <= EXACT * ||P_k||^2``
(relative error 1e-10 each; a zero prompt's error must be zero)."""
ROUND_OFF_SHARE = 0.25
"""The fit stops as "round-off" once every task's relative error is at most this share of the
coarser unit round-off of its input's dtype and of the written dtypes (:func:`round_off_floors`)."""
SIGNS_SKIP = 1e-6
"""The starts from P*'s signs (:meth:`_Als.signs_start`) are not tried where a start's objective is
at most this times ``sum_k ||P_k||^2`` already (relative error 1e-3: theirs is far coarser)."""
CHUNK_BYTES = {"cpu": 256 << 20, "cuda": 2 << 30}
"""The default bound on the fit's two work buffers of ``[tasks, T, d]`` per device type."""
ANDERSON_DEPTH = 5
"""Anderson acceleration combines the last this many steps of ALS (:class:`_Anderson`)."""
ANDERSON_BYTES = {"cpu": 256 << 20, "cuda": 2 << 30}
"""The bound on Anderson acceleration's memory (``5 depth + 4`` copies of the variables: its
history and one step's work); a smaller depth where they are larger, none where not even depth 1
fits."""
ANDERSON_PAUSE = 32
"""After each rejected Anderson step the next is tried after twice as many iterations, at most
this many (it costs one objective evaluation: where it does not help, it costs almost nothing)."""
SMALL_RANK = 8
"""Up to this rank the batched R x R solves are unrolled (much faster than LAPACK calls on
millions of tiny systems); above it torch.linalg solves them."""
SMALL_CHUNK = 1 << 21
"""A CPU fit whose chunk holds fewer values than this ([tasks, T, d]) runs on one thread."""


class FitSettings(NamedTuple):
    """The fit's stopping rule, seed and chunking (see :class:`mpt_tools.pack.PackOptions`);
    ``chunk_tasks``: tasks per chunk of the work buffers (default: all); ``line_search`` off: plain
    ALS (the benchmark's comparison; no Anderson acceleration either); ``anderson``: the depth of
    Anderson acceleration (0: none); ``signs`` off: no start from P*'s signs with the prompts' rms
    magnitudes (:meth:`_Als.signs_start`; the benchmark's "mean prompt alone"); ``round_off``: per
    task, the relative error at or below which the fit stops as "round-off" once every task is there
    (:func:`round_off_floors`; None: never)."""

    seed: int = 0
    tol: float = 1e-6
    max_iters: int = 1000
    chunk_tasks: int | None = None
    line_search: bool = True
    recover: bool = True
    round_off: tuple[float, ...] | None = None
    anderson: int = ANDERSON_DEPTH
    signs: bool = True


class FitResult(NamedTuple):
    """What :func:`als_fit` found: ``shared`` [T, d], ``cols`` [N, T, R], ``rows`` [N, R, d]
    (float64, on the prompts' device), per task the squared errors of the baseline and of the
    fit, the objective after each iteration (``history[0]``: the start's), the iterations run,
    how many of them took the extrapolated step, why the fit stopped ("tol", "exact",
    "round-off" or "max-iters"), where it started (the one of lowest objective: "baseline";
    "recovered", the algebraic start of :mod:`mpt_tools.recover`; "signs", its signs with the
    prompts' rms as magnitudes; "mean-signs", the mean prompt's signs so), the seconds the
    recovery took (0 where it was not tried), and how many iterations took Anderson's step."""

    shared: Any
    cols: Any
    rows: Any
    baseline_sq: Any
    fit_sq: Any
    history: list[float]
    iterations: int
    extrapolated: int
    stopped: str
    start: str
    recover_seconds: float = 0.0
    accelerated: int = 0


def round_off_floors(inputs: Sequence[str], written: Sequence[str]) -> tuple[float, ...]:
    """Per input prompt (its dtype tag in ``inputs``: F64, F32, F16 or BF16), the relative error
    at which more fitting is lost in rounding: :data:`ROUND_OFF_SHARE` times the coarser unit
    round-off of that input's dtype and of the ``written`` tensors' dtypes. Below it the fit
    matches the prompt closer than the prompt's own rounding tells (the values it was rounded
    from are not known better), and casting ``P*`` and the factors to the written dtype costs
    about its unit round-off anyway (0.75 to 0.85 of it measured for float32 adapters): a fit
    error of a quarter of that adds about 4% to the written error, in quadrature, which is all
    that further iterations could take off (measured: the written error 0.96 to 1.11 times that of
    a fit run on to --tol, as the cast's own error varies between equally good factors;
    ``test_the_round_off_stop_costs_little``)."""
    out = max(UNIT_ROUND_OFF[tag] for tag in written)
    return tuple(ROUND_OFF_SHARE * max(UNIT_ROUND_OFF[tag], out) for tag in inputs)


def _floors_sq(prompts: Any, round_off: Sequence[float] | None) -> Any:
    """Per task, the squared error at which the fit stops as "round-off" (``round_off[k]^2
    ||P_k||^2``; None: never)."""
    import torch

    if round_off is None:
        return None
    if len(round_off) != prompts.shape[0]:
        raise ValueError(f"round_off has {len(round_off)} floors for {prompts.shape[0]} prompts: one per prompt")
    share = torch.tensor(round_off, dtype=prompts.dtype, device=prompts.device)
    return torch.linalg.vector_norm(prompts, dim=(1, 2)).square() * share.square()


@contextmanager
def _small_linalg(device: Any, small: bool = True) -> Iterator[None]:
    """One CPU thread for many tiny problems (batched eigh, QR, the unrolled R x R solves, a
    whole fit of small prompts when ``small``): with torch's OpenMP threads on each tiny
    operation, two cores ran them 2-10x slower than one (a [6, 8, 2] @ [6, 2, 32] bmm: 9 ms with
    two threads, 0.01 ms with one). Nothing changes on a GPU."""
    with on_torch_threads(1 if small and device.type == "cpu" else None):
        yield


def _prox_step(a: Any, c: Any, x: Any) -> Any:
    """The step ``delta = (A + lam I)^-1 (c - A x)`` for a batch of symmetric positive
    semi-definite R x R blocks, laid out blocks-first: ``a`` [R, R, *batch], ``c`` and the current
    value ``x`` [R, *batch]; ``lam = PROX * trace(A) / R`` (at least the smallest normal float).

    Block ``f(x) = x^T A x - 2 c^T x + const`` (one row of U or column of V), ``x + delta``
    minimises ``f(x + delta) + lam |delta|^2``, so ``f(x + delta) <= f(x) - lam |delta|^2 <= f(x)``:
    never an increase, also where ``A`` is singular (an unused rank, a zero row of P*), and the
    exact block minimiser ``A^-1 c`` as ``lam / eig(A)`` vanishes. Up to :data:`SMALL_RANK` the
    Cholesky factorisation is unrolled over the batch (elementwise operations on contiguous slabs);
    above it torch.linalg solves."""
    import torch

    r = a.shape[0]
    tiny = torch.finfo(a.dtype).tiny
    lam = sum(a[i, i] for i in range(r)) * (PROX / r)
    lam = lam.clamp_min(tiny)
    rhs = [c[i] - sum(a[i, j] * x[j] for j in range(r)) for i in range(r)]
    if r > SMALL_RANK:
        eye = torch.eye(r, dtype=a.dtype, device=a.device)
        blocks = a.movedim((0, 1), (-2, -1)) + lam[..., None, None] * eye
        factor, _info = torch.linalg.cholesky_ex(blocks)
        step = torch.cholesky_solve(torch.stack(rhs, dim=-1).unsqueeze(-1), factor).squeeze(-1)
        return step.movedim(-1, 0)
    low: list[list[Any]] = [[None] * r for _ in range(r)]
    for i in range(r):
        for j in range(i + 1):
            s = a[i, j] + lam if i == j else a[i, j]
            for k in range(j):
                s = s - low[i][k] * low[j][k]
            low[i][j] = torch.sqrt(s.clamp_min(tiny)) if i == j else s / low[j][j]
    y: list[Any] = []
    for i in range(r):
        s = rhs[i]
        for k in range(i):
            s = s - low[i][k] * y[k]
        y.append(s / low[i][i])
    step_: list[Any] = [None] * r
    for i in reversed(range(r)):
        s = y[i]
        for k in range(i + 1, r):
            s = s - low[k][i] * step_[k]
        step_[i] = s / low[i][i]
    return torch.stack(step_)


def _chunk_errors(p: Any, shared: Any, cols: Any, rows: Any, buffer: Any) -> Any:
    """Per task of a chunk, ``||P_k - P* * (U_k @ V_k)||_F^2``, with ``buffer`` ([k, T, d]) as
    the one work array."""
    import torch

    w = torch.bmm(cols, rows, out=buffer)
    w.mul_(shared).sub_(p)
    return torch.linalg.vector_norm(w, dim=(1, 2)).square()


def prompt_errors(p: Any, shared: Any, cols: Any, rows: Any, *, chunk: int | None = None, buffer: Any = None) -> Any:
    """Per task ``||P_k - P* * (U_k @ V_k)||_F^2`` (float64 torch tensors: ``p`` [N, T, d],
    ``shared`` [T, d], ``cols`` [N, T, R], ``rows`` [N, R, d]), in chunks of ``chunk`` tasks
    that share one work array (``buffer``, else allocated)."""
    import torch

    n = p.shape[0]
    step = max(1, min(chunk or n, n))
    if buffer is None:
        buffer = torch.empty(step, *p.shape[1:], dtype=p.dtype, device=p.device)
    out = torch.empty(n, dtype=p.dtype, device=p.device)
    for a in range(0, n, step):
        b = min(n, a + step)
        out[a:b] = _chunk_errors(p[a:b], shared, cols[a:b], rows[a:b], buffer[: b - a])
    return out


def _eigh(gram: Any) -> tuple[Any, Any]:
    """``torch.linalg.eigh`` of a batch of symmetric matrices, on the CPU when they are small and on
    a GPU (:func:`mpt_tools.recover.on_host`: CUDA's batched eigh of [100, 100] is slower there)."""
    import torch

    if on_host(gram):
        vals, vecs = torch.linalg.eigh(gram.cpu())
        return vals.to(gram.device), vecs.to(gram.device)
    return torch.linalg.eigh(gram)


def _top_directions(ratio: Any, rank: int) -> tuple[Any, Any, Any]:
    """The rank-``rank`` truncated SVD of each ``ratio[k]`` ([T, d]), split evenly: ``cols``
    [k, T, m] and ``rows`` [k, m, d] (m = min(rank, T, d)) with ``cols @ rows`` the projection of
    ``ratio[k]`` on its top m singular directions, and each direction's singular value [k, m].
    The directions are the top eigenvectors of the smaller Gram matrix (``R R^T`` or ``R^T R``,
    a symmetric eigenproblem of min(T, d)): a [100, 4096] SVD costs 0.7 s on two cores, this
    30 ms. A product of projections is exact whatever the accuracy of the weakest directions."""
    import torch

    t, d = ratio.shape[1:]
    m = min(rank, t, d)
    if t <= d:
        _vals, vecs = _eigh(torch.bmm(ratio, ratio.transpose(1, 2)))
        left = vecs[:, :, t - m :].flip(-1)  # [k, T, m], the strongest first
        right = torch.bmm(left.transpose(1, 2), ratio)  # [k, m, d] = S V^T
        sing = torch.linalg.vector_norm(right, dim=2)
        root = sing.sqrt()
        safe = torch.where(root > 0, root, torch.ones_like(root))
        return left * root[:, None, :], right / safe[:, :, None], sing
    _vals, vecs = _eigh(torch.bmm(ratio.transpose(1, 2), ratio))
    right = vecs[:, :, d - m :].flip(-1).transpose(1, 2)  # [k, m, d]
    left = torch.bmm(ratio, right.transpose(1, 2))  # [k, T, m] = U S
    sing = torch.linalg.vector_norm(left, dim=1)
    root = sing.sqrt()
    safe = torch.where(root > 0, root, torch.ones_like(root))
    return left / safe[:, None, :], right * root[:, :, None], sing


class _Als:
    """The ALS state and its chunked passes over the prompts ``p`` [N, T, d] (float64)."""

    def __init__(self, p: Any, rank: int, shared: Any, chunk: int) -> None:
        import torch

        self.p = p
        self.n, self.t, self.d = p.shape
        self.r = rank
        self.fixed = shared is not None
        self.shared = shared.clone() if shared is not None else p.mean(0)
        self.cols = torch.zeros(self.n, self.t, rank, dtype=p.dtype, device=p.device)
        self.rows = torch.zeros(self.n, rank, self.d, dtype=p.dtype, device=p.device)
        self.chunk = max(1, min(chunk, self.n))
        self.buf_q = torch.empty(self.chunk, self.t, self.d, dtype=p.dtype, device=p.device)
        self.buf_w = torch.empty_like(self.buf_q)
        self.moved = False

    def chunks(self) -> list[tuple[int, int]]:
        return [(a, min(self.n, a + self.chunk)) for a in range(0, self.n, self.chunk)]

    def baseline(self, seed: int) -> None:
        """P* as given or the mean prompt; factors from the truncated SVD of ``P_k / P*``."""
        import torch

        ps = self.shared
        rms = float(torch.linalg.vector_norm(ps)) / math.sqrt(max(1, ps.numel()))
        near = ps.abs() <= NEAR_ZERO * rms
        safe = torch.where(near, torch.ones_like(ps), ps)
        gen = torch.Generator().manual_seed(seed)  # on the CPU: the same draws on every device and chunking
        draws = torch.randn(self.n, self.t, self.r, generator=gen, dtype=self.p.dtype).to(self.p.device)
        draws /= torch.linalg.vector_norm(draws, dim=1, keepdim=True).clamp_min(torch.finfo(draws.dtype).tiny)
        for a, b in self.chunks():
            ratio = torch.div(self.p[a:b], safe, out=self.buf_q[: b - a])
            ratio.masked_fill_(near, 1.0)
            with _small_linalg(ratio.device):
                cols, rows, sing = _top_directions(ratio, self.r)
            m = sing.shape[1]
            self.cols[a:b, :, :m] = cols
            self.rows[a:b, :m] = rows
            unused = torch.ones(b - a, self.r, dtype=torch.bool, device=sing.device)
            unused[:, :m] = sing <= NULL_RANK * sing[:, :1]
            self.cols[a:b] = torch.where(unused[:, None, :], draws[a:b], self.cols[a:b])
            self.rows[a:b] = self.rows[a:b].masked_fill(unused[:, :, None], 0.0)

    def errors(self) -> Any:
        """Per task ``||P_k - P* * (U_k @ V_k)||_F^2`` of the current state."""
        return prompt_errors(self.p, self.shared, self.cols, self.rows, chunk=self.chunk, buffer=self.buf_w)

    def sweep(self, trace: list[tuple[str, float]] | None = None) -> None:
        """One iteration: every task's U, then its V (one pass over the tasks), then P*."""
        import torch

        ps = self.shared
        sq = ps * ps
        num = torch.zeros_like(ps) if not self.fixed else None
        den = torch.zeros_like(ps) if not self.fixed else None
        after_u = after_v = 0.0
        r, t, d = self.r, self.t, self.d
        for a, b in self.chunks():
            n = b - a
            p, cols, rows = self.p[a:b], self.cols[a:b], self.rows[a:b]
            q = torch.mul(p, ps, out=self.buf_q[:n])
            # rows of U: A[k, t] = sum_j P*[t, j]^2 V_k[:, j] V_k[:, j]^T, c = (P* * P_k)[t] @ V_k^T
            outer = (rows[:, :, None, :] * rows[:, None, :, :]).reshape(n * r * r, d)
            gram = (outer @ sq.T).reshape(n, r, r, t).permute(1, 2, 0, 3)  # [R, R, n, T]
            rhs = torch.bmm(q, rows.transpose(1, 2)).permute(2, 0, 1)  # [R, n, T]
            with _small_linalg(p.device):
                cols += _prox_step(gram.contiguous(), rhs, cols.permute(2, 0, 1)).permute(1, 2, 0)
            if trace is not None:
                after_u += float(_chunk_errors(p, ps, cols, rows, self.buf_w[:n]).sum())
            # columns of V: A[k, j] = sum_t P*[t, j]^2 U_k[t] U_k[t]^T, c = U_k^T (P* * P_k)[:, j]
            ut = cols.transpose(1, 2)
            outer = (ut[:, :, None, :] * ut[:, None, :, :]).reshape(n * r * r, t)
            gram = (outer @ sq).reshape(n, r, r, d).permute(1, 2, 0, 3)  # [R, R, n, d]
            rhs = torch.bmm(ut, q).transpose(0, 1)  # [R, n, d]
            with _small_linalg(p.device):
                rows += _prox_step(gram.contiguous(), rhs, rows.transpose(0, 1)).transpose(0, 1)
            if trace is not None:
                after_v += float(_chunk_errors(p, ps, cols, rows, self.buf_w[:n]).sum())
            if num is not None and den is not None:
                w = torch.bmm(cols, rows, out=self.buf_w[:n])
                num += torch.mul(p, w, out=q).sum(0)
                den += torch.mul(w, w, out=q).sum(0)
        if trace is not None:
            trace += [("U", after_u), ("V", after_v)]
        if num is not None and den is not None:
            moved = den > 0
            self.shared = torch.where(moved, num / torch.where(moved, den, torch.ones_like(den)), ps)

    def extrapolate(self, before: Any, step: float, errors: Any) -> Any:
        """The line search of ALS (Bro, 1998): try ``before + step * (now - before)`` for every
        variable (P* only when it is fitted) and keep it only when its objective is lower than
        the current one (``errors``: per task, so the objective still never increases); returns
        the per-task errors of the state kept and sets ``moved``."""
        self.moved = False
        shared = self.shared if self.fixed else before[0] + step * (self.shared - before[0])
        cols = before[1] + step * (self.cols - before[1])
        rows = before[2] + step * (self.rows - before[2])
        tried = prompt_errors(self.p, shared, cols, rows, chunk=self.chunk, buffer=self.buf_w)
        if float(tried.sum()) < float(errors.sum()):
            self.shared, self.cols, self.rows, self.moved = shared, cols, rows, True
            return tried
        return errors

    def balance(self) -> None:
        """Per task, the product's SVD split evenly (``U sqrt(S)``, ``sqrt(S) V^T``): the same
        product up to round-off, factors of equal scale."""
        import torch

        with _small_linalg(self.p.device):
            qc, rc = torch.linalg.qr(self.cols)
            qr_, rr = torch.linalg.qr(self.rows.transpose(1, 2))
            u, s, vh = torch.linalg.svd(rc @ rr.transpose(1, 2), full_matrices=False)
        root = s.sqrt()
        k = s.shape[-1]
        cols = torch.zeros_like(self.cols)
        rows = torch.zeros_like(self.rows)
        cols[:, :, :k] = (qc @ u) * root[:, None, :]
        rows[:, :k] = root[:, :, None] * (vh @ qr_.transpose(1, 2))
        self.cols, self.rows = cols, rows

    @functools.cached_property
    def prompt_rms(self) -> Any:
        """``sqrt(mean_k P_k^2)`` [T, d], in chunks of tasks (once: the prompts do not change)."""
        import torch

        rms = torch.zeros(self.t, self.d, dtype=self.p.dtype, device=self.p.device)
        for a, b in self.chunks():
            rms += self.p[a:b].square().sum(0)
        return (rms / self.n).sqrt()

    @staticmethod
    def signs_start(shared: Any, rms: Any) -> Any:
        """``P*`` with the signs of ``shared`` (+ where it is 0) and magnitudes ``rms`` (the
        prompts', :attr:`prompt_rms`): ALS cannot flip a sign, so the signs are what a start
        decides, and magnitudes near the prompts' keep the ratios ``P_k / P*`` of the baseline's
        factors of order one (the mean of prompts whose signs differ is small, and the ratios to
        it are large and noisy)."""
        import torch

        return torch.where(shared < 0, -1.0, 1.0).to(shared.dtype) * rms

    def scale_like_prompts(self) -> None:
        """Fix the gauge: ``P*`` is defined up to a positive scaling of each row and each column,
        ``P* * (a b^T)``, that the factors absorb (``U_k / a``, ``V_k / b``). Choose the one whose
        ``|P*|`` is closest, in log scale, to the prompts' rms ``sqrt(mean_k P_k^2)``: the
        two-way additive fit of the log ratio, over the entries where both are non-zero, each
        scale rounded to a power of two: so the product ``P* * (U_k V_k)`` is unchanged to the bit
        (barring overflow to infinity or underflow to subnormals). (The recovered start has a gauge
        of its own, ``P* = 1`` on one row and one column; this gives every fit the prompts'
        magnitude.)"""
        import torch

        rms = self.prompt_rms
        mag = self.shared.abs()
        used = (mag > 0) & (rms > 0)
        gap = torch.where(used, torch.log(torch.where(used, rms, 1.0)) - torch.log(torch.where(used, mag, 1.0)), 0.0)
        weight = used.to(gap.dtype)
        row_n = weight.sum(1).clamp_min(1.0)
        row = gap.sum(1) / row_n  # [T]
        col = ((gap - row[:, None]) * weight).sum(0) / weight.sum(0).clamp_min(1.0)  # [d]
        by_row, by_col = torch.exp2(torch.round(row / math.log(2))), torch.exp2(torch.round(col / math.log(2)))
        if not (bool(torch.isfinite(by_row).all()) and bool(torch.isfinite(by_col).all())):
            return
        shared = self.shared * by_row[:, None] * by_col[None, :]
        cols = self.cols / by_row[None, :, None]
        rows = self.rows / by_col[None, None, :]
        if all(bool(torch.isfinite(x).all()) for x in (shared, cols, rows)):
            self.shared, self.cols, self.rows = shared, cols, rows


class _Anderson:
    """Anderson acceleration of the ALS map ``g`` (one :meth:`_Als.sweep`; Walker and Ni 2011,
    type II, as De Sterck's N-GMRES accelerates ALS for tensor decompositions): from the last
    ``depth`` + 1 pairs ``(x_i, g(x_i))``, with ``F_i = g(x_i) - x_i``, the step ``g_k - dG gamma``
    where ``gamma`` minimises ``|F_k - dF gamma|`` (``dF``, ``dG``: differences of consecutive
    ``F`` and ``g``). The fit keeps it only where the objective is lower, so nothing can
    increase; where it does not help the tries back off (:data:`ANDERSON_PAUSE`). Near an exact
    fit, where ALS and its line search crawl, it takes 2 to 9 times fewer iterations (measured:
    ``test_anderson_gets_through_the_crawl``). The variables are P* (when it is fitted) and every
    task's factors, flattened; the history holds ``2 depth + 2`` copies and a step builds
    ``3 depth + 2`` more (the residuals, their differences and those of ``g``, the step)."""

    def __init__(self, als: _Als, depth: int, budget: int) -> None:
        size = als.cols.numel() + als.rows.numel() + (0 if als.fixed else als.shared.numel())
        fits = (budget // max(1, 8 * size) - 4) // 5
        self.depth = max(0, min(depth, fits))
        self.xs: list[Any] = []
        self.gs: list[Any] = []
        self.pause = self.wait = 0
        self.kept = 0  # the steps that lowered the objective

    def _flat(self, als: _Als, state: tuple[Any, Any, Any]) -> Any:
        import torch

        parts = [state[1].reshape(-1), state[2].reshape(-1)]
        return torch.cat(parts if als.fixed else [state[0].reshape(-1), *parts])

    def record(self, als: _Als, before: tuple[Any, Any, Any]) -> None:
        """Add the pair (``before``, the state after the sweep)."""
        if not self.depth:
            return
        self.xs = [*self.xs[-self.depth :], self._flat(als, before)]
        self.gs = [*self.gs[-self.depth :], self._flat(als, (als.shared, als.cols, als.rows))]

    def step(self, als: _Als) -> tuple[Any, Any, Any] | None:
        """The accelerated (P*, cols, rows), or None (too little history, a pause, no progress)."""
        import torch

        if self.wait > 0:
            self.wait -= 1
            return None
        if len(self.xs) < 2:
            return None
        res = [g - x for g, x in zip(self.gs, self.xs, strict=True)]
        d_f = torch.stack([b - a for a, b in itertools.pairwise(res)], 1)
        d_g = torch.stack([b - a for a, b in itertools.pairwise(self.gs)], 1)
        gram = d_f.T @ d_f
        scale = float(torch.trace(gram))
        if not scale > 0 or not math.isfinite(scale):
            return None
        gram += (1e-12 * scale) * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        gamma = torch.linalg.solve(gram, d_f.T @ res[-1])
        x = self.gs[-1] - d_g @ gamma
        if not bool(torch.isfinite(x).all()):
            return None
        a = 0 if als.fixed else als.shared.numel()
        b = a + als.cols.numel()
        shared = als.shared if als.fixed else x[:a].reshape(als.shared.shape)
        return shared, x[a:b].reshape(als.cols.shape), x[b:].reshape(als.rows.shape)

    def attempt(self, als: _Als, errors: Any) -> tuple[bool, Any]:
        """Try :meth:`step` from ``als`` (whose per-task errors are ``errors``): moves ``als`` there
        where the objective is lower; returns whether a step was tried and the per-task errors of
        the state kept. A rejected step pauses the tries twice as long as the last (at most
        :data:`ANDERSON_PAUSE`), a kept one ends the pause."""
        jump = self.step(als)
        if jump is None:
            return False, errors
        tried = prompt_errors(als.p, *jump, chunk=als.chunk, buffer=als.buf_w)
        better = float(tried.sum()) < float(errors.sum())
        self.pause = 0 if better else min(ANDERSON_PAUSE, max(1, 2 * self.pause))
        self.wait = self.pause
        if not better:
            return True, errors
        als.shared, als.cols, als.rows = jump
        self.kept += 1
        return True, tried


def als_fit(
    prompts: Any,
    num_ranks: int,
    *,
    shared: Any = None,
    settings: FitSettings | None = None,
    trace: list[tuple[str, float]] | None = None,
    advance: Callable[[int], None] | None = None,
) -> FitResult:
    """Fit ``P* * (U_k @ V_k)`` to ``prompts`` (a float64 torch tensor [N, T, d], on any
    device) by alternating least squares from the baseline (see the module docstring).

    ``shared`` ([T, d], same dtype and device) fixes P*. ``trace``, when given, receives
    ``(block, objective)`` after every block update of every iteration ("U", "V", "P*" or "-"
    with a fixed P*, then "extrapolate": after the line search), starting with
    ``("baseline", f0)``: what the monotonicity test reads. ``advance(1)`` is called after each
    iteration (a progress bar)."""

    import torch

    settings = settings or FitSettings()
    chunk = settings.chunk_tasks or prompts.shape[0]
    small = min(chunk, prompts.shape[0]) * prompts.shape[1] * prompts.shape[2] < SMALL_CHUNK
    threads = torch.get_num_threads()
    with _small_linalg(prompts.device, small):
        return _fit(prompts, num_ranks, shared, settings, trace, advance, threads)


def _fit(
    prompts: Any,
    num_ranks: int,
    shared: Any,
    settings: FitSettings,
    trace: list[tuple[str, float]] | None,
    advance: Callable[[int], None] | None,
    threads: int,
) -> FitResult:
    """:func:`als_fit` itself; the recovery runs on ``threads`` CPU threads, even in a fit of
    small prompts (its systems are not tiny: 2 tasks [16, 1024] at rank 6 recovered in 2.1 s on
    one thread of two cores, 1.5 s on both; none ran slower on both)."""
    import torch

    chunk = settings.chunk_tasks or prompts.shape[0]
    als = _Als(prompts, num_ranks, shared, chunk)
    als.baseline(settings.seed)
    total = float(torch.linalg.vector_norm(prompts)) ** 2  # (einsum: 50x slower on the CPU)
    baseline_sq = errors = als.errors()
    history = [float(baseline_sq.sum())]
    if trace is not None:
        trace.append(("baseline", history[0]))
    start = "baseline"
    recovers = settings.recover and not als.fixed
    recover_started = time.perf_counter()
    with on_torch_threads(threads if prompts.device.type == "cpu" else None):
        found = recover_starts(prompts, num_ranks, chunk) if recovers else []
    recover_seconds = time.perf_counter() - recover_started if recovers else 0.0
    # the recovered candidates (more than one where the recovery could not tell them apart), then
    # the signs of the first and of the mean prompt with the prompts' rms as magnitudes (not tried
    # where a start is within SIGNS_SKIP already: they start far coarser)
    starts = [("recovered", candidate) for candidate in found]
    if settings.signs and not als.fixed:
        rms = als.prompt_rms
        starts += [("signs", als.signs_start(found[0], rms))] if found else []
        starts += [("mean-signs", als.signs_start(als.shared, rms))]
    for name, candidate in starts:
        if name != "recovered" and history[0] <= SIGNS_SKIP * total:
            continue
        kept = als.shared, als.cols.clone(), als.rows.clone()  # baseline() fills the factors in place
        als.shared = candidate
        # its gauge (1 on a row and a column) can be far from the prompts' magnitudes, and
        # baseline() counts as zero what is small against P*'s rms
        als.scale_like_prompts()
        als.baseline(settings.seed)
        tried = als.errors()
        if float(tried.sum()) < history[0]:
            start, history[0], errors = name, float(tried.sum()), tried
        else:
            als.shared, als.cols, als.rows = kept
    if starts and trace is not None:
        trace.append(("start", history[0]))
    iterations = extrapolated = 0
    anderson_bytes = ANDERSON_BYTES.get(prompts.device.type, ANDERSON_BYTES["cpu"])
    anderson = _Anderson(als, settings.anderson if settings.line_search else 0, anderson_bytes)
    floors = _floors_sq(prompts, settings.round_off)
    exact = torch.linalg.vector_norm(prompts, dim=(1, 2)).square() * EXACT

    def done(errors: Any) -> str | None:
        """Why the fit is done at per-task ``errors``, if it is: each task's own error is compared
        with its own prompt's norm (never the objective with their sum: a task of 1e30 would make
        a task of 1 "exact" at any error)."""
        if bool((errors <= exact).all()) and bool(torch.isfinite(exact).all()):
            return "exact"
        if floors is not None and bool((errors <= floors).all()):
            return "round-off"
        return None

    stopped = done(errors) or "max-iters"
    if stopped == "max-iters":
        for _ in range(settings.max_iters):
            before = (als.shared, als.cols.clone(), als.rows.clone()) if settings.line_search else None
            als.sweep(trace)
            iterations += 1
            errors = als.errors()
            f = float(errors.sum())
            if trace is not None:
                trace.append(("-" if als.fixed else "P*", f))
            if settings.line_search:
                assert before is not None
                anderson.record(als, before)
                errors = als.extrapolate(before, iterations ** (1 / 3), errors)
                f = float(errors.sum())
                extrapolated += als.moved
                if trace is not None:
                    trace.append(("extrapolate", f))
                tried_step, errors = anderson.attempt(als, errors)
                f = float(errors.sum())
                if tried_step and trace is not None:
                    trace.append(("anderson", f))
            previous = history[-1]
            history.append(f)
            if advance is not None:
                advance(1)
            reason = done(errors) or ("tol" if previous - f <= settings.tol * previous else None)
            if reason is not None:
                stopped = reason
                break
    if not als.fixed:
        als.scale_like_prompts()
    als.balance()
    return FitResult(
        als.shared,
        als.cols,
        als.rows,
        baseline_sq,
        als.errors(),
        history,
        iterations,
        extrapolated,
        stopped,
        start,
        recover_seconds,
        anderson.kept,
    )
