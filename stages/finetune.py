"""finetune: train the pruned model with its masks held fixed."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pipeline.config.params import Params
from pipeline.edges import io
from pipeline.edges.stage import load_model, log, log_epoch, run_stage
from pipeline.nn.data import load_dataset
from pipeline.nn.evaluation import accuracy
from pipeline.nn.training import train
from pipeline.pruning.masking import masks_from_zeros, zero_count


def run(params: Params, paths: io.Paths) -> None:
    splits = load_dataset(params.data)
    model = load_model(
        params, paths.pruned, splits.in_channels, splits.num_classes, "pruned checkpoint"
    )
    history = train(
        model,
        splits.train,
        params.finetune,
        params.seed,
        masks=masks_from_zeros(model),
        evaluate=lambda m: accuracy(m, splits.test),
        on_epoch=log_epoch("finetune"),
        desc="finetune",
    )
    test_accuracy = accuracy(model, splits.test)
    zeros, total = zero_count(model)
    io.write_state_dict(paths.finetuned, model.state_dict())
    io.write_csv(
        paths.plot("finetune"),
        ["epoch", "loss", "accuracy"],
        [(h.epoch, h.loss, h.accuracy) for h in history],
    )
    io.write_metrics(
        paths.metrics("finetune"),
        {"accuracy": test_accuracy, "sparsity": zeros / total, "epochs": len(history)},
    )
    log.info("finetune: test accuracy %.4f at sparsity %.4f", test_accuracy, zeros / total)


def main(argv: Sequence[str] | None = None) -> int:
    return run_stage(run, argv)


if __name__ == "__main__":
    sys.exit(main())
