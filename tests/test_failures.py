"""Every failure is one `error:` line (exit 2) naming what to change, found by the earliest
stage that can know; nothing is silently ignored."""

import errno
import hashlib
import logging
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from pipeline.config.params import load_params
from pipeline.edges import io, params_file, tables
from pipeline.edges.preflight import model_code_digest
from pipeline.errors import PipelineError
from pipeline.nn.layers import macs_per_weight, unpruned_matrices
from pipeline.nn.models import build_model
from stages import allocate, baseline, prune, track, validate
from tests.conftest import write_params
from tests.test_models_data import write_image_folder

REPO = Path(__file__).resolve().parents[1]


def one_error_line(stage, root: Path, capsys) -> str:
    """Run ``stage`` in process: exit 2 and exactly one line on stderr, which is returned."""
    capsys.readouterr()
    assert stage.main(["--root", str(root)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


def copy(project: Path, dest: Path, **overrides) -> io.Paths:
    shutil.copytree(project, dest)
    write_params(dest, **overrides)
    return io.Paths(dest)


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({"seed": -1}, r"seed = -1 .*\[0, 2\*\*32 - 1\]"),
        ({"data": {"image_size": 32}}, r"data.image_size = 32 .*null with data.name 'digits'"),
        (
            {"allocate": {"refine_holdout": 1.5}},  # refine is null: still checked
            r"allocate.refine_holdout = 1.5 .*\(0, 1\)",
        ),
        ({"allocate": {"refine_evals": 0}}, r"allocate.refine_evals = 0"),
        ({"data": {"mean": [0.0], "std": [float("nan")]}}, r"data.std = \[nan\] .*finite"),
        ({"data": {"mean": [float("inf")], "std": [1.0]}}, r"data.mean = \[inf\] .*finite"),
        ({"profile": {"levels": 10**9}}, r"profile.levels = 1000000000 .*\[2, 10001\]"),
        ({"calibrate": {"source": "synthetic", "samples": 10**9}}, r"calibrate.samples = "),
    ],
)
def test_values_checked_before_any_work(mapping, message):
    with pytest.raises(PipelineError, match=message):
        load_params(mapping)


def test_floats_are_read_as_dvc_reads_them(tmp_path):
    """PyYAML reads `1e-1` as a string; DVC (YAML 1.2) as a number: so does the pipeline."""
    (tmp_path / "params.yaml").write_text("finetune:\n  lr: 1e-2\nprune:\n  ratio: 5e-1\n")
    params = params_file.read_params(tmp_path / "params.yaml")
    assert params.finetune.lr == 0.01 and params.prune.ratio == 0.5


def test_yaml_is_read_as_dvc_reads_it(tmp_path):
    """YAML 1.2, as DVC: 017 is 17 (not octal 15), `yes` and `4:16` are strings (not true and
    256), a key given twice is an error; a file that is not UTF-8 is one line."""
    path = tmp_path / "params.yaml"
    path.write_text("seed: 017\nprune:\n  ratio: 0.5\n")
    assert params_file.read_params(path).seed == 17
    for text, message in [
        ("profile:\n  reconstruct: yes\n", r"profile.reconstruct = 'yes'"),
        ("calibrate:\n  samples: 4:16\n", r"calibrate.samples = '4:16'"),
        ("prune:\n  ratio: 0.8\n  ratio: 0.5\n", r"key 'ratio' given twice \(line 3\)"),
    ]:
        path.write_text(text)
        with pytest.raises(PipelineError, match=message):
            params_file.read_params(path)
    path.write_bytes(b"\xff\xfe garbage")
    with pytest.raises(PipelineError, match="is not UTF-8 text"):
        params_file.read_params(path)


@pytest.mark.parametrize(
    ("code", "shown"),
    [("raise RuntimeError('no GPU driver here')", "RuntimeError: no GPU driver"),
     ("import sys; sys.exit(3)", "SystemExit: 3")],
)  # fmt: skip
def test_a_user_module_that_raises_on_import_is_one_line(tmp_path, monkeypatch, code, shown):
    (tmp_path / "brokenmodel.py").write_text(code + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PipelineError, match=rf"brokenmodel:make.*{shown}"):
        load_params({"model": {"arch": "brokenmodel:make"}})


