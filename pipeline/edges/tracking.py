"""Experiment tracking: the only module that imports mlflow (imported lazily: it costs ~3 s).

One MLflow run per pipeline result, found again by a content hash of the result's outputs.
The store defaults to ``sqlite:///<project root>/mlflow.db`` given as an absolute URI, where the
project root is found even from inside a DVC queued experiment's temporary copy
(``<root>/.dvc/tmp/exps/...``), so every experiment logs into the same store.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
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


# MLflow 3's UI opens an experiment on its GenAI overview unless told it holds model training.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
RESULT_TAG = "rdprune.result"  # content hash of the outputs a run records (one run per result)
EXP_NAMES_TAG = "dvc.exp_names"  # comma-separated DVC experiments that produced the result


def check_store(uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds, before any expensive work, when the store cannot be used.

    sqlite: an absolute path whose directory exists or can be made, and can be written;
    http(s): the server answers its ``/health`` endpoint with ``OK``. Raises ``OSError`` with
    the reason. Other stores are tried by ``check_experiment``.
    """
    if uri.startswith("sqlite:///"):
        path = uri.removeprefix("sqlite:///")
        if not path.startswith("/"):  # a queued DVC experiment runs in a copy of the project
            raise OSError("a relative sqlite path depends on the working directory")
        folder = Path(path).parent
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        try:  # a real write: permission bits say nothing of /proc or read-only mounts
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as exc:
            raise OSError(f"cannot write in {existing} ({exc.strerror or exc})") from None
    elif uri.startswith(("http://", "https://")):
        import urllib.request

        url = uri.rstrip("/") + "/health"
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
            body = response.read(64).strip()
            if response.status != 200 or body != b"OK":
                raise OSError(f"{url} does not answer as an MLflow server")


def check_experiment(uri: str, experiment: str, timeout: float = 60.0) -> None:
    """The store answers an MLflow client within ``timeout`` seconds, and ``experiment`` is
    not deleted there. ``OSError``: the store; ``ValueError``: the experiment."""
    import threading

    outcome: list[BaseException | None] = []

    def ask() -> None:
        try:
            import mlflow

            with _store_lock(uri):  # a fresh sqlite store is created here, once
                found = mlflow.MlflowClient(tracking_uri=uri).get_experiment_by_name(experiment)
            if found is not None and found.lifecycle_stage == "deleted":
                outcome.append(ValueError(f"experiment {experiment!r} is deleted in {uri}"))
            else:
                outcome.append(None)
        except Exception as exc:  # any store's failure, in whatever type its client raises
            text = str(exc).strip().splitlines()
            outcome.append(OSError(f"{type(exc).__name__}: {text[0] if text else ''}"))

    worker = threading.Thread(target=ask, daemon=True)
    worker.start()
    worker.join(timeout)
    if not outcome:
        raise OSError(f"no answer within {timeout:g} s")
    if outcome[0] is not None:
        raise outcome[0]


def _experiment_id(client: Any, uri: str, experiment: str) -> str:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return client.create_experiment(
            experiment, artifact_location=_artifact_location(uri), tags=EXPERIMENT_KIND
        )
    if found.tags.get("mlflow.experimentKind") is None:  # made by an older version
        for key, value in EXPERIMENT_KIND.items():
            client.set_experiment_tag(found.experiment_id, key, value)
    return found.experiment_id


def _add_exp_name(client: Any, run: Any, exp_name: str) -> None:
    names = {n for n in run.data.tags.get(EXP_NAMES_TAG, "").split(",") if n}
    if exp_name and exp_name not in names:
        client.set_tag(run.info.run_id, EXP_NAMES_TAG, ",".join(sorted(names | {exp_name})))


@dataclass(frozen=True)
class ModelRecord:
    """A result's network for the run: logged as an MLflow PyTorch model in torch.export's
    format (signature and input example from ``example``; ``mlflow.pytorch.load_model`` gives
    the program's module, the network with its zeros, with no pickled code run and no need of
    this project), registered as a new version of ``registered_name`` when that is set."""

    model: Any  # torch.nn.Module
    example: Any  # (n, ...) torch.Tensor of inputs
    registered_name: str | None = None


