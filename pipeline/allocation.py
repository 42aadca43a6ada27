"""Layer-wise sparsity allocation: the problem, the rate-distortion method and the baselines.

The rate-distortion method (``rd``, Xu et al.) chooses one grid level per layer so that the
summed profiled distortion is least under the budget: a multiple-choice knapsack that
``pipeline.mckp.solve_mckp`` solves exactly. The baselines (uniform, global magnitude, LAMP,
ERK, uniform+) follow their published rules.

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
from pipeline.mckp import solve_mckp


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
    def kept_by_layer(self) -> dict[str, int]:
        """``{layer: kept weights}``, what ``masking.magnitude_masks`` takes."""
        return dict(zip(self.layers, self.kept.tolist(), strict=True))

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
