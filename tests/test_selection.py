import copy

import numpy as np
import torch

from pipeline.allocation.problem import Allocation
from pipeline.allocation.selection import measured_distortion, select_measured
from pipeline.nn.evaluation import output_distortion, predict_logits
from pipeline.nn.layers import prunable_numel
from pipeline.pruning.masking import apply_masks, magnitude_masks, masks_from_zeros
from pipeline.pruning.repair import Recovery
from tests.models_zoo import TinyResNet, randomized


def allocation_keeping(model, fraction: float) -> Allocation:
    numel = prunable_numel(model)
    n = np.array(list(numel.values()))
    kept = np.floor(n * fraction).astype(np.int64)
    zeros = np.zeros(len(n))
    return Allocation(
        list(numel), n, zeros.astype(np.int64), 1 - kept / n, kept, np.ones(len(n), np.int64), zeros
    )


def test_selection_picks_the_least_measured_distortion():
    model = randomized(TinyResNet())
    inputs = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    reference = predict_logits(model, inputs, 16)
    light, heavy = allocation_keeping(model, 0.9), allocation_keeping(model, 0.2)
    chosen, measured = select_measured(
        model, {"heavy": heavy, "light": light}, inputs, reference, 16, Recovery().on(inputs)
    )
    assert chosen == "light" and 0 < measured["light"] < measured["heavy"]
    assert all(mask.all() for mask in masks_from_zeros(model).values())  # the model is untouched
    # the value is the joint distortion of the pruned network, computed independently here
    clone = copy.deepcopy(model)
    kept = light.kept_by_layer
    apply_masks(clone, magnitude_masks(clone, kept))
    expected = output_distortion(predict_logits(clone, inputs, 16), reference)[0]
    assert measured["light"] == expected
    for mode in ("relative", "absolute"):  # BN recalibration changes it
        recover = Recovery(bn_rule=mode, batch_size=16).on(inputs)
        assert measured_distortion(model, light, inputs, reference, 16, recover) != expected
    # so does the repair, and it lowers the distortion the masks leave
    recover = Recovery(objective="output", batch_size=16).on(inputs)
    assert measured_distortion(model, light, inputs, reference, 16, recover) < expected
