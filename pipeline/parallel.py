"""Parallel execution: the only module that imports ray.

``run_tasks(fn, items, shared=...)`` calls ``fn(item, **shared)`` for every item and returns
the results in item order, with where each ran (``Placement``). Backends: ``serial`` (in
process) and ``ray``: a private local instance by default, or the cluster that
``ray.address`` (or, when that is null, ``$RAY_ADDRESS``) names. The shared objects go into
Ray's object store once and reach every task by reference. Tasks ask for
``ray.cpus_per_task`` CPUs and ``ray.gpus_per_task`` GPUs; each runs on the GPU Ray assigned
it, or on the CPU when it has none or CUDA is absent.

Every way of failing to connect is bounded and named: the address is first probed with one
gRPC call to the cluster's GCS (a few seconds at most), which tells an unreachable address,
a server that is not Ray, and a missing or refused token apart before ``ray.init`` (which
would retry for minutes) runs. The requested resources are checked against the nodes before
any task is submitted.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from tqdm import tqdm

from pipeline.config import RayParams
from pipeline.errors import PipelineError

T = TypeVar("T")
log = logging.getLogger(__name__)

ADDRESS_FORMS = "null, 'auto', 'host:port', 'ray://host:port'"
PROBE_TIMEOUT_S = 5.0  # per network step of the address probe
README_CLUSTERS = "see README 'Running on a cluster'"


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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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
                f"{desc}: {item} failed: {type(exc).__name__}: {_first_line(exc)}"
            ) from exc
    return TaskRun(results, [here] * len(items))


# ---- addresses and the connection probe -------------------------------------------------


def parse_address(address: str, key: str = "ray.address") -> tuple[str, str, int] | None:
    """(scheme "gcs" or "client", host, port) of ``address``; None for "auto"."""
    if address == "auto":
        return None
    scheme = "client" if address.startswith("ray://") else "gcs"
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit() or "://" in host:
        raise PipelineError(f"{key} = {address!r} is malformed; allowed: {ADDRESS_FORMS}")
    return scheme, host.strip("[]"), int(port)


def _target(params: RayParams) -> tuple[str, str] | None:
    """(params key, address) of the cluster to join, or None for a private local instance.

    An explicit ``ray.address`` wins. When it is null, ``$RAY_ADDRESS`` is honoured if the
    user set it; otherwise nothing on the machine is joined (not even a `ray start` cluster).
    """
    if params.address is not None:
        return "ray.address", params.address
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if not env:
        return None
    parse_address(env, "RAY_ADDRESS")
    if params.num_cpus is not None:
        raise PipelineError(
            f"ray.num_cpus = {params.num_cpus!r} is not allowed with RAY_ADDRESS={env!r}; "
            "allowed: null (a cluster's nodes declare their own CPUs), or unset RAY_ADDRESS"
        )
    log.info("ray.address is null: joining the cluster at RAY_ADDRESS=%s", env)
    return "RAY_ADDRESS", env


def _auth_metadata(auto: bool) -> tuple[list[tuple[str, str]], str | None]:
    """(gRPC metadata Ray will send, where its token comes from): Ray sends a token to an
    explicit address only when ``RAY_AUTH_MODE=token``; for ``auto`` (a cluster it finds
    itself) also when the mode is unset and a token is at hand."""
    mode = os.environ.get("RAY_AUTH_MODE", "").lower()
    from ray._raylet import AuthenticationTokenLoader

    loader = AuthenticationTokenLoader.instance()
    if mode != "token" and not (auto and not mode and loader.has_token(ignore_auth_mode=True)):
        return [], None
    source = (
        "RAY_AUTH_TOKEN"
        if os.environ.get("RAY_AUTH_TOKEN")
        else "RAY_AUTH_TOKEN_PATH"
        if os.environ.get("RAY_AUTH_TOKEN_PATH")
        else "~/.ray/auth_token"
    )
    if not loader.has_token(ignore_auth_mode=True):
        raise PipelineError(
            "RAY_AUTH_MODE=token but no Ray token found; allowed: the head node's token in "
            f"RAY_AUTH_TOKEN, a file named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token; "
            f"{README_CLUSTERS}"
        )
    token = loader.get_raw_token(ignore_auth_mode=True)
    return [("authorization", f"Bearer {token}")], source


def _resolve_auto() -> str:
    from ray._private import services

    try:
        return services.canonicalize_bootstrap_address_or_die("auto")
    except ConnectionError as exc:
        raise PipelineError(
            f"ray.address = 'auto' found no cluster on this machine ({_first_line(exc)}); "
            f"allowed: 'auto' after `ray start --head` here, or 'host:port'; {README_CLUSTERS}"
        ) from None


def probe(key: str, address: str) -> None:
    """Raise one clear PipelineError, within seconds, unless ``address`` is a Ray cluster
    that accepts this process: unreachable, not Ray, token missing or refused."""
    parsed = parse_address(address, key)
    if parsed is None:
        parsed = parse_address(_resolve_auto(), key)
        assert parsed is not None
    scheme, host, port = parsed
    where = f"{key} = {address!r}"
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        raise PipelineError(
            f"{where} is unreachable ({exc.strerror or exc}); is the cluster up, and is the "
            "port open from here?"
        ) from None
    import grpc

    metadata, source = _auth_metadata(auto=address == "auto")
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        try:
            if scheme == "client":
                # the Ray Client server: check it speaks gRPC; ray.init reports the rest
                grpc.channel_ready_future(channel).result(timeout=PROBE_TIMEOUT_S)
                return
            from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

            stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
            stub.GetClusterId(
                gcs_service_pb2.GetClusterIdRequest(), timeout=PROBE_TIMEOUT_S, metadata=metadata
            )
        except grpc.FutureTimeoutError:
            raise PipelineError(
                f"{where} answers but is not a Ray Client server (no gRPC within "
                f"{PROBE_TIMEOUT_S:g} s); allowed: ray://host:port of `ray start --head`'s "
                "client server (port 10001)"
            ) from None
        except grpc.RpcError as exc:
            raise _probe_error(where, exc, source) from None


def _probe_error(where: str, exc: Any, token_source: str | None) -> PipelineError:
    import grpc

    code, details = exc.code(), ((exc.details() or "").strip().splitlines() or [""])[0]
    if code == grpc.StatusCode.UNAUTHENTICATED:
        if token_source is None:
            return PipelineError(
                f"{where}: the cluster requires token authentication and this process sends "
                "no token; export RAY_AUTH_MODE=token and the head node's token (RAY_AUTH_TOKEN, "
                f"or the file ~/.ray/auth_token); {README_CLUSTERS}"
            )
        return PipelineError(
            f"{where}: the cluster refused this process's token (from {token_source}); "
            f"allowed: the head node's token (`ray get-auth-token` there); {README_CLUSTERS}"
        )
    if "refused" in details.lower():
        return PipelineError(f"{where} is unreachable (connection refused); is the cluster up?")
    return PipelineError(
        f"{where} answers but is not a Ray cluster ({code.name}: {details}); allowed: the "
        "head node's GCS address (`ray start --head --port PORT`) or ray://host:10001"
    )


# ---- the ray backend ----------------------------------------------------------------------


# Ray's local-only mode (its default on macOS and Windows): the node's address is 127.0.0.1,
# so the GCS, raylet, workers, agents and metrics exporter listen on loopback alone.
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def _this_machine_only() -> Iterator[None]:
    """While a private instance starts: Ray resolves its node address to 127.0.0.1 (the
    processes it starts inherit the setting; the driver reads Ray's constant, which this
    process may have fixed at an earlier import), and files it creates, its token among
    them, are readable by this user alone (umask 077). Restored afterwards, so that a later
    connection to a cluster from this process is not confined to loopback."""
    from ray._private import ray_constants

    saved = os.environ.get(LOCAL_ONLY_ENV), ray_constants.ENABLE_RAY_CLUSTER
    umask = os.umask(0o077)
    os.environ[LOCAL_ONLY_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        os.umask(umask)
        ray_constants.ENABLE_RAY_CLUSTER = saved[1]
        if saved[0] is None:
            os.environ.pop(LOCAL_ONLY_ENV, None)
        else:
            os.environ[LOCAL_ONLY_ENV] = saved[0]


def token_path() -> Path:
    """The token file Ray reads and writes: $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def _keep_token_private() -> None:
    """A token file of this user's that others can read (Ray writes it 0644) becomes 0600: it
    lets whoever holds it run code on any instance that trusts it."""
    path = token_path()
    try:
        info = path.stat()
        if info.st_uid == os.getuid() and info.st_mode & 0o077:
            path.chmod(0o600)
            log.info("ray: made %s readable by its owner alone (it was %o)", path, info.st_mode)
    except OSError:  # absent, or not ours to change: Ray reports what it needs
        pass


