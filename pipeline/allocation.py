"""Layer-wise sparsity allocation: minimise summed distortion under a kept-weight budget.

By the additivity property the network's output distortion is the sum of the per-layer
distortions, so choosing one grid level per layer is a multiple-choice knapsack. ``solve_mckp``
solves it exactly with a dynamic programme over Pareto fronts of (kept weights, distortion):
after each layer only states that no cheaper state beats are kept, and states that cannot
meet the budget are dropped. Memory grows with the front, never with the weight count.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from pipeline.distortion import DistortionCurves
from pipeline.errors import PipelineError


@dataclass(frozen=True)
class Allocation:
    """Chosen grid level per layer. All arrays are (L,) in the curves' layer order."""

    layers: list[str]
    numel: np.ndarray  # int64
    level: np.ndarray  # int64 index into the sparsity grid
    sparsity: np.ndarray  # float64
    kept: np.ndarray  # int64
    predicted_distortion: np.ndarray  # float64, the layer's profiled distortion at its level

    @property
    def total_predicted(self) -> float:
        return float(self.predicted_distortion.sum())

    def check_matches(self, numel: dict[str, int], source: str) -> None:
        """Raise unless the allocation covers exactly these layers with these sizes."""
        own = dict(zip(self.layers, (int(n) for n in self.numel), strict=True))
        if own != numel:
            differ = sorted(set(own.items()) ^ set(numel.items()))
            raise PipelineError(
                f"{source} was made for a different model than the checkpoint "
                f"(first differing layer: {differ[0][0]!r}); re-run the profile stage"
            )


def kept_budget(ratio: float, total: int) -> int:
    """Largest kept-weight count that removes at least ``ratio`` of ``total`` weights.

    Computed on the decimal value of ``ratio`` so that e.g. 0.8 of 100 leaves exactly 20.
    """
    return math.floor((1 - Fraction(repr(float(ratio)))) * total)


def solve_mckp(cost: np.ndarray, value: np.ndarray, budget: int) -> np.ndarray:
    """Exact multiple-choice knapsack: one column per row minimising summed value.

    cost: (L, K) int64 (kept weights), value: (L, K) float64 (distortion), budget: int.
    Returns (L,) int64 column indices with sum(cost) <= budget and minimal sum(value).
    Raises PipelineError when even the cheapest columns exceed the budget.
    """
    cost = np.asarray(cost, dtype=np.int64)
    value = np.asarray(value, dtype=np.float64)
    n_layers, n_levels = cost.shape
    cheapest = cost.min(axis=1)
    if int(cheapest.sum()) > budget:
        raise PipelineError(
            f"budget of {budget} kept weights is infeasible: the sparsest allowed levels keep "
            f"{int(cheapest.sum())}"
        )
    # rest[l]: the fewest weights layers l+1.. can keep; states above budget - rest[l] are dead.
    rest = np.concatenate([np.cumsum(cheapest[::-1])[::-1][1:], [0]]).astype(np.int64)
    front_cost = np.zeros(1, dtype=np.int64)
    front_value = np.zeros(1, dtype=np.float64)
    parents: list[np.ndarray] = []
    for layer in range(n_layers):
        cand_cost = (front_cost[:, None] + cost[layer][None, :]).ravel()
        cand_value = (front_value[:, None] + value[layer][None, :]).ravel()
        alive = np.flatnonzero(cand_cost <= budget - rest[layer])
        order = alive[np.lexsort((cand_value[alive], cand_cost[alive]))]  # by cost, then value
        v = cand_value[order]
        # Pareto filter: keep a state only if it beats every cheaper (or equally cheap) one.
        best_before = np.minimum.accumulate(np.concatenate([[np.inf], v[:-1]]))
        order = order[v < best_before]
        front_cost, front_value = cand_cost[order], cand_value[order]
        parents.append(order)  # flat index = parent_state * n_levels + level
    # The front is sorted by cost with strictly falling value: the last state is optimal.
    choice = np.empty(n_layers, dtype=np.int64)
    state = len(front_cost) - 1
    for layer in range(n_layers - 1, -1, -1):
        flat = int(parents[layer][state])
        state, choice[layer] = divmod(flat, n_levels)
    return choice


def _allocation(curves: DistortionCurves, levels: np.ndarray, kind: str) -> Allocation:
    kept = curves.kept()
    rows = np.arange(len(curves.layers))
    return Allocation(
        layers=list(curves.layers),
        numel=curves.numel.astype(np.int64),
        level=levels.astype(np.int64),
        sparsity=curves.sparsity[levels].astype(np.float64),
        kept=kept[rows, levels],
        predicted_distortion=curves.curve(kind)[rows, levels],
    )


def allocate_rd(curves: DistortionCurves, ratio: float, kind: str) -> Allocation:
    """Xu et al.'s rate-distortion allocation: exact DP over the profiled grid."""
    curves.check()
    total = int(curves.numel.sum())
    budget = kept_budget(ratio, total)
    try:
        levels = solve_mckp(curves.kept(), curves.curve(kind), budget)
    except PipelineError as exc:
        reachable = 1 - curves.kept().min(axis=1).sum() / total
        raise PipelineError(
            f"prune.ratio = {ratio} cannot be met on the profiled grid ({exc}); "
            f"allowed: prune.ratio <= {reachable:.6f}"
        ) from None
    return _allocation(curves, levels, kind)


Allocator = Callable[[DistortionCurves, float, str], Allocation]
ALLOCATORS: dict[str, Allocator] = {"rd": allocate_rd}
