"""The fast profiling engine: per batch, the layers upstream of the pruned one run once and
only the suffix the layer can change runs per level, several levels per batched pass
(suffix.py), with the consuming BatchNorm's statistics and the repair set per level.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.nn.device import (
    CHECK_TOLERANCE,
    precision,
)
from pipeline.nn.evaluation import per_sample_distortion
from pipeline.profiling.naive import LevelWeights, grid_counts, profile_naive
from pipeline.profiling.suffix import NotTraceable, SuffixRunner
from pipeline.pruning.batchnorm import BN_RULES, ChannelMoments
from pipeline.pruning.patches import (
    Moments,
    PatchMoments,
    layer_patch_moments,
)

log = logging.getLogger(__name__)

# On a CPU the fast engine's batched passes stay about this size (bytes, the estimate of
# ``SuffixRunner.bytes_per_sample``): measured on 2 cores (ResNet-20, 32-image batches), one
# level per 6 MB pass ran 1.3x faster than ten per 64 MB pass, as the activations stay in the
# caches; profile.memory_mb stays the upper bound.
CPU_PASS_BYTES = 4 << 20


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
    levels: LevelWeights,
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
    counts = grid_counts(weight, sparsities, of_remaining)
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
    levels = LevelWeights(
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
        levels.prepare(block, budget)
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
    levels: LevelWeights,
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
