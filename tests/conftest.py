"""Shared fixtures: a tiny project run through every stage in process (serial backend)."""

import json
from pathlib import Path

import pytest
import yaml

from stages import allocate, baseline, calibrate, finetune, profile, prune, track, validate

STAGES = [validate, baseline, calibrate, profile, allocate, prune, finetune, track]
TINY = {
    "baseline": {"epochs": 2},
    "calibrate": {"samples": 32},
    "profile": {"levels": 6},
    "finetune": {"epochs": 2},
    "ray": {"backend": "serial"},
    "prune": {"ratio": 0.6},
}


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
