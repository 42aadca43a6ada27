"""Progressive allocation: reach the target in k steps, re-profiling the partially pruned
model between steps. Each step's sparsities become the next step's floors, so masks only grow
(a magnitude mask of a higher count drops a superset: the zeros are the smallest weights).
k = 1 is the paper's one-shot allocation. Pure: profiling is injected.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace

import numpy as np
from torch import nn

from pipeline.allocation.methods import allocate
from pipeline.allocation.problem import Allocation, Problem
from pipeline.profiling.distortion import DistortionCurves
from pipeline.pruning.masking import apply_masks, magnitude_masks


def step_ratios(ratio: float, steps: int) -> list[float]:
    """Ratios of the k steps: kept fractions fall geometrically, the last step is ``ratio``."""
    return [1 - (1 - ratio) ** (i / steps) for i in range(1, steps)] + [ratio]


def progressive_allocation(
    model: nn.Module,
    problem: Problem,
    method: str,
    steps: int,
    reprofile: Callable[[nn.Module], DistortionCurves],
    recalibrate: Callable[[nn.Module], None] | None = None,
) -> Allocation:
    """Allocate in ``steps`` rounds; ``problem.curves`` serve the first, ``reprofile(model)``
    (the partially pruned model, after ``recalibrate``) each later one. ``reprofile`` should
    measure against the partially pruned model's own outputs, so that a layer left as it is
    costs 0 and the curves hold increments. Every target follows ``step_ratios``. The last
    round's allocation is returned; its predicted distortions are that round's increments."""
    model = copy.deepcopy(model)
    schedules = {m: step_ratios(r, steps) for m, r in problem.targets.items()}
    lo, curves = problem.lo.copy(), problem.curves
    allocation = None
    for i in range(steps):
        if i:
            curves = reprofile(model)
        targets = {m: schedules[m][i] for m in problem.targets}
        allocation = allocate(method, replace(problem, curves=curves, lo=lo, targets=targets))
        kept = allocation.kept_by_layer
        apply_masks(model, magnitude_masks(model, kept))
        if recalibrate is not None:
            recalibrate(model)
        lo = np.maximum(lo, curves.sparsity[allocation.level])  # floors on the grid
    return allocation
