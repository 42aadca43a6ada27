"""Iterative schedule: round arithmetic, masks only growing, the remaining-weight grid, the
baselines' rounds against their one-shot rule, resuming, and bad schedules."""

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.allocation.methods import allocate, spend_slack
from pipeline.allocation.problem import Problem, kept_budget, predicted_distortion
from pipeline.config.params import load_params
from pipeline.edges import io, rounds
from pipeline.edges.profile_run import profile_curves
from pipeline.errors import PipelineError
from pipeline.nn.evaluation import per_sample_distortion, predict_logits
from pipeline.nn.layers import macs_per_weight, prunable_layers, prunable_numel
from pipeline.nn.models import build_model
from pipeline.profiling.distortion import DistortionCurves, profile_layer, sparsity_grid
from pipeline.pruning.masking import apply_masks, magnitude_masks, mask_pruning
from pipeline.pruning.repair import Recovery
from pipeline.pruning.schedule import RoundSettings, run_round, target_sparsity
from stages import schedule
from tests.conftest import write_params

ROUNDS = 3
AMOUNT = 0.3


def zeros_of(model) -> dict[str, torch.Tensor]:
    return {name: m.weight.detach() == 0 for name, m in prunable_layers(model)}


def digits_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model("digits_cnn", 1, 10).eval()


def settings(method: str, model, levels: int = 11) -> RoundSettings:
    n = len(prunable_numel(model))
    return RoundSettings(
        amount=AMOUNT,
        method=method,
        kind="mean",
        measure="params",
        lo=np.zeros(n),
        hi=np.ones(n),
        levels=levels,
        batch_size=16,
    )


def serial_profile(inputs, levels):
    """The round's profile as the stage runs it (``profile_curves``), on the serial backend,
    every layer on the remaining-weight grid, no BatchNorm correction."""
    params = load_params(
        {
            "device": "cpu",
            "profile": {"levels": levels, "batch_size": 16, "bn_correction": False},
            "ray": {"backend": "serial"},
        }
    )
    return lambda model, reference: profile_curves(
        params, model, inputs, reference, of_remaining=True
    )


def rounds_of(method: str, model, inputs, retrain=None, recover=None):
    """ROUNDS rounds of ``method`` from ``model``: the models after each round."""
    out = []
    for k in range(1, ROUNDS + 1):
        result = run_round(
            model,
            k,
            settings(method, model),
            inputs,
            profile=serial_profile(inputs, 11),
            macs_per_weight=macs_per_weight(model, inputs[:1]),
            recover=recover,
            retrain=retrain or (lambda m: None),
            evaluate=lambda m: 0.0,
        )
        model = result.model
        out.append(result)
    return out


def test_target_sparsity_follows_the_paper():
    assert target_sparsity(14, 0.2) == pytest.approx(0.956, abs=5e-4)
    assert target_sparsity(20, 0.2) == pytest.approx(0.9885, abs=5e-5)
    assert target_sparsity(0, 0.2) == 0


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Stand-in for retraining: every kept weight moves, zeros stay zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in prunable_layers(model):
            m.weight.add_(torch.randn(m.weight.shape, generator=g) * 0.05 * (m.weight != 0))


def test_rounds_repair_the_kept_weights_and_keep_the_zeros():
    """With prune.reconstruct, each round repairs the weights its masks leave (before its
    retraining) against the model the round started from."""
    model = digits_model()
    inputs = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    repair = Recovery(objective="output", batch_size=16).on(inputs)
    plain = rounds_of("global", model, inputs)
    repaired = rounds_of("global", model, inputs, recover=repair)
    # round 1: the same masks (global magnitude on the same start weights), other weights
    first = (zeros_of(plain[0].model), zeros_of(repaired[0].model))
    assert all(torch.equal(first[0][n], first[1][n]) for n in first[0])
    previous = zeros_of(model)
    for result in repaired:
        zeros = zeros_of(result.model)
        assert all(bool((zeros[n] | ~previous[n]).all()) for n in zeros)  # zeros stay zero
        previous = zeros
    last = dict(repaired[-1].model.named_modules())
    masked = dict(plain[0].model.named_modules())
    name = next(iter(prunable_numel(model)))
    assert not torch.equal(last[name].weight, masked[name].weight)  # re-solved
    reference = predict_logits(model, inputs, 16)
    error = {
        k: float(per_sample_distortion(predict_logits(r[0].model, inputs, 16), reference).mean())
        for k, r in (("plain", plain), ("repaired", repaired))
    }
    assert error["repaired"] < error["plain"]


