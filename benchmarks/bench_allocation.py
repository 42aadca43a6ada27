"""Allocation benchmark: the exact solver on ResNet-50- and VGG-16-sized problems.

Layer sizes and MACs come from torchvision's ResNet-50 and VGG-16 (random weights, 224x224);
the distortion curves are synthetic but realistic: increasing, convex-ish, noisy (so not
monotone), spread over six orders of magnitude between layers. Reports per problem and ratio:
solve time, peak memory (tracemalloc: numpy allocations), achieved vs requested budget,
the certified gap, and

  (a) the paper's algorithm, a DP over every kept-weight count, on scaled-down copies of the
      ResNet-50 problem (it cannot run at full size: its table has one entry per kept
      weight), with how its time and memory grow;
  (b) brute force on tiny problems.

Run: python benchmarks/bench_allocation.py   (about 1-2 minutes on 2 cores)
"""

from __future__ import annotations

import itertools
import time
import tracemalloc

import numpy as np
import torch
import torchvision

from pipeline.allocation.mckp import solve_mckp
from pipeline.allocation.methods import allocate
from pipeline.allocation.problem import Problem, kept_budget
from pipeline.nn.layers import macs_per_weight, prunable_numel
from pipeline.profiling.distortion import DistortionCurves, sparsity_grid


