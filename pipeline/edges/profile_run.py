"""The profile stage's work as the stages run it: the calibration set's curves of every
prunable layer, cut into work units and run through the parallel backend (Ray by default),
and a summary of where the units ran.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from pipeline.config.params import Params
from pipeline.edges.parallel.tasks import Placement, run_tasks, session, task_slots
from pipeline.nn.layers import macs_per_weight, prunable_numel
from pipeline.profiling.distortion import DistortionCurves, sparsity_grid
from pipeline.profiling.workunits import assemble, layer_costs, plan_units, profile_unit

# ray.work_units null: units per task slot. One unit per layer already keeps a few workers
# busy; more units let big clusters finish together, each extra unit repeating its layer's
# upstream pass and self-check (docs/clusters.md#work-units).
UNITS_PER_SLOT = 4


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
    depend on the model, the params and, with ``ray.work_units`` null, on how many tasks run
    at once; on a CPU the table is the same for any cut (on a GPU the last bits may move).
    ``placements``, if given, receives where each unit ran (in unit order). Each
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
    with session(params.ray):  # one connection: the slots it reports, then the tasks
        target = params.ray.work_units or UNITS_PER_SLOT * task_slots(params.ray)
        units = plan_units(costs, levels, target)
        run = run_tasks(
            profile_unit,
            units,
            shared=shared,
            params=params.ray,
            desc="profile",
            device_arg="device",
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