@pytest.mark.parametrize("method", ["rd", "global", "lamp", "uniform", "erk", "uniform_plus"])
def test_masks_only_grow_and_each_round_reaches_its_sparsity(method):
    model = digits_model()
    inputs = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    counter = iter(range(100))
    results = rounds_of(method, model, inputs, retrain=lambda m: perturb(m, next(counter)))
    total = sum(prunable_numel(model).values())
    layers = len(prunable_numel(model))
    previous = zeros_of(model)
    for k, result in enumerate(results, start=1):
        zeros = zeros_of(result.model)
        for name in zeros:  # every zero stays zero
            assert bool((zeros[name] | ~previous[name]).all()), (method, k, name)
        previous = zeros
        kept = int(result.allocation.kept.sum())
        assert sum(int(z.sum()) for z in zeros.values()) == total - kept
        # the target, within one weight per layer (and never short of it)
        budget = kept_budget(target_sparsity(k, AMOUNT), total)
        assert 0 <= budget - kept <= layers, (method, k, budget, kept)
        if method == "rd":  # the grid's leftover goes back: exactly the target
            assert kept == budget
        assert result.metrics["sparsity"] == pytest.approx(1 - kept / total)


@pytest.mark.parametrize("method", ["global", "lamp", "uniform", "erk"])
def test_rounds_without_retraining_equal_the_one_shot_rule(method):
    """Each round applies the method to the current weights; with nothing between rounds,
    the masks after the last round are those of one-shot pruning to its sparsity (global
    magnitude and LAMP score the kept weights as before; uniform and ERK shrink densities)."""
    model = digits_model()
    inputs = torch.randn(16, 1, 8, 8)
    final = rounds_of(method, model, inputs)[-1].model
    weights = {name: m.weight.detach() for name, m in prunable_layers(model)}
    curves = serial_profile(inputs, 11)(model, predict_logits(model, inputs, 16))
    n = len(curves.layers)
    problem = Problem(
        curves=curves,
        kind="mean",
        targets={"params": target_sparsity(ROUNDS, AMOUNT)},
        lo=np.zeros(n),
        hi=np.ones(n),
        magnitudes=[weights[name].abs().flatten().numpy() for name in curves.layers],
        shapes=[tuple(weights[name].shape) for name in curves.layers],
    )
    one_shot = allocate(method, problem)
    kept = one_shot.kept_by_layer
    expected = digits_model()
    apply_masks(expected, magnitude_masks(expected, kept))
    for name, zeros in zeros_of(final).items():
        assert torch.equal(zeros, zeros_of(expected)[name]), (method, name)


def test_remaining_grid_prunes_zeros_first_then_a_fraction_of_the_rest():
    model = digits_model()
    inputs = torch.randn(12, 1, 8, 8)
    name, layer = list(prunable_layers(model))[1]
    with torch.no_grad():  # the layer is 40 % pruned already
        layer.weight.mul_(mask_pruning(layer.weight, int(0.4 * layer.weight.numel())))
    reference = predict_logits(model, inputs, 12)
    grid = np.array([0.0, 0.25, 0.5, 1.0])
    zeros = int((layer.weight == 0).sum())
    remaining = layer.weight.numel() - zeros
    for engine in ("fast", "naive"):
        mean, _ = profile_layer(
            name,
            model=model,
            inputs=inputs,
            reference=reference,
            sparsities=grid,
            batch_size=5,
            threads=1,
            engine=engine,
            of_remaining=True,
        )
        for j, s in enumerate(grid):  # brute force: zero that many weights, run the model
            pruned = digits_model()
            pruned.load_state_dict(model.state_dict())
            w = dict(pruned.named_modules())[name].weight
            count = zeros + int(np.floor(s * remaining + 0.5))
            with torch.no_grad():
                w.mul_(mask_pruning(w, count))
            d = per_sample_distortion(predict_logits(pruned, inputs, 12), reference)
            assert mean[j] == pytest.approx(float(d.mean()), rel=1e-4, abs=1e-7), (engine, s)
        assert mean[0] == 0  # the zeros alone change nothing


