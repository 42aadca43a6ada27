"""Glue shared by the stage scripts: command line, error reporting, model loading, profiling
through the parallel backend, the allocation problem the params pose, and the result record
sent to the tracking store."""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import functools
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from pipeline import io
from pipeline.allocation import (
    ALLOCATORS,
    Allocation,
    Problem,
    allocate,
    check_same_layers,
    layer_bounds,
)
from pipeline.config import Params, flatten
from pipeline.data import calibration_subset, load_dataset
from pipeline.device import resolve_device
from pipeline.distortion import DistortionCurves, sparsity_grid
from pipeline.errors import PipelineError
from pipeline.evaluation import predict_logits
from pipeline.layers import macs_per_weight, prunable_layers, prunable_numel
from pipeline.masking import masks_from_zeros
from pipeline.models import build_model, load_weights, normalize_state_dict
from pipeline.parallel import Placement, run_tasks
from pipeline.progressive import progressive_allocation
from pipeline.refine import refine_allocation
from pipeline.repair import Recovery
from pipeline.selection import select_measured
from pipeline.tracking import ModelRecord, RunRecord
from pipeline.training import EpochStats
from pipeline.workunits import assemble, layer_costs, plan_units, profile_unit

log = logging.getLogger("rdprune")


SHELLS = ("sh", "bash", "dash", "zsh", "fish", "ksh")


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(command name, parent pid, start time) of a live process; None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm, rest = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()
    return comm, int(rest[1]), int(rest[19])  # fields 4 (ppid) and 22 (starttime) of proc(5)


def _die_with_parent() -> None:
    """End this stage (SIGTERM, so it unwinds) when whatever launched it dies: a killed
    ``dvc repro`` must not leave its stage running as an orphan that later writes outputs.

    DVC runs the command through ``$SHELL -c``: bash execs it, dash keeps a shell in between,
    so the launcher is the parent, or the shell's parent. Linux's PR_SET_PDEATHSIG covers the
    direct parent at once; a watchdog thread covers the launcher behind a shell.
    """
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    stat = _proc_stat(parent)
    if stat is None or os.getppid() != parent:  # gone before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)
        return
    launcher = stat[1] if stat[0] in SHELLS else parent
    if launcher == 1 and parent != launcher:
        # the shell between us and our launcher was handed to init: the launcher died while
        # this process was starting
        os.kill(os.getpid(), signal.SIGTERM)
        return
    started = (_proc_stat(launcher) or ("", 0, -1))[2]

    def watch() -> None:
        while (_proc_stat(launcher) or ("", 0, -2))[2] == started:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def _raise_on_sigterm(signum: int, frame: object) -> None:
    # SystemExit unwinds like Ctrl-C: atomic writes drop their temporary files, Ray shuts down,
    # an MLflow run ends FAILED. Later SIGTERMs (the parent-death signal and the watchdog may
    # both send one) are ignored, so that a second exit cannot cut that clean-up short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def run_stage(body: Callable[[Params, io.Paths], None], argv: Sequence[str] | None = None) -> int:
    """Parse ``--root``, read params.yaml there, run ``body``; a PipelineError becomes one
    ``error: ...`` line on stderr and exit status 2. The wall time goes to a timings file
    that no stage depends on, so that it never changes what DVC considers stale."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default=".", help="project root holding params.yaml")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr
    )
    name = body.__module__.rpartition(".")[2]
    if name == "__main__":  # run as ``python -m stages.<name>``
        name = sys.modules["__main__"].__spec__.name.rpartition(".")[2]
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm) if main_thread else None
    if argv is None:  # a process of its own, not a call from a test
        _die_with_parent()
    try:
        paths = io.Paths(Path(args.root))
        for stale in io.remove_temporaries(paths):
            log.info("%s: removed %s, left by an interrupted write", name, stale)
        params = io.read_params(paths.params)
        resolve_device(params.device)  # no device, no work: fail before reading anything else
        start = time.perf_counter()
        body(params, paths)
        io.write_metrics(paths.timing(name), {"seconds": round(time.perf_counter() - start, 3)})
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file the stage reads or a library writes: name it and the cause
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {name}: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    finally:  # called in process (tests, benchmarks): the caller's handler again; a process
        # of its own keeps ignoring late SIGTERMs while the interpreter shuts down
        if previous is not None and argv is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


def recovery(params: Params) -> Recovery:
    """What the params apply after the masks, for every method: the repair (BatchNorm set on
    the way) and / or BatchNorm recalibration."""
    p = params.prune
    return Recovery(p.bn_rule, p.reconstruct, p.reconstruct_damping, params.calibrate.batch_size)


def recovery_images(params: Params, train_eval: Dataset) -> torch.Tensor | None:
    """(N, ...) the training images the prune stage's recovery runs on (seeded, evaluation
    transforms): the repair's ``prune.reconstruct_samples``, else the BatchNorm
    recalibration's ``prune.bn_recalibration``; None when there is no recovery."""
    p = params.prune
    if p.reconstruct is not None:
        images, _ = calibration_subset(
            train_eval, p.reconstruct_samples, params.seed + 2, "prune.reconstruct_samples"
        )
    elif p.bn_rule is not None:
        images, _ = calibration_subset(
            train_eval, p.bn_recalibration, params.seed + 1, "prune.bn_recalibration"
        )
    else:
        return None
    return images


