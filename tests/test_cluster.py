"""A real two-node Ray cluster on loopback, token authentication on as the README sets it up:
the profile stage against it, a worker killed mid-profile, a private local instance beside it,
and every way of failing to connect (one line each, within seconds).

The cluster is started the way README 'Running on a cluster' says: `ray get-auth-token --generate`
and `ray start --head` with RAY_AUTH_MODE=token, and `ray start --address` for a node with its
own HOME (no token file) that gets the token through RAY_AUTH_TOKEN. Every process runs with
its own RAY_TMPDIR and HOME and is stopped by PID at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml

from pipeline.config.runtime import RayParams
from pipeline.edges.parallel.tasks import plan_resources
from pipeline.errors import PipelineError
from stages import baseline, calibrate, profile

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LEVELS = 21


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any Ray setting (an in-process ray.init sets RAY_AUTH_MODE)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return {**env, **extra}


class Node:
    """One `ray start --block` in its own process group, HOME and RAY_TMPDIR."""

    def __init__(self, name: str, base: Path, args: list[str], **env: str) -> None:
        self.home, self.tmp = base / f"{name}-home", base / f"{name}-tmp"
        self.home.mkdir(exist_ok=True)
        self.tmp.mkdir()
        self.env = clean_env(HOME=str(self.home), RAY_TMPDIR=str(self.tmp), **env)
        self.log = open(base / f"{name}.log", "w")  # noqa: SIM115 (closed in stop)
        ports = ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port"]
        ports += ["--runtime-env-agent-port", "--metrics-export-port"]
        args = [*args, *(a for p in ports for a in (p, str(free_port())))]
        self.proc = subprocess.Popen(
            [str(BIN / "ray"), "start", "--block", "--num-cpus", "1", "--num-gpus", "2", *args],
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def tree(self) -> list[psutil.Process]:
        try:
            return [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> None:
        procs = self.tree()
        for p in procs:  # by PID: the node's own processes, nothing else
            with contextlib.suppress(psutil.Error):
                p.terminate()
        _, alive = psutil.wait_procs(procs, timeout=3)  # a throwaway cluster: no long goodbye
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        self.log.close()


def gcs_call(address: str, token: str, service: str, method: str):
    """One authenticated gRPC call to the cluster's GCS (how the test watches the cluster)."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = getattr(gcs_service_pb2_grpc, f"{service}Stub")(channel)
        request = getattr(gcs_service_pb2, f"{method}Request")()
        metadata = [("authorization", f"Bearer {token}")]
        return getattr(stub, method)(request, timeout=5, metadata=metadata)


def alive_nodes(address: str, token: str) -> set[str]:
    reply = gcs_call(address, token, "NodeInfoGcsService", "GetAllNodeInfo")
    return {n.node_id.hex() for n in reply.node_info_list if n.state == 0}  # 0: ALIVE


def job_count(address: str, token: str) -> int:
    return len(gcs_call(address, token, "JobInfoGcsService", "GetAllJobInfo").job_info_list)