def tiny_problem(seed: int, layers: int = 3, levels: int = 5) -> Problem:
    rng = np.random.default_rng(seed)
    numel = rng.integers(5, 40, layers)
    grid = sparsity_grid(levels)
    mean = np.cumsum(rng.random((layers, levels)), axis=1)
    mean[:, 0] = 0
    curves = DistortionCurves(
        layers=[f"l{i}" for i in range(layers)],
        numel=numel.astype(np.int64),
        sparsity=grid,
        mean=mean,
        max=mean,
        macs_per_weight=np.ones(layers, dtype=np.int64),
    )
    ratio = float(rng.uniform(0.2, 0.8))
    return Problem(curves, "mean", {"params": ratio}, np.zeros(layers), np.ones(layers))


@pytest.mark.parametrize("seed", range(30))
def test_spend_slack_meets_the_budget_and_never_raises_the_prediction(seed):
    problem = tiny_problem(seed)
    grid = allocate("rd", problem)
    spent = spend_slack(problem, grid)
    budget = problem.budgets()["params"]
    assert int(spent.kept.sum()) == budget  # no limits: the budget is reached exactly
    assert (spent.kept >= grid.kept).all() and (spent.kept <= problem.curves.numel).all()
    assert spent.total_predicted <= grid.total_predicted + 1e-12
    # the predicted distortion is the interpolated curve at the kept counts
    expected = predicted_distortion(problem.curves, "mean", spent.kept)
    np.testing.assert_allclose(spent.predicted_distortion, expected)
    # an allocation with no slack is returned as it is
    again = spend_slack(problem, spent)
    np.testing.assert_array_equal(again.kept, spent.kept)


def test_spend_slack_respects_the_floor_of_a_layer():
    problem = tiny_problem(3)
    lo = np.array([0.5, 0.0, 0.0])
    limited = replace(problem, lo=lo)
    spent = spend_slack(limited, allocate("rd", limited))
    assert spent.sparsity[0] >= 0.5 - 1 / problem.curves.numel[0]


@pytest.mark.parametrize(
    ("schedule_params", "message"),
    [
        ({"rounds": -1}, "schedule.rounds = -1"),
        ({"rounds": 2.5}, "schedule.rounds = 2.5"),
        ({"rounds": "3"}, "schedule.rounds = '3'"),
        ({"amount": 0.0}, "schedule.amount = 0.0"),
        ({"amount": 1.0}, "schedule.amount = 1.0"),
        ({"amount": 1.5}, "schedule.amount = 1.5"),
        ({"epochs": -2}, "schedule.epochs = -2"),
        ({"rounds": 2, "period": 3}, "unknown param schedule.period"),
    ],
)
def test_a_bad_schedule_is_one_clear_error(schedule_params, message):
    with pytest.raises(PipelineError) as caught:
        load_params({"schedule": schedule_params})
    assert str(caught.value).startswith(message)
    assert "allowed" in str(caught.value) and "\n" not in str(caught.value)


def test_a_schedule_rejects_what_a_round_cannot_do():
    with pytest.raises(PipelineError, match="allocate.budget = 'both'"):
        load_params(
            {
                "schedule": {"rounds": 2},
                "allocate": {"budget": "both", "flops_ratio": 0.5},
            }
        )
    with pytest.raises(PipelineError, match="allocate.steps = 3"):
        load_params({"schedule": {"rounds": 2}, "allocate": {"steps": 3}})
    with pytest.raises(PipelineError, match="allocate.refine = 'ce'"):
        load_params({"schedule": {"rounds": 2}, "allocate": {"refine": "ce"}})
    load_params({"allocate": {"steps": 3}})  # one-shot progressive stays allowed


