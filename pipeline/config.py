"""Typed, validated params: one frozen dataclass per params.yaml section.

``load_params(mapping)`` turns the parsed YAML mapping into ``Params`` or raises a
``PipelineError`` whose one line names the offending key and what is allowed. Names that pick
an implementation (model, dataset, allocation method, backend) are checked against the
registries that hold them, so the message lists exactly the names that work.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import PipelineError

# Beyond these a value is a typo, and would exhaust memory before anything says so
MAX_IMAGE_SIZE = 4096  # pixels a side
MAX_SAMPLES = 1_000_000  # calibration images
MAX_LEVELS = 10_001  # grid points per layer
DISTORTION_KINDS = ("mean", "max")  # per-sample mean / worst-case curves (see distortion.py)


def _fail(key: str, value: Any, allowed: str) -> PipelineError:
    return PipelineError(f"{key} = {value!r} is not allowed; allowed: {allowed}")


def _check_choice(key: str, value: str, choices: Collection[str]) -> None:
    if value not in choices:
        raise _fail(key, value, ", ".join(sorted(choices)))


def _check_range(key: str, value: float, lo: float, hi: float, *, hi_open: bool = False) -> None:
    ok = math.isfinite(value) and lo <= value and (value < hi if hi_open else value <= hi)
    if not ok:
        raise _fail(key, value, f"a number in [{lo}, {hi}{')' if hi_open else ']'}")


def _check_positive(key: str, value: int | float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise _fail(key, value, "a positive number")


@dataclass(frozen=True)
class ModelParams:
    arch: str = "digits_cnn"
    checkpoint: str | None = None  # null: the baseline stage trains the model itself

    def validate(self) -> None:
        from pipeline.models import resolve_model

        resolve_model(self.arch)


@dataclass(frozen=True)
class DataParams:
    name: str = "digits"
    root: str | None = None  # directory of on-disk datasets; unused by `digits`
    test_fraction: float = 0.2  # `digits` only: share of the 1,797 images held out for testing
    mean: list[float] | None = None  # per-channel normalisation; null: the dataset's default
    std: list[float] | None = None
    image_size: int | None = None  # null: images as they are; else resize + centre crop (ImageNet)

    def validate(self) -> None:
        from pipeline.data import DATASETS

        _check_choice("data.name", self.name, DATASETS)
        _check_range("data.test_fraction", self.test_fraction, 0.05, 0.5)
        if (self.mean is None) != (self.std is None):
            raise _fail("data.mean/data.std", (self.mean, self.std), "both null or both lists")
        if self.mean is not None and (not self.mean or len(self.mean) != len(self.std or [])):
            raise _fail(
                "data.mean/data.std", (self.mean, self.std), "lists of one value per channel"
            )
        if self.image_size is not None:
            _check_range("data.image_size", self.image_size, 1, MAX_IMAGE_SIZE)
            if self.name == "digits":  # its 8x8 arrays are never resized
                raise _fail("data.image_size", self.image_size, "null with data.name 'digits'")
        if self.mean is not None and not all(math.isfinite(m) for m in self.mean):
            raise _fail("data.mean", self.mean, "finite numbers")
        if self.std is not None and not all(math.isfinite(s) and s > 0 for s in self.std):
            raise _fail("data.std", self.std, "positive finite numbers")


@dataclass(frozen=True)
class TrainParams:
    """Shared by `baseline` and `finetune`: SGD with momentum, cosine learning-rate decay."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4

    def validate(self, section: str) -> None:
        if self.epochs < 0:
            raise _fail(f"{section}.epochs", self.epochs, "an integer >= 0")
        _check_positive(f"{section}.batch_size", self.batch_size)
        _check_positive(f"{section}.lr", self.lr)
        _check_range(f"{section}.momentum", self.momentum, 0.0, 1.0, hi_open=True)
        _check_range(f"{section}.weight_decay", self.weight_decay, 0.0, 1.0)


@dataclass(frozen=True)
class CalibrateParams:
    # Not `size`: DVC's run-cache key drops every param named `size` or `nfiles`.
    samples: int = 256  # calibration images drawn (seeded) from the training split
    batch_size: int = 256
    source: str = "data"  # data: training images; synthetic: standard-normal inputs (zero-data)

    def validate(self) -> None:
        from pipeline.data import CALIBRATION_SOURCES

        _check_choice("calibrate.source", self.source, CALIBRATION_SOURCES)
        _check_range("calibrate.samples", self.samples, 1, MAX_SAMPLES)
        _check_positive("calibrate.batch_size", self.batch_size)


