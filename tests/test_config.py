from pathlib import Path

import pytest
import yaml

from pipeline.config.params import defaults, flatten, load_params, param_keys
from pipeline.errors import PipelineError

REPO = Path(__file__).resolve().parents[1]
PARAM_FILES = [REPO / "params.yaml", *sorted((REPO / "presets").glob("*.yaml"))]


def test_params_yaml_is_exactly_the_defaults():
    """One home for defaults: the dataclasses; params.yaml spells out the same values."""
    assert yaml.safe_load((REPO / "params.yaml").read_text()) == defaults()
    assert flatten(load_params({}))["prune.bn_recalibration"] == 512


@pytest.mark.parametrize("path", PARAM_FILES, ids=lambda p: p.name)
def test_no_param_name_that_dvc_run_cache_drops(path):
    """DVC's run-cache key excludes every param named size or nfiles, at any depth."""
    mapping = yaml.safe_load(path.read_text())
    load_params(mapping)
    assert not [k for k in param_keys(mapping) if k.rpartition(".")[2] in ("size", "nfiles")]


@pytest.mark.parametrize(
    "mapping",
    [{"calibrate": {"size": 128}}, {"allocate": {"limits": {"nfiles": [0, 1]}}}],
)
def test_a_key_dvc_would_ignore_is_rejected(mapping):
    with pytest.raises(PipelineError, match=r"has a name DVC's run-cache ignores"):
        load_params(mapping)


def test_bn_corrected_curves_need_the_prune_stage_to_recalibrate():
    with pytest.raises(PipelineError, match=r"profile.bn_correction = True .*bn_recalibration"):
        load_params({"prune": {"bn_recalibration": 0}})
    params = load_params({"prune": {"bn_recalibration": 0}, "profile": {"bn_correction": False}})
    assert params.prune.bn_rule is None and params.curve_bn_rule is None
    assert load_params({}).curve_bn_rule == "relative"


def test_repaired_curves_need_the_prune_stage_to_repair():
    with pytest.raises(PipelineError, match=r"profile.reconstruct = True .*prune.reconstruct"):
        load_params({"prune": {"reconstruct": None}})
    # the reverse is allowed (rd then allocates on curves that do not model the repair)
    params = load_params({"profile": {"reconstruct": False}})
    assert params.prune.reconstruct == "output" and params.curve_repair is None
    assert load_params({}).curve_repair == 0.01


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({"prune": {"reconstruct": "magic"}}, r"prune.reconstruct = 'magic' .*layerwise, output"),
        ({"prune": {"reconstruct_samples": 0}}, r"prune.reconstruct_samples = 0 .*>= 1"),
        ({"prune": {"reconstruct_damping": -0.1}}, r"prune.reconstruct_damping = -0.1 .*>= 0"),
        ({"prune": {"reconstruct_damping": "1e-2"}}, r"prune.reconstruct_damping = '1e-2'"),
        ({"allocate": {"refine": "ce"}}, r"allocate.refine = 'ce' .*prune.reconstruct"),
        ({"prune": {"ratio": 1.0}}, r"prune.ratio = 1.0 .*\[0.0, 1.0\)"),
        ({"prune": {"ratio": -0.1}}, r"prune.ratio = -0.1"),
        ({"prune": {"ratio": "high"}}, r"prune.ratio = 'high' .*float"),
        (
            {"model": {"arch": "resnet9000"}},
            r"model.arch = 'resnet9000' .*allowed: .*digits_cnn, torchvision:NAME",
        ),
        (
            {"data": {"name": "mnist"}},
            r"data.name = 'mnist' .*allowed: cifar10, digits, imagefolder",
        ),
        (
            {"allocate": {"method": "magic"}},
            r"allocate.method = 'magic' .*allowed: erk, global, lamp, rd",
        ),
        ({"allocate": {"budget": "latency"}}, r"allocate.budget .*allowed: both, flops, params"),
        ({"allocate": {"budget": "both"}}, r"allocate.flops_ratio = None .*budget 'both'"),
        ({"allocate": {"limits": {"conv1": "dense"}}}, r"allocate.limits\['conv1'\] = 'dense'"),
        ({"allocate": {"pareto_ratios": [0.5, 1.2]}}, r"allocate.pareto_ratios\[1\] = 1.2"),
        ({"allocate": {"distortion": "median"}}, r"allocate.distortion .*allowed: max, mean"),
        ({"ray": {"backend": "dask"}}, r"ray.backend = 'dask' .*allowed: ray, serial"),
        ({"profile": {"levels": 1}}, r"profile.levels = 1"),
        ({"prune": {"ratoi": 0.5}}, r"unknown param prune.ratoi .*allowed: ratio"),
        ({"pruning": {}}, r"unknown param pruning"),
        ({"finetune": {"epochs": 2.5}}, r"finetune.epochs = 2.5 .*int"),
    ],
)
def test_bad_params_name_the_key_and_what_is_allowed(mapping, message):
    with pytest.raises(PipelineError, match=message):
        load_params(mapping)


def test_ints_are_accepted_for_floats():
    assert load_params({"finetune": {"lr": 1}}).finetune.lr == 1.0