def test_a_user_models_code_is_a_dependency(tmp_path, monkeypatch):
    """validate writes a digest of the module's file; editing it changes the digest, so the
    stages that build the model (dvc.yaml deps) rerun."""
    source = tmp_path / "mymodel.py"
    source.write_text(
        "from torch import nn\ndef make(num_classes):\n    return nn.Linear(64, 10)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    first = model_code_digest("mymodel:make", tmp_path)
    assert list(first) == ["mymodel.py"]
    source.write_text(source.read_text() + "# edited\n")
    assert model_code_digest("mymodel:make", tmp_path) != first
    assert model_code_digest("cifar_resnet20", tmp_path) == {}  # the registry's own: none
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name in ("baseline", "calibrate", "profile", "allocate", "prune", "finetune", "schedule"):
        assert "${paths.model_code}" in stages[name]["deps"], name
    assert "${paths.model_code}" in stages["validate"]["outs"]


def _image_project(project: Path, dest: Path, **data) -> io.Paths:
    write_image_folder(dest / "images", classes=3, per_class=4, size=10)
    return copy(
        project,
        dest / "p",
        model={"arch": "cifar_resnet20"},
        data={"name": "imagefolder", "root": str(dest / "images"), **data},
        calibrate={"samples": 8},
        prune={"reconstruct_samples": 8},
    )


def test_a_corrupt_image_is_found_by_validate(project, tmp_path, capsys):
    paths = _image_project(project, tmp_path)
    bad = tmp_path / "images" / "train" / "class1" / "2.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    line = one_error_line(validate, paths.root, capsys)
    assert str(bad) in line and "not a readable image" in line


def test_an_image_of_another_size_is_found_by_validate(project, tmp_path, capsys):
    paths = _image_project(project, tmp_path)
    odd = tmp_path / "images" / "val" / "class2" / "1.png"
    Image.new("RGB", (12, 10)).save(odd)
    line = one_error_line(validate, paths.root, capsys)
    assert str(odd) in line and "12x10" in line and "data.image_size" in line
    # with a resize the sizes may differ
    write_params(
        paths.root,
        model={"arch": "cifar_resnet20"},
        data={"name": "imagefolder", "root": str(tmp_path / "images"), "image_size": 8},
        calibrate={"samples": 8},
        prune={"reconstruct_samples": 8},
    )
    assert validate.main(["--root", str(paths.root)]) == 0


def _claim_size(png: Path, width: int, height: int) -> None:
    """Rewrite a PNG's header to claim another size (its CRC fixed), as a decompression bomb
    does: nothing is allocated until the image is decoded."""
    import struct
    import zlib

    data = bytearray(png.read_bytes())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    png.write_bytes(bytes(data))


def test_a_decompression_bomb_first_in_the_folder_is_one_line(project, tmp_path, capsys):
    paths = _image_project(project, tmp_path, image_size=8)
    _claim_size(tmp_path / "images" / "train" / "class0" / "0.png", 30_000, 30_000)
    line = one_error_line(validate, paths.root, capsys)
    assert "data.root" in line and "is not a readable image folder" in line


def test_an_image_folder_is_read_as_it_is_or_said_so(project, tmp_path, capsys, caplog):
    """A symlink to a folder above would feed images twice (an error); a file that is not an
    image is skipped with a warning naming it."""
    paths = _image_project(project, tmp_path)
    note = tmp_path / "images" / "train" / "class1" / "readme.txt"
    note.write_text("not an image")
    with caplog.at_level(logging.WARNING):
        assert validate.main(["--root", str(paths.root)]) == 0
    assert "not images" in caplog.text and str(note) in caplog.text
    (tmp_path / "images" / "train" / "class0" / "loop").symlink_to("..")
    line = one_error_line(validate, paths.root, capsys)
    assert "(through a symlink)" in line


@pytest.mark.parametrize(
    ("limits", "exclude", "message"),
    [
        ({"conv1": [0.9, 0.1]}, [], r"allocate.limits\['conv1'\] = \[0.9, 0.1\]"),
        ({"nosuch*": [0.0, 0.5]}, [], r"allocate.limits\['nosuch\*'\] matches no layer"),
        ({}, ["fc9"], r"allocate.exclude 'fc9' matches no layer"),
    ],
)
def test_layer_limits_are_checked_by_validate(project, tmp_path, capsys, limits, exclude, message):
    import re

    paths = copy(project, tmp_path / "p", allocate={"limits": limits, "exclude": exclude})
    assert re.search(message, one_error_line(validate, paths.root, capsys))


def test_a_model_for_other_channels_is_found_by_validate(project, tmp_path, capsys):
    paths = copy(project, tmp_path / "p", model={"arch": "torchvision:resnet18"})
    line = one_error_line(validate, paths.root, capsys)
    assert "model.arch = 'torchvision:resnet18' cannot run on data.name = 'digits'" in line


def test_an_empty_params_file_is_found_by_validate(project, tmp_path, capsys):
    paths = copy(project, tmp_path / "p")
    shutil.copy(REPO / "dvc.yaml", paths.root / "dvc.yaml")
    paths.params.write_text("")
    line = one_error_line(validate, paths.root, capsys)
    assert "params.yaml lacks" in line and "dvc.yaml's stage" in line


def test_checkpoint_nan_is_an_error_and_half_precision_a_warning(project, tmp_path, capsys, caplog):
    state = {k: v.clone() for k, v in torch.load(io.Paths(project).baseline).items()}
    half = tmp_path / "half.pt"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, half)
    paths = copy(project, tmp_path / "p", model={"checkpoint": str(half)})
    with caplog.at_level(logging.WARNING):
        assert baseline.main(["--root", str(paths.root)]) == 0
    assert "float16 -> float32" in caplog.text and str(half) in caplog.text
    state["conv1.weight"][0, 0, 0, 0] = float("nan")
    nan = tmp_path / "nan.pt"
    torch.save(state, nan)
    write_params(paths.root, model={"checkpoint": str(nan)})
    before = paths.baseline.read_bytes()
    for stage in (validate, baseline):  # validate first: DVC deletes baseline's outputs
        line = one_error_line(stage, paths.root, capsys)
        assert f"checkpoint {nan} holds NaN or inf in conv1.weight" in line
    assert paths.baseline.read_bytes() == before


