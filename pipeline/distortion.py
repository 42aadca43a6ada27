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

from pipeline.batchnorm import BN_RULES, ChannelMoments, input_moments, set_running_stats
from pipeline.device import (
    CHECK_TOLERANCE,
    keep_freed_memory,
    model_device,
    precision,
    resolve_device,
)
from pipeline.errors import PipelineError
from pipeline.evaluation import per_sample_distortion, predict_logits, torch_threads
from pipeline.masking import pruned_count
from pipeline.patches import (
    Candidate,
    Moments,
    PatchMoments,
    candidate_params,
    layer_patch_moments,
)
from pipeline.repair import (
    augmented_weight,
    candidate_rows,
    damped_gram,
    equations_solution,
    moment_equations,
)
from pipeline.suffix import NotTraceable, SuffixRunner, consumer_batchnorm

log = logging.getLogger(__name__)

# On a CPU the fast engine's batched passes stay about this size (bytes, the estimate of
# ``SuffixRunner.bytes_per_sample``): measured on 2 cores (ResNet-20, 32-image batches), one
# level per 6 MB pass ran 1.3x faster than ten per 64 MB pass, as the activations stay in the
# caches; profile.memory_mb stays the upper bound.
CPU_PASS_BYTES = 4 << 20


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


class _LevelWeights:
    """The layer's parameters at each level j: its weight with the ``counts[j]`` smallest
    magnitudes zeroed (the tie-break of ``mask_pruning``) and, with ``repair`` (the layer's
    input moments and the damping), the kept weights and the bias re-solved to reproduce the
    layer's output (repair.py, layer-wise: the layer's input is the dense one). Kept once built
    while they fit in ``budget`` bytes, so that they are not rebuilt for every batch."""

    def __init__(
        self,
        module: nn.Module,
        counts: list[int],
        budget: int,
        repair: tuple[PatchMoments, float] | None = None,
    ) -> None:
        self.module, self.counts = module, counts
        self.weight = module.weight.detach()
        self.order = torch.argsort(self.weight.abs().flatten(), stable=True)
        self.cache: dict[int, Candidate] = {}
        self.equations = moment_equations(repair[0]) if repair is not None else None
        self.damping = repair[1] if repair is not None else 0.0
        self.anchor = augmented_weight(module) if repair is not None else None
        # one factorisation of the layer's input statistics for every level
        self.damped = (
            damped_gram(module, self.equations, self.damping) if repair is not None else None
        )
        self.keep = budget // self.bytes

    @property
    def bytes(self) -> int:
        """Bytes of one level's parameters (the weight; a repaired bias is negligible)."""
        return self.weight.numel() * self.weight.element_size()

    def __call__(self, j: int) -> Candidate:
        if j in self.cache:
            return self.cache[j]
        keep = torch.ones(self.weight.numel(), dtype=torch.bool, device=self.weight.device)
        keep[self.order[: self.counts[j]]] = False  # mask_pruning's mask, from the one sort
        keep = keep.view_as(self.weight)
        pruned: Candidate = self.weight * keep
        if self.equations is not None:
            rows = equations_solution(
                self.module,
                self.equations,
                keep,
                self.damping,
                dense=self.anchor,
                damped=self.damped,
            )
            pruned = candidate_rows(self.module, rows)
        if len(self.cache) < self.keep:
            self.cache[j] = pruned
        return pruned


