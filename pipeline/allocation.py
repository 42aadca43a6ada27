"""Layer-wise sparsity allocation: the rate-distortion solver and the baselines.

By the additivity property the network's output distortion is the sum of the per-layer
distortions, so choosing one grid level per layer under a budget is a multiple-choice knapsack
(MCKP). ``solve_mckp`` solves it exactly for one or two budgets (kept weights and/or kept
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
keeps a table as long as the kept-weight budget).

Every allocator returns kept-weight counts per layer; ``allocate`` turns them into an
``Allocation`` with predicted distortion (the profiled curve, linearly interpolated between
grid points for off-grid baselines).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction

import numpy as np

from pipeline.distortion import DistortionCurves
from pipeline.errors import PipelineError
from pipeline.masking import pruned_count


# ---------------------------------------------------------------------------- problem
@dataclass(frozen=True)
class Problem:
    """One allocation problem over L profiled layers.

    targets: measure -> ratio removed, e.g. {"params": 0.8} or {"params": 0.8, "flops": 0.5}.
    lo, hi: (L,) float64 min / max sparsity per layer. magnitudes: per layer |w| flattened
    (global, LAMP); shapes: per layer weight shape (ERK).

    base_numel: (L,) int64 layer sizes the targets and the density allocators refer to, when
    the curves cover only part of each layer: in an iterative round the curves' ``numel`` are
    the weights still non-zero, while a ratio and a uniform or ERK density are of whole
    layers. None: the curves' ``numel``.
    """

    curves: DistortionCurves
    kind: str
    targets: Mapping[str, float]
    lo: np.ndarray
    hi: np.ndarray
    magnitudes: Sequence[np.ndarray] | None = None
    shapes: Sequence[tuple[int, ...]] | None = None
    base_numel: np.ndarray | None = None

    @property
    def sizes(self) -> np.ndarray:
        """(L,) int64 whole-layer sizes: ``base_numel``, else the curves' ``numel``."""
        return self.curves.numel if self.base_numel is None else self.base_numel

    @property
    def unit_costs(self) -> dict[str, np.ndarray]:
        """measure -> (L,) int64 cost of keeping one weight of each layer."""
        c = self.curves
        return {"params": np.ones(len(c.layers), dtype=np.int64), "flops": c.macs_per_weight}

    def budgets(self) -> dict[str, int]:
        """measure -> the largest kept amount that meets the target."""
        unit = self.unit_costs
        return {
            m: kept_budget(r, int((unit[m] * self.sizes).sum())) for m, r in self.targets.items()
        }

    def kept_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(L,) fewest and most weights each layer may keep under its sparsity limits."""
        n = self.curves.numel
        fewest = np.array(
            [k - pruned_count(int(k), float(h)) for k, h in zip(n, self.hi, strict=True)]
        )
        most = np.array(
            [k - pruned_count(int(k), float(lo)) for k, lo in zip(n, self.lo, strict=True)]
        )
        return fewest.astype(np.int64), most.astype(np.int64)


def kept_budget(ratio: float, total: int) -> int:
    """Largest kept amount that removes at least ``ratio`` of ``total``.

    Computed on the decimal value of ``ratio`` so that e.g. 0.8 of 100 leaves exactly 20.
    """
    return math.floor((1 - Fraction(repr(float(ratio)))) * total)


def layer_bounds(
    layers: Sequence[str], limits: Mapping[str, Sequence[float]], exclude: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) sparsity per layer from glob patterns over layer names.

    limits: pattern -> [min_sparsity, max_sparsity]; exclude: patterns kept dense. Several
    matching patterns intersect. A pattern that matches no layer is an error (a typo would
    otherwise silently do nothing).
    """
    lo, hi = np.zeros(len(layers)), np.ones(len(layers))
    rules = [(p, tuple(v), f"allocate.limits[{p!r}]") for p, v in limits.items()]
    rules += [(p, (0.0, 0.0), f"allocate.exclude {p!r}") for p in exclude]
    for pattern, bounds, key in rules:
        if len(bounds) != 2 or not 0 <= bounds[0] <= bounds[1] <= 1:
            raise PipelineError(
                f"{key} = {list(bounds)} is not allowed; "
                "allowed: [min, max] with 0 <= min <= max <= 1"
            )
        hits = [i for i, name in enumerate(layers) if fnmatch.fnmatchcase(name, pattern)]
        if not hits:
            shown = ", ".join(layers[:6]) + (" …" if len(layers) > 6 else "")
            raise PipelineError(
                f"{key} matches no layer; allowed: glob patterns over layer names ({shown})"
            )
        lo[hits] = np.maximum(lo[hits], bounds[0])
        hi[hits] = np.minimum(hi[hits], bounds[1])
    for i in np.flatnonzero(lo > hi):
        raise PipelineError(
            f"sparsity limits of layer {layers[i]!r} contradict: min {lo[i]} > max {hi[i]}"
        )
    return lo, hi


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


