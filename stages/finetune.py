"""finetune: train the pruned model with its masks held fixed; log the pipeline result to MLflow."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pipeline import io
from pipeline.config import Params
from pipeline.data import load_dataset
from pipeline.evaluation import accuracy
from pipeline.masking import masks_from_zeros, zero_count
from pipeline.stage import load_model, log, log_result, run_stage
from pipeline.training import train


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
    )
    for h in history:
        log.info("finetune epoch %d: loss %.4f, test accuracy %.4f", h.epoch, h.loss, h.accuracy)
    test_accuracy = accuracy(model, splits.test)
    zeros, total = zero_count(model)
    outputs = [paths.finetuned, paths.metrics("finetune")]
    io.write_state_dict(paths.finetuned, model.state_dict())
    io.write_metrics(
        outputs[1], {"accuracy": test_accuracy, "sparsity": zeros / total, "epochs": len(history)}
    )
    try:
        run_id = log_result(params, paths, history)
    except Exception:
        for path in outputs:  # an untracked result must not look finished to DVC
            path.unlink(missing_ok=True)
        raise
    log.info(
        "finetune: test accuracy %.4f at sparsity %.4f; MLflow run %s",
        test_accuracy,
        zeros / total,
        run_id,
    )


def main(argv: Sequence[str] | None = None) -> int:
    return run_stage(run, argv)


if __name__ == "__main__":
    sys.exit(main())
