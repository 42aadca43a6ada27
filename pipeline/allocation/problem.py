"""The allocation problem a budget poses, and an allocation's description.

A ``Problem`` holds the profiled curves, the targets (ratios of weights and/or MACs removed)
and each layer's sparsity limits; an ``Allocation`` holds the kept weights per layer with
the predicted distortion (the profiled curve, linear between grid points for off-grid
allocators) and the network-level summary.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from pipeline.errors import PipelineError
from pipeline.profiling.distortion import DistortionCurves
from pipeline.pruning.masking import pruned_count


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


def predicted_distortion(curves: DistortionCurves, kind: str, kept: np.ndarray) -> np.ndarray:
    """(L,) profiled distortion at ``kept`` weights, linear between grid points (exact on them)."""
    grid_kept, curve = curves.kept(), curves.curve(kind)
    # kept falls along the grid: np.interp needs ascending x
    return np.array(
        [np.interp(k, gk[::-1], d[::-1]) for k, gk, d in zip(kept, grid_kept, curve, strict=True)]
    )


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