# ---------------------------------------------------------------------------- allocators
@dataclass(frozen=True)
class Allocation:
    """Kept weights per layer. All arrays are (L,) in the curves' layer order."""

    layers: list[str]
    numel: np.ndarray  # int64
    level: np.ndarray  # int64 nearest grid level
    sparsity: np.ndarray  # float64, 1 - kept / numel
    kept: np.ndarray  # int64
    macs_per_weight: np.ndarray  # int64 multiply-accumulates per kept weight and sample
    predicted_distortion: np.ndarray  # float64 profiled (interpolated off the grid)
    lower_bound: float = float("nan")  # certified bound on the optimum (rd only)

    @property
    def total_predicted(self) -> float:
        return float(self.predicted_distortion.sum())

    @property
    def flops(self) -> np.ndarray:
        """(L,) int64 kept multiply-accumulates per sample."""
        return self.kept * self.macs_per_weight

    def summary(self) -> dict[str, float]:
        """Network-level metrics; fractions in [0, 1]. The bound and the optimality gap only
        where the allocator certifies one."""
        out = {
            "sparsity": 1 - int(self.kept.sum()) / int(self.numel.sum()),
            "flops_reduction": 1
            - int(self.flops.sum()) / max(int((self.numel * self.macs_per_weight).sum()), 1),
            "kept": int(self.kept.sum()),
            "predicted_distortion": self.total_predicted,
        }
        if math.isfinite(self.lower_bound):
            out["lower_bound"] = self.lower_bound
            gap = (self.total_predicted - self.lower_bound) / max(abs(self.total_predicted), 1e-300)
            out["gap"] = max(gap, 0.0)  # summation order can leave -1e-16
        return out

    def check_matches(self, numel: Mapping[str, int], source: str) -> None:
        """Raise unless the allocation covers exactly these layers with these sizes."""
        check_same_layers(self.layers, self.numel, numel, source)


def check_same_layers(
    layers: Sequence[str], numel: Sequence[int], expected: Mapping[str, int], source: str
) -> None:
    """Raise unless ``source`` (a table of ``layers`` with ``numel`` weights each) covers
    exactly the layers of ``expected`` (the model's ``{name: weights}``), in the same order."""
    theirs = dict(zip(layers, (int(n) for n in numel), strict=True))
    if list(theirs.items()) != list(expected.items()):
        first = next(
            (n for n in [*expected, *theirs] if expected.get(n) != theirs.get(n)),
            next(iter(theirs), ""),
        )
        raise PipelineError(
            f"{source} was made for a different model than the checkpoint (first differing "
            f"layer: {first!r}: {theirs.get(first)} vs {expected.get(first)} weights); re-run "
            "the profile stage"
        )


def _rd(problem: Problem) -> tuple[np.ndarray, float]:
    """Xu et al.'s rate-distortion allocation: the exact MCKP over the profiled grid."""
    curves = problem.curves
    kept = curves.kept()
    sparsity = curves.sparsity[None, :]
    tol = 1e-12
    allowed = (sparsity >= problem.lo[:, None] - tol) & (sparsity <= problem.hi[:, None] + tol)
    for i in np.flatnonzero(~allowed.any(axis=1)):
        raise PipelineError(
            f"no grid level of layer {curves.layers[i]!r} lies in its limits "
            f"[{problem.lo[i]}, {problem.hi[i]}]; allowed: limits that contain a grid point"
        )
    value = np.where(allowed, curves.curve(problem.kind), np.inf)
    unit = problem.unit_costs
    measures = list(problem.targets)
    costs = np.stack([kept * unit[m][:, None] for m in measures])
    budgets = problem.budgets()
    solution = solve_mckp(costs, value, np.array([budgets[m] for m in measures]))
    return kept[np.arange(len(kept)), solution.choice], solution.lower_bound


def _cost(problem: Problem, kept: np.ndarray) -> dict[str, int]:
    unit = problem.unit_costs
    return {m: int((kept * unit[m]).sum()) for m in problem.targets}


def _fits(problem: Problem, kept: np.ndarray, budgets: Mapping[str, int]) -> bool:
    return all(v <= budgets[m] for m, v in _cost(problem, kept).items())


