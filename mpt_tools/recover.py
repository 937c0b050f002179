"""Recovering ``P*`` from prompts that are exactly ``P* * (U_k @ V_k)`` (pack's algebraic start).

ALS cannot change the sign of an entry of ``P*``: a sign flip of ``P*[t, j]`` needs every task's
product ``(U_k V_k)[t, j]`` to flip with it, which the rank-R structure resists, so the fit stops
where the start put the signs. Given the right signs, magnitudes off by a factor e^N(0, 1) per
entry still converge on exact prompts (where there is no exact fit they decide which local minimum
the fit reaches: pack's sign starts take the prompts' rms). The mean prompt gets the signs right
when every task's product keeps one sign (products around one), and about half of them wrong when
the factors have mean zero, as PEFT initialises them (normal, mean 0, std 0.02). This module finds
the signs, and the values, by linear algebra instead.

Write ``L = 1 / P*`` (elementwise). Every ``L * P_k = U_k V_k`` has rank R, so every (R+1) x (R+1)
minor of ``L * P_k`` vanishes, for every task. ``L`` is defined up to a positive or negative
scaling of each row and each column (the factors absorb it), fixed here by ``L = 1`` on one pivot
row ``i1`` and one pivot column ``j1``. With pivot rows ``I0`` and columns ``J0`` (R of each,
``i1`` and ``j1`` first):

1. (R >= 2) ``L`` on the rows ``I0`` and the columns ``J0``. A block of rows ``I0 + [t]`` and
   columns ``J0 + [j]`` has R^2 unknowns once its pivot row and column are 1. Its determinant is
   a sum over the (R+1)! permutations ``pi`` of ``sign(pi) prod_i L[i, pi(i)] P_k[i, pi(i)]``:
   linear in the (R+1)! monomials ``m_pi = prod_i L[i, pi(i)]``, one equation per task. With
   N >= (R+1)! - 1 tasks the monomials are the null vector of that N x (R+1)! system (the
   determinant spans the degree-(R+1) part of the rank-R ideal, so generically nothing else
   vanishes), and ``L[a, b] = m_pi1 / m_pi2`` for two permutations that differ by the 2-cycle
   through ``(0, 0)`` and ``(a, b)``, averaged in least squares over the completions.
2. Every other entry ``L[t, j]`` is the one unknown of the block ``I0 + [t]`` x ``J0 + [j]``: its
   determinant, expanded along row ``t``, is ``a_k L[t, j] + b_k``, and
   ``L[t, j] = -sum_k a_k b_k / sum_k a_k^2`` (any N >= 1).

At rank 2 with 3 to :data:`LIFT_TASKS` tasks, step 1 takes another route (:func:`_rank2_cross`;
the monomial system at 5 tasks is exactly determined and at times ill-conditioned): the blocks'
determinants are linear in the unknown entries and in their products, and with the products
taken as unknowns of their own, one homogeneous system over a few rows and columns has the true
values as its only null vector (from 3 tasks on; with 2 tasks there are as many equations as
products, never enough).

At ranks 3 to :data:`SYSTEM_MAX_RANK` with R + 1 tasks or more, where T or d is at least (R+1)! +
:data:`KERNEL_MARGIN` (26 at rank 3, 122 at rank 4, 722 at rank 5, 5042 at rank 6), step 1 takes the kernel route
(:func:`_kernels_cross`): the same (R+1)! monomials, but of the left null vectors of R + 1 tasks'
pivot rows, with the columns as equations instead of the tasks, so R + 1 tasks suffice (the rows
as equations, on the transpose, where d is the small side).

From 2 tasks at ranks 2 to :data:`PAIR_MAX_RANK`, where T or d is at least C(2R, R) +
:data:`PAIR_MARGIN` and the other 2R, step 1 takes the pair route (:func:`_pair_cross`): on 2R
pivot rows each of two tasks has R left null vectors, and the Laplace expansion of one 2R x 2R
determinant per column is linear in the C(2R, R) products of their minors; the null vectors follow
from those by quadratics (:func:`_pair_candidates`).

Where none applies (prompts smaller than those: 2 tasks at rank 2 under 4 x 7, 3 to 22 at rank 3
under 6 x 21), step 1 is a search instead
(:func:`_searched_cross`): ``L`` on the pivot rows and a few columns ``C`` is a handful of numbers
(4 at rank 2 with 2 tasks, 6 or 8 at rank 3), because every other row's ``L[t, C]`` then follows by
least squares (``L[t, C] * P_k[t, C]`` lies in the row space of ``L[I0, C] * P_k[I0, C]`` for every
task: linear in ``L[t, C]``); Levenberg-Marquardt on those numbers from every sign pattern finds
the one where all rows fit. Then each column's ``L[S, j]`` on a few rows ``S`` (the same, on
column spaces), and step 2.

So the start is exact up to round-off for rank 1 with any number of tasks, rank 2 with 3 tasks
or more, rank R = 3 to 6 with N >= (R+1)! - 1 (23 tasks at rank 3, 119 at rank 4), rank R = 3 to 6 with
R + 1 tasks or more on prompts with (R+1)! + 2 rows or columns, and ranks 2 to 7 with 2 tasks or
more on prompts of C(2R, R) + 1 by 2R; the search found it for 2 tasks at rank 2 in every case
measured, and at rank 3 with fewer tasks in most (the README has the counts). Otherwise (smaller
prompts, rank 8 and up), or where the prompts are not of that form,
:func:`recover_shared` returns ``None`` or a start whose objective pack compares with the
baseline's; it iterates from the better of the two.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any

import numpy as np

MAX_RANK = 7
"""Above this rank nothing is tried: the pair route's system has C(2R, R) columns (3432 at rank 7,
12870 at rank 8, more than a d = 4096 model has rows for its equations)."""
SYSTEM_MAX_RANK = 6
"""The kernel route and the monomial system stop at this rank: their systems have (R+1)! columns
(5040 at rank 6, 40320 at rank 7: 13 GB in float64 over its 40322 equations)."""
BLOCK_VALUES = 1 << 22
"""Step 1 works on chunks of blocks holding at most this many ``[N, (R+1)!]`` values."""


def _permutations(m: int) -> tuple[list[tuple[int, ...]], list[int]]:
    """The permutations of ``range(m)`` and their signs."""
    perms = list(itertools.permutations(range(m)))
    signs = [(-1) ** sum(1 for a in range(m) for b in range(a + 1, m) if p[a] > p[b]) for p in perms]
    return perms, signs


def _pairs(m: int, perms: list[tuple[int, ...]]) -> dict[tuple[int, int], list[tuple[int, int]]]:
    """For each entry ``(a, b)`` (a, b >= 1) of an m x m block, the index pairs ``(pi1, pi2)`` of
    permutations with ``pi1: 0 -> 0, a -> b`` and ``pi2: 0 -> b, a -> 0``, the rest the same."""
    index = {p: i for i, p in enumerate(perms)}
    pairs: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for a in range(1, m):
        for b in range(1, m):
            rest_rows = [i for i in range(m) if i not in (0, a)]
            rest_cols = [j for j in range(m) if j not in (0, b)]
            found = []
            for completion in itertools.permutations(rest_cols):
                one, two = [0] * m, [0] * m
                one[a], two[0], two[a] = b, b, 0
                for i, j in zip(rest_rows, completion, strict=True):
                    one[i] = two[i] = j
                found.append((index[tuple(one)], index[tuple(two)]))
            pairs[(a, b)] = found
    return pairs


def _block_values(blocks: Any) -> Any:
    """Step 1 for a batch of blocks ``[B, N, m, m]`` (the prompts' entries, pivot row and column
    first): ``L`` on each block [B, m, m] with its first row and column 1."""
    import torch

    b, _n, m, _ = blocks.shape
    perms, signs = _permutations(m)
    cols = []
    for perm, sign in zip(perms, signs, strict=True):
        term = blocks[:, :, 0, perm[0]].clone()
        for i in range(1, m):
            term.mul_(blocks[:, :, i, perm[i]])
        cols.append(term if sign > 0 else term.neg_())
    system = torch.stack(cols, dim=2)  # [B, N, m!]
    scale = torch.linalg.vector_norm(system, dim=1)  # [B, m!]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    system = system / scale[:, None, :]
    _vals, vecs = torch.linalg.eigh(system.transpose(1, 2) @ system)
    mono = vecs[:, :, 0] / scale  # the null vector, unscaled: the monomials up to one factor
    out = torch.ones(b, m, m, dtype=blocks.dtype, device=blocks.device)
    for (a, c), found in _pairs(m, perms).items():
        one = mono[:, [i for i, _ in found]]
        two = mono[:, [j for _, j in found]]
        out[:, a, c] = (one * two).sum(1) / (two * two).sum(1)
    return out


def _pivots(p: Any) -> tuple[list[int], list[int]]:
    """Rows and columns in pivot order: those whose smallest rms over the tasks is largest (the
    gauge divides by them) first."""
    import torch

    rms = p.square().mean(0).sqrt()  # [T, d]
    rows = torch.argsort(rms.min(1).values, descending=True, stable=True).tolist()
    cols = torch.argsort(rms.min(0).values, descending=True, stable=True).tolist()
    return rows, cols


def _blocks_step(p: Any, rows: list[list[int]], cols: list[list[int]]) -> Any:
    """:func:`_block_values` over many blocks (rows[i] x cols[i]), in chunks of
    :data:`BLOCK_VALUES`."""
    import torch

    n = p.shape[0]
    m = len(rows[0])
    step = max(1, BLOCK_VALUES // (n * math.factorial(m)))
    out = []
    for a in range(0, len(rows), step):
        r_idx = torch.tensor(rows[a : a + step], device=p.device)  # [B, m]
        c_idx = torch.tensor(cols[a : a + step], device=p.device)
        blocks = p[:, r_idx[:, :, None], c_idx[:, None, :]].movedim(0, 1)  # [B, N, m, m]
        out.append(_block_values(blocks))
    return torch.cat(out)


LIFT_ROWS = 4
"""Step 1 at rank 2 with few tasks: the rows (besides the pivots) of the lifted system."""
LIFT_COLS = 8
"""... and its columns (besides the gauge column)."""
LIFT_TASKS = 16
"""... and the tasks it takes (at most)."""


def _det(m: Any) -> Any:
    """Determinants of a batch of small square matrices ``[..., k, k]``: written out up to 3 x 3
    (torch's batched LU took 14 ms per 50,000 3 x 3 matrices, these 0.3 ms), else torch's."""
    import torch

    k = m.shape[-1]
    if k == 1:
        return m[..., 0, 0]
    if k == 2:
        return m[..., 0, 0] * m[..., 1, 1] - m[..., 0, 1] * m[..., 1, 0]
    if k == 3:
        a, b, c = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
        d, e, f = m[..., 1, 0], m[..., 1, 1], m[..., 1, 2]
        g, h, i = m[..., 2, 0], m[..., 2, 1], m[..., 2, 2]
        return a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)
    return torch.linalg.det(m)


def _affine(blocks: Any, spots: list[tuple[int, int]]) -> tuple[Any, Any]:
    """For 3 x 3 blocks ``[..., 3, 3]`` whose determinant is affine in the entries at ``spots``
    (at most one unknown per row and column of each monomial), the constant and the coefficient
    of each spot: the determinant with them 0, and its change when one of them is 1."""
    import torch

    base = blocks.clone()
    for i, j in spots:
        base[..., i, j] = 0
    zero = _det(base)
    coef = []
    for i, j in spots:
        one = base.clone()
        one[..., i, j] = blocks[..., i, j]
        coef.append(_det(one) - zero)
    return zero, torch.stack(coef, dim=-1)


def _solve_normal(rows: Any, rhs: Any) -> Any:
    """Least squares ``rows @ x = rhs`` for a batch (``rows`` [B, m, u], ``rhs`` [B, m])."""
    import torch

    gram = rows.transpose(1, 2) @ rows
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    scale = gram.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(torch.finfo(gram.dtype).tiny)
    damped = gram + 1e-14 * scale[:, None, None] * eye
    return torch.linalg.solve(damped, rows.transpose(1, 2) @ rhs[..., None])[..., 0]


def _rank2_cross(p: Any, rows: list[int], cols: list[int]) -> Any | None:
    """Step 1 at rank 2 with 3 to :data:`LIFT_TASKS` tasks: ``L`` on the pivot rows ``i1, i2``
    and the pivot columns ``j1, j2`` (``L = 1`` on ``i1`` and ``j1``), by linearisation.

    The blocks of rows ``i1, i2, t`` (``t`` in a few more rows ``Rs``) and columns ``j1, j, j'``
    (``j < j'`` in a few columns ``Cs``, ``j2`` first) have determinants that are linear in
    ``a_j = L[i2, j]``, ``b_tj = L[t, j]`` and their products ``a_j b_tj'``: taken as unknowns of
    their own, one homogeneous linear system whose null vector is those values up to one factor
    (found by comparing each product unknown with the product of its two factors). With 3 tasks
    there are 1.5 equations per product, so the null vector is unique once ``Cs`` has 5 columns or
    more (with 2 tasks, never). Then every other column of ``i2`` and of ``Rs`` (one column at a
    time: the determinant is affine in its unknowns), and ``L[t, Cs]`` of every other row ``t``,
    by least squares."""
    import torch

    n, t, d = p.shape
    i1, i2, j1 = rows[0], rows[1], cols[0]
    rs = rows[2 : 2 + min(t - 2, LIFT_ROWS)]
    cs = cols[1 : 1 + min(d - 1, LIFT_COLS)]
    rho, s = len(rs), len(cs)
    pairs = [(a, b) for a in range(s) for b in range(a + 1, s)]
    unknowns = s + rho * s + rho * s * (s - 1)
    used = min(n, LIFT_TASKS)  # the pivot cross needs a few tasks; the steps after use them all
    if not rho or used * rho * len(pairs) < unknowns + 1:
        return None
    perms, signs = _permutations(3)
    x = p[:used].detach().to("cpu", torch.float64).numpy()
    # unknowns: a (s), b (rho x s), q[t, j, j'] = a_j b_tj' (rho x s x s, j != j')
    index_q: dict[tuple[int, int, int], int] = {}
    for ti in range(rho):
        for a in range(s):
            for b in range(s):
                if a != b:
                    index_q[(ti, a, b)] = s + rho * s + len(index_q)
    system = np.zeros((used * rho * len(pairs), unknowns))
    row = 0
    for ti, tt in enumerate(rs):
        for a, b in pairs:
            block_cols = (j1, cs[a], cs[b])
            spot = {j1: None, cs[a]: a, cs[b]: b}
            for k in range(used):
                for perm, sign in zip(perms, signs, strict=True):
                    c1, c2, c3 = (block_cols[q] for q in perm)
                    coef = sign * x[k, i1, c1] * x[k, i2, c2] * x[k, tt, c3]
                    ua, ub = spot[c2], spot[c3]  # a_{c2} (row i2), b_{t, c3} (row t); None: the gauge's 1
                    if ua is not None and ub is not None:
                        system[row, index_q[(ti, ua, ub)]] += coef
                    elif ua is not None:
                        system[row, ua] += coef
                    elif ub is not None:
                        system[row, s + ti * s + ub] += coef
                row += 1
    scale = np.linalg.norm(system, axis=0)
    scale[scale == 0] = 1
    tall = np.linalg.qr(system / scale, mode="r")  # the same right singular vectors, square
    z = np.linalg.svd(tall)[2][-1] / scale
    za, zb = z[:s], z[s : s + rho * s].reshape(rho, s)
    zq = np.array([z[i] for i in index_q.values()])
    prods = np.array([za[a] * zb[ti, b] for ti, a, b in index_q])
    factor = float(prods @ zq) / float(zq @ zq) if float(zq @ zq) > 0 else 0.0
    if not np.isfinite(factor) or factor == 0:
        return None
    lam = torch.ones(t, d, dtype=p.dtype, device=p.device)
    a_cs = torch.from_numpy(za / factor).to(p)
    lam[i2, cs] = a_cs
    lam[torch.tensor(rs)[:, None], torch.tensor(cs)[None, :]] = torch.from_numpy(zb / factor).to(p)
    # every other column j: a_j and b_{Rs, j}, from the blocks (i1, i2, t) x (j1, j', j), j' in Cs
    others = [j for j in range(d) if j != j1 and j not in cs]
    if others:
        for part in range(0, len(others), 512):
            js = torch.tensor(others[part : part + 512])
            m = len(js)
            eqs, rhs = [], []
            for ti, tt in enumerate(rs):
                for jp in cs:
                    rid = torch.tensor([i1, i2, tt])
                    # [m, n, 3, 3]: rows i1, i2, t; columns j1, j', j
                    colsel = torch.stack([torch.full((m,), j1), torch.full((m,), jp), js], dim=1)
                    blocks = p[:, rid[None, :, None], colsel[:, None, :]].movedim(0, 1)
                    known = torch.ones_like(blocks)
                    known[:, :, 1, 1] = lam[i2, jp]
                    known[:, :, 2, 1] = lam[tt, jp]
                    zero, coef = _affine(blocks * known, [(1, 2), (2, 2)])
                    line = torch.zeros(m, n, 1 + rho, dtype=p.dtype, device=p.device)
                    line[..., 0] = coef[..., 0]
                    line[..., 1 + ti] = coef[..., 1]
                    eqs.append(line)
                    rhs.append(-zero)
            got = _solve_normal(torch.cat(eqs, dim=1), torch.cat(rhs, dim=1))  # [m, 1 + rho]
            lam[i2, js] = got[:, 0]
            lam[torch.tensor(rs)[:, None], js[None, :]] = got[:, 1:].T
    # every other row t: L[t, Cs], from the blocks (i1, i2, t) x (j1, j, j'), j < j' in Cs
    rest = [i for i in range(t) if i not in (i1, i2) and i not in rs]
    if rest:
        ts = torch.tensor(rest)
        m = len(ts)
        eqs, rhs = [], []
        for a, b in pairs:
            rid = torch.stack([torch.full((m,), i1), torch.full((m,), i2), ts], dim=1)
            cid = torch.tensor([j1, cs[a], cs[b]])
            blocks = p[:, rid[:, :, None], cid[None, None, :]].movedim(0, 1)  # [m, n, 3, 3]
            known = torch.ones_like(blocks)
            known[:, :, 1, 1] = lam[i2, cs[a]]
            known[:, :, 1, 2] = lam[i2, cs[b]]
            zero, coef = _affine(blocks * known, [(2, 1), (2, 2)])
            line = torch.zeros(m, n, s, dtype=p.dtype, device=p.device)
            line[..., a] = coef[..., 0]
            line[..., b] = coef[..., 1]
            eqs.append(line)
            rhs.append(-zero)
        got = _solve_normal(torch.cat(eqs, dim=1), torch.cat(rhs, dim=1))  # [m, s]
        lam[ts[:, None], torch.tensor(cs)[None, :]] = got
    return lam


SEARCH_STARTS = 128
"""The numerical route (:func:`_searched_core`): Levenberg-Marquardt starts, in one batch."""
SEARCH_ITERS = 100
"""... and the most iterations each takes. (40 would halve the time where a set of columns misses,
and on prompts not of the form, and came out the same in 110 random adapters of ranks 2 and 3; but
in 1 of the 10 of benchmarks/bench_recover.py at rank 3 with 5 tasks, a start fell from 1.6e-4 to
2e-7 only at its 55th to 60th iteration, and no set of columns found the core within 40.)"""
SEARCH_PRUNE_AT = 20
"""... and after this many iterations only the :data:`SEARCH_KEEP` starts with the lowest residual go
on: half the time of the search (2.2x with 3 tasks at rank 3, 1.6x on random prompts), the same
adapters found in 138 measured at ranks 2 and 3. (Keeping 32 after 4 iterations missed 4 of 20 at
rank 3; 32 after 20, the benchmark's late start of :data:`SEARCH_ITERS`.)"""
SEARCH_KEEP = 64
"""... that many."""
SEARCH_SEED = 0
"""... and the seed of their random signs and magnitudes (the start is deterministic)."""
SEARCH_SIGNS = 8
"""... and the most unknowns it takes on: it tries every one of their sign patterns (256; with
more, at rank 3 with 2 tasks (12) or rank 4 (12 or more), random signs found the core 0 times in
10; all 4096 patterns at rank 3 with 2 tasks, [40, 40], found it in the first adapter tried, from 1
start of 4096, in 90 s, and not in the second within 4 minutes: the start with the right signs
reached the core in 1 adapter of 12, its magnitudes (from 2 tasks' rms) being off by up to e^2.6)."""
SEARCH_TRIES = 4
"""... and how many sets of columns it tries before it keeps the best core (at rank 3 with 3 tasks,
the first set found the core in 6 adapters of 10, one of the first three in all)."""
SEARCH_FOUND = 1e-12
"""... and the mean squared residual (the core's prompts scaled to rms 1) below which a core is
taken as found: 3 iterations after one start gets there, the search stops. The true core's is
1e-18 to 5e-15 from float32 prompts, the local minima's 5e-7 and up (ranks 2 and 3)."""
SEARCH_HOPELESS = 1e-2
"""... and the one above which it tries no more sets of columns: prompts that are not of the form,
where every try would spend its seconds for nothing (random ones: 1.2e-2 to 4e-2 at rank 2, but
2e-3 to 5e-3 at rank 3, which a local minimum of exact prompts can reach: 1e-3 was seen)."""
SEARCH_ROWS = 16
"""... and the rows (besides the pivots) whose fit it measures, at least (the prompts are float32:
with 4 rows a core came out 4% off)."""


def _search_shape(n: int, rank: int) -> tuple[int, int]:
    """Columns ``c`` of the searched core and the number of conditions each further row adds:
    a row's ``L[t, C]`` (c - 1 unknowns once one entry is 1) meets N (c - R) equations, so each
    row pins ``N (c - R) - (c - 1)`` of the core's unknowns; at least 2 (with 1, 2 tasks at rank
    2 had two exact cores on 4 columns)."""
    c = rank + 1
    while n * (c - rank) - (c - 1) < 2:
        c += 1
    return c, n * (c - rank) - (c - 1)


HOST_SOLVE_ELEMENTS = 1 << 24
"""Batches of small dense problems up to this many elements (128 MiB of float64) are solved on the
CPU even when the data is on a GPU: on an H200, CUDA's batched ``pinv`` took 2.3 s for the 15 solves
of pack's recovered start (100 prompts of [100, 4096], rank 4) that LAPACK does in 0.12 s on two
cores, and ``eigh`` of [100, 100] Gram matrices 0.5 s for 0.2 s (benchmarks/RESULTS.md)."""


def on_host(*tensors: Any) -> bool:
    """Whether a dense solve of ``tensors`` runs on the CPU: they are on a GPU and small
    (:data:`HOST_SOLVE_ELEMENTS`)."""
    return tensors[0].device.type != "cpu" and sum(t.numel() for t in tensors) <= HOST_SOLVE_ELEMENTS


def _least_squares(a: Any, b: Any, pinv: bool | None = None) -> Any:
    """Least-squares solutions of a batch ``a x = b`` (``a`` [..., m, u], ``b`` [..., m, k]), rank
    deficient or not: LAPACK's SVD-based solver on the CPU (also for small batches on a GPU:
    :func:`on_host`), the pseudo-inverse on a GPU (CUDA's ``lstsq`` takes full-rank systems only;
    ``pinv`` forces either, for the tests)."""
    import torch

    if pinv is None and on_host(a, b):
        return torch.linalg.lstsq(a.cpu(), b.cpu(), driver="gelsd").solution.to(a.device)
    if pinv if pinv is not None else a.device.type != "cpu":
        return torch.linalg.pinv(a) @ b
    return torch.linalg.lstsq(a, b, driver="gelsd").solution


def _row_fit(core: Any, extra: Any, fixed_at: Any, exact: bool = False) -> tuple[Any, Any]:
    """For each row ``t`` of ``extra`` [N, rho, c], the ``q`` [rho, c] (``q[t, fixed_at[t]] = 1``;
    ``fixed_at``: an index per row, or one for all) that brings ``extra[:, t] * q`` nearest to the
    row space of every task's ``core`` [N, R, c], in least squares; and what is left of it
    [rho, N * c]. The search's objective takes the default, normal equations (what its
    Levenberg-Marquardt differentiates); ``exact`` solves by orthogonal factorisations instead:
    on exact prompts the normal equations left rows 1e-3 off (float64) where these leave 1e-12."""
    import torch

    n, _r, c = core.shape
    rho = extra.shape[1]
    gauge = torch.zeros(rho, c, dtype=core.dtype, device=core.device)
    gauge[torch.arange(rho, device=core.device), torch.as_tensor(fixed_at, device=core.device)] = 1
    eye = torch.eye(c, dtype=core.dtype, device=core.device)
    if exact:
        basis = torch.linalg.qr(core.transpose(1, 2)).Q  # [N, c, R]
        proj = eye - basis @ basis.transpose(1, 2)
    else:
        gram = core @ core.transpose(1, 2)
        small = torch.eye(gram.shape[-1], dtype=core.dtype, device=core.device)
        gram = gram + 1e-14 * gram.diagonal(dim1=1, dim2=2).sum(-1)[:, None, None] * small
        proj = eye - core.transpose(1, 2) @ torch.linalg.solve(gram, core)  # [N, c, c]
    a = (proj[:, None] * extra[:, :, None, :]).movedim(0, 1).reshape(rho, n, c, c)  # a q = proj (extra_t * q)
    fixed = (a * gauge[:, None, None, :]).sum(-1).reshape(rho, n * c)
    free = torch.where(gauge[:, None, None, :] > 0, torch.zeros_like(a), a).reshape(rho, n * c, c)
    if exact:  # on the c - 1 free columns of each row
        order = torch.argsort(gauge, dim=1, stable=True)[:, : c - 1]
        sub = torch.gather(free, 2, order[:, None, :].expand(-1, n * c, -1))
        got = _least_squares(sub, -fixed[..., None])[..., 0]
        q = torch.ones(rho, c, dtype=core.dtype, device=core.device).scatter(1, order, got)
    else:
        q = _solve_normal(free, -fixed)  # the gauge's column of free is zero: its q is damped to 0
        q = torch.where(gauge > 0, torch.ones_like(q), q)
    return q, (free @ q[..., None])[..., 0] + fixed


def _searched_core(p: Any, rank: int, rows: list[int], cols: list[int]) -> tuple[Any, float] | None:
    """``L`` on the pivot rows and the ``c`` columns ``cols`` (``L = 1`` on ``i1`` and ``cols[0]``)
    where no linear route applies (2 tasks at rank 2, few at rank 3), by Levenberg-Marquardt on
    the core's ``(R - 1)(c - 1)`` unknowns from :data:`SEARCH_STARTS` starts at once: for given
    core values every further row's ``L[t, C]`` is a least-squares fit (:func:`_row_fit`, its
    residual the objective), so the search is over a handful of numbers. ``L`` (not ``P*``) is
    searched, so a start's signs can change on the way; each further row fixes a different one
    of its entries to 1, which keeps away the spurious core that is 0 off its gauge row and
    column. The starts: the magnitudes of ``1 / rms(P_k)`` with every sign pattern, then random
    signs and factors e^N(0, 1/4) up to :data:`SEARCH_STARTS`; the core kept is the one with the
    lowest residual (the search stops soon after one is below :data:`SEARCH_FOUND`)."""
    import torch
    from torch.func import jacfwd, vmap

    n, t, _d = p.shape
    c, per_row = _search_shape(n, rank)
    u = (rank - 1) * (c - 1)
    rho = min(t - rank, max(SEARCH_ROWS, -(-2 * u // per_row)))
    if rho * per_row < u + 2:  # exactly as many conditions as unknowns: other cores fit too
        return None
    cs = torch.tensor(cols[:c], device=p.device)
    block = p[:, rows[:rank]][:, :, cs]
    scale = block.square().mean((1, 2), keepdim=True).sqrt().clamp_min(torch.finfo(p.dtype).tiny)
    core_p = block / scale
    extra_p = p[:, rows[rank : rank + rho]][:, :, cs] / scale
    fixed_at = torch.arange(rho, device=p.device) % c  # a different entry of each row: no all-zero core

    def core_of(x: Any) -> Any:
        inner = torch.cat([torch.ones(rank - 1, 1, dtype=x.dtype, device=x.device), x.reshape(rank - 1, c - 1)], 1)
        return torch.cat([torch.ones(1, c, dtype=x.dtype, device=x.device), inner], 0)

    def residual(x: Any) -> Any:
        return _row_fit(core_p * core_of(x), extra_p, fixed_at)[1].reshape(-1)

    rms = block.square().mean(0).sqrt()
    est = 1.0 / rms.clamp_min(torch.finfo(p.dtype).tiny)
    est = est / est[0:1, :]
    est = (est / est[:, 0:1])[1:, 1:].reshape(-1)
    gen = torch.Generator().manual_seed(SEARCH_SEED)
    every = torch.tensor(list(itertools.product((1.0, -1.0), repeat=u)), dtype=torch.float64)
    more = max(0, SEARCH_STARTS - len(every))  # then random signs, with jitter
    signs = torch.cat([every, torch.where(torch.rand(more, u, generator=gen) < 0.5, -1.0, 1.0).to(every)])
    jitter = torch.exp(0.5 * torch.randn(len(signs), u, generator=gen, dtype=torch.float64))
    jitter[: len(every)] = 1.0
    x = est * (signs * jitter).to(p)
    f, jac = vmap(residual), vmap(jacfwd(residual))
    eye = torch.eye(u, dtype=p.dtype, device=p.device)
    size = rho * n * c
    try:
        cost = f(x).square().sum(1)
        cost = torch.where(torch.isnan(cost), math.inf, cost)  # (later ones only take finite values)
        damp = torch.full_like(cost, 1e-3)
        left = SEARCH_ITERS
        while left > 0:
            left -= 1
            r, j = f(x), jac(x)
            h = j.transpose(1, 2) @ j
            h = h + damp[:, None, None] * (h.diagonal(dim1=1, dim2=2)[:, :, None] * eye + 1e-12 * eye)
            step = torch.linalg.solve(h, j.transpose(1, 2) @ r[..., None])
            moved = x - step[..., 0]
            moved = torch.where(torch.isfinite(moved), moved, x)  # no inf or nan into the next solves
            new = f(moved).square().sum(1)
            better = torch.isfinite(new) & (new < cost)
            x = torch.where(better[:, None], moved, x)
            cost = torch.where(better, new, cost)
            damp = torch.where(better, damp / 3, damp * 4).clamp(1e-12, 1e12)
            if SEARCH_ITERS - left == SEARCH_PRUNE_AT and len(cost) > SEARCH_KEEP:  # the best go on
                order = torch.argsort(cost)
                x, cost, damp = x[order[:SEARCH_KEEP]], cost[order[:SEARCH_KEEP]], damp[order[:SEARCH_KEEP]]
            if left > 3 and float(cost.min()) <= SEARCH_FOUND * size:
                left = 3
    except RuntimeError:  # a singular batch element: no search start
        return None
    best = int(torch.argmin(cost))
    if not math.isfinite(float(cost[best])):
        return None
    return core_of(x[best]), float(cost[best]) / size


def _searched_cross(p: Any, rank: int, rows: list[int], cols: list[int]) -> Any | None:
    """``L`` on every row of the first ``c`` pivot columns and every column of a few pivot rows
    (what step 2 needs), from the best core of :func:`_searched_core` over up to
    :data:`SEARCH_TRIES` sets of columns (:func:`_spread`)."""
    c = _search_shape(p.shape[0], rank)[0]
    best: tuple[Any, float, list[int]] | None = None
    for a in range(SEARCH_TRIES):  # the gauge column, then c - 1 more: the next ones each try
        picked = [cols[0], *cols[1 + a * (c - 1) : 1 + (a + 1) * (c - 1)]]
        if len(picked) < c:
            break
        found = _searched_core(p, rank, rows, picked)
        if found is not None and (best is None or found[1] < best[1]):
            best = (found[0], found[1], picked)
        if best is not None and (best[1] <= SEARCH_FOUND or best[1] > SEARCH_HOPELESS):
            break
    if best is None:
        return None
    return _spread(p, rank, rows, cols, best[0], best[2])


FIT_TASKS = 16
"""The linear fits after step 1 (the spread, and step 2 after the kernel, pair, lifted and searched
routes) take at most this many tasks (the first): each already has several equations per unknown
from 2 tasks, and on 100 prompts of [100, 4096] at rank 4 (not of the form) the kernel route and
step 2 took 4.2 s with all of them, 0.74 s with 16."""


def _spread(p: Any, rank: int, rows: list[int], cols: list[int], core: Any, picked: list[int]) -> Any:
    """``L`` on every row of the first ``c`` pivot columns and every column of a few pivot rows
    (what step 2 needs), from ``L`` on the first ``m >= R`` pivot rows and the ``c`` columns
    ``picked`` (``core``, [m, c]): each row ``t`` after the first R fits its ``L[t, picked]`` to
    the rank-R row space of those m rows (``L[t, picked[0]] = 1``; rows R to m too: the first R
    rows' space alone left 2 tasks at rank 4 on [91, 16] with P* 55 off, and keeping rows R to m
    as recovered cost some starts accuracy), then each column ``j`` its ``L[S, j]`` to the
    column space of a few rows ``S`` on ``picked`` (``L[i1, j] = 1``), then the rows outside
    ``S`` their ``L`` on the first ``c`` pivot columns to the rank-R row space of ``S`` there; all
    linear, solved by orthogonal factorisations (``_row_fit(..., exact=True)``)."""
    import torch

    p = p[:FIT_TASKS]
    t, d = p.shape[1:]
    c = len(picked)
    lam = torch.ones(t, d, dtype=p.dtype, device=p.device)
    known = torch.tensor(rows[: len(core)], device=p.device)
    cs = torch.tensor(picked, device=p.device)
    lam[known[:, None], cs[None, :]] = core
    _fill_rows(p, lam, rank, rows[: len(core)], rows[rank:], picked)
    # the columns: rows S (pivot order), their column space on C has rank R
    s_rows = torch.tensor(rows[: min(t, 2 * rank + 4)], device=p.device)
    block = p[:, s_rows][:, :, cs] * lam[s_rows[:, None], cs[None, :]]  # [N, S, c]
    basis = torch.linalg.svd(block, full_matrices=False)[0][:, :, :rank].transpose(1, 2)  # [N, R, S]
    rest = [j for j in range(d) if j not in set(picked)]
    for a in range(0, len(rest), 1024):
        js = torch.tensor(rest[a : a + 1024], device=p.device)
        lam[s_rows[:, None], js[None, :]] = _row_fit(basis, p[:, s_rows][:, :, js].transpose(1, 2), 0, True)[0].T
    if picked != cols[:c]:  # step 2 takes every row of the first pivot columns: fit them too, to
        # the rank-R row space of all the rows S there (R rows alone gave some rows 100% off)
        s_list = s_rows.tolist()
        _fill_rows(p, lam, rank, s_list, [i for i in range(t) if i not in set(s_list)], cols[:c])
    return lam


KERNEL_MARGIN = 2
"""The kernel route (:func:`_kernels_cross`) takes at least (R+1)! + this many equations (columns;
its unknowns are (R+1)! - 1): 26 at rank 3, 122 at rank 4, 722 at rank 5, 5042 at rank 6. Float32
prompts at ranks 3 and 4 with exactly (R+1)! + 2 columns or rows: 200 of 200 adapters round-trip; with
(R+1)! + 1, 100 of 100; with (R+1)!, 99 of 100. (Without :func:`_refined_kernels`, rank 5 at 728
and 760 columns gave starts off by factors of 100 and more in 4 of 6.)"""


LM_STEPS = 40
"""Levenberg-Marquardt steps (at most) that refine the kernel route's ``c_k`` and the pair route's
null vectors on their own systems (:func:`_levenberg_marquardt`). From the monomials' ratios the
``c_k`` came out 1.3% off in an adapter of float32 prompts (rank 3, 4 tasks) and its columns' ``L``
up to 13%; after 2 steps, 0.15% and 3e-6. The pair route's roots can come out farther off where the
null vectors span orders of magnitude: 2 tasks at rank 5 on [10, 253] (its fewest columns, on
exactly 2R rows) started at a cost of 3.3e-2 with the true one at 6e-9, and at rank 7 (2 tasks on
[14, 3434]) at 2.6e-3; Gauss-Newton, even with halved steps, stopped at 3e-2 in the first (the start
was then the baseline's), and this reached 1e-8 in about 15 steps."""
LM_DAMPING = 1e-3
"""... the damping it starts from (relative to the squared norm of each unknown's column of the
Jacobian; a step that does not lower the cost is tried again with 10 times more, up to
:data:`LM_TRIES` times, and a step that does divides it by 10) ..."""
LM_TRIES = 12
"""... (see :data:`LM_DAMPING`) ..."""
LM_STALL = 0.5
"""... and the factor by which three steps must lower the cost for it to go on."""


def _refined_kernels(even: Any, kernels: Any) -> Any:
    """The ``c_k`` (``kernels`` [task, row], first row and column 1) refined by Levenberg-Marquardt on the
    kernel route's system ``A y(c) = 0`` (``even`` [task, row, d]; ``y_pi = prod_k c_k[pi(k)]``),
    over the entries that are not 1; a step is kept only where it lowers ``|A y| / |y|``. The
    ratios of the null vector's monomials weigh the small ones, whose relative error is large, as
    much as the rest; this weighs each equation's residual alike."""
    import torch

    m = kernels.shape[0]
    perms, signs = _permutations(m)
    index = torch.tensor(perms, device=even.device)  # [m!, m]: perm[k] = the row task k takes
    sign = torch.tensor(signs, dtype=even.dtype, device=even.device)
    tasks = torch.arange(m, device=even.device)
    system = sign[None, :] * even[tasks[None, :], index, :].prod(1).T  # [d, m!]
    free = [(k, q) for k in range(1, m) for q in range(1, m)]  # the order of c[1:, 1:].reshape(-1)
    hits = torch.stack([(index[:, k] == q) for k, q in free], dim=1).to(even.dtype)  # [m!, u]

    def unpack(v: Any) -> Any:
        return torch.cat([kernels[:1], torch.cat([kernels[1:, :1], v.reshape(m - 1, m - 1)], 1)])

    def monomials(v: Any) -> Any:
        return unpack(v)[tasks[None, :], index].prod(1)  # [m!]

    def jacobian(v: Any) -> Any:  # d y / d c[k, q] = y / c[k, q] where pi(k) = q
        return system @ (hits * monomials(v)[:, None] / v[None, :])

    def residual(v: Any) -> Any:
        return system @ monomials(v)

    return unpack(_levenberg_marquardt(kernels[1:, 1:].reshape(-1), residual, jacobian, monomials))


def _levenberg_marquardt(v: Any, residual: Any, jacobian: Any, unknowns: Any) -> Any:
    """``v`` after up to :data:`LM_STEPS` Levenberg-Marquardt steps on ``residual(v)`` (a
    homogeneous system's residual, ``jacobian(v)`` its Jacobian), each kept only where it lowers
    ``|residual(v)| / |unknowns(v)|`` (the system's unknowns, whose scale it is blind to); it stops
    where no step does or the cost stalls (:data:`LM_STALL`). Each step solves the damped system
    ``[J; sqrt(lam) D] step = [-r; 0]`` (``D``: the norms of J's columns) by least squares
    (:func:`_least_squares`, as on CUDA)."""
    import torch

    def cost(v: Any) -> float:
        return float(residual(v).norm() / unknowns(v).norm().clamp_min(torch.finfo(v.dtype).tiny))

    best = cost(v)
    history = [best]
    damping = LM_DAMPING
    zeros = torch.zeros(len(v), 1, dtype=v.dtype, device=v.device)
    for _ in range(LM_STEPS):
        jac, res = jacobian(v), residual(v)
        norms = torch.linalg.vector_norm(jac, dim=0)
        norms = torch.where(norms > 0, norms, torch.ones_like(norms))
        moved = None
        for _ in range(LM_TRIES):
            damped = torch.cat([jac, math.sqrt(damping) * torch.diag(norms)])
            try:
                step = _least_squares(damped, torch.cat([-res[:, None], zeros]))[:, 0]
            except RuntimeError:  # (LAPACK refuses a Jacobian that is not finite)
                return v
            tried = v + step
            new = cost(tried) if bool(torch.isfinite(tried).all()) else math.inf
            if new < best:
                moved, damping = tried, damping / 10
                break
            damping *= 10
        if moved is None:
            break
        v, best = moved, new
        history.append(best)
        if len(history) > 3 and best > LM_STALL * history[-4]:
            break
    return v


DISTINCT_FROM = 16
"""The kernel and pair routes take their tasks among the first this many: those least alike."""


def _distinct_tasks(p: Any, k: int) -> list[int] | None:
    """``k`` tasks among the first :data:`DISTINCT_FROM`, least alike: task 0, then each time the
    one whose largest |cosine| with those taken is smallest; ``None`` if two of them are equal up
    to a factor (a task packed twice), which leaves the routes' systems no single null vector."""
    import torch

    first = p[: max(k, min(len(p), DISTINCT_FROM))].reshape(-1, p.shape[1] * p.shape[2])
    unit = first / torch.linalg.vector_norm(first, dim=1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
    alike = (unit @ unit.T).abs()
    taken = [0]
    while len(taken) < k:
        worst = alike[:, taken].max(1).values
        worst[taken] = math.inf
        taken.append(int(torch.argmin(worst)))
        if float(worst[taken[-1]]) > 1 - 1e-12:
            return None
    return taken


def _even_columns(pk: Any) -> Any:
    """The pivot rows of the chosen tasks ``[tasks, rows, d]`` with each column scaled to rms 1:
    in the kernel and pair routes each term of a column's equation has one factor from every row,
    so this scales the equation as a whole, and float32 round-off then weighs alike in each."""
    import torch

    size = pk.square().mean((0, 1)).sqrt()
    return pk / torch.where(size > 0, size, torch.ones_like(size))


def _kernels_cross(p: Any, rank: int, rows: list[int], cols: list[int]) -> Any | None:
    """``L`` on the pivot rows and a few columns, from R + 1 tasks with the columns as equations
    (d >= (R+1)! - 1), then spread to what step 2 needs (:func:`_spread`).

    With ``I = rows[:R+1]``, each ``L[I, :] * P_k[I, :]`` (R + 1 rows of rank R) has a left null
    vector ``c_k``, so column ``j``'s unknowns ``L[I, j]`` are orthogonal to ``P_k[I, j] * c_k`` for
    every task: those R + 1 vectors are dependent, and their determinant, a sum over the
    permutations ``pi`` of ``sign(pi) prod_k P_k[I[pi(k)], j] c_k[pi(k)]``, vanishes. It is linear
    in the (R+1)! monomials ``prod_k c_k[pi(k)]``, one equation per column: the null vector of that
    d x (R+1)! system gives them, and the ``c_k`` follow from their ratios (:func:`_block_values`,
    the same monomials as step 1's). Then ``L[I, j]`` is the left null vector of
    ``[P_k[I, j] * c_k]_k``: R + 1 equations for R unknowns, which some columns pin down poorly (in
    float32, 1 in 200 random adapters had columns off by 100%), so only the ``2R + 4`` columns whose
    matrix is farthest from a second null vector are kept, and the rest is fitted over more rows.
    ``None`` where a value comes out infinite."""
    import torch

    m = rank + 1
    piv = torch.tensor(rows[:m], device=p.device)
    tasks = _distinct_tasks(p, m)
    if tasks is None:
        return None
    pk = p[tasks][:, piv, :]  # [m tasks, m rows, d]
    even = _even_columns(pk)
    kernels = _block_values(even.permute(2, 0, 1)[None])[0]  # [task, row]: c_k up to scalings
    if not bool(torch.isfinite(kernels).all()):
        return None
    kernels = _refined_kernels(even, kernels)
    per_col = pk.permute(2, 1, 0) * kernels.T[None]  # [d, row, task]
    core, picked = _columns_core(per_col, rank)
    if core is None:
        return None
    return _spread(p, rank, rows, cols, core, picked)


def _columns_core(per_col: Any, rank: int) -> tuple[Any | None, list[int]]:
    """From each column's matrix ``[d, m, e]`` whose left null vector is ``L[I, j]`` (``I``: m
    pivot rows), ``L`` on them [m, c] and the ``2R + 4`` columns whose matrix is farthest
    from a second null vector (``L[i1, j] = 1``), and those columns; ``None`` if not finite. Each
    matrix has its rows and columns scaled to rms 1 first, which keeps its left null vector up to
    the rows' scales (undone after): its singular values then measure the data, not the scalings
    (the kernels can span 10 orders of magnitude). The null vector solves m - 1 unknowns from e
    equations, e = m at the kernel route's and the pair route's fewest tasks, which some columns
    pin down poorly (in float32, 1 in 200 random adapters had columns off by 100%)."""
    import torch

    d, m, _e = per_col.shape
    tiny = torch.finfo(per_col.dtype).tiny
    rows_scale = torch.ones(d, m, 1, dtype=per_col.dtype, device=per_col.device)
    for _ in range(3):
        by_row = per_col.square().mean(2, keepdim=True).sqrt().clamp_min(tiny)
        per_col, rows_scale = per_col / by_row, rows_scale / by_row
        per_col = per_col / per_col.square().mean(1, keepdim=True).sqrt().clamp_min(tiny)
    u, s, _ = torch.linalg.svd(per_col)
    null = u[:, :, -1] * rows_scale[:, :, 0]  # [d, m]: L[I, j] up to scale
    score = torch.nan_to_num(s[:, -2] / s[:, 0].clamp_min(tiny), nan=0.0)
    picked = torch.argsort(score, descending=True, stable=True)[: min(d, 2 * rank + 4)].tolist()
    core = null[picked].T  # [m, c]: all the rows I
    core = core / core[:1]  # L[i1, j] = 1
    # and each row to rms 1 (a row's scale is free; the null vectors' can be 1e-8 apart, which
    # leaves the row space to the fits' damping)
    core = core / core.square().mean(1, keepdim=True).sqrt().clamp_min(tiny)
    return (core if bool(torch.isfinite(core).all()) else None), picked


PAIR_MARGIN = 1
"""The pair route (:func:`_pair_cross`) takes at least C(2R, R) + this many equations (columns; its
unknowns are C(2R, R) - 1): 7 at rank 2, 21 at rank 3, 71 at rank 4, 253 at rank 5. Float32 prompts
at ranks 2 to 4 with exactly C(2R, R) + 1 columns or rows: 350 of 350 adapters round-trip; with
C(2R, R), 450 of 450 (one spare equation kept all the same); with C(2R, R) - 1, 21 of 150."""
PAIR_MAX_RANK = 7
"""... and ranks up to this (its system has C(2R, R) - 1 unknowns: 923 at rank 6, 3431 at rank 7;
2 tasks [20, 4096] at rank 7 recovered in 11 s on two cores, 17 s in all)."""
PAIR_BEAM = 4096
"""... and the combinations of roots it keeps after each row of ``x`` (each row has R - 1 quadratics,
2^(R-1) combinations of their roots), those that come closest on the products of 2 x 2 minors within
the rows so far: every combination up to rank 5 (2^16 at the last row), 4096 of 2^25 at rank 6 and
of 2^36 at rank 7 (so 2^18 scored per row, in chunks)."""
PAIR_CHUNK = 1 << 15
"""... and how many combinations it scores at once."""
PAIR_SHORTLIST = 64
"""... and the combinations it scores on every monomial, those that come closest on the products of
2 x 2 minors first (at rank 5, 2^16 combinations on all 252 monomials took 8 s)."""
PAIR_KEEP = 16
"""... and the combinations whose monomials come closest that it refines and fits to more rows. The
roots come from single monomials, so the true one need not come closest before refining: 2 tasks
at rank 6 on [13, 925] (float32 prompts; the system's null vector 3e5 times below its next
singular value) had it 6th of 16 (|A w| / |w| = 5e-2, two pairs before it at 5e-3 and 0.14), and
refined it reached 1.4e-9 where the others stopped at 1.6e-7 and above. (The combinations come in
pairs, each with its mirror image.)"""
PAIR_SAME = 1e-6
"""... and how close (relative) two refined candidates must be to count as one: at rank 6 on [12, 925]
all 16 refined to the true one or its mirror image, and the first 4 were all the mirror's."""
PAIR_STARTS = 4
"""... and on exactly 2R rows, the distinct candidates it gives pack (the true one and its mirror
image fit alike there), best first."""


@functools.lru_cache(maxsize=8)
def _pair_terms(rank: int) -> tuple[list[tuple[int, ...]], list[list[int]], list[int]]:
    """The R-subsets ``S`` of ``range(2R)``, their complements and the signs of the Laplace
    expansion of a 2R x 2R determinant along its first R columns."""
    subsets = list(itertools.combinations(range(2 * rank), rank))
    rest = [[i for i in range(2 * rank) if i not in s] for s in subsets]
    signs = [(-1) ** (sum(s) - sum(range(rank))) for s in subsets]
    return subsets, rest, signs


def _pair_monomials(x: Any, y: Any, rank: int) -> Any:
    """``w_S = det K1[S] det K2[S^c]`` for every R-subset ``S``, with ``K1 = [I; x]`` and
    ``K2 = [y; I]`` (``x``, ``y``: [..., R, R]): [..., C(2R, R)]."""
    first, second = _pair_minors(x, y, rank)
    return first * second


def _pair_minors(x: Any, y: Any, rank: int) -> tuple[Any, Any]:
    """``det K1[S]`` and ``det K2[S^c]`` for every R-subset ``S`` (:func:`_pair_monomials`)."""
    import torch

    eye = torch.eye(rank, dtype=x.dtype, device=x.device).expand(x.shape)
    k1, k2 = torch.cat([eye, x], -2), torch.cat([y, eye], -2)
    top, bottom = (torch.from_numpy(rows).to(x.device) for rows in _pair_rows(rank))  # [C, R] each
    return _det(k1[..., top, :]), _det(k2[..., bottom, :])  # [..., C, R, R] -> [..., C]


@functools.lru_cache(maxsize=8)
def _pair_rows(rank: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_pair_terms`' subsets and complements as arrays [C(2R, R), R]."""
    subsets, rest, _signs = _pair_terms(rank)
    return np.array(subsets, dtype=np.int64), np.array(rest, dtype=np.int64)


@functools.lru_cache(maxsize=8)
def _pair_derivatives(rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Where each minor of :func:`_pair_minors` has a nonzero derivative, as another of them:
    the rows ``(i, b, a, j, sign)`` [5, terms] of ``d det K1[S_i] / d x[b, a] = sign det K1[S_j]``, then for
    ``det K2[S_i^c]`` and ``y[b, a]``. (The cofactor of row ``p`` and column ``a`` of ``K1[S]``,
    where row ``R + b`` of ``K1`` is its ``p``-th, is zero where ``S`` holds ``I``'s row ``a``, else
    ``K1[S']``'s determinant expanded along that row, with ``S' = S - {R + b} + {a}`` holding it
    ``q``-th: ``(-1)^(p+q) det K1[S']``. So with ``K2``'s rows ``b`` and ``R + a``.)"""
    subsets, _rest, _signs = _pair_terms(rank)
    index = {s: i for i, s in enumerate(subsets)}
    every = set(range(2 * rank))

    def terms(of_k2: bool) -> np.ndarray:
        # x[b, .] is K1's row R + b and I's row a is K1's row a; y[b, .] is K2's row b, I's row a its R + a
        row, spare = (0, rank) if of_k2 else (rank, 0)
        found = []
        for i, s in enumerate(subsets):
            held = sorted(every - set(s)) if of_k2 else list(s)
            for b, a in itertools.product(range(rank), repeat=2):
                if row + b not in held or spare + a in held:
                    continue
                moved = sorted(set(held) - {row + b} | {spare + a})
                j = index[tuple(sorted(every - set(moved)) if of_k2 else moved)]
                found.append((i, b, a, j, (-1) ** (held.index(row + b) + moved.index(spare + a))))
        return np.array(found, dtype=np.int64).T

    return terms(False), terms(True)


def _pair_jacobian(x: Any, y: Any, rank: int) -> Any:
    """The Jacobian of :func:`_pair_monomials` (``x``, ``y``: [R, R]) with respect to ``x`` then
    ``y``, flattened: [C(2R, R), 2 R^2], from the minors themselves (:func:`_pair_derivatives`):
    one evaluation of the monomials, where automatic differentiation took one per unknown."""
    import torch

    first, second = _pair_minors(x, y, rank)
    count = len(first)
    jac = torch.zeros(count, 2, rank, rank, dtype=x.dtype, device=x.device)
    for side, terms in enumerate(_pair_derivatives(rank)):
        i, b, a, j, sign = torch.from_numpy(terms).to(x.device)
        other = second[i] * first[j] if side == 0 else first[i] * second[j]
        jac[i, side, b, a] = sign.to(x.dtype) * other
    return jac.reshape(count, -1)


NULL_QR_COLUMNS = 2000
"""From this many columns (the pair route's 3432 at rank 7) :func:`_null_vector` takes a QR
factorisation and inverse iteration instead of the SVD: on the system of 2 tasks [20, 4096] at rank 7
([4096, 3432]), 0.87 s and 0.02 s for its iterations against 10 s for the SVD, and the two null
vectors 3e-11 apart, with the same residual to 7 digits (8.45e-13)."""
NULL_STEPS = 8
"""... and the inverse iterations it takes at most (each divides the error by the squared ratio of the
two smallest singular values: 2.5e-13 in that system; it stops where the direction no longer moves)."""


def _null_vector(a: Any) -> Any:
    """The right singular vector of ``a`` [m, n] (m >= n) for its smallest singular value, unit norm:
    the SVD's, or from :data:`NULL_QR_COLUMNS` columns on, inverse iteration with ``R`` of ``a = QR``
    (``R^T R = a^T a``; a diagonal entry that is zero or below ``eps max|R_ii|`` is raised to it, as
    inverse iteration needs no more than a near-singular ``R``), from a seeded random vector."""
    import torch

    if a.shape[1] < NULL_QR_COLUMNS or a.shape[0] < a.shape[1]:
        return torch.linalg.svd(a, full_matrices=False)[2][-1]
    r = torch.linalg.qr(a, mode="r")[1]
    diag = r.diagonal()
    floor = torch.finfo(a.dtype).eps * float(diag.abs().max().clamp_min(torch.finfo(a.dtype).tiny))
    diag.copy_(torch.where(diag.abs() < floor, torch.where(diag < 0, -floor, floor), diag))
    gen = torch.Generator().manual_seed(SEARCH_SEED)
    v = torch.randn(a.shape[1], 1, generator=gen, dtype=a.dtype).to(a.device)
    v = v / v.norm()
    for _ in range(NULL_STEPS):
        moved = torch.linalg.solve_triangular(r, torch.linalg.solve_triangular(r.T, v, upper=False), upper=True)
        moved = moved / moved.norm()
        done = float((moved * v).sum().abs()) > 1 - 4 * torch.finfo(a.dtype).eps
        v = moved
        if done:
            break
    return v[:, 0]


def _pair_candidates(w: Any, rank: int) -> Any | None:
    """From the monomials ``w`` (up to one factor), the pairs ``(x, y)`` [K, 2, R, R] of
    :func:`_pair_monomials` that come closest to them, best first (``x`` with its first row and
    column 1: the scaling of the pivot rows). With ``w`` scaled so that ``w_top = 1``, the subsets
    that swap one row give the products ``E[b, a] = x[b, a] y[a, b]``, and those that swap two,
    rows ``0, b`` and columns ``0, a``, a quadratic in ``x[b, a]`` whose two roots are the only
    candidates. The combinations of roots are built row by row of ``x``, keeping the
    :data:`PAIR_BEAM` that come closest on the products of 2 x 2 minors within the rows so far
    (every combination up to rank 5), then the :data:`PAIR_SHORTLIST` best on all of them, then
    the best on every monomial."""
    import torch

    subsets, _rest, _signs = _pair_terms(rank)
    index = {s: i for i, s in enumerate(subsets)}
    top = index[tuple(range(rank))]
    if not float(w[top]) or not bool(torch.isfinite(w).all()):
        return None
    w = w / w[top]

    def subset(removed: list[int], added: list[int]) -> int:
        return index[tuple(sorted([i for i in range(rank) if i not in removed] + [rank + b for b in added]))]

    # the signs that relate w_S to the minors of x and y, from any x and y with nonzero minors
    gen = torch.Generator().manual_seed(SEARCH_SEED)
    xr = torch.randn(rank, rank, generator=gen, dtype=w.dtype).to(w.device)
    yr = torch.randn(rank, rank, generator=gen, dtype=w.dtype).to(w.device)
    wr = _pair_monomials(xr, yr, rank)
    prod = torch.zeros(rank, rank, dtype=w.dtype, device=w.device)  # E[b, a]
    for a in range(rank):
        for b in range(rank):
            i = subset([a], [b])
            prod[b, a] = w[i] * torch.sign(wr[i] * xr[b, a] * yr[a, b])
    roots = torch.ones(rank, rank, 2, dtype=w.dtype, device=w.device)  # x[b, a]'s two candidates
    for b in range(1, rank):
        for a in range(1, rank):
            i = subset([0, a], [0, b])
            minors = _det(xr[[0, b]][:, [0, a]]) * _det(yr[[0, a]][:, [0, b]])
            value = w[i] * torch.sign(wr[i] * minors)
            # (x - 1)(E00 E_ba / x - E_b0 E_0a) = value, times x: a quadratic in x = x[b, a]
            qa = -prod[b, 0] * prod[0, a]
            qb = prod[0, 0] * prod[b, a] + prod[b, 0] * prod[0, a] - value
            qc = -prod[0, 0] * prod[b, a]
            root = (qb * qb - 4 * qa * qc).clamp_min(0).sqrt()
            roots[b, a] = torch.stack([(-qb + root) / (2 * qa), (-qb - root) / (2 * qa)])
    if rank > 2:  # the subsets that swap two rows: products of 2 x 2 minors of x and y (cheap)
        pairs = [(a, b) for a in itertools.combinations(range(rank), 2) for b in itertools.combinations(range(rank), 2)]
        a1, a2, b1, b2 = (torch.tensor([q[i][j] for q in pairs], device=w.device) for i in (0, 1) for j in (0, 1))
        index2 = torch.tensor([subset(list(a), list(b)) for a, b in pairs], device=w.device)
        sign2 = torch.sign(wr[index2] * (xr[b1, a1] * xr[b2, a2] - xr[b1, a2] * xr[b2, a1]))
        sign2 = sign2 * (yr[a1, b1] * yr[a2, b2] - yr[a1, b2] * yr[a2, b1]).sign()

    def cheap(x: Any, row: int) -> Any:
        """How far the products of 2 x 2 minors of x's row ``row`` and each row above it are from
        w: [K] (the rows above among themselves were scored before)."""
        y = (prod / x).transpose(1, 2)  # y[a, b] = E[b, a] / x[b, a]
        m = b2 == row
        i1, i2, j1, j2 = a1[m], a2[m], b1[m], b2[m]
        got = (x[:, j1, i1] * x[:, j2, i2] - x[:, j1, i2] * x[:, j2, i1]) * (
            y[:, i1, j1] * y[:, i2, j2] - y[:, i1, j2] * y[:, i2, j1]
        )
        return torch.nan_to_num((got * sign2[m] - w[index2[m]]).square().sum(-1), nan=math.inf)

    # the roots row by row; past PAIR_BEAM combinations only the best of them go on to the next row
    row_choice = torch.tensor(list(itertools.product((0, 1), repeat=rank - 1)), device=w.device)  # [C, R-1]
    columns = torch.arange(1, rank, device=w.device)
    x = torch.ones(1, rank, rank, dtype=w.dtype, device=w.device)
    score = torch.zeros(1, dtype=w.dtype, device=w.device)  # cheap() of each row so far, summed
    for b in range(1, rank):
        x = x.repeat_interleave(len(row_choice), 0)
        x[:, b, 1:] = roots[b, columns, row_choice].repeat(len(x) // len(row_choice), 1)
        if rank == 2:
            continue
        score = score.repeat_interleave(len(row_choice), 0)
        score += torch.cat([cheap(x[c : c + PAIR_CHUNK], b) for c in range(0, len(x), PAIR_CHUNK)])
        keep = PAIR_SHORTLIST if b == rank - 1 else PAIR_BEAM
        if len(x) > keep:
            best = torch.argsort(score)[:keep]
            x, score = x[best], score[best]
    y = (prod / x).transpose(1, 2)
    cost = torch.nan_to_num((_pair_monomials(x, y, rank) - w).square().sum(-1), nan=math.inf)
    order = torch.argsort(cost)[:PAIR_KEEP]
    order = order[torch.isfinite(cost[order])]
    return torch.stack([x[order], y[order]], 1) if len(order) else None


def _refined_pair(system: Any, x: Any, y: Any, rank: int) -> Any:
    """``(x, y)`` [2, R, R] refined by Levenberg-Marquardt on the pair route's system ``A w(x, y) = 0``
    (``x``'s first row and column stay 1), as :func:`_refined_kernels` does for the kernel route;
    a step is kept only where it lowers ``|A w| / |w|``; its Jacobian is :func:`_pair_jacobian`'s."""
    import torch

    k = (rank - 1) ** 2

    def unpack(v: Any) -> tuple[Any, Any]:
        inner = torch.cat([x[1:, :1], v[:k].reshape(rank - 1, rank - 1)], 1)
        return torch.cat([x[:1], inner], 0), v[k:].reshape(rank, rank)

    last: list[Any] = [None, None]  # (the cost asks for the residual and the monomials of one v)

    def monomials(v: Any) -> Any:
        if last[0] is not v:
            last[:] = [v, _pair_monomials(*unpack(v), rank)]
        return last[1]

    def residual(v: Any) -> Any:
        return system @ monomials(v)

    free = torch.ones(2, rank, rank, dtype=torch.bool, device=x.device)
    free[0, 0], free[0, :, 0] = False, False  # (x's first row and column)
    free = free.reshape(-1)

    def jacobian(v: Any) -> Any:
        return system @ _pair_jacobian(*unpack(v), rank)[:, free]

    v = torch.cat([x[1:, 1:].reshape(-1), y.reshape(-1)])
    return torch.stack(unpack(_levenberg_marquardt(v, residual, jacobian, monomials)))


def _pair_cross(p: Any, rank: int, rows: list[int], cols: list[int]) -> list[Any]:
    """``L`` on the pivot rows and a few columns from 2 tasks, with the columns as equations
    (d >= C(2R, R) + :data:`PAIR_MARGIN`), then spread to what step 2 needs (:func:`_spread`):
    the best candidate, or each of them where nothing tells them apart (empty: none).

    With ``I = rows[:2R]``, each of the two tasks' ``L[I, :] * P_k[I, :]`` (2R rows of rank R) has
    R left null vectors, the columns of ``K_k`` [2R, R], so column ``j``'s unknowns ``L[I, j]``
    are orthogonal to the 2R columns of ``[P_1[I, j] * K_1 | P_2[I, j] * K_2]``: its determinant
    vanishes. Expanded along the first R columns (Laplace), it is linear in the C(2R, R) monomials
    ``det K_1[S] det K_2[S^c]`` (20 at rank 3, 70 at rank 4): their null vector, then ``K_1`` and
    ``K_2`` from them (:func:`_pair_candidates`), then ``L[I, j]`` as each column's left null
    vector (:func:`_columns_core`). The candidates that fit the monomials best are told apart by
    how well the next rows fit the core's row space, as the search's are."""
    import torch

    t = p.shape[1]
    m = 2 * rank
    piv = torch.tensor(rows[:m], device=p.device)
    tasks = _distinct_tasks(p, 2)
    if tasks is None:
        return []
    pk = p[tasks][:, piv, :]  # [2 tasks, 2R rows, d]
    even = _even_columns(pk)
    subsets, rest, signs = _pair_terms(rank)
    system = torch.stack(
        [sign * even[0, list(s)].prod(0) * even[1, c].prod(0) for s, c, sign in zip(subsets, rest, signs, strict=True)],
        1,
    )  # [d, C(2R, R)]
    scale = torch.linalg.vector_norm(system, dim=0)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    w = _null_vector(system / scale) / scale
    found = _pair_candidates(w, rank)
    if found is None:
        return []
    distinct: list[Any] = []  # (several combinations often refine to one root)
    for x, y in found:
        got = _refined_pair(system, x, y, rank)
        if all(float((got - seen).norm()) > PAIR_SAME * float(seen.norm()) for seen in distinct):
            distinct.append(got)
    found = distinct
    eye = torch.eye(rank, dtype=p.dtype, device=p.device)
    extra = rows[m : m + min(t - m, SEARCH_ROWS)]
    tiny = torch.finfo(p.dtype).tiny
    kept: list[tuple[float, Any, list[int]]] = []
    for x, y in found:
        k1, k2 = torch.cat([eye, x]), torch.cat([y, eye])
        per_col = torch.cat([pk[0].T[:, :, None] * k1[None], pk[1].T[:, :, None] * k2[None]], 2)  # [d, 2R, 2R]
        full, picked = _columns_core(per_col, rank)
        if full is None:
            continue
        core, cs = full[:rank], torch.tensor(picked, device=p.device)
        # what tells the candidates apart: every task's L * P_k on the 2R rows has rank R (only
        # the two tasks' do for the mirror image), and the next rows fit the core's row space
        spectra = torch.linalg.svdvals(p[:, rows[:m]][:, :, cs] * full)  # [N, 2R]
        cost = float((spectra[:, rank:].square().sum(1) / spectra.square().sum(1).clamp_min(tiny)).sum())
        if extra:
            block = p[:, rows[:rank]][:, :, cs]
            norm = block.square().mean((1, 2), keepdim=True).sqrt().clamp_min(tiny)
            fixed_at = torch.arange(len(extra), device=p.device) % len(picked)
            misfit = _row_fit(block / norm * core, p[:, extra][:, :, cs] / norm, fixed_at, exact=True)[1]
            cost += float(misfit.square().mean())
        if math.isfinite(cost):
            kept.append((cost, full, picked))
    kept.sort(key=lambda c: c[0])
    # on exactly 2R rows no further row tells the true K from its mirror image, and with 2 tasks
    # (or their copies) both give every task rank R there: each goes on, best first, and pack keeps
    # the one whose start fits best (the mirror's L can be far worse conditioned: at rank 7 it
    # spanned 12 orders of magnitude and its start fitted worse than the baseline)
    return [_spread(p, rank, rows, cols, full, picked) for _cost, full, picked in kept[: 1 if extra else PAIR_STARTS]]


def _fill_rows(p: Any, lam: Any, rank: int, known: list[int], others: list[int], cols: list[int]) -> None:
    """``lam[t, cols]`` for the rows ``others``, each fitted to the rank-R row space of the rows
    ``known`` on ``cols`` (known in ``lam``), ``lam[t, cols[0]] = 1``: in place."""
    import torch

    if not others:
        return
    cs = torch.tensor(cols, device=p.device)
    rest = torch.tensor(others, device=p.device)
    block = p[:, known][:, :, cs] * lam[torch.tensor(known, device=p.device)[:, None], cs[None, :]]
    space = block if len(known) == rank else torch.linalg.svd(block, full_matrices=False)[2][:, :rank]
    lam[rest[:, None], cs[None, :]] = _row_fit(space, p[:, rest][:, :, cs], 0, exact=True)[0]


def _oriented(route: Any, p: Any, rank: int, rows: list[int], cols: list[int], columns: bool) -> list[Any]:
    """``route(p, rank, rows, cols)`` with the columns as its equations, or (``columns`` false)
    the same on the transpose, the rows as its equations, transposed back: its candidates (a
    route gives one or ``None``, or a list)."""
    got = route(p, rank, rows, cols) if columns else route(p.transpose(1, 2), rank, cols, rows)
    found = got if isinstance(got, list) else [] if got is None else [got]
    return found if columns else [lam.T.contiguous() for lam in found]


def recover_shared(prompts: Any, rank: int, chunk: int | None = None) -> Any | None:
    """``P*`` for prompts ``[N, T, d]`` (float64 torch) that are exactly ``P* * (U_k @ V_k)`` at
    rank ``rank``, up to the scaling of its rows and columns that the factors absorb (see the
    module docstring); ``None`` where the method does not apply (rank >= min(T, d): any ``P*``
    fits; one task at rank 2 or more; prompts smaller than every route takes, see the module
    docstring; rank above :data:`MAX_RANK`) or gives no finite answer. Work arrays are
    ``[chunk, T, d]`` (tasks per chunk; default all). The first of :func:`recover_starts`."""
    starts = recover_starts(prompts, rank, chunk)
    return starts[0] if starts else None


def recover_starts(prompts: Any, rank: int, chunk: int | None = None) -> list[Any]:
    """The candidates for :func:`recover_shared`, best first: one, or more where the prompts
    leave them equally likely (2 tasks on exactly 2R rows: pack keeps the one whose start fits
    best); empty where it gives ``None``."""
    n, t, d = prompts.shape
    # rank 2: the lifted route up to LIFT_TASKS tasks (the monomial one at 5 tasks solves an N x 6
    # null space, at times ill-conditioned), the monomial one beyond
    lifted = rank == 2 and 3 <= n <= LIFT_TASKS
    need = math.factorial(rank + 1) + KERNEL_MARGIN
    kernels = 3 <= rank <= SYSTEM_MAX_RANK and n >= rank + 1 and max(t, d) >= need
    monomial = 2 <= rank <= SYSTEM_MAX_RANK and n >= math.factorial(rank + 1) - 1
    pair_need = math.comb(2 * rank, rank) + PAIR_MARGIN
    paired = (
        n >= 2
        and not monomial
        and 2 <= rank <= PAIR_MAX_RANK
        and ((d >= pair_need and t >= 2 * rank) or (t >= pair_need and d >= 2 * rank))
    )
    searched = rank >= 2 and not monomial and n >= 2 and (rank - 1) * (_search_shape(n, rank)[0] - 1) <= SEARCH_SIGNS
    if rank >= min(t, d) or rank > MAX_RANK or not (rank == 1 or lifted or kernels or paired or monomial or searched):
        return []
    p = prompts
    rows, cols = _pivots(p)
    crossed: list[Any] = []  # step 1 by a route other than the monomial system; first the one that applies
    if lifted:

        def lifted_route(q: Any, _rank: int, r: list[int], c: list[int]) -> Any | None:
            return _rank2_cross(q, r, c)

        crossed = _oriented(lifted_route, p, rank, rows, cols, True)
        if not crossed:  # too few columns for the lifted system: the same on the transpose
            crossed = _oriented(lifted_route, p, rank, rows, cols, False)
    if not crossed and kernels:  # the columns as equations, or the rows, on the transpose
        crossed = _oriented(_kernels_cross, p, rank, rows, cols, d >= need)
    if not crossed and paired:  # (also where the kernel route's tasks were not distinct)
        crossed = _oriented(_pair_cross, p, rank, rows, cols, d >= pair_need and t >= 2 * rank)
    if not crossed and searched:  # no linear route, or it found nothing
        crossed = _oriented(_searched_cross, p, rank, rows, cols, True)
    if crossed:
        starts = [_completed(p, rank, rows, cols, lam, min(n, FIT_TASKS), chunk) for lam in crossed]
    elif rank == 1 or monomial:
        starts = [_completed(p, rank, rows, cols, _monomial_cross(p, rank, rows, cols), n, chunk)]
    else:
        return []
    return [shared for shared in starts if shared is not None]


def _monomial_cross(p: Any, rank: int, rows: list[int], cols: list[int]) -> Any:
    """Step 1 by the monomial system (ones at rank 1): ``L`` on the pivot rows, every column,
    and on the pivot columns, every row."""
    import torch

    t, d = p.shape[1:]
    lam = torch.ones(t, d, dtype=p.dtype, device=p.device)
    if rank == 1:
        return lam
    piv_r, piv_c = rows[:rank], cols[:rank]
    t0, j0 = rows[rank], cols[rank]
    other_c = [j for j in range(d) if j not in piv_c]
    other_r = [i for i in range(t) if i not in piv_r]
    # the pivot rows, every column: blocks I0 + [t0] x J0 + [j]
    got = _blocks_step(p, [[*piv_r, t0]] * len(other_c), [[*piv_c, j] for j in other_c])
    lam[torch.tensor(piv_r)[:, None], torch.tensor(other_c)[None, :]] = got[:, :rank, rank].T
    lam[torch.tensor(piv_r)[:, None], torch.tensor(piv_c)[None, :]] = got[:, :rank, :rank].mean(0)
    # the pivot columns, every row: blocks I0 + [t] x J0 + [j0]
    got = _blocks_step(p, [[*piv_r, i] for i in other_r], [[*piv_c, j0]] * len(other_r))
    lam[torch.tensor(other_r)[:, None], torch.tensor(piv_c)[None, :]] = got[:, rank, :rank]
    return lam


def _completed(
    p: Any, rank: int, rows: list[int], cols: list[int], lam: Any, used: int, chunk: int | None
) -> Any | None:
    """Step 2: every entry of ``L`` off the pivot rows and columns from ``lam`` there, from the
    first ``used`` tasks, then ``P* = 1 / L``; ``None`` if not finite."""
    import torch

    t, d = p.shape[1:]
    piv_r, piv_c = rows[:rank], cols[:rank]
    # every other entry: one unknown per block, a_k L[t, j] + b_k = 0 in least squares
    num = torch.zeros(t, d, dtype=p.dtype, device=p.device)
    den = torch.zeros(t, d, dtype=p.dtype, device=p.device)
    sign = [(-1) ** (rank + c) for c in range(rank + 1)]
    step = max(1, min(chunk or used, used))
    for a in range(0, used, step):
        pk = p[a : a + step]
        top = pk[:, piv_r, :] * lam[piv_r, :]  # [k, R, d]
        head = top[:, :, piv_c]  # [k, R, R]
        # minors of [head | top[:, :, j]] with column c removed, for every j: [k, d, R + 1]
        full = torch.cat([head[:, None].expand(-1, d, -1, -1), top.transpose(1, 2)[:, :, :, None]], dim=3)
        minors = torch.stack([_det(full[..., [i for i in range(rank + 1) if i != c]]) for c in range(rank + 1)], dim=2)
        coef_a = pk * minors[:, None, :, rank]  # [k, T, d]
        coef_b = torch.zeros_like(pk)
        for c in range(rank):
            known = (pk[:, :, piv_c[c]] * lam[:, piv_c[c]])[:, :, None]  # [k, T, 1]
            coef_b += sign[c] * known * minors[:, None, :, c]
        num -= (coef_a * coef_b).sum(0)
        den += coef_a.square().sum(0)
    solved = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), 1.0)
    keep = torch.ones(t, d, dtype=torch.bool, device=p.device)
    keep[piv_r, :] = False
    keep[:, piv_c] = False
    lam = torch.where(keep, solved, lam)
    shared = 1.0 / lam
    if not bool(torch.isfinite(shared).all()):
        return None
    return shared