def layer_sizes(name: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    model = getattr(torchvision.models, name)(weights=None).eval()
    numel = prunable_numel(model)
    macs = macs_per_weight(model, torch.zeros(1, 3, 224, 224))
    return list(numel), np.array(list(numel.values())), np.array([macs[n] for n in numel])


def synthetic_curves(names, numel, macs, levels: int, seed: int = 0) -> DistortionCurves:
    rng = np.random.default_rng(seed)
    grid = sparsity_grid(levels)
    scale = 10 ** rng.uniform(-4, 2, size=(len(numel), 1))
    sharpness = rng.uniform(3, 12, size=(len(numel), 1))
    base = (np.exp(sharpness * grid) - 1) / (np.exp(sharpness) - 1)
    noise = 1 + 0.05 * rng.standard_normal(base.shape)
    mean = scale * base * noise
    mean[:, 0] = 0.0
    return DistortionCurves(
        names, numel.astype(np.int64), grid, mean, 3 * mean, macs.astype(np.int64)
    )


def measure(fn):
    """(result, seconds, peak MiB): timed without tracing, then run again under tracemalloc
    (which slows numpy allocations) for the peak of Python and numpy allocations."""
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return out, seconds, peak / 2**20


def full_problem(curves: DistortionCurves, targets: dict[str, float]) -> Problem:
    n = len(curves.layers)
    return Problem(curves, "mean", targets, np.zeros(n), np.ones(n))


def weight_granular_dp(kept: np.ndarray, value: np.ndarray, budget: int) -> tuple[float, int]:
    """The paper's algorithm: best[b] = least distortion with at most b kept weights, per layer,
    plus an int8 choice table of (layers x budget) for backtracking. Returns (objective, bytes)."""
    n_layers, n_levels = value.shape
    best = np.zeros(budget + 1)
    choice = np.zeros((n_layers, budget + 1), dtype=np.int8)
    for layer in range(n_layers):
        new = np.full(budget + 1, np.inf)
        for k in range(n_levels):
            c = int(kept[layer, k])
            if c > budget:
                continue
            candidate = best[: budget + 1 - c] + value[layer, k]
            better = candidate < new[c:]
            new[c:][better] = candidate[better]
            choice[layer, c:][better] = k
        best = new
    return float(best[budget]), choice.nbytes + best.nbytes * 2


def main() -> None:
    print("== exact solver (rd) on full-size problems, 101 levels ==")
    print(
        f"{'problem':<10} {'budget':<7} {'ratio':>6} {'time s':>8} {'peak MB':>8} "
        f"{'requested':>12} "
        f"{'achieved':>12} {'objective':>12} {'gap':>9} {'states':>7}"
    )
    problems = {}
    for model_name in ("resnet50", "vgg16"):
        names, numel, macs = layer_sizes(model_name)
        curves = synthetic_curves(names, numel, macs, 101)
        problems[model_name] = curves
        print(
            f"# {model_name}: {len(names)} layers, {numel.sum():,} weights, "
            f"{(numel * macs).sum():,} MACs"
        )
        for targets in (
            {"params": 0.5},
            {"params": 0.8},
            {"params": 0.9},
            {"params": 0.95},
            {"flops": 0.7},
            {"params": 0.8, "flops": 0.7},
        ):
            problem = full_problem(curves, targets)
            allocation, seconds, peak = measure(lambda p=problem: allocate("rd", p))
            summary = allocation.summary()
            for measure_name, ratio in targets.items():
                total = int((numel * (macs if measure_name == "flops" else 1)).sum())
                achieved = (allocation.flops if measure_name == "flops" else allocation.kept).sum()
                print(
                    f"{model_name:<10} {measure_name:<7} {ratio:>6.2f} {seconds:>8.3f} "
                    f"{peak:>8.1f} "
                    f"{kept_budget(ratio, total):>12,} {int(achieved):>12,} "
                    f"{summary['predicted_distortion']:>12.6g} {summary['gap']:>9.2e}"
                )

    print("\n== solver internals on resnet50, params 0.8 ==")
    curves = problems["resnet50"]
    budget = kept_budget(0.8, int(curves.numel.sum()))
    solution, seconds, peak = measure(lambda: solve_mckp(curves.kept(), curves.mean, [budget]))
    print(
        f"time {seconds:.3f} s, peak {peak:.1f} MB, passes {solution.passes}, "
        f"peak states {solution.peak_states}, objective {solution.objective:.9g}, "
        f"lower bound {solution.lower_bound:.9g}"
    )

    print(
        "\n== (a) versus the paper's weight-granularity DP on scaled-down resnet50 (101 levels) =="
    )
    print(
        f"{'weights':>10} {'paper s':>9} {'paper MB':>9} {'ours s':>8} {'ours MB':>8} "
        f"{'paper obj':>14} {'ours obj':>14}"
    )
    names, numel, macs = layer_sizes("resnet50")
    growth = []
    for divisor in (1000, 250, 100, 50, 25):
        small = np.maximum(numel // divisor, 2)
        c = synthetic_curves(names, small, macs, 101, seed=1)
        b = kept_budget(0.8, int(small.sum()))
        (paper_obj, paper_bytes), paper_s, _ = measure(
            lambda c=c, b=b: weight_granular_dp(c.kept(), c.mean, b)
        )
        ours, ours_s, ours_mb = measure(lambda c=c, b=b: solve_mckp(c.kept(), c.mean, [b]))
        growth.append((small.sum(), paper_s, paper_bytes))
        print(
            f"{small.sum():>10,} {paper_s:>9.3f} {paper_bytes / 2**20:>9.1f} {ours_s:>8.3f} "
            f"{ours_mb:>8.1f} "
            f"{paper_obj:>14.9g} {ours.objective:>14.9g}"
        )
        assert abs(paper_obj - ours.objective) <= 1e-9 * max(1.0, abs(paper_obj)), (
            "objectives differ"
        )
    (w0, s0, m0), (w1, s1, m1) = growth[0], growth[-1]
    full = int(numel.sum())
    print(
        f"paper's DP grows linearly in the weight count: x{w1 / w0:.0f} weights -> "
        f"x{s1 / s0:.1f} time, "
        f"x{m1 / m0:.1f} memory; extrapolated to the full {full:,} weights: "
        f"~{s1 * full / w1:.0f} s and ~{m1 * full / w1 / 2**30:.1f} GiB"
    )

    print("\n== (b) versus brute force on tiny problems (5 layers x 6 levels, both budgets) ==")
    rng = np.random.default_rng(0)
    worst = 0.0
    for trial in range(200):
        small = rng.integers(10, 400, size=5)
        c = synthetic_curves(
            [f"l{i}" for i in range(5)], small, rng.integers(1, 50, size=5), 6, seed=trial
        )
        kept = c.kept()
        costs = np.stack([kept, kept * c.macs_per_weight[:, None]])
        budgets = [kept_budget(rng.uniform(0.2, 0.9), int(x.max(axis=1).sum())) for x in costs]
        rows = np.arange(5)
        best = min(
            (
                c.mean[rows, ch].sum()
                for ch in itertools.product(range(6), repeat=5)
                if all(x[rows, ch].sum() <= b for x, b in zip(costs, budgets, strict=True))
            ),
            default=np.inf,
        )
        if np.isfinite(best):
            worst = max(worst, abs(solve_mckp(costs, c.mean, budgets).objective - best))
    print(f"200 random instances: largest |ours - brute force| = {worst:.3g}")


if __name__ == "__main__":
    main()
