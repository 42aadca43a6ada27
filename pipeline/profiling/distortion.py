"""Per-layer rate-distortion curves: output distortion when one layer alone is pruned.

For layer l and grid sparsity s, the ``pruned_count(numel_l, s)`` smallest-magnitude weights
of l are zeroed, the calibration set is run, and the per-sample mean squared logit error
against the dense reference is reduced to its mean (``distortion``) and max
(``distortion_max``) over samples.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.nn.device import (
    keep_freed_memory,
    resolve_device,
)
from pipeline.nn.evaluation import torch_threads
from pipeline.profiling.fast import profile_fast
from pipeline.profiling.naive import profile_naive
from pipeline.pruning.masking import pruned_count


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

    @classmethod
    def from_profiles(
        cls,
        numel: Mapping[str, int],
        sparsity: np.ndarray,
        results: Sequence[tuple[np.ndarray, np.ndarray]],
        macs_per_weight: Mapping[str, int],
    ) -> DistortionCurves:
        """Curves from per-layer ``profile_layer`` results (mean, max), in ``numel``'s order."""
        return cls(
            layers=list(numel),
            numel=np.array(list(numel.values()), dtype=np.int64),
            sparsity=sparsity,
            mean=np.stack([mean for mean, _ in results]),
            max=np.stack([worst for _, worst in results]),
            macs_per_weight=np.array([macs_per_weight[n] for n in numel], dtype=np.int64),
        )

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
        """Raise if any value is NaN/inf or negative (a squared error), or shapes disagree."""
        shape = (len(self.layers), len(self.sparsity))
        if (
            self.mean.shape != shape
            or self.max.shape != shape
            or self.numel.shape != shape[:1]
            or self.macs_per_weight.shape != shape[:1]
        ):
            raise PipelineError(f"distortion table is not a full layer x level grid {shape}")
        for name, values in (("distortion", self.mean), ("distortion_max", self.max)):
            bad = ~np.isfinite(values) | (values < 0)
            if bad.any():
                layer, level = np.argwhere(bad)[0]
                raise PipelineError(
                    f"distortion table: {name} of layer {self.layers[layer]!r} at level {level} "
                    f"is {values[layer, level]}; allowed: finite values >= 0 (re-run the "
                    "profile stage)"
                )


ProfileEngine = Callable[..., tuple[np.ndarray, np.ndarray]]


ENGINES: dict[str, ProfileEngine] = {"fast": profile_fast, "naive": profile_naive}


def profile_layer(
    layer: str,
    *,
    model: nn.Module,
    inputs: torch.Tensor,
    reference: torch.Tensor,
    sparsities: np.ndarray,
    batch_size: int,
    threads: int,
    engine: str = "fast",
    memory_mb: int = 64,
    bn_correction: str | None = None,
    device: str | None = None,
    of_remaining: bool = False,
    repair: float | None = None,
    precision: str = "fp32",
) -> tuple[np.ndarray, np.ndarray]:
    """Distortion curve of one layer: (mean, max), each (K,) float64 over ``sparsities``.

    inputs: (N, ...) calibration inputs; reference: (N, classes) dense logits. ``engine``:
    "fast" (suffix-only recomputation) or "naive" (full forward passes); ``memory_mb`` bounds
    the batched multi-level passes; ``bn_correction`` (a ``BN_RULES`` name, or None) sets the
    statistics of the BatchNorm consuming the layer from the pruned outputs on the calibration
    set by that rule, as the prune stage's BN recalibration will. ``device``: a ``device``
    param name, resolved here (under Ray: on the worker) and the model moved there; None: run
    where the model is. ``of_remaining``: each sparsity is a fraction of the layer's non-zero
    weights, pruned after its zeros (the grid of an iterative round on a pruned model).
    ``repair``: None, or the damping of the layer-wise repair (repair.py) applied at each level
    before measuring, as the prune stage's ``prune.reconstruct`` will (alone in the network,
    the layer's input is the dense one, so both objectives give the same weights). Inputs may
    be on any device; the curves are CPU arrays. The model's weights are left unchanged, so it
    may be shared. ``precision``: what the per-level passes run in (``device.PRECISIONS``);
    the distortion sums are float64 whatever it is.
    """
    keep_freed_memory()
    if device is not None:
        model = model.to(resolve_device(device))
    args = (layer, model, inputs, reference, sparsities, batch_size, memory_mb)
    with torch_threads(threads):
        return ENGINES[engine](
            *args,
            bn_correction=bn_correction,
            of_remaining=of_remaining,
            repair=repair,
            precision_name=precision,
        )
