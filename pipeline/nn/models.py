"""Model registry: name -> factory(in_channels, num_classes) -> nn.Module."""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Callable, Mapping

import torch
from torch import nn

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

ModelFactory = Callable[[int, int], nn.Module]
MODELS: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    def add(factory: ModelFactory) -> ModelFactory:
        MODELS[name] = factory
        return factory

    return add


class DigitsCNN(nn.Module):
    """Four 3x3 convs with batch norm and a linear head, for 8x8 single-channel digits.

    Input (N, in_channels, H, W) -> logits (N, num_classes); global average pooling makes
    the head independent of H and W.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        widths = (16, 32, 64, 64)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.conv2 = nn.Conv2d(widths[0], widths[1], 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(widths[1])
        self.conv3 = nn.Conv2d(widths[1], widths[2], 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(widths[2])
        self.conv4 = nn.Conv2d(widths[2], widths[3], 3, padding=1, bias=False)
        self.bn4 = nn.BatchNorm2d(widths[3])
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(widths[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        x = torch.relu(self.bn3(self.conv3(x)))
        x = self.pool(torch.relu(self.bn4(self.conv4(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


@register_model("digits_cnn")
def digits_cnn(in_channels: int, num_classes: int) -> nn.Module:
    return DigitsCNN(in_channels, num_classes)


class _Lambda(nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class CifarBasicBlock(nn.Module):
    """He et al.'s CIFAR block with the parameter-free "option A" shortcut: stride-2
    subsampling plus zero-padded channels."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or in_planes != planes:
            pad = planes // 4
            self.shortcut = _Lambda(
                lambda x: nn.functional.pad(
                    x[:, :, ::2, ::2], (0, 0, 0, 0, pad, pad), "constant", 0
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)) + self.shortcut(x)
        return torch.relu(out)


class CifarResNet(nn.Module):
    """CIFAR ResNet-(6n+2): 16/32/64 channels, head named ``linear``. Parameter names match
    the widely used public CIFAR checkpoints (after stripping DataParallel's ``module.``)."""

    def __init__(self, n: int, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        planes = [16, 32, 64]
        self.layer1 = self._stage(16, planes[0], n, 1)
        self.layer2 = self._stage(planes[0], planes[1], n, 2)
        self.layer3 = self._stage(planes[1], planes[2], n, 2)
        self.linear = nn.Linear(planes[2], num_classes)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        strides = [stride] + [1] * (blocks - 1)
        layers = []
        for s in strides:
            layers.append(CifarBasicBlock(in_planes, planes, s))
            in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = nn.functional.adaptive_avg_pool2d(out, 1)
        return self.linear(torch.flatten(out, 1))


for _depth in (20, 32, 44, 56, 110):
    register_model(f"cifar_resnet{_depth}")(
        lambda in_channels, num_classes, n=(_depth - 2) // 6: CifarResNet(
            n, in_channels, num_classes
        )
    )


def _torchvision(name: str) -> ModelFactory:
    """``torchvision:NAME``: any torchvision classification model, random weights (load a
    local file with ``model.checkpoint``; nothing is downloaded)."""
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if name not in names:
        raise PipelineError(
            f"model.arch = 'torchvision:{name}' is unknown; allowed: torchvision:NAME with NAME "
            f"one of {', '.join(names[:8])}, … ({len(names)} classification models)"
        )
    return lambda in_channels, num_classes: torchvision.models.get_model(
        name, weights=None, num_classes=num_classes
    )


def _user_factory(spec: str) -> ModelFactory:
    """``package.module:factory``: a callable returning an nn.Module. It receives
    ``in_channels`` and/or ``num_classes`` as keywords when its signature names them
    (``num_classes`` also when it takes ``**kwargs``)."""
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (Exception, SystemExit) as exc:  # whatever the user's module raises on import
        first = (str(exc).strip().splitlines() or [""])[0]
        raise PipelineError(
            f"model.arch = {spec!r} cannot be imported ({type(exc).__name__}: {first}); "
            "allowed: package.module:factory, importable from the project root"
        ) from None
    if not callable(factory):
        raise PipelineError(
            f"model.arch = {spec!r} names a {type(factory).__name__}, not a callable; allowed: "
            "package.module:factory returning an nn.Module"
        )
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # builtins without one: pass nothing by keyword
        signature = inspect.Signature()
    accepted = set(signature.parameters)
    if any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        accepted.add("num_classes")  # the convention of torchvision-style factories

    def build(in_channels: int, num_classes: int) -> nn.Module:
        given = {"in_channels": in_channels, "num_classes": num_classes}
        model = factory(**{k: v for k, v in given.items() if k in accepted})
        if not isinstance(model, nn.Module):
            raise PipelineError(
                f"model.arch = {spec!r} returned {type(model).__name__}, not an nn.Module"
            )
        return model

    return build


# `prefix:rest` arch names resolved by source; any other `a.b:c` is a user's import path.
MODEL_SOURCES: dict[str, Callable[[str], ModelFactory]] = {"torchvision": _torchvision}


def resolve_model(arch: str) -> ModelFactory:
    """The factory behind ``model.arch``: a registry name, ``torchvision:NAME`` or
    ``package.module:factory``."""
    if arch in MODELS:
        return MODELS[arch]
    prefix, sep, rest = arch.partition(":")
    if sep and prefix in MODEL_SOURCES:
        return MODEL_SOURCES[prefix](rest)
    if sep and prefix and rest:
        return _user_factory(arch)
    raise PipelineError(
        f"model.arch = {arch!r} is unknown; allowed: {', '.join(sorted(MODELS))}, "
        "torchvision:NAME, package.module:factory"
    )


def build_model(arch: str, in_channels: int, num_classes: int) -> nn.Module:
    """Instantiate ``model.arch`` in eval mode."""
    return resolve_model(arch)(in_channels, num_classes).eval()


def normalize_state_dict(obj: object, source: str) -> dict[str, torch.Tensor]:
    """Accept a plain state_dict or ``{"state_dict": ...}``; strip DataParallel's ``module.``.

    source: the file the object came from, named in the error."""
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PipelineError(
            f"checkpoint {source} does not hold a state_dict (a mapping of name -> tensor)"
        )
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_weights(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str, arch: str
) -> None:
    """Strict ``load_state_dict`` whose failure names the checkpoint, the arch and the keys."""
    own = model.state_dict()
    # Checkpoints from before PyTorch 0.4.1 lack BatchNorm's step counter, unused in eval.
    state_dict = {
        **{k: v for k, v in own.items() if k.endswith("num_batches_tracked")},
        **state_dict,
    }
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{label}: {', '.join(keys[:3])}{' …' if len(keys) > 3 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", wrong))
            if keys
        )
        raise PipelineError(
            f"checkpoint {source} does not match model.arch = {arch!r} ({detail}); allowed: "
            "the state_dict of that architecture (or the model.arch it was saved from)"
        )
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not v.isfinite().all()]
    if bad:
        raise PipelineError(
            f"checkpoint {source} holds NaN or inf in {', '.join(bad[:3])}"
            f"{' …' if len(bad) > 3 else ''}; allowed: finite weights"
        )
    converted = sorted(
        {
            f"{v.dtype} -> {own[k].dtype}".replace("torch.", "")
            for k, v in state_dict.items()
            if v.is_floating_point() and v.dtype != own[k].dtype
        }
    )
    if converted:  # load_state_dict converts silently; a half-precision source loses nothing
        log.warning("checkpoint %s: its weights are converted (%s)", source, ", ".join(converted))
    model.load_state_dict(state_dict)
