import numpy as np
import pytest
import torch

from pipeline.allocation.problem import Problem, kept_budget
from pipeline.allocation.progressive import progressive_allocation, step_ratios
from pipeline.nn.evaluation import predict_logits
from pipeline.nn.layers import macs_per_weight, prunable_numel
from pipeline.nn.models import build_model
from pipeline.profiling.distortion import DistortionCurves, profile_layer, sparsity_grid
from pipeline.pruning.masking import masks_from_zeros, pruned_count


def test_step_ratios():
    assert step_ratios(0.9, 1) == [0.9]
    r = step_ratios(0.9, 3)
    assert r[-1] == 0.9 and r == sorted(r)
    assert (1 - r[0]) == pytest.approx(0.1 ** (1 / 3))


def test_progressive_masks_only_grow_and_meet_the_budget():
    torch.manual_seed(0)
    model = build_model("digits_cnn", 1, 10)
    inputs = torch.randn(24, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    reference = predict_logits(model, inputs, 24)
    grid = sparsity_grid(11)
    numel = prunable_numel(model)

    def profile(m, ref=reference) -> DistortionCurves:
        rows = [
            profile_layer(
                n,
                model=m,
                inputs=inputs,
                reference=ref,
                sparsities=grid,
                batch_size=24,
                threads=1,
            )
            for n in numel
        ]
        return DistortionCurves.from_profiles(numel, grid, rows, macs_per_weight(m, inputs[:1]))

    seen, calls = [], []

    def reprofile(m):
        calls.append(1)
        own = predict_logits(m, inputs, 24)  # increments against the partially pruned model
        unchanged = profile(m, own)
        weights = dict(m.named_modules())
        longest = 0
        for i, (name, size) in enumerate(numel.items()):  # leaving a layer as it is costs 0
            zeros = int((weights[name].weight == 0).sum())
            free = [j for j, sp in enumerate(grid) if pruned_count(size, sp) <= zeros]
            assert (unchanged.mean[i, free] == 0).all() and (
                unchanged.mean[i, len(free) :] > 0
            ).all()
            longest = max(longest, len(free))
        assert longest > 1  # some layer was pruned in an earlier round
        return unchanged

    problem = Problem(profile(model), "mean", {"params": 0.8}, np.zeros(5), np.ones(5))
    result = progressive_allocation(
        model, problem, "rd", 3, reprofile, recalibrate=lambda m: seen.append(masks_from_zeros(m))
    )
    assert len(calls) == 2 and len(seen) == 3
    for earlier, later in zip(seen, seen[1:], strict=False):
        assert all((later[n] <= earlier[n]).all() for n in numel)  # kept sets only shrink
    assert result.kept.sum() <= kept_budget(0.8, sum(numel.values()))
    assert all(int(seen[-1][n].sum()) == k for n, k in zip(result.layers, result.kept, strict=True))
    assert all(mask.all() for mask in masks_from_zeros(model).values())  # input left dense
