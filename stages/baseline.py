"""baseline: train the default model (seeded) or adopt `model.checkpoint` as the dense model."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch

from pipeline.config.params import Params
from pipeline.edges import io
from pipeline.edges.stage import adopt_checkpoint, log, log_epoch, run_stage, stage_device
from pipeline.nn.data import load_dataset
from pipeline.nn.evaluation import accuracy
from pipeline.nn.models import build_model
from pipeline.nn.training import train


def run(params: Params, paths: io.Paths) -> None:
    splits = load_dataset(params.data)
    torch.manual_seed(params.seed)  # seeded initialisation
    model = build_model(params.model.arch, splits.in_channels, splits.num_classes)
    model.to(stage_device(params))  # initialised on the CPU: the same weights on every device
    epochs = 0
    if params.model.checkpoint is None:
        history = train(
            model,
            splits.train,
            params.baseline,
            params.seed,
            evaluate=lambda m: accuracy(m, splits.test),
            on_epoch=log_epoch("baseline"),
            desc="baseline",
        )
        epochs = len(history)
    else:
        adopt_checkpoint(model, params)
    test_accuracy = accuracy(model, splits.test)
    io.write_state_dict(paths.baseline, model.state_dict())
    io.write_metrics(paths.metrics("baseline"), {"accuracy": test_accuracy, "epochs": epochs})
    log.info("baseline: test accuracy %.4f -> %s", test_accuracy, paths.baseline)


def main(argv: Sequence[str] | None = None) -> int:
    return run_stage(run, argv)


if __name__ == "__main__":
    sys.exit(main())
