"""The result record the track stage sends to MLflow: the params, the final metrics (the few
a user compares in ``dvc exp show``), the figures and the final model.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config.params import Params, flatten
from pipeline.edges import io, tables
from pipeline.edges.stage import STAGES, load_model
from pipeline.edges.tracking import ModelRecord, RunRecord

# logged beside the headline metrics when the prune stage measured them
EXTRA_PRUNE_METRICS = ("measured_distortion_max", "sparsity_all_weight_matrices")


def result_record(params: Params, paths: io.Paths) -> RunRecord:
    """What the MLflow run of a pipeline result holds: every param, the headline metrics (the
    ratio too, so the UI charts accuracy against it), the fine-tuning curve as steps, the
    allocation as a table, the figures and tables as artifacts, and the stages' wall times."""
    calibrate, allocate, prune, finetune = (
        io.read_metrics(paths.metrics(s)) for s in ("calibrate", "allocate", "prune", "finetune")
    )
    allocation = tables.read_allocation(paths.allocation)
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
