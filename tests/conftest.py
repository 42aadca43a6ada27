"""Shared fixtures: a tiny project run through every stage in process (serial backend)."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.edges import io
from pipeline.nn.evaluation import predict_logits
from pipeline.nn.models import build_model
from stages import (
    allocate,
    baseline,
    calibrate,
    export,
    finetune,
    profile,
    prune,
    schedule,
    track,
    validate,
)

STAGES = [
    validate,
    baseline,
    calibrate,
    profile,
    allocate,
    prune,
    finetune,
    schedule,
    export,
    track,
]
TINY = {
    "baseline": {"epochs": 2},
    "calibrate": {"samples": 32},
    "profile": {"levels": 6},
    "finetune": {"epochs": 2},
    "ray": {"backend": "serial"},
    "prune": {"ratio": 0.6},
}


REPO = Path(__file__).resolve().parents[1]


def resolved_dvc_yaml() -> dict:
    """dvc.yaml with its ``${paths.*}`` references replaced as DVC resolves them (the layout
    in pipeline/paths.yaml); a reference the layout lacks raises KeyError."""
    layout = yaml.safe_load(io.LAYOUT_FILE.read_text())["paths"]
    text = (REPO / "dvc.yaml").read_text()
    return yaml.safe_load(re.sub(r"\$\{paths\.(\w+)\}", lambda m: layout[m.group(1)], text))


def write_params(root: Path, **overrides) -> None:
    params = json.loads(json.dumps(TINY))
    for section, values in overrides.items():
        params.setdefault(section, {}).update(values)
    params.setdefault("track", {})["tracking_uri"] = f"sqlite:///{root / 'mlflow.db'}"
    (root / "params.yaml").write_text(yaml.safe_dump(params))


@pytest.fixture(scope="session")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("project")
    write_params(root)
    for stage in STAGES:
        assert stage.main(["--root", str(root)]) == 0, stage.__name__
    return root


def tiny_profile_task() -> dict:
    """The shared keywords of a profiling task on the (random) digits CNN: 4 inputs, 5 levels."""
    model = build_model("digits_cnn", 1, 10)
    inputs = torch.randn(4, 1, 8, 8)
    return {
        "model": model,
        "inputs": inputs,
        "reference": predict_logits(model, inputs, 4),
        "sparsities": np.linspace(0, 1, 5),
        "batch_size": 4,
        "threads": 1,
    }