@dataclass(frozen=True)
class RunRecord:
    """What one run holds. params: dotted params.yaml keys; metrics: final values; steps:
    metric -> [(step, value)]; tables: artifact file -> column dict (the UI's table view);
    artifacts: files copied as they are (figures as PNG); tags: extra run tags."""

    params: Mapping[str, Any]
    metrics: Mapping[str, float]
    steps: Mapping[str, Sequence[tuple[int, float]]]
    tables: Mapping[str, Mapping[str, list[Any]]]
    artifacts: Sequence[Path]
    tags: Mapping[str, str]
    children: Sequence[tuple[str, RunRecord]] = ()  # (run name, record): nested runs
    model: ModelRecord | None = None


def log_result(
    *, tracking_uri: str, experiment: str, key: str, exp_name: str, run_name: str, record: RunRecord
) -> tuple[str, str, bool]:
    """Find or create the one run of the result ``key``: (run id, experiment id, whether the
    run was created now).

    A finished run with this key gets ``exp_name`` added to its experiments and nothing else;
    runs of this key that never finished (interrupted, failed) are deleted with their nested
    runs, then the run is logged anew from ``record``.
    """
    import mlflow

    # one process at a time finds-or-creates (sqlite stores; a server serialises itself); the
    # client is made under the lock too: on a fresh sqlite store it runs the schema migration
    with _store_lock(tracking_uri):
        client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        experiment_id = _experiment_id(client, tracking_uri, experiment)
        runs = client.search_runs([experiment_id], f"tags.`{RESULT_TAG}` = '{key}'")
        for run in runs:
            if run.info.status == "FINISHED":
                _add_exp_name(client, run, exp_name)
                return run.info.run_id, experiment_id, False
        for run in runs:  # with the nested runs it had logged (a schedule's rounds)
            children = client.search_runs(
                [experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'"
            )
            for child in children:
                client.delete_run(child.info.run_id)
            client.delete_run(run.info.run_id)
        tags = {**record.tags, RESULT_TAG: key, EXP_NAMES_TAG: exp_name}
        return _log_run(tracking_uri, experiment_id, run_name, record, tags), experiment_id, True


def _log_run(
    tracking_uri: str, experiment_id: str, run_name: str, record: RunRecord, tags: dict[str, str]
) -> str:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    # on any exception, KeyboardInterrupt included, the run ends FAILED and a rerun replaces it
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags) as run:
        _log_record(client, run.info.run_id, record)
        if record.model is not None:
            _log_model(record.model)
        for child_name, child in record.children:
            with mlflow.start_run(
                experiment_id=experiment_id, run_name=child_name, nested=True, tags=child.tags
            ) as nested:
                _log_record(client, nested.info.run_id, child)
        return run.info.run_id


def _log_record(client: Any, run_id: str, record: RunRecord) -> None:
    """Params, metrics, step series, tables and files of ``record`` into the active run."""
    import mlflow
    from mlflow.entities import Metric, Param

    client.log_batch(
        run_id,
        params=[Param(k, str(v)) for k, v in record.params.items()],
        metrics=[Metric(k, float(v), 0, 0) for k, v in record.metrics.items()]
        + [
            Metric(k, float(v), 0, step) for k, series in record.steps.items() for step, v in series
        ],
    )
    for name, table in record.tables.items():
        mlflow.log_table(data=dict(table), artifact_file=name)
    for path in record.artifacts:
        mlflow.log_artifact(str(path))


def _log_model(record: ModelRecord) -> None:
    """``record``'s network as the active run's ``model`` (and a registry version)."""
    import mlflow
    import torch
    from mlflow.models import infer_signature

    model, example = record.model.cpu().eval(), record.example.cpu()
    with torch.no_grad():
        output = model(example)
    mlflow.pytorch.log_model(
        model,
        name="model",
        signature=infer_signature(example.numpy(), output.numpy()),
        input_example=example.numpy(),
        # stated, not inferred (inference imports the model in a subprocess: seconds)
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy"],
        # torch.export's program (batch dimension dynamic): loading it runs no pickled code
        serialization_format="pt2",
        registered_model_name=record.registered_name,
    )


UI_ADDRESS = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default


def run_link(uri: str, experiment_id: str, run_id: str) -> str:
    """The full address of a run in the MLflow UI (the server's own for an http(s) store;
    else `mlflow ui`'s default, with the command that serves this store)."""
    where = f"#/experiments/{experiment_id}/runs/{run_id}"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{where}"
    return f"{UI_ADDRESS}/{where} (serve it with: mlflow ui --backend-store-uri {uri})"
