"""Glue every stage script shares: the command line, error reporting (one ``error:`` line,
exit 2), the device, model loading and what the params apply after the masks. The stages'
larger jobs have their own modules: ``profile_run``, ``choose``, ``result``, ``rounds``;
process supervision is ``supervise``."""

from __future__ import annotations

import argparse
import functools
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from pipeline.config.params import Params
from pipeline.edges import io, params_file
from pipeline.edges.supervise import die_with_parent, raise_on_sigterm
from pipeline.errors import PipelineError
from pipeline.nn.data import calibration_subset
from pipeline.nn.device import resolve_device
from pipeline.nn.models import build_model, load_weights, normalize_state_dict
from pipeline.nn.training import EpochStats
from pipeline.pruning.repair import Recovery

log = logging.getLogger("rdprune")


def run_stage(body: Callable[[Params, io.Paths], None], argv: Sequence[str] | None = None) -> int:
    """Parse ``--root``, read params.yaml there, run ``body``; a PipelineError becomes one
    ``error: ...`` line on stderr and exit status 2. The wall time goes to a timings file
    that no stage depends on, so that it never changes what DVC considers stale."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default=".", help="project root holding params.yaml")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr
    )
    name = body.__module__.rpartition(".")[2]
    if name == "__main__":  # run as ``python -m stages.<name>``
        name = sys.modules["__main__"].__spec__.name.rpartition(".")[2]
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, raise_on_sigterm) if main_thread else None
    if argv is None:  # a process of its own, not a call from a test
        die_with_parent()
    try:
        paths = io.Paths(Path(args.root))
        for stale in io.remove_temporaries(paths):
            log.info("%s: removed %s, left by an interrupted write", name, stale)
        params = params_file.read_params(paths.params)
        resolve_device(params.device)  # no device, no work: fail before reading anything else
        start = time.perf_counter()
        body(params, paths)
        io.write_metrics(paths.timing(name), {"seconds": round(time.perf_counter() - start, 3)})
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file the stage reads or a library writes: name it and the cause
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {name}: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    finally:  # called in process (tests, benchmarks): the caller's handler again; a process
        # of its own keeps ignoring late SIGTERMs while the interpreter shuts down
        if previous is not None and argv is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


def recovery(params: Params) -> Recovery:
    """What the params apply after the masks, for every method: the repair (BatchNorm set on
    the way) and / or BatchNorm recalibration."""
    p = params.prune
    return Recovery(p.bn_rule, p.reconstruct, p.reconstruct_damping, params.calibrate.batch_size)


def recovery_images(params: Params, train_eval: Dataset) -> torch.Tensor | None:
    """(N, ...) the training images the prune stage's recovery runs on (seeded, evaluation
    transforms): the repair's ``prune.reconstruct_samples``, else the BatchNorm
    recalibration's ``prune.bn_recalibration``; None when there is no recovery."""
    p = params.prune
    if p.reconstruct is not None:
        images, _ = calibration_subset(
            train_eval, p.reconstruct_samples, params.seed + 2, "prune.reconstruct_samples"
        )
    elif p.bn_rule is not None:
        images, _ = calibration_subset(
            train_eval, p.bn_recalibration, params.seed + 1, "prune.bn_recalibration"
        )
    else:
        return None
    return images


def stage_device(params: Params) -> torch.device:
    """The torch device the ``device`` param names here (one clear error if there is none)."""
    device = resolve_device(params.device)
    _announce_device(str(device), params.device)
    return device


@functools.cache
def _announce_device(device: str, param: str) -> None:
    """Log the device once per process, however many models a stage loads."""
    log.info("device: %s (device = %s)", device, param)


def adopt_checkpoint(model: nn.Module, params: Params) -> nn.Module:
    """``model`` with ``model.checkpoint``'s weights (read safely, keys normalised, checked for
    the architecture and for NaN), or as it is when none is named."""
    where = params.model.checkpoint
    if where is not None:
        state = normalize_state_dict(io.read_checkpoint(where, "model.checkpoint"), where)
        load_weights(model, state, where, params.model.arch)
    return model


def load_model(
    params: Params, path: Path, in_channels: int, num_classes: int, what: str
) -> nn.Module:
    """The registry's ``model.arch`` with the weights of checkpoint ``path`` (read onto the
    CPU), on the ``device`` param's device, in eval mode."""
    model = build_model(params.model.arch, in_channels, num_classes)
    state = normalize_state_dict(io.read_checkpoint(path, what), str(path))
    load_weights(model, state, str(path), params.model.arch)
    return model.to(stage_device(params)).eval()


def log_epoch(stage: str) -> Callable[[EpochStats], None]:
    """An ``on_epoch`` callback that logs each training epoch as it ends."""

    def report(stats: EpochStats) -> None:
        if stats.accuracy is None:  # no evaluation between epochs (schedule rounds)
            log.info("%s epoch %d: loss %.4f", stage, stats.epoch, stats.loss)
            return
        log.info(
            "%s epoch %d: loss %.4f, test accuracy %.4f",
            stage,
            stats.epoch,
            stats.loss,
            stats.accuracy,
        )

    return report


STAGES = (
    "validate",
    "baseline",
    "calibrate",
    "profile",
    "allocate",
    "prune",
    "finetune",
    "schedule",
    "export",
    "track",
)
