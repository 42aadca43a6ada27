"""Serial and Ray backends: same tables, byte for byte; a failing task is one error naming
its unit. Starts one real local Ray instance for the module."""

import pytest
import ray
import torch

from pipeline.config.runtime import RayParams
from pipeline.edges import tables
from pipeline.edges.parallel.cluster import probe
from pipeline.edges.parallel.tasks import map_tasks, run_tasks, task_slots
from pipeline.errors import PipelineError
from pipeline.nn.evaluation import predict_logits
from pipeline.nn.layers import prunable_numel
from pipeline.nn.models import build_model
from pipeline.profiling.distortion import DistortionCurves, profile_layer, sparsity_grid
from pipeline.profiling.workunits import WorkUnit, profile_unit
from tests.conftest import tiny_profile_task


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


LISTENERS = """
import json, os, sys, psutil
from pipeline.config.runtime import RayParams
from pipeline.edges.parallel.tasks import run_tasks, session
from pipeline.edges.parallel.cluster import token_path

def ip(x):
    return x

with session(RayParams(num_cpus=1)):
    run_tasks(ip, [1, 2], shared={}, params=RayParams(num_cpus=1))  # workers started too
    tree = [psutil.Process(), *psutil.Process().children(recursive=True)]
    pids = {p.pid for p in tree}
    names = {p.pid: " ".join(p.cmdline()[:1]) for p in tree}
    found = [
        (c.laddr.ip, c.laddr.port, names[c.pid])
        for c in psutil.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.pid in pids
    ]
print(json.dumps({"listening": found, "token_mode": token_path().stat().st_mode & 0o777}))
"""


def test_a_private_instance_listens_on_loopback_only_and_keeps_its_token_private(tmp_path):
    """Every socket the private instance's processes (GCS, raylet, agents, metrics exporter,
    workers, this driver) listen on is on loopback; the token Ray writes is 0600; Ray's
    "Set RAY_AUTH_MODE=disabled to opt out" notice, which a user cannot act on, is not shown."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    short = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # Ray's sockets: <= 107 bytes
    env = {**os.environ, "HOME": str(tmp_path / "home"), "RAY_TMPDIR": str(short)}
    env.pop("RAY_ADDRESS", None)
    repo = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(
            [sys.executable, "-c", LISTENERS], env=env, cwd=repo, capture_output=True, text=True
        )
    finally:
        shutil.rmtree(short, ignore_errors=True)
    assert out.returncode == 0, out.stderr
    # token auth is the tool's choice here, not the user's: Ray's opt-out notice is not shown
    assert "Token authentication is enabled" not in out.stderr, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(result["listening"]) >= 3  # GCS, raylet, agents at least
    loopback = ("127.0.0.1", "::1", "::ffff:127.0.0.1")
    assert [x for x in result["listening"] if x[0] not in loopback] == []
    assert result["token_mode"] == 0o600


def test_serial_map_keeps_order():
    assert map_tasks(
        _square, [3, 1, 2], shared={"offset": 1}, params=RayParams(backend="serial")
    ) == [10, 2, 5]


@pytest.fixture(scope="module")
def ray_local():
    """A private local instance shared by this module's Ray tests (run_tasks reuses it)."""
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def test_ray_and_serial_give_identical_tables(tmp_path, ray_local):
    serial, ray_curves = profile_all("serial"), profile_all("ray")
    assert serial.layers == ["conv1", "conv2", "conv3", "conv4", "fc"]
    assert (serial.mean[:, 1:] > 0).all()
    tables.write_distortion(tmp_path / "serial.parquet", serial, {})
    tables.write_distortion(tmp_path / "ray.parquet", ray_curves, {})
    assert (tmp_path / "serial.parquet").read_bytes() == (tmp_path / "ray.parquet").read_bytes()


@pytest.mark.parametrize("address", ["127.0.0.1:1", "localhost:notaport", "nohost"])
def test_bad_cluster_address_fails_fast(address):
    with pytest.raises(PipelineError, match="ray.address"):
        probe("ray.address", address)


def test_a_failing_ray_task_is_one_error_naming_its_unit(ray_local):
    shared = tiny_profile_task()
    units = [WorkUnit("conv1", 0, 0, 5, 2.0), WorkUnit("no_such_layer", 1, 2, 5, 1.0)]
    with pytest.raises(PipelineError) as error:
        run_tasks(profile_unit, units, shared=shared, params=RayParams(), desc="profile")
    message = str(error.value)
    assert message.startswith("profile: layer 'no_such_layer' levels 2-4 failed: AttributeError")
    assert "\n" not in message


def units_run(backend: str, work_units: int | None) -> tuple[int, bytes]:
    """(work units the profile ran, its table's bytes) for TinyResNet on ``backend``."""
    import dataclasses
    import tempfile
    from pathlib import Path

    from pipeline.config.params import Params
    from pipeline.edges.profile_run import profile_curves
    from tests.models_zoo import TinyResNet, randomized

    torch.manual_seed(0)  # the same weights on every call
    model = randomized(TinyResNet())
    inputs = torch.randn(24, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    reference = predict_logits(model, inputs, 8)
    base = Params()
    params = dataclasses.replace(
        base,
        profile=dataclasses.replace(base.profile, levels=11, batch_size=8, bn_correction=True),
        ray=RayParams(backend=backend, work_units=work_units),
    )
    placements = []
    curves = profile_curves(params, model, inputs, reference, placements)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.parquet"
        tables.write_distortion(path, curves, {})
        return len(placements), path.read_bytes()


def test_null_work_units_are_four_per_task_slot_with_the_same_table(ray_local):
    """ray.work_units null: 4 units per task that runs at once (2 CPUs here: 8, in process: 4);
    on a CPU the table is byte-identical whatever the cut."""
    assert task_slots(RayParams()) == 2 and task_slots(RayParams(backend="serial")) == 1
    auto_ray, table = units_run("ray", None)
    assert auto_ray == units_run("ray", 8)[0]
    auto_serial, serial_table = units_run("serial", None)
    assert auto_serial == units_run("serial", 4)[0]
    one_per_layer, one_table = units_run("serial", 1)
    assert auto_ray > one_per_layer  # 8 units cut layers (12 units): the check can fail
    assert table == serial_table == one_table
