import pytest

from pipeline.config import Params, flatten, load_params
from pipeline.errors import PipelineError


def test_defaults_validate():
    params = load_params({})
    assert params == Params()
    assert flatten(params)["prune.ratio"] == 0.8


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
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
