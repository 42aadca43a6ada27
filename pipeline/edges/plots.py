"""Figures for the tracking store. Pure: builds matplotlib figures, writes nothing."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: no display on workers, CI or servers

from collections.abc import Mapping, Sequence  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from pipeline.allocation.problem import Allocation
from pipeline.profiling.distortion import DistortionCurves


def distortion_curves_figure(curves: DistortionCurves, kind: str = "mean") -> Figure:
    """Each layer's profiled distortion against its sparsity, log scale (zeros not drawn)."""
    fig, ax = plt.subplots(figsize=(7.0, 4.5))
    colors = plt.get_cmap("viridis")(np.linspace(0, 1, max(len(curves.layers), 2)))
    for name, values, color in zip(curves.layers, curves.curve(kind), colors, strict=False):
        positive = values > 0
        ax.plot(curves.sparsity[positive], values[positive], color=color, label=name, lw=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("sparsity of the layer alone")
    ax.set_ylabel(f"output distortion ({kind} squared logit error)")
    ax.set_title("Per-layer rate-distortion curves")
    if len(curves.layers) <= 24:
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return fig


def allocations_figure(allocations: Mapping[str, Allocation], ratio: float) -> Figure:
    """Per-layer sparsity of several methods at the same ratio, as grouped bars."""
    names = list(allocations)
    layers = allocations[names[0]].layers
    fig, ax = plt.subplots(figsize=(max(7.0, 0.45 * len(layers) * max(1, len(names) / 3)), 4.5))
    width = 0.8 / len(names)
    x = np.arange(len(layers))
    for i, name in enumerate(names):
        ax.bar(
            x + (i - (len(names) - 1) / 2) * width, allocations[name].sparsity, width, label=name
        )
    ax.axhline(ratio, color="black", linestyle="--", lw=0.8, label=f"ratio {ratio:g}")
    ax.set_xticks(x, layers, rotation=60, ha="right", fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("sparsity")
    ax.set_title("Per-layer sparsity by allocation method")
    ax.legend(fontsize=7, ncol=min(len(names) + 1, 4))
    fig.tight_layout()
    return fig


def pareto_figure(ratios: Sequence[float], predicted: Sequence[float], ratio: float) -> Figure:
    """Predicted distortion of the optimal allocation against the ratio removed (log scale)."""
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    ax.plot(ratios, np.maximum(predicted, 1e-12), marker="o", color="tab:blue")
    ax.axvline(ratio, color="tab:red", linestyle="--", label=f"prune.ratio = {ratio:g}")
    ax.set_yscale("log")
    ax.set_xlabel("ratio removed")
    ax.set_ylabel("predicted distortion")
    ax.set_title("Pareto front")
    ax.legend()
    fig.tight_layout()
    return fig


def joint_distortion_figure(allocation: Allocation, measured: Mapping[str, float]) -> Figure:
    """The additive prediction, layer by layer, against the measured joint distortion.

    measured: label -> measured joint distortion of the whole pruned network.
    """
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(allocation.layers)), 4.0))
    x = np.arange(len(allocation.layers))
    ax.step(x, np.cumsum(allocation.predicted_distortion), where="mid", label="predicted (sum)")
    for (label, value), style in zip(measured.items(), ("--", ":", "-."), strict=False):
        ax.axhline(value, linestyle=style, color="tab:red", label=f"measured, {label}")
    ax.set_xticks(x, allocation.layers, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("distortion (squared logit error)")
    ax.set_title("Additivity: predicted vs measured joint distortion")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
