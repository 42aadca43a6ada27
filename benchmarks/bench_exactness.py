"""Exactness of the fast engine: fast vs naive on the pretrained ResNet-20, BN-corrected
curves, in float32 and in float64 (a CUDA GPU); and, with ``--precisions``, each
``profile.precision`` against fp32 on ResNet-20 and a random-weight ResNet-50 (224x224,
synthetic images).

In float32 the per-entry relative difference is large only on entries near the rounding floor
(distortions ~1e-12: logits that differ by ~1e-6); this prints it for every entry, for entries
above 1e-3 of their curve's maximum, and as |difference| / curve maximum. In float64 the two
engines agree to ~1e-15: the algorithm is exact, the float32 spread is rounding.

Per precision: seconds, the largest and median relative error against fp32 on entries above
1e-3 of their curve's maximum, and whether rd's allocation at 50/80/90 % is the same (if not,
the fp32-predicted distortion of each).

Run: python benchmarks/bench_exactness.py [--calib FILE]                       (a CUDA GPU)
     python benchmarks/bench_exactness.py --precisions fp32,tf32,bf16 [--device cuda]
     python benchmarks/bench_exactness.py --precisions fp32,bf16 --device cpu --models resnet20
"""

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_profile import load_resnet20, run_engine, torchvision_model  # noqa: E402

from pipeline.allocation.problem import predicted_distortion
from pipeline.nn.device import exact_cuda
from pipeline.nn.evaluation import predict_logits
from pipeline.profiling.distortion import sparsity_grid


def option(name: str, default: str) -> str:
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


def curves_at(model, inputs, precision, levels, batch, memory_mb):
    """(curves, seconds) of the fast engine at ``precision`` (BN-corrected, no repair)."""
    import rdprune

    start = time.perf_counter()
    curves = rdprune.profile(
        model,
        inputs,
        levels=levels,
        batch_size=batch,
        reconstruct=None,
        memory_mb=memory_mb,
        precision=precision,
    )
    if inputs.is_cuda:
        torch.cuda.synchronize()
    return curves, time.perf_counter() - start


def precision_report(name, model, inputs, precisions, levels, batch, memory_mb):
    import rdprune

    out = {p: curves_at(model, inputs, p, levels, batch, memory_mb) for p in precisions}
    exact, _ = out["fp32"]
    for p, (curves, seconds) in out.items():
        errors = []
        for a, b in zip(exact.mean, curves.mean, strict=True):
            big = a > 1e-3 * a.max()
            errors.extend((np.abs(b[big] - a[big]) / a[big]).tolist())
        same = []
        for ratio in (0.5, 0.8, 0.9):
            a, b = rdprune.allocate(exact, ratio), rdprune.allocate(curves, ratio)
            if np.array_equal(a.kept, b.kept):
                same.append(f"{ratio:.0%} same")
            else:
                d = predicted_distortion(exact, "mean", b.kept).sum()
                same.append(f"{ratio:.0%} differs ({d:.4g} vs {a.total_predicted:.4g})")
        print(
            f"{name} {p}: {seconds:.1f} s; rel. error vs fp32 (entries > 1e-3 max): max "
            f"{max(errors):.2e}, median {np.median(errors):.2e}; rd: {', '.join(same)}",
            flush=True,
        )


if "--precisions" in sys.argv:
    device = torch.device(option("--device", "cuda"))
    precisions = option("--precisions", "fp32,tf32,bf16").split(",")
    models = option("--models", "resnet20,resnet50").split(",")
    if "fp32" not in precisions:
        precisions.insert(0, "fp32")
    if device.type == "cuda":
        exact_cuda()
    gpu = device.type == "cuda"
    if "resnet20" in models:
        model, inputs = load_resnet20(256, None)
        precision_report(
            "resnet20", model.to(device).eval(), inputs.to(device), precisions, 41,
            128 if gpu else 32, 16384 if gpu else 64,
        )  # fmt: skip
    if "resnet50" in models:
        gen = torch.Generator().manual_seed(0)
        images = torch.randn(256 if gpu else 16, 3, 224, 224, generator=gen)
        precision_report(
            "resnet50", torchvision_model("resnet50", 1000).to(device).eval(), images.to(device),
            precisions, 101 if gpu else 11, 64 if gpu else 8, 16384 if gpu else 256,
        )  # fmt: skip
    sys.exit(0)


class A:
    batch_size, memory_mb, threads, bn_correction = 128, 16384, 1, True


exact_cuda()
calib = Path(sys.argv[sys.argv.index("--calib") + 1]) if "--calib" in sys.argv else None
model, inputs = load_resnet20(256, calib)
for dtype in (torch.float32, torch.float64):
    m, x = model.to("cuda", dtype).eval(), inputs.to("cuda", dtype)
    grid = sparsity_grid(41)
    ref = predict_logits(m, x, 128)
    out = {e: run_engine(m, x, ref, grid, e, A) for e in ("naive", "fast")}
    worst, worst_big, worst_scaled = 0.0, 0.0, 0.0
    for (mn, _), (mf, _) in zip(out["naive"], out["fast"], strict=True):
        nz = mn != 0
        rel = np.abs(mn - mf)[nz] / np.abs(mn[nz])
        worst = max(worst, rel.max(initial=0))
        big = np.abs(mn) > 1e-3 * np.abs(mn).max()
        worst_big = max(worst_big, (np.abs(mn - mf)[big] / np.abs(mn[big])).max(initial=0))
        worst_scaled = max(worst_scaled, float(np.abs(mn - mf).max() / np.abs(mn).max()))
        if rel.max(initial=0) > 1e-2:
            i = int(np.argmax(np.abs(mn - mf) / np.where(nz, np.abs(mn), 1)))
            print(f"  {dtype} level {i}: naive {mn[i]:.3e} fast {mf[i]:.3e}")
    print(
        f"{dtype}: max rel diff all entries {worst:.1e}; entries > 1e-3 of the curve max "
        f"{worst_big:.1e}; max |diff| / curve max {worst_scaled:.1e}",
        flush=True,
    )
