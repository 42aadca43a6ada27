"""The real thing: `dvc repro` in a temporary git checkout, a ratio change, bad input.

Runs real DVC, a real local Ray instance and a real MLflow sqlite store (~1-2 min).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
FAST = {
    "baseline": {"epochs": 3},
    "calibrate": {"size": 64},
    "profile": {"levels": 11},
    "finetune": {"epochs": 2},
    "ray": {"num_cpus": 2},
}
STAGES = ["baseline", "calibrate", "profile", "allocate", "prune", "finetune"]

pytestmark = pytest.mark.slow


def sh(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
        "DVC_NO_ANALYTICS": "1",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PATH"] = (
        f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # this venv's dvc/python
    )
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode:
        raise AssertionError(
            f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


def edit_params(root: Path, section: str, key: str, value) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params[section][key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def ran(output: str) -> list[str]:
    return [s for s in STAGES if f"Running stage '{s}'" in output]


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clone")
    files = sh(REPO, "git", "ls-files", "--cached", "--others", "--exclude-standard").stdout.split()
    for name in files:
        if (REPO / name).is_file() and not name.startswith("tests/"):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    (root / "dvc.lock").unlink(missing_ok=True)
    params = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in FAST.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(root, "git", "init", "-q")
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-qm", "init")
    return root


def test_repro_ratio_change_mlflow_and_bad_input(checkout):
    root = checkout
    first = sh(root, "dvc", "repro")
    assert ran(first.stdout) == STAGES
    for out in (
        "baseline.pt",
        "calibration.pt",
        "distortion.parquet",
        "allocation.parquet",
        "pruned.pt",
        "finetuned.pt",
    ):
        assert (root / "artifacts" / out).is_file(), out
    assert "Data and pipelines are up to date" in sh(root, "dvc", "status").stdout

    # Editing prune.ratio reruns exactly allocate, prune and finetune.
    edit_params(root, "prune", "ratio", 0.5)
    second = sh(root, "dvc", "repro")
    assert ran(second.stdout) == ["allocate", "prune", "finetune"]
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-qm", "ratio 0.5")

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("rdprune").experiment_id])
    assert sorted(r.data.params["prune.ratio"] for r in runs) == ["0.5", "0.8"]
    assert all(r.data.metrics["sparsity"] >= float(r.data.params["prune.ratio"]) for r in runs)

    # Bad input: one clear line, non-zero exit; after the params are put back, checkout restores.
    allocation = (root / "artifacts" / "allocation.parquet").read_bytes()
    good_params = (root / "params.yaml").read_text()
    for section, key, value, message in [
        ("prune", "ratio", 1.5, "error: prune.ratio = 1.5"),
        ("model", "arch", "resnet9000", "error: model.arch = 'resnet9000'"),
        ("allocate", "method", "magic", "error: allocate.method = 'magic'"),
    ]:
        edit_params(root, section, key, value)
        bad = sh(root, "dvc", "repro", check=False)
        assert bad.returncode != 0
        assert message in bad.stderr + bad.stdout
        (root / "params.yaml").write_text(good_params)
        sh(root, "dvc", "checkout")
        assert "Data and pipelines are up to date" in sh(root, "dvc", "status").stdout
        assert (root / "artifacts" / "allocation.parquet").read_bytes() == allocation
    assert len(client.search_runs([client.get_experiment_by_name("rdprune").experiment_id])) == 2
