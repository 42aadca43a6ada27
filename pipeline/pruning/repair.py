"""Repair: re-solve the kept weights of pruned layers so that each layer's output stays close to
the dense network's on calibration images (beyond the paper; the step OBC, SparseGPT and
AdaPrune add after masking). Masks never change: pruned weights stay exact zeros.

A layer computes ``y = w . p + b`` over input patches p (patches.py). With p' = [p; 1] and
w' = [w, b] when it has a bias (re-solved too, never pruned), each output row r with kept set S
(its mask) gets

    w'_S = argmin  sum over patches of (w'_S . p'_S - t)^2  +  lam * ||w'_S - w0_S||^2,

w'_P = 0 for the pruned set P, where w0 is the dense row and the target t, per objective, is

- ``layerwise``: the dense weights on the pruned network's own input, t = w0 . p'
  (SparseGPT's and OBC's layer-wise form; no dense pass is needed);
- ``output``: the dense network's own output of the layer, t = w0 . p'_dense, on the same
  images, which also corrects the drift the layers upstream leave.

The damping pulls toward the dense weights (lam -> inf: no repair), as SparseGPT's damped
Hessian does; lam = damping x the mean diagonal of the patch Gram matrix H = sum p' p'^T.
Per row the normal equations are (H_SS + lam I) w'_S = B_S + lam w0_S with B = sum p' t^T.

The per-row systems are solved in ridge.py (exact batched Cholesky, or SparseGPT's column
sweep for wide layers).

Pure: no I/O, no Ray.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import torch
from torch import nn

from pipeline.nn.layers import prunable_layers
from pipeline.profiling.suffix import batchnorm_consumers
from pipeline.pruning.batchnorm import (
    BN_RULES,
    BN_TYPES,
    ChannelMoments,
    recalibrate_bn,
    set_running_stats,
)
from pipeline.pruning.patches import (
    PatchMoments,
    calls_per_forward,
    groups,
    layer_inputs,
    patch_width,
    supported,
    unfold,
)
from pipeline.pruning.ridge import DampedGram, damping_of, nested_solve, solve

log = logging.getLogger(__name__)

OBJECTIVES = ("layerwise", "output")


@dataclass
class NormalEquations:
    """One layer's repair problem per group g of its output rows.

    gram: (G, D', D') float64 sum of p' p'^T over the repair patches; rhs: (G, D', R) float64
    sum of p' t^T (None for ``layerwise``: it is gram @ w0^T); count: patches per group;
    total: (G, D') float64 sum of p' (the patches' mean, for the output's BatchNorm moments);
    target_sum, target_squares: (G, R) float64 sums of t and t^2 (``output`` only).
    D' = D + 1 with a bias column (always last), else D.
    """

    gram: torch.Tensor
    total: torch.Tensor
    count: int
    rhs: torch.Tensor | None = None
    target_sum: torch.Tensor | None = None
    target_squares: torch.Tensor | None = None


def augmented_weight(module: nn.Module) -> torch.Tensor:
    """(G, R, D') float64 rows of the layer's weight per group, its bias as a last column."""
    g = groups(module)
    w = module.weight.detach().to(torch.float64).reshape(g, -1, patch_width(module))
    if module.bias is None:
        return w
    b = module.bias.detach().to(torch.float64).reshape(g, -1, 1)
    return torch.cat([w, b], dim=2)


def augmented_mask(module: nn.Module, mask: torch.Tensor | None) -> torch.Tensor:
    """(G, R, D') bool keep-mask rows matching ``augmented_weight`` (the bias is kept)."""
    g = groups(module)
    shape = (g, module.weight.shape[0] // g, patch_width(module))
    keep = (
        torch.ones(shape, dtype=torch.bool, device=module.weight.device)
        if mask is None
        else mask.reshape(shape).to(module.weight.device)
    )
    if module.bias is None:
        return keep
    return torch.cat([keep, torch.ones_like(keep[..., :1])], dim=2)


class RepairStats:
    """Accumulates a layer's repair statistics batch by batch: the moments of its input
    patches in the pruned network and, for ``output``, the products with the dense output."""

    def __init__(self, module: nn.Module, dense_weight: torch.Tensor | None, budget: int) -> None:
        """dense_weight: (G, R, D') the target's weights for ``output`` (None: layerwise)."""
        self.module, self.budget, self.dense = module, budget, dense_weight
        self.moments = PatchMoments(module, budget)
        self.cross: torch.Tensor | None = None  # (G, D, R) sum of p t^T
        self.target_sum: torch.Tensor | None = None  # (G, R) sum of t
        self.target_squares: torch.Tensor | None = None  # (G, R) sum of t^2

    def add(self, pruned_input: torch.Tensor, dense_input: torch.Tensor | None = None) -> None:
        """One batch of the layer's input in the pruned network (and, for ``output``, what the
        same layer receives in the dense network on the same images)."""
        if self.dense is None:
            self.moments.add(pruned_input)
            return
        self.moments.input_dim = pruned_input.dim()
        # the chunks hold the patches (D rows) and the target (R rows): both in the budget
        d, r = self.dense.shape[2], self.dense.shape[1]
        budget = max(1, self.budget * d // (d + r))
        pairs = zip(
            unfold(self.module, pruned_input, budget),
            unfold(self.module, dense_input, budget),
            strict=True,
        )
        for cols, dense_cols in pairs:
            self.moments.add_columns(cols)
            t = torch.bmm(self.dense, with_ones(dense_cols, self.module.bias is not None))
            sums = (torch.bmm(cols, t.transpose(1, 2)), t.sum(2), t.pow(2).sum(2))
            if self.cross is None:
                self.cross, self.target_sum, self.target_squares = sums
            else:
                self.cross += sums[0]
                self.target_sum += sums[1]
                self.target_squares += sums[2]

    def equations(self) -> NormalEquations:
        eq = moment_equations(self.moments)
        if self.cross is None:
            return eq
        rhs = self.cross
        if self.module.bias is not None:  # the ones row: sum of t
            rhs = torch.cat([rhs, self.target_sum.unsqueeze(1)], dim=1)
        return replace(eq, rhs=rhs, target_sum=self.target_sum, target_squares=self.target_squares)


def with_ones(cols: torch.Tensor, bias: bool) -> torch.Tensor:
    """(G, D, m) patches, with a row of ones appended when the layer has a bias."""
    if not bias:
        return cols
    return torch.cat([cols, torch.ones_like(cols[:, :1])], dim=1)


def moment_equations(moments: PatchMoments) -> NormalEquations:
    """The ``layerwise`` equations of a layer from its input patches' moments (the Gram matrix
    bordered by the patch sums and count when the layer has a bias)."""
    gram, total, count = moments.gram, moments.total, moments.count
    if moments.module.bias is not None:
        n = torch.full_like(total[:, :1], float(count))
        gram = torch.cat(
            [torch.cat([gram, total.unsqueeze(2)], 2), torch.cat([total, n], 1).unsqueeze(1)], 1
        )
        total = torch.cat([total, n], 1)
    return NormalEquations(gram, total, count)


def equations_solution(
    module: nn.Module,
    eq: NormalEquations,
    mask: torch.Tensor | None,
    damping: float,
    solver: str = "auto",
    dense: torch.Tensor | None = None,
    damped: DampedGram | None = None,
) -> torch.Tensor:
    """The repaired (G, R, D') rows of ``module`` from its equations (``layerwise`` when
    ``eq.rhs`` is None). dense: (G, R, D') the anchor (default: the module's current rows);
    damped: ``damped_gram(module, eq, damping)``, when several masks share the equations."""
    w0 = augmented_weight(module) if dense is None else dense
    rhs = eq.rhs if eq.rhs is not None else eq.gram @ w0.transpose(1, 2)
    damped = damped if damped is not None else damped_gram(module, eq, damping)
    keep = augmented_mask(module, mask)
    return solve(eq.gram, rhs, w0, keep, damped.lam, solver, damped=damped)


def equations_solutions(
    module: nn.Module,
    eq: NormalEquations,
    rank: torch.Tensor,
    thresholds: list[int],
    damped: DampedGram,
    dense: torch.Tensor,
    budget: int,
) -> dict[int, torch.Tensor]:
    """``equations_solution`` (solver ``auto``) for the nested masks ``rank >= t``, t in
    ``thresholds`` (the levels of a profile), solved together: {position: (G, R, D')}, for
    none or some of them (``ridge.nested_solve``; the rest are solved one by one). rank: the
    module's weight-shaped int64 priority (the lowest is pruned first); dense: (G, R, D')
    the anchor."""
    g = groups(module)
    rows = rank.reshape(g, module.weight.shape[0] // g, patch_width(module))
    if module.bias is not None:  # never pruned: above every threshold
        rows = torch.cat([rows, torch.full_like(rows[..., :1], rank.numel())], dim=2)

    def rhs() -> torch.Tensor:
        return eq.rhs if eq.rhs is not None else eq.gram @ dense.transpose(1, 2)

    return nested_solve(damped, rhs, dense, rows.to(dense.device), thresholds, budget)


def damped_gram(module: nn.Module, eq: NormalEquations, damping: float) -> DampedGram:
    """H + lam I of the equations, lam = ``damping`` x the mean diagonal of the weights' part."""
    return DampedGram(eq.gram, damping_of(eq.gram, damping, patch_width(module)))


def candidate_rows(module: nn.Module, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The module's parameters from (G, R, D') rows: its weight (and bias, the last column),
    in their own dtype."""
    w, d = module.weight, patch_width(module)
    out = {"weight": rows[..., :d].reshape(w.shape).to(w.dtype)}
    if module.bias is not None:
        out["bias"] = rows[..., d].reshape(module.bias.shape).to(module.bias.dtype)
    return out


@torch.no_grad()
def set_rows(module: nn.Module, rows: torch.Tensor) -> None:
    """Write (G, R, D') rows back into the module's weight (and bias)."""
    for name, value in candidate_rows(module, rows).items():
        getattr(module, name).copy_(value)


def output_moments(eq: NormalEquations, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per output channel (C,) float32: (mean, var) of the repaired layer's output and of the
    target's over the repair patches, from the equations alone (``output`` objective)."""
    mean_p = eq.total / eq.count  # (G, D')
    m = torch.bmm(rows, mean_p.unsqueeze(2)).flatten()
    second = (torch.bmm(rows, eq.gram / eq.count) * rows).sum(2).flatten()
    tm = (eq.target_sum / eq.count).flatten()
    tv = (eq.target_squares / eq.count).flatten() - tm.pow(2)
    f = torch.float32
    return m.to(f), (second - m.pow(2)).clamp_min(0).to(f), tm.to(f), tv.clamp_min(0).to(f)


@dataclass(frozen=True)
class RepairReport:
    """What a repair walk did: the layers re-solved and the BatchNorms set, in order."""

    layers: list[str]
    batchnorms: list[str]


@torch.no_grad()
def repair_network(
    model: nn.Module,
    dense: nn.Module,
    masks: Mapping[str, torch.Tensor],
    inputs: torch.Tensor,
    objective: str,
    damping: float,
    batch_size: int,
    bn_rule: str | None = None,
    solver: str = "auto",
    budget: int = 256 << 20,
) -> RepairReport:
    """Walk the masked ``model`` in execution order and, in place, repair every prunable layer
    and (with ``bn_rule``) set every BatchNorm's statistics, each from what the network before
    it, already repaired and recalibrated, gives it on ``inputs`` (N, ...).

    dense: the model before pruning (same architecture, unchanged); masks: layer -> bool keep
    mask (a layer without one keeps every weight and is still re-solved: it corrects the drift
    upstream); bn_rule: a ``BN_RULES`` name, the statistics set from the moments of what the
    BatchNorm receives here and in ``dense`` on the same images (for the BatchNorm that alone
    consumes a repaired layer, from that layer's equations, without a pass); None: BatchNorm
    statistics stay as they are. Setting them as the walk goes, not after it, matters: the
    layers after a BatchNorm are fitted to what it gives with its final statistics (measured:
    +2.3 points at 90 % on ResNet-20 against no BatchNorm update, while recalibrating after the
    whole repair loses 20). Memory: one layer's equations (float64, D'^2 per group) and one
    batch of activations.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r}; allowed: {', '.join(OBJECTIVES)}")
    mods, dense_mods = dict(model.named_modules()), dict(dense.named_modules())
    names = [n for n, m in prunable_layers(model) if supported(m)]
    if bn_rule is not None:
        names += [n for n, m in model.named_modules() if isinstance(m, BN_TYPES)]
    counts, order = calls_per_forward(model, [mods[n] for n in names], inputs[:1])
    consumers = batchnorm_consumers(model) if bn_rule is not None else {}
    report = RepairReport([], [])
    # Before the first pruned layer the network is the dense one: every layer there would be
    # re-solved to itself and every BatchNorm set to its own statistics. Skip them.
    first = [k for k, i in enumerate(order) if _prunes(masks.get(names[i]))]
    for i in order[first[0] if first else len(order) :]:
        name, module = names[i], mods[names[i]]
        is_bn = isinstance(module, BN_TYPES)
        if is_bn and name in report.batchnorms:
            continue  # set from the equations of the layer it consumes
        if not is_bn and objective == "layerwise" and not _prunes(masks.get(name)):
            continue  # its own weights on its own input: re-solved to themselves
        pair = [model, dense] if objective == "output" or is_bn else [model]
        passes = _batches(
            pair, [module, dense_mods[name]][: len(pair)], inputs, batch_size, counts[i]
        )
        if is_bn:
            moments = [ChannelMoments(), ChannelMoments()]
            for got in passes:
                for k, calls in enumerate(got):
                    for x in calls:
                        moments[k].add(x)
            pruned, before = (m.stats() for m in moments)
            set_running_stats(module, BN_RULES[bn_rule](dense_mods[name], before, pruned))
            report.batchnorms.append(name)
            continue
        anchor = augmented_weight(dense_mods[name])
        stats = RepairStats(module, anchor if objective == "output" else None, budget)
        for got in passes:
            for j, x in enumerate(got[0]):
                stats.add(x, got[1][j] if objective == "output" else None)
        eq = stats.equations()
        rows = equations_solution(module, eq, masks.get(name), damping, solver, anchor)
        set_rows(module, rows)
        report.layers.append(name)
        bn = consumers.get(name)
        if bn is not None and objective == "output" and stats.moments.channel_moments:
            m, v, tm, tv = output_moments(eq, rows)
            set_running_stats(mods[bn], BN_RULES[bn_rule](dense_mods[bn], (tm, tv), (m, v)))
            report.batchnorms.append(bn)
    return report


def _prunes(mask: torch.Tensor | None) -> bool:
    return mask is not None and not bool(mask.all())


def _batches(models, modules, inputs, batch_size, calls):
    """Per batch of ``inputs``, what each of ``modules`` receives in its model (per call)."""
    for start in range(0, len(inputs), batch_size):
        yield layer_inputs(models, modules, inputs[start : start + batch_size], calls)


@dataclass(frozen=True)
class Recovery:
    """What follows the masks, the same for every allocation method and every round: with
    ``objective`` (an ``OBJECTIVES`` name), the repair walk, BatchNorm statistics set on the
    way by ``bn_rule``; without, BatchNorm recalibration by ``bn_rule`` alone; neither:
    nothing. ``damping``: the repair's; ``batch_size``: images per forward pass."""

    bn_rule: str | None = None
    objective: str | None = None
    damping: float = 0.01
    batch_size: int = 128

    def __call__(
        self,
        model: nn.Module,
        dense: nn.Module,
        masks: Mapping[str, torch.Tensor],
        images: torch.Tensor,
    ) -> RepairReport | None:
        """Recover the masked ``model`` in place against ``dense`` on ``images`` (N, ...)."""
        if self.objective is not None:
            return repair_network(
                model,
                dense,
                masks,
                images,
                self.objective,
                self.damping,
                self.batch_size,
                self.bn_rule,
            )
        if self.bn_rule is not None:
            recalibrate_bn(model, dense, images, self.batch_size, self.bn_rule)
        return None

    @property
    def active(self) -> bool:
        return self.objective is not None or self.bn_rule is not None

    def on(self, images: torch.Tensor | None) -> Recover | None:
        """This recovery with its images bound: ``recover(model, dense, masks)``; None when
        there is nothing to do."""
        if not self.active:
            return None
        return lambda model, dense, masks: self(model, dense, masks, images)


# recover(masked model, dense model, masks) in place: a ``Recovery`` with its images bound
Recover = Callable[[nn.Module, nn.Module, Mapping[str, torch.Tensor]], object]