def test_a_ratio_that_empties_layers_is_a_warning(project, tmp_path, caplog):
    paths = copy(project, tmp_path / "p", prune={"ratio": 0.99999})
    with caplog.at_level(logging.WARNING):
        assert allocate.main(["--root", str(paths.root)]) == 0
    assert "layers keep no weight" in caplog.text


@pytest.mark.parametrize("stage", [validate, prune], ids=["validate", "prune"])
def test_a_full_disk_in_a_stage_is_one_line_and_keeps_the_outputs(
    project, tmp_path, capsys, monkeypatch, stage
):
    paths = copy(project, tmp_path / "p")
    outputs = (paths.defaults, paths.pruned, paths.metrics("prune"))
    before = {p: p.read_bytes() for p in outputs if p.exists()}

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.os, "fsync", full)
    line = one_error_line(stage, paths.root, capsys)
    assert "No space left on device" in line and str(paths.root) in line
    assert all(p.read_bytes() == b for p, b in before.items())
    assert not list(paths.root.rglob(io.TEMPORARY))


def test_a_locked_mlflow_store_is_one_line(project, tmp_path, capsys, monkeypatch):
    import mlflow

    paths = copy(project, tmp_path / "p")
    (paths.root / "mlflow.db").unlink()  # a new result: track has to write

    def locked(*args, **kwargs):
        import sqlite3

        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(mlflow.MlflowClient, "search_runs", locked)
    line = one_error_line(track, paths.root, capsys)
    assert "the MLflow store sqlite:///" in line and "database is locked" in line


