"""Work units: the cost model, the level-range split, reassembly, and equal tables whatever
the split."""

import dataclasses

import numpy as np
import pytest
import torch

from pipeline.config.params import Params
from pipeline.config.runtime import RayParams
from pipeline.edges import tables
from pipeline.edges.parallel.tasks import run_tasks
from pipeline.edges.profile_run import profile_curves
from pipeline.errors import PipelineError
from pipeline.nn.evaluation import predict_logits
from pipeline.profiling.workunits import WorkUnit, assemble, layer_costs, plan_units, profile_unit
from tests.conftest import tiny_profile_task
from tests.models_zoo import TinyResNet, randomized

NUMEL = {"a": 100, "b": 100, "c": 10}
MACS = {"a": 64, "b": 16, "c": 1}  # MACs per weight: a 6400, b 1600, c 10 per sample


def test_fast_costs_are_prefix_once_plus_suffix_per_level():
    costs = layer_costs(NUMEL, MACS, "fast", bn_correction=False, check_share=0.5)
    total = 6400 + 1600 + 10
    assert costs["a"] == (0.5 * (total + total), total)  # no prefix; self-check on half the set
    assert costs["b"] == (6400 + 0.5 * (1610 + total), 1610)
    assert costs["c"] == (8000 + 0.5 * (10 + total), 10)
    bn = layer_costs(NUMEL, MACS, "fast", bn_correction=True, check_share=0.5)
    assert bn["c"] == (2 * 8000 + 0.5 * (10 + total), 10 + 10)  # prefix twice, own per level
    assert layer_costs(NUMEL, MACS, "naive", True, 1.0)["c"] == (0, 2 * total)


def test_split_cuts_only_costly_layers_and_sorts_largest_first():
    costs = layer_costs(NUMEL, MACS, "fast", bn_correction=False, check_share=0.25)
    units = plan_units(costs, levels=41, units=8)
    assert [u.cost for u in units] == sorted((u.cost for u in units), reverse=True)
    by_layer = {name: [u for u in units if u.layer == name] for name in NUMEL}
    assert len(by_layer["a"]) > len(by_layer["b"]) >= 1 and len(by_layer["c"]) == 1
    for parts in by_layer.values():  # contiguous ranges covering 0..40 exactly once
        ranges = sorted((u.start, u.stop) for u in parts)
        assert ranges[0][0] == 0 and ranges[-1][1] == 41
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    cap = sum(f + p * 41 for f, p in costs.values()) / 8
    assert max(u.cost for u in units if u.layer != "c") <= cap * 1.1
    assert plan_units(costs, levels=41, units=8) == units  # deterministic
    assert len(plan_units(costs, levels=3, units=1000)) == 9  # never more than a unit per level


def test_assemble_puts_ranges_back_in_level_order():
    units = [WorkUnit("x", 0, 2, 4, 1.0), WorkUnit("x", 0, 0, 2, 1.0)]
    results = [(np.array([2.0, 3.0]), np.array([20.0, 30.0])), (np.zeros(2), np.ones(2))]
    mean, worst = assemble(units, results, 4)["x"]
    assert mean.tolist() == [0, 0, 2, 3] and worst.tolist() == [1, 1, 20, 30]


def test_table_is_the_same_whatever_the_split(tmp_path):
    torch.manual_seed(0)
    model = randomized(TinyResNet()).eval()
    inputs = torch.randn(24, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    reference = predict_logits(model, inputs, 8)
    written = []
    for units in (1, 7, 1000):
        params = Params(
            profile=dataclasses.replace(
                Params().profile, levels=11, batch_size=8, bn_correction=True
            ),
            ray=RayParams(backend="serial", work_units=units),
        )
        path = tmp_path / f"{units}.parquet"
        tables.write_distortion(path, profile_curves(params, model, inputs, reference), {})
        written.append(path.read_bytes())
    assert written[0] == written[1] == written[2]


def test_a_failing_unit_is_one_error_naming_layer_and_levels():
    shared = tiny_profile_task()
    unit = WorkUnit("no_such_layer", 0, 2, 5, 1.0)
    with pytest.raises(PipelineError, match=r"^profile: layer 'no_such_layer' levels 2-4 failed"):
        run_tasks(
            profile_unit, [unit], shared=shared, params=RayParams(backend="serial"), desc="profile"
        )
