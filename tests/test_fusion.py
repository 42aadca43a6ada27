"""Convolution + ReLU / + residual add fused into one oneDNN call: same values as the separate
ops, only where the pattern is exactly that, and the separate ops wherever oneDNN cannot."""

import operator

import numpy as np
import pytest
import torch
from torch import fx, nn

from pipeline.profiling.fusion import FusedConv, fuse_pointwise
from pipeline.profiling.suffix import SuffixRunner, optimized
from tests.models_zoo import TinyResNet, randomized

needs_onednn = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN"
)


class Patterns(nn.Module):
    """One of each chain the rewrite must fuse, and chains it must leave alone."""

    def __init__(self) -> None:
        super().__init__()
        conv = lambda cin, cout, s=1: nn.Conv2d(cin, cout, 3, s, 1)  # noqa: E731
        self.a, self.b, self.c, self.d = conv(3, 8), conv(8, 8), conv(8, 8), conv(8, 8)
        self.e, self.f, self.g = conv(8, 8), conv(8, 8), conv(8, 16, 2)
        self.act = nn.ReLU()
        self.scale = nn.Parameter(torch.randn(1, 8, 1, 1))

    def forward(self, x):
        x = torch.relu(self.a(x))  # conv -> relu: fused
        y = self.act(self.b(x))  # conv -> ReLU module: fused
        y = nn.functional.relu(x + self.c(y))  # other + conv -> relu: fused
        z = self.d(y) + y  # conv -> add, no relu: fused (add only)
        two = self.e(z)  # two users: left alone
        w = torch.relu(two) + two
        w = (self.f(w) + self.scale).relu()  # broadcast add: fused, runs the separate ops
        return self.g(w).sigmoid()  # conv -> sigmoid: left alone


def fused_module(model: nn.Module) -> tuple[fx.GraphModule, int]:
    gm = fx.symbolic_trace(model)
    calls = {n.target: 1 for n in gm.graph.nodes if n.op == "call_module"}
    count = fuse_pointwise(gm, skip="", calls=calls)
    gm.recompile()
    return gm, count


@needs_onednn
def test_fused_chains_give_the_separate_ops_values_exactly():
    torch.manual_seed(0)
    model = Patterns().eval()
    gm, count = fused_module(model)
    assert count == 5
    kinds = sorted((m.add, m.relu) for m in gm.modules() if isinstance(m, FusedConv))
    assert kinds == [(False, True), (False, True), (True, False), (True, True), (True, True)]
    users = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert {"e", "g"} <= users  # the convolutions left alone are still called as they were
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
        cl = x.contiguous(memory_format=torch.channels_last)
        assert torch.equal(gm(cl), model(cl))


@needs_onednn
def test_fused_conv_falls_back_where_onednn_cannot_run_it():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, 2, 1).double()
    fused = FusedConv(conv, add=True, relu=True)
    x, other = torch.randn(2, 4, 9, 9).double(), torch.randn(2, 6, 5, 5).double()
    with torch.no_grad():
        assert torch.equal(fused(x, other), torch.relu(conv(x) + other))  # float64
        conv.float()
        x, other = x.float(), other.float()
        assert torch.equal(fused(x, other), torch.relu(conv(x) + other))  # oneDNN
        wide = other[:1]  # broadcast over the batch: oneDNN's post-op adds same-shape only
        assert torch.equal(fused(x, wide), torch.relu(conv(x) + wide))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = torch.relu(conv(x) + other)
            assert torch.equal(fused(x, other), expected)


def test_the_profiled_layer_and_shared_convolutions_are_never_fused():
    model = randomized(TinyResNet())
    gm = optimized(fx.symbolic_trace(model), "layer1.0.conv1")
    fused = {m.conv for m in gm.modules() if isinstance(m, FusedConv)}
    assert model.get_submodule("layer1.0.conv1") not in fused
    assert gm.get_submodule("layer1.0.conv1") not in fused
    assert fused  # the stem and the other blocks' convolutions are
    runner = SuffixRunner(model, "layer1.0.conv1")
    assert runner.bn_node is not None and runner.fold_consumer  # its BatchNorm still folds


@needs_onednn
def test_the_optimized_suffix_reproduces_the_model_with_fusion():
    model = randomized(TinyResNet())
    x = torch.randn(8, 3, 8, 8)
    for layer in ["stem", "layer1.0.conv1", "layer1.1.conv2", "linear"]:
        runner = SuffixRunner(model, layer)
        assert any(isinstance(m, FusedConv) for m in runner.gm.modules())
        weight = runner.module.weight.detach()
        with torch.no_grad():
            out = runner.run(runner.upstream(x), [weight, weight * 0.5])
            half = model.get_submodule(layer).weight.data.mul_(0.5)
            try:
                halved = model(x)
            finally:
                half.mul_(2)
            # folding BatchNorms into the weights rounds differently: equal up to float32
            torch.testing.assert_close(out[:8], model(x), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out[8:], halved, rtol=1e-5, atol=1e-5)


def test_add_matching_is_exact_about_operands():
    gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(2, 2, 1)))
    (conv,) = [n for n in gm.graph.nodes if n.op == "call_module"]
    with gm.graph.inserting_after(conv):
        twice = gm.graph.call_function(operator.add, (conv, conv))
    from pipeline.profiling.fusion import _residual

    assert _residual(twice, conv) is None  # conv + conv: no other operand to add


