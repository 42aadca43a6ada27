"""Forward passes, output distortion and accuracy. Pure: tensors in, numbers out."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pipeline.nn.device import model_device


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` intra-op threads (None: unchanged), restoring the previous count.

    Profiling fixes the count so that every backend performs the same float operations and
    the distortion tables are byte-identical.
    """
    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@torch.no_grad()
def predict_logits(model: nn.Module, inputs: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Eval-mode logits (N, classes) float32 for inputs (N, ...), computed in batches on the
    model's device; the logits come back on the inputs' device."""
    model.eval()
    device = model_device(model)
    return torch.cat(
        [
            model(inputs[i : i + batch_size].to(device)).to(inputs.device)
            for i in range(0, len(inputs), batch_size)
        ]
    )


def per_sample_distortion(logits: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Mean squared logit error of each sample, float64: mean_c (logits - reference)^2.

    logits (..., N, C) against reference (N, C) -> (..., N).
    """
    diff = logits.to(torch.float64) - reference.to(torch.float64)
    return diff.pow(2).mean(dim=-1)


def output_distortion(logits: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(mean over samples, max over samples) of the per-sample mean squared logit error."""
    d = per_sample_distortion(logits, reference)
    return float(d.mean()), float(d.max())


@torch.no_grad()
def accuracy(model: nn.Module, dataset: Dataset, batch_size: int = 256) -> float:
    """Top-1 accuracy as a fraction in [0, 1], computed on the model's device."""
    model.eval()
    device = model_device(model)
    correct = total = 0
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        correct += int((model(x.to(device)).argmax(dim=1).cpu() == y).sum())
        total += len(y)
    return correct / total