class Cluster:
    def __init__(self, base: Path) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: list[Node] = []
        head_home = base / "head-home"
        head_home.mkdir()
        env = clean_env(HOME=str(head_home), RAY_AUTH_MODE="token")
        subprocess.run(
            [str(BIN / "ray"), "get-auth-token", "--generate"],
            env=env,
            check=True,
            capture_output=True,
        )
        self.token = (head_home / ".ray" / "auth_token").read_text().strip()
        self.nodes.append(
            Node(
                "head",
                base,
                ["--head", "--port", str(self.port), "--include-dashboard", "false"]
                + ["--ray-client-server-port", str(free_port())]
                + ["--dashboard-port", str(free_port())],
                RAY_AUTH_MODE="token",  # the token: ~/.ray/auth_token of the head's HOME
            )
        )
        self.wait_nodes(1)
        self.nodes.append(
            Node(
                "worker",
                base,
                ["--address", self.address],
                RAY_AUTH_MODE="token",
                RAY_AUTH_TOKEN=self.token,
            )
        )
        self.node_ids = self.wait_nodes(2)

    def wait_nodes(self, count: int, timeout: float = 90) -> set[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                nodes = alive_nodes(self.address, self.token)
                if len(nodes) >= count:
                    return nodes
            except Exception:  # the GCS is still starting
                time.sleep(0.5)
                continue
            time.sleep(0.5)
        logs = "\n".join(Path(n.log.name).read_text()[-2000:] for n in self.nodes)
        raise AssertionError(f"Ray cluster did not reach {count} nodes:\n{logs}")

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    # short paths: Ray's Unix sockets live under RAY_TMPDIR (108-byte limit)
    base = Path(tempfile.mkdtemp(prefix="rdp", dir="/tmp"))
    c = Cluster(base)
    try:
        yield c
    finally:
        c.stop()


def write_params(root: Path, **ray: object) -> None:
    params = {
        "baseline": {"epochs": 1},
        "calibrate": {"samples": 64},
        "profile": {"levels": LEVELS},
        "ray": ray,
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project with baseline and calibration, and the serial backend's table."""
    root = tmp_path_factory.mktemp("cluster-project")
    write_params(root, backend="serial")
    for stage in (baseline, calibrate, profile):
        assert stage.main(["--root", str(root)]) == 0
    (root / "serial.parquet").write_bytes((root / "artifacts" / "distortion.parquet").read_bytes())
    return root


def run_profile(root: Path, env: dict[str, str], **ray: object) -> subprocess.CompletedProcess:
    (root / "artifacts" / "distortion.parquet").unlink(missing_ok=True)
    write_params(root, **ray)
    return subprocess.run(
        [sys.executable, "-m", "stages.profile", "--root", str(root)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def client_env(cluster: Cluster, base: Path, token: str | None = None) -> dict[str, str]:
    """A driver machine: its own HOME and RAY_TMPDIR, the cluster's token in the environment."""
    home = Path(tempfile.mkdtemp(prefix="rdc", dir="/tmp"))
    return clean_env(
        HOME=str(home),
        RAY_TMPDIR=str(home),
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token if token is not None else cluster.token,
    )


def placement_file(root: Path) -> dict:
    return json.loads((root / "timings" / "profile_placement.json").read_text())


def placement(root: Path) -> dict[str, dict]:
    """Per node id: where the profile's units ran."""
    return {n["node"]: n for n in placement_file(root)["placement"]}


def same_table(root: Path) -> bool:
    table = (root / "artifacts" / "distortion.parquet").read_bytes()
    return table == (root / "serial.parquet").read_bytes()


def test_two_node_cluster_with_fractional_gpus(cluster, project, tmp_path):
    done = run_profile(
        project, client_env(cluster, tmp_path), address=cluster.address, gpus_per_task=0.5
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert same_table(project)
    nodes = placement(project)
    assert len(nodes) == 2 and cluster.node_ids == set(nodes)
    summary = placement_file(project)
    assert summary["nodes"] == 2 and summary["gpus"] >= 2
    for node in nodes.values():
        assert node["gpu_ids"] and set(node["gpu_ids"]) <= {"0", "1"}  # Ray's logical GPUs
        assert node["devices"] == ["cpu"]  # no CUDA here: each task fell back to the CPU
    assert "1 CPU + 0.5 GPU per task" in done.stderr
    assert "nodes 2/2" in done.stderr  # the progress bar says where units run


def _kill_first_task(cluster: Cluster, stop: threading.Event, killed: list[int]) -> None:
    """Kill (SIGKILL, by PID) the first worker process seen running a profiling unit."""
    while not stop.is_set():
        for node in cluster.nodes:
            for proc in node.tree():
                try:
                    if proc.cmdline()[:1] == ["ray::_ray_task"]:
                        os.kill(proc.pid, signal.SIGKILL)
                        killed.append(proc.pid)
                        return
                except (psutil.Error, IndexError):
                    continue
        time.sleep(0.02)


def test_worker_killed_mid_profile_is_retried(cluster, project, tmp_path):
    stop, killed = threading.Event(), []
    watcher = threading.Thread(target=_kill_first_task, args=(cluster, stop, killed))
    watcher.start()
    try:
        done = run_profile(project, client_env(cluster, tmp_path), address=cluster.address)
    finally:
        stop.set()
        watcher.join()
    assert killed, "no profiling task was seen running"
    assert done.returncode == 0, done.stderr[-3000:]
    assert same_table(project)
    units = sum(n["units"] for n in placement(project).values())
    assert units == placement_file(project)["units"]


def test_null_address_never_joins_a_running_cluster(cluster, project):
    # Same HOME (token) and RAY_TMPDIR as the head: a plain ray.init() would join it.
    head = cluster.nodes[0]
    env = clean_env(HOME=str(head.home), RAY_TMPDIR=str(head.tmp))
    jobs = job_count(cluster.address, cluster.token)
    done = run_profile(project, env, num_cpus=1)
    assert done.returncode == 0, done.stderr[-3000:]
    assert same_table(project)
    ours = set(placement(project))
    assert len(ours) == 1 and not ours & cluster.node_ids
    assert job_count(cluster.address, cluster.token) == jobs  # the cluster saw no driver


class _NotRay:
    """`python -m http.server` on a free port: answers, but is not Ray."""

    def __enter__(self) -> str:
        port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return f"127.0.0.1:{port}"
            time.sleep(0.1)
        raise AssertionError("http.server did not start")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def assert_one_line_error(done: subprocess.CompletedProcess, seconds: float, *words: str) -> None:
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    for word in words:
        assert word in errors[0], errors[0]
    assert seconds < 15, f"took {seconds:.1f} s"


@pytest.mark.parametrize(
    "case", ["unreachable", "not_ray", "no_token", "wrong_token", "too_many_gpus"]
)
def test_connection_failures_are_one_line_and_fast(case, cluster, project, tmp_path):
    env = client_env(cluster, tmp_path)
    ray: dict[str, object] = {"address": cluster.address}
    words = ["ray.address", cluster.address]
    if case == "unreachable":
        ray["address"] = words[1] = f"127.0.0.1:{free_port()}"
        words.append("unreachable")
    elif case == "no_token":
        env.pop("RAY_AUTH_MODE")
        words.append("requires token authentication")
    elif case == "wrong_token":
        env["RAY_AUTH_TOKEN"] = "0" * 32
        words.append("refused this process's token")
    elif case == "too_many_gpus":
        ray["gpus_per_task"] = 3
        words = ["ray.gpus_per_task = 3", "no node", "2 GPU"]
    start = time.monotonic()
    if case == "not_ray":
        with _NotRay() as address:
            ray["address"] = words[1] = address
            done = run_profile(project, env, **ray)
        words.append("is not a Ray cluster")
    else:
        done = run_profile(project, env, **ray)
    assert_one_line_error(done, time.monotonic() - start, *words)


def test_gpus_asked_of_a_cluster_without_gpus():
    with pytest.raises(PipelineError, match=r"ray.gpus_per_task = 0.5 .* has no GPUs"):
        plan_resources(RayParams(gpus_per_task=0.5), [{"CPU": 2.0}])


def test_more_cpus_than_any_node_has():
    nodes = [{"CPU": 2.0, "GPU": 1.0}, {"CPU": 1.0}]
    with pytest.raises(PipelineError, match=r"ray.cpus_per_task = 4: no node .* 2 CPU, 1 GPU"):
        plan_resources(RayParams(cpus_per_task=4), nodes)


def test_default_gpus_per_task_follows_the_cluster():
    assert plan_resources(RayParams(), [{"CPU": 2.0}]).gpus == 0
    plan = plan_resources(RayParams(), [{"CPU": 4.0, "GPU": 2.0}, {"CPU": 1.0, "GPU": 1.0}])
    assert (plan.gpus, plan.slots) == (1.0, 3)
    assert plan_resources(RayParams(gpus_per_task=0.25), [{"CPU": 8.0, "GPU": 1.0}]).slots == 4


@pytest.mark.parametrize(
    ("ray", "message"),
    [
        ({"gpus_per_task": 1.5}, r"ray.gpus_per_task = 1.5 .*a fraction in \[0, 1\] or a whole"),
        ({"gpus_per_task": -1}, r"ray.gpus_per_task = -1"),
        ({"cpus_per_task": 0}, r"ray.cpus_per_task = 0.0 .*positive"),
        ({"max_retries": -1}, r"ray.max_retries = -1 .*>= 0"),
        ({"work_units": 0}, r"ray.work_units = 0 .*>= 1"),
        ({"address": "10.0.0.1"}, r"ray.address = '10.0.0.1' is malformed; allowed: null, 'auto'"),
        (
            {"address": "10.0.0.1:6379", "num_cpus": 2},
            r"ray.num_cpus = 2 .*null when ray.address is set",
        ),
    ],
)
def test_bad_ray_params_name_the_key(ray, message):
    from pipeline.config.params import load_params

    with pytest.raises(PipelineError, match=message):
        load_params({"ray": ray})


def test_ray_address_env_is_honoured_only_when_ray_address_is_null(monkeypatch):
    from pipeline.edges.parallel.cluster import _target

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert _target(RayParams()) is None
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert _target(RayParams()) == ("RAY_ADDRESS", "10.0.0.1:6379")
    assert _target(RayParams(address="10.0.0.2:1")) == ("ray.address", "10.0.0.2:1")
    with pytest.raises(PipelineError, match=r"ray.num_cpus = 2 .*RAY_ADDRESS"):
        _target(RayParams(num_cpus=2))
