"""validate: reject bad params, unreadable data, a model that cannot run on it and an unusable
MLflow store before any work is done.

DVC runs this stage on every ``dvc repro`` (``always_changed``), before every other stage, so a
typo'd key or a wrong value fails at once even where every other stage is up to date or
restored from the run-cache. Its output, the defaults of every param, changes only with the
code, so a rerun never makes later stages stale.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pipeline.config.params import Params, defaults
from pipeline.edges import io, params_file, tracking
from pipeline.edges.preflight import check_data_and_model, check_dvc_params, model_code_digest
from pipeline.edges.stage import log, run_stage
from pipeline.errors import PipelineError


def check_tracking_store(params: Params, paths: io.Paths) -> str:
    """The MLflow store's URI, after checking that it can be used and that the experiment is
    not deleted there (seconds for a bad path or an unreachable server)."""
    uri = tracking.resolve_tracking_uri(params.track.tracking_uri, paths.root)
    source = "" if params.track.tracking_uri else " (from $MLFLOW_TRACKING_URI or the default)"
    try:
        tracking.check_store(uri)
        tracking.check_experiment(uri, params.track.experiment)
    except OSError as exc:
        raise PipelineError(
            f"track.tracking_uri = {uri!r}{source} cannot be used: {exc}; allowed: "
            "sqlite:////absolute/path.db (writable) or the URL of a running MLflow server"
        ) from None
    except ValueError as exc:
        raise PipelineError(
            f"track.experiment = {params.track.experiment!r}: {exc}; allowed: an active "
            "experiment or a new name (or `mlflow experiments restore`)"
        ) from None
    return uri


def run(params: Params, paths: io.Paths) -> None:
    check_dvc_params(params_file.read_params_mapping(paths.params), paths.root / "dvc.yaml")
    uri = check_tracking_store(params, paths)
    splits = check_data_and_model(params)
    io.write_metrics(paths.defaults, defaults())
    io.write_metrics(paths.model_code, model_code_digest(params.model.arch, paths.root))
    log.info(
        "validate: params.yaml is valid; %d + %d images readable, the model runs on them; "
        "MLflow store %s is usable",
        len(splits.train_eval),
        len(splits.test),
        uri,
    )


def main(argv: Sequence[str] | None = None) -> int:
    return run_stage(run, argv)


if __name__ == "__main__":
    sys.exit(main())
