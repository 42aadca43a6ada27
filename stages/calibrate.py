"""calibrate: seeded calibration subset, the dense model's reference logits and accuracy."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pipeline import io
from pipeline.config import Params
from pipeline.data import calibration_subset, load_dataset
from pipeline.evaluation import accuracy, predict_logits
from pipeline.stage import load_model, log, run_stage


def run(params: Params, paths: io.Paths) -> None:
    splits = load_dataset(params.data)
    inputs, labels = calibration_subset(splits.train_eval, params.calibrate.size, params.seed)
    model = load_model(
        params, paths.baseline, splits.in_channels, splits.num_classes, "baseline checkpoint"
    )
    reference = predict_logits(model, inputs, params.calibrate.batch_size)
    dense_accuracy = accuracy(model, splits.test)
    io.write_calibration(paths.calibration, inputs, labels, reference)
    io.write_metrics(
        paths.metrics("calibrate"),
        {
            "dense_accuracy": dense_accuracy,
            "calibration_accuracy": float((reference.argmax(1) == labels).float().mean()),
            "size": len(labels),
        },
    )
    log.info("calibrate: %d images, dense test accuracy %.4f", len(labels), dense_accuracy)


def main(argv: Sequence[str] | None = None) -> int:
    return run_stage(run, argv)


if __name__ == "__main__":
    sys.exit(main())
