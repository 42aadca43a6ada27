"""BatchNorm statistics: re-estimation after pruning (all BN layers), and the per-channel
statistics of one layer's output used to correct the BN that consumes it while profiling."""

from __future__ import annotations

import torch
from torch import nn

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, inputs: torch.Tensor, batch_size: int) -> int:
    """Re-estimate every BatchNorm's running mean/var on ``inputs`` (N, ...); returns the number
    of BN layers. Train-mode forward passes with a cumulative average (momentum None), all
    other modules in eval mode; the model is left in eval mode."""
    bns = [m for m in model.modules() if isinstance(m, BN_TYPES)]
    if not bns:
        return 0
    saved = [(m.momentum, m.training) for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        for i in range(0, len(inputs), batch_size):
            model(inputs[i : i + batch_size])
    finally:
        for m, (momentum, _) in zip(bns, saved, strict=True):
            m.momentum = momentum
        model.eval()
    return len(bns)


class ChannelMoments:
    """Per-channel mean and (population) variance of activations (N, C, ...) accumulated over
    batches in float64, so any batching of the same values gives the same statistics."""

    def __init__(self) -> None:
        self.count = 0
        self.total: torch.Tensor | None = None
        self.squares: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        dims = [0, *range(2, x.dim())]
        x = x.to(torch.float64)
        s, q = x.sum(dims), x.pow(2).sum(dims)
        self.total = s if self.total is None else self.total + s
        self.squares = q if self.squares is None else self.squares + q
        self.count += x.numel() // x.shape[1]

    def stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, var) float32 (C,)."""
        mean = self.total / self.count
        var = (self.squares / self.count - mean.pow(2)).clamp_min(0)
        return mean.to(torch.float32), var.to(torch.float32)
