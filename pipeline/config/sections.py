"""The params sections of the pipeline's work, one frozen dataclass each: the model, the data,
training, calibration, profiling, allocation, pruning and the iterative schedule.

Each field's docstring is the one home of the param's meaning (the params reference and
params.yaml's comments are generated from it: ``pipeline.config.reference``); its default
is the param's default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pipeline.config.checks import (
    DISTORTION_KINDS,
    MAX_IMAGE_SIZE,
    MAX_LEVELS,
    MAX_SAMPLES,
    check_choice,
    check_positive,
    check_range,
    fail,
)


@dataclass(frozen=True)
class ModelParams:
    arch: str = "digits_cnn"
    """registry name, or package.module:factory for a model of your own (docs/models-data.md#models)
    """
    checkpoint: str | None = None
    """null: the baseline stage trains the model; else a local state_dict file"""

    def validate(self) -> None:
        from pipeline.nn.models import resolve_model

        resolve_model(self.arch)


@dataclass(frozen=True)
class DataParams:
    name: str = "digits"
    """registry name; `digits` ships inside scikit-learn"""
    root: str | None = None
    """directory of on-disk datasets (unused by digits)"""
    test_fraction: float = 0.2
    """digits: held-out share of the 1,797 images (fixed split); allowed: a number in [0.05, 0.5]"""
    mean: list[float] | None = None
    """per-channel normalisation; null: the dataset's default"""
    std: list[float] | None = None
    """per-channel normalisation, with mean; null: the dataset's default"""
    image_size: int | None = None
    """null: images as they are (CIFAR recipe); N: resize + centre crop to N (ImageNet); allowed:
    null or an integer in [1, 4096]"""

    def validate(self) -> None:
        from pipeline.nn.data import DATASETS

        check_choice("data.name", self.name, DATASETS)
        check_range("data.test_fraction", self.test_fraction, 0.05, 0.5)
        if (self.mean is None) != (self.std is None):
            raise fail("data.mean/data.std", (self.mean, self.std), "both null or both lists")
        if self.mean is not None and (not self.mean or len(self.mean) != len(self.std or [])):
            raise fail(
                "data.mean/data.std", (self.mean, self.std), "lists of one value per channel"
            )
        if self.image_size is not None:
            check_range("data.image_size", self.image_size, 1, MAX_IMAGE_SIZE)
            if self.name == "digits":  # its 8x8 arrays are never resized
                raise fail("data.image_size", self.image_size, "null with data.name 'digits'")
        if self.mean is not None and not all(math.isfinite(m) for m in self.mean):
            raise fail("data.mean", self.mean, "finite numbers")
        if self.std is not None and not all(math.isfinite(s) and s > 0 for s in self.std):
            raise fail("data.std", self.std, "positive finite numbers")


@dataclass(frozen=True)
class TrainParams:
    """Shared by `baseline` and `finetune`: SGD with momentum, cosine learning-rate decay."""

    epochs: int = 10
    """passes over the training split; allowed: an integer >= 0"""
    batch_size: int = 64
    """images per SGD step; allowed: an integer > 0"""
    lr: float = 0.05
    """initial learning rate (cosine decay); allowed: a number > 0"""
    momentum: float = 0.9
    """SGD momentum; allowed: a number in [0, 1)"""
    weight_decay: float = 5e-4
    """L2 weight decay; allowed: a number in [0, 1]"""

    def validate(self, section: str) -> None:
        if self.epochs < 0:
            raise fail(f"{section}.epochs", self.epochs, "an integer >= 0")
        check_positive(f"{section}.batch_size", self.batch_size)
        check_positive(f"{section}.lr", self.lr)
        check_range(f"{section}.momentum", self.momentum, 0.0, 1.0, hi_open=True)
        check_range(f"{section}.weight_decay", self.weight_decay, 0.0, 1.0)


@dataclass(frozen=True)
class CalibrateParams:
    # Not `size`: DVC's run-cache key drops every param named `size` or `nfiles`.
    samples: int = 256
    """calibration images drawn (seeded) from the training split; allowed: an integer in [1,
    1000000]"""
    batch_size: int = 256
    """images per forward pass on the calibration set (reference logits, BatchNorm recalibration,
    repair); allowed: an integer > 0"""
    source: str = "data"
    """data | synthetic (standard-normal inputs: zero-data calibration)"""

    def validate(self) -> None:
        from pipeline.nn.data import CALIBRATION_SOURCES

        check_choice("calibrate.source", self.source, CALIBRATION_SOURCES)
        check_range("calibrate.samples", self.samples, 1, MAX_SAMPLES)
        check_positive("calibrate.batch_size", self.batch_size)


@dataclass(frozen=True)
class ProfileParams:
    levels: int = 41
    """sparsity grid points per layer: 0, 1/(levels-1), ..., 1; allowed: an integer in [2, 10001]"""
    batch_size: int = 32
    """calibration images per pass (small batches stay in CPU caches); allowed: an integer > 0"""
    threads: int = 1
    """torch threads per profiling task (fixed: identical tables on every backend); allowed: an
    integer > 0"""
    engine: str = "fast"
    """fast: recompute only what the pruned layer changes | naive: full forward per level"""
    memory_mb: int = 64
    """bound on one batched multi-level pass of the fast engine (raise on a GPU); allowed: an
    integer > 0"""
    bn_correction: bool = True
    """per level, correct the consuming BatchNorm's statistics by prune.bn_recalibration_mode
    (curves match the prune stage)"""
    reconstruct: bool = True
    """per level, repair the layer as prune.reconstruct will (with its damping): rd allocates for
    the repaired network"""
    precision: str = "fp32"
    """fp32 (exact) | tf32 (CUDA tensor cores) | bf16 (CUDA, or a CPU with native bf16): what the
    per-level passes run in; sums stay float64 (docs/performance.md#precision)"""

    def validate(self) -> None:
        from pipeline.nn.device import PRECISIONS
        from pipeline.profiling.distortion import ENGINES

        check_choice("profile.engine", self.engine, ENGINES)
        check_choice("profile.precision", self.precision, PRECISIONS)
        check_positive("profile.memory_mb", self.memory_mb)
        if not 2 <= self.levels <= MAX_LEVELS:
            raise fail(
                "profile.levels", self.levels, f"an integer in [2, {MAX_LEVELS}] (grid 0, ..., 1)"
            )
        check_positive("profile.batch_size", self.batch_size)
        check_positive("profile.threads", self.threads)


BUDGETS = ("params", "flops", "both")


PARETO_RATIOS = [round(0.05 * i, 2) for i in range(1, 20)] + [0.97, 0.99]


@dataclass(frozen=True)
class AllocateParams:
    method: str = "rd"
    """rd (exact rate-distortion DP, Xu et al.) | uniform | global | lamp | erk | uniform_plus"""
    distortion: str = "mean"
    """mean | max: which profiled curve rd minimises"""
    budget: str = "params"
    """params | flops | both: what prune.ratio removes (weights / MACs)"""
    flops_ratio: float | None = None
    """budget `both` only: fraction of MACs removed (prune.ratio: of weights); allowed: null, or
    with budget both a number in [0, 1)"""
    limits: dict[str, list[float]] = field(default_factory=dict)
    """glob -> [min, max] sparsity, e.g. {"conv1": [0, 0], "fc": [0, 0.8]}"""
    exclude: list[str] = field(default_factory=list)
    """globs of layers kept dense, e.g. ["conv1"]"""
    pareto_ratios: list[float] = field(default_factory=lambda: list(PARETO_RATIOS))
    """prune.ratio values of the Pareto sweep the allocate stage plots (plots/pareto.csv); allowed:
    a non-empty list of numbers in [0, 1)"""
    steps: int = 1
    """progressive: reach prune.ratio in k steps, re-profiling between them (1: one-shot); allowed:
    an integer >= 1"""
    candidates: list[str] = field(default_factory=list)
    """methods whose allocations compete with `method` by measured joint distortion (after the prune
    stage's repair / BN recalibration on the calibration set; with repair one repair per
    candidate)"""
    refine: str | None = None
    """null | mse | ce | kl: refine rd's DP optimum by measured pairwise exchanges of grid steps
    between layers (beyond the paper; docs/methods.md#refinement)"""
    refine_evals: int = 100
    """most measured evaluations (masked forward passes with BN recalibration) of the refinement;
    allowed: an integer >= 1"""
    refine_rounds: int = 2
    """first, re-solve the DP on curves rescaled per layer to their measured effect in context (one
    probe per layer each); allowed: an integer >= 0"""
    refine_holdout: float = 0.5
    """share of the calibration set held out: a move must lower the objective on the rest and not
    raise it here; allowed: a number in (0, 1)"""

    def validate(self) -> None:
        from pipeline.allocation.methods import ALLOCATORS

        check_choice("allocate.method", self.method, ALLOCATORS)
        check_choice("allocate.distortion", self.distortion, DISTORTION_KINDS)
        check_choice("allocate.budget", self.budget, BUDGETS)
        if self.steps < 1:
            raise fail("allocate.steps", self.steps, "an integer >= 1 (1: one-shot)")
        for i, name in enumerate(self.candidates):
            check_choice(f"allocate.candidates[{i}]", name, ALLOCATORS)
        if self.candidates and self.steps > 1:
            raise fail("allocate.candidates", self.candidates, "[] when allocate.steps > 1")
        self._validate_refine()
        if (self.budget == "both") != (self.flops_ratio is not None):
            raise fail(
                "allocate.flops_ratio", self.flops_ratio, "a ratio with budget 'both', else null"
            )
        if self.flops_ratio is not None:
            check_range("allocate.flops_ratio", self.flops_ratio, 0.0, 1.0, hi_open=True)
        if not self.pareto_ratios:
            raise fail("allocate.pareto_ratios", self.pareto_ratios, "a non-empty list of ratios")
        for i, r in enumerate(self.pareto_ratios):
            check_range(f"allocate.pareto_ratios[{i}]", r, 0.0, 1.0, hi_open=True)

    def _validate_refine(self) -> None:
        from pipeline.allocation.refine import OBJECTIVES

        # checked even while refine is null: a wrong value would surface only when it is on
        if self.refine_evals < 1:
            raise fail("allocate.refine_evals", self.refine_evals, "an integer >= 1")
        if self.refine_rounds < 0:
            raise fail("allocate.refine_rounds", self.refine_rounds, "an integer >= 0")
        if not 0 < self.refine_holdout < 1:
            raise fail("allocate.refine_holdout", self.refine_holdout, "a number in (0, 1)")
        if self.refine is None:
            return
        check_choice("allocate.refine", self.refine, OBJECTIVES)
        if self.method != "rd" or self.steps != 1 or self.candidates:
            raise fail(
                "allocate.refine",
                self.refine,
                "null unless allocate.method is 'rd', allocate.steps 1 and allocate.candidates []",
            )

    def targets(self, ratio: float) -> dict[str, float]:
        """measure -> ratio removed, the first being the one prune.ratio sets."""
        if self.budget == "both":
            return {"params": ratio, "flops": float(self.flops_ratio)}
        return {self.budget: ratio}


@dataclass(frozen=True)
class PruneParams:
    ratio: float = 0.8
    """fraction of prunable weights (budget params/both) or MACs (flops) removed, in [0, 1)"""
    # training images to re-estimate BatchNorm statistics on; 0: off. With reconstruct, the
    # statistics are set during the repair, on its images: this only switches that on or off.
    bn_recalibration: int = 512
    """training images to re-estimate BatchNorm statistics on after masking; 0: off (with
    prune.reconstruct they are set during the repair, on its images: this only switches that);
    allowed: an integer >= 0"""
    bn_recalibration_mode: str = "relative"
    """relative: correct only the shift pruning causes against the dense model on the same images |
    absolute: re-estimate from scratch"""
    reconstruct: str | None = "output"
    """null (the paper's plain masks) | output: re-solve each layer's kept weights to match the
    dense network's layer output | layerwise: to the dense weights on the pruned input
    (SparseGPT/OBC form)"""
    reconstruct_samples: int = 1024
    """training images the repair fits each layer on (seeded, evaluation transforms); allowed: an
    integer >= 1"""
    reconstruct_damping: float = 0.01
    """ridge pulling the re-solved weights toward the dense ones, x the mean diagonal of the layer's
    input Gram matrix; allowed: a number >= 0"""

    def validate(self) -> None:
        from pipeline.pruning.batchnorm import BN_RULES
        from pipeline.pruning.repair import OBJECTIVES

        check_range("prune.ratio", self.ratio, 0.0, 1.0, hi_open=True)
        check_choice("prune.bn_recalibration_mode", self.bn_recalibration_mode, BN_RULES)
        if self.bn_recalibration < 0:
            raise fail("prune.bn_recalibration", self.bn_recalibration, "an integer >= 0 (0: off)")
        if self.reconstruct is not None:
            check_choice("prune.reconstruct", self.reconstruct, OBJECTIVES)
        if self.reconstruct_samples < 1:
            raise fail("prune.reconstruct_samples", self.reconstruct_samples, "an integer >= 1")
        if not (math.isfinite(self.reconstruct_damping) and self.reconstruct_damping >= 0):
            raise fail(
                "prune.reconstruct_damping", self.reconstruct_damping, "a finite number >= 0"
            )

    @property
    def bn_rule(self) -> str | None:
        """The ``BN_RULES`` name the prune stage recalibrates BatchNorm by; None: it does not."""
        return self.bn_recalibration_mode if self.bn_recalibration else None


@dataclass(frozen=True)
class ScheduleParams:
    """Iterative pruning (pipeline/pruning/schedule.py): round k reaches 1 - (1 - amount)^k."""

    rounds: int = 0
    """0: one-shot only; N: N rounds of re-profile, allocate (masks only grow), prune, retrain;
    allowed: an integer >= 0"""
    amount: float = 0.2
    """fraction of the remaining weights (MACs with allocate.budget flops) removed per round;
    allowed: a number in (0, 1)"""
    epochs: int = 2
    """masked retraining epochs per round (finetune's batch_size, lr, momentum, weight_decay);
    allowed: an integer >= 0"""

    def validate(self) -> None:
        if self.rounds < 0:
            raise fail("schedule.rounds", self.rounds, "a whole number >= 0 (0: one-shot)")
        if not 0 < self.amount < 1:
            raise fail("schedule.amount", self.amount, "a fraction in (0, 1)")
        if self.epochs < 0:
            raise fail("schedule.epochs", self.epochs, "an integer >= 0")
