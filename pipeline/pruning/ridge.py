"""Masked ridge least squares, row by row: the solvers of the repair (repair.py).

For each output row r of a layer (per group g: H and B are the group's), with kept set S:

    (H_SS + lam I) w_S = B_S + lam w0_S,   w_P = 0 exactly,

the minimiser of ||w p - t||^2 + lam ||w_S - w0_S||^2 over the patches p (H = sum p p^T,
B = sum p t^T). ``exact`` solves every row's system: batched Cholesky on the kept block, or,
when fewer weights are pruned than kept, on the pruned block of (H + lam I)^-1 (the same
minimiser, from the unconstrained optimum). ``sweep`` is SparseGPT's column sweep: one
factorisation per group, then each pruned column in turn is zeroed and its error spread over
the later columns (optimal column by column, not jointly), for wide layers where per-row
solves cost too much. ``auto`` picks by estimated cost. ``nested_solve`` gives ``exact``'s
rows for many nested masks at once (a profile's levels) from one factorisation per row.

Pure: tensors in, tensors out.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

SOLVERS = ("auto", "exact", "sweep")
SWEEP_BLOCK = 128  # columns per lazy-update block of the sweep
# ``auto`` sweeps when per-row solves would cost this many times the sweep's flops
EXACT_COST_FACTOR = 16.0


def damping_of(gram: torch.Tensor, damping: float, width: int) -> torch.Tensor:
    """(G,) lam per group: ``damping`` x the mean diagonal of the weights' part of the Gram."""
    return damping * torch.diagonal(gram, dim1=1, dim2=2)[:, :width].mean(1)


class DampedGram:
    """H + lam I per group (G, D', D') float64, with its Cholesky factor, inverse and the
    sweep's factor of the inverse computed once and shared by every mask solved against it
    (a profile's levels). ``factor`` is None where H + lam I is singular (a dead input with
    no damping): the kept-block solver, which falls back to least norm, is used then."""

    def __init__(self, gram: torch.Tensor, lam: torch.Tensor) -> None:
        g, d = gram.shape[0], gram.shape[1]
        eye = torch.eye(d, dtype=gram.dtype, device=gram.device)
        self.matrix = gram + lam.view(g, 1, 1) * eye
        self.lam = lam

    @functools.cached_property
    def factor(self) -> torch.Tensor | None:
        factor, info = torch.linalg.cholesky_ex(self.matrix)
        return None if bool((info != 0).any()) else factor

    @functools.cached_property
    def inverse(self) -> torch.Tensor:
        return torch.cholesky_inverse(self.factor)

    @functools.cached_property
    def sweep_factor(self) -> torch.Tensor | None:
        """Upper Cholesky factor of the inverse (SparseGPT's), None where it fails."""
        upper, info = torch.linalg.cholesky_ex(self.inverse, upper=True)
        return None if bool((info != 0).any()) else upper


def solve(
    gram: torch.Tensor,
    rhs: torch.Tensor,
    weight: torch.Tensor,
    keep: torch.Tensor,
    lam: torch.Tensor,
    solver: str = "auto",
    budget: int = 256 << 20,
    damped: DampedGram | None = None,
) -> torch.Tensor:
    """Re-solved rows (G, R, D') float64; entries ``keep`` drops are exact zeros.

    gram: (G, D', D') H; rhs: (G, D', R) B; weight: (G, R, D') w0 (the anchor of the damping);
    keep: (G, R, D') bool; lam: (G,) damping; damped: ``DampedGram(gram, lam)`` when several
    masks share it. ``budget`` bounds the bytes of the batched per-row systems held at once.
    """
    damped = damped if damped is not None else DampedGram(gram, lam)
    target = rhs + lam.view(-1, 1, 1) * weight.transpose(1, 2)  # B + lam w0: (G, D', R)
    if solver == "auto":
        solver = _pick_solver(_rows(keep).sum(1), *keep.shape)
    if solver == "sweep" and damped.factor is not None and damped.sweep_factor is not None:
        return torch.stack([_sweep(damped, i, target[i], keep[i]) for i in range(gram.shape[0])])
    return _solve_rows(damped, target, weight, keep, budget)


