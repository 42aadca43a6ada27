"""Repair (pipeline/pruning/repair.py, ridge.py) against brute force: explicit least squares
on the design matrix each layer's output is linear in, built here from the layer itself (one
basis weight at a time), not from the unfolding the repair uses."""

import copy

import pytest
import torch
from torch import nn

from pipeline.nn.evaluation import output_distortion, predict_logits
from pipeline.nn.layers import prunable_layers
from pipeline.pruning.batchnorm import BN_RULES, batchnorms, input_moments
from pipeline.pruning.masking import apply_masks, magnitude_masks
from pipeline.pruning.repair import (
    RepairStats,
    augmented_weight,
    damped_gram,
    equations_solution,
    equations_solutions,
    repair_network,
)
from pipeline.pruning.ridge import damping_of, solve
from tests.models_zoo import TinyMLP, TinyResNet, randomized

LAYERS = {
    "conv2d, groups, stride, dilation, bias": (
        lambda: nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2),
        (5, 4, 9, 9),
    ),
    "conv1d, same padding": (lambda: nn.Conv1d(3, 4, 4, padding="same", bias=False), (6, 3, 11)),
    "conv3d, stride": (
        lambda: nn.Conv3d(2, 3, (2, 3, 2), stride=(1, 2, 1), padding=1, bias=False),
        (2, 2, 5, 6, 5),
    ),
    "depthwise conv2d, reflect": (
        lambda: nn.Conv2d(3, 3, 3, padding=1, groups=3, padding_mode="reflect"),
        (4, 3, 6, 6),
    ),
    "linear on (N, T, F)": (lambda: nn.Linear(7, 5), (4, 6, 7)),
}


def design(module: nn.Module, x: torch.Tensor, row: int) -> torch.Tensor:
    """(M, D') the matrix output row ``row`` of ``module`` is linear in on input x, over the
    row's own weights (and a column of ones for its bias): one basis weight at a time."""
    weight = module.weight.detach().to(torch.float64)
    per_row = weight[0].numel()
    cols = []
    for k in range(per_row):
        basis = torch.zeros_like(weight)
        basis[row].view(-1)[k] = 1.0
        params = {"weight": basis}
        if module.bias is not None:
            params["bias"] = torch.zeros_like(module.bias, dtype=torch.float64)
        out = torch.func.functional_call(module.double(), params, (x.double(),))
        cols.append(_row_output(module, out, row))
    if module.bias is not None:
        cols.append(torch.ones_like(cols[0]))
    module.float()
    return torch.stack(cols, dim=1)


def _row_output(module: nn.Module, out: torch.Tensor, row: int) -> torch.Tensor:
    return (out[..., row] if isinstance(module, nn.Linear) else out[:, row]).flatten()


def brute_force(module, dense_in, pruned_in, mask, damping, objective):
    """Per row, lstsq on the explicit system (ridge rows toward the dense weights)."""
    w0 = augmented_weight(module)  # (G, R, D')
    g, r, d = w0.shape
    width = module.weight[0].numel()
    keep = torch.cat([mask.reshape(g, r, -1), torch.ones(g, r, d - width, dtype=torch.bool)], 2)
    out = torch.zeros_like(w0)
    for row in range(g * r):
        grp, i = divmod(row, r)
        a = design(module, pruned_in, row)
        source = design(module, dense_in if objective == "output" else pruned_in, row)
        t = source @ w0[grp, i]
        width = a.shape[1] - (module.bias is not None)
        lam = damping * (a[:, :width].pow(2).sum(0)).mean()
        s = keep[grp, i].nonzero().flatten()
        lhs, rhs = a[:, s], t
        if lam > 0:
            lhs = torch.cat([lhs, lam.sqrt() * torch.eye(len(s), dtype=lhs.dtype)])
            rhs = torch.cat([rhs, lam.sqrt() * w0[grp, i, s]])
        out[grp, i, s] = torch.linalg.lstsq(lhs, rhs.unsqueeze(1)).solution.squeeze(1)
    return out


