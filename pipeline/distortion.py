"""Per-layer rate-distortion curves: output distortion when one layer alone is pruned.

For layer l and grid sparsity s, the ``pruned_count(numel_l, s)`` smallest-magnitude weights
of l are zeroed, the calibration set is run, and the per-sample mean squared logit error
against the dense reference is reduced to its mean (``distortion``) and max
(``distortion_max``) over samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.evaluation import per_sample_distortion, predict_logits, torch_threads
from pipeline.masking import magnitude_mask, pruned_count


def sparsity_grid(levels: int) -> np.ndarray:
    """``levels`` evenly spaced sparsities 0, 1/(levels-1), ..., 1 as float64 (levels,)."""
    return np.arange(levels, dtype=np.float64) / (levels - 1)


@dataclass(frozen=True)
class DistortionCurves:
    """Profiled curves of L layers on a grid of K sparsities.

    layers: L names in ``named_modules()`` order; numel: (L,) int64 weights per layer;
    sparsity: (K,) float64 grid; mean, max: (L, K) float64 distortion (squared logit units);
    macs_per_weight: (L,) int64 multiply-accumulates each kept weight costs per sample.
    """

    layers: list[str]
    numel: np.ndarray
    sparsity: np.ndarray
    mean: np.ndarray
    max: np.ndarray
    macs_per_weight: np.ndarray

    def kept(self) -> np.ndarray:
        """(L, K) int64 weights kept at each grid level."""
        return np.array(
            [[n - pruned_count(int(n), float(s)) for s in self.sparsity] for n in self.numel],
            dtype=np.int64,
        )

    def curve(self, kind: str) -> np.ndarray:
        """(L, K) distortion of the chosen kind: "mean" or "max"."""
        return {"mean": self.mean, "max": self.max}[kind]

    def check(self) -> None:
        """Raise if any value is NaN/inf or shapes disagree."""
        shape = (len(self.layers), len(self.sparsity))
        if (
            self.mean.shape != shape
            or self.max.shape != shape
            or self.numel.shape != shape[:1]
            or self.macs_per_weight.shape != shape[:1]
        ):
            raise PipelineError(f"distortion table is not a full layer x level grid {shape}")
        for name, values in (("distortion", self.mean), ("distortion_max", self.max)):
            if not np.isfinite(values).all():
                layer, level = np.argwhere(~np.isfinite(values))[0]
                raise PipelineError(
                    f"distortion table: {name} of layer {self.layers[layer]!r} at level {level} "
                    "is NaN or inf; allowed: finite values (re-run the profile stage)"
                )


@torch.no_grad()
def profile_layer(
    layer: str,
    *,
    model: nn.Module,
    inputs: torch.Tensor,
    reference: torch.Tensor,
    sparsities: np.ndarray,
    batch_size: int,
    threads: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Distortion curve of one layer: (mean, max), each (K,) float64 over ``sparsities``.

    inputs: (N, ...) calibration inputs; reference: (N, classes) dense logits. The layer's
    weight is restored before returning, so ``model`` may be shared between calls.
    """
    weight = dict(model.named_modules())[layer].weight
    original = weight.detach().clone()
    means, maxes = np.zeros(len(sparsities)), np.zeros(len(sparsities))
    try:
        with torch_threads(threads):
            for j, s in enumerate(sparsities):
                if pruned_count(original.numel(), float(s)) == 0:
                    continue  # nothing pruned: the network is the dense one, distortion is 0
                weight.copy_(original * magnitude_mask(original, float(s)))
                d = per_sample_distortion(predict_logits(model, inputs, batch_size), reference)
                means[j], maxes[j] = float(d.mean()), float(d.max())
    finally:
        weight.copy_(original)
    return means, maxes
