"""Which modules are prunable, named by their ``named_modules()`` path."""

from __future__ import annotations

from torch import nn

# Every Conv1d/2d/3d and Linear weight is prunable, first and last layer included.
PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``[(name, module), ...]`` in ``named_modules()`` order for every prunable weight."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)]


def prunable_numel(model: nn.Module) -> dict[str, int]:
    """``{layer name: number of weights}`` in ``named_modules()`` order."""
    return {name: m.weight.numel() for name, m in prunable_layers(model)}