@dataclass(frozen=True)
class ProfileParams:
    levels: int = 41  # grid points 0, 1/(levels-1), ..., 1
    batch_size: int = 32  # calibration images per pass; small batches stay in CPU caches
    threads: int = 1  # torch threads per profiling task; fixed so every backend gives equal bytes
    engine: str = "fast"  # fast: suffix-only recomputation; naive: a full forward per level
    memory_mb: int = 64  # bound on one batched multi-level pass of the fast engine (GPU: raise)
    bn_correction: bool = True  # per level, set the consuming BatchNorm by the prune stage's rule
    reconstruct: bool = True  # per level, repair the layer as prune.reconstruct will (its damping)
    precision: str = "fp32"  # fp32 (exact) | tf32 (CUDA) | bf16: what the per-level passes run in

    def validate(self) -> None:
        from pipeline.device import PRECISIONS
        from pipeline.distortion import ENGINES

        _check_choice("profile.engine", self.engine, ENGINES)
        _check_choice("profile.precision", self.precision, PRECISIONS)
        _check_positive("profile.memory_mb", self.memory_mb)
        if not 2 <= self.levels <= MAX_LEVELS:
            raise _fail(
                "profile.levels", self.levels, f"an integer in [2, {MAX_LEVELS}] (grid 0, ..., 1)"
            )
        _check_positive("profile.batch_size", self.batch_size)
        _check_positive("profile.threads", self.threads)


BUDGETS = ("params", "flops", "both")
PARETO_RATIOS = [round(0.05 * i, 2) for i in range(1, 20)] + [0.97, 0.99]