def solved(module, dense_in, pruned_in, mask, damping, objective, solver="exact"):
    stats = RepairStats(module, augmented_weight(module) if objective == "output" else None, 4096)
    for lo in range(0, len(dense_in), 2):  # several batches, small unfolding chunks
        stats.add(pruned_in[lo : lo + 2], dense_in[lo : lo + 2] if objective == "output" else None)
    return equations_solution(module, stats.equations(), mask, damping, solver)


@pytest.mark.parametrize("case", sorted(LAYERS))
@pytest.mark.parametrize("objective", ["layerwise", "output"])
@pytest.mark.parametrize("sparsity", [0.25, 0.75])  # fewer pruned than kept, and the reverse
@pytest.mark.parametrize("damping", [0.0, 0.05])
def test_repair_equals_least_squares_on_the_explicit_system(case, objective, sparsity, damping):
    build, shape = LAYERS[case]
    torch.manual_seed(0)
    module = build()
    dense_in = torch.randn(*shape)
    pruned_in = dense_in + 0.3 * torch.randn(*shape)
    mask = torch.rand_like(module.weight) > sparsity
    got = solved(module, dense_in, pruned_in, mask, damping, objective)
    want = brute_force(module, dense_in, pruned_in, mask, damping, objective)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)
    width = module.weight[0].numel()
    assert (got[..., :width].reshape(module.weight.shape)[~mask] == 0).all()  # exact zeros


@pytest.mark.parametrize("case", sorted(LAYERS))
def test_nothing_pruned_no_damping_gives_the_dense_weights(case):
    build, shape = LAYERS[case]
    torch.manual_seed(1)
    module = build()
    x = torch.randn(*shape)
    everything = torch.ones_like(module.weight, dtype=torch.bool)
    for objective in ("layerwise", "output"):
        got = solved(module, x, x, everything, 0.0, objective)
        torch.testing.assert_close(got, augmented_weight(module), rtol=1e-6, atol=1e-9)


def test_the_sweep_keeps_the_mask_and_is_exact_when_the_pruned_columns_come_first():
    """SparseGPT's sweep is optimal column by column: exact when every pruned column precedes
    the kept ones (nothing kept is frozen before a pruned column is spread); otherwise it
    costs at most a little more than the exact solution, never less."""
    torch.manual_seed(2)
    d, rows = 60, 7
    x = torch.randn(d, 5 * d, dtype=torch.float64)
    x[3] = 0.9 * x[5] + 0.1 * x[3]  # correlated inputs: the spread matters
    gram = (x @ x.T).unsqueeze(0)
    w0 = torch.randn(1, rows, d, dtype=torch.float64)
    lam = damping_of(gram, 0.01, d)
    rhs = gram @ w0.transpose(1, 2)

    def cost(w):
        delta = (w - w0)[0]
        return float(((delta @ gram[0]) * delta).sum() + lam * delta.pow(2).sum())

    prefix = torch.ones(1, rows, d, dtype=torch.bool)
    prefix[..., :30] = False
    torch.testing.assert_close(
        solve(gram, rhs, w0, prefix, lam, "sweep"), solve(gram, rhs, w0, prefix, lam, "exact")
    )
    keep = torch.rand(1, rows, d) > 0.6
    exact, sweep = (solve(gram, rhs, w0, keep, lam, s) for s in ("exact", "sweep"))
    assert (sweep[~keep] == 0).all() and (exact[~keep] == 0).all()
    assert cost(exact) <= cost(sweep) <= 1.5 * cost(exact)
    assert cost(sweep) < cost(torch.where(keep, w0, 0.0))  # better than no repair


def _pruned(model, fraction):
    kept = {n: int(m.weight.numel() * (1 - fraction)) for n, m in prunable_layers(model)}
    masks = magnitude_masks(model, kept)
    pruned = copy.deepcopy(model)
    apply_masks(pruned, masks)
    return pruned, masks


