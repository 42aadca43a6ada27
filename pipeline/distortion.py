"""Per-layer rate-distortion curves: output distortion when one layer alone is pruned.

For layer l and grid sparsity s, the ``pruned_count(numel_l, s)`` smallest-magnitude weights
of l are zeroed, the calibration set is run, and the per-sample mean squared logit error
against the dense reference is reduced to its mean (``distortion``) and max
(``distortion_max``) over samples.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline.batchnorm import (
    BN_RULES,
    ChannelMoments,
    Moments,
    PatchMoments,
    input_moments,
    layer_patch_moments,
    set_running_stats,
)
from pipeline.device import model_device, resolve_device
from pipeline.errors import PipelineError
from pipeline.evaluation import per_sample_distortion, predict_logits, torch_threads
from pipeline.masking import mask_pruning, pruned_count
from pipeline.suffix import NotTraceable, SuffixRunner, consumer_batchnorm

log = logging.getLogger(__name__)


def sparsity_grid(levels: int) -> np.ndarray:
    """``levels`` evenly spaced sparsities 0, 1/(levels-1), ..., 1 as float64 (levels,)."""
    return np.arange(levels, dtype=np.float64) / (levels - 1)


@dataclass(frozen=True)
class DistortionCurves:
    """Profiled curves of L layers on a grid of K sparsities.

    layers: L names in ``named_modules()`` order; numel: (L,) int64 weights per layer;
    sparsity: (K,) float64 grid; mean, max: (L, K) float64 distortion (squared logit units);
    macs_per_weight: (L,) int64 multiply-accumulates each kept weight costs per sample.
    """

    layers: list[str]
    numel: np.ndarray
    sparsity: np.ndarray
    mean: np.ndarray
    max: np.ndarray
    macs_per_weight: np.ndarray

    @classmethod
    def from_profiles(
        cls,
        numel: Mapping[str, int],
        sparsity: np.ndarray,
        results: Sequence[tuple[np.ndarray, np.ndarray]],
        macs_per_weight: Mapping[str, int],
    ) -> DistortionCurves:
        """Curves from per-layer ``profile_layer`` results (mean, max), in ``numel``'s order."""
        return cls(
            layers=list(numel),
            numel=np.array(list(numel.values()), dtype=np.int64),
            sparsity=sparsity,
            mean=np.stack([mean for mean, _ in results]),
            max=np.stack([worst for _, worst in results]),
            macs_per_weight=np.array([macs_per_weight[n] for n in numel], dtype=np.int64),
        )

    def kept(self) -> np.ndarray:
        """(L, K) int64 weights kept at each grid level."""
        return np.array(
            [[n - pruned_count(int(n), float(s)) for s in self.sparsity] for n in self.numel],
            dtype=np.int64,
        )

    def curve(self, kind: str) -> np.ndarray:
        """(L, K) distortion of the chosen kind: "mean" or "max"."""
        return {"mean": self.mean, "max": self.max}[kind]

    def check(self) -> None:
        """Raise if any value is NaN/inf or negative (a squared error), or shapes disagree."""
        shape = (len(self.layers), len(self.sparsity))
        if (
            self.mean.shape != shape
            or self.max.shape != shape
            or self.numel.shape != shape[:1]
            or self.macs_per_weight.shape != shape[:1]
        ):
            raise PipelineError(f"distortion table is not a full layer x level grid {shape}")
        for name, values in (("distortion", self.mean), ("distortion_max", self.max)):
            bad = ~np.isfinite(values) | (values < 0)
            if bad.any():
                layer, level = np.argwhere(bad)[0]
                raise PipelineError(
                    f"distortion table: {name} of layer {self.layers[layer]!r} at level {level} "
                    f"is {values[layer, level]}; allowed: finite values >= 0 (re-run the "
                    "profile stage)"
                )


