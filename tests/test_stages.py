"""Every stage run in process on a tiny configuration (serial backend), then bad input."""

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from pipeline.config.params import load_params
from pipeline.edges import io, tables
from pipeline.nn.data import load_dataset
from pipeline.nn.evaluation import accuracy
from pipeline.nn.models import build_model
from stages import allocate, baseline, profile, prune
from tests.conftest import STAGES, write_params


def test_outputs_and_metrics(project):
    paths = io.Paths(project)
    table = pq.read_table(paths.distortion)
    assert table.num_rows == 5 * 6
    assert {"layer", "numel", "level", "sparsity", "distortion", "distortion_max"} <= set(
        table.column_names
    )
    allocation = tables.read_allocation(paths.allocation)
    assert allocation.layers == ["conv1", "conv2", "conv3", "conv4", "fc"]
    prune_metrics = io.read_metrics(paths.metrics("prune"))
    assert prune_metrics["sparsity"] >= 0.6
    pruned = build_model("digits_cnn", 1, 10)
    pruned.load_state_dict(torch.load(paths.pruned))
    test_set = load_dataset(load_params({}).data).test
    assert prune_metrics["accuracy"] == accuracy(pruned, test_set)  # of the checkpoint written
    assert prune_metrics["predicted_distortion"] == pytest.approx(
        allocation.predicted_distortion.sum()
    )
    assert io.read_metrics(paths.metrics("allocate"))["sparsity"] == pytest.approx(
        prune_metrics["sparsity"]
    )
    dense_accuracy = io.read_metrics(paths.metrics("calibrate"))["dense_accuracy"]
    assert dense_accuracy == io.read_metrics(paths.metrics("baseline"))["accuracy"]
    # pruned and fine-tuned checkpoints load plainly and keep exactly the allocated zeros
    for ckpt in (paths.pruned, paths.finetuned):
        model = build_model("digits_cnn", 1, 10)
        model.load_state_dict(torch.load(ckpt))
        for name, kept in zip(allocation.layers, allocation.kept, strict=True):
            assert int((dict(model.named_modules())[name].weight != 0).sum()) == kept


def test_export_is_compact_exact_and_checked(project):
    from pipeline.edges.export import load_compact

    paths = io.Paths(project)
    metrics = io.read_metrics(paths.metrics("export"))
    assert metrics["compact_bytes"] == (paths.export / "model.safetensors").stat().st_size
    assert metrics["dense_bytes"] == paths.finetuned.stat().st_size
    assert metrics["size_ratio"] > 1.5 and metrics["accuracy_change"] == 0
    assert 0 <= metrics["onnx_max_abs_diff"] <= 1e-4 and metrics["onnx_opset"] == 18
    finetuned = torch.load(paths.finetuned)
    back = load_compact(paths.export / "model.safetensors")
    assert list(back) == list(finetuned)
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in finetuned.items())


def test_profile_is_byte_deterministic(project, tmp_path):
    shutil.copytree(project, tmp_path / "again")
    (tmp_path / "again" / "artifacts" / "distortion.parquet").unlink()
    assert profile.main(["--root", str(tmp_path / "again")]) == 0
    for name in ("distortion", "figure"):
        first, again = io.Paths(project), io.Paths(tmp_path / "again")
        if name == "figure":
            first, again = first.figure("distortion_curves"), again.figure("distortion_curves")
        else:
            first, again = first.distortion, again.distortion
        assert first.read_bytes() == again.read_bytes()


def test_mlflow_run_holds_the_result(project):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("rdprune").experiment_id])
    assert run.info.run_name == "digits_cnn digits rd ratio=0.6"  # model, data, method, ratio
    assert run.data.params["prune.ratio"] == "0.6" and run.data.params["allocate.method"] == "rd"
    assert run.data.metrics["ratio"] == 0.6
    for key in (
        "dense_accuracy",
        "prune_accuracy",
        "finetune_accuracy",
        "sparsity",
        "predicted_distortion",
        "measured_distortion",
        "prune_accuracy_before_repair",  # the repair's effect, logged beside the result
        "measured_distortion_before_repair",
    ):
        assert key in run.data.metrics
    before, after = (run.data.metrics[f"measured_distortion{s}"] for s in ("_before_repair", ""))
    assert after < before
    history = client.get_metric_history(run.info.run_id, "finetune_epoch_loss")
    assert [m.step for m in history] == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {
        "allocation.json",
        "allocation.parquet",
        "pareto.parquet",
        *(f"{name}.png" for name in io.Paths.FIGURES),
    } <= artifacts
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(project)