@pytest.mark.parametrize("build", [lambda: randomized(TinyResNet()), lambda: TinyMLP().eval()])
def test_repair_network_lowers_the_distortion_and_keeps_the_zeros(build):
    torch.manual_seed(3)
    dense = build()
    shape = (3, 8, 8) if isinstance(dense, TinyResNet) else (12,)
    images = torch.randn(64, *shape)
    reference = predict_logits(dense, images, 16)
    before_model, masks = _pruned(dense, 0.6)
    before = output_distortion(predict_logits(before_model, images, 16), reference)[0]
    for objective in ("layerwise", "output"):
        model = copy.deepcopy(before_model)
        report = repair_network(model, dense, masks, images, objective, 0.01, 16)
        assert report.layers == [n for n, _ in prunable_layers(dense)]  # execution order here
        after = output_distortion(predict_logits(model, images, 16), reference)[0]
        assert after < before
        for name, mask in masks.items():
            assert (dict(model.named_modules())[name].weight[~mask] == 0).all()


def test_batchnorms_are_set_by_the_rule_from_what_they_receive_in_the_final_network():
    """Each BatchNorm is set as the walk reaches it, from the layer's equations when it alone
    consumes a repaired layer: the result equals the rule applied to the moments measured on
    the finished network (nothing after a BatchNorm changes what it receives)."""
    torch.manual_seed(4)
    dense = randomized(TinyResNet())
    images = torch.randn(48, 3, 8, 8)
    model, masks = _pruned(dense, 0.7)
    report = repair_network(model, dense, masks, images, "output", 0.01, 16, bn_rule="relative")
    assert len(report.batchnorms) == len(batchnorms(dense))
    for bn, dense_bn in zip(batchnorms(model), batchnorms(dense), strict=True):
        (pruned,) = input_moments(model, [bn], images, 16)
        (before,) = input_moments(dense, [dense_bn], images, 16)
        mean, var = BN_RULES["relative"](dense_bn, before, pruned)
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-4, atol=1e-5)


def test_repair_is_deterministic():
    dense = randomized(TinyResNet())
    images = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    states = []
    for _ in range(2):
        model, masks = _pruned(dense, 0.5)
        repair_network(model, dense, masks, images, "output", 0.01, 8, bn_rule="relative")
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


@pytest.mark.parametrize("damping", [0.0, 0.01])
@pytest.mark.parametrize("solver", ["exact", "sweep"])
def test_singular_statistics_fall_back_to_least_norm(damping, solver):
    """A layer whose input is all zero (the layer before it fully pruned) or rank deficient:
    no factorisation exists; the solve keeps the dense weights where the data says nothing."""
    torch.manual_seed(6)
    module = nn.Linear(6, 3, bias=False)
    x = torch.zeros(20, 6)
    x[:, :2] = torch.randn(20, 2)  # four dead inputs
    stats = RepairStats(module, None, 1 << 20)
    stats.add(x)
    for sparsity in (0.2, 0.8):  # the pruned-block form and the kept-block form
        mask = torch.rand_like(module.weight) > sparsity
        rows = equations_solution(module, stats.equations(), mask, damping, solver)
        assert torch.isfinite(rows).all() and (rows[0][~mask] == 0).all()
    dead = RepairStats(module, None, 1 << 20)
    dead.add(torch.zeros(20, 6))
    keep = torch.ones_like(module.weight, dtype=torch.bool)
    rows = equations_solution(module, dead.equations(), keep, damping, solver)
    torch.testing.assert_close(rows[0], module.weight.detach().double())


def test_a_fully_pruned_layer_before_another_is_repaired_without_error():
    model = nn.Sequential(nn.Linear(6, 5, bias=False), nn.ReLU(), nn.Linear(5, 3)).eval()
    masks = {"0": torch.zeros(5, 6, dtype=torch.bool), "2": torch.rand(3, 5) > 0.3}
    pruned = copy.deepcopy(model)
    apply_masks(pruned, masks)
    images = torch.randn(32, 6)
    report = repair_network(pruned, model, masks, images, "output", 0.01, 8)
    assert report.layers == ["0", "2"] and (pruned[0].weight == 0).all()
    assert torch.isfinite(pruned[2].weight).all() and (pruned[2].weight[~masks["2"]] == 0).all()