def stage_device(params: Params) -> torch.device:
    """The torch device the ``device`` param names here (one clear error if there is none)."""
    device = resolve_device(params.device)
    _announce_device(str(device), params.device)
    return device


@functools.cache
def _announce_device(device: str, param: str) -> None:
    """Log the device once per process, however many models a stage loads."""
    log.info("device: %s (device = %s)", device, param)


def adopt_checkpoint(model: nn.Module, params: Params) -> nn.Module:
    """``model`` with ``model.checkpoint``'s weights (read safely, keys normalised, checked for
    the architecture and for NaN), or as it is when none is named."""
    where = params.model.checkpoint
    if where is not None:
        state = normalize_state_dict(io.read_checkpoint(where, "model.checkpoint"), where)
        load_weights(model, state, where, params.model.arch)
    return model


def load_model(
    params: Params, path: Path, in_channels: int, num_classes: int, what: str
) -> nn.Module:
    """The registry's ``model.arch`` with the weights of checkpoint ``path`` (read onto the
    CPU), on the ``device`` param's device, in eval mode."""
    model = build_model(params.model.arch, in_channels, num_classes)
    state = normalize_state_dict(io.read_checkpoint(path, what), str(path))
    load_weights(model, state, str(path), params.model.arch)
    return model.to(stage_device(params)).eval()


def profile_curves(
    params: Params,
    model: nn.Module,
    inputs: torch.Tensor,
    reference: torch.Tensor,
    placements: list[Placement] | None = None,
    of_remaining: bool = False,
) -> DistortionCurves:
    """Every prunable layer's distortion curve, profiled in work units (a layer or a range of
    its levels, largest first) on the ``ray.backend``.

    inputs: (N, ...) calibration inputs; reference: (N, classes) dense logits. The units
    depend on the model and params only, so the table is the same on every backend and
    cluster. ``placements``, if given, receives where each unit ran (in unit order). Each
    task runs on the ``device`` param's device, or on the GPU Ray assigned it.
    ``of_remaining``: grid sparsities are fractions of each layer's non-zero weights (an
    iterative round); the curves' ``numel`` stay the whole layers'.
    """
    numel = prunable_numel(model)
    macs = macs_per_weight(model, inputs[:1])
    levels = params.profile.levels
    grid = sparsity_grid(levels)
    bn_mode = params.curve_bn_rule
    check_share = min(1.0, params.profile.batch_size / len(inputs))
    costs = layer_costs(numel, macs, params.profile.engine, bn_mode is not None, check_share)
    units = plan_units(costs, levels, params.ray.work_units)
    shared = {  # shipped from the CPU: each task moves them to the device it runs on
        "model": copy.deepcopy(model).cpu(),
        "inputs": inputs.cpu(),
        "reference": reference.cpu(),
        "sparsities": grid,
        "batch_size": params.profile.batch_size,
        "threads": params.profile.threads,
        "engine": params.profile.engine,
        "memory_mb": params.profile.memory_mb,
        "device": params.device,
        "bn_correction": bn_mode,
        "of_remaining": of_remaining,
        "repair": params.curve_repair,
        "precision": params.profile.precision,
    }
    run = run_tasks(
        profile_unit, units, shared=shared, params=params.ray, desc="profile", device_arg="device"
    )
    if placements is not None:
        placements.extend(run.placements)
    per_layer = assemble(units, run.results, levels)
    curves = DistortionCurves.from_profiles(numel, grid, [per_layer[n] for n in numel], macs)
    curves.check()
    return curves


def placement_summary(placements: Sequence[Placement]) -> dict[str, Any]:
    """For the profile metrics: how many nodes and GPUs the work units ran on, and per node
    (a list, which ``dvc metrics show`` leaves out of its columns) its id, IP, units, the GPU
    ids Ray assigned, the devices used and the worker PIDs."""
    nodes: dict[str, dict[str, Any]] = {}
    for p in placements:
        node = nodes.setdefault(
            p.node_id,
            {"node": p.node_id, "ip": p.node_ip, "units": 0, "gpu_ids": [], "devices": []},
        )
        node["units"] += 1
        node["gpu_ids"] = sorted(set(node["gpu_ids"]) | set(p.gpu_ids))
        node["devices"] = sorted(set(node["devices"]) | {p.device})
        node["pids"] = sorted(set(node.get("pids", [])) | {p.pid})
    return {
        "nodes": len(nodes),
        "gpus": sum(len(n["gpu_ids"]) for n in nodes.values()),
        "placement": [nodes[k] for k in sorted(nodes)],
    }


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