def _largest_fitting(
    problem: Problem, kept_at: Callable[[float], np.ndarray], x_max: float
) -> np.ndarray:
    """kept_at(x) grows with x in [0, x_max]: the kept counts of the largest x that fits."""
    budgets = problem.budgets()
    if _fits(problem, kept_at(x_max), budgets):
        return kept_at(x_max)
    lo, hi = 0.0, x_max
    if not _fits(problem, kept_at(lo), budgets):
        raise PipelineError(
            "the targets cannot be met within the per-layer limits; allowed: looser limits"
        )
    for _ in range(100):  # bisection to float resolution
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if _fits(problem, kept_at(mid), budgets) else (lo, mid)
    return kept_at(lo)


def _density_allocator(
    density: Callable[[Problem, float], np.ndarray], x_max: Callable[[Problem], float]
):
    """An allocator that scales per-layer densities (kept fractions) until the budget fits."""

    def run(problem: Problem) -> tuple[np.ndarray, float]:
        fewest, most = problem.kept_bounds()
        numel = problem.sizes  # densities are of whole layers; masks only grow (``most``)

        def kept_at(x: float) -> np.ndarray:
            d = np.clip(density(problem, x), 0.0, 1.0)
            return np.clip(np.floor(d * numel).astype(np.int64), fewest, most)

        return _largest_fitting(problem, kept_at, x_max(problem)), float("nan")

    return run


def _erk_scores(problem: Problem) -> np.ndarray:
    """Erdős–Rényi-Kernel density scale per layer: sum(shape) / prod(shape)."""
    if problem.shapes is None:
        raise PipelineError("allocate.method = 'erk' needs the weight shapes of the model")
    return np.array([sum(s) / math.prod(s) for s in problem.shapes], dtype=np.float64)


def _uniform_plus_density(problem: Problem, x: float) -> np.ndarray:
    """Gale et al.: the first layer stays dense, the last keeps at least 20 %."""
    d = np.full(len(problem.curves.layers), x)
    d[0] = 1.0
    d[-1] = max(x, 0.2)
    return d


def _score_allocator(scores: Callable[[np.ndarray], np.ndarray]):
    """Keep the weights with the highest scores network-wide (one global threshold).

    scores maps a layer's magnitudes sorted ascending to scores, non-decreasing along them.
    Per-layer limits force the lowest / highest weights of a layer out / in.
    """

    def run(problem: Problem) -> tuple[np.ndarray, float]:
        if problem.magnitudes is None:
            raise PipelineError("score-based allocation needs the weights of the model")
        fewest, most = problem.kept_bounds()
        sorted_scores = []
        for mags, f, m in zip(problem.magnitudes, fewest, most, strict=True):
            s = np.maximum.accumulate(scores(np.sort(np.asarray(mags, dtype=np.float64))))
            s[: len(s) - m] = -np.inf  # forced out by min sparsity
            s[len(s) - f :] = np.inf  # forced in by max sparsity
            sorted_scores.append(s)
        finite = np.concatenate([s[np.isfinite(s)] for s in sorted_scores] + [np.zeros(1)])
        top = float(finite.max())

        def kept_at(x: float) -> np.ndarray:  # x in [0, 1]: threshold falls from above top to 0
            t = (1 - x) * (top * 2 + 1)
            return np.array(
                [len(s) - np.searchsorted(s, t, side="left") for s in sorted_scores], dtype=np.int64
            )

        return _largest_fitting(problem, kept_at, 1.0), float("nan")

    return run


def _lamp_scores(sorted_magnitudes: np.ndarray) -> np.ndarray:
    """LAMP (Lee et al., ICLR 2021): w_u^2 / sum of w_v^2 over weights at least as large."""
    sq = sorted_magnitudes**2
    tail = np.cumsum(sq[::-1])[::-1]
    return np.divide(sq, tail, out=np.zeros_like(sq), where=tail > 0)


Allocator = Callable[[Problem], tuple[np.ndarray, float]]
ALLOCATORS: dict[str, Allocator] = {
    "rd": _rd,
    "uniform": _density_allocator(lambda p, x: np.full(len(p.curves.layers), x), lambda p: 1.0),
    "uniform_plus": _density_allocator(_uniform_plus_density, lambda p: 1.0),
    "erk": _density_allocator(
        lambda p, x: x * _erk_scores(p), lambda p: 1.0 / _erk_scores(p).min()
    ),
    "global": _score_allocator(lambda m: m),
    "lamp": _score_allocator(_lamp_scores),
}
NEEDS_CURVES = frozenset({"rd"})  # the methods that read the profiled curves


