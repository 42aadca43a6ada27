"""validate: reject bad params and an unusable MLflow store before any work is done.

DVC runs this stage on every ``dvc repro`` (``always_changed``), before every other stage, so a
typo'd key or a wrong value fails at once even where every other stage is up to date or
restored from the run-cache. Its output, the defaults of every param, changes only with the
code, so a rerun never makes later stages stale.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pipeline import io, tracking
from pipeline.config import Params, defaults
from pipeline.errors import PipelineError
from pipeline.stage import log, run_stage


def check_tracking_store(params: Params, paths: io.Paths) -> str:
    """The MLflow store's URI, after checking within seconds that it can be used."""
    uri = tracking.resolve_tracking_uri(params.track.tracking_uri, paths.root)
    try:
        tracking.check_store(uri)
    except OSError as exc:
        source = "" if params.track.tracking_uri else " (from $MLFLOW_TRACKING_URI or the default)"
        raise PipelineError(
            f"track.tracking_uri = {uri!r}{source} cannot be used: {exc}; allowed: a writable "
            "sqlite:/// path or a running MLflow server"
        ) from None
    return uri


def run(params: Params, paths: io.Paths) -> None:
    uri = check_tracking_store(params, paths)
    io.write_metrics(paths.defaults, defaults())
    log.info("validate: params.yaml is valid; MLflow store %s is usable", uri)


def main(argv: Sequence[str] | None = None) -> int:
    return run_stage(run, argv)


if __name__ == "__main__":
    sys.exit(main())
