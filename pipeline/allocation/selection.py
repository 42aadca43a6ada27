"""Choosing among candidate allocations by their measured joint distortion.

The additivity model predicts the network's distortion as a sum of single-layer curves; at
high sparsity it can mis-rank allocations. Measuring each candidate's joint output distortion
on the calibration set, after the same recovery the prune stage applies (repair and / or
BatchNorm recalibration), ranks them by what the objective actually is. Pure: no I/O.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from pipeline.allocation.problem import Allocation
from pipeline.nn.evaluation import output_distortion, predict_logits
from pipeline.pruning.masking import apply_masks, magnitude_masks
from pipeline.pruning.repair import Recover


def measured_distortion(
    model: nn.Module,
    allocation: Allocation,
    inputs: torch.Tensor,
    reference: torch.Tensor,
    batch_size: int,
    recover: Recover | None,
) -> float:
    """Mean per-sample logit MSE of ``model`` pruned by ``allocation`` against ``reference``
    (N, classes) on ``inputs`` (N, ...), after ``recover`` (with its own images, as the prune
    stage's: a repair fitted to the images it is measured on would flatter it)."""
    pruned = copy.deepcopy(model)
    kept = allocation.kept_by_layer
    masks = magnitude_masks(pruned, kept)
    apply_masks(pruned, masks)
    if recover is not None:
        recover(pruned, model, masks)
    return output_distortion(predict_logits(pruned, inputs, batch_size), reference)[0]


def select_measured(
    model: nn.Module,
    candidates: Mapping[str, Allocation],
    inputs: torch.Tensor,
    reference: torch.Tensor,
    batch_size: int,
    recover: Recover | None,
) -> tuple[str, dict[str, float]]:
    """(name of the candidate with the least measured distortion, every candidate's value).
    Ties go to the first candidate."""
    measured = {
        name: measured_distortion(model, a, inputs, reference, batch_size, recover)
        for name, a in candidates.items()
    }
    return min(measured, key=measured.__getitem__), measured
