"""Parallel execution: the backends that run tasks and report where each ran (this package is
the only importer of ray; connecting to a cluster is ``cluster``).

``run_tasks(fn, items, shared=...)`` calls ``fn(item, **shared)`` for every item and returns
the results in item order, with where each ran (``Placement``). Backends: ``serial`` (in
process) and ``ray``: a private local instance by default, or the cluster that
``ray.address`` (or, when that is null, ``$RAY_ADDRESS``) names. The shared objects go into
Ray's object store once and reach every task by reference. Tasks ask for
``ray.cpus_per_task`` CPUs and ``ray.gpus_per_task`` GPUs; each runs on the GPU Ray assigned
it, or on the CPU when it has none or CUDA is absent.

The requested resources are checked against the nodes before any task is submitted.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from tqdm import tqdm

from pipeline.edges.parallel.cluster import first_line, init_ray
from pipeline.errors import PipelineError

if TYPE_CHECKING:  # config validates names against this module: no import circle
    from pipeline.config.runtime import RayParams


T = TypeVar("T")


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    """Where one task ran: Ray node id (hex; "local" in process), node IP, the GPU ids Ray
    assigned it, the torch device it used, and its worker's process id."""

    node_id: str
    node_ip: str
    gpu_ids: tuple[str, ...]
    device: str
    pid: int


@dataclass(frozen=True)
class TaskRun(Generic[T]):
    """Results and placements of ``run_tasks``, both in item order."""

    results: list[T]
    placements: list[Placement]


def task_device(gpu_ids: Sequence[str]) -> str:
    """The torch device of a task that Ray assigned ``gpu_ids``.

    Ray points ``CUDA_VISIBLE_DEVICES`` at the assigned GPUs, so the first is ``cuda:0`` in the
    task. Without assigned GPUs, or without CUDA (logical GPUs declared on a CPU machine), the
    task runs on the CPU: a task with no GPU may still see every GPU, so never guess.
    """
    import torch

    return "cuda:0" if gpu_ids and torch.cuda.is_available() else "cpu"


def _task_device(shared: Mapping[str, Any], device_arg: str | None, assigned: str | None) -> str:
    """Where a task runs: the CPU if the user's ``device`` says so; under Ray, where Ray put
    the task (``assigned``); in process, the device the user asked for."""
    requested = shared.get(device_arg, "auto") if device_arg else "cpu"
    return "cpu" if requested == "cpu" else (assigned or requested)


def _call(
    fn: Callable[..., T], item: Any, shared: Mapping[str, Any], device_arg: str | None, device: str
) -> T:
    kwargs = {**shared, device_arg: device} if device_arg else shared
    return fn(item, **kwargs)


def _serial(
    fn: Callable[..., T],
    items: Sequence[Any],
    shared: Mapping[str, Any],
    desc: str,
    params: RayParams,
    device_arg: str | None,
) -> TaskRun[T]:
    device = _task_device(shared, device_arg, None)
    here = Placement("local", "127.0.0.1", (), device, os.getpid())
    results = []
    for item in tqdm(items, desc=desc, unit="unit"):
        try:
            results.append(_call(fn, item, shared, device_arg, device))
        except Exception as exc:
            log.debug("%s: %s failed", desc, item, exc_info=True)
            raise PipelineError(
                f"{desc}: {item} failed: {type(exc).__name__}: {first_line(exc)}"
            ) from exc
    return TaskRun(results, [here] * len(items))


@dataclass(frozen=True)
class _Plan:
    cpus: float
    gpus: float
    nodes: int
    slots: int  # tasks that can run at once on the whole cluster


def _fits(free: float, need: float) -> int:
    """How many tasks needing ``need`` fit in ``free`` (Ray counts in 1e-4 units)."""
    return math.floor(free / need + 1e-6) if need > 0 else 1 << 30


def plan_resources(params: RayParams, nodes: Sequence[Mapping[str, float]]) -> _Plan:
    """Per-task CPUs and GPUs for the alive nodes' total ``{"CPU": .., "GPU": ..}``, or one
    clear error when no node can run a task."""
    total_gpus = sum(n.get("GPU", 0.0) for n in nodes)
    if params.gpus_per_task is None:
        gpus = 1.0 if total_gpus > 0 else 0.0
    else:
        gpus = params.gpus_per_task
    cpus = params.cpus_per_task
    per_node = [min(_fits(n.get("CPU", 0.0), cpus), _fits(n.get("GPU", 0.0), gpus)) for n in nodes]
    slots = sum(per_node)
    if slots > 0:
        return _Plan(cpus, gpus, len(nodes), slots)
    have = "; ".join(f"{n.get('CPU', 0):g} CPU, {n.get('GPU', 0):g} GPU" for n in nodes)
    if gpus > 0 and total_gpus == 0:
        raise PipelineError(
            f"ray.gpus_per_task = {gpus:g} but the Ray cluster has no GPUs (nodes: {have}); "
            "allowed: 0 or null here"
        )
    if gpus > max(n.get("GPU", 0.0) for n in nodes):
        key, value = "ray.gpus_per_task", gpus
    else:
        key, value = "ray.cpus_per_task", cpus
    raise PipelineError(
        f"{key} = {value:g}: no node of the Ray cluster has {cpus:g} CPU and {gpus:g} GPU "
        f"for one task (nodes: {have}); allowed: at most what one node has"
    )


def task_slots(params: RayParams) -> int:
    """How many tasks run at once on ``params.backend``: 1 in process; under Ray, as many as
    the alive nodes fit (``plan_resources``). Ray must be connected (``session``)."""
    if params.backend != "ray":
        return 1
    import ray

    alive = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    return plan_resources(params, alive).slots