def _equations(module, x, objective):
    stats = RepairStats(module, augmented_weight(module) if objective == "output" else None, 4096)
    stats.add(x + 0.3 * torch.randn_like(x), x if objective == "output" else None)
    return stats.equations()


@pytest.mark.parametrize("case", sorted(LAYERS))
@pytest.mark.parametrize("objective", ["layerwise", "output"])
def test_nested_levels_equal_each_levels_own_solve(case, objective):
    """A profile's levels solved together (one factorisation per row) give each level's own
    exact solve, with the pruned weights exact zeros."""
    build, shape = LAYERS[case]
    torch.manual_seed(2)
    module = build()
    eq = _equations(module, torch.randn(*shape), objective)
    damped = damped_gram(module, eq, 0.05)
    w0 = augmented_weight(module)
    rank = torch.randperm(module.weight.numel()).view_as(module.weight)
    counts = [round(f * module.weight.numel()) for f in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)]
    got = equations_solutions(module, eq, rank, counts, damped, w0, 1 << 30)
    assert sorted(got) == list(range(len(counts)))
    width = module.weight[0].numel()
    for m, rows in got.items():
        mask = rank >= counts[m]
        want = equations_solution(module, eq, mask, 0.05, "auto", dense=w0, damped=damped)
        torch.testing.assert_close(rows, want, rtol=1e-9, atol=1e-12)
        assert (rows[..., :width].reshape(module.weight.shape)[~mask] == 0).all()


def test_nested_levels_have_the_same_bits_whatever_else_is_solved_or_give_way():
    """A level's rows do not depend on the other levels solved with it (a profile's work
    units cut a layer's levels anywhere); no room or no factorisation: left to ``solve``."""
    torch.manual_seed(3)
    module = nn.Conv2d(16, 8, 3, padding=1, bias=False)
    eq = _equations(module, torch.relu(torch.randn(8, 16, 6, 6)), "layerwise")
    damped, w0 = damped_gram(module, eq, 0.01), augmented_weight(module)
    rank = torch.randperm(module.weight.numel()).view_as(module.weight)
    n = module.weight.numel()
    many = [round(f * n) for f in torch.linspace(0.05, 1.0, 20).tolist()]
    every = equations_solutions(module, eq, rank, many, damped, w0, 1 << 30)
    assert sorted(every) == list(range(20))
    some = equations_solutions(module, eq, rank, many[3:6], damped, w0, 1 << 30)
    one = equations_solutions(module, eq, rank, [many[17]], damped, w0, 1 << 30)
    assert all(torch.equal(some[m], every[3 + m]) for m in range(3))
    assert torch.equal(one[0], every[17])
    # one row's system would not fit in the budget
    assert equations_solutions(module, eq, rank, many, damped, w0, 1 << 10) == {}
    # no damping and dead inputs: no factorisation (per level: least norm)
    stats = RepairStats(module, None, 4096)
    stats.add(torch.zeros(8, 16, 6, 6))
    dead = stats.equations()
    singular = damped_gram(module, dead, 0.0)
    assert equations_solutions(module, dead, rank, many, singular, w0, 1 << 30) == {}


