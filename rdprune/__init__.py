"""rdprune: layer-adaptive weight pruning by rate-distortion optimisation (Xu et al., ICCV
2023) as a Python library, on the pipeline's own core (no DVC, Ray or MLflow imported).

    curves = rdprune.profile(model, calib)                    # per-layer distortion curves
    allocation = rdprune.allocate(curves, 0.8, model=model)   # per-layer sparsities (exact DP)
    rdprune.prune(model, allocation, calib)                   # masks, repair, BatchNorm
    rdprune.save_compact("pruned.safetensors", model)         # packed masks + non-zeros

Everything runs where the model is (move it to a GPU first to profile there). ``rdprune`` is
the one import name of this project meant for users: ``pipeline`` and ``stages`` are the DVC
project's folders, installed beside it. If another distribution also provides a top-level
``pipeline``, importing rdprune fails with one clear error instead of using the wrong one.
"""

from __future__ import annotations

from pathlib import Path

import pipeline as _pipeline

if Path(_pipeline.__file__).resolve().parent.parent != Path(__file__).resolve().parent.parent:
    raise ImportError(
        f"rdprune: the top-level module 'pipeline' comes from {_pipeline.__file__}, not from "
        f"this installation ({Path(__file__).resolve().parent.parent}); another distribution "
        "provides a 'pipeline' package: uninstall it or use a separate environment"
    )

from rdprune.api import allocate, load_compact, profile, prune, save_compact  # noqa: E402

__all__ = ["allocate", "load_compact", "profile", "prune", "save_compact"]