def _ray_task(
    fn: Callable[..., T], item: Any, device_arg: str | None, **shared: Any
) -> tuple[T, Placement]:
    """Runs in a Ray worker: ``fn`` on the device Ray assigned, and where that was."""
    import ray

    gpu_ids = tuple(str(g) for g in ray.get_gpu_ids())
    device = _task_device(shared, device_arg, task_device(gpu_ids))
    result = _call(fn, item, shared, device_arg, device)
    node = ray.get_runtime_context().get_node_id()
    return result, Placement(node, ray.util.get_node_ip_address(), gpu_ids, device, os.getpid())


def _where(placements: Sequence[Placement | None], nodes: int) -> str:
    """Progress-bar postfix: nodes and GPUs the finished units ran on."""
    done = [p for p in placements if p is not None]
    used = {p.node_id for p in done}
    gpus = {(p.node_id, g) for p in done for g in p.gpu_ids}
    devices = ",".join(sorted({p.device for p in done}))
    return f"nodes {len(used)}/{nodes}, GPUs {len(gpus)}, on {devices or '-'}"


def _ray(
    fn: Callable[..., T],
    items: Sequence[Any],
    shared: Mapping[str, Any],
    desc: str,
    params: RayParams,
    device_arg: str | None,
) -> TaskRun[T]:
    import ray

    started = not ray.is_initialized()
    if started:
        init_ray(params)
    try:
        alive = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        plan = plan_resources(params, alive)
        log.info(
            "ray: %d node(s); %g CPU + %g GPU per task; %d task(s) at once",
            plan.nodes,
            plan.cpus,
            plan.gpus,
            plan.slots,
        )
        refs = {name: ray.put(value) for name, value in shared.items()}
        # SPREAD: units go to every node, not first to fill the one the driver is on.
        remote = ray.remote(_ray_task).options(
            num_cpus=plan.cpus,
            num_gpus=plan.gpus,
            max_retries=params.max_retries,
            retry_exceptions=False,  # a bug in a task fails the same way again: report it
            scheduling_strategy="SPREAD",
        )
        futures = [remote.remote(fn, item, device_arg, **refs) for item in items]
        return _collect(futures, items, desc, params, plan)
    finally:
        if started:
            ray.shutdown()


def _collect(
    futures: list[Any], items: Sequence[Any], desc: str, params: RayParams, plan: _Plan
) -> TaskRun[Any]:
    import ray

    index = {ref: i for i, ref in enumerate(futures)}
    results: list[Any] = [None] * len(futures)
    placements: list[Placement | None] = [None] * len(futures)
    pending = list(futures)
    with tqdm(total=len(futures), desc=desc, unit="unit") as bar:
        bar.set_postfix_str(_where(placements, plan.nodes))
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                i = index[ref]
                try:
                    results[i], placements[i] = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:
                    _cancel(pending)
                    log.debug("%s: %s failed:\n%s", desc, items[i], exc)
                    cause = exc.cause if isinstance(exc.cause, BaseException) else exc
                    raise PipelineError(
                        f"{desc}: {items[i]} failed: {type(cause).__name__}: {first_line(cause)}"
                    ) from None
                except ray.exceptions.RayError as exc:
                    _cancel(pending)
                    raise PipelineError(
                        f"{desc}: {items[i]} could not run after {params.max_retries} "
                        f"retries (ray.max_retries): {type(exc).__name__}: {first_line(exc)}"
                    ) from None
            bar.update(len(done))
            bar.set_postfix_str(_where(placements, plan.nodes))
    return TaskRun(results, [p for p in placements if p is not None])


def _cancel(pending: Sequence[Any]) -> None:
    import ray

    for ref in pending:
        with contextlib.suppress(Exception):  # already finished or gone: nothing to stop
            ray.cancel(ref, force=True)


Backend = Callable[
    [Callable[..., Any], Sequence[Any], Mapping[str, Any], str, "RayParams", str | None],
    TaskRun[Any],
]


BACKENDS: dict[str, Backend] = {"serial": _serial, "ray": _ray}


@contextlib.contextmanager
def session(params: RayParams) -> Iterator[None]:
    """Keep one Ray connection (a private local instance, or the cluster) open across several
    ``run_tasks`` calls, e.g. the profiles of a schedule's rounds: each call would otherwise
    start and stop its own. The serial backend needs none."""
    if params.backend != "ray":
        yield
        return
    import ray

    started = not ray.is_initialized()
    if started:
        init_ray(params)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def run_tasks(
    fn: Callable[..., T],
    items: Sequence[Any],
    *,
    shared: Mapping[str, Any],
    params: RayParams,
    desc: str = "",
    device_arg: str | None = None,
) -> TaskRun[T]:
    """``fn(item, **shared)`` for every item on the backend ``params.backend`` names, with
    where each ran. ``device_arg``: the keyword that receives the task's torch device. A
    failing item is one PipelineError naming it (``str(item)``)."""
    if params.backend not in BACKENDS:
        raise PipelineError(
            f"ray.backend = {params.backend!r} is unknown; allowed: {', '.join(BACKENDS)}"
        )
    return BACKENDS[params.backend](fn, items, shared, desc, params, device_arg)


def map_tasks(
    fn: Callable[..., T],
    items: Sequence[Any],
    *,
    shared: Mapping[str, Any],
    params: RayParams,
    desc: str = "",
) -> list[T]:
    """``[fn(item, **shared) for item in items]`` on the backend ``params.backend`` names."""
    return run_tasks(fn, items, shared=shared, params=params, desc=desc).results
