"""Refining an allocation on a measured joint objective (goes beyond Xu et al.).

The rate-distortion DP minimises a *sum* of single-layer curves. At high sparsity the summed
prediction and the network's real joint error part ways (BatchNorm recalibration repairs some
layers' damage better than their curves say, other damage compounds). ``refine`` starts from
an allocation (the DP optimum) and moves budget between layers by pairwise exchanges on the
profiling grid: one layer prunes ``d`` more grid steps, another gets back as many steps as the
freed weights (and any slack under the budget) pay for. Each candidate is measured: the model
is pruned, its BatchNorms recalibrated on the *fit* part of the calibration set, and an
objective from ``OBJECTIVES`` is measured on the fit part and on a held-out part. A move is
accepted only when it lowers the objective on the fit part without raising it on the held-out
part, so neither measured value ever rises. Candidates are tried in the order of their
predicted (summed-curve) change, first improvement wins, and the search stops when a full pass
finds none or after ``max_evals`` measurements. With no improving move the start is returned
unchanged. Deterministic: no randomness beyond the seeded fit / held-out split.

Pure: no I/O.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from pipeline.allocation.problem import Allocation, Problem, predicted_distortion
from pipeline.errors import PipelineError
from pipeline.nn.evaluation import per_sample_distortion
from pipeline.pruning.batchnorm import (
    BN_RULES,
    ChannelMoments,
    Moments,
    batchnorms,
    set_running_stats,
)
from pipeline.pruning.masking import apply_masks, magnitude_masks


# ---------------------------------------------------------------------------- objectives
def _mse(logits: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean per-sample logit MSE against the dense model (the DP's own distortion)."""
    return float(per_sample_distortion(logits, reference).mean())


def _ce(logits: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor) -> float:
    """Increase in mean cross-entropy on the labels over the dense model's."""
    ce = torch.nn.functional.cross_entropy
    return float(ce(logits.double(), labels) - ce(reference.double(), labels))


