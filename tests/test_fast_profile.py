"""The fast engine (suffix-only recomputation) equals the naive full-forward table."""

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.nn.evaluation import predict_logits
from pipeline.nn.layers import prunable_numel
from pipeline.nn.models import build_model
from pipeline.profiling.distortion import profile_layer, sparsity_grid
from pipeline.profiling.suffix import SuffixRunner
from tests.models_zoo import TinyDenseNet, TinyMLP, TinyResNet, randomized

CASES = {
    "resnet": (lambda: randomized(TinyResNet()), (3, 8, 8)),
    "densenet": (lambda: randomized(TinyDenseNet()), (3, 6, 6)),
    "mlp": (lambda: randomized(TinyMLP()), (12,)),
    "digits_cnn": (lambda: randomized(build_model("digits_cnn", 1, 10)), (1, 8, 8)),
}


def assert_curves_close(actual, desired):
    """Equal up to float32 rounding (the fast engine folds BatchNorms, batches levels and
    changes the memory layout): within 1e-4 relative, or 1e-6 of the curve's largest entry."""
    np.testing.assert_allclose(actual, desired, rtol=1e-4, atol=1e-6 * float(np.max(desired)))


def tables(model, shape, memory_mb, batch_size=16, bn_correction=None, repair=None):
    inputs = torch.randn(40, *shape, generator=torch.Generator().manual_seed(1))
    reference = predict_logits(model, inputs, batch_size)
    grid = sparsity_grid(11)
    out = {}
    for engine in ("naive", "fast"):
        out[engine] = [
            profile_layer(
                name,
                model=model,
                inputs=inputs,
                reference=reference,
                sparsities=grid,
                batch_size=batch_size,
                threads=1,
                engine=engine,
                memory_mb=memory_mb,
                bn_correction=bn_correction,
                repair=repair,
            )
            for name in prunable_numel(model)
        ]
    return out


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("memory_mb", [1, 1024])  # one level per pass / all levels in one pass
def test_fast_equals_naive(case, memory_mb, caplog):
    build, shape = CASES[case]
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = tables(model, shape, memory_mb)
    assert "fast engine unavailable" not in caplog.text
    assert "optimized execution failed" not in caplog.text  # folding and fusion held
    for (mean_n, max_n), (mean_f, max_f) in zip(out["naive"], out["fast"], strict=True):
        assert_curves_close(mean_f, mean_n)
        assert_curves_close(max_f, max_n)
        assert mean_f[0] == 0 and (mean_f[1:] > 0).all()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("rule", ["relative", "absolute"])
@pytest.mark.parametrize("case", ["resnet", "digits_cnn"])
def test_bn_correction_fast_equals_naive_and_changes_the_curves(case, rule):
    build, shape = CASES[case]
    model = build()
    corrected = tables(model, shape, memory_mb=1, bn_correction=rule)
    plain = tables(model, shape, memory_mb=1)
    for (mean_n, _), (mean_f, _) in zip(corrected["naive"], corrected["fast"], strict=True):
        assert_curves_close(mean_f, mean_n)
    changed = [
        not np.allclose(a[0], b[0]) for a, b in zip(corrected["fast"], plain["fast"], strict=True)
    ]
    assert any(changed)  # layers feeding a BatchNorm get corrected curves
    assert not changed[-1]  # the head feeds no BatchNorm


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("memory_mb", [1, 1024])  # one level per block / all levels at once
@pytest.mark.parametrize("bn_correction", [None, "relative"])
def test_repaired_curves_fast_equals_naive_and_lie_below_the_plain_ones(
    case, memory_mb, bn_correction, caplog
):
    build, shape = CASES[case]
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    repaired = tables(model, shape, memory_mb, bn_correction=bn_correction, repair=0.01)
    plain = tables(model, shape, memory_mb, bn_correction=bn_correction)
    assert "fast engine unavailable" not in caplog.text
    for (mean_n, max_n), (mean_f, max_f) in zip(repaired["naive"], repaired["fast"], strict=True):
        assert_curves_close(mean_f, mean_n)
        assert_curves_close(max_f, max_n)
        assert mean_f[0] == 0
    # alone in the network, a repaired layer reproduces its own output better; the network's
    # output follows on the whole (not for every layer: a BatchNorm correction already fixes
    # each channel's mean and variance)
    total = {
        k: sum(m[1:-1].sum() for m, _ in t["fast"]) for k, t in (("rep", repaired), ("raw", plain))
    }
    assert total["rep"] < total["raw"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fast_on_a_partially_pruned_model(caplog):
    """Progressive rounds re-profile a pruned model against the dense reference."""
    from pipeline.pruning.masking import apply_masks, magnitude_masks

    model = randomized(TinyResNet())
    inputs = torch.randn(24, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    reference = predict_logits(model, inputs, 8)
    apply_masks(
        model, magnitude_masks(model, {n: k // 2 for n, k in prunable_numel(model).items()})
    )
    kwargs = dict(
        model=model,
        inputs=inputs,
        reference=reference,
        sparsities=sparsity_grid(6),
        batch_size=8,
        threads=1,
        bn_correction="relative",
    )
    for name in prunable_numel(model):
        for repair in (None, 0.01):
            fast = profile_layer(name, engine="fast", repair=repair, of_remaining=True, **kwargs)
            naive = profile_layer(name, engine="naive", repair=repair, of_remaining=True, **kwargs)
            assert_curves_close(fast[0], naive[0])
        fast = profile_layer(name, engine="fast", **kwargs)
        naive = profile_layer(name, engine="naive", **kwargs)
        assert_curves_close(fast[0], naive[0])
    assert "fast engine unavailable" not in caplog.text


def test_suffix_skips_upstream_work():
    model = randomized(TinyResNet())
    runner = SuffixRunner(model, "linear")
    assert [n.op for n in runner.order] == ["call_module", "output"]
    first = SuffixRunner(model, "stem")
    nodes = list(first.gm.graph.nodes)
    stem = next(i for i, n in enumerate(nodes) if n.op == "call_module" and n.target == "stem")
    assert first.order == nodes[stem:]  # everything from the stem on, nothing before it


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            return self.fc(x)
        return self.fc(-x)


def test_untraceable_model_falls_back_with_a_warning(caplog):
    model = Untraceable().eval()
    inputs = torch.randn(8, 4)
    reference = predict_logits(model, inputs, 8)
    grid = sparsity_grid(5)
    kwargs = dict(
        model=model, inputs=inputs, reference=reference, sparsities=grid, batch_size=8, threads=1
    )
    fast = profile_layer("fc", engine="fast", **kwargs)
    naive = profile_layer("fc", engine="naive", **kwargs)
    assert "fast engine unavailable" in caplog.text
    assert np.array_equal(fast[0], naive[0])
