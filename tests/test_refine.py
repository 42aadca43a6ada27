import copy
import itertools

import numpy as np
import pytest
import torch

from pipeline.allocation.mckp import solve_mckp
from pipeline.allocation.methods import allocate
from pipeline.allocation.problem import Problem, layer_bounds
from pipeline.allocation.refine import (
    exchange_moves,
    holdout_split,
    measured_objective,
    refine,
    refine_allocation,
)
from pipeline.config.params import load_params
from pipeline.errors import PipelineError
from pipeline.nn.evaluation import per_sample_distortion, predict_logits
from pipeline.nn.layers import prunable_numel
from pipeline.profiling.distortion import DistortionCurves, sparsity_grid
from pipeline.pruning.batchnorm import recalibrate_bn
from pipeline.pruning.masking import apply_masks, magnitude_masks, masks_from_zeros
from tests.models_zoo import TinyResNet, randomized

RNG = np.random.default_rng(0)
L, K = 4, 6
SIZES = np.array([10, 20, 30, 40])
KEPT = np.array([[n - round(n * k / (K - 1)) for k in range(K)] for n in SIZES])  # (L, K)
VALUE = np.sort(RNG.random((L, K)), axis=1) * SIZES[:, None] / 10  # predicted: rises with level
VALUE[:, 0] = 0.0
BUDGET = np.array([int(SIZES.sum() * 0.45)])
ALLOWED = np.ones((L, K), dtype=bool)


def dp_start() -> np.ndarray:
    return solve_mckp(KEPT, VALUE, BUDGET).choice


def table_objective(table: np.ndarray, calls: list | None = None):
    """An additive 'measured' objective from a (L, K) table; held-out = fit."""

    def evaluate(level: np.ndarray) -> tuple[float, float]:
        if calls is not None:
            calls.append(level.copy())
        v = float(table[np.arange(L), level].sum())
        return v, v

    return evaluate


def test_exchange_moves_meet_the_budget_and_are_the_brute_force_exchanges():
    level = dp_start()
    moves = exchange_moves(level, KEPT[None], BUDGET, ALLOWED, VALUE, (1, 2))
    assert moves == sorted(moves)
    for delta, i, li, j, lj in moves:
        new = level.copy()
        new[i], new[j] = li, lj
        assert KEPT[np.arange(L), new].sum() <= BUDGET[0]
        assert li - level[i] in (1, 2) and lj < level[j]
        assert delta == pytest.approx(
            VALUE[np.arange(L), new].sum() - VALUE[np.arange(L), level].sum()
        )
        # j moves down as far as the budget allows: one level more would break it
        if lj > 0:
            new[j] = lj - 1
            assert KEPT[np.arange(L), new].sum() > BUDGET[0]
    # every feasible (i up 1-2 levels, j down) pair appears exactly once
    expected = set()
    for i, j in itertools.permutations(range(L), 2):
        for d in (1, 2):
            if level[i] + d < K and level[j] > 0:
                new = level.copy()
                new[i], new[j] = level[i] + d, level[j] - 1
                if KEPT[np.arange(L), new].sum() <= BUDGET[0]:
                    expected.add((i, level[i] + d, j))
    assert {(i, li, j) for _, i, li, j, _ in moves} == expected


@pytest.mark.parametrize("rounds", [0, 2])
def test_refine_returns_the_dp_allocation_when_no_move_helps(rounds):
    # the measured objective is exactly the DP's additive one: every probe confirms the
    # curves (scale 1), the re-solve gives the DP optimum back, no exchange improves it
    start = dp_start()
    calls = []
    evaluate = table_objective(VALUE, calls)
    result = refine(start, KEPT, BUDGET, ALLOWED, VALUE, evaluate, 10_000, rounds=rounds)
    assert np.array_equal(result.level, start) and result.accepted == 0
    assert result.start == result.end and result.evaluations == len(calls) > 1


