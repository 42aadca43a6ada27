"""The allocators: the rate-distortion method and the baselines, and the Pareto sweep.

The rate-distortion method (``rd``, Xu et al.) chooses one grid level per layer so that the
summed profiled distortion is least under the budget: a multiple-choice knapsack that
``mckp.solve_mckp`` solves exactly. The baselines (uniform, global magnitude, LAMP, ERK,
uniform+) follow their published rules.

Every allocator returns kept-weight counts per layer; ``allocate`` turns them into an
``Allocation`` with predicted distortion (the profiled curve, linearly interpolated between
grid points for off-grid baselines).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

import numpy as np

from pipeline.allocation.mckp import solve_mckp
from pipeline.allocation.problem import Allocation, Problem, describe
from pipeline.errors import PipelineError


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