def predicted_distortion(curves: DistortionCurves, kind: str, kept: np.ndarray) -> np.ndarray:
    """(L,) profiled distortion at ``kept`` weights, linear between grid points (exact on them)."""
    grid_kept, curve = curves.kept(), curves.curve(kind)
    # kept falls along the grid: np.interp needs ascending x
    return np.array(
        [np.interp(k, gk[::-1], d[::-1]) for k, gk, d in zip(kept, grid_kept, curve, strict=True)]
    )


def allocate(method: str, problem: Problem) -> Allocation:
    """Run allocator ``method`` and describe its result."""
    if method not in ALLOCATORS:
        raise PipelineError(
            f"allocate.method = {method!r} is unknown; allowed: {', '.join(sorted(ALLOCATORS))}"
        )
    curves = problem.curves
    curves.check()
    try:
        kept, lower = ALLOCATORS[method](problem)
    except PipelineError as exc:
        targets = ", ".join(f"{m} ratio {r}" for m, r in problem.targets.items())
        raise PipelineError(
            f"cannot meet {targets} with allocate.method = {method!r}: {exc}"
        ) from None
    return describe(problem, kept, lower)


def describe(problem: Problem, kept: np.ndarray, lower: float = float("nan")) -> Allocation:
    """The ``Allocation`` of ``kept`` (L,) weights per layer on ``problem``'s curves."""
    curves = problem.curves
    kept = kept.astype(np.int64)
    sparsity = 1 - kept / np.maximum(curves.numel, 1)  # a layer with no weights left: 1
    return Allocation(
        layers=list(curves.layers),
        numel=curves.numel.astype(np.int64),
        level=np.abs(sparsity[:, None] - curves.sparsity[None, :]).argmin(axis=1).astype(np.int64),
        sparsity=sparsity,
        kept=kept,
        macs_per_weight=curves.macs_per_weight.astype(np.int64),
        predicted_distortion=predicted_distortion(curves, problem.kind, kept),
        lower_bound=lower,
    )


def spend_slack(problem: Problem, allocation: Allocation) -> Allocation:
    """Give back the weights a grid allocation leaves unspent under a single budget.

    A grid solution keeps up to one level's worth of weights fewer than the budget allows.
    Repeatedly, the layer whose profiled curve (linear between grid points, as
    ``predicted_distortion``) falls most per unit of cost towards its next denser grid point
    gets weights back, until the budget is met exactly or every layer is at its limit. The
    predicted distortion never rises, and the sparsity reached is the target's. Two budgets:
    returned unchanged.
    """
    if len(problem.targets) != 1:
        return allocation
    (measure,) = problem.targets
    unit = problem.unit_costs[measure]
    slack = problem.budgets()[measure] - int((allocation.kept * unit).sum())
    grid_kept, curve = problem.curves.kept(), problem.curves.curve(problem.kind)
    _, most = problem.kept_bounds()
    kept = allocation.kept.copy()

    def at(layer: int, k: float) -> float:
        return float(np.interp(k, grid_kept[layer][::-1], curve[layer][::-1]))

    while slack > 0:
        best = None  # (fall per unit of cost, layer, kept count to move to)
        for i in range(len(kept)):
            denser = grid_kept[i][grid_kept[i] > kept[i]]
            if kept[i] >= most[i] or unit[i] > slack or not len(denser):
                continue
            to = min(int(denser.min()), int(most[i]))
            fall = (at(i, kept[i]) - at(i, to)) / ((to - kept[i]) * unit[i])
            if best is None or fall > best[0]:
                best = (fall, i, to)
        if best is None:
            break
        _, i, to = best
        add = min(to - int(kept[i]), slack // int(unit[i]))
        kept[i] += add
        slack -= add * int(unit[i])
    return describe(problem, kept)  # the grid optimum's bound no longer applies


def pareto_front(
    method: str, problem: Problem, ratios: Sequence[float]
) -> tuple[list[tuple[float, Allocation]], list[float]]:
    """(front, infeasible): allocations for the ratios of the sweep that can be met, and the
    ratios that cannot (limits or exclusions keep too much). The sweep replaces the first
    target's ratio."""
    primary = next(iter(problem.targets))
    front, infeasible = [], []
    for r in ratios:
        try:
            front.append(
                (r, allocate(method, replace(problem, targets={**problem.targets, primary: r})))
            )
        except PipelineError:
            infeasible.append(r)
    return front, infeasible
