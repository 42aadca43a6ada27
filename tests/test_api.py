"""The Python API: the README's example runs as written; rdprune imports no DVC, Ray or
MLflow and refuses a foreign top-level ``pipeline``; its calls agree with the core."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import rdprune
from pipeline.nn.layers import prunable_numel
from pipeline.pruning.masking import zero_count
from tests.models_zoo import TinyResNet, randomized

ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), namespace)
    model, allocation = namespace["model"], namespace["allocation"]
    zeros, total = zero_count(model)
    assert zeros / total == pytest.approx(allocation.summary()["sparsity"])
    back = rdprune.load_compact(next(tmp_path.glob("*.safetensors")))
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


def test_import_pulls_in_no_dvc_ray_or_mlflow():
    code = (
        "import sys, rdprune; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'mlflow', 'dvc'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_foreign_pipeline_package_is_one_clear_error(tmp_path):
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "__init__.py").write_text("")
    out = subprocess.run(
        [sys.executable, "-c", "import rdprune"],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
    )
    assert out.returncode != 0
    assert "another distribution provides a 'pipeline' package" in out.stderr


def test_allocate_meets_the_ratio_and_rd_is_optimal_on_its_curves():
    model = randomized(TinyResNet()).eval()
    calib = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    curves = rdprune.profile(model, calib, levels=11, reconstruct=None)
    rd = rdprune.allocate(curves, 0.6)
    glob = rdprune.allocate(curves, 0.6, method="global", model=model)
    for a in (rd, glob):
        assert a.summary()["sparsity"] >= 0.6 - 1e-9
    assert rd.total_predicted <= glob.total_predicted + 1e-12
    with pytest.raises(ValueError, match="pass model="):
        rdprune.allocate(curves, 0.6, method="lamp")
    pruned = rdprune.prune(model, rd, calib)
    for name, kept in rd.kept_by_layer.items():
        weight = dict(pruned.named_modules())[name].weight
        assert int((weight != 0).sum()) <= kept
    assert set(rd.layers) == set(prunable_numel(model))
    assert np.isfinite(pruned(calib).detach().numpy()).all()


def test_prune_without_inputs_needs_no_recovery():
    model = randomized(TinyResNet()).eval()
    calib = torch.randn(16, 3, 8, 8)
    allocation = rdprune.allocate(rdprune.profile(model, calib, levels=5, reconstruct=None), 0.5)
    with pytest.raises(ValueError, match="need inputs"):
        rdprune.prune(model, allocation)
    rdprune.prune(model, allocation, reconstruct=None, bn_recalibration=None)
    assert zero_count(model)[0] > 0


def test_misuse_is_one_clear_error():
    model = randomized(TinyResNet()).eval()
    calib = torch.randn(8, 3, 8, 8)
    curves = rdprune.profile(model, calib, levels=3, reconstruct=None)
    for ratio in (1.0, -0.1, "0.8", float("nan")):
        with pytest.raises(ValueError, match="ratio = .*allowed: a number in"):
            rdprune.allocate(curves, ratio)
    with pytest.raises(ValueError, match="method = 'bogus'; allowed: .*global"):
        rdprune.allocate(curves, 0.5, method="bogus")
    with pytest.raises(ValueError, match="no prunable layer"):
        rdprune.profile(torch.nn.Sequential(torch.nn.ReLU()), calib)
    with pytest.raises(ValueError, match="non-empty"):
        rdprune.profile(model, calib[:0])
