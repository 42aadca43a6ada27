"""schedule: iterative pruning in rounds (schedule.rounds > 0), each re-profiled against the
model it starts from, pruned with masks only growing, and retrained. Finished rounds stay in
their own folders and a rerun resumes after the last one whose key still matches."""

from __future__ import annotations

import contextlib
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import pipeline
from pipeline.allocation.methods import NEEDS_CURVES
from pipeline.config.params import Params
from pipeline.edges import io, rounds
from pipeline.edges.parallel.tasks import session
from pipeline.edges.rounds import report_round, round_setup
from pipeline.edges.stage import log, run_stage
from pipeline.pruning.schedule import round_key, run_round


def run(params: Params, paths: io.Paths) -> None:
    setup = round_setup(params, paths)
    model = setup.start
    # round 1's key: the inputs' bytes and the code's (a code change recomputes every round)
    code = [*sorted(Path(pipeline.__file__).parent.rglob("*.py")), Path(__file__)]
    key = io.content_hash([paths.baseline, paths.calibration, *code])
    entries, seconds = [], []
    # one Ray instance for every round's profile, only if some round profiles
    profiles = params.schedule.rounds and NEEDS_CURVES.intersection(setup.methods)
    with session(params.ray) if profiles else contextlib.nullcontext():
        for k in range(1, params.schedule.rounds + 1):
            key = round_key(key, k, setup.key_settings)
            stored = rounds.read_round(paths.round(k), key)
            if stored is not None:  # finished before, under the same settings: resume after it
                state, _, metrics = stored
                model.load_state_dict(state)
                log.info("schedule round %d: reused from %s", k, paths.round(k))
            else:
                result = run_round(model, k, setup.settings, setup.inputs, **setup.steps(k))
                model, metrics = result.model, {**result.metrics, "key": key}
                rounds.write_round(
                    paths.round(k), model.state_dict(), result.allocation, metrics, setup.meta
                )
                seconds.append({"round": k, **result.seconds})
                report_round(k, metrics, setup.slack)
            entries.append({n: v for n, v in metrics.items() if n != "key"})
    for k, stale in rounds.round_folders(paths.rounds).items():
        if k > params.schedule.rounds:  # past the schedule's end: another schedule's rounds
            shutil.rmtree(stale)
    paths.rounds.mkdir(parents=True, exist_ok=True)
    # the finished rounds' numbers: never an empty folder (DVC warns of one on every repro)
    io.write_json(paths.rounds / "index.json", [e["round"] for e in entries])
    io.write_json(paths.metrics("rounds"), entries)
    io.write_metrics(paths.metrics("schedule"), {"rounds": len(entries), **(entries or [{}])[-1]})
    io.write_json(paths.timing("schedule_rounds"), seconds)


def main(argv: Sequence[str] | None = None) -> int:
    return run_stage(run, argv)


if __name__ == "__main__":
    sys.exit(main())
