"""The ``device`` param, data following the model's device, exact BN moments from the layer's
input, and the fast engine's answer to running out of GPU memory."""

import numpy as np
import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import TensorDataset

from pipeline.config.params import load_params
from pipeline.config.sections import TrainParams
from pipeline.errors import PipelineError
from pipeline.nn import evaluation, layers, training
from pipeline.nn.device import model_device, resolve_device
from pipeline.nn.evaluation import predict_logits
from pipeline.nn.layers import prunable_numel
from pipeline.profiling.distortion import profile_layer, sparsity_grid
from pipeline.profiling.suffix import SuffixRunner
from pipeline.pruning import batchnorm
from pipeline.pruning.batchnorm import ChannelMoments
from pipeline.pruning.patches import PatchMoments
from stages import baseline, profile
from tests.models_zoo import TinyResNet, randomized


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_cpu_and_auto_resolve_to_the_cpu_without_cuda(no_cuda):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_cuda_without_cuda_is_one_clear_error(no_cuda, name):
    with pytest.raises(PipelineError, match=r"^device = .*no CUDA GPU.*allowed here: auto, cpu$"):
        resolve_device(name)


def test_gpu_index_out_of_range(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(PipelineError, match=r"device = 'cuda:2'.*2 CUDA GPU.*cuda:0 \.\.\. cuda:1"):
        resolve_device("cuda:2")


def test_cuda_resolves_to_the_first_gpu_with_tf32_off(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    matmul = torch.backends.cuda.matmul.allow_tf32
    cudnn = {k: getattr(torch.backends.cudnn, k) for k in ("allow_tf32", "deterministic")}
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        assert resolve_device("cuda") == torch.device("cuda:0")
        assert resolve_device("cuda:1") == torch.device("cuda:1")
        assert resolve_device("auto") == torch.device("cuda:0")
        assert not torch.backends.cuda.matmul.allow_tf32
        assert not torch.backends.cudnn.allow_tf32 and torch.backends.cudnn.deterministic
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        for k, v in cudnn.items():
            setattr(torch.backends.cudnn, k, v)


@pytest.mark.parametrize("bad", ["gpu", "CUDA", "cuda:", "cuda:x", "cuda:0 ", "cpu:0"])
def test_bad_device_strings_are_rejected_by_the_params(bad):
    with pytest.raises(PipelineError, match=r"^device = .* allowed: auto, cpu, cuda, cuda:N$"):
        load_params({"device": bad})


@pytest.mark.parametrize("bad", [0, None, ["cpu"]])
def test_a_device_that_is_no_string_is_rejected(bad):
    with pytest.raises(PipelineError, match=r"^device = .* allowed: a value of type str$"):
        load_params({"device": bad})


def test_device_param_default_and_values():
    assert load_params({}).device == "auto"
    assert load_params({"device": "cuda:1"}).device == "cuda:1"  # availability: at run time


@pytest.mark.parametrize("stage", [baseline, profile])
def test_stage_with_cuda_on_a_cpu_machine_exits_2_with_one_line(stage, tmp_path, no_cuda, capsys):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"device": "cuda"}))
    assert stage.main(["--root", str(tmp_path)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: device = 'cuda'")
    assert not list(tmp_path.glob("artifacts/*"))  # nothing written


class _Seen(Exception):
    pass


def _probe(model: nn.Module) -> list[torch.device]:
    """Record the device of what the first prunable layer receives, and stop the pass."""
    seen: list[torch.device] = []

    def hook(module, args):
        seen.append(args[0].device)
        raise _Seen

    layers.prunable_layers(model)[0][1].register_forward_pre_hook(hook)
    return seen


CALLS = {
    "predict_logits": lambda m, x: predict_logits(m, x, 4),
    "accuracy": lambda m, x: evaluation.accuracy(m, TensorDataset(x, torch.zeros(len(x)))),
    "input_moments": lambda m, x: batchnorm.input_moments(m, batchnorm.batchnorms(m), x, 4),
    "macs_per_weight": lambda m, x: layers.macs_per_weight(m, x),
    "train": lambda m, x: training.train(
        m, TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), TrainParams(epochs=1), 0
    ),
}


@pytest.mark.parametrize("call", sorted(CALLS))
def test_data_follows_the_models_device(call):
    """A model on the meta device gets its batches moved there from the CPU."""
    model = TinyResNet().to("meta")
    seen = _probe(model)
    with pytest.raises(_Seen):
        CALLS[call](model, torch.randn(8, 3, 8, 8))
    assert seen == [torch.device("meta")]
    assert model_device(model) == torch.device("meta")


def _output_moments(module: nn.Module, x: torch.Tensor, weight: torch.Tensor):
    m = ChannelMoments()
    with torch.no_grad():
        m.add(torch.func.functional_call(module, {"weight": weight}, (x,)))
    return m.stats()


MODULES = {
    "conv": (lambda: nn.Conv2d(4, 6, 3, padding=1), (3, 4, 7, 7)),
    "conv strided, dilated, grouped, biased": (
        lambda: nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2, bias=True),
        (3, 4, 9, 8),
    ),
    "depthwise": (lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), (2, 4, 5, 5)),
    "linear": (lambda: nn.Linear(7, 5), (11, 7)),
    "conv1d, same padding, even kernel": (lambda: nn.Conv1d(3, 4, 4, padding="same"), (3, 3, 11)),
    "conv2d, reflect padding": (
        lambda: nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect"),
        (3, 3, 6, 6),
    ),
    "conv3d, circular padding, grouped, dilated": (
        lambda: nn.Conv3d(
            4, 6, 3, padding=(1, 2, 1), groups=2, padding_mode="circular", dilation=(1, 2, 1)
        ),
        (2, 4, 5, 6, 5),
    ),
}


