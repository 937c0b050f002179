"""Recovering ``P*`` from prompts that are exactly ``P* * (U_k @ V_k)`` (pack's algebraic start).

ALS cannot change the sign of an entry of ``P*``: a sign flip of ``P*[t, j]`` needs every task's
product ``(U_k V_k)[t, j]`` to flip with it, which the rank-R structure resists, so the fit stops
where the start put the signs. Magnitudes do not matter (a start off by a factor e^N(0, 1) per
entry converges); the signs do. The mean prompt gets them right when every task's product keeps
one sign (products around one), and about half of them wrong when the factors have mean zero, as
PEFT initialises them (normal, mean 0, std 0.02). This module finds the signs, and the values, by
linear algebra instead.

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

So the start is exact up to round-off for rank 1 with any number of tasks, and for rank R >= 2
with N >= (R+1)! - 1 (5 tasks at rank 2, 23 at rank 3, 119 at rank 4). Otherwise, or where the
prompts are not of that form, :func:`recover_shared` returns ``None`` or a start whose objective
pack compares with the baseline's; it iterates from the better of the two.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

MAX_RANK = 4
"""Step 1's system has (R+1)! columns (120 at rank 4); above this rank it is not tried."""
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


def _pivots(p: Any, rank: int) -> tuple[list[int], list[int]]:
    """Pivot rows and columns: those whose smallest rms over the tasks is largest (the gauge
    divides by them), strongest first."""
    import torch

    rms = p.square().mean(0).sqrt()  # [T, d]
    rows = torch.argsort(rms.min(1).values, descending=True, stable=True)[: rank + 1].tolist()
    cols = torch.argsort(rms.min(0).values, descending=True, stable=True)[: rank + 1].tolist()
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


def recover_shared(prompts: Any, rank: int, chunk: int | None = None) -> Any | None:
    """``P*`` for prompts ``[N, T, d]`` (float64 torch) that are exactly ``P* * (U_k @ V_k)`` at
    rank ``rank``, up to the scaling of its rows and columns that the factors absorb (see the
    module docstring); ``None`` where the method does not apply (rank >= min(T, d): any ``P*``
    fits; rank >= 2 with fewer than (R+1)! - 1 tasks; rank above :data:`MAX_RANK`) or gives no
    finite answer. Work arrays are ``[chunk, T, d]`` (tasks per chunk; default all)."""
    import torch

    n, t, d = prompts.shape
    if rank >= min(t, d) or rank > MAX_RANK or (rank > 1 and n < math.factorial(rank + 1) - 1):
        return None
    p = prompts
    rows, cols = _pivots(p, rank)
    piv_r, piv_c = rows[:rank], cols[:rank]
    t0, j0 = rows[rank], cols[rank]
    lam = torch.ones(t, d, dtype=p.dtype, device=p.device)
    if rank > 1:
        other_c = [j for j in range(d) if j not in piv_c]
        other_r = [i for i in range(t) if i not in piv_r]
        # the pivot rows, every column: blocks I0 + [t0] x J0 + [j]
        got = _blocks_step(p, [[*piv_r, t0]] * len(other_c), [[*piv_c, j] for j in other_c])
        lam[torch.tensor(piv_r)[:, None], torch.tensor(other_c)[None, :]] = got[:, :rank, rank].T
        lam[torch.tensor(piv_r)[:, None], torch.tensor(piv_c)[None, :]] = got[:, :rank, :rank].mean(0)
        # the pivot columns, every row: blocks I0 + [t] x J0 + [j0]
        got = _blocks_step(p, [[*piv_r, i] for i in other_r], [[*piv_c, j0]] * len(other_r))
        lam[torch.tensor(other_r)[:, None], torch.tensor(piv_c)[None, :]] = got[:, rank, :rank]
    # every other entry: one unknown per block, a_k L[t, j] + b_k = 0 in least squares
    num = torch.zeros(t, d, dtype=p.dtype, device=p.device)
    den = torch.zeros(t, d, dtype=p.dtype, device=p.device)
    sign = [(-1) ** (rank + c) for c in range(rank + 1)]
    step = max(1, min(chunk or n, n))
    for a in range(0, n, step):
        pk = p[a : a + step]
        top = pk[:, piv_r, :] * lam[piv_r, :]  # [k, R, d]
        head = top[:, :, piv_c]  # [k, R, R]
        # minors of [head | top[:, :, j]] with column c removed, for every j: [k, d, R + 1]
        full = torch.cat([head[:, None].expand(-1, d, -1, -1), top.transpose(1, 2)[:, :, :, None]], dim=3)
        minors = torch.stack(
            [torch.linalg.det(full[..., [i for i in range(rank + 1) if i != c]]) for c in range(rank + 1)], dim=2
        )
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
