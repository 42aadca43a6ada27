"""prune: apply the allocated magnitude masks, measure accuracy and the actual joint distortion."""

from __future__ import annotations

import copy
import sys
from collections.abc import Sequence

from pipeline import io
from pipeline.batchnorm import recalibrate_bn
from pipeline.config import Params
from pipeline.data import calibration_subset, load_dataset
from pipeline.evaluation import accuracy, output_distortion, predict_logits
from pipeline.layers import prunable_numel
from pipeline.masking import apply_masks, magnitude_masks, zero_count
from pipeline.plots import joint_distortion_figure
from pipeline.stage import load_model, log, run_stage


def run(params: Params, paths: io.Paths) -> None:
    allocation = io.read_allocation(paths.allocation)
    inputs, _, reference = io.read_calibration(paths.calibration)
    splits = load_dataset(params.data)
    dense = load_model(
        params, paths.baseline, splits.in_channels, splits.num_classes, "baseline checkpoint"
    )
    model, batch = copy.deepcopy(dense), params.calibrate.batch_size
    allocation.check_matches(prunable_numel(model), str(paths.allocation))
    kept = dict(zip(allocation.layers, allocation.kept.tolist(), strict=True))
    apply_masks(model, magnitude_masks(model, kept))
    extra = {}
    if params.prune.bn_rule is not None:  # the same post-processing for every allocation method
        extra["accuracy_before_bn_recalibration"] = accuracy(model, splits.test)
        images, _ = calibration_subset(
            splits.train_eval,
            params.prune.bn_recalibration,
            params.seed + 1,
            "prune.bn_recalibration",
        )
        before = output_distortion(predict_logits(model, inputs, batch), reference)[0]
        extra["measured_distortion_before_bn_recalibration"] = before
        recalibrate_bn(model, dense, images, batch, params.prune.bn_rule)
    logits = predict_logits(model, inputs, batch)
    measured, measured_max = output_distortion(logits, reference)
    zeros, total = zero_count(model)
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
    joint = {"after BN recalibration" if extra else "as pruned": measured}
    if extra:
        joint["before BN recalibration"] = extra["measured_distortion_before_bn_recalibration"]
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
