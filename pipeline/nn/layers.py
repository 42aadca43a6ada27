"""Which modules are prunable, named by their ``named_modules()`` path, and what they cost."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from pipeline.nn.device import model_device

# Every Conv1d/2d/3d and Linear weight is prunable, first and last layer included.
PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``[(name, module), ...]`` in ``named_modules()`` order for every prunable weight."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)]


def prunable_numel(model: nn.Module) -> dict[str, int]:
    """``{layer name: number of weights}`` in ``named_modules()`` order."""
    return {name: m.weight.numel() for name, m in prunable_layers(model)}


@torch.no_grad()
def macs_per_weight(model: nn.Module, sample: torch.Tensor) -> dict[str, int]:
    """Multiply-accumulates per kept weight and input sample, measured by forward hooks.

    sample: one input batch (N, ...) of the real shape. A conv weight is used once per output
    position (the product of the output's spatial dims); a linear weight once per output
    row (1 for (N, features) inputs, the sequence length for (N, T, features)). The output
    projection of an ``nn.MultiheadAttention``, which it applies without calling the module,
    once per query token.
    """
    found: dict[str, int] = {}

    def hook(name: str):
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            found[name] = math.prod(
                output.shape[2:] if not isinstance(module, nn.Linear) else output.shape[1:-1]
            )

        return record

    def attention(name: str):
        def record(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            query = args[0] if args else kwargs["query"]
            tokens = query.shape[1 if module.batch_first else 0] if query.dim() == 3 else 1
            found.setdefault(f"{name}.out_proj" if name else "out_proj", tokens)

        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in prunable_layers(model)]
    handles += [
        m.register_forward_hook(attention(name), with_kwargs=True)
        for name, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention)
    ]
    try:
        model.eval()
        model(sample[:1].to(model_device(model)))
    finally:
        for h in handles:
            h.remove()
    return {name: found.get(name, 0) for name, _ in prunable_layers(model)}


def weight_matrices(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter with two or more dimensions (the weight matrices and kernels), by
    ``named_parameters()`` name."""
    return {name: p for name, p in model.named_parameters() if p.dim() >= 2}


def unpruned_matrices(model: nn.Module) -> list[str]:
    """Weight matrices no prunable layer owns (e.g. ``nn.MultiheadAttention.in_proj_weight``,
    embeddings): the pipeline leaves them dense."""
    owned = {f"{name}.weight" if name else "weight" for name, _ in prunable_layers(model)}
    return [name for name in weight_matrices(model) if name not in owned]
