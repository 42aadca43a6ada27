"""track: the pipeline's result as exactly one MLflow run.

DVC runs this stage on every ``dvc repro`` (``always_changed``). The run is keyed by a hash of
the result's files: a rerun that reproduces a result, or a DVC experiment restored from the
run-cache, finds the run that holds it and adds the experiment's name to it, instead of logging
a duplicate.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from pipeline.config.params import Params
from pipeline.edges import io, tracking
from pipeline.edges.result import result_metrics, result_record
from pipeline.edges.rounds import schedule_files, schedule_record
from pipeline.edges.stage import log, run_stage
from pipeline.errors import PipelineError


def run(params: Params, paths: io.Paths) -> None:
    # the few numbers experiments are compared by, before the store is touched
    io.write_metrics(paths.metrics("result"), result_metrics(params, paths))
    model = f"{params.model.arch} {params.data.name}"  # runs of different models apart
    results = [
        (
            f"{model} {params.allocate.method} ratio={params.prune.ratio:g}",
            paths.result_files(),
            result_record(params, paths),
        )
    ]
    schedule = schedule_record(params, paths)
    if schedule is not None:  # one parent run per schedule, a nested run per round
        s = params.schedule
        name = f"{model} {params.allocate.method} schedule {s.rounds}x{s.amount:g}"
        results.append((name, schedule_files(paths), schedule))
    uri = tracking.resolve_tracking_uri(params.track.tracking_uri, paths.root)
    for run_name, files, record in results:
        try:
            run_id, experiment_id, created = tracking.log_result(
                tracking_uri=uri,
                experiment=params.track.experiment,
                key=io.content_hash(files),
                exp_name=os.environ.get("DVC_EXP_NAME", ""),
                run_name=run_name,
                record=record,
            )
        except PipelineError:
            raise
        except Exception as exc:  # the store's failure (locked, full, gone), in its own types
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            raise PipelineError(
                f"track: the MLflow store {uri} failed ({type(exc).__name__}: {first}); the "
                "result's files are intact: run `dvc repro` again once the store can be written"
            ) from None
        log.info(
            "track: MLflow run %r %s: %s",
            run_name,
            "logged" if created else "already there",
            tracking.run_link(uri, experiment_id, run_id),
        )


def main(argv: Sequence[str] | None = None) -> int:
    return run_stage(run, argv)


if __name__ == "__main__":
    sys.exit(main())