def _kl(logits: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean KL divergence of the pruned model's softmax from the dense model's."""
    p = torch.log_softmax(reference.double(), 1)
    q = torch.log_softmax(logits.double(), 1)
    return float((p.exp() * (p - q)).sum(1).mean())


Objective = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], float]
OBJECTIVES: dict[str, Objective] = {"mse": _mse, "ce": _ce, "kl": _kl}


# ---------------------------------------------------------------------------- search
@dataclass(frozen=True)
class RefineResult:
    level: np.ndarray  # (L,) int64 chosen grid level per layer
    start: tuple[float, float]  # (fit, held-out) objective of the starting allocation
    end: tuple[float, float]  # (fit, held-out) objective of the result
    evaluations: int  # measurements made (the start included)
    accepted: int  # moves accepted


def exchange_moves(
    level: np.ndarray,
    costs: np.ndarray,
    budgets: np.ndarray,
    allowed: np.ndarray,
    value: np.ndarray,
    steps: Sequence[int],
) -> list[tuple[float, int, int, int, int]]:
    """Every pairwise exchange from ``level`` that meets the budgets, sorted by predicted
    change: (predicted change, layer pruned, its new level, layer given back, its new level).

    costs: (M, L, K) int64 amount kept per measure, falling with the level; budgets: (M,);
    allowed: (L, K) bool; value: (L, K) predicted distortion. Layer i moves ``d`` levels up
    (sparser) for d in ``steps``; layer j moves down (denser) by the most levels the freed
    amount and the slack pay for in every measure (at least one).
    """
    rows = np.arange(len(level))
    used = costs[:, rows, level].sum(axis=1)
    k_max = costs.shape[2] - 1
    moves = []
    for i in rows:
        for d in steps:
            li = int(level[i]) + d
            if li > k_max or not allowed[i, li]:
                continue
            room = budgets - used + costs[:, i, level[i]] - costs[:, i, li]  # (M,)
            for j in rows:
                if j == i:
                    continue
                best = None
                for lj in range(int(level[j]) - 1, -1, -1):
                    if not allowed[j, lj]:
                        continue
                    if np.all(costs[:, j, lj] - costs[:, j, level[j]] <= room):
                        best = lj
                    else:
                        break
                if best is None:
                    continue
                delta = value[i, li] - value[i, level[i]] + value[j, best] - value[j, level[j]]
                moves.append((float(delta), int(i), li, int(j), best))
    moves.sort()
    return moves


def corrected_curves(
    level: np.ndarray,
    allowed: np.ndarray,
    value: np.ndarray,
    evaluate: Callable[[np.ndarray], tuple[float, float]],
    current: float,
    probe: int,
) -> tuple[np.ndarray, int]:
    """(value with each layer's curve scaled to its measured effect in context, probes made).

    For every layer, the objective is measured with that layer alone ``probe`` grid steps
    denser (sparser where it cannot get denser) than in ``level``; the scale is the measured
    change over the change its curve predicts, clipped to [1/20, 20]. Layers whose curve is
    flat over the probe keep scale 1. Probes may break the budget: they are measurements, not
    candidates."""
    scale = np.ones(len(level))
    probes = 0
    for i in range(len(level)):
        lv = int(level[i])
        ok = np.flatnonzero(allowed[i])
        denser = ok[(ok < lv) & (ok >= lv - probe)]
        sparser = ok[(ok > lv) & (ok <= lv + probe)]
        if len(denser):
            target = int(denser.min())
        elif len(sparser):
            target = int(sparser.max())
        else:
            continue
        predicted = value[i, lv] - value[i, target]
        if abs(predicted) <= 1e-12 * max(abs(value[i]).max(), 1e-300):
            continue
        moved = level.copy()
        moved[i] = target
        measured = current - evaluate(moved)[0]
        probes += 1
        scale[i] = np.clip(measured / predicted, 1 / 20, 20)
    return value * scale[:, None], probes


def refine(
    level: np.ndarray,
    costs: np.ndarray,
    budgets: np.ndarray,
    allowed: np.ndarray,
    value: np.ndarray,
    evaluate: Callable[[np.ndarray], tuple[float, float]],
    max_evals: int,
    steps: Sequence[int] = (1, 2, 4),
    rounds: int = 0,
    probe: int = 4,
) -> RefineResult:
    """Local search from ``level`` (L,), accepting a candidate only when
    ``evaluate(levels)`` -> (fit, held-out) lowers the fit value and does not raise the
    held-out one. At most ``max_evals`` calls of ``evaluate`` (the start included). The start
    must meet the budgets; every candidate and the result do.

    First, up to ``rounds`` re-solves: each layer's curve is rescaled to its measured effect
    in context (``corrected_curves``, one probe per layer), the knapsack is solved exactly on
    the corrected curves and its optimum is the candidate; rounds stop at the first that does
    not improve. Then pairwise exchanges (``exchange_moves``) tried in the order the (last
    corrected) curves predict, first improvement accepted, until a full pass finds none."""
    from pipeline.allocation.mckp import solve_mckp

    costs = np.asarray(costs, dtype=np.int64)
    costs = costs[None] if costs.ndim == 2 else costs
    budgets = np.asarray(budgets, dtype=np.int64).reshape(-1)
    current = np.asarray(level, dtype=np.int64).copy()
    rows = np.arange(len(current))
    if np.any(costs[:, rows, current].sum(axis=1) > budgets):
        raise ValueError("the starting allocation does not meet the budgets")
    start = best = evaluate(current.copy())
    evals, accepted = 1, 0
    seen = {current.tobytes()}
    for _ in range(rounds):
        if evals + len(current) + 1 > max_evals:
            break
        corrected, probes = corrected_curves(current, allowed, value, evaluate, best[0], probe)
        evals += probes
        candidate = solve_mckp(costs, np.where(allowed, corrected, np.inf), budgets).choice
        if candidate.tobytes() in seen:
            break
        seen.add(candidate.tobytes())
        fit, held = evaluate(candidate.copy())
        evals += 1
        if not (fit < best[0] and held <= best[1]):
            break
        current, best, value = candidate, (fit, held), corrected
        accepted += 1
    improved = True
    while improved and evals < max_evals:
        improved = False
        for _, i, li, j, lj in exchange_moves(current, costs, budgets, allowed, value, steps):
            if evals >= max_evals:
                break
            candidate = current.copy()
            candidate[i], candidate[j] = li, lj
            if candidate.tobytes() in seen:
                continue
            seen.add(candidate.tobytes())
            fit, held = evaluate(candidate.copy())
            evals += 1
            if fit < best[0] and held <= best[1]:
                current, best, improved = candidate, (fit, held), True
                accepted += 1
                break
    return RefineResult(current, start, best, evals, accepted)


# ---------------------------------------------------------------------------- measuring
def holdout_split(n: int, holdout: float) -> tuple[np.ndarray, np.ndarray]:
    """(fit, held-out) indices of n calibration samples: a fixed seeded permutation, the
    last round(holdout * n) held out (at least one sample on each side)."""
    order = np.random.default_rng(0).permutation(n)
    held = min(max(1, round(holdout * n)), n - 1)
    return np.sort(order[: n - held]), np.sort(order[n - held :])


@torch.no_grad()
def dense_moments(model: nn.Module, inputs: torch.Tensor) -> dict[nn.Module, Moments]:
    """Input moments of every BatchNorm of ``model`` over ``inputs``, one batch, one pass."""
    found: dict[nn.Module, Moments] = {}

    def record(module: nn.Module, args: tuple) -> None:
        acc = ChannelMoments()
        acc.add(args[0])
        found[module] = acc.stats()

    handles = [bn.register_forward_pre_hook(record) for bn in batchnorms(model)]
    try:
        model.eval()(inputs)
    finally:
        for h in handles:
            h.remove()
    return found


@torch.no_grad()
def recalibrated_logits(
    pruned: nn.Module,
    dense: dict[nn.Module, Moments],
    names: dict[nn.Module, str],
    dense_bns: dict[str, nn.Module],
    inputs: torch.Tensor,
    rule: str,
) -> torch.Tensor:
    """Logits of ``pruned`` on ``inputs`` (one batch) with each BatchNorm set by ``rule`` from
    its input moments over that batch just before it normalises it: one pass gives what
    ``recalibrate_bn`` on the same images gives (each BatchNorm sees the input the final
    model feeds it), up to float rounding."""

    def reset(module: nn.Module, args: tuple) -> None:
        acc = ChannelMoments()
        acc.add(args[0])
        reference = dense_bns[names[module]]
        set_running_stats(module, BN_RULES[rule](reference, dense[reference], acc.stats()))

    handles = [bn.register_forward_pre_hook(reset) for bn in names]
    try:
        return pruned.eval()(inputs)
    finally:
        for h in handles:
            h.remove()


def measured_objective(
    model: nn.Module,
    layers: Sequence[str],
    inputs: torch.Tensor,
    labels: torch.Tensor,
    reference: torch.Tensor,
    bn_mode: str | None,
    objective: str,
    holdout: float,
) -> Callable[[np.ndarray], tuple[float, float]]:
    """kept (L,) -> (fit, held-out) ``OBJECTIVES[objective]`` of ``model`` pruned to keep
    kept[l] weights of ``layers[l]``, its BatchNorms recalibrated by ``bn_mode`` on the fit
    part of the calibration set (None: not recalibrated). The fit part runs as one batch."""
    fit, held = (torch.from_numpy(ix) for ix in holdout_split(len(inputs), holdout))
    device = next(model.parameters()).device
    x_fit, x_held = inputs[fit].to(device), inputs[held].to(device)
    score = OBJECTIVES[objective]
    module_names = {m: n for n, m in model.named_modules()}
    dense_bns = {module_names[bn]: bn for bn in batchnorms(model)}
    dense = dense_moments(model, x_fit) if bn_mode is not None else {}
    parts = [(x_fit, fit), (x_held, held)]

    @torch.no_grad()
    def evaluate(kept: np.ndarray) -> tuple[float, float]:
        pruned = copy.deepcopy(model)
        apply_masks(pruned, magnitude_masks(pruned, dict(zip(layers, kept.tolist(), strict=True))))
        if bn_mode is None:
            fit_logits = pruned.eval()(x_fit)
        else:
            names = {m: n for n, m in pruned.named_modules() if m in set(batchnorms(pruned))}
            fit_logits = recalibrated_logits(pruned, dense, names, dense_bns, x_fit, bn_mode)
        held_logits = pruned(x_held)
        return tuple(  # type: ignore[return-value]
            score(logits.cpu(), reference[ix], labels[ix])
            for logits, (_, ix) in zip((fit_logits, held_logits), parts, strict=True)
        )

    return evaluate


def refine_allocation(
    model: nn.Module,
    problem: Problem,
    start: Allocation,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    reference: torch.Tensor,
    bn_mode: str | None,
    objective: str,
    holdout: float,
    max_evals: int,
    rounds: int = 0,
) -> tuple[Allocation, RefineResult]:
    """``refine`` on the allocation problem: ``start`` (on the profiling grid, e.g. the DP's
    optimum) moved by measured exchanges; the result keeps grid counts and meets every budget
    of ``problem`` and every per-layer limit."""
    curves = problem.curves
    kept_grid = curves.kept()
    rows = np.arange(len(curves.layers))
    if not np.array_equal(kept_grid[rows, start.level], start.kept):
        raise PipelineError("allocation refinement needs a start on the profiling grid (rd)")
    tol = 1e-12
    sparsity = curves.sparsity[None, :]
    allowed = (sparsity >= problem.lo[:, None] - tol) & (sparsity <= problem.hi[:, None] + tol)
    unit = problem.unit_costs
    measures = list(problem.targets)
    budgets = problem.budgets()
    measure = measured_objective(
        model, curves.layers, inputs, labels, reference, bn_mode, objective, holdout
    )
    result = refine(
        start.level,
        np.stack([kept_grid * unit[m][:, None] for m in measures]),
        np.array([budgets[m] for m in measures]),
        allowed,
        curves.curve(problem.kind),
        lambda level: measure(kept_grid[rows, level]),
        max_evals,
        rounds=rounds,
    )
    kept = kept_grid[rows, result.level]
    refined = replace(
        start,
        level=result.level.astype(np.int64),
        sparsity=1 - kept / curves.numel,
        kept=kept.astype(np.int64),
        predicted_distortion=predicted_distortion(curves, problem.kind, kept),
    )
    return refined, result
