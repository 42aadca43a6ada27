"""Parallel profiling benchmark: Ray over 1 vs 2 local workers, the work-unit split's makespan
on a 54-layer model, and the accuracy of the unit cost model.

1. CIFAR ResNet-20 (random weights, standard-normal inputs: timing only), 128 images,
   21 levels, the shipped profile settings (fast engine, BN-corrected curves). Profiled in
   process (serial), then on a private local Ray instance with 1 and with 2 worker CPUs. The
   instance is started and its workers warmed up (torch imported) before the clock starts.
   The three tables must be byte-identical.
2. The serial run times every work unit; the cost model's estimate is compared with it
   (one fitted scale: MACs -> seconds).
3. torchvision ResNet-50 at 224x224 (54 prunable layers, 101 levels): list scheduling of the
   units, largest first, on W workers (what Ray's FIFO queue does), with the cost model's
   costs; makespan against total work / W, for one unit per layer and for the split.

Run: python benchmarks/bench_parallel.py [--quick] [--ray-only]   (about 6 minutes on 2 idle
cores; --quick: 2)
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import os
import time

import numpy as np
import ray
import torch

from pipeline.config.params import Params
from pipeline.config.runtime import RayParams
from pipeline.edges import tables
from pipeline.edges.profile_run import UNITS_PER_SLOT, profile_curves
from pipeline.nn.evaluation import predict_logits
from pipeline.nn.layers import macs_per_weight, prunable_numel
from pipeline.nn.models import build_model
from pipeline.profiling.distortion import sparsity_grid
from pipeline.profiling.workunits import layer_costs, plan_units, profile_unit


def params_for(levels: int, backend: str, work_units: int | None = RayParams.work_units) -> Params:
    base = Params()
    profile = dataclasses.replace(base.profile, levels=levels, bn_correction=True)
    return dataclasses.replace(
        base, profile=profile, ray=RayParams(backend=backend, work_units=work_units)
    )


def table_bytes(curves) -> bytes:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.parquet"
        tables.write_distortion(path, curves, {})
        return path.read_bytes()


def timed_units(params: Params, model, inputs, reference) -> tuple[float, list[tuple]]:
    """Serial profile, unit by unit: (seconds, [(unit, seconds)])."""
    numel, macs = prunable_numel(model), macs_per_weight(model, inputs[:1])
    levels = params.profile.levels
    share = min(1.0, params.profile.batch_size / len(inputs))
    costs = layer_costs(numel, macs, params.profile.engine, params.profile.bn_correction, share)
    shared = {
        "model": model,
        "inputs": inputs,
        "reference": reference,
        "sparsities": sparsity_grid(levels),
        "batch_size": params.profile.batch_size,
        "threads": params.profile.threads,
        "engine": params.profile.engine,
        "memory_mb": params.profile.memory_mb,
        "bn_correction": params.prune.bn_recalibration_mode,
    }
    out = []
    for unit in plan_units(costs, levels, params.ray.work_units or UNITS_PER_SLOT):  # 1 slot
        start = time.perf_counter()
        profile_unit(unit, **shared)
        out.append((unit, time.perf_counter() - start))
    return sum(t for _, t in out), out


def ray_profile(workers: int, levels: int, model, inputs, reference) -> tuple[float, bytes]:
    ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False)
    try:
        profile_curves(params_for(2, "ray"), model, inputs, reference)  # warm the workers up
        start = time.perf_counter()
        # the same units for 1 and 2 workers (null would plan 4 and 8): the same work compared
        fixed = params_for(levels, "ray", 2 * UNITS_PER_SLOT)
        curves = profile_curves(fixed, model, inputs, reference)
        return time.perf_counter() - start, table_bytes(curves)
    finally:
        ray.shutdown()


def cost_model_accuracy(timings: list[tuple]) -> str:
    """How well estimated MACs predict measured seconds: rank correlation, and the relative
    error after one affine fit (seconds = a * MACs + b; b: per-unit overhead)."""
    cost = np.array([u.cost for u, _ in timings])
    seconds = np.array([t for _, t in timings])
    a, b = np.polyfit(cost, seconds, 1)
    rel = np.abs(a * cost + b - seconds) / seconds
    rank = np.corrcoef(np.argsort(np.argsort(cost)), np.argsort(np.argsort(seconds)))[0, 1]
    return (
        f"{len(timings)} units: Spearman {rank:.3f}; fitted overhead {b * 1e3:.0f} ms/unit; "
        f"relative error median {np.median(rel):.0%}, max {rel.max():.0%}"
    )


def predicted_overhead(model, inputs, levels: int = 21, units: int = 64) -> float:
    """Estimated work of the split over one unit per layer (fast engine, BN-corrected)."""
    numel, macs = prunable_numel(model), macs_per_weight(model, inputs[:1])
    costs = layer_costs(numel, macs, "fast", True, min(1.0, 32 / len(inputs)))
    whole = sum(f + p * levels for f, p in costs.values())
    return sum(u.cost for u in plan_units(costs, levels, units)) / whole


def makespan(costs: list[float], workers: int) -> float:
    """Greedy list scheduling in the given order: each unit to the first free worker."""
    free = [0.0] * workers
    for c in costs:
        heapq.heappush(free, heapq.heappop(free) + c)
    return max(free)


def simulate_resnet50(levels: int) -> None:
    import torchvision

    model = torchvision.models.resnet50(weights=None).eval()
    numel = prunable_numel(model)
    macs = macs_per_weight(model, torch.zeros(1, 3, 224, 224))
    costs = layer_costs(numel, macs, "fast", bn_correction=True, check_share=32 / 256)
    unsplit = sum(f + p * levels for f, p in costs.values())
    print(
        f"\nResNet-50 224x224: {len(numel)} layers x {levels} levels x 256 images (batches of 32), "
        "fast engine, BN-corrected"
    )
    print(f"{'split':<22} {'units':>8} {'work':>6}  makespan / (total work / W) for W =")
    workers = [1, 2, 4, 8, 16, 32, 64, 128]
    print(f"{'':<22} {'':>8} {'':>6}  " + " ".join(f"{w:>6}" for w in workers))
    rows = [("one unit per layer", lambda w: 1), ("null: 4 x W (default)", lambda w: 4 * w)]
    rows += [(f"work_units {n}", lambda w, n=n: n) for n in (16, 64, 256, 1024)]
    for label, units_for in rows:
        plans = [plan_units(costs, levels, units_for(w)) for w in workers]
        # against the unsplit total: what the split's repeated prefixes cost is included
        ratios = [
            makespan([u.cost for u in p], w) / (unsplit / w)
            for p, w in zip(plans, workers, strict=True)
        ]
        counts = sorted({len(p) for p in plans})
        total = sum(u.cost for u in plans[-1])
        units = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
        print(
            f"{label:<22} {units:>8} {total / unsplit:>6.3f}  "
            + " ".join(f"{r:>6.2f}" for r in ratios)
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="64 images, 11 levels")
    parser.add_argument("--ray-only", action="store_true", help="only the 1 vs 2 worker timing")
    args = parser.parse_args()
    images, levels = (64, 11) if args.quick else (128, 21)
    torch.manual_seed(0)
    model = build_model("cifar_resnet20", 3, 10).eval()
    inputs = torch.randn(images, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    reference = predict_logits(model, inputs, 128)
    print(f"CIFAR ResNet-20 (random weights), {images} images x {levels} levels, fast + BN")
    print(f"  load average before: {os.getloadavg()[0]:.2f} (2 cores, shared)")
    if not args.ray_only:
        whole_s, whole = timed_units(params_for(levels, "serial", 1), model, inputs, reference)
        print(f"  serial, one unit a layer {whole_s:7.1f} s   {len(whole)} units")
        serial_s, timings = timed_units(params_for(levels, "serial", 64), model, inputs, reference)
        print(f"  serial, work_units 64    {serial_s:7.1f} s   {len(timings)} units")
        print(f"  cost model's predicted split overhead: {predicted_overhead(model, inputs):.3f}x")
        print(f"  cost model, whole layers: {cost_model_accuracy(whole)}")
        print(f"  cost model, split units:  {cost_model_accuracy(timings)}")
    serial = table_bytes(profile_curves(params_for(levels, "serial"), model, inputs, reference))
    one_s, one = ray_profile(1, levels, model, inputs, reference)
    print(f"  Ray, 1 worker            {one_s:7.1f} s")
    two_s, two = ray_profile(2, levels, model, inputs, reference)
    print(f"  Ray, 2 workers           {two_s:7.1f} s   speed-up {one_s / two_s:.2f}x")
    print(f"  tables byte-identical (serial, 1, 2 workers): {serial == one == two}")
    print(f"  load average after: {os.getloadavg()[0]:.2f}")
    if not args.ray_only:
        simulate_resnet50(11 if args.quick else 101)


if __name__ == "__main__":
    main()
