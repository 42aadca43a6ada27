"""allocate: per-layer sparsities that minimise summed distortion under `prune.ratio`."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pipeline import io
from pipeline.allocation import ALLOCATORS
from pipeline.config import Params
from pipeline.stage import log, run_stage


def run(params: Params, paths: io.Paths) -> None:
    curves = io.read_distortion(paths.distortion)
    allocation = ALLOCATORS[params.allocate.method](
        curves, params.prune.ratio, params.allocate.distortion
    )
    total = int(allocation.numel.sum())
    sparsity = 1 - int(allocation.kept.sum()) / total
    extra = {
        "rdprune.method": params.allocate.method,
        "rdprune.ratio": repr(params.prune.ratio),
        "rdprune.distortion": params.allocate.distortion,
    }
    io.write_allocation(paths.allocation, allocation, extra)
    io.write_csv(
        paths.plot("allocation"),
        ["layer", "sparsity", "kept", "numel", "predicted_distortion"],
        list(
            zip(
                allocation.layers,
                allocation.sparsity.tolist(),
                allocation.kept.tolist(),
                allocation.numel.tolist(),
                allocation.predicted_distortion.tolist(),
                strict=True,
            )
        ),
    )
    io.write_metrics(
        paths.metrics("allocate"),
        {
            "predicted_distortion": allocation.total_predicted,
            "sparsity": sparsity,
            "kept": int(allocation.kept.sum()),
            "ratio": params.prune.ratio,
        },
    )
    log.info(
        "allocate (%s): sparsity %.4f, predicted distortion %.6g",
        params.allocate.method,
        sparsity,
        allocation.total_predicted,
    )


def main(argv: Sequence[str] | None = None) -> int:
    return run_stage(run, argv)


if __name__ == "__main__":
    sys.exit(main())
