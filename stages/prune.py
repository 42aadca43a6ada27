"""prune: apply the allocated magnitude masks, recover (repair and / or BatchNorm
recalibration, the same for every method), measure accuracy and the joint distortion."""

from __future__ import annotations

import copy
import sys
from collections.abc import Sequence

from pipeline.config.params import Params
from pipeline.edges import io, tables
from pipeline.edges.plots import joint_distortion_figure
from pipeline.edges.stage import load_model, log, recovery, recovery_images, run_stage
from pipeline.nn.data import load_dataset
from pipeline.nn.evaluation import accuracy, output_distortion, predict_logits
from pipeline.nn.layers import prunable_numel, unpruned_matrices, weight_matrices
from pipeline.pruning.masking import apply_masks, magnitude_masks, zero_count


def run(params: Params, paths: io.Paths) -> None:
    allocation = tables.read_allocation(paths.allocation)
    inputs, _, reference = io.read_calibration(paths.calibration)
    splits = load_dataset(params.data)
    dense = load_model(
        params, paths.baseline, splits.in_channels, splits.num_classes, "baseline checkpoint"
    )
    model, batch = copy.deepcopy(dense), params.calibrate.batch_size
    allocation.check_matches(prunable_numel(model), str(paths.allocation))
    masks = magnitude_masks(model, allocation.kept_by_layer)
    apply_masks(model, masks)
    recover, joint, extra = recovery(params), {}, {}
    step = "repair" if recover.objective else "bn_recalibration"
    label = {"repair": "repair", "bn_recalibration": "BN recalibration"}[step]
    if recover.active:  # the same post-processing for every allocation method
        extra[f"accuracy_before_{step}"] = accuracy(model, splits.test)
        before = output_distortion(predict_logits(model, inputs, batch), reference)[0]
        extra[f"measured_distortion_before_{step}"] = joint[f"before {label}"] = before
        report = recover(model, dense, masks, recovery_images(params, splits.train_eval))
        if report is not None:
            log.info(
                "prune: repaired %d layers (%s), set %d BatchNorms on the way",
                len(report.layers),
                recover.objective,
                len(report.batchnorms),
            )
    logits = predict_logits(model, inputs, batch)
    measured, measured_max = output_distortion(logits, reference)
    joint[f"after {label}" if recover.active else "as pruned"] = measured
    zeros, total = zero_count(model)
    if unpruned_matrices(model):  # the tool leaves them dense: say what that makes overall
        extra["sparsity_all_weight_matrices"] = sum(
            int((w == 0).sum()) for w in weight_matrices(model).values()
        ) / sum(w.numel() for w in weight_matrices(model).values())
    test_accuracy = accuracy(model, splits.test)
    io.write_state_dict(paths.pruned, model.state_dict())
    metrics = {
        "accuracy": test_accuracy,
        "sparsity": zeros / total,
        "flops_reduction": allocation.summary()["flops_reduction"],
        "measured_distortion": measured,
        "measured_distortion_max": measured_max,
        "predicted_distortion": allocation.total_predicted,
        **extra,
    }
    io.write_metrics(paths.metrics("prune"), metrics)
    io.write_figure(paths.figure("joint_distortion"), joint_distortion_figure(allocation, joint))
    log.info(
        "prune: sparsity %.4f, test accuracy %.4f, distortion measured %.6g vs predicted %.6g",
        zeros / total,
        test_accuracy,
        measured,
        allocation.total_predicted,
    )


def main(argv: Sequence[str] | None = None) -> int:
    return run_stage(run, argv)


if __name__ == "__main__":
    sys.exit(main())
