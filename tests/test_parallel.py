"""Serial and Ray backends: same tables, byte for byte. Starts a real local Ray instance."""

import pytest
import torch

from pipeline import io
from pipeline.config import RayParams
from pipeline.distortion import DistortionCurves, profile_layer, sparsity_grid
from pipeline.errors import PipelineError
from pipeline.evaluation import predict_logits
from pipeline.layers import prunable_numel
from pipeline.models import build_model
from pipeline.parallel import map_tasks, probe


def _square(x: int, *, offset: int) -> int:
    return x * x + offset


def profile_all(backend: str) -> DistortionCurves:
    torch.manual_seed(0)
    model = build_model("digits_cnn", 1, 10)
    inputs = torch.randn(48, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    reference = predict_logits(model, inputs, 16)
    numel = prunable_numel(model)
    grid = sparsity_grid(9)
    shared = {
        "model": model,
        "inputs": inputs,
        "reference": reference,
        "sparsities": grid,
        "batch_size": 16,
        "threads": 1,
    }
    results = map_tasks(
        profile_layer, list(numel), shared=shared, params=RayParams(backend=backend, num_cpus=2)
    )
    return DistortionCurves.from_profiles(numel, grid, results, dict.fromkeys(numel, 1))


def test_serial_map_keeps_order():
    assert map_tasks(
        _square, [3, 1, 2], shared={"offset": 1}, params=RayParams(backend="serial")
    ) == [10, 2, 5]


def test_ray_and_serial_give_identical_tables(tmp_path):
    serial, ray_curves = profile_all("serial"), profile_all("ray")
    assert serial.layers == ["conv1", "conv2", "conv3", "conv4", "fc"]
    assert (serial.mean[:, 1:] > 0).all()
    io.write_distortion(tmp_path / "serial.parquet", serial, {})
    io.write_distortion(tmp_path / "ray.parquet", ray_curves, {})
    assert (tmp_path / "serial.parquet").read_bytes() == (tmp_path / "ray.parquet").read_bytes()


@pytest.mark.parametrize("address", ["127.0.0.1:1", "localhost:notaport", "nohost"])
def test_bad_cluster_address_fails_fast(address):
    with pytest.raises(PipelineError, match="ray.address"):
        probe("ray.address", address)