def _set_params(module: nn.Module, candidate: Candidate) -> None:
    for name, value in candidate_params(candidate).items():
        getattr(module, name).copy_(value)


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
    repair: float | None = None,
    precision_name: str = "fp32",
) -> tuple[np.ndarray, np.ndarray]:
    """The paper's algorithm: one full forward pass of the calibration set per level. With
    ``bn_correction`` or ``repair``, the moments of the layer's input are measured first (one
    pass up to the layer for all levels; for layers ``PatchMoments`` does not cover, what the
    BatchNorm receives is measured by a pass up to it per level). Runs on the model's device."""
    device = model_device(model)
    inputs, reference = inputs.to(device), reference.to(device)  # once, not per level
    modules = dict(model.named_modules())
    module = modules[layer]
    saved_params = {n: p.detach().clone() for n, p in module.named_parameters(recurse=False)}
    original = saved_params["weight"]
    bn_name = consumer_batchnorm(model, layer) if bn_correction else None
    bn = modules[bn_name] if bn_name else None
    saved = (bn.running_mean.clone(), bn.running_var.clone()) if bn is not None else None
    # What the BN receives is the layer's output, a function of its (unchanged) input: one
    # pass over the input gives exact moments for every level (see PatchMoments), the same
    # computation as the fast engine's. Other layers: one more pass per level, up to the BN.
    patches = (
        layer_patch_moments(
            model, module, inputs, batch_size, memory_mb << 20, for_bn=repair is None
        )
        if bn is not None or repair is not None
        else None
    )
    if repair is not None and patches is None:
        # never called as a module (an attention block's out_proj): its input cannot be seen,
        # so the prune stage's walk cannot repair it either; its curve is the plain one
        log.info(
            "profile layer %s: not repaired (its input cannot be seen: the model applies it "
            "without calling it, or it is a subclass the repair does not cover)",
            layer,
        )
        repair = None
    bn_patches = patches if patches is not None and patches.channel_moments else None
    if bn is None:
        dense = None
    elif bn_patches is not None:
        (dense,) = bn_patches.stats([original])
    else:
        dense = input_moments(model, [bn], inputs, batch_size)[0]
    counts = _grid_counts(original, sparsities, of_remaining)
    levels = _LevelWeights(module, counts, 0, (patches, repair) if repair is not None else None)
    means, maxes = np.zeros(len(sparsities)), np.zeros(len(sparsities))
    zeros = int((original == 0).sum())
    try:
        for j, k in enumerate(counts):
            if k <= zeros:
                continue  # only zeros pruned: the network is unchanged, distortion is 0
            candidate = levels(j)
            _set_params(module, candidate)
            if bn is not None:
                # the rule reads the dense statistics; what the BN receives does not
                set_running_stats(bn, saved)
                if bn_patches is not None:
                    (pruned,) = bn_patches.stats([candidate])
                else:
                    pruned = input_moments(model, [bn], inputs, batch_size)[0]
                set_running_stats(bn, BN_RULES[bn_correction](bn, dense, pruned))
            with precision(precision_name, device):
                logits = predict_logits(model, inputs, batch_size)
            d = per_sample_distortion(logits, reference)
            means[j], maxes[j] = float(d.mean()), float(d.max())
    finally:
        _set_params(module, saved_params)
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
    repair: float | None = None,
    precision_name: str = "fp32",
) -> tuple[np.ndarray, np.ndarray]:
    """Suffix-only recomputation (see suffix.py), several levels per batched pass, on the
    model's device.

    Falls back to ``profile_naive`` with a warning for models torch.fx cannot trace, or when
    the suffix pass fails its check: with the layer's own weight it must reproduce the
    model's output. Running out of GPU memory is no reason to fall back: the passes shrink
    (``_profile_suffix``).
    """
    args = (layer, model, inputs, reference, sparsities, batch_size, memory_mb)
    options = {
        "bn_correction": bn_correction,
        "of_remaining": of_remaining,
        "repair": repair,
        "precision_name": precision_name,
    }
    try:
        try:
            return _profile_suffix(SuffixRunner(model, layer), *args[2:], **options)
        except (_SuffixMismatch, RuntimeError) as exc:
            if isinstance(exc, torch.OutOfMemoryError):
                raise
            # model code the channels-last copy breaks (a .view of a conv output, say)
            log.warning(
                "profile layer %s: optimized execution failed (%s); running the model as written",
                layer,
                str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
            )
        return _profile_suffix(SuffixRunner(model, layer, optimize=False), *args[2:], **options)
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
        return profile_naive(*args, **options)


class _SuffixMismatch(Exception):
    pass


def _level_chunks(todo: list[int], group: int) -> list[list[int]]:
    return [todo[i : i + group] for i in range(0, len(todo), group)] or [[]]


class _Upstream:
    """The frontier (``SuffixRunner.upstream``) of each calibration batch, kept while the kept
    ones fit in ``budget`` bytes: the moment pass and every block of suffix passes then share
    one run of the layers upstream of the pruned one."""

    def __init__(
        self, runner: SuffixRunner, inputs: torch.Tensor, batch_size: int, budget: int
    ) -> None:
        self.runner, self.inputs, self.batch_size, self.room = runner, inputs, batch_size, budget
        self.kept: dict[int, dict] = {}

    def starts(self) -> range:
        return range(0, len(self.inputs), self.batch_size)

    def __call__(self, start: int) -> dict:
        """The frontier of the batch starting at sample ``start``."""
        if start in self.kept:
            return self.kept[start]
        frontier = self.runner.upstream(self.inputs[start : start + self.batch_size])
        size = sum(v.numel() * v.element_size() for v in frontier.values() if torch.is_tensor(v))
        if size <= self.room:
            self.kept[start], self.room = frontier, self.room - size
        return frontier


