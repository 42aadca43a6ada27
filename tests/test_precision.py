"""profile.precision and the fast engine's optimized execution (folded BatchNorms,
channels-last convolutions): errors on a CPU, bf16's error, and the fallback for model code
the optimized copy cannot run."""

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.config.sections import ProfileParams
from pipeline.errors import PipelineError
from pipeline.nn import device as device_module
from pipeline.nn.evaluation import predict_logits
from pipeline.nn.layers import prunable_numel
from pipeline.profiling.distortion import profile_layer, sparsity_grid
from pipeline.profiling.suffix import SuffixRunner
from pipeline.pruning.batchnorm import BN_TYPES
from tests.models_zoo import TinyResNet, randomized


def curves(model, inputs, engine="fast", **options):
    reference = predict_logits(model, inputs, 8)
    return {
        name: profile_layer(
            name,
            model=model,
            inputs=inputs,
            reference=reference,
            sparsities=sparsity_grid(9),
            batch_size=8,
            threads=1,
            engine=engine,
            bn_correction="relative",
            **options,
        )[0]
        for name in prunable_numel(model)
    }


def inputs_for(shape, n=24):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(3))


def test_precision_is_checked_with_one_clear_line():
    with pytest.raises(PipelineError, match=r"profile\.precision = 'fp16'.*allowed: .*bf16"):
        ProfileParams(precision="fp16").validate()


@pytest.mark.parametrize("engine", ["fast", "naive"])
def test_tf32_on_a_cpu_is_one_clear_error(engine):
    model = randomized(TinyResNet()).eval()
    with pytest.raises(PipelineError, match=r"^profile\.precision = tf32 needs a CUDA GPU"):
        curves(model, inputs_for((3, 8, 8)), engine, precision="tf32", device="cpu")


def test_bf16_without_native_support_on_a_cpu_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(device_module, "cpu_bf16", lambda: False)
    model = randomized(TinyResNet()).eval()
    with pytest.raises(PipelineError, match=r"bf16 on a CPU without native bf16"):
        curves(model, inputs_for((3, 8, 8)), precision="bf16")


@pytest.mark.skipif(not device_module.cpu_bf16(), reason="this CPU has no native bf16")
def test_bf16_on_a_cpu_stays_near_fp32_where_the_curve_matters():
    model = randomized(TinyResNet()).eval()
    x = inputs_for((3, 8, 8))
    exact, low = curves(model, x), curves(model, x, precision="bf16")
    for name in exact:
        a, b = exact[name], low[name]
        assert b[0] == 0  # the dense level is never run
        # bf16 rounding is a floor in absolute terms: small against the curve's scale, and
        # small relative to the entries the allocation turns on
        assert np.max(np.abs(b - a)) < 0.05 * a.max(), name
        big = a > 0.1 * a.max()
        assert np.max(np.abs(b[big] - a[big]) / a[big]) < 0.1, name
        assert not np.array_equal(a, b)  # it did run in bf16


def test_optimized_copy_folds_batchnorms_and_leaves_the_model_alone():
    model = randomized(TinyResNet()).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = inputs_for((3, 8, 8), 4)

    def bn_calls(runner):
        return [
            n.target
            for n in runner.gm.graph.nodes
            if n.op == "call_module" and isinstance(runner.gm.get_submodule(n.target), BN_TYPES)
        ]

    plain, fast = SuffixRunner(model, "stem", optimize=False), SuffixRunner(model, "stem")
    assert len(bn_calls(plain)) == 6
    assert bn_calls(fast) == ["bn"]  # only the profiled layer's own, folded per level in run
    assert fast.fold_consumer and not plain.fold_consumer
    torch.testing.assert_close(fast.gm(x), model(x), rtol=1e-4, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class ViewsAConvOutput(nn.Module):
    """``.view`` of a conv output: fine in the default layout, an error in channels-last."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return self.fc(y.view(y.shape[0], -1))


def test_model_code_the_optimized_copy_breaks_runs_as_written(caplog):
    model = randomized(ViewsAConvOutput()).eval()
    x = inputs_for((3, 6, 6))
    fast, naive = curves(model, x), curves(model, x, "naive")
    assert "optimized execution failed" in caplog.text
    assert "fast engine unavailable" not in caplog.text  # still the suffix passes
    for name in fast:
        np.testing.assert_allclose(
            fast[name], naive[name], rtol=1e-4, atol=1e-6 * naive[name].max()
        )
