"""calibrate: seeded calibration set, the dense model's reference logits and accuracy."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pipeline.config.params import Params
from pipeline.edges import io
from pipeline.edges.stage import load_model, log, run_stage
from pipeline.nn.data import CALIBRATION_SOURCES, load_dataset
from pipeline.nn.evaluation import accuracy, predict_logits


def run(params: Params, paths: io.Paths) -> None:
    splits = load_dataset(params.data)
    draw = CALIBRATION_SOURCES[params.calibrate.source]
    inputs, labels = draw(splits.train_eval, params.calibrate.samples, params.seed)
    model = load_model(
        params, paths.baseline, splits.in_channels, splits.num_classes, "baseline checkpoint"
    )
    reference = predict_logits(model, inputs, params.calibrate.batch_size)
    if labels is None:  # zero-data calibration: the dense model's own predictions
        labels = reference.argmax(1)
    dense_accuracy = accuracy(model, splits.test)
    io.write_calibration(paths.calibration, inputs, labels, reference)
    metrics = {
        "dense_accuracy": dense_accuracy,
        "calibration_accuracy": float((reference.argmax(1) == labels).float().mean()),
        "size": len(labels),
    }
    io.write_metrics(paths.metrics("calibrate"), metrics)
    log.info(
        "calibrate: %d %s inputs, dense test accuracy %.4f",
        len(labels),
        params.calibrate.source,
        dense_accuracy,
    )


def main(argv: Sequence[str] | None = None) -> int:
    return run_stage(run, argv)


if __name__ == "__main__":
    sys.exit(main())
