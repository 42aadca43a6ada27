"""Glue shared by the stage scripts: command line, error reporting, model loading, profiling
through the parallel backend, the allocation problem the params pose, and the result record
sent to the tracking store."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from pipeline import io
from pipeline.allocation import Allocation, Problem, allocate, layer_bounds
from pipeline.batchnorm import recalibrate_bn
from pipeline.config import Params, flatten
from pipeline.device import resolve_device
from pipeline.distortion import DistortionCurves, profile_layer, sparsity_grid
from pipeline.errors import PipelineError
from pipeline.evaluation import predict_logits
from pipeline.layers import macs_per_weight, prunable_layers, prunable_numel
from pipeline.models import build_model, load_weights, normalize_state_dict
from pipeline.parallel import map_tasks
from pipeline.progressive import progressive_allocation
from pipeline.selection import select_measured
from pipeline.training import EpochStats

log = logging.getLogger("rdprune")


def run_stage(body: Callable[[Params, io.Paths], None], argv: Sequence[str] | None = None) -> int:
    """Parse ``--root``, read params.yaml there, run ``body``; a PipelineError becomes one
    ``error: ...`` line on stderr and exit status 2."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default=".", help="project root holding params.yaml")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr
    )
    try:
        paths = io.Paths(Path(args.root))
        params = io.read_params(paths.params)
        resolve_device(params.device)  # no device, no work: fail before reading anything else
        body(params, paths)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def stage_device(params: Params) -> torch.device:
    """The torch device the ``device`` param names here (one clear error if there is none)."""
    device = resolve_device(params.device)
    log.info("device: %s (device = %s)", device, params.device)
    return device


def load_model(
    params: Params, path: Path, in_channels: int, num_classes: int, what: str
) -> nn.Module:
    """The registry's ``model.arch`` with the weights of checkpoint ``path`` (read onto the
    CPU), on the ``device`` param's device, in eval mode."""
    model = build_model(params.model.arch, in_channels, num_classes)
    state = normalize_state_dict(io.read_checkpoint(path, what))
    load_weights(model, state, str(path), params.model.arch)
    return model.to(stage_device(params)).eval()


def profile_curves(
    params: Params, model: nn.Module, inputs: torch.Tensor, reference: torch.Tensor
) -> DistortionCurves:
    """Every prunable layer's distortion curve, one task per layer on the ``ray`` backend.

    inputs: (N, ...) calibration inputs; reference: (N, classes) dense logits. Each task runs
    on the ``device`` param's device (resolved where the task runs).
    """
    numel = prunable_numel(model)
    grid = sparsity_grid(params.profile.levels)
    shared = {
        "model": model,
        "inputs": inputs,
        "reference": reference,
        "sparsities": grid,
        "batch_size": params.profile.batch_size,
        "threads": params.profile.threads,
        "engine": params.profile.engine,
        "memory_mb": params.profile.memory_mb,
        "device": params.device,
        "bn_correction": params.prune.bn_recalibration_mode
        if params.profile.bn_correction
        else None,
    }
    results = map_tasks(
        profile_layer, list(numel), shared=shared, params=params.ray, desc="profile layers"
    )
    curves = DistortionCurves.from_profiles(
        numel, grid, results, macs_per_weight(model, inputs[:1])
    )
    curves.check()
    return curves


def allocation_problem(params: Params, curves: DistortionCurves, model: nn.Module) -> Problem:
    """The allocation problem the params pose on these curves and this dense model."""
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
    the candidates compete by measured joint distortion on the calibration set."""
    method, allocate_params = params.allocate.method, params.allocate
    if allocate_params.steps == 1 and not allocate_params.candidates:
        return method, allocate(method, problem), {}
    inputs, _, reference = io.read_calibration(paths.calibration)
    batch = params.calibrate.batch_size
    if allocate_params.steps > 1:
        allocation = progressive_allocation(
            model,
            problem,
            method,
            allocate_params.steps,
            reprofile=lambda m: profile_curves(params, m, inputs, predict_logits(m, inputs, batch)),
            recalibrate=lambda m: recalibrate_bn(
                m, model, inputs, batch, params.prune.bn_recalibration_mode
            ),
        )
        return method, allocation, {}
    names = list(dict.fromkeys([method, *allocate_params.candidates]))
    allocations = {name: allocate(name, problem) for name in names}
    mode = params.prune.bn_recalibration_mode if params.prune.bn_recalibration else None
    chosen, measured = select_measured(model, allocations, inputs, reference, batch, mode)
    return chosen, allocations[chosen], measured


def log_result(params: Params, paths: io.Paths, history: list[EpochStats]) -> str:
    """Send one pipeline result (all params, headline metrics, curves, allocation) to MLflow."""
    from pipeline import tracking
    from pipeline.plots import allocation_figure, finetune_figure

    calibrate, allocate = (
        io.read_metrics(paths.metrics("calibrate")),
        io.read_metrics(paths.metrics("allocate")),
    )
    prune, finetune = (
        io.read_metrics(paths.metrics("prune")),
        io.read_metrics(paths.metrics("finetune")),
    )
    allocation = io.read_allocation(paths.allocation)
    table = {
        "layer": allocation.layers,
        "numel": allocation.numel.tolist(),
        "sparsity": allocation.sparsity.tolist(),
        "kept": allocation.kept.tolist(),
        "predicted_distortion": allocation.predicted_distortion.tolist(),
    }
    epochs = [h.epoch for h in history]
    figures = {"allocation.png": allocation_figure(allocation, params.prune.ratio)}
    if history:
        figures["finetune.png"] = finetune_figure(
            epochs, [h.loss for h in history], [h.accuracy for h in history]
        )
    return tracking.log_pipeline_run(
        tracking_uri=tracking.resolve_tracking_uri(params.mlflow.tracking_uri, paths.root),
        experiment=params.mlflow.experiment,
        run_name=f"{params.allocate.method} ratio={params.prune.ratio:g}",
        params=flatten(params),
        metrics={
            "dense_accuracy": calibrate["dense_accuracy"],
            "prune_accuracy": prune["accuracy"],
            "finetune_accuracy": finetune["accuracy"],
            "sparsity": finetune["sparsity"],
            "flops_reduction": prune["flops_reduction"],
            "predicted_distortion": allocate["predicted_distortion"],
            "measured_distortion": prune["measured_distortion"],
        },
        steps={
            "finetune_epoch_loss": [(h.epoch, h.loss) for h in history],
            "finetune_epoch_accuracy": [(h.epoch, h.accuracy) for h in history],
        },
        tables={"allocation.json": table},
        figures=figures,
        artifacts=[paths.allocation, paths.pareto],
        tags={"dvc.exp_name": os.environ.get("DVC_EXP_NAME", ""), "rdprune.stage": "finetune"},
    )