@pytest.mark.parametrize("rounds", [0, 1, 3])
def test_refine_never_breaks_the_budget_nor_raises_the_objective_and_is_deterministic(rounds):
    start = dp_start()
    for seed in range(5):
        truth = np.sort(np.random.default_rng(seed).random((L, K)), axis=1) * 3
        calls = []
        evaluate = table_objective(truth, calls)
        result = refine(start, KEPT, BUDGET, ALLOWED, VALUE, evaluate, 200, rounds=rounds)
        assert KEPT[np.arange(L), result.level].sum() <= BUDGET[0]
        assert result.end[0] <= result.start[0] and result.end[1] <= result.start[1]
        assert result.end[0] == pytest.approx(truth[np.arange(L), result.level].sum())
        if rounds == 0:  # (probes of the re-solve rounds are measurements, not candidates)
            assert all(KEPT[np.arange(L), c].sum() <= BUDGET[0] for c in calls)
        assert len(calls) == result.evaluations <= 200
        again = refine(
            start, KEPT, BUDGET, ALLOWED, VALUE, table_objective(truth), 200, rounds=rounds
        )
        assert np.array_equal(again.level, result.level) and again.end == result.end
        if result.accepted:
            assert result.end[0] < result.start[0]


def test_refine_improves_a_misleading_prediction_and_respects_the_evaluation_cap():
    start = dp_start()
    truth = VALUE.copy()
    truth[1, :] = 0.0  # layer 1 (dense in the DP's optimum) costs nothing in truth
    result = refine(start, KEPT, BUDGET, ALLOWED, VALUE, table_objective(truth), 1000)
    assert start[1] == 0 and result.level[1] == K - 1 and result.end[0] < result.start[0]
    capped = refine(start, KEPT, BUDGET, ALLOWED, VALUE, table_objective(truth), 3)
    assert capped.evaluations == 3


def test_a_move_that_worsens_the_held_out_part_is_refused():
    start = dp_start()

    def evaluate(level: np.ndarray) -> tuple[float, float]:
        moved = float(np.abs(level - start).sum())
        return -moved, moved  # every move helps the fit part and hurts the held-out one

    result = refine(start, KEPT, BUDGET, ALLOWED, VALUE, evaluate, 500)
    assert np.array_equal(result.level, start) and result.accepted == 0


def test_a_re_solve_on_rescaled_truth_finds_its_optimum_in_one_round():
    # truth = the curves scaled per layer: probes measure exactly those scales, and the
    # re-solve on corrected curves is the exact optimum of the truth
    scale = np.array([3.0, 0.2, 1.0, 5.0])
    truth = VALUE * scale[:, None]
    optimum = solve_mckp(KEPT, truth, BUDGET)
    result = refine(dp_start(), KEPT, BUDGET, ALLOWED, VALUE, table_objective(truth), 100, rounds=1)
    assert result.end[0] == pytest.approx(optimum.objective)
    assert not np.array_equal(optimum.choice, dp_start())


def test_refine_keeps_per_layer_limits():
    start = dp_start()
    allowed = ALLOWED.copy()
    allowed[1, 3:] = False  # layer 1 may not get sparser than level 2
    truth = VALUE.copy()
    truth[1, :] = 0.0
    for rounds in (0, 2):
        result = refine(
            start, KEPT, BUDGET, allowed, VALUE, table_objective(truth), 1000, rounds=rounds
        )
        assert allowed[np.arange(L), result.level].all() and result.level[1] == 2


def test_holdout_split_is_a_fixed_partition():
    fit, held = holdout_split(10, 0.3)
    assert len(held) == 3 and sorted([*fit, *held]) == list(range(10))
    assert np.array_equal(holdout_split(10, 0.3)[1], held)
    assert len(holdout_split(2, 0.99)[0]) == 1


def tiny_problem(model, ratio: float) -> Problem:
    numel = prunable_numel(model)
    grid = sparsity_grid(5)
    n = len(numel)
    curve = np.tile(grid**2, (n, 1)) * np.arange(1, n + 1)[:, None]
    curves = DistortionCurves(
        list(numel), np.array(list(numel.values())), grid, curve, curve, np.ones(n, np.int64)
    )
    lo, hi = layer_bounds(curves.layers, {}, [])
    return Problem(curves, "mean", {"params": ratio}, lo, hi)


