"""The whole params file: ``Params`` (the sections of ``sections`` and ``runtime`` with the
top-level keys and the rules that span sections), and loading it from a parsed mapping.

``load_params(mapping)`` turns the parsed YAML mapping into ``Params`` or raises a
``PipelineError`` whose one line names the offending key and what is allowed. Names that pick
an implementation (model, dataset, allocation method, backend) are checked against the
registries that hold them, so the message lists exactly the names that work.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.config.checks import fail
from pipeline.config.runtime import ExportParams, RayParams, TrackParams
from pipeline.config.sections import (
    AllocateParams,
    CalibrateParams,
    DataParams,
    ModelParams,
    ProfileParams,
    PruneParams,
    ScheduleParams,
    TrainParams,
)
from pipeline.errors import PipelineError


@dataclass(frozen=True)
class Params:
    seed: int = 0
    """training init/shuffling and calibration sampling; allowed: an integer in [0, 2**32 - 1]"""
    device: str = "auto"
    """auto (a CUDA GPU if there is one, else the CPU) | cpu | cuda | cuda:N; every stage runs the
    model there"""
    model: ModelParams = field(default_factory=ModelParams)
    """the network to prune"""
    data: DataParams = field(default_factory=DataParams)
    """the dataset: training images for calibration, repair and fine-tuning, test images for
    accuracy"""
    baseline: TrainParams = field(default_factory=lambda: TrainParams(epochs=30))
    """dense training when model.checkpoint is null"""
    calibrate: CalibrateParams = field(default_factory=CalibrateParams)
    """the calibration set the curves and the prune stage measure distortion on"""
    profile: ProfileParams = field(default_factory=ProfileParams)
    """per-layer rate-distortion curves: each layer alone pruned to each sparsity of a grid"""
    allocate: AllocateParams = field(default_factory=AllocateParams)
    """per-layer sparsities under the network-level budget"""
    prune: PruneParams = field(default_factory=PruneParams)
    """masks, BatchNorm after masking and the repair of the kept weights"""
    finetune: TrainParams = field(default_factory=lambda: TrainParams(epochs=10, lr=0.01))
    """masked fine-tuning of the pruned model"""
    schedule: ScheduleParams = field(default_factory=ScheduleParams)
    """iterative pruning (docs/methods.md#iterative-schedule): round k reaches sparsity 1 - (1 -
    amount)^k"""
    ray: RayParams = field(default_factory=RayParams)
    """where profiling runs (docs/clusters.md)"""
    export: ExportParams = field(default_factory=ExportParams)
    """the final model (finetune's, or the schedule's last round) for use elsewhere"""
    track: TrackParams = field(default_factory=TrackParams)
    """the MLflow store the track stage logs each result to"""

    def validate(self) -> None:
        from pipeline.nn.device import check_device_name

        check_device_name(self.device)
        if not 0 <= self.seed < 2**32:  # what numpy's and torch's generators both take
            raise fail("seed", self.seed, "an integer in [0, 2**32 - 1]")
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if isinstance(section, TrainParams):
                section.validate(f.name)
            elif dataclasses.is_dataclass(section):
                section.validate()
        if self.profile.bn_correction and self.prune.bn_rule is None:
            raise fail(
                "profile.bn_correction",
                True,
                "false when prune.bn_recalibration is 0 (the curves model the prune stage's "
                "BatchNorm recalibration)",
            )

        if self.profile.reconstruct and self.prune.reconstruct is None:
            raise fail(
                "profile.reconstruct",
                True,
                "false when prune.reconstruct is null (the curves model the prune stage's repair)",
            )
        if self.allocate.refine is not None and self.prune.reconstruct is not None:
            raise fail(
                "allocate.refine",
                self.allocate.refine,
                "null when prune.reconstruct is set (its measured moves do not repair)",
            )
        if self.schedule.rounds:
            self._check_schedule()

    def _check_schedule(self) -> None:
        """What an iterative schedule cannot do (one clear error each)."""
        if self.allocate.budget == "both":
            raise fail(
                "allocate.budget",
                "both",
                "params or flops when schedule.rounds > 0 (a round "
                "removes schedule.amount of one measure)",
            )
        if self.allocate.steps != 1:
            raise fail("allocate.steps", self.allocate.steps, "1 when schedule.rounds > 0")
        if self.allocate.refine is not None:  # one-shot only: a round would ignore it
            raise fail("allocate.refine", self.allocate.refine, "null when schedule.rounds > 0")

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
            raise fail(key, value, f"a list of {getattr(item, '__name__', item)}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        _, item = typing.get_args(hint)
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise fail(key, value, "a mapping from names to values")
        return {k: _coerce(f"{key}[{k!r}]", v, item) for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise fail(key, value, f"a value of type {hint.__name__}")
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
                raise fail(key, sub, "a mapping of params")
            values[name] = _build(type(default), sub, f"{key}.", default)
        else:
            values[name] = _coerce(key, mapping[name], hints[name])
    return cls(**values)


def load_params(mapping: Mapping[str, Any] | None) -> Params:
    """Validate a parsed params.yaml mapping; missing keys take the documented defaults."""
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, Mapping):
        raise PipelineError(
            "params.yaml must hold a mapping of sections; see docs/reference/params.md"
        )
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