# ------------------------------------------------------------------ the stage: files, resume
def schedule_project(project: Path, root: Path, **schedule_params) -> io.Paths:
    (root / "artifacts").mkdir(parents=True)
    for name in ("baseline.pt", "calibration.pt"):
        shutil.copy2(project / "artifacts" / name, root / "artifacts" / name)
    write_params(root, schedule={"rounds": 2, "epochs": 1, **schedule_params})
    return io.Paths(root)


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_schedule_stage_writes_rounds_and_resumes_to_the_same_bytes(project, tmp_path, monkeypatch):
    whole = schedule_project(project, tmp_path / "whole")
    assert schedule.main(["--root", str(whole.root)]) == 0
    entries = io.read_json(whole.metrics("rounds"))
    assert [e["round"] for e in entries] == [1, 2]
    for e in entries:
        assert e["sparsity"] == pytest.approx(target_sparsity(e["round"], 0.2), abs=1e-3)
        assert 0 <= e["accuracy"] <= 1
    assert io.read_metrics(whole.metrics("schedule"))["round"] == 2
    rounds = sorted(p.name for p in whole.rounds.iterdir())
    assert rounds == ["index.json", "round_001", "round_002"]

    # killed in round 2: round 1 is on disk, round 2 is not
    cut = schedule_project(project, tmp_path / "cut")
    calls = []
    real = schedule.run_round

    kill = [True]

    def dies_in_round_2(model, k, *args, **kwargs):
        calls.append(k)
        if k == 2 and kill.pop() if kill else False:
            raise SystemExit(143)  # what SIGTERM becomes in a stage
        return real(model, k, *args, **kwargs)

    monkeypatch.setattr(schedule, "run_round", dies_in_round_2)
    with pytest.raises(SystemExit):
        schedule.main(["--root", str(cut.root)])
    assert (cut.round(1) / "metrics.json").is_file() and not cut.round(2).exists()
    calls.clear()
    assert schedule.main(["--root", str(cut.root)]) == 0
    assert calls == [2]  # round 1 was not recomputed
    for folder in (whole.rounds, whole.root / "metrics"):
        relative = folder.relative_to(whole.root)
        assert tree_bytes(cut.root / relative) == tree_bytes(folder), relative

    # a round whose metrics file is missing (killed while writing) is recomputed, same bytes
    (cut.round(2) / "metrics.json").unlink()
    calls.clear()
    assert schedule.main(["--root", str(cut.root)]) == 0
    assert calls == [2]
    assert tree_bytes(cut.rounds) == tree_bytes(whole.rounds)

    # other settings: nothing is reused; fewer rounds: the extra folders go
    write_params(cut.root, schedule={"rounds": 1, "epochs": 1, "amount": 0.3})
    calls.clear()
    assert schedule.main(["--root", str(cut.root)]) == 0
    assert calls == [1]
    assert sorted(p.name for p in cut.rounds.iterdir()) == ["index.json", "round_001"]


def test_no_rounds_writes_empty_outputs(project, tmp_path):
    paths = schedule_project(project, tmp_path / "none", rounds=0)
    assert schedule.main(["--root", str(paths.root)]) == 0
    assert io.read_json(paths.metrics("rounds")) == []
    assert io.read_metrics(paths.metrics("schedule")) == {"rounds": 0}
    assert [p.name for p in paths.rounds.iterdir()] == ["index.json"]  # no round, no empty folder
    assert io.read_json(paths.rounds / "index.json") == []


