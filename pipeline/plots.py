"""Figures for the tracking store. Pure: builds matplotlib figures, writes nothing."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: no display on workers, CI or servers

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from pipeline.allocation import Allocation  # noqa: E402


def allocation_figure(allocation: Allocation, ratio: float) -> Figure:
    """Bar chart of each layer's sparsity with the network-level ratio as a line."""
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(allocation.layers)), 4.0))
    x = np.arange(len(allocation.layers))
    ax.bar(x, allocation.sparsity, color="tab:blue")
    ax.axhline(ratio, color="tab:red", linestyle="--", label=f"prune.ratio = {ratio:g}")
    ax.set_xticks(x, allocation.layers, rotation=60, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("sparsity")
    ax.set_title("Per-layer sparsity")
    ax.legend()
    fig.tight_layout()
    return fig


def finetune_figure(epochs: list[int], loss: list[float], accuracy: list[float]) -> Figure:
    """Training loss and test accuracy per fine-tuning epoch."""
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    ax.plot(epochs, loss, marker="o", color="tab:blue", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    twin = ax.twinx()
    twin.plot(epochs, accuracy, marker="s", color="tab:green", label="test accuracy")
    twin.set_ylabel("accuracy")
    ax.set_title("Masked fine-tuning")
    fig.tight_layout()
    return fig
