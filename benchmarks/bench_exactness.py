"""Exactness of the fast engine on a GPU: fast vs naive on the pretrained ResNet-20, BN-corrected
curves, in float32 and in float64.

In float32 the per-entry relative difference is large only on entries near the rounding floor
(distortions ~1e-12: logits that differ by ~1e-6); this prints it for every entry, for entries
above 1e-3 of their curve's maximum, and as |difference| / curve maximum. In float64 the two
engines agree to ~1e-15: the algorithm is exact, the float32 spread is rounding.

Run: python benchmarks/bench_exactness.py [--calib FILE]   (torch + numpy; a CUDA GPU)
"""

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_profile import load_resnet20, run_engine  # noqa: E402

from pipeline.device import exact_cuda  # noqa: E402
from pipeline.distortion import sparsity_grid  # noqa: E402
from pipeline.evaluation import predict_logits  # noqa: E402


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
