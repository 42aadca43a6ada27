"""Every model family and data format, on tiny generated inputs."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config.params import load_params, param_keys
from pipeline.config.sections import DataParams
from pipeline.errors import PipelineError
from pipeline.nn.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    calibration_subset,
    load_dataset,
    synthetic_inputs,
)
from pipeline.nn.layers import macs_per_weight, prunable_numel
from pipeline.nn.models import build_model, load_weights, normalize_state_dict

PRESETS = sorted((Path(__file__).resolve().parents[1] / "presets").glob("*.yaml"))


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110])
def test_cifar_resnets(depth):
    model = build_model(f"cifar_resnet{depth}", 3, 10)
    layers = prunable_numel(model)
    assert len(layers) == depth  # 6n+1 convs and the `linear` head
    assert list(layers)[0] == "conv1" and list(layers)[-1] == "linear"
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_cifar_resnet_loads_public_checkpoint_layout():
    """{"state_dict": {"module.<name>": ...}} without BN step counters, as the public files."""
    source = build_model("cifar_resnet20", 3, 10)
    state = {f"module.{k}": v for k, v in source.state_dict().items() if "num_batches" not in k}
    target = build_model("cifar_resnet20", 3, 10)
    load_weights(
        target,
        normalize_state_dict({"state_dict": state, "best_prec1": 91.7}, "x.th"),
        "x.th",
        "cifar_resnet20",
    )
    assert torch.equal(target.layer3[2].conv2.weight, source.layer3[2].conv2.weight)


@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn", "mobilenet_v2", "densenet121"])
def test_torchvision_models_by_name(name):
    model = build_model(f"torchvision:{name}", 3, 7)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    macs = macs_per_weight(model, torch.randn(1, 3, 32, 32))
    assert set(macs) == set(prunable_numel(model)) and all(v >= 1 for v in macs.values())


def test_user_factory_by_import_path_and_bad_names():
    model = build_model("torchvision.models:resnet18", 3, 4)  # receives num_classes
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    fixed = build_model("tests.models_zoo:TinyMLP", 3, 4)  # names neither: called bare
    assert fixed(torch.randn(2, 12)).shape == (2, 5)
    with pytest.raises(PipelineError, match="torchvision:notanet"):
        build_model("torchvision:notanet", 3, 10)
    with pytest.raises(PipelineError, match="cannot be imported"):
        build_model("tests.nowhere:factory", 3, 10)
    with pytest.raises(PipelineError, match="allowed: cifar_resnet110, .*digits_cnn"):
        build_model("resnet9000", 3, 10)


def write_image_folder(root: Path, classes=3, per_class=4, size=10) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 2)):
        for c in range(classes):
            (root / split / f"class{c}").mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / f"class{c}" / f"{i}.png")


def test_image_folder(tmp_path):
    write_image_folder(tmp_path)
    splits = load_dataset(DataParams(name="imagefolder", root=str(tmp_path)))
    assert (len(splits.train_eval), len(splits.test), splits.num_classes, splits.in_channels) == (
        12,
        6,
        3,
        3,
    )
    x, y = calibration_subset(splits.train_eval, 5, seed=0)
    assert x.shape == (5, 3, 10, 10) and y.dtype == torch.int64
    again, _ = calibration_subset(splits.train_eval, 5, seed=0)
    assert torch.equal(x, again)  # seeded, evaluation transforms: deterministic
    resized = load_dataset(DataParams(name="imagefolder", root=str(tmp_path), image_size=8))
    assert resized.train_eval[0][0].shape == (3, 8, 8)
    (tmp_path / "val").rename(tmp_path / "elsewhere")
    with pytest.raises(PipelineError, match="no val/ or test/"):
        load_dataset(DataParams(name="imagefolder", root=str(tmp_path)))
    with pytest.raises(PipelineError, match="data.root"):
        load_dataset(DataParams(name="imagefolder", root=str(tmp_path / "missing")))


def write_cifar(root: Path, per_batch=6) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {
            "data": rng.integers(0, 255, size=(per_batch, 3072), dtype=np.uint8),
            "labels": list(rng.integers(0, 10, size=per_batch)),
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)


def test_cifar_format_directory(tmp_path):
    write_cifar(tmp_path)
    splits = load_dataset(DataParams(name="cifar10", root=str(tmp_path)))
    assert (len(splits.train_eval), len(splits.test)) == (30, 6)
    x, y = splits.test[0]
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "rb") as f:
        written = pickle.load(f)
    assert y == written["labels"][0]  # the first test image, with its label, as written
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (CIFAR10_MEAN, CIFAR10_STD))
    raw = torch.tensor(written["data"][0], dtype=torch.float32).view(3, 32, 32) / 255
    torch.testing.assert_close(x * std + mean, raw, atol=2e-3, rtol=0)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(PipelineError, match="lacks test_batch"):
        load_dataset(DataParams(name="cifar10", root=str(tmp_path)))


class _Payload:
    """Pickles as a call of os.system: what a hostile CIFAR batch would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("where", ["data", "labels", "top"])