def test_bad_ratio_fails_cleanly_and_keeps_outputs(project, tmp_path, capsys):
    root = tmp_path / "bad"
    shutil.copytree(project, root)
    before = io.Paths(root).allocation.read_bytes()
    write_params(root, prune={"ratio": 1.5})
    assert allocate.main(["--root", str(root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: prune.ratio = 1.5") and "[0.0, 1.0)" in err[-1]
    assert io.Paths(root).allocation.read_bytes() == before
    assert not list((root / "artifacts").glob(".*tmp"))


def test_mismatched_allocation_and_corrupt_calibration(project, tmp_path, capsys):
    root = tmp_path / "mismatch"
    shutil.copytree(project, root)
    paths = io.Paths(root)
    allocation = tables.read_allocation(paths.allocation)
    renamed = dataclasses.replace(allocation, layers=["x", *allocation.layers[1:]])
    tables.write_allocation(paths.allocation, renamed, {})
    pruned_before = paths.pruned.read_bytes()
    assert prune.main(["--root", str(root)]) == 2
    assert "different model" in capsys.readouterr().err
    assert paths.pruned.read_bytes() == pruned_before
    paths.calibration.write_bytes(b"\x00" * 10)
    assert profile.main(["--root", str(root)]) == 2
    assert "corrupt" in capsys.readouterr().err


def test_missing_checkpoint_param(tmp_path, capsys):
    write_params(tmp_path, model={"checkpoint": str(tmp_path / "nope.pt")})
    assert baseline.main(["--root", str(tmp_path)]) == 2
    assert "model.checkpoint not found" in capsys.readouterr().err
    assert not (tmp_path / "artifacts").exists() or not any((tmp_path / "artifacts").iterdir())


def test_given_checkpoint_is_adopted(project, tmp_path):
    src = build_model("digits_cnn", 1, 10)
    ckpt = tmp_path / "given.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, ckpt)
    write_params(tmp_path, model={"checkpoint": str(ckpt)})
    assert baseline.main(["--root", str(tmp_path)]) == 0
    adopted = torch.load(io.Paths(tmp_path).baseline)
    assert all(np.array_equal(adopted[k], v) for k, v in src.state_dict().items())


@pytest.mark.parametrize(
    "settings",
    [{"method": m} for m in ("rd", "uniform", "global", "lamp", "erk", "uniform_plus")]
    + [
        {"budget": "flops"},
        {"budget": "both", "flops_ratio": 0.5},
        {"method": "lamp", "budget": "both", "flops_ratio": 0.5},
        {"limits": {"conv1": [0, 0], "conv*": [0, 0.9]}, "exclude": ["fc"]},
    ],
)
def test_allocate_and_prune_with_every_method_and_budget(project, tmp_path, settings):
    root = tmp_path / "alloc"
    shutil.copytree(project, root)
    write_params(root, allocate={"pareto_ratios": [0.3, 0.6], **settings})
    assert allocate.main(["--root", str(root)]) == 0
    assert prune.main(["--root", str(root)]) == 0
    paths = io.Paths(root)
    metrics = io.read_metrics(paths.metrics("prune"))
    budget = settings.get("budget", "params")
    if budget in ("params", "both"):
        assert metrics["sparsity"] >= 0.6
    if budget == "flops":
        assert metrics["flops_reduction"] >= 0.6
    if budget == "both":
        assert metrics["flops_reduction"] >= 0.5
    allocation = tables.read_allocation(paths.allocation)
    if "exclude" in settings:
        assert allocation.sparsity[0] == 0 and allocation.sparsity[-1] == 0  # conv1, fc dense
        assert (allocation.sparsity <= 0.9).all()
    pareto = pq.read_table(paths.pareto)
    assert pareto.num_rows == 2 * 5 and sorted(set(pareto.column("ratio").to_pylist())) == [
        0.3,
        0.6,
    ]
    assert (root / "plots" / "pareto.csv").read_text().startswith("ratio,sparsity,flops_reduction")


def test_imagefolder_cifar_resnet_with_synthetic_calibration(tmp_path):
    """The whole stage chain on another model family and data format, zero-data calibration."""
    from tests.test_models_data import write_image_folder

    write_image_folder(tmp_path / "images", classes=10, per_class=3, size=32)
    params = {
        "model": {"arch": "cifar_resnet20"},
        "data": {"name": "imagefolder", "root": str(tmp_path / "images")},
        "baseline": {"epochs": 1, "batch_size": 16},
        "calibrate": {"samples": 12, "source": "synthetic"},
        "profile": {"levels": 3, "bn_correction": True},
        "allocate": {"pareto_ratios": [0.5]},
        "prune": {"ratio": 0.5, "bn_recalibration": 16, "reconstruct_samples": 16},
        "finetune": {"epochs": 1, "batch_size": 16},
        "ray": {"backend": "serial"},
        "track": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    for stage in STAGES:
        assert stage.main(["--root", str(tmp_path)]) == 0, stage.__name__
    inputs, labels, reference = io.read_calibration(io.Paths(tmp_path).calibration)
    assert inputs.shape == (12, 3, 32, 32) and torch.equal(labels, reference.argmax(1))
    metrics = io.read_metrics(io.Paths(tmp_path).metrics("prune"))
    assert metrics["sparsity"] >= 0.5 and "accuracy_before_repair" in metrics
    assert len(tables.read_allocation(io.Paths(tmp_path).allocation).layers) == 20


def test_allocate_selects_among_candidates_by_measured_distortion(project, tmp_path):
    root = tmp_path / "select"
    shutil.copytree(project, root)
    write_params(root, allocate={"candidates": ["global", "lamp"], "pareto_ratios": [0.5]})
    assert allocate.main(["--root", str(root)]) == 0
    paths = io.Paths(root)
    metrics = io.read_metrics(paths.metrics("allocate"))
    measured = {
        k.split(".", 1)[1]: v for k, v in metrics.items() if k.startswith("measured_distortion.")
    }
    assert set(measured) == {"rd", "global", "lamp"}
    selected = tables.read_table_metadata(paths.allocation)["rdprune.selected"]
    assert selected == min(measured, key=measured.get)
    assert prune.main(["--root", str(root)]) == 0
    assert io.read_metrics(paths.metrics("prune"))["sparsity"] >= 0.6


@pytest.mark.parametrize("mode", ["relative", "absolute"])
def test_prune_bn_recalibration_modes_at_ratio_zero(project, tmp_path, mode):
    """Nothing pruned: relative recalibration leaves the dense model exactly as it was; absolute
    re-estimation replaces the BatchNorm statistics with those of the chosen images."""
    root = tmp_path / mode
    shutil.copytree(project, root)
    write_params(
        root,
        prune={
            "ratio": 0.0,
            "bn_recalibration": 64,
            "bn_recalibration_mode": mode,
            "reconstruct": None,
        },
        profile={"reconstruct": False},
        allocate={"pareto_ratios": [0.5]},
    )
    assert allocate.main(["--root", str(root)]) == 0
    assert prune.main(["--root", str(root)]) == 0
    paths = io.Paths(root)
    dense, pruned = torch.load(paths.baseline), torch.load(paths.pruned)
    stats = [k for k in dense if k.endswith(("running_mean", "running_var"))]
    assert stats
    same = all(torch.allclose(dense[k], pruned[k], rtol=1e-4, atol=1e-6) for k in stats)
    assert same == (mode == "relative")
    metrics = io.read_metrics(paths.metrics("prune"))
    if mode == "relative":
        assert metrics["accuracy"] == metrics["accuracy_before_bn_recalibration"]
        assert metrics["measured_distortion"] < 1e-8


def test_prune_repairs_deterministically_and_the_repair_lowers_the_distortion(project, tmp_path):
    root = tmp_path / "repair"
    shutil.copytree(project, root)
    paths = io.Paths(root)
    first = paths.pruned.read_bytes()  # the fixture's run: the default repair is on
    assert prune.main(["--root", str(root)]) == 0
    assert paths.pruned.read_bytes() == first
    metrics = io.read_metrics(paths.metrics("prune"))
    assert metrics["measured_distortion"] < metrics["measured_distortion_before_repair"]
    state, dense = torch.load(paths.pruned), torch.load(paths.baseline)
    # every layer from the first pruned one on is re-solved (those before it, to themselves)
    allocation = tables.read_allocation(paths.allocation)
    first = int(np.flatnonzero(allocation.kept < allocation.numel)[0])
    for name in allocation.layers[first:]:
        keep = state[f"{name}.weight"] != 0
        assert not torch.equal(state[f"{name}.weight"][keep], dense[f"{name}.weight"][keep])
    # nothing pruned: the repair re-solves every layer to itself (up to rounding)
    write_params(root, prune={"ratio": 0.0}, allocate={"pareto_ratios": [0.5]})
    assert allocate.main(["--root", str(root)]) == 0
    assert prune.main(["--root", str(root)]) == 0
    state = torch.load(paths.pruned)
    for key, value in dense.items():
        torch.testing.assert_close(state[key], value, rtol=1e-4, atol=1e-5)
    assert io.read_metrics(paths.metrics("prune"))["measured_distortion"] < 1e-8


def test_bad_bn_recalibration_mode_is_one_error_line(project, tmp_path, capsys):
    root = tmp_path / "bad"
    shutil.copytree(project, root)
    write_params(root, prune={"bn_recalibration_mode": "sometimes"})
    before = io.Paths(root).pruned.read_bytes()
    assert prune.main(["--root", str(root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: prune.bn_recalibration_mode")
    assert "relative" in err[-1] and "absolute" in err[-1]
    assert io.Paths(root).pruned.read_bytes() == before


def test_the_device_is_logged_once_per_process(caplog):
    import logging

    from pipeline.config.params import Params
    from pipeline.edges.stage import _announce_device, stage_device

    _announce_device.cache_clear()
    caplog.set_level(logging.INFO)
    for _ in range(3):  # a stage that loads three models
        stage_device(Params(device="cpu"))
    assert caplog.text.count("device: cpu (device = cpu)") == 1