class InPlace(nn.Module):
    """A downstream op writes into a value upstream of ``b``: the kept frontier."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, 1, 1), nn.Conv2d(8, 8, 3, 1, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.a(x))
        y = y.add_(self.b(y))
        return self.fc(y.mean((2, 3)))


class Collide(nn.Module):
    """Module names the fused modules' names would take (``conv`` -> ``conv_fused``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, 1, 1)
        self.conv_fused = nn.Conv2d(8, 8, 3, 1, 1)
        self.blk = nn.Module()
        self.blk.conv = nn.Conv2d(8, 8, 3, 1, 1)
        self.blk_conv = nn.Conv2d(8, 8, 3, 1, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        x = torch.relu(self.conv_fused(x))
        x = torch.relu(self.blk.conv(x))
        x = torch.relu(self.blk_conv(x) + x.shape[1])  # a number, not a tensor, is added
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize(
    ("model", "layers"),
    [(InPlace, ["a", "b", "fc"]), (Collide, ["conv", "conv_fused", "blk.conv", "blk_conv", "fc"])],
)
def test_fast_equals_naive_with_in_place_ops_and_colliding_names(model, layers, caplog):
    from tests.test_fast_profile import tables

    torch.manual_seed(0)
    net = model().eval()
    # 48x48: a level's pass outgrows memory_mb 1, so each pass holds one level
    out = tables(net, (3, 48, 48), memory_mb=1, batch_size=8)
    assert len(out["fast"]) == len(layers)  # every layer, as the model lists them
    for (naive, _), (fast, _) in zip(out["naive"], out["fast"], strict=True):
        np.testing.assert_allclose(fast, naive, rtol=1e-4, atol=1e-9)
    assert "optimized execution failed" not in caplog.text
    assert "fast engine unavailable" not in caplog.text
    gm = optimized(fx.symbolic_trace(Collide()), "fc")
    names = [n for n, m in gm.named_modules() if isinstance(m, FusedConv)]
    assert len(names) == len(set(names)) == 4
    assert isinstance(gm.get_submodule("conv_fused"), nn.Conv2d)  # the model's own, kept


class Residuals(nn.Module):
    """Residuals a fused conv + add may write into (a conv output read nowhere else) and ones
    it must copy: read again after the add, a view, the kept upstream value."""

    def __init__(self) -> None:
        super().__init__()
        conv = lambda: nn.Conv2d(8, 8, 3, 1, 1)  # noqa: E731
        self.stem, self.short, self.a, self.b, self.c, self.d = (conv() for _ in range(6))
        self.stem = nn.Conv2d(3, 8, 3, 1, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)  # the profiled layer
        s = self.short(x)  # fused with the add (the first conv feeding it); a(x) is written into
        y = torch.relu(s + self.a(x))
        z = torch.relu(self.b(y) + y)  # y is read again below: copied
        w = torch.relu(self.c(z) + z[:, :])  # a view: copied
        v = torch.relu(self.d(w) + x)  # the layer's own output: copied
        return self.fc((v + y).mean((2, 3)))


class Aliased(nn.Module):
    """Residuals that are a conv output read by nothing after the add, yet visible: the fused
    conv's own input, or read later through an alias made before the add."""

    def __init__(self, alias: str) -> None:
        super().__init__()
        self.alias = alias
        self.stem, self.a, self.b = (nn.Conv2d(c, 8, 3, 1, 1) for c in (3, 8, 8))
        self.drop, self.ident = nn.Dropout(0.1), nn.Identity()
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        h = self.stem(x)
        y = self.a(h)
        if self.alias == "input":
            return self.fc(torch.relu(self.b(y) + y).mean((2, 3)).repeat(1, 2))
        skip = {"dropout": self.drop, "identity": self.ident}.get(self.alias, lambda t: t[:, :])(y)
        z = torch.relu(self.b(h) + y)
        return self.fc(torch.cat([z, skip], 1).mean((2, 3)))


@needs_onednn
@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (Residuals(), {"short_fused": True, "b_fused": False, "c_fused": False, "d_fused": False}),
        (Aliased("input"), {"b_fused": False}),
        (Aliased("dropout"), {"b_fused": False}),
        (Aliased("identity"), {"b_fused": False}),
        (Aliased("view"), {"b_fused": False}),
    ],
)
def test_a_fused_add_writes_into_its_residual_only_where_nothing_else_can_see_it(model, expected):
    torch.manual_seed(0)
    model = randomized(model).eval()
    runner = SuffixRunner(model, "stem")
    consume = {n: m.consume for n, m in runner.gm.named_modules() if isinstance(m, FusedConv)}
    assert consume == expected
    x = torch.randn(4, 3, 10, 10)
    frontier = runner.upstream(x)
    kept = {k: v.clone() for k, v in frontier.items()}
    weight = runner.module.weight.detach()
    with torch.no_grad():
        first = runner.run(frontier, [weight])
        for module in runner.gm.modules():  # the same runner copying every residual
            if isinstance(module, FusedConv):
                module.consume = False
        copied = runner.run(frontier, [weight])
    assert torch.equal(first, copied)
    assert all(torch.equal(frontier[k], kept[k]) for k in kept)  # upstream values untouched
    torch.testing.assert_close(first, model(x), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_grouped_conv_plus_residual_equals_the_separate_ops():
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 24, 3, 1, 1, groups=4)  # the sum post-op would add the bias last
    x = torch.randn(2, 12, 7, 7).contiguous(memory_format=torch.channels_last)
    other = torch.randn(2, 24, 7, 7).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        fused = FusedConv(conv, add=True, relu=True)(x, other)
        assert torch.equal(fused, torch.relu(conv(x) + other))