@pytest.mark.parametrize("mode", [None, "relative", "absolute"])
def test_measured_objective_equals_prune_recalibrate_measure(mode):
    model = randomized(TinyResNet())
    inputs = torch.randn(24, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 5, (24,), generator=torch.Generator().manual_seed(2))
    reference = predict_logits(model, inputs, 8)
    layers = list(prunable_numel(model))
    kept = np.array([n // 3 for n in prunable_numel(model).values()])
    fit, held = holdout_split(24, 0.25)
    value = measured_objective(model, layers, inputs, labels, reference, mode, "mse", 0.25)(kept)
    assert all(mask.all() for mask in masks_from_zeros(model).values())  # model untouched
    clone = copy.deepcopy(model)
    apply_masks(clone, magnitude_masks(clone, dict(zip(layers, kept.tolist(), strict=True))))
    if mode is not None:
        recalibrate_bn(clone, model, inputs[fit], 5, mode)
    logits = predict_logits(clone, inputs, 8)
    for got, ix in zip(value, (fit, held), strict=True):
        expected = float(per_sample_distortion(logits[ix], reference[ix]).mean())
        assert got == pytest.approx(expected, rel=1e-5)


def test_refine_allocation_meets_the_budget_and_starts_from_rd():
    model = randomized(TinyResNet())
    inputs = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 5, (32,), generator=torch.Generator().manual_seed(3))
    reference = predict_logits(model, inputs, 16)
    problem = tiny_problem(model, 0.6)
    rd = allocate("rd", problem)
    for objective in ("mse", "ce", "kl"):
        refined, result = refine_allocation(
            model, problem, rd, inputs, labels, reference, "relative", objective, 0.5, 30
        )
        assert refined.kept.sum() <= problem.budgets()["params"]
        assert result.end[0] <= result.start[0] and result.end[1] <= result.start[1]
        assert np.array_equal(
            refined.kept, problem.curves.kept()[np.arange(len(rd.layers)), refined.level]
        )
        again, _ = refine_allocation(
            model, problem, rd, inputs, labels, reference, "relative", objective, 0.5, 30
        )
        assert np.array_equal(again.kept, refined.kept)
    with pytest.raises(PipelineError, match="grid"):
        refine_allocation(
            model, problem, allocate("uniform", problem), inputs, labels, reference, None,
            "mse", 0.5, 5,
        )  # fmt: skip


@pytest.mark.parametrize(
    ("allocate_params", "message"),
    [
        ({"refine": "accuracy"}, "'accuracy' is not allowed; allowed: ce, kl, mse"),
        ({"refine": "ce", "method": "global"}, "'ce' is not allowed; allowed: null unless"),
        ({"refine": "ce", "candidates": ["global"]}, "allocate.refine = 'ce' is not allowed"),
        ({"refine": "ce", "refine_evals": 0}, "allocate.refine_evals = 0 is not allowed"),
        ({"refine": "ce", "refine_rounds": -1}, "allocate.refine_rounds = -1 is not allowed"),
        ({"refine": "ce", "refine_holdout": 1.0}, "allocate.refine_holdout = 1.0 is not allowed"),
    ],
)  # fmt: skip
def test_refine_params_are_validated(allocate_params, message):
    with pytest.raises(PipelineError, match=message.replace("(", r"\(")):
        load_params({"allocate": allocate_params, **NO_REPAIR})
    load_params({"allocate": {"refine": "ce"}, **NO_REPAIR})


# the refinement measures moves with BatchNorm recalibration alone: no repair
NO_REPAIR = {"prune": {"reconstruct": None}, "profile": {"reconstruct": False}}


def test_allocate_stage_refines_rd_and_reports_it(project, tmp_path):
    import shutil

    from pipeline.edges import io, tables
    from stages import allocate
    from tests.conftest import write_params

    root = tmp_path / "refine"
    shutil.copytree(project, root)
    write_params(
        root,
        allocate={"refine": "ce", "refine_evals": 12, "refine_rounds": 1, "pareto_ratios": [0.5]},
        **NO_REPAIR,
    )
    assert allocate.main(["--root", str(root)]) == 0
    paths = io.Paths(root)
    metrics = io.read_metrics(paths.metrics("allocate"))
    assert metrics["refine.fit_end"] <= metrics["refine.fit_start"]
    assert metrics["refine.heldout_end"] <= metrics["refine.heldout_start"]
    assert 1 <= metrics["refine.evaluations"] <= 12
    assert tables.read_table_metadata(paths.allocation)["rdprune.selected"] == "rd+refine"
    assert metrics["kept"] <= round(0.4 * tables.read_allocation(paths.allocation).numel.sum())