def test_a_cifar_batch_cannot_run_code(tmp_path, where):
    """A batch whose pickle names anything but numpy arrays is refused with one line naming
    the file; the payload never runs."""
    write_cifar(tmp_path)
    marker = tmp_path / "ran"
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    entry = {"data": np.zeros((6, 3072), np.uint8), "labels": [0] * 6}
    if where == "top":
        entry = _Payload(marker)
    else:
        entry[where] = _Payload(marker)
    batch.write_bytes(pickle.dumps(entry))
    with pytest.raises(PipelineError, match=rf"data.root: {batch} is not allowed .*os") as err:
        load_dataset(DataParams(name="cifar10", root=str(tmp_path)))
    assert "\n" not in str(err.value)
    assert not marker.exists()
    batch.write_bytes(b"not a pickle at all")
    with pytest.raises(PipelineError, match=rf"data.root: {batch} is not allowed"):
        load_dataset(DataParams(name="cifar10", root=str(tmp_path)))


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"data": np.full((6, 3072), 0.7), "labels": [0] * 6}, "not a uint8 array"),
        ({"data": np.zeros((6, 3072), np.uint8), "labels": [0, 1, 2, 3, 4, 10]}, "0-9"),
        ({"data": np.zeros((6, 3072), np.uint8), "labels": [0, 1, 2, 3, 4, 3.9]}, "0-9"),
        ({"data": np.zeros((6, 100), np.uint8), "labels": [0] * 6}, "rows of 3072"),
    ],
)
def test_a_cifar_batch_holds_what_the_format_allows(tmp_path, entry, message):
    write_cifar(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    batch.write_bytes(pickle.dumps(entry))
    with pytest.raises(PipelineError, match=rf"{batch} is not allowed .*{message}"):
        load_dataset(DataParams(name="cifar10", root=str(tmp_path)))


def test_a_cifar_batch_cannot_declare_a_huge_array(tmp_path):
    """A few bytes of pickle can ask numpy for gigabytes; the size is checked against the
    file before the array is touched."""
    write_cifar(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"

    class Huge:
        def __reduce__(self):
            return (np.ndarray, ((2**22, 3072), np.dtype("u1")))

    batch.write_bytes(pickle.dumps({"data": Huge(), "labels": [0]}))
    with pytest.raises(PipelineError, match="not rows of 3072 stored bytes"):
        load_dataset(DataParams(name="cifar10", root=str(tmp_path)))


def test_an_old_protocol_cifar_batch_is_read(tmp_path):
    """Python 3 re-pickling the official batches with protocol 2 stores bytes via
    _codecs.encode: allowed."""
    write_cifar(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    data = np.arange(6 * 3072, dtype=np.uint8).reshape(6, 3072)
    batch.write_bytes(pickle.dumps({"data": data, "labels": [1] * 6, "name": b"x"}, protocol=2))
    splits = load_dataset(DataParams(name="cifar10", root=str(tmp_path)))
    assert len(splits.test) == 6 and splits.test[0][1] == 1


def test_synthetic_calibration_is_seeded_standard_normal():
    x = synthetic_inputs(torch.zeros(3, 32, 32), 512, seed=0)
    assert x.shape == (512, 3, 32, 32) and torch.equal(
        x, synthetic_inputs(torch.zeros(3, 32, 32), 512, 0)
    )
    assert abs(float(x.mean())) < 0.01 and abs(float(x.std()) - 1) < 0.01


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_presets_are_complete_valid_params(preset):
    import yaml

    mapping = yaml.safe_load(preset.read_text())
    load_params(mapping)  # valid, or this raises
    default = yaml.safe_load((preset.parents[1] / "params.yaml").read_text())
    for section, values in default.items():  # complete: every key params.yaml has
        assert section in mapping, section
        if isinstance(values, dict):
            assert set(values) == set(mapping[section]), section
    for key in param_keys(mapping):  # DVC's run-cache would drop a change to these
        assert key.rpartition(".")[2] not in ("size", "nfiles"), key
