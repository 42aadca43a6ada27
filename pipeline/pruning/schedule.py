"""Iterative pruning: the paper's CIFAR protocol (and LAMP's) as a schedule of rounds.

Round k removes ``amount`` of the weights still left, so that after it the network's sparsity
is ``1 - (1 - amount) ** k``. Each round

1. takes the current model's logits on the calibration set as the reference (as the paper:
   every round measures distortion against the model it starts from);
2. profiles the current model on a grid of fractions of each layer's *remaining* weights
   (``of_remaining``): the curves are the round's increments, and the grid is as fine near
   100 % sparsity as at the start (a whole-layer grid of 41 levels has one point above
   97.5 %);
3. allocates the round's target with ``allocate.method``, each layer's floor being its current
   sparsity; the baselines apply their rule to the current weights (global magnitude and LAMP
   score the non-zero weights, uniform and ERK densities are of whole layers), so masks only
   grow, as in LAMP's protocol;
4. prunes by magnitude, recovers against the model it started from (repair and / or
   BatchNorm recalibration, the same for every method), and retrains with the masks held
   fixed.

Pure: profiling, recalibration, retraining and evaluation are injected; no I/O.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from pipeline.allocation.methods import NEEDS_CURVES, allocate, spend_slack
from pipeline.allocation.problem import Allocation, Problem
from pipeline.allocation.selection import select_measured
from pipeline.nn.evaluation import output_distortion, predict_logits
from pipeline.nn.layers import prunable_layers, prunable_numel
from pipeline.profiling.distortion import DistortionCurves, sparsity_grid
from pipeline.pruning.masking import apply_masks, magnitude_masks, zero_count
from pipeline.pruning.repair import Recover


def target_sparsity(round_index: int, amount: float) -> float:
    """Sparsity after ``round_index`` rounds that each remove ``amount`` of what is left."""
    return 1 - (1 - amount) ** round_index


def round_key(previous: str, round_index: int, settings: Mapping[str, object]) -> str:
    """Content key of a round: the previous round's key (the first round's: the inputs'
    hash), its index and every setting that changes its result. A stored round is reused
    only under the same key, so a resumed schedule computes what an uninterrupted one would."""
    text = json.dumps([previous, round_index, dict(settings)], sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


def layer_zeros(model: nn.Module, layers: list[str]) -> np.ndarray:
    """(L,) int64 zero weights of each named prunable layer."""
    modules = dict(model.named_modules())
    return np.array([int((modules[n].weight == 0).sum()) for n in layers], dtype=np.int64)


def flat_curves(
    model: nn.Module, levels: int, macs_per_weight: Mapping[str, int]
) -> DistortionCurves:
    """All-zero curves on the grid: what a method that reads no curves is given (it costs no
    profiling; its predicted distortion is not a measurement and is not reported)."""
    numel = prunable_numel(model)
    zeros = np.zeros(levels)
    return DistortionCurves.from_profiles(
        numel, sparsity_grid(levels), [(zeros, zeros)] * len(numel), macs_per_weight
    )


def round_problem(
    model: nn.Module,
    curves: DistortionCurves,
    kind: str,
    targets: Mapping[str, float],
    lo: np.ndarray,
    hi: np.ndarray,
) -> Problem:
    """The round's allocation problem in round coordinates.

    curves: profiled on ``model`` with ``of_remaining`` (``numel``: whole layers); targets:
    measure -> network-level ratio after the round; lo, hi: (L,) the user's limits as whole-
    layer sparsities. The problem's layers hold only their non-zero weights (a layer's floor
    is its current sparsity), its targets and densities stay of whole layers (``base_numel``),
    and global magnitude / LAMP score only the non-zero weights.
    """
    numel = curves.numel
    remaining = numel - layer_zeros(model, curves.layers)
    current = 1 - remaining / numel
    left = np.maximum(remaining / numel, 1e-300)  # a fully pruned layer: any limit is met
    weights = {name: m.weight.detach() for name, m in prunable_layers(model)}
    magnitudes = []
    for name in curves.layers:
        w = weights[name].abs().flatten()
        magnitudes.append(w[w != 0].cpu().numpy())
    return Problem(
        curves=replace(curves, numel=remaining.astype(np.int64)),
        kind=kind,
        targets=dict(targets),
        lo=np.clip((lo - current) / left, 0.0, 1.0),
        hi=np.clip((hi - current) / left, 0.0, 1.0),
        magnitudes=magnitudes,
        shapes=[tuple(weights[n].shape) for n in curves.layers],
        base_numel=numel.astype(np.int64),
    )


def whole_layers(allocation: Allocation, numel: np.ndarray) -> Allocation:
    """A round's allocation restated over whole layers: ``numel`` (L,) and sparsity
    ``1 - kept / numel``; ``level`` stays the round's grid level (of the remaining weights)."""
    return replace(allocation, numel=numel.astype(np.int64), sparsity=1 - allocation.kept / numel)