def log_epoch(stage: str) -> Callable[[EpochStats], None]:
    """An ``on_epoch`` callback that logs each training epoch as it ends."""

    def report(stats: EpochStats) -> None:
        if stats.accuracy is None:  # no evaluation between epochs (schedule rounds)
            log.info("%s epoch %d: loss %.4f", stage, stats.epoch, stats.loss)
            return
        log.info(
            "%s epoch %d: loss %.4f, test accuracy %.4f",
            stage,
            stats.epoch,
            stats.loss,
            stats.accuracy,
        )

    return report


STAGES = (
    "validate",
    "baseline",
    "calibrate",
    "profile",
    "allocate",
    "prune",
    "finetune",
    "schedule",
    "export",
    "track",
)


# logged beside the headline metrics when the prune stage measured them
EXTRA_PRUNE_METRICS = ("measured_distortion_max", "sparsity_all_weight_matrices")


def result_record(params: Params, paths: io.Paths) -> RunRecord:
    """What the MLflow run of a pipeline result holds: every param, the headline metrics (the
    ratio too, so the UI charts accuracy against it), the fine-tuning curve as steps, the
    allocation as a table, the figures and tables as artifacts, and the stages' wall times."""
    calibrate, allocate, prune, finetune = (
        io.read_metrics(paths.metrics(s)) for s in ("calibrate", "allocate", "prune", "finetune")
    )
    allocation = io.read_allocation(paths.allocation)
    history = io.read_csv(paths.plot("finetune"))
    timings = {
        f"seconds.{s}": io.read_metrics(paths.timing(s))["seconds"]
        for s in STAGES
        if paths.timing(s).is_file()
    }
    return RunRecord(
        params=flatten(params),
        metrics={
            "ratio": params.prune.ratio,
            "dense_accuracy": calibrate["dense_accuracy"],
            "prune_accuracy": prune["accuracy"],
            "finetune_accuracy": finetune["accuracy"],
            "sparsity": finetune["sparsity"],
            "flops_reduction": prune["flops_reduction"],
            "predicted_distortion": allocate["predicted_distortion"],
            "measured_distortion": prune["measured_distortion"],
            **{  # the recovery's effect (before the repair or the BN recalibration), the
                # worst-case distortion and the sparsity of every weight matrix when some
                # are not prunable: whatever else the prune stage measured
                f"prune_{k}" if k.startswith("accuracy") else k: v
                for k, v in prune.items()
                if "_before_" in k or k in EXTRA_PRUNE_METRICS
            },
            **timings,
        },
        steps={
            "finetune_epoch_loss": [(int(h["epoch"]), float(h["loss"])) for h in history],
            "finetune_epoch_accuracy": [(int(h["epoch"]), float(h["accuracy"])) for h in history],
        },
        tables={
            "allocation.json": {
                "layer": allocation.layers,
                "numel": allocation.numel.tolist(),
                "sparsity": allocation.sparsity.tolist(),
                "kept": allocation.kept.tolist(),
                "predicted_distortion": allocation.predicted_distortion.tolist(),
            }
        },
        artifacts=[paths.allocation, paths.pareto, *paths.figures()],
        tags={"rdprune.stage": "track"},
        # the final network is the schedule's when it runs (registered with that record)
        model=final_model(params, paths, paths.finetuned, params.schedule.rounds == 0),
    )


RESULT_METRICS = (
    "accuracy",
    "sparsity",
    "flops_reduction",
    "predicted_distortion",
    "measured_distortion",
    "dense_accuracy",
)


def result_metrics(params: Params, paths: io.Paths) -> dict[str, float]:
    """The few numbers experiments are compared by (``metrics/result.json``, the one DVC
    metrics file): the final model's test accuracy and sparsity (the schedule's last round
    when it runs), the FLOPs reduction, the predicted and measured distortion of its masks,
    and the dense accuracy. The stages' other numbers stay in their own files."""
    calibrate, allocate, prune, finetune = (
        io.read_metrics(paths.metrics(s)) for s in ("calibrate", "allocate", "prune", "finetune")
    )
    out = {
        "accuracy": finetune["accuracy"],
        "sparsity": finetune["sparsity"],
        "flops_reduction": prune["flops_reduction"],
        "predicted_distortion": allocate["predicted_distortion"],
        "measured_distortion": prune["measured_distortion"],
        "dense_accuracy": calibrate["dense_accuracy"],
    }
    if params.schedule.rounds > 0:  # the last round's, and nothing of the one-shot model
        last = io.read_metrics(paths.metrics("schedule"))
        out = {k: last[k] for k in RESULT_METRICS if k in last}
        out["dense_accuracy"] = calibrate["dense_accuracy"]
    return out


def final_model(params: Params, paths: io.Paths, path: Path, register: bool) -> ModelRecord:
    """The network in checkpoint ``path`` for its MLflow run, with two calibration images as
    the input example; a registry version of ``track.registered_model`` if ``register``."""
    inputs, _, reference = io.read_calibration(paths.calibration)
    model = load_model(params, path, inputs.shape[1], reference.shape[1], "final model")
    name = params.track.registered_model if register else None
    return ModelRecord(model, inputs[:2], name)
