"""The params sections of where the pipeline runs and what it hands over: Ray, the export and
the MLflow store. Field docstrings as in ``sections``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.config.checks import check_choice, check_positive, fail


@dataclass(frozen=True)
class RayParams:
    backend: str = "ray"
    """ray | serial (in process, no Ray)"""
    address: str | None = None
    """null: private local Ray (or $RAY_ADDRESS if exported); "auto" / "host:port" /
    "ray://host:port": a cluster (docs/clusters.md)"""
    num_cpus: int | None = None
    """local instance only; null: all cores; allowed: null or an integer > 0"""
    cpus_per_task: float = 1.0
    """CPUs each profiling task reserves; allowed: a number > 0"""
    gpus_per_task: float | None = None
    """GPUs each task reserves (0.25: four tasks share a GPU); null: 1 if the cluster has GPUs, else
    0; allowed: null, a number in [0, 1] or a whole number of GPUs"""
    max_retries: int = 3
    """re-runs of a task whose worker process or node died; allowed: an integer >= 0"""
    work_units: int | None = None
    """the profile is cut into about this many units (a layer or a range of its levels); null:
    4 x the tasks that run at once (2 CPU cores: 8; 16 GPUs: 64); a number keeps GPU tables
    byte-identical across cluster sizes; allowed: null or an integer >= 1"""

    def validate(self) -> None:
        from pipeline.edges.parallel.cluster import parse_address
        from pipeline.edges.parallel.tasks import BACKENDS

        check_choice("ray.backend", self.backend, BACKENDS)
        if self.address is not None:
            parse_address(self.address)
        if self.num_cpus is not None:
            check_positive("ray.num_cpus", self.num_cpus)
            if self.address is not None:
                raise fail(
                    "ray.num_cpus",
                    self.num_cpus,
                    "null when ray.address is set (a cluster's nodes declare their own CPUs)",
                )
        check_positive("ray.cpus_per_task", self.cpus_per_task)
        g = self.gpus_per_task
        if g is not None and not (
            math.isfinite(g) and (0 <= g <= 1 or (g > 1 and float(g).is_integer()))
        ):
            raise fail(
                "ray.gpus_per_task", g, "null, a fraction in [0, 1] or a whole number of GPUs"
            )
        if self.max_retries < 0:
            raise fail("ray.max_retries", self.max_retries, "an integer >= 0")
        if self.work_units is not None and self.work_units < 1:
            raise fail("ray.work_units", self.work_units, "null or an integer >= 1")


@dataclass(frozen=True)
class TrackParams:
    """The MLflow store the `track` stage logs each pipeline result to."""

    tracking_uri: str | None = None
    """null: $MLFLOW_TRACKING_URI, else sqlite:///<project root>/mlflow.db"""
    experiment: str = "rdprune"
    """MLflow experiment the runs are logged to"""
    registered_model: str | None = None
    """null: the run holds the model (MLflow PyTorch flavor) | a name: also a new version in the
    model registry"""

    def validate(self) -> None:
        if not self.experiment:
            raise fail("track.experiment", self.experiment, "a non-empty name")
        if self.registered_model is not None and not (
            isinstance(self.registered_model, str) and self.registered_model.strip()
        ):
            raise fail("track.registered_model", self.registered_model, "null or a name")


EXPORT_DTYPES = ("float16", "bfloat16")


@dataclass(frozen=True)
class ExportParams:
    """What the `export` stage writes from the final model."""

    dtype: str | None = None
    """null: values as trained (the compact file restores the state_dict bit for bit) | float16 |
    bfloat16"""
    onnx: bool = True
    """also model.onnx (opset 18), its logits checked against PyTorch's on the test set with
    onnxruntime"""

    def validate(self) -> None:
        if self.dtype is not None:
            check_choice("export.dtype", self.dtype, EXPORT_DTYPES)
        if not isinstance(self.onnx, bool):
            raise fail("export.onnx", self.onnx, "true or false")