def round_allocation(method: str, problem: Problem) -> Allocation:
    """``method``'s allocation of a round. Grid methods (rd) get the weights the grid leaves
    unspent back (``spend_slack``), so that every method reaches the round's target sparsity
    exactly and the rounds compare methods at equal sparsity."""
    allocation = allocate(method, problem)
    return spend_slack(problem, allocation) if method in NEEDS_CURVES else allocation


@dataclass(frozen=True)
class RoundSettings:
    """What one round does besides its injected steps."""

    amount: float  # fraction of the remaining budget measure removed per round
    method: str  # ``ALLOCATORS`` name
    kind: str  # which curve rd minimises: mean | max
    measure: str  # what the ratio counts: params | flops
    lo: np.ndarray  # (L,) whole-layer minimum sparsity per layer (user limits)
    hi: np.ndarray  # (L,) whole-layer maximum sparsity
    levels: int  # grid size of the round's curves
    batch_size: int  # calibration images per forward pass
    candidates: tuple[str, ...] = ()  # methods competing with ``method`` by measured distortion


@dataclass(frozen=True)
class RoundResult:
    model: nn.Module  # pruned, recalibrated and retrained, in eval mode
    allocation: Allocation  # over whole layers
    metrics: dict[str, float | int | None]
    seconds: dict[str, float]  # wall time per step: profile, allocate, prune, retrain


def run_round(
    model: nn.Module,
    round_index: int,
    settings: RoundSettings,
    inputs: torch.Tensor,
    *,
    profile: Callable[[nn.Module, torch.Tensor], DistortionCurves],
    macs_per_weight: Mapping[str, int],
    recover: Recover | None,
    retrain: Callable[[nn.Module], None],
    evaluate: Callable[[nn.Module], float],
) -> RoundResult:
    """Round ``round_index`` (1-based) from ``model`` (the previous round's; left unchanged).

    inputs: (N, ...) calibration inputs. profile(model, reference) -> curves of the model
    against ``reference`` (N, classes) on the remaining-weight grid; recover(pruned, start,
    masks) repairs and / or recalibrates BatchNorm after masking (None: off); retrain(model)
    trains in place with its zeros held; evaluate(model) -> test accuracy in [0, 1].
    """
    clock = {"start": time.perf_counter()}

    def lap(step: str) -> None:
        now = time.perf_counter()
        clock[step], clock["start"] = now - clock["start"], now

    start = model
    methods = list(dict.fromkeys([settings.method, *settings.candidates]))
    reference = predict_logits(start, inputs, settings.batch_size)
    if NEEDS_CURVES.intersection(methods):
        curves = profile(start, reference)
    else:
        curves = flat_curves(start, settings.levels, macs_per_weight)
    lap("profile")
    targets = {settings.measure: target_sparsity(round_index, settings.amount)}
    problem = round_problem(start, curves, settings.kind, targets, settings.lo, settings.hi)
    allocations = {m: whole_layers(round_allocation(m, problem), curves.numel) for m in methods}
    selected, measured_by = methods[0], {}
    if len(methods) > 1:
        selected, measured_by = select_measured(
            start, allocations, inputs, reference, settings.batch_size, recover
        )
    allocation = allocations[selected]
    lap("allocate")
    model = copy.deepcopy(start)
    masks = magnitude_masks(model, allocation.kept_by_layer)
    apply_masks(model, masks)
    if recover is not None:
        recover(model, start, masks)
    measured = output_distortion(predict_logits(model, inputs, settings.batch_size), reference)[0]
    before = evaluate(model)
    lap("prune")
    retrain(model)
    model.eval()
    accuracy = evaluate(model)
    lap("retrain")
    zeros, total = zero_count(model)
    metrics = {
        "round": round_index,
        "target_sparsity": targets[settings.measure],
        "sparsity": zeros / total,
        "flops_reduction": allocation.summary()["flops_reduction"],
        "accuracy_before_retrain": before,
        "accuracy": accuracy,
        "measured_distortion": measured,
        "predicted_distortion": allocation.total_predicted if selected in NEEDS_CURVES else None,
        "selected": selected,
        **{f"measured_distortion.{m}": v for m, v in measured_by.items()},
    }
    seconds = {k: clock[k] for k in ("profile", "allocate", "prune", "retrain")}
    return RoundResult(model, allocation, metrics, seconds)
