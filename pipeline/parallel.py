"""Parallel execution: the only module that imports ray.

``map_tasks(fn, items, shared=...)`` calls ``fn(item, **shared)`` for every item and returns
the results in item order. Backends: ``serial`` (in process, used by unit tests) and ``ray``
(an embedded local instance by default, or an existing cluster named by ``address``). The
shared objects are put into Ray's object store once and passed to every task by reference.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from pipeline.config import RayParams
from pipeline.errors import PipelineError

T = TypeVar("T")
log = logging.getLogger(__name__)


def _serial(
    fn: Callable[..., T],
    items: Sequence[Any],
    shared: Mapping[str, Any],
    desc: str,
    params: RayParams,
) -> list[T]:
    return [fn(item, **shared) for item in tqdm(items, desc=desc, unit="task")]


def _check_reachable(address: str) -> None:
    """Fail fast on a wrong host:port (ray.init would retry for minutes)."""
    if address == "auto":
        return
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise PipelineError(
            f"ray.address = {address!r} is malformed; allowed: null, 'auto', 'host:port', 'ray://host:port'"
        )
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise PipelineError(
            f"ray.address = {address!r} is unreachable ({exc.strerror or exc}); is the cluster up?"
        ) from None


def _init_ray(params: RayParams) -> None:
    import ray

    if params.address is None:
        ray.init(num_cpus=params.num_cpus, include_dashboard=False, logging_level=logging.WARNING)
        return
    _check_reachable(params.address)
    # A cluster's nodes may not have this project installed: ship the package with the job.
    import pipeline

    runtime_env = {"py_modules": [str(Path(pipeline.__file__).parent)]}
    try:
        ray.init(address=params.address, runtime_env=runtime_env, logging_level=logging.WARNING)
    except ConnectionError as exc:
        raise PipelineError(
            f"ray.address = {params.address!r}: no Ray cluster there ({exc})"
        ) from None


def _ray(
    fn: Callable[..., T],
    items: Sequence[Any],
    shared: Mapping[str, Any],
    desc: str,
    params: RayParams,
) -> list[T]:
    import ray

    started = not ray.is_initialized()
    if started:
        _init_ray(params)
    try:
        refs = {name: ray.put(value) for name, value in shared.items()}
        remote = ray.remote(num_cpus=1)(fn)
        futures = [remote.remote(item, **refs) for item in items]
        pending = list(futures)
        with tqdm(total=len(futures), desc=desc, unit="task") as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                bar.update(len(done))
        return ray.get(futures)
    finally:
        if started:
            ray.shutdown()


Backend = Callable[
    [Callable[..., Any], Sequence[Any], Mapping[str, Any], str, RayParams], list[Any]
]
BACKENDS: dict[str, Backend] = {"serial": _serial, "ray": _ray}


def map_tasks(
    fn: Callable[..., T],
    items: Sequence[Any],
    *,
    shared: Mapping[str, Any],
    params: RayParams,
    desc: str = "",
) -> list[T]:
    """``[fn(item, **shared) for item in items]`` on the backend ``params.backend`` names."""
    if params.backend not in BACKENDS:
        raise PipelineError(
            f"ray.backend = {params.backend!r} is unknown; allowed: {', '.join(BACKENDS)}"
        )
    return BACKENDS[params.backend](fn, items, shared, desc, params)