@dataclass(frozen=True)
class AllocateParams:
    method: str = "rd"
    distortion: str = "mean"  # which profiled curve the solver minimises
    budget: str = "params"  # what prune.ratio removes: weights, MACs, or both (see flops_ratio)
    flops_ratio: float | None = None  # budget `both`: the fraction of MACs removed
    limits: dict[str, list[float]] = field(default_factory=dict)  # glob -> [min, max] sparsity
    exclude: list[str] = field(default_factory=list)  # globs of layers kept dense
    pareto_ratios: list[float] = field(default_factory=lambda: list(PARETO_RATIOS))
    steps: int = 1  # progressive allocation: reach the ratio in k re-profiled steps (1: one-shot)
    candidates: list[str] = field(default_factory=list)  # methods competing by measured distortion
    refine: str | None = None  # null | a refine.OBJECTIVES name: measured exchanges from rd's DP
    refine_evals: int = 100  # most measured evaluations of the refinement
    refine_rounds: int = 2  # re-solves on curves rescaled to measured in-context effects
    refine_holdout: float = 0.5  # share of the calibration set a move must not worsen

    def validate(self) -> None:
        from pipeline.allocation import ALLOCATORS

        _check_choice("allocate.method", self.method, ALLOCATORS)
        _check_choice("allocate.distortion", self.distortion, DISTORTION_KINDS)
        _check_choice("allocate.budget", self.budget, BUDGETS)
        if self.steps < 1:
            raise _fail("allocate.steps", self.steps, "an integer >= 1 (1: one-shot)")
        for i, name in enumerate(self.candidates):
            _check_choice(f"allocate.candidates[{i}]", name, ALLOCATORS)
        if self.candidates and self.steps > 1:
            raise _fail("allocate.candidates", self.candidates, "[] when allocate.steps > 1")
        self._validate_refine()
        if (self.budget == "both") != (self.flops_ratio is not None):
            raise _fail(
                "allocate.flops_ratio", self.flops_ratio, "a ratio with budget 'both', else null"
            )
        if self.flops_ratio is not None:
            _check_range("allocate.flops_ratio", self.flops_ratio, 0.0, 1.0, hi_open=True)
        if not self.pareto_ratios:
            raise _fail("allocate.pareto_ratios", self.pareto_ratios, "a non-empty list of ratios")
        for i, r in enumerate(self.pareto_ratios):
            _check_range(f"allocate.pareto_ratios[{i}]", r, 0.0, 1.0, hi_open=True)

    def _validate_refine(self) -> None:
        from pipeline.refine import OBJECTIVES

        # checked even while refine is null: a wrong value would surface only when it is on
        if self.refine_evals < 1:
            raise _fail("allocate.refine_evals", self.refine_evals, "an integer >= 1")
        if self.refine_rounds < 0:
            raise _fail("allocate.refine_rounds", self.refine_rounds, "an integer >= 0")
        if not 0 < self.refine_holdout < 1:
            raise _fail("allocate.refine_holdout", self.refine_holdout, "a number in (0, 1)")
        if self.refine is None:
            return
        _check_choice("allocate.refine", self.refine, OBJECTIVES)
        if self.method != "rd" or self.steps != 1 or self.candidates:
            raise _fail(
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
    ratio: float = 0.8  # fraction of all prunable weights removed
    # training images to re-estimate BatchNorm statistics on; 0: off. With reconstruct, the
    # statistics are set during the repair, on its images: this only switches that on or off.
    bn_recalibration: int = 512
    bn_recalibration_mode: str = "relative"  # BN_RULES: relative (to the dense model) | absolute
    reconstruct: str | None = "output"  # null | repair.OBJECTIVES: re-solve the kept weights
    reconstruct_samples: int = 1024  # training images the repair fits each layer on
    reconstruct_damping: float = 0.01  # ridge toward the dense weights, x mean Gram diagonal

    def validate(self) -> None:
        from pipeline.batchnorm import BN_RULES
        from pipeline.repair import OBJECTIVES

        _check_range("prune.ratio", self.ratio, 0.0, 1.0, hi_open=True)
        _check_choice("prune.bn_recalibration_mode", self.bn_recalibration_mode, BN_RULES)
        if self.bn_recalibration < 0:
            raise _fail("prune.bn_recalibration", self.bn_recalibration, "an integer >= 0 (0: off)")
        if self.reconstruct is not None:
            _check_choice("prune.reconstruct", self.reconstruct, OBJECTIVES)
        if self.reconstruct_samples < 1:
            raise _fail("prune.reconstruct_samples", self.reconstruct_samples, "an integer >= 1")
        if not (math.isfinite(self.reconstruct_damping) and self.reconstruct_damping >= 0):
            raise _fail(
                "prune.reconstruct_damping", self.reconstruct_damping, "a finite number >= 0"
            )

    @property
    def bn_rule(self) -> str | None:
        """The ``BN_RULES`` name the prune stage recalibrates BatchNorm by; None: it does not."""
        return self.bn_recalibration_mode if self.bn_recalibration else None


@dataclass(frozen=True)
class ScheduleParams:
    """Iterative pruning (pipeline/schedule.py): round k reaches 1 - (1 - amount)^k."""

    rounds: int = 0  # 0: one-shot only (the prune and finetune stages)
    amount: float = 0.2  # fraction of the remaining weights (MACs with budget flops) per round
    epochs: int = 2  # masked retraining epochs per round (finetune's lr, batch, momentum, decay)

    def validate(self) -> None:
        if self.rounds < 0:
            raise _fail("schedule.rounds", self.rounds, "a whole number >= 0 (0: one-shot)")
        if not 0 < self.amount < 1:
            raise _fail("schedule.amount", self.amount, "a fraction in (0, 1)")
        if self.epochs < 0:
            raise _fail("schedule.epochs", self.epochs, "an integer >= 0")


@dataclass(frozen=True)
class RayParams:
    backend: str = "ray"
    address: str | None = None  # null: private local instance (or $RAY_ADDRESS); else a cluster
    num_cpus: int | None = None  # local instance only; null: all cores
    cpus_per_task: float = 1.0  # CPUs Ray reserves for each profiling task
    gpus_per_task: float | None = None  # null: 1 when the cluster has GPUs, else 0; 0.25: 4 share
    max_retries: int = 3  # re-runs of a task whose worker process or node died
    work_units: int = 16  # the profile is cut into about this many units (>= one per layer)

    def validate(self) -> None:
        from pipeline.parallel import BACKENDS, parse_address

        _check_choice("ray.backend", self.backend, BACKENDS)
        if self.address is not None:
            parse_address(self.address)
        if self.num_cpus is not None:
            _check_positive("ray.num_cpus", self.num_cpus)
            if self.address is not None:
                raise _fail(
                    "ray.num_cpus",
                    self.num_cpus,
                    "null when ray.address is set (a cluster's nodes declare their own CPUs)",
                )
        _check_positive("ray.cpus_per_task", self.cpus_per_task)
        g = self.gpus_per_task
        if g is not None and not (
            math.isfinite(g) and (0 <= g <= 1 or (g > 1 and float(g).is_integer()))
        ):
            raise _fail(
                "ray.gpus_per_task", g, "null, a fraction in [0, 1] or a whole number of GPUs"
            )
        if self.max_retries < 0:
            raise _fail("ray.max_retries", self.max_retries, "an integer >= 0")
        if self.work_units < 1:
            raise _fail("ray.work_units", self.work_units, "an integer >= 1")


@dataclass(frozen=True)
class TrackParams:
    """The MLflow store the `track` stage logs each pipeline result to."""

    tracking_uri: str | None = None  # null: $MLFLOW_TRACKING_URI, else sqlite at the project root
    experiment: str = "rdprune"
    registered_model: str | None = None  # null: log the model only | a registry name: a version

    def validate(self) -> None:
        if not self.experiment:
            raise _fail("track.experiment", self.experiment, "a non-empty name")
        if self.registered_model is not None and not (
            isinstance(self.registered_model, str) and self.registered_model.strip()
        ):
            raise _fail("track.registered_model", self.registered_model, "null or a name")


EXPORT_DTYPES = ("float16", "bfloat16")


@dataclass(frozen=True)
class ExportParams:
    """What the `export` stage writes from the final model."""

    dtype: str | None = None  # null: values as trained (exact round trip) | float16 | bfloat16
    onnx: bool = True  # also model.onnx, checked against PyTorch with onnxruntime

    def validate(self) -> None:
        if self.dtype is not None:
            _check_choice("export.dtype", self.dtype, EXPORT_DTYPES)
        if not isinstance(self.onnx, bool):
            raise _fail("export.onnx", self.onnx, "true or false")


@dataclass(frozen=True)
class Params:
    seed: int = 0
    device: str = "auto"  # auto (a CUDA GPU if any, else CPU) | cpu | cuda | cuda:N
    model: ModelParams = field(default_factory=ModelParams)
    data: DataParams = field(default_factory=DataParams)
    baseline: TrainParams = field(default_factory=lambda: TrainParams(epochs=30))
    calibrate: CalibrateParams = field(default_factory=CalibrateParams)
    profile: ProfileParams = field(default_factory=ProfileParams)
    allocate: AllocateParams = field(default_factory=AllocateParams)
    prune: PruneParams = field(default_factory=PruneParams)
    finetune: TrainParams = field(default_factory=lambda: TrainParams(epochs=10, lr=0.01))
    schedule: ScheduleParams = field(default_factory=ScheduleParams)
    ray: RayParams = field(default_factory=RayParams)
    export: ExportParams = field(default_factory=ExportParams)
    track: TrackParams = field(default_factory=TrackParams)

    def validate(self) -> None:
        from pipeline.device import check_device_name

        check_device_name(self.device)
        if not 0 <= self.seed < 2**32:  # what numpy's and torch's generators both take
            raise _fail("seed", self.seed, "an integer in [0, 2**32 - 1]")
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if isinstance(section, TrainParams):
                section.validate(f.name)
            elif dataclasses.is_dataclass(section):
                section.validate()
        if self.profile.bn_correction and self.prune.bn_rule is None:
            raise _fail(
                "profile.bn_correction",
                True,
                "false when prune.bn_recalibration is 0 (the curves model the prune stage's "
                "BatchNorm recalibration)",
            )

        if self.profile.reconstruct and self.prune.reconstruct is None:
            raise _fail(
                "profile.reconstruct",
                True,
                "false when prune.reconstruct is null (the curves model the prune stage's repair)",
            )
        if self.allocate.refine is not None and self.prune.reconstruct is not None:
            raise _fail(
                "allocate.refine",
                self.allocate.refine,
                "null when prune.reconstruct is set (its measured moves do not repair)",
            )
        if self.schedule.rounds:
            self._check_schedule()

    def _check_schedule(self) -> None:
        """What an iterative schedule cannot do (one clear error each)."""
        if self.allocate.budget == "both":
            raise _fail(
                "allocate.budget",
                "both",
                "params or flops when schedule.rounds > 0 (a round "
                "removes schedule.amount of one measure)",
            )
        if self.allocate.steps != 1:
            raise _fail("allocate.steps", self.allocate.steps, "1 when schedule.rounds > 0")
        if self.allocate.refine is not None:  # one-shot only: a round would ignore it
            raise _fail("allocate.refine", self.allocate.refine, "null when schedule.rounds > 0")

    @property
    def retrain(self) -> TrainParams:
        """The schedule's per-round retraining: finetune's recipe for ``schedule.epochs``."""
        return dataclasses.replace(self.finetune, epochs=self.schedule.epochs)

    @property
    def curve_bn_rule(self) -> str | None:
        """The ``BN_RULES`` name the profiled curves correct the consuming BatchNorm by."""
        return self.prune.bn_rule if self.profile.bn_correction else None

    @property
    def curve_repair(self) -> float | None:
        """The damping of the repair the profiled curves apply per level; None: none."""
        return self.prune.reconstruct_damping if self.profile.reconstruct else None


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against a field's type hint; ints are accepted where floats are."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise _fail(key, value, f"a list of {getattr(item, '__name__', item)}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        _, item = typing.get_args(hint)
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise _fail(key, value, "a mapping from names to values")
        return {k: _coerce(f"{key}[{k!r}]", v, item) for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise _fail(key, value, f"a value of type {hint.__name__}")
    return value


def _build(cls: type, mapping: Mapping[str, Any], prefix: str, defaults: Any) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(mapping) - set(names))
    if unknown:
        where = f"section {prefix.rstrip('.')}" if prefix else "params.yaml"
        raise PipelineError(
            f"unknown param {prefix}{unknown[0]} in {where}; allowed: {', '.join(names)}"
        )
    values: dict[str, Any] = {}
    for name in names:
        key = f"{prefix}{name}"
        default = getattr(defaults, name)
        if name not in mapping:
            values[name] = default
        elif dataclasses.is_dataclass(default):
            sub = mapping[name]
            if not isinstance(sub, Mapping):
                raise _fail(key, sub, "a mapping of params")
            values[name] = _build(type(default), sub, f"{key}.", default)
        else:
            values[name] = _coerce(key, mapping[name], hints[name])
    return cls(**values)


def load_params(mapping: Mapping[str, Any] | None) -> Params:
    """Validate a parsed params.yaml mapping; missing keys take the documented defaults."""
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, Mapping):
        raise PipelineError("params.yaml must hold a mapping of sections; see README 'Params'")
    for key in param_keys(mapping):
        if key.rpartition(".")[2] in DVC_UNTRACKED_NAMES:
            raise PipelineError(
                f"param {key} has a name DVC's run-cache ignores; allowed: any name but "
                f"{', '.join(DVC_UNTRACKED_NAMES)}"
            )
    params = _build(Params, mapping, "", Params())
    params.validate()
    return params


def defaults() -> dict[str, Any]:
    """Every param under its params.yaml section with its default: the one home of defaults
    (params.yaml must equal it; tests check that)."""
    return dataclasses.asdict(Params())


# DVC's run-cache key drops params with these names at any depth (dvc/stage/cache.py), so a
# change to one would be restored from the cache as if it had not happened.
DVC_UNTRACKED_NAMES = ("size", "nfiles")


def param_keys(mapping: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Every dotted key of a nested params mapping, at every depth."""
    keys = []
    for name, value in mapping.items():
        keys.append(f"{prefix}{name}")
        if isinstance(value, Mapping):
            keys += param_keys(value, f"{prefix}{name}.")
    return keys


def flatten(params: Params) -> dict[str, Any]:
    """``{"prune.ratio": 0.8, ...}``: every param under its dotted params.yaml key."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        if dataclasses.is_dataclass(value):
            for k, v in dataclasses.asdict(value).items():
                out[f"{f.name}.{k}"] = v
        else:
            out[f.name] = value
    return out