RACE = """
import sys
from pipeline.edges import tracking
record = tracking.RunRecord({"a": 1}, {"m": 1.0}, {}, {}, [], {})
tracking.log_result(tracking_uri=sys.argv[1], experiment="e", key=sys.argv[2], exp_name="",
                    run_name=sys.argv[2], record=record)
"""


def test_two_tracks_racing_on_a_fresh_store_both_log(tmp_path):
    import subprocess

    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACE, uri, key], cwd=REPO, stderr=subprocess.PIPE, text=True
        )
        for key in ("k1", "k2")
    ]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.embed(x)
        return self.head(self.attn(h, h, h)[0].mean(1))


def test_attention_weights_left_dense_are_named_and_counted():
    model = Attention().eval()
    sample = torch.randn(2, 5, 6)  # 5 tokens
    macs = macs_per_weight(model, sample)
    assert macs == {"embed": 5, "attn.out_proj": 5, "head": 1}
    assert unpruned_matrices(model) == ["attn.in_proj_weight"]
    assert unpruned_matrices(build_model("digits_cnn", 1, 10)) == []


ATTENTION_MODULE = """
import torch
from torch import nn


class Model(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        h = self.embed(x.flatten(1).view(len(x), 8, 8))  # an 8x8 digit as 8 tokens
        return self.head(self.attn(h, h, h)[0].mean(1))


def make(num_classes):
    return Model(num_classes)
"""


def test_an_attention_model_through_the_stages(tmp_path, monkeypatch, caplog):
    """The weight matrix the tool cannot prune is named in validate's warning and counted in
    the overall sparsity beside the prunable one; out_proj's MACs are its tokens."""
    from stages import calibrate, profile

    (tmp_path / "attnmodel.py").write_text(ATTENTION_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    root = tmp_path / "p"
    root.mkdir()
    write_params(
        root,
        model={"arch": "attnmodel:make"},
        baseline={"epochs": 1},
        finetune={"epochs": 1},
        allocate={"budget": "flops", "pareto_ratios": [0.5]},
        prune={"ratio": 0.6},
    )
    with caplog.at_level(logging.WARNING):
        for stage in (validate, baseline, calibrate, profile, allocate, prune):
            assert stage.main(["--root", str(root)]) == 0, stage.__name__
    assert "attn.in_proj_weight" in caplog.text and "stay dense" in caplog.text
    paths = io.Paths(root)
    macs = tables.read_distortion(paths.distortion).macs_per_weight.tolist()
    assert macs == [8, 8, 1]  # embed and out_proj once per token, the head once
    metrics = io.read_metrics(paths.metrics("prune"))
    assert 0 < metrics["sparsity_all_weight_matrices"] < metrics["sparsity"]
    from pipeline.edges.result import result_record
    from stages import finetune

    assert finetune.main(["--root", str(root)]) == 0
    logged = result_record(params_file.read_params(paths.params), paths).metrics  # what MLflow gets
    for key in ("sparsity", "sparsity_all_weight_matrices", "measured_distortion_max"):
        assert logged[key] == pytest.approx(metrics[key]), key
    source = tmp_path / "attnmodel.py"  # outside the project: named by its absolute path
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    assert io.read_metrics(paths.model_code) == {str(source): digest}


def test_more_repair_images_than_the_training_set_is_one_line(project, tmp_path, capsys):
    paths = copy(project, tmp_path / "p", prune={"ratio": 0.6, "reconstruct_samples": 99_999})
    before = paths.pruned.read_bytes()
    for stage in (validate, prune):  # found before any work; the prune stage says it too
        line = one_error_line(stage, paths.root, capsys)
        assert "prune.reconstruct_samples = 99999 exceeds the 1438 training images" in line
    assert paths.pruned.read_bytes() == before
