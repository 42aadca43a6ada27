"""profile: distortion curve of every prunable layer over the sparsity grid, through Ray."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

import numpy as np

from pipeline import io
from pipeline.config import Params
from pipeline.distortion import DistortionCurves, profile_layer, sparsity_grid
from pipeline.layers import macs_per_weight, prunable_numel
from pipeline.parallel import map_tasks
from pipeline.stage import load_model, log, run_stage


def run(params: Params, paths: io.Paths) -> None:
    inputs, _, reference = io.read_calibration(paths.calibration)
    model = load_model(
        params, paths.baseline, inputs.shape[1], reference.shape[1], "baseline checkpoint"
    )
    numel = prunable_numel(model)
    grid = sparsity_grid(params.profile.levels)
    start = time.perf_counter()
    shared = {
        "model": model,
        "inputs": inputs,
        "reference": reference,
        "sparsities": grid,
        "batch_size": params.profile.batch_size,
        "threads": params.profile.threads,
        "engine": params.profile.engine,
        "memory_mb": params.profile.memory_mb,
        "bn_correction": params.profile.bn_correction,
    }
    results = map_tasks(
        profile_layer, list(numel), shared=shared, params=params.ray, desc="profile layers"
    )
    seconds = time.perf_counter() - start
    curves = DistortionCurves(
        layers=list(numel),
        numel=np.array(list(numel.values()), dtype=np.int64),
        sparsity=grid,
        mean=np.stack([mean for mean, _ in results]),
        max=np.stack([worst for _, worst in results]),
        macs_per_weight=np.array(list(macs_per_weight(model, inputs[:1]).values()), dtype=np.int64),
    )
    curves.check()
    meta = {
        "rdprune.arch": params.model.arch,
        "rdprune.in_channels": str(inputs.shape[1]),
        "rdprune.num_classes": str(reference.shape[1]),
    }
    io.write_distortion(paths.distortion, curves, meta)
    io.write_metrics(
        paths.metrics("profile"),
        {"layers": len(numel), "levels": len(grid), "seconds": round(seconds, 2)},
    )
    log.info(
        "profile: %d layers x %d levels in %.1f s (%s backend)",
        len(numel),
        len(grid),
        seconds,
        params.ray.backend,
    )


def main(argv: Sequence[str] | None = None) -> int:
    return run_stage(run, argv)


if __name__ == "__main__":
    sys.exit(main())
