"""Where Ray runs: the address forms, token authentication, and the private local instance
bound to this machine only.

Every way of failing to connect is bounded and named: the address is first probed with one
gRPC call to the cluster's GCS (a few seconds at most), which tells an unreachable address,
a server that is not Ray, and a missing or refused token apart before ``ray.init`` (which
would retry for minutes) runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import PipelineError

if TYPE_CHECKING:  # config validates names against this package: no import circle
    from pipeline.config.runtime import RayParams

log = logging.getLogger(__name__)


ADDRESS_FORMS = "null, 'auto', 'host:port', 'ray://host:port'"
PROBE_TIMEOUT_S = 5.0  # per network step of the address probe
DOCS_CLUSTERS = "see docs/clusters.md#running-on-a-cluster"


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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
            f"{DOCS_CLUSTERS}"
        )
    token = loader.get_raw_token(ignore_auth_mode=True)
    return [("authorization", f"Bearer {token}")], source


def _resolve_auto() -> str:
    from ray._private import services

    try:
        return services.canonicalize_bootstrap_address_or_die("auto")
    except ConnectionError as exc:
        raise PipelineError(
            f"ray.address = 'auto' found no cluster on this machine ({first_line(exc)}); "
            f"allowed: 'auto' after `ray start --head` here, or 'host:port'; {DOCS_CLUSTERS}"
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
                f"or the file ~/.ray/auth_token); {DOCS_CLUSTERS}"
            )
        return PipelineError(
            f"{where}: the cluster refused this process's token (from {token_source}); "
            f"allowed: the head node's token (`ray get-auth-token` there); {DOCS_CLUSTERS}"
        )
    if "refused" in details.lower():
        return PipelineError(f"{where} is unreachable (connection refused); is the cluster up?")
    return PipelineError(
        f"{where} answers but is not a Ray cluster ({code.name}: {details}); allowed: the "
        "head node's GCS address (`ray start --head --port PORT`) or ray://host:10001"
    )


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


class _TokenNotice(logging.Filter):
    """Drops Ray's "Token authentication is enabled ... Set RAY_AUTH_MODE=disabled to opt out"
    warning: for a private instance the tool, not the user, chose token authentication (and
    keeps the token private, below), so there is nothing for the user to act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Token authentication is enabled" not in record.getMessage()


@contextlib.contextmanager
def _quiet_token_notice() -> Iterator[None]:
    notice = _TokenNotice()
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)
    log.info("ray: a private instance, token authentication on (token in %s)", token_path())


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


def init_ray(params: RayParams) -> None:
    import ray

    target = _target(params)
    _keep_token_private()
    if target is None:
        # address="local" starts a new private instance: never a `ray start` cluster that
        # happens to run on this machine, and RAY_ADDRESS (handled above) is not read.
        try:
            with _this_machine_only(), _quiet_token_notice():
                ray.init(
                    address="local",
                    num_cpus=params.num_cpus,
                    include_dashboard=False,
                    logging_level=logging.WARNING,
                )
        except Exception as exc:
            raise PipelineError(
                f"could not start a local Ray instance: {first_line(exc)}"
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
        raise PipelineError(f"{key} = {address!r}: {first_line(exc)}") from None
