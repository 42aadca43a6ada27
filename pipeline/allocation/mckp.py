"""The exact multiple-choice knapsack (MCKP) solver behind rate-distortion allocation.

By the additivity property the network's output distortion is the sum of the per-layer
distortions, so choosing one grid level per layer under a budget is a multiple-choice knapsack.
``solve_mckp`` solves it exactly for one or two budgets (kept weights and/or kept
multiply-accumulates):

1. The LP relaxation gives Lagrange multipliers lambda >= 0. For any such lambda,
   g(lambda) = sum_l min_k (D_lk + lambda . c_lk) - lambda . B is a certified lower bound.
2. A dynamic programme over layers keeps partial solutions (states). A state whose Lagrangian
   completion bound exceeds a threshold is dropped, as is a state another state dominates (no
   more cost in any budget, no more distortion). The bound never decreases along a path and
   ends at or below the path's distortion, so every solution at or below the threshold
   survives. If the best survivor is at or below the threshold it is the optimum. Otherwise
   the threshold grows geometrically (capped by the best solution seen, with which a pass
   must succeed), so the states kept stay near the optimum.

Memory and time grow with the surviving states, never with the weight count (the paper's DP
keeps a table as long as the kept-weight budget). Pure: numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from pipeline.errors import PipelineError


# ---------------------------------------------------------------------------- exact solver
@dataclass(frozen=True)
class Solution:
    choice: np.ndarray  # (L,) int64 column per row
    objective: float  # sum of chosen values
    lower_bound: float  # certified: no feasible choice is smaller (= objective when proven optimal)
    peak_states: int  # most DP states kept after a layer, over all passes
    passes: int  # DP passes (single-budget solves for two budgets)


_BIG = np.iinfo(np.int64).max // 4


def _cheapest(costs: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """(M, L) least cost of each layer over its allowed levels."""
    return np.where(allowed[None], costs, _BIG).min(axis=2)


def _dual_one_budget(cost: np.ndarray, value: np.ndarray, budget: int) -> float:
    """The multiplier maximising g(lam) = sum_l min_k (D_lk + lam c_lk) - lam B (concave in lam).

    Bisection on the subgradient (cost of the per-layer minimisers minus B), which falls with
    lam; ~100 evaluations of an (L, K) array, a few milliseconds.
    """
    rows = np.arange(cost.shape[0])

    def used(lam: float) -> int:
        return int(cost[rows, np.argmin(value + lam * cost, axis=1)].sum())

    if used(0.0) <= budget:
        return 0.0
    hi = 1e-15
    while used(hi) > budget and hi < 1e300:
        hi *= 4
    lo = hi / 4 if hi > 1e-15 else 0.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if used(mid) > budget else (lo, mid)

    def g(lam: float) -> float:
        return float((value + lam * cost).min(axis=1).sum() - lam * budget)

    return lo if g(lo) > g(hi) else hi


def _lagrange_multipliers(costs: np.ndarray, value: np.ndarray, budgets: np.ndarray) -> np.ndarray:
    """Multipliers (M,) >= 0 of the budgets in the LP relaxation; zeros if the LP fails.

    Any lambda >= 0 gives a valid bound, so LP inaccuracy can only weaken pruning.
    """
    from scipy.optimize import linprog
    from scipy.sparse import csr_matrix

    rows, cols = np.nonzero(np.isfinite(value))
    n = len(rows)
    v_scale = max(float(np.abs(value[rows, cols]).max(initial=0.0)), 1e-300)
    b_scale = np.maximum(budgets.astype(np.float64), 1.0)
    a_ub = np.stack([costs[m][rows, cols] / b_scale[m] for m in range(len(budgets))])
    a_eq = csr_matrix((np.ones(n), (rows, np.arange(n))), shape=(value.shape[0], n))
    res = linprog(
        value[rows, cols] / v_scale,
        A_ub=a_ub,
        b_ub=budgets / b_scale,
        A_eq=a_eq,
        b_eq=np.ones(value.shape[0]),
        bounds=(0, 1),
        method="highs",
    )
    if res.status != 0:
        return np.zeros(len(budgets))
    return np.maximum(-np.asarray(res.ineqlin.marginals) * v_scale / b_scale, 0.0)


def _dominance_filter(cost: np.ndarray, val: np.ndarray) -> np.ndarray:
    """Indices of states not dominated by another (cost (S, M) no larger, value no larger)."""
    if cost.shape[1] == 1:
        order = np.lexsort((val, cost[:, 0]))  # by cost, then value
        v = val[order]
        best_before = np.minimum.accumulate(np.concatenate([[np.inf], v[:-1]]))
        return order[v < best_before]
    # Two budgets: sorted by (c1, c2, value), a state is dominated by any earlier state with
    # c2 no larger and value no larger. Checked against a staircase of c2 buckets: a
    # conservative filter (it may keep a dominated state, never drops a non-dominated one).
    order = np.lexsort((val, cost[:, 1], cost[:, 0]))
    c, v = cost[order], val[order]
    same = np.concatenate([[False], (c[1:] == c[:-1]).all(axis=1)])
    keep = ~same  # equal costs: the first (lowest value) wins
    edges = np.unique(np.quantile(c[:, 1], np.linspace(0, 1, 33)[1:-1]))
    bucket = np.searchsorted(edges, c[:, 1], side="right")
    for b in range(len(edges) + 1):
        below = np.where(bucket < b, v, np.inf)  # states of lower buckets have a smaller c2
        best_before = np.minimum.accumulate(np.concatenate([[np.inf], below[:-1]]))
        keep &= ~((bucket == b) & (best_before <= v))
    return order[keep]


class _TooManyStates(Exception):
    pass


def _bounded_dp(
    costs: np.ndarray,
    value: np.ndarray,
    reduced: np.ndarray,
    budgets: np.ndarray,
    lam_budget: float,
    threshold: float,
    max_states: int = _BIG,
) -> tuple[np.ndarray, float, int] | None:
    """One DP pass keeping states whose completion bound <= threshold; None if none survive.

    costs (M, L, K), value (L, K) with inf = forbidden, reduced = value + lam . costs.
    """
    n_measures, n_layers, _ = costs.shape
    allowed = np.isfinite(value)
    cheapest = _cheapest(costs, allowed)
    rest = np.concatenate(
        [np.cumsum(cheapest[:, ::-1], axis=1)[:, ::-1][:, 1:], np.zeros((n_measures, 1), np.int64)],
        axis=1,
    )
    rmin = reduced.min(axis=1)
    after = np.concatenate([np.cumsum(rmin[::-1])[::-1][1:], [0.0]])  # best reduced cost of l+1..
    st_cost = np.zeros((1, n_measures), dtype=np.int64)
    st_val = np.zeros(1)
    st_red = np.zeros(1)
    back: list[tuple[np.ndarray, np.ndarray]] = []
    peak = 1
    for layer in range(n_layers):
        cap_cost = budgets - rest[:, layer]
        cap_red = threshold + lam_budget - after[layer]
        parts = []
        for k in np.flatnonzero(allowed[layer]):
            c = st_cost + costs[:, layer, k]
            r = st_red + reduced[layer, k]
            idx = np.flatnonzero((c <= cap_cost).all(axis=1) & (r <= cap_red))
            if len(idx):
                parts.append(
                    (c[idx], st_val[idx] + value[layer, k], r[idx], idx, np.full(len(idx), k))
                )
        if not parts:
            return None
        c, v, r, parent, level = (np.concatenate(p) for p in zip(*parts, strict=True))
        if len(v) > 8 * max_states:
            raise _TooManyStates
        keep = _dominance_filter(c, v)
        if len(keep) > max_states:
            raise _TooManyStates
        st_cost, st_val, st_red = c[keep], v[keep], r[keep]
        back.append((parent[keep], level[keep]))
        peak = max(peak, len(keep))
    state = int(np.argmin(st_val))
    best = float(st_val[state])
    choice = np.empty(n_layers, dtype=np.int64)
    for layer in range(n_layers - 1, -1, -1):
        parent, level = back[layer]
        choice[layer] = level[state]
        state = int(parent[state])
    return choice, best, peak


def _deepening(
    costs: np.ndarray,
    value: np.ndarray,
    budgets: np.ndarray,
    lam: np.ndarray,
    max_states: int = _BIG,
    upper: float = np.inf,
    known_lower: float = -np.inf,
) -> Solution:
    """Exact optimum by bounded DP passes with geometrically growing thresholds.

    Thresholds start at the Lagrangian bound for ``lam`` (or ``known_lower`` if larger) and
    grow by 8x, capped by the best solution seen (``upper`` at first), with which a pass must
    succeed. Raises
    _TooManyStates past ``max_states`` and PipelineError when nothing is feasible.
    """
    allowed = np.isfinite(value)
    reduced = value + np.tensordot(lam, costs, axes=1)
    lam_budget = float(lam @ budgets)
    lower = float(reduced.min(axis=1).sum() - lam_budget)
    scale = abs(lower) + lam_budget + float(np.abs(value[allowed]).max()) + 1e-300
    eps = 1e-9 * scale  # float slack: summation order must never prune the optimum
    lower = max(lower, known_lower)
    delta, peak = 1e-7 * scale, 0
    for passes in range(1, 64):
        threshold = min(upper, lower + delta)
        found = _bounded_dp(costs, value, reduced, budgets, lam_budget, threshold + eps, max_states)
        if found is not None:
            peak = max(peak, found[2])
            if found[1] <= threshold + eps:
                return Solution(found[0], found[1], found[1], peak, passes)
            upper = min(upper, found[1])
        elif np.isinf(threshold):
            break  # every feasible state was kept and none exists
        delta = delta * 8 if delta < 1e3 * scale else np.inf
    raise PipelineError(
        "no allocation meets every budget at once; allowed: looser budgets or limits"
    )


def _two_budgets(costs: np.ndarray, value: np.ndarray, budgets: np.ndarray, tol: float) -> Solution:
    """Relax the second budget with a multiplier mu and solve the rest exactly.

    L(mu) = min over choices within budget 1 of (D + mu c2) - mu B2 is a certified lower
    bound for every mu >= 0, far tighter than the LP's; minimisers that also meet budget 2 are
    feasible. mu is bisected on the sign of c2 - B2 until the gap is at most ``tol``
    (relative). If it stays larger, an exact two-budget DP capped by the best solution closes
    it, unless it grows beyond a memory guard; then the certified gap is what is returned.
    """
    rows = np.arange(value.shape[0])
    best: tuple[float, np.ndarray] | None = None
    lower, passes, peak = -np.inf, 0, 0

    def inner(mu: float) -> int:
        nonlocal best, lower, passes, peak
        sol = _deepening(
            costs[:1],
            value + mu * costs[1],
            budgets[:1],
            np.array([_dual_one_budget(costs[0], value + mu * costs[1], int(budgets[0]))]),
        )
        passes, peak = passes + sol.passes, max(peak, sol.peak_states)
        c2 = int(costs[1][rows, sol.choice].sum())
        lower = max(lower, sol.objective - mu * float(budgets[1]))
        if c2 <= budgets[1]:
            v = float(value[rows, sol.choice].sum())
            if best is None or v < best[0]:
                best = (v, sol.choice)
        return c2

    def gap_closed() -> bool:
        return best is not None and best[0] - lower <= tol * max(abs(best[0]), 1e-300)

    if inner(0.0) > budgets[1]:
        lo, hi = 0.0, max(float(_lagrange_multipliers(costs, value, budgets)[1]), 1e-300)
        while inner(hi) > budgets[1]:
            lo, hi = hi, hi * 4
        for _ in range(24):  # past this the exact two-budget DP below is the cheaper way
            if gap_closed() or hi - lo <= 1e-12 * hi:
                break
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if inner(mid) > budgets[1] else (lo, mid)
    assert best is not None  # inner(hi) met budget 2
    if not gap_closed():
        lam = _lagrange_multipliers(costs, value, budgets)
        try:
            exact = _deepening(
                costs, value, budgets, lam, max_states=1_000_000, upper=best[0], known_lower=lower
            )
            return replace(
                exact, passes=passes + exact.passes, peak_states=max(peak, exact.peak_states)
            )
        except _TooManyStates:
            pass  # keep the certified gap
    objective, choice = best
    return Solution(choice, objective, min(lower, objective), peak, passes)


def solve_mckp(
    costs: np.ndarray, value: np.ndarray, budgets: np.ndarray | Sequence[int], tol: float = 1e-4
) -> Solution:
    """Multiple-choice knapsack with one or two budgets: one column per row, least summed value.

    costs: (M, L, K) int64 (or (L, K) for M = 1); value: (L, K) float64 where +inf marks a
    forbidden column; budgets: (M,) int. One budget: the exact optimum. Two budgets: the exact
    optimum, or a feasible choice whose certified relative gap to the optimum is at most
    ``tol`` (see ``Solution.lower_bound``). Raises PipelineError when no choice meets every
    budget.
    """
    costs = np.asarray(costs, dtype=np.int64)
    costs = costs[None] if costs.ndim == 2 else costs
    value = np.asarray(value, dtype=np.float64)
    budgets = np.asarray(budgets, dtype=np.int64).reshape(-1)
    allowed = np.isfinite(value)
    if not allowed.any(axis=1).all():
        raise PipelineError(f"layer {int(np.argmin(allowed.any(axis=1)))} has no allowed level")
    cheapest = _cheapest(costs, allowed).sum(axis=1)
    for m in np.flatnonzero(cheapest > budgets):
        what = f" (budget {m + 1} of {len(budgets)})" if len(budgets) > 1 else ""
        raise PipelineError(
            f"keeping at most {budgets[m]}{what} is infeasible: the sparsest levels the limits "
            f"allow keep {cheapest[m]}; allowed: a lower ratio, or looser allocate.limits / "
            "allocate.exclude"
        )
    if len(budgets) == 1:
        return _deepening(
            costs, value, budgets, np.array([_dual_one_budget(costs[0], value, int(budgets[0]))])
        )
    if len(budgets) == 2:
        return _two_budgets(costs, value, budgets, tol)
    raise PipelineError(f"{len(budgets)} budgets are not supported; allowed: 1 or 2")