def _grid_counts(weight: torch.Tensor, sparsities: np.ndarray, of_remaining: bool) -> list[int]:
    """Weights zeroed per level. ``of_remaining``: a level's sparsity is the fraction of the
    layer's non-zero weights pruned, on top of its zeros (an iterative round's grid)."""
    zeros = int((weight == 0).sum()) if of_remaining else 0
    return [zeros + pruned_count(weight.numel() - zeros, float(s)) for s in sparsities]


@torch.no_grad()
def profile_naive(
    layer: str,
    model: nn.Module,
    inputs: torch.Tensor,
    reference: torch.Tensor,
    sparsities: np.ndarray,
    batch_size: int,
    memory_mb: int,
    bn_correction: str | None = None,
    of_remaining: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """The paper's algorithm: one full forward pass of the calibration set per level. With
    ``bn_correction``, what the consuming BatchNorm receives is measured first (one pass up to
    the layer for all levels; for layers ``PatchMoments`` does not support, a pass up to the
    BatchNorm per level). Runs on the model's device."""
    device = model_device(model)
    inputs, reference = inputs.to(device), reference.to(device)  # once, not per level
    modules = dict(model.named_modules())
    weight = modules[layer].weight
    original = weight.detach().clone()
    bn_name = consumer_batchnorm(model, layer) if bn_correction else None
    bn = modules[bn_name] if bn_name else None
    saved = (bn.running_mean.clone(), bn.running_var.clone()) if bn is not None else None
    # What the BN receives is the layer's output, a function of its (unchanged) input: one
    # pass over the input gives exact moments for every level (see PatchMoments), the same
    # computation as the fast engine's. Other layers: one more pass per level, up to the BN.
    patches = (
        layer_patch_moments(model, modules[layer], inputs, batch_size, memory_mb << 20)
        if bn is not None
        else None
    )
    if bn is None:
        dense = None
    elif patches is not None:
        (dense,) = patches.stats([original])
    else:
        dense = input_moments(model, [bn], inputs, batch_size)[0]
    means, maxes = np.zeros(len(sparsities)), np.zeros(len(sparsities))
    zeros = int((original == 0).sum())
    try:
        for j, k in enumerate(_grid_counts(original, sparsities, of_remaining)):
            if k <= zeros:
                continue  # only zeros pruned: the network is unchanged, distortion is 0
            weight.copy_(original * mask_pruning(original, k))
            if bn is not None:
                # the rule reads the dense statistics; what the BN receives does not
                set_running_stats(bn, saved)
                if patches is not None:
                    (pruned,) = patches.stats([weight])
                else:
                    pruned = input_moments(model, [bn], inputs, batch_size)[0]
                set_running_stats(bn, BN_RULES[bn_correction](bn, dense, pruned))
            d = per_sample_distortion(predict_logits(model, inputs, batch_size), reference)
            means[j], maxes[j] = float(d.mean()), float(d.max())
    finally:
        weight.copy_(original)
        if bn is not None:
            set_running_stats(bn, saved)
    return means, maxes


@torch.no_grad()
def profile_fast(
    layer: str,
    model: nn.Module,
    inputs: torch.Tensor,
    reference: torch.Tensor,
    sparsities: np.ndarray,
    batch_size: int,
    memory_mb: int,
    bn_correction: str | None = None,
    of_remaining: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Suffix-only recomputation (see suffix.py), several levels per batched pass, on the
    model's device.

    Falls back to ``profile_naive`` with a warning for models torch.fx cannot trace, or when
    the suffix pass fails its check: with the layer's own weight it must reproduce the
    model's output. Running out of GPU memory is no reason to fall back: the passes shrink
    (``_profile_suffix``).
    """
    try:
        runner = SuffixRunner(model, layer)
        return _profile_suffix(
            runner,
            inputs,
            reference,
            sparsities,
            batch_size,
            memory_mb,
            bn_correction,
            of_remaining,
        )
    except torch.OutOfMemoryError as exc:  # a RuntimeError, but no reason for the slow engine
        raise PipelineError(
            f"profile layer {layer}: out of GPU memory with one level per pass or outside the "
            f"batched passes ({str(exc).splitlines()[0]}); allowed: a smaller "
            "profile.batch_size or profile.memory_mb"
        ) from None
    except (NotTraceable, _SuffixMismatch, RuntimeError) as exc:
        log.warning(
            "profile layer %s: fast engine unavailable (%s); using full forward passes", layer, exc
        )
        return profile_naive(
            layer,
            model,
            inputs,
            reference,
            sparsities,
            batch_size,
            memory_mb,
            bn_correction,
            of_remaining,
        )


class _SuffixMismatch(Exception):
    pass


class _PrunedWeights:
    """The layer's weight with the ``counts[j]`` smallest magnitudes zeroed, per level j
    (the tie-break of ``mask_pruning``). Kept once built while they fit in ``budget`` bytes,
    so that they are not rebuilt for every calibration batch."""

    def __init__(self, weight: torch.Tensor, counts: list[int], budget: int) -> None:
        self.weight, self.counts = weight, counts
        self.order = torch.argsort(weight.abs().flatten(), stable=True)
        self.keep = budget // (weight.numel() * weight.element_size())
        self.cache: dict[int, torch.Tensor] = {}

    def __call__(self, j: int) -> torch.Tensor:
        if j in self.cache:
            return self.cache[j]
        flat = self.weight.flatten().clone()
        flat[self.order[: self.counts[j]]] = 0
        pruned = flat.view_as(self.weight)
        if len(self.cache) < self.keep:
            self.cache[j] = pruned
        return pruned


def _level_chunks(todo: list[int], group: int) -> list[list[int]]:
    return [todo[i : i + group] for i in range(0, len(todo), group)] or [[]]


def _bn_stats(
    runner: SuffixRunner,
    inputs: torch.Tensor,
    todo: list[int],
    pruned: _PrunedWeights,
    batch_size: int,
    budget: int,
    rule: str,
) -> dict[int, Moments]:
    """Per level: the consuming BatchNorm's statistics by ``BN_RULES[rule]`` from the moments
    of the pruned layer's output over the calibration set (and of its current output)."""
    weight = runner.module.weight.detach()
    bn = runner.gm.get_submodule(runner.bn_node.target)
    starts = range(0, len(inputs), batch_size)
    patches = None  # moments from the layer's input, when supported: no pass per level
    for start in starts:
        inp = runner.layer_input(runner.upstream(inputs[start : start + batch_size]))
        patches = PatchMoments.of(runner.module, inp, budget) if start == 0 else patches
        if patches is None:
            break
        patches.add(inp)
    if patches is not None:
        dense, *levels = patches.stats([weight, *(pruned(j) for j in todo)])
        return {j: BN_RULES[rule](bn, dense, m) for j, m in zip(todo, levels, strict=True)}
    moments = {j: ChannelMoments() for j in [-1, *todo]}  # -1: the layer's current weight
    group = max(1, budget // (weight.numel() * weight.element_size()))
    for start in starts:
        frontier = runner.upstream(inputs[start : start + batch_size])
        for chunk in _level_chunks([-1, *todo], group):
            outputs = runner.layer_outputs(
                frontier, [pruned(j) if j >= 0 else weight for j in chunk]
            )
            for j, out in zip(chunk, outputs, strict=True):
                moments[j].add(out)
    dense = moments.pop(-1).stats()
    return {j: BN_RULES[rule](bn, dense, m.stats()) for j, m in moments.items()}


def _profile_suffix(
    runner: SuffixRunner,
    inputs: torch.Tensor,
    reference: torch.Tensor,
    sparsities: np.ndarray,
    batch_size: int,
    memory_mb: int,
    bn_correction: str | None,
    of_remaining: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    weight = runner.module.weight.detach()
    inputs, reference = inputs.to(weight.device), reference.to(weight.device)
    counts = _grid_counts(weight, sparsities, of_remaining)
    # Pruning only weights that are already zero leaves the network unchanged: distortion 0.
    zeros = int((weight == 0).sum())
    todo = [j for j, k in enumerate(counts) if k > zeros]
    sums, maxes = np.zeros(len(sparsities)), np.zeros(len(sparsities))
    budget = memory_mb << 20
    pruned = _PrunedWeights(weight, counts, budget)
    # each level of a pass holds its own pruned copy of the weight (VGG's FC: 400 MB each)
    weight_group = max(1, budget // (weight.numel() * weight.element_size()))
    correct = bn_correction is not None and runner.bn_node is not None
    stats = (
        _bn_stats(runner, inputs, todo, pruned, batch_size, budget, bn_correction)
        if correct and todo
        else {}
    )
    cap = max(1, len(todo))  # levels per pass; halved for good on a GPU out-of-memory error
    for start in range(0, len(inputs), batch_size):
        x, ref = inputs[start : start + batch_size], reference[start : start + batch_size]
        frontier = runner.upstream(x)
        per_level = runner.bytes_per_sample(frontier) * len(x)
        done, check = 0, start == 0  # the first pass also checks the layer's own weight
        while done < len(todo) or check:
            group = max(1, min(budget // per_level, weight_group, cap))
            chunk = todo[done : done + group]
            weights = [pruned(j) for j in chunk]
            bn = [stats[j] for j in chunk] + [None] * check if correct else None
            try:
                logits = runner.run(frontier, weights + [weight] if check else weights, bn)
            except torch.OutOfMemoryError:
                if group == 1:
                    raise
                cap = group // 2
                log.info(
                    "profile layer %s: out of GPU memory with %d levels per pass; now %d",
                    runner.layer,
                    group,
                    cap,
                )
                continue
            logits = logits.view(len(weights) + check, len(x), -1)
            if check:
                own, expected = logits[-1], runner.gm(x)  # the model as it is (maybe pruned)
                if own.shape != expected.shape or not torch.allclose(
                    own, expected, rtol=1e-3, atol=1e-4 * float(expected.abs().max())
                ):
                    raise _SuffixMismatch("the suffix pass does not reproduce the model's logits")
                logits, check = logits[:-1], False
            if chunk:
                d = per_sample_distortion(logits, ref).cpu().numpy()  # (levels, samples)
                sums[chunk] += d.sum(axis=1)
                maxes[chunk] = np.maximum(maxes[chunk], d.max(axis=1))
            done += len(chunk)
    return sums / len(inputs), maxes


ProfileEngine = Callable[..., tuple[np.ndarray, np.ndarray]]
ENGINES: dict[str, ProfileEngine] = {"fast": profile_fast, "naive": profile_naive}


def profile_layer(
    layer: str,
    *,
    model: nn.Module,
    inputs: torch.Tensor,
    reference: torch.Tensor,
    sparsities: np.ndarray,
    batch_size: int,
    threads: int,
    engine: str = "fast",
    memory_mb: int = 64,
    bn_correction: str | None = None,
    device: str | None = None,
    of_remaining: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Distortion curve of one layer: (mean, max), each (K,) float64 over ``sparsities``.

    inputs: (N, ...) calibration inputs; reference: (N, classes) dense logits. ``engine``:
    "fast" (suffix-only recomputation) or "naive" (full forward passes); ``memory_mb`` bounds
    the batched multi-level passes; ``bn_correction`` (a ``BN_RULES`` name, or None) sets the
    statistics of the BatchNorm consuming the layer from the pruned outputs on the calibration
    set by that rule, as the prune stage's BN recalibration will. ``device``: a ``device``
    param name, resolved here (under Ray: on the worker) and the model moved there; None: run
    where the model is. ``of_remaining``: each sparsity is a fraction of the layer's non-zero
    weights, pruned after its zeros (the grid of an iterative round on a pruned model). Inputs
    may be on any device; the curves are CPU arrays. The model's weights are left unchanged,
    so it may be shared.
    """
    if device is not None:
        model = model.to(resolve_device(device))
    with torch_threads(threads):
        return ENGINES[engine](
            layer,
            model,
            inputs,
            reference,
            sparsities,
            batch_size,
            memory_mb,
            bn_correction,
            of_remaining,
        )
