"""One training loop for the dense baseline and for masked fine-tuning."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline.config.sections import TrainParams
from pipeline.nn.device import model_device


@dataclass(frozen=True)
class EpochStats:
    epoch: int  # 1-based
    loss: float  # mean training cross-entropy over the epoch
    accuracy: float | None  # from the ``evaluate`` callback, fraction in [0, 1]


def _masked_params(
    model: nn.Module, masks: dict[str, torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    modules = dict(model.named_modules())
    return [
        (modules[name].weight, mask.to(modules[name].weight))  # the weight's dtype and device
        for name, mask in masks.items()
    ]


def train(
    model: nn.Module,
    dataset: Dataset,
    params: TrainParams,
    seed: int,
    masks: dict[str, torch.Tensor] | None = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
    desc: str = "train",
) -> list[EpochStats]:
    """SGD with momentum, weight decay and cosine learning-rate decay; returns per-epoch stats.

    With ``masks`` (layer name -> bool mask, True = keep) the pruned weights stay exactly zero:
    their gradients are zeroed before each step, so momentum buffers and weight decay never
    move them, and the weights are re-masked after each step. Runs on the model's device;
    batches are moved there (shuffling stays on the CPU generator, so the order is the same
    on every device). Progress shows live: a bar over each epoch's batches (``desc``), and
    ``on_epoch`` receives each epoch's stats as it ends.
    """
    torch.manual_seed(seed)
    loader = DataLoader(
        dataset,
        batch_size=params.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    optimizer = torch.optim.SGD(
        model.parameters(), lr=params.lr, momentum=params.momentum, weight_decay=params.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, params.epochs))
    masked = _masked_params(model, masks or {})
    device = model_device(model)
    loss_fn = nn.CrossEntropyLoss()
    history = []
    for epoch in range(1, params.epochs + 1):
        model.train()
        total, count = 0.0, 0
        for x, y in tqdm(
            loader, desc=f"{desc} epoch {epoch}/{params.epochs}", leave=False, mininterval=1.0
        ):
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad(set_to_none=False)
            loss = loss_fn(model(x), y)
            loss.backward()
            with torch.no_grad():
                for weight, mask in masked:
                    weight.grad.mul_(mask)
            optimizer.step()
            with torch.no_grad():
                for weight, mask in masked:
                    weight.masked_fill_(~mask.bool(), 0.0)  # +0.0, not a product's -0.0
            total += float(loss.detach()) * len(y)
            count += len(y)
        scheduler.step()
        model.eval()
        history.append(EpochStats(epoch, total / count, evaluate(model) if evaluate else None))
        if on_epoch is not None:
            on_epoch(history[-1])
    model.eval()
    return history
