"""Glue of the schedule stage: from params and files to the core's rounds
(``pipeline.pruning.schedule``) and back to an MLflow record, and the round folders'
format (checkpoint, allocation table, metrics written last). Imports no mlflow."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.allocation.problem import Allocation, kept_budget, layer_bounds
from pipeline.config.params import Params, flatten
from pipeline.edges import io, tables
from pipeline.edges.profile_run import profile_curves
from pipeline.edges.result import final_model
from pipeline.edges.stage import load_model, log, log_epoch, recovery, recovery_images
from pipeline.edges.tracking import RunRecord
from pipeline.errors import PipelineError
from pipeline.nn.data import DatasetSplits, load_dataset
from pipeline.nn.device import device_identity, model_device
from pipeline.nn.evaluation import accuracy
from pipeline.nn.layers import macs_per_weight, prunable_numel
from pipeline.nn.training import train
from pipeline.pruning.masking import masks_from_zeros, pruned_count
from pipeline.pruning.schedule import RoundSettings, target_sparsity

# What a round's result depends on besides the previous round (its key holds them all):
# everything the schedule stage reads but the number of rounds, the parallel backend and the
# one-shot knobs. ``device`` is in: a GPU and a CPU do not give the same bytes.
KEY_SECTIONS = (
    "seed",
    "device",
    "model",
    "data",
    "calibrate",
    "profile",
    "allocate",
    "prune",
    "finetune",
    "schedule",
)
NOT_KEY = (
    "schedule.rounds",
    "allocate.pareto_ratios",
    "allocate.steps",
    "allocate.flops_ratio",
    "prune.ratio",
    "finetune.epochs",
)


@dataclass(frozen=True)
class RoundSetup:
    """Everything the rounds share: settings, calibration inputs, data, and per-round steps."""

    params: Params
    settings: RoundSettings
    start: nn.Module  # the baseline model, on the device: round 1 starts from it
    inputs: torch.Tensor  # (N, ...) calibration inputs, on the device
    splits: DatasetSplits
    images: torch.Tensor | None  # the recovery's images (stage.recovery_images)
    macs: dict[str, int]
    key_settings: dict[str, Any]
    meta: dict[str, str]  # allocation table metadata
    slack: float  # one weight per layer, as a sparsity: the rounding a round may miss by

    @property
    def methods(self) -> list[str]:
        """The method and its candidates: the allocations each round computes."""
        return [self.settings.method, *self.settings.candidates]

    def steps(self, round_index: int) -> dict[str, Any]:
        """The injected steps of ``run_round`` for round ``round_index``."""
        params = self.params

        def profile(model: nn.Module, reference: torch.Tensor):
            return profile_curves(params, model, self.inputs, reference, of_remaining=True)

        def retrain(model: nn.Module) -> None:
            train(
                model,
                self.splits.train,
                params.retrain,
                params.seed + round_index,  # a stream of its own per round: resumable
                masks=masks_from_zeros(model),
                on_epoch=log_epoch(f"schedule round {round_index}"),
                desc=f"round {round_index}",
            )

        return {
            "profile": profile,
            "macs_per_weight": self.macs,
            "recover": recovery(params).on(self.images),
            "retrain": retrain,
            "evaluate": lambda model: accuracy(model, self.splits.test),
        }


def key_settings(params: Params) -> dict[str, Any]:
    """The params a round's result depends on (see ``KEY_SECTIONS``), dotted keys; ``device``
    as what it resolves to here (``auto`` is a CPU on one machine and a GPU on another)."""
    settings = {
        k: v
        for k, v in flatten(params).items()
        # the work units cut the profile's batched passes; the rest of ``ray`` changes nothing
        if (k.split(".")[0] in KEY_SECTIONS or k == "ray.work_units") and k not in NOT_KEY
    }
    settings["device"] = device_identity(params.device)
    return settings


def check_reachable(params: Params, numel: dict[str, int], macs: dict[str, int]) -> None:
    """Fail before round 1 when the last round's target needs more sparsity than
    ``allocate.limits`` / ``exclude`` allow (rounds would otherwise fail hours in)."""
    names = list(numel)
    _, hi = layer_bounds(names, params.allocate.limits, params.allocate.exclude)
    n = np.array([numel[name] for name in names], dtype=np.int64)
    unit = (
        np.ones_like(n)
        if params.allocate.budget == "params"
        else np.array([macs[name] for name in names], dtype=np.int64)
    )
    fewest = n - np.array([pruned_count(int(k), float(h)) for k, h in zip(n, hi, strict=True)])
    s = params.schedule
    target = target_sparsity(s.rounds, s.amount)
    if int((unit * fewest).sum()) > kept_budget(target, int((unit * n).sum())):
        most = 1 - int((unit * fewest).sum()) / int((unit * n).sum())
        raise PipelineError(
            f"schedule.rounds = {s.rounds} with schedule.amount = {s.amount} needs "
            f"{params.allocate.budget} sparsity {target:.4f}, but allocate.limits / exclude "
            f"allow at most {most:.4f}; allowed: fewer rounds, a smaller amount or looser limits"
        )


def round_setup(params: Params, paths: io.Paths) -> RoundSetup:
    """Read the baseline, the calibration set and the data once for all rounds."""
    inputs, _, _ = io.read_calibration(paths.calibration)
    splits = load_dataset(params.data)
    start = load_model(
        params, paths.baseline, splits.in_channels, splits.num_classes, "baseline checkpoint"
    )
    inputs = inputs.to(model_device(start))
    numel = prunable_numel(start)
    lo, hi = layer_bounds(list(numel), params.allocate.limits, params.allocate.exclude)
    macs = macs_per_weight(start, inputs[:1])
    check_reachable(params, numel, macs)
    images = recovery_images(params, splits.train_eval)
    settings = RoundSettings(
        amount=params.schedule.amount,
        method=params.allocate.method,
        kind=params.allocate.distortion,
        measure=params.allocate.budget,
        lo=lo,
        hi=hi,
        levels=params.profile.levels,
        batch_size=params.calibrate.batch_size,
        candidates=tuple(params.allocate.candidates),
    )
    return RoundSetup(
        params=params,
        settings=settings,
        start=start,
        inputs=inputs,
        splits=splits,
        images=images,
        macs=macs,
        slack=len(numel) / sum(numel.values()),
        key_settings=key_settings(params),
        meta={"rdprune.method": params.allocate.method, "rdprune.grid": "of remaining weights"},
    )


def report_round(k: int, metrics: dict[str, Any], slack: float) -> None:
    """Log a computed round; warn when limits pushed it past its target by more than
    rounding (``slack``: one weight per layer, as a sparsity)."""
    if metrics["sparsity"] > metrics["target_sparsity"] + slack:
        log.warning(  # a minimum in allocate.limits forces more than the target
            "schedule round %d: sparsity %.4f is above the round's target %.4f "
            "(allocate.limits minimums)",
            k,
            metrics["sparsity"],
            metrics["target_sparsity"],
        )
    log.info(
        "schedule round %d: sparsity %.4f, accuracy %.4f (%.4f before retraining)",
        k,
        metrics["sparsity"],
        metrics["accuracy"],
        metrics["accuracy_before_retrain"],
    )


def schedule_record(params: Params, paths: io.Paths) -> RunRecord | None:
    """The MLflow record of a schedule: the round results as steps (step = round; accuracy
    and sparsity both as series, so the UI can chart either against the other), one child
    record per round with its allocation. None when the schedule is off."""
    entries = io.read_json(paths.metrics("rounds"))
    if not entries:
        return None
    series = ("accuracy", "sparsity", "accuracy_before_retrain", "measured_distortion")
    children = []
    for entry in entries:
        allocation = tables.read_allocation(paths.round(entry["round"]) / "allocation.parquet")
        children.append(
            (
                f"round {entry['round']}",
                RunRecord(
                    params={"round": entry["round"]},
                    metrics=_numbers(entry),
                    steps={},
                    tables={
                        "allocation.json": {
                            "layer": allocation.layers,
                            "sparsity": allocation.sparsity.tolist(),
                            "kept": allocation.kept.tolist(),
                        }
                    },
                    artifacts=[],
                    tags={"rdprune.stage": "schedule"},
                ),
            )
        )
    return RunRecord(
        params=flatten(params),
        metrics={**_numbers(entries[-1]), "rounds": len(entries)},
        steps={f"round_{s}": [(e["round"], e[s]) for e in entries] for s in series},
        tables={"rounds.json": {k: [e.get(k) for e in entries] for k in entries[0]}},
        artifacts=[paths.metrics("rounds")],
        tags={"rdprune.stage": "schedule"},
        children=children,
        model=final_model(params, paths, paths.round(entries[-1]["round"]) / "model.pt", True),
    )


def _numbers(entry: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in entry.items() if isinstance(v, int | float) and v is not None}


def schedule_files(paths: io.Paths) -> list[Path]:
    """What a schedule's result is: its MLflow run is keyed by these files' bytes."""
    return [paths.metrics("rounds"), paths.metrics("schedule")]


# ---------------------------------------------------------------------------- round folders
ROUND_FILES = ("model.pt", "allocation.parquet", "metrics.json")  # metrics.json last: done


def write_round(
    folder: Path,
    state_dict: Mapping[str, torch.Tensor],
    allocation: Allocation,
    metrics: Mapping[str, Any],
    extra: Mapping[str, str],
) -> None:
    """One finished round: its checkpoint, allocation and metrics. The metrics file, written
    last, marks the round complete: a round killed half-way is recomputed, not half-read."""
    folder = Path(folder)
    (folder / "metrics.json").unlink(missing_ok=True)
    io.write_state_dict(folder / "model.pt", state_dict)
    tables.write_allocation(folder / "allocation.parquet", allocation, extra)
    io.write_metrics(folder / "metrics.json", metrics)


def read_round(folder: Path, key: str) -> tuple[Any, Allocation, dict[str, Any]] | None:
    """(state_dict, allocation, metrics) of the round in ``folder`` if it finished under
    ``key``, else None (absent, unfinished, or made by other settings)."""
    folder = Path(folder)
    if not all((folder / name).is_file() for name in ROUND_FILES):
        return None
    try:
        metrics = io.read_metrics(folder / "metrics.json")
        if not isinstance(metrics, dict) or metrics.get("key") != key:
            return None
        state = io.read_checkpoint(folder / "model.pt", "round checkpoint")
        return state, tables.read_allocation(folder / "allocation.parquet"), metrics
    except PipelineError:  # a damaged file: the round is computed again
        return None


def round_folders(folder: Path) -> dict[int, Path]:
    """Round number -> folder, for the folders ``Paths.round`` names (``round_NNN``)."""
    found = {}
    for path in Path(folder).glob("round_*"):
        match = re.fullmatch(r"round_(\d+)", path.name)
        if match and path.is_dir():
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))
