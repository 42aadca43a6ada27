"""Model registry: name -> factory(in_channels, num_classes) -> nn.Module."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from pipeline.errors import PipelineError

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


def build_model(arch: str, in_channels: int, num_classes: int) -> nn.Module:
    """Instantiate a registered model in eval mode."""
    if arch not in MODELS:
        raise PipelineError(
            f"model.arch = {arch!r} is unknown; allowed: {', '.join(sorted(MODELS))}"
        )
    return MODELS[arch](in_channels, num_classes).eval()


def normalize_state_dict(obj: object) -> dict[str, torch.Tensor]:
    """Accept a plain state_dict or ``{"state_dict": ...}``; strip DataParallel's ``module.``."""
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PipelineError("checkpoint does not hold a state_dict (a mapping of name -> tensor)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_weights(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str, arch: str
) -> None:
    """Strict ``load_state_dict`` whose failure names the checkpoint, the arch and the keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{label}: {', '.join(keys[:3])}{' …' if len(keys) > 3 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", wrong))
            if keys
        )
        raise PipelineError(f"checkpoint {source} does not match model.arch = {arch!r} ({detail})")
    model.load_state_dict(state_dict)
