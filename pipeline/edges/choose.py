"""The allocation the params ask for: the problem they pose on the profiled curves, then rd or
a baseline, one-shot or progressive, with candidate selection or refinement by measurement,
and the other methods' allocations for comparison.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from pipeline.allocation.methods import ALLOCATORS, allocate
from pipeline.allocation.problem import Allocation, Problem, check_same_layers, layer_bounds
from pipeline.allocation.progressive import progressive_allocation
from pipeline.allocation.refine import refine_allocation
from pipeline.allocation.selection import select_measured
from pipeline.config.params import Params
from pipeline.edges import io
from pipeline.edges.profile_run import profile_curves
from pipeline.edges.stage import recovery, recovery_images
from pipeline.errors import PipelineError
from pipeline.nn.data import load_dataset
from pipeline.nn.evaluation import predict_logits
from pipeline.nn.layers import prunable_layers, prunable_numel
from pipeline.profiling.distortion import DistortionCurves
from pipeline.pruning.masking import masks_from_zeros

log = logging.getLogger("rdprune")


def allocation_problem(params: Params, curves: DistortionCurves, model: nn.Module) -> Problem:
    """The allocation problem the params pose on these curves and this dense model."""
    if params.prune.reconstruct is not None and not params.profile.reconstruct:
        log.info(
            "allocate: profile.reconstruct is false, so the curves rd reads do not model the "
            "repair prune.reconstruct = %s applies after the masks",
            params.prune.reconstruct,
        )
    check_same_layers(curves.layers, curves.numel, prunable_numel(model), "the distortion table")
    weights = {name: m.weight.detach() for name, m in prunable_layers(model)}
    lo, hi = layer_bounds(curves.layers, params.allocate.limits, params.allocate.exclude)
    return Problem(
        curves=curves,
        kind=params.allocate.distortion,
        targets=params.allocate.targets(params.prune.ratio),
        lo=lo,
        hi=hi,
        magnitudes=[weights[n].abs().flatten().cpu().numpy() for n in curves.layers],
        shapes=[tuple(weights[n].shape) for n in curves.layers],
    )


def choose_allocation(
    params: Params, paths: io.Paths, model: nn.Module, problem: Problem
) -> tuple[str, Allocation, dict[str, float]]:
    """(method chosen, its allocation, measured distortion per candidate) as params ask:
    one-shot ``allocate.method``; ``allocate.steps`` > 1: progressive, re-profiling the
    partially pruned model against its own outputs; ``allocate.candidates``: the method and
    the candidates compete by measured joint distortion on the calibration set (after the
    prune stage's recovery on its own images);
    ``allocate.refine``: rd's optimum refined on a measured objective (``rd+refine``)."""
    method, allocate_params = params.allocate.method, params.allocate
    if allocate_params.steps == 1 and not allocate_params.candidates and not allocate_params.refine:
        return method, allocate(method, problem), {}
    inputs, labels, reference = io.read_calibration(paths.calibration)
    if allocate_params.refine:  # beyond the paper: measured exchanges from the DP's optimum
        return refined_allocation(params, model, problem, inputs, labels, reference)
    batch = params.calibrate.batch_size
    # the same recovery as the prune stage's, on its images (not the calibration set the
    # distortion is measured on)
    recover = None
    if recovery(params).active:
        images = recovery_images(params, load_dataset(params.data).train_eval)
        recover = recovery(params).on(images)
    if allocate_params.steps > 1:
        allocation = progressive_allocation(
            model,
            problem,
            method,
            allocate_params.steps,
            reprofile=lambda m: profile_curves(params, m, inputs, predict_logits(m, inputs, batch)),
            recalibrate=None
            if recover is None
            else (lambda m: recover(m, model, masks_from_zeros(m))),
        )
        return method, allocation, {}
    names = list(dict.fromkeys([method, *allocate_params.candidates]))
    allocations = {name: allocate(name, problem) for name in names}
    chosen, measured = select_measured(model, allocations, inputs, reference, batch, recover)
    return chosen, allocations[chosen], measured


def refined_allocation(
    params: Params,
    model: nn.Module,
    problem: Problem,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    reference: torch.Tensor,
) -> tuple[str, Allocation, dict[str, float]]:
    """``allocate.refine``: rd's allocation refined on the measured objective (refine.py);
    the name ``rd+refine``, and the objective before and after on both calibration parts."""
    a = params.allocate
    allocation, result = refine_allocation(
        model,
        problem,
        allocate(a.method, problem),
        inputs,
        labels,
        reference,
        params.prune.bn_rule,
        a.refine,
        a.refine_holdout,
        a.refine_evals,
        a.refine_rounds,
    )
    (fit0, held0), (fit1, held1) = result.start, result.end
    log.info(
        "allocate: refinement (%s) %.6g -> %.6g on the fit part, %.6g -> %.6g held out; "
        "%d moves in %d evaluations",
        *(a.refine, fit0, fit1, held0, held1, result.accepted, result.evaluations),
    )
    summary = {
        "refine.fit_start": result.start[0],
        "refine.fit_end": result.end[0],
        "refine.heldout_start": result.start[1],
        "refine.heldout_end": result.end[1],
        "refine.evaluations": result.evaluations,
        "refine.moves": result.accepted,
    }
    return f"{a.method}+refine", allocation, summary


def other_methods(problem: Problem, chosen: str) -> dict[str, Allocation]:
    """Every other registered method's allocation of the same problem, for comparison; those
    that cannot meet it (e.g. uniform under tight limits) are left out."""
    out = {}
    for name in ALLOCATORS:
        if name != chosen:
            with contextlib.suppress(PipelineError):
                out[name] = allocate(name, problem)
    return out
