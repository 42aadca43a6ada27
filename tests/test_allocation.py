import itertools

import numpy as np
import pytest

from pipeline.allocation import allocate_rd, kept_budget, solve_mckp
from pipeline.distortion import DistortionCurves, sparsity_grid
from pipeline.errors import PipelineError


def brute_force(cost: np.ndarray, value: np.ndarray, budget: int) -> float:
    best = np.inf
    for choice in itertools.product(range(cost.shape[1]), repeat=cost.shape[0]):
        rows = np.arange(cost.shape[0])
        if cost[rows, choice].sum() <= budget:
            best = min(best, value[rows, choice].sum())
    return best


def random_instance(rng: np.random.Generator, layers: int, levels: int):
    numel = rng.integers(5, 200, size=layers)
    frac = np.sort(rng.random((layers, levels)), axis=1)[:, ::-1]  # kept falls with the level
    cost = np.round(frac * numel[:, None]).astype(np.int64)
    value = np.cumsum(
        rng.random((layers, levels)) * rng.choice([0.1, 1, 10], size=(layers, 1)), axis=1
    )
    if rng.random() < 0.5:  # unsorted, non-monotone values must work too
        value = rng.random((layers, levels)) * 5
    return cost, value


@pytest.mark.parametrize("seed", range(60))
def test_dp_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    cost, value = random_instance(rng, 4, 6)
    budget = int(rng.integers(cost.min(axis=1).sum(), cost.max(axis=1).sum() + 1))
    choice = solve_mckp(cost, value, budget)
    rows = np.arange(4)
    assert cost[rows, choice].sum() <= budget
    assert value[rows, choice].sum() == pytest.approx(
        brute_force(cost, value, budget), rel=1e-12, abs=1e-12
    )


def test_infeasible_budget_raises():
    cost = np.array([[10, 5], [8, 4]])
    with pytest.raises(PipelineError, match="infeasible"):
        solve_mckp(cost, np.zeros((2, 2)), 8)


def test_kept_budget_uses_decimal_ratio():
    assert kept_budget(0.8, 100) == 20  # float (1 - 0.8) * 100 would floor to 19
    assert kept_budget(0.0, 7) == 7
    assert kept_budget(0.5, 7) == 3


def curves(numel, levels, mean) -> DistortionCurves:
    grid = sparsity_grid(levels)
    mean = np.asarray(mean, dtype=np.float64)
    return DistortionCurves(
        [f"l{i}" for i in range(len(numel))], np.array(numel), grid, mean, mean * 2
    )


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.33, 0.5, 0.8, 0.95, 0.999])
def test_rd_always_meets_the_budget(ratio):
    rng = np.random.default_rng(1)
    numel = [100, 2000, 35, 777]
    mean = np.cumsum(rng.random((4, 11)), axis=1) - rng.random((4, 1))
    allocation = allocate_rd(curves(numel, 11, mean), ratio, "mean")
    assert allocation.kept.sum() <= kept_budget(ratio, sum(numel))
    assert 1 - allocation.kept.sum() / sum(numel) >= ratio
    assert allocation.total_predicted == pytest.approx(mean[np.arange(4), allocation.level].sum())


def test_rd_prefers_the_insensitive_layer():
    # Layer 0 is cheap to prune, layer 1 expensive: at 50 % only layer 0 is pruned.
    allocation = allocate_rd(curves([100, 100], 3, [[0, 0.1, 0.2], [0, 5, 10]]), 0.5, "mean")
    assert allocation.sparsity.tolist() == [1.0, 0.0]


def test_rd_uses_the_chosen_curve_and_rejects_nan():
    c = curves([10, 10], 3, [[0, 1, 2], [0, 1, 2]])
    assert allocate_rd(c, 0.5, "max").total_predicted == pytest.approx(4.0)
    bad = curves([10, 10], 3, [[0, np.nan, 2], [0, 1, 2]])
    with pytest.raises(PipelineError, match="NaN"):
        allocate_rd(bad, 0.5, "mean")


def test_rd_unreachable_ratio_names_the_param():
    grid = np.array([0.0, 0.5])  # a grid that never prunes a layer completely
    c = DistortionCurves(["a", "b"], np.array([10, 10]), grid, np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(PipelineError, match=r"prune.ratio = 0.7 .*allowed: prune.ratio <= 0.5"):
        allocate_rd(c, 0.7, "mean")