def test_profile_levels_are_the_same_solved_together_or_one_by_one():
    from pipeline.profiling.naive import LevelWeights, grid_counts
    from pipeline.pruning.patches import PatchMoments

    torch.manual_seed(4)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    x = torch.relu(torch.randn(32, 8, 8, 8))
    moments = PatchMoments.of(conv, x, 1 << 20, for_bn=False)
    moments.add(x)
    counts = grid_counts(conv.weight.detach(), torch.linspace(0, 1, 21).numpy(), False)
    todo = list(range(1, 21))
    apart = LevelWeights(conv, counts, 0, (moments, 0.01))
    together = LevelWeights(conv, counts, 0, (moments, 0.01))
    together.prepare(todo, 1 << 30)
    assert sorted(together.cache) == todo  # solved in one go, kept
    for j in todo:
        one, all_ = apart(j), together(j)
        torch.testing.assert_close(all_["weight"], one["weight"], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(all_["bias"], one["bias"], rtol=1e-6, atol=1e-7)
        assert torch.equal(all_["weight"] == 0, one["weight"] == 0)


def test_nested_levels_leave_the_levels_auto_would_sweep_to_it():
    torch.manual_seed(5)
    module = nn.Linear(64, 256, bias=False)
    eq = _equations(module, torch.randn(300, 64), "layerwise")
    damped, w0 = damped_gram(module, eq, 0.01), augmented_weight(module)
    rank = torch.empty(256, 64, dtype=torch.long)  # row 0 holds the 64 lowest ranks
    rank[0] = torch.arange(64)
    rank[1:] = 64 + torch.randperm(255 * 64).view(255, 64)
    counts = [64, 64 + 255 * 16, 64 + 255 * 32, 64 + 255 * 48, 64 + 255 * 60]
    # at 64 one row is wholly pruned and the others whole: auto sweeps that level
    got = equations_solutions(module, eq, rank, counts, damped, w0, 1 << 30)
    assert sorted(got) == [1, 2, 3, 4]
    for m, rows in got.items():
        want = equations_solution(module, eq, rank >= counts[m], 0.01, dense=w0, damped=damped)
        torch.testing.assert_close(rows, want, rtol=1e-9, atol=1e-12)


def test_nested_levels_that_prune_everything_give_zero_rows():
    """A bias-free layer whose levels all prune every weight (an iterative round with one
    weight left): nothing to solve, as each level's own solve says."""
    import numpy as np

    from pipeline.profiling.naive import profile_naive

    torch.manual_seed(7)
    module = nn.Linear(4, 3, bias=False)
    eq = _equations(module, torch.randn(20, 4), "layerwise")
    damped, w0 = damped_gram(module, eq, 0.01), augmented_weight(module)
    rank = torch.randperm(12).view(3, 4)
    got = equations_solutions(module, eq, rank, [12, 12], damped, w0, 1 << 20)
    want = equations_solution(module, eq, rank >= 12, 0.01, dense=w0, damped=damped)
    assert sorted(got) == [0, 1] and all(torch.equal(rows, want) for rows in got.values())
    model = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten())
    model.append(nn.Linear(50, 3)).eval()
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].weight[0, 0, 1, 1] = 0.7
    x = torch.randn(8, 2, 5, 5)
    grid = np.linspace(0, 1, 11)
    mean, _ = profile_naive("0", model, x, model(x).detach(), grid, 8, 64, None, True, 0.01)
    assert np.isfinite(mean).all()


@pytest.mark.parametrize("engine", ["naive", "fast"])
def test_repaired_curves_have_the_same_bits_whatever_the_blocks_of_levels(engine):
    """profile.memory_mb 1 solves this layer's 21 levels in two blocks, 64 in one: the same
    curve, bit for bit (each level's rows come from the same factor either way)."""
    import numpy as np

    from pipeline.profiling.distortion import profile_layer, sparsity_grid

    torch.manual_seed(8)
    model = nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 128, 3, padding=1), nn.ReLU()
    )
    model.extend([nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 5)]).eval()
    x = torch.randn(16, 3, 6, 6)
    reference = model(x).detach()
    curves = [
        profile_layer(
            "2",
            model=model,
            inputs=x,
            reference=reference,
            sparsities=sparsity_grid(21),
            batch_size=8,
            threads=1,
            engine=engine,
            memory_mb=memory,
            repair=0.01,
        )[0]
        for memory in (1, 64)
    ]
    assert np.array_equal(curves[0], curves[1]) and curves[0][-1] > 0