@pytest.mark.parametrize("case", sorted(MODULES))
def test_patch_moments_equal_the_moments_of_the_outputs(case):
    build, shape = MODULES[case]
    torch.manual_seed(0)
    module = build()
    batches = [torch.randn(*shape) + 0.5 for _ in range(3)]
    patches = PatchMoments.of(module, batches[0], budget=1 << 12)  # small: chunked unfolds
    assert patches is not None
    for x in batches:
        patches.add(x)
    pruned = module.weight.detach() * (torch.rand_like(module.weight) > 0.6)
    weights = [module.weight.detach(), pruned]
    for weight, (mean, var) in zip(weights, patches.stats(weights), strict=True):
        expected = _output_moments(module, torch.cat(batches), weight)
        torch.testing.assert_close(mean, expected[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(var, expected[1], rtol=1e-5, atol=1e-6)


def test_patch_moments_decline_what_is_not_a_batchnorm_channel():
    # a Linear on (N, T, F): a BatchNorm over dim 1 normalises T, not the Linear's features
    assert PatchMoments.of(nn.Linear(3, 2), torch.zeros(1, 4, 3), 1 << 20) is None
    assert PatchMoments.of(nn.Linear(3, 2), torch.zeros(1, 4, 3), 1 << 20, for_bn=False)
    assert PatchMoments.of(nn.ConvTranspose2d(2, 2, 3), torch.zeros(1, 2, 5, 5), 1) is None


def _fast_table(model, inputs, reference):
    return [
        profile_layer(
            name, model=model, inputs=inputs, reference=reference, sparsities=sparsity_grid(9),
            batch_size=20, threads=1, engine="fast", memory_mb=1024, bn_correction="relative",
        )
        for name in prunable_numel(model)
    ]  # fmt: skip


def test_out_of_memory_halves_the_levels_per_pass_and_gives_the_same_table(monkeypatch, caplog):
    model = randomized(TinyResNet())
    inputs = torch.randn(40, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    reference = predict_logits(model, inputs, 20)
    expected = _fast_table(model, inputs, reference)
    run, sizes = SuffixRunner.run, []

    def run_small_only(self, frontier, weights, bn_stats=None):
        sizes.append(len(weights))
        if len(weights) > 3:  # a pass of more than 3 levels does not fit
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return run(self, frontier, weights, bn_stats)

    monkeypatch.setattr(SuffixRunner, "run", run_small_only)
    caplog.set_level("INFO", logger="pipeline.profiling.fast")
    got = _fast_table(model, inputs, reference)
    assert "fast engine unavailable" not in caplog.text  # never the naive engine
    assert "out of GPU memory with 8 levels per pass; now 4" in caplog.text
    assert max(sizes) > 3 and sizes[-1] <= 3
    for (mean_e, max_e), (mean_g, max_g) in zip(expected, got, strict=True):
        np.testing.assert_array_equal(mean_g, mean_e)
        np.testing.assert_array_equal(max_g, max_e)


def test_out_of_memory_with_one_level_per_pass_is_one_clear_error(monkeypatch):
    def never_fits(self, frontier, weights, bn_stats=None):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(SuffixRunner, "run", never_fits)
    model = randomized(TinyResNet())
    inputs = torch.randn(8, 3, 8, 8)
    with pytest.raises(
        PipelineError, match=r"^profile layer stem: out of GPU memory .*profile\.memory_mb$"
    ):
        profile_layer(
            "stem", model=model, inputs=inputs, reference=predict_logits(model, inputs, 8),
            sparsities=sparsity_grid(5), batch_size=8, threads=1, engine="fast",
        )  # fmt: skip
