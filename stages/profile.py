"""profile: distortion curve of every prunable layer over the sparsity grid, through Ray."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pipeline.config.params import Params
from pipeline.edges import io, tables
from pipeline.edges.parallel.tasks import Placement
from pipeline.edges.plots import distortion_curves_figure
from pipeline.edges.profile_run import placement_summary, profile_curves
from pipeline.edges.stage import load_model, log, run_stage


def run(params: Params, paths: io.Paths) -> None:
    inputs, _, reference = io.read_calibration(paths.calibration)
    model = load_model(
        params, paths.baseline, inputs.shape[1], reference.shape[1], "baseline checkpoint"
    )
    placements: list[Placement] = []
    curves = profile_curves(params, model, inputs, reference, placements)
    meta = {
        "rdprune.arch": params.model.arch,
        "rdprune.in_channels": str(inputs.shape[1]),
        "rdprune.num_classes": str(reference.shape[1]),
    }
    tables.write_distortion(paths.distortion, curves, meta)
    io.write_figure(paths.figure("distortion_curves"), distortion_curves_figure(curves))
    metrics = {"layers": len(curves.layers), "levels": len(curves.sparsity)}
    io.write_metrics(paths.metrics("profile"), metrics)
    # Where the units ran changes from run to run: beside the wall times, never in metrics.
    placement = {"units": len(placements), **placement_summary(placements)}
    io.write_metrics(paths.timing("profile_placement"), placement)
    log.info(
        "profile: %d work units on %d node(s), %d GPU(s), devices %s",
        len(placements),
        placement["nodes"],
        placement["gpus"],
        ",".join(sorted({p.device for p in placements})),
    )
    log.info(
        "profile: %d layers x %d levels (%s engine, %s backend)",
        len(curves.layers),
        len(curves.sparsity),
        params.profile.engine,
        params.ray.backend,
    )


def main(argv: Sequence[str] | None = None) -> int:
    return run_stage(run, argv)


if __name__ == "__main__":
    sys.exit(main())
