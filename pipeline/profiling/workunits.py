"""Profiling work units: a layer, or a contiguous range of its sparsity levels.

The profile of a large model on many workers only finishes in about total work / workers if
no single unit is much larger than that share. ``plan_units`` therefore estimates each
layer's cost with a MAC count and cuts the costly layers into level ranges. The cut depends
only on the model, the engine and the ``units`` target (a param), never on the cluster: the
same params give the same units, hence the same table bytes, on every backend and cluster
size. Units are returned largest first (longest-processing-time order), so the tail of a
profile is made of small units.

Pure: no I/O, no Ray.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline.nn.device import model_device, resolve_device
from pipeline.profiling.distortion import profile_layer


@dataclass(frozen=True)
class WorkUnit:
    """Levels ``start`` .. ``stop - 1`` of layer ``layer`` (position ``index`` among the
    prunable layers); ``cost``: estimated multiply-accumulates per calibration sample."""

    layer: str
    index: int
    start: int
    stop: int
    cost: float

    def __str__(self) -> str:
        return f"layer {self.layer!r} levels {self.start}-{self.stop - 1}"


def layer_costs(
    numel: Mapping[str, int],
    macs_per_weight: Mapping[str, int],
    engine: str,
    bn_correction: bool,
    check_share: float,
) -> dict[str, tuple[float, float]]:
    """``{layer: (fixed, per_level)}`` estimated MACs per calibration sample of profiling it.

    The prunable layers' MACs stand for the network's (convolutions and linear layers dominate
    it), in ``named_modules()`` order, which is taken as execution order. Fast engine: the
    upstream prefix runs on every batch (twice with BN correction), the suffix from the layer
    on once per level; the self-check (the suffix with the layer's own weight, and the whole
    model) runs on the first batch only, ``check_share`` (batch size / images) of the set.
    Naive engine: one full forward per level (two with BN correction).
    """
    macs = [float(numel[n]) * float(macs_per_weight[n]) for n in numel]
    total = sum(macs)
    costs: dict[str, tuple[float, float]] = {}
    prefix = 0.0
    passes = 2.0 if bn_correction else 1.0
    for name, own in zip(numel, macs, strict=True):
        suffix = total - prefix
        if engine == "naive":
            costs[name] = (0.0, passes * total)
        else:
            # BN correction adds one pass of just the layer per level (its output moments).
            per_level = suffix + (own if bn_correction else 0.0)
            costs[name] = (passes * prefix + check_share * (suffix + total), per_level)
        prefix += own
    return costs


def plan_units(costs: Mapping[str, tuple[float, float]], levels: int, units: int) -> list[WorkUnit]:
    """Cut every layer into level ranges no costlier than about 1/``units`` of the whole
    profile (each range pays the layer's fixed cost again), largest unit first.

    costs: ``layer_costs`` output; levels: grid size K; units: the target count (>= 1). Every
    layer gives at least one unit and at most K. Ties are broken by layer then level, so the
    order is deterministic.
    """
    whole = {name: fixed + per_level * levels for name, (fixed, per_level) in costs.items()}
    cap = sum(whole.values()) / units
    out: list[WorkUnit] = []
    for index, (name, (fixed, per_level)) in enumerate(costs.items()):
        pieces = min(levels, max(1, math.ceil(whole[name] / cap))) if cap > 0 else 1
        bounds = [i * levels // pieces for i in range(pieces + 1)]  # exact integer cut
        for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
            cost = fixed + per_level * (stop - start)
            out.append(WorkUnit(name, index, start, stop, cost))
    return sorted(out, key=lambda u: (-u.cost, u.index, u.start))


def assemble(
    units: Sequence[WorkUnit], results: Sequence[tuple[np.ndarray, np.ndarray]], levels: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per layer (mean, max), each (K,) float64, from the units' results in any order."""
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for unit, (mean, worst) in zip(units, results, strict=True):
        if unit.layer not in curves:
            curves[unit.layer] = (np.full(levels, np.nan), np.full(levels, np.nan))
        curves[unit.layer][0][unit.start : unit.stop] = mean
        curves[unit.layer][1][unit.start : unit.stop] = worst
    return curves


def profile_unit(
    unit: WorkUnit,
    *,
    device: str = "cpu",
    model: nn.Module,
    inputs: torch.Tensor,
    reference: torch.Tensor,
    sparsities: np.ndarray,
    **options,
) -> tuple[np.ndarray, np.ndarray]:
    """``profile_layer`` on the unit's levels, on ``device``: (mean, max), each
    (stop - start,) float64. ``options``: the other ``profile_layer`` keywords."""
    target = resolve_device(device)  # "auto" and "cuda" resolve where the task runs
    if target != model_device(model):
        # a copy: in process (serial backend) the caller's model must stay where it is
        model = copy.deepcopy(model).to(target)
        inputs, reference = inputs.to(target), reference.to(target)
    return profile_layer(
        unit.layer,
        model=model,
        inputs=inputs,
        reference=reference,
        sparsities=sparsities[unit.start : unit.stop],
        **options,
    )