def test_track_logs_one_parent_run_per_schedule_with_a_run_per_round(
    project, tmp_path, monkeypatch
):
    import mlflow

    from pipeline.edges import tracking
    from stages import track

    root = tmp_path / "tracked"
    shutil.copytree(project, root, ignore=shutil.ignore_patterns("mlflow.db*", "mlartifacts"))
    write_params(root, schedule={"rounds": 2, "epochs": 0}, allocate={"method": "lamp"})
    assert track.main(["--root", str(root)]) == 0  # the one-shot run (no rounds yet)
    assert schedule.main(["--root", str(root)]) == 0
    real, calls = tracking._log_record, []

    def dies_at_round_2(*args):  # parent, round 1, round 2: interrupted there
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(tracking, "_log_record", dies_at_round_2)
    with pytest.raises(KeyboardInterrupt):
        track.main(["--root", str(root)])
    monkeypatch.undo()
    for _ in range(2):  # the interrupted parent goes with its rounds; then it is found again
        assert track.main(["--root", str(root)]) == 0
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("rdprune").experiment_id])
    parents = [
        r
        for r in runs
        if r.data.tags.get("rdprune.stage") == "schedule"
        and "mlflow.parentRunId" not in r.data.tags
    ]
    assert len(runs) == 4 and len(parents) == 1  # one-shot, schedule, two rounds
    (parent,) = parents
    assert {r.info.status for r in runs} == {"FINISHED"}
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in nested) == ["round 1", "round 2"]
    assert parent.info.run_name == "digits_cnn digits lamp schedule 2x0.2"
    steps = client.get_metric_history(parent.info.run_id, "round_sparsity")
    assert [m.step for m in sorted(steps, key=lambda m: m.step)] == [1, 2]
    assert parent.data.metrics["rounds"] == 2
    assert "predicted_distortion" not in parent.data.metrics  # lamp reads no curves


def test_a_code_or_device_change_recomputes_the_rounds(project, tmp_path, monkeypatch):
    import pipeline

    paths = schedule_project(project, tmp_path / "code", rounds=1, epochs=0)
    assert schedule.main(["--root", str(paths.root)]) == 0
    calls = []
    real = schedule.run_round

    def counted(model, k, *args, **kwargs):
        calls.append(k)
        return real(model, k, *args, **kwargs)

    monkeypatch.setattr(schedule, "run_round", counted)
    assert schedule.main(["--root", str(paths.root)]) == 0
    assert calls == []  # same code, same device: reused
    edited = tmp_path / "edited" / "pipeline"
    shutil.copytree(Path(pipeline.__file__).parent, edited)
    (edited / "pruning" / "schedule.py").write_text(
        (edited / "pruning" / "schedule.py").read_text() + "\n# edit\n"
    )
    monkeypatch.setattr(pipeline, "__file__", str(edited / "__init__.py"))
    assert schedule.main(["--root", str(paths.root)]) == 0
    assert calls == [1]  # the library changed: computed again
    monkeypatch.setattr(rounds, "device_identity", lambda name: "cuda (another GPU)")
    assert schedule.main(["--root", str(paths.root)]) == 0
    assert calls == [1, 1]  # `auto` resolving to another device: computed again


def test_unreachable_schedule_fails_before_round_1_and_stray_folders_stay(
    project, tmp_path, capsys
):
    paths = schedule_project(project, tmp_path / "limits", rounds=3, amount=0.5, epochs=0)
    write_params(
        paths.root,
        schedule={"rounds": 3, "amount": 0.5, "epochs": 0},
        allocate={"limits": {"*": [0, 0.6]}},
    )
    assert schedule.main(["--root", str(paths.root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: schedule.rounds = 3 with schedule.amount = 0.5 needs")
    assert not paths.round(1).exists()
    # folders are told by their round number: a stray copy is left alone
    write_params(paths.root, schedule={"rounds": 1, "epochs": 0})
    stray = paths.rounds / "round_001_backup"
    stray.mkdir(parents=True)
    (paths.rounds / "round_002").mkdir()
    assert schedule.main(["--root", str(paths.root)]) == 0
    assert sorted(p.name for p in paths.rounds.iterdir()) == [
        "index.json",
        "round_001",
        "round_001_backup",
    ]