def _input_moments(
    runner: SuffixRunner, upstream: _Upstream, budget: int, for_bn: bool
) -> PatchMoments | None:
    """Moments of the layer's input patches over the calibration set (one upstream pass), or
    None where ``PatchMoments`` does not cover the layer (``for_bn``: as a BatchNorm's
    channels)."""
    if len(runner.sites) != 1:  # every call of the layer: passes of the whole model
        return layer_patch_moments(
            runner.gm, runner.module, upstream.inputs, upstream.batch_size, budget, for_bn=for_bn
        )
    patches = None
    for start in upstream.starts():
        inp = runner.layer_input(upstream(start))
        if patches is None:
            patches = PatchMoments.of(runner.module, inp, budget, for_bn=for_bn)
            if patches is None:
                return None
        patches.add(inp)
    return patches


def _bn_stats(
    runner: SuffixRunner,
    upstream: _Upstream,
    todo: list[int],
    levels: _LevelWeights,
    patches: PatchMoments | None,
    budget: int,
    rule: str,
) -> dict[int, Moments]:
    """Per level: the consuming BatchNorm's statistics by ``BN_RULES[rule]`` from the moments
    of the layer's output over the calibration set at that level (and at its current weight):
    from the input patches' moments when they give channel moments, else from the outputs."""
    weight = runner.module.weight.detach()
    bn = runner.gm.get_submodule(runner.bn_node.target)
    if patches is not None and patches.channel_moments:
        dense, *per_level = patches.stats([weight, *(levels(j) for j in todo)])
        return {j: BN_RULES[rule](bn, dense, m) for j, m in zip(todo, per_level, strict=True)}
    moments = {j: ChannelMoments() for j in [-1, *todo]}  # -1: the layer's current weight
    group = max(1, budget // levels.bytes)
    for start in upstream.starts():
        frontier = upstream(start)
        for chunk in _level_chunks([-1, *todo], group):
            outputs = runner.layer_outputs(
                frontier, [levels(j) if j >= 0 else weight for j in chunk]
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
    repair: float | None = None,
    precision_name: str = "fp32",
) -> tuple[np.ndarray, np.ndarray]:
    weight = runner.module.weight.detach()
    inputs, reference = inputs.to(weight.device), reference.to(weight.device)
    counts = _grid_counts(weight, sparsities, of_remaining)
    # Pruning only weights that are already zero leaves the network unchanged: distortion 0.
    zeros = int((weight == 0).sum())
    todo = [j for j, k in enumerate(counts) if k > zeros]
    sums, maxes = np.zeros(len(sparsities)), np.zeros(len(sparsities))
    budget = memory_mb << 20
    # half the budget keeps frontiers, half bounds the passes
    upstream = _Upstream(runner, inputs, batch_size, budget // 2)
    correct = bn_correction is not None and runner.bn_node is not None and bool(todo)
    patches = (
        _input_moments(runner, upstream, budget, for_bn=repair is None)
        if (correct or repair is not None) and todo
        else None
    )
    if repair is not None and todo and patches is None:
        raise NotTraceable(f"repair does not cover {type(runner.module).__name__}")
    levels = _LevelWeights(
        runner.module,
        counts,
        budget,
        (patches, repair) if patches is not None and repair is not None else None,
    )
    # each level of a pass holds its own copy of the parameters (VGG's FC: 400 MB each); with
    # repair, the levels whose solutions fit in the budget run together, so none is solved
    # twice (each block then pays its upstream passes again)
    weight_group = max(1, budget // levels.bytes)
    blocks = _level_chunks(todo, weight_group) if repair is not None else [todo]
    for b, block in enumerate(blocks):
        stats = (
            _bn_stats(runner, upstream, block, levels, patches, budget, bn_correction)
            if correct and block
            else {}
        )
        _suffix_passes(
            runner,
            upstream,
            reference,
            block,
            levels,
            stats,
            budget,
            b == 0,
            sums,
            maxes,
            precision_name,
        )
        levels.cache.clear()
    return sums / len(inputs), maxes


def _suffix_passes(
    runner: SuffixRunner,
    upstream: _Upstream,
    reference: torch.Tensor,
    todo: list[int],
    levels: _LevelWeights,
    stats: dict[int, Moments],
    budget: int,
    check: bool,
    sums: np.ndarray,
    maxes: np.ndarray,
    precision_name: str = "fp32",
) -> None:
    """Add the per-sample distortions of levels ``todo`` over the calibration set into
    ``sums`` and ``maxes`` (K,). ``check``: the first pass also runs the layer's own weight,
    which must reproduce the model's output. The passes run in ``precision_name``."""
    weight = runner.module.weight.detach()
    weight_group = max(1, budget // levels.bytes)
    cap = max(1, len(todo))  # levels per pass; halved for good on a GPU out-of-memory error
    if weight.device.type == "cpu":
        budget = min(budget, CPU_PASS_BYTES)
    for start in upstream.starts():
        x = upstream.inputs[start : start + upstream.batch_size]
        ref = reference[start : start + upstream.batch_size]
        frontier = upstream(start)
        per_level = runner.bytes_per_sample(frontier) * len(x)
        # below fp32 every batch also runs the layer's own weight: each level's logits are
        # taken as its difference from that, added to the float32 model's, so the rounding
        # the levels share cancels
        low = precision_name != "fp32"
        done, first = 0, (check and start == 0) or low
        while done < len(todo) or first:
            group = max(1, min(budget // per_level, weight_group, cap))
            chunk = todo[done : done + group]
            candidates = [levels(j) for j in chunk] + [weight] * first
            bn = [stats[j] for j in chunk] + [None] * first if stats else None
            try:
                with precision(precision_name, weight.device):
                    logits = runner.run(frontier, candidates, bn)
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
            logits = logits.view(len(candidates), len(x), -1)
            if first:
                own, expected = logits[-1].float(), runner.reference(x)  # the model as given
                rtol, share = CHECK_TOLERANCE[precision_name]
                if own.shape != expected.shape or not torch.allclose(
                    own, expected, rtol=rtol, atol=share * float(expected.abs().max())
                ):
                    raise _SuffixMismatch("the suffix pass does not reproduce the model's logits")
                logits, first = logits[:-1], False
                shift = (expected - own) if low else None
            if low:
                logits = logits.float() + shift
            if chunk:
                d = per_sample_distortion(logits, ref).cpu().numpy()  # (levels, samples)
                sums[chunk] += d.sum(axis=1)
                maxes[chunk] = np.maximum(maxes[chunk], d.max(axis=1))
            done += len(chunk)


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
    repair: float | None = None,
    precision: str = "fp32",
) -> tuple[np.ndarray, np.ndarray]:
    """Distortion curve of one layer: (mean, max), each (K,) float64 over ``sparsities``.

    inputs: (N, ...) calibration inputs; reference: (N, classes) dense logits. ``engine``:
    "fast" (suffix-only recomputation) or "naive" (full forward passes); ``memory_mb`` bounds
    the batched multi-level passes; ``bn_correction`` (a ``BN_RULES`` name, or None) sets the
    statistics of the BatchNorm consuming the layer from the pruned outputs on the calibration
    set by that rule, as the prune stage's BN recalibration will. ``device``: a ``device``
    param name, resolved here (under Ray: on the worker) and the model moved there; None: run
    where the model is. ``of_remaining``: each sparsity is a fraction of the layer's non-zero
    weights, pruned after its zeros (the grid of an iterative round on a pruned model).
    ``repair``: None, or the damping of the layer-wise repair (repair.py) applied at each level
    before measuring, as the prune stage's ``prune.reconstruct`` will (alone in the network,
    the layer's input is the dense one, so both objectives give the same weights). Inputs may
    be on any device; the curves are CPU arrays. The model's weights are left unchanged, so it
    may be shared. ``precision``: what the per-level passes run in (``device.PRECISIONS``);
    the distortion sums are float64 whatever it is.
    """
    keep_freed_memory()
    if device is not None:
        model = model.to(resolve_device(device))
    args = (layer, model, inputs, reference, sparsities, batch_size, memory_mb)
    with torch_threads(threads):
        return ENGINES[engine](
            *args,
            bn_correction=bn_correction,
            of_remaining=of_remaining,
            repair=repair,
            precision_name=precision,
        )
