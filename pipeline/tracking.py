"""Experiment tracking: the only module that imports mlflow (imported lazily: it costs ~3 s).

One MLflow run per pipeline result. The store defaults to ``sqlite:///<project root>/mlflow.db``
given as an absolute URI, where the project root is found even from inside a DVC queued
experiment's temporary copy (``<root>/.dvc/tmp/exps/...``), so every experiment logs into the
same store.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any


def project_root(cwd: Path) -> Path:
    """The DVC project the command runs for; a queued experiment's copy maps to its origin."""
    cwd = Path(cwd).resolve()
    parts = cwd.parts
    for i in range(len(parts) - 3):
        if parts[i : i + 4] == (".dvc", "tmp", "exps", parts[i + 3]) and i > 0:
            return Path(*parts[:i])
    return cwd


def resolve_tracking_uri(configured: str | None, cwd: Path) -> str:
    """``mlflow.tracking_uri`` param, else $MLFLOW_TRACKING_URI, else the project's sqlite file."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{project_root(cwd) / 'mlflow.db'}"


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Serialise first use of a sqlite store: concurrent schema migrations crash."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    lock_path = Path(uri.removeprefix("sqlite:///") + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _artifact_location(uri: str) -> str | None:
    """Artifacts of a sqlite store live beside it (``mlartifacts/``), not under the working
    directory, which for a queued DVC experiment is a temporary copy."""
    if not uri.startswith("sqlite:///"):
        return None  # a server or other store decides
    return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()


def log_pipeline_run(
    *,
    tracking_uri: str,
    experiment: str,
    run_name: str,
    params: Mapping[str, Any],
    metrics: Mapping[str, float],
    steps: Mapping[str, Sequence[tuple[int, float]]],
    tables: Mapping[str, Mapping[str, list[Any]]],
    figures: Mapping[str, Any],
    artifacts: Sequence[Path],
    tags: Mapping[str, str],
) -> str:
    """Log one run and return its id.

    params: dotted params.yaml keys; metrics: final values; steps: metric -> [(step, value)];
    tables: artifact file -> column dict (shown in the UI's table view); figures: artifact file
    -> matplotlib figure; artifacts: files copied as they are.
    """
    import mlflow
    from mlflow.entities import Metric, Param

    mlflow.set_tracking_uri(tracking_uri)
    with _store_lock(tracking_uri):
        if mlflow.get_experiment_by_name(experiment) is None:
            mlflow.create_experiment(experiment, artifact_location=_artifact_location(tracking_uri))
        mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=run_name, tags=dict(tags)) as run:
        client = mlflow.MlflowClient()
        client.log_batch(
            run.info.run_id,
            params=[Param(k, str(v)) for k, v in params.items()],
            metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items()]
            + [Metric(k, float(v), 0, step) for k, series in steps.items() for step, v in series],
        )
        for name, table in tables.items():
            mlflow.log_table(data=dict(table), artifact_file=name)
        for name, figure in figures.items():
            mlflow.log_figure(figure, name)
        for path in artifacts:
            mlflow.log_artifact(str(path))
        return run.info.run_id