def nested_solve(
    damped: DampedGram,
    rhs: Callable[[], torch.Tensor],
    weight: torch.Tensor,
    rank: torch.Tensor,
    thresholds: list[int],
    budget: int = 256 << 20,
) -> dict[int, torch.Tensor]:
    """Re-solved rows (G, R, D') float64 by position in ``thresholds``: mask m keeps the
    entries with ``rank >= thresholds[m]``; the rows ``solve``'s ``exact`` would give (the
    same systems; the last bits may differ). Masks ``solve`` would sweep are left out, and all
    of them where one row's system exceeds half the ``budget`` bytes or H + lam I is singular
    (an empty dict): ``solve`` takes those.

    The masks of a row are nested: in decreasing rank its kept entries are a prefix, and the
    Cholesky factor of a matrix's leading block is the leading block of its factor. So one
    factorisation per row of the whole H + lam I in that order serves every mask, with two
    triangular solves each, where ``solve`` factors each mask's own block. Every mask's rows
    come from the same factor and the same operations whichever other masks are solved with
    it, so a profile's levels get the same bits however its work units cut them. rank:
    (G, R, D') int64; rhs: gives (G, D', R) B, called only if something is solved; weight:
    (G, R, D') w0, as in ``solve``. The caller bounds the masks: their rows are held.
    """
    g, r, d = weight.shape
    n = g * r
    per_row = 8 * 4 * d * d  # float64: the gathered matrix, its factor, solver workspace
    if not thresholds or per_row > budget // 2:
        return {}
    ranks, order = torch.sort(_rows(rank), dim=1, descending=True, stable=True)
    bounds = -torch.tensor(thresholds, dtype=ranks.dtype, device=ranks.device)
    kept = torch.searchsorted(-ranks, bounds.expand(n, -1).contiguous(), right=True)  # (n, M)
    picked = [m for m in range(len(thresholds)) if _pick_solver(kept[:, m], g, r, d) == "exact"]
    if not picked:
        return {}
    target = rhs() + damped.lam.view(-1, 1, 1) * weight.transpose(1, 2)  # B + lam w0
    grp = torch.arange(g, device=weight.device).repeat_interleave(r)
    t = _rows(target.transpose(1, 2))
    out = {m: torch.zeros_like(_rows(weight)) for m in picked}
    positions = torch.arange(d, device=weight.device)[None, :]
    step = max(1, budget // 2 // per_row)
    for lo in range(0, n, step):
        rows = slice(lo, lo + step)
        idx = order[rows]  # (n, D'): each row's entries, the last pruned first
        a = damped.matrix[grp[rows][:, None, None], idx[:, :, None], idx[:, None, :]]
        factor, info = torch.linalg.cholesky_ex(a)
        if bool((info != 0).any()):
            return {}
        block = t[rows].gather(1, idx)  # B + lam w0 in that order
        for m in picked:
            prefix = (positions < kept[rows, m, None]).unsqueeze(2)  # the mask's own block
            # past the block: zeroed after the forward solve, then zero after the back one
            y = torch.linalg.solve_triangular(factor, block.unsqueeze(2) * prefix, upper=False)
            w = torch.linalg.solve_triangular(factor.mT, y * prefix, upper=True)
            out[m][rows] = torch.zeros_like(block).scatter(1, idx, (w * prefix).squeeze(2))
    return {m: rows.view(g, r, d) for m, rows in out.items()}


def _pick_solver(kept: torch.Tensor, g: int, r: int, d: int) -> str:
    """``exact`` unless its padded per-row systems (the size ``_solve_rows`` uses) would cost
    more than ``EXACT_COST_FACTOR`` times the sweep. kept: (G * R,) each row's kept count."""
    k = min(int(kept.max()), int((d - kept).max()))
    exact = g * r * k**3 / 3
    sweep = g * (d**3 + r * d**2)
    return "exact" if exact <= EXACT_COST_FACTOR * sweep else "sweep"


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _spd_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x with a x = b for a batch of symmetric positive semi-definite a (n, k, k), b (n, k):
    Cholesky where it succeeds, else the least-norm solution."""
    factor, info = torch.linalg.cholesky_ex(a)
    x = torch.cholesky_solve(b.unsqueeze(2), factor).squeeze(2)
    bad = info != 0
    if bad.any():  # singular (a dead input channel with no damping): least norm
        x[bad] = (torch.linalg.pinv(a[bad], hermitian=True) @ b[bad].unsqueeze(2)).squeeze(2)
    return x


def _with_identity(mat: torch.Tensor, size: int) -> torch.Tensor:
    """(G, d + size, d + size): mat (G, d, d) and, after it, an identity block that
    ``_gathered`` reads for padding (zero against every row and column of mat)."""
    g, d, _ = mat.shape
    out = mat.new_zeros(g, d + size, d + size)
    out[:, :d, :d] = mat
    out[:, d:, d:] = torch.eye(size, dtype=mat.dtype, device=mat.device)
    return out


def _gathered(
    extended: torch.Tensor, grp: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Per row n, mat[grp[n]][idx[n], idx[n]] (n, k, k), padding rows/columns as identity.
    extended: ``_with_identity(mat, k)``; padding position j reads its row/column d + j,
    one gather instead of a masked copy (3x faster, 64 rows of 288 from a 576 Gram)."""
    d = extended.shape[1] - idx.shape[1]
    idx = torch.where(valid, idx, d + torch.arange(idx.shape[1], device=idx.device))
    return extended[grp[:, None, None], idx[:, :, None], idx[:, None, :]]


def _solve_rows(
    damped: DampedGram,
    target: torch.Tensor,
    weight: torch.Tensor,
    keep: torch.Tensor,
    budget: int,
) -> torch.Tensor:
    """Every row's own system, on the kept block or, when fewer are pruned (and H + lam I is
    not singular), the pruned block of the inverse (the same minimiser)."""
    g, r, d = weight.shape
    grp = torch.arange(g, device=weight.device).repeat_interleave(r)
    keep_rows, w0, t = _rows(keep), _rows(weight), _rows(target.transpose(1, 2))
    kept = int(keep_rows.sum(1).max())
    pruned = int((~keep_rows).sum(1).max())
    out = torch.zeros_like(w0)
    p_form = pruned < kept and damped.factor is not None
    if p_form:  # few pruned: constrain the unconstrained optimum on the pruned block
        inverse = damped.inverse  # (G, D', D'), once for every row and mask
        free = _rows(torch.cholesky_solve(target, damped.factor).transpose(1, 2))  # (n, D')
        size, order = pruned, torch.argsort(keep_rows.to(torch.int8), dim=1, stable=True)
    else:
        size = kept
        order = torch.argsort((~keep_rows).to(torch.int8), dim=1, stable=True)
    if size == 0:  # nothing pruned anywhere (P form) or nothing kept (S form)
        return (free if p_form else out).view(g, r, d)
    # float64 per row: the gathered block and its factor (~3 k^2), and the P form's columns
    step = max(1, budget // (8 * (3 * size * size + (size * d if p_form else 0))))
    every = torch.arange(d, device=weight.device)[None, :, None]
    extended = _with_identity(inverse if p_form else damped.matrix, size)
    for lo in range(0, len(w0), step):
        rows = slice(lo, lo + step)
        idx = order[rows, :size]
        count = (~keep_rows[rows] if p_form else keep_rows[rows]).sum(1)
        valid = torch.arange(size, device=idx.device)[None, :] < count[:, None]
        a = _gathered(extended, grp[rows], idx, valid)
        if p_form:
            v = torch.where(valid, free[rows].gather(1, idx), 0.0)
            z = _spd_solve(a, v)  # (n, p)
            cols = inverse[grp[rows][:, None, None], every, idx[:, None]]
            sol = free[rows] - (cols @ z.unsqueeze(2)).squeeze(2)
            out[rows] = torch.where(keep_rows[rows], sol, 0.0)
        else:
            anchor = torch.where(valid, w0[rows].gather(1, idx), 0.0)
            b = torch.where(valid, t[rows].gather(1, idx), 0.0)
            delta = _spd_solve(a, b - (a @ anchor.unsqueeze(2)).squeeze(2))
            values = torch.where(valid, anchor + delta, 0.0)
            out[rows] = torch.zeros_like(out[rows]).scatter(1, idx, values)
    return out.view(g, r, d)


def _sweep(damped: DampedGram, group: int, target: torch.Tensor, keep: torch.Tensor):
    """SparseGPT's column sweep for one group: from the unconstrained optimum, each pruned
    column in turn is zeroed and its error spread over the later columns by the Cholesky
    factor of the inverse. target: (D', R); keep: (R, D') -> (R, D') float64."""
    w = torch.cholesky_solve(target, damped.factor[group]).T.contiguous()  # (R, D') optimum
    upper = damped.sweep_factor[group]
    d = w.shape[1]
    for i1 in range(0, d, SWEEP_BLOCK):
        i2 = min(i1 + SWEEP_BLOCK, d)
        block, errors = w[:, i1:i2].clone(), torch.zeros_like(w[:, i1:i2])
        for i in range(i2 - i1):
            col = block[:, i]
            err = torch.where(keep[:, i1 + i], 0.0, col) / upper[i1 + i, i1 + i]
            block[:, i:] -= err.unsqueeze(1) * upper[i1 + i, i1 + i : i2].unsqueeze(0)
            block[:, i] = torch.where(keep[:, i1 + i], block[:, i], 0.0)
            errors[:, i] = err
        w[:, i1:i2] = block
        w[:, i2:] -= errors @ upper[i1:i2, i2:]
    return torch.where(keep, w, 0.0)