def _init_ray(params: RayParams) -> None:
    import ray

    target = _target(params)
    _keep_token_private()
    if target is None:
        # address="local" starts a new private instance: never a `ray start` cluster that
        # happens to run on this machine, and RAY_ADDRESS (handled above) is not read.
        try:
            with _this_machine_only():
                ray.init(
                    address="local",
                    num_cpus=params.num_cpus,
                    include_dashboard=False,
                    logging_level=logging.WARNING,
                )
        except Exception as exc:
            raise PipelineError(
                f"could not start a local Ray instance: {_first_line(exc)}"
            ) from None
        _keep_token_private()
        return
    key, address = target
    probe(key, address)
    # A cluster's nodes may not have this project installed: ship the package with the job.
    import pipeline

    runtime_env = {"py_modules": [str(Path(pipeline.__file__).parent)]}
    try:
        ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING)
    except Exception as exc:
        raise PipelineError(f"{key} = {address!r}: {_first_line(exc)}") from None


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
        _init_ray(params)
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
                        f"{desc}: {items[i]} failed: {type(cause).__name__}: {_first_line(cause)}"
                    ) from None
                except ray.exceptions.RayError as exc:
                    _cancel(pending)
                    raise PipelineError(
                        f"{desc}: {items[i]} could not run after {params.max_retries} "
                        f"retries (ray.max_retries): {type(exc).__name__}: {_first_line(exc)}"
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
    [Callable[..., Any], Sequence[Any], Mapping[str, Any], str, RayParams, str | None],
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
        _init_ray(params)
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
