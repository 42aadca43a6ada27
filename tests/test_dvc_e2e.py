"""The real thing: `dvc repro` in a temporary git checkout, a ratio change, bad input.

Runs real DVC, a real local Ray instance and a real MLflow sqlite store (~1-2 min).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import pipeline.edges.stage

REPO = Path(__file__).resolve().parents[1]
FAST = {
    "baseline": {"epochs": 3},
    "calibrate": {"samples": 64},
    "profile": {"levels": 11},
    "finetune": {"epochs": 2},
    "ray": {"num_cpus": 2},
}
STAGES = list(pipeline.edges.stage.STAGES)  # dvc.yaml's stages, in order
ALWAYS = ["validate", "track"]  # always_changed: they run on every repro

pytestmark = pytest.mark.slow


def sh_env() -> dict[str, str]:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
        "DVC_NO_ANALYTICS": "1",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PATH"] = (
        f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # this venv's dvc/python
    )
    return env


def wait_for_child(parent: int, marker: str, timeout: float) -> int:
    """The pid of a descendant process of ``parent`` whose command line holds ``marker``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            grandparent = Path(f"/proc/{ppid}/stat")
            try:  # DVC runs commands through $SHELL -c: dash keeps a shell in between
                gppid = int(grandparent.read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                gppid = -1
            if marker in cmdline and parent in (ppid, gppid):
                return int(proc.name)
        time.sleep(0.2)
    raise AssertionError(f"no child {marker!r} of {parent} within {timeout} s")


def sh(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=sh_env(), capture_output=True, text=True)
    if check and result.returncode:
        raise AssertionError(
            f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


def edit_params(root: Path, section: str, key: str, value) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params[section][key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def ran(output: str) -> list[str]:
    """The stages that did work: ran, not skipped nor restored from the run-cache."""
    return [
        s
        for s in STAGES
        if f"Running stage '{s}'" in output and f"Stage '{s}' is cached" not in output
    ]


def mlflow_runs(root: Path) -> list:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    return client.search_runs([client.get_experiment_by_name("rdprune").experiment_id])


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clone")
    files = sh(REPO, "git", "ls-files", "--cached", "--others", "--exclude-standard").stdout.split()
    for name in files:
        if (REPO / name).is_file() and not name.startswith("tests/"):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    (root / "dvc.lock").unlink(missing_ok=True)
    params = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in FAST.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(root, "git", "init", "-q")
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-qm", "init")
    return root


def test_repro_ratio_change_mlflow_and_bad_input(checkout):
    root = checkout
    first = sh(root, "dvc", "repro")
    assert ran(first.stdout) == STAGES
    for out in (
        "baseline.pt",
        "calibration.pt",
        "distortion.parquet",
        "allocation.parquet",
        "pruned.pt",
        "finetuned.pt",
    ):
        assert (root / "artifacts" / out).is_file(), out
    status = sh(root, "dvc", "status").stdout
    assert [line for line in status.splitlines() if line.strip().endswith(":")] == [
        f"{s}:" for s in ALWAYS
    ]  # only the two always_changed stages, nothing stale

    # Editing prune.ratio reruns exactly allocate, prune and finetune.
    edit_params(root, "prune", "ratio", 0.5)
    second = sh(root, "dvc", "repro")
    assert ran(second.stdout) == ["validate", "allocate", "prune", "finetune", "export", "track"]
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-qm", "ratio 0.5")
    runs = mlflow_runs(root)
    assert sorted(r.data.params["prune.ratio"] for r in runs) == ["0.5", "0.8"]
    assert all(r.data.metrics["sparsity"] >= float(r.data.params["prune.ratio"]) for r in runs)

    # The same result again is the same run: a forced fine-tune, a Pareto-only edit.
    assert ran(sh(root, "dvc", "repro", "-f", "-s", "finetune").stdout) == ["finetune"]
    assert ran(sh(root, "dvc", "repro").stdout) == ALWAYS
    edit_params(root, "allocate", "pareto_ratios", [0.3, 0.5, 0.7])
    assert ran(sh(root, "dvc", "repro").stdout) == ["validate", "allocate", "track"]
    assert len(mlflow_runs(root)) == 2
    sh(root, "git", "checkout", "params.yaml")
    sh(root, "dvc", "repro")

    # A DVC experiment restored from the run-cache finds the run that holds its result.
    sh(root, "dvc", "exp", "run", "-n", "back-to-08", "-S", "prune.ratio=0.8")
    runs = mlflow_runs(root)
    assert len(runs) == 2
    (run08,) = [r for r in runs if r.data.params["prune.ratio"] == "0.8"]
    assert "back-to-08" in run08.data.tags["dvc.exp_names"].split(",")
    sh(root, "git", "checkout", "params.yaml", "dvc.lock")
    sh(root, "dvc", "checkout")

    # Bad input: one clear line, non-zero exit, even where every other stage is up to date;
    # after the params are put back, checkout restores.
    allocation = (root / "artifacts" / "allocation.parquet").read_bytes()
    good_params = (root / "params.yaml").read_text()
    for section, key, value, message in [
        ("prune", "ratio", 1.5, "error: prune.ratio = 1.5"),
        ("model", "arch", "resnet9000", "error: model.arch = 'resnet9000'"),
        ("allocate", "method", "magic", "error: allocate.method = 'magic'"),
        ("prune", "ration", 0.5, "error: unknown param prune.ration in section prune"),
        ("calibrate", "size", 128, "error: param calibrate.size has a name DVC's run-cache"),
        ("seed", None, None, "error: unknown param sead in params.yaml"),
    ]:
        if section == "seed":
            (root / "params.yaml").write_text(good_params + "sead: 3\n")
        else:
            edit_params(root, section, key, value)
        bad = sh(root, "dvc", "repro", check=False)
        assert bad.returncode != 0
        assert message in bad.stderr + bad.stdout
        assert ran(bad.stdout) == ["validate"]  # it stopped before any work
        (root / "params.yaml").write_text(good_params)
        sh(root, "dvc", "checkout")
        assert (root / "artifacts" / "allocation.parquet").read_bytes() == allocation
    assert len(mlflow_runs(root)) == 2

    # Figures render offline in `dvc plots show` (images, not CDN-loaded vega).
    sh(root, "dvc", "plots", "show", "--out", "dvc_plots")
    html = (root / "dvc_plots" / "index.html").read_text()
    for name in ("distortion_curves", "allocation", "pareto", "joint_distortion"):
        assert re.search(rf'<img src="[^"]*{name}\.png"', html), name

    # Another repair objective reruns exactly the stages that read prune.reconstruct (the
    # curves of a layer pruned alone are the same under both objectives): allocate (its
    # candidates would be measured after the repair), prune, finetune, and the schedule (its
    # rounds repair; with rounds 0 it has nothing to do); the paper's plain method (no
    # repair, plain curves) reruns the profile too.
    edit_params(root, "prune", "reconstruct", "layerwise")
    changed = ["validate", "allocate", "prune", "finetune", "schedule", "export", "track"]
    assert ran(sh(root, "dvc", "repro").stdout) == changed
    metrics = json.loads((root / "metrics" / "prune.json").read_text())
    assert metrics["measured_distortion"] < metrics["measured_distortion_before_repair"]
    edit_params(root, "prune", "reconstruct", None)
    edit_params(root, "profile", "reconstruct", False)
    assert ran(sh(root, "dvc", "repro").stdout) == changed[:1] + ["profile"] + changed[1:]
    assert "accuracy_before_bn_recalibration" in (root / "metrics" / "prune.json").read_text()
    assert len(mlflow_runs(root)) == 4
    (root / "params.yaml").write_text(good_params)
    sh(root, "dvc", "checkout")


VEGA_PLOTS = [
    "plots_allocation_csv",
    "plots_pareto_csv",
    "plots_finetune_csv",
    "metrics_rounds_json",
]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_plots_page_draws_every_plot_offline(checkout, tmp_path):
    """`dvc plots show` writes a page that needs no network: Vega is inlined from the
    template .dvc/config names; in headless Chromium with every host unreachable, each
    declared Vega plot is drawn (a canvas in its div) and each figure is a local image."""
    root = checkout
    sh(root, "dvc", "plots", "show", "-o", str(tmp_path / "page"))
    page = (tmp_path / "page" / "index.html").read_text()
    assert not re.search(r"<script[^>]+src=", page)  # nothing loaded from anywhere
    assert "vega-lite" in page.lower()
    for div in VEGA_PLOTS:
        assert f"vegaEmbed('#{div}'" in page, div
    images = re.findall(r'<img src="(static/[^"]+)"', page)
    assert len(images) == 4 and all((tmp_path / "page" / i).is_file() for i in images)
    if CHROMIUM is None:
        pytest.skip("no chromium: the page's scripts were checked, not run")
    dom = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--proxy-server=127.0.0.1:9",  # offline: nothing can be fetched
            "--host-resolver-rules=MAP * ~NOTFOUND",
            "--virtual-time-budget=15000",
            "--dump-dom",
            (tmp_path / "page" / "index.html").as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    ).stdout
    for div in VEGA_PLOTS:
        start = dom.index(f'id="{div}"')
        assert "<canvas" in dom[start : start + 4000], f"{div} was not drawn"


def test_the_readme_comparison_prints_the_columns_it_promises(checkout):
    """The README's `dvc exp show` recipe, run as written: one row per experiment and
    exactly the seven columns it names (metrics/result.json is the one metrics file)."""
    root = checkout
    text = (REPO / "README.md").read_text()
    start = text.index("dvc exp show --drop")
    recipe = text[start : text.index("```", start)].replace("\\\n", " ").strip()
    out = subprocess.run(
        recipe + " --no-pager",
        shell=True,
        cwd=root,
        env={**sh_env(), "COLUMNS": "200"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    header = next(line for line in out.splitlines() if "Experiment" in line).split()
    assert header[0] == "Experiment"
    assert sorted(header[1:]) == [
        "accuracy",
        "allocate.method",
        "flops_reduction",
        "measured_distortion",
        "prune.ratio",
        "sparsity",
    ]


def test_killing_dvc_stops_its_stage(checkout):
    """SIGTERM to `dvc repro` ends the running stage too: no orphan writes outputs later."""
    root = checkout
    sh(root, "dvc", "repro")  # an earlier state to come back to (a no-op after the test above)
    good_params = (root / "params.yaml").read_text()
    edit_params(root, "baseline", "epochs", 500)  # minutes of training
    baseline = root / "artifacts" / "baseline.pt"
    log = open(root / "killed.log", "w")  # noqa: SIM115 (a pipe nobody reads would block)
    proc = subprocess.Popen(
        ["dvc", "repro"],
        cwd=root,
        env={**sh_env(), "SHELL": "/bin/sh"},  # dash: a shell stays between dvc and the stage
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        stage_pid = wait_for_child(proc.pid, "stages.baseline", timeout=60)
        time.sleep(2)  # well into training
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 15
        while Path(f"/proc/{stage_pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not Path(f"/proc/{stage_pid}").exists(), "the stage outlived dvc"
        assert not baseline.exists()
        assert not list((root / "artifacts").glob(".baseline.pt.*"))  # no temporary left
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
        (root / "killed.log").unlink()
        (root / "params.yaml").write_text(good_params)
    sh(root, "dvc", "checkout")
    assert baseline.is_file()  # the earlier state is restorable


def test_schedule_runs_its_rounds_and_resumes_through_dvc(checkout):
    """Two rounds on the digits default: only the schedule stage runs (one-shot outputs stay);
    MLflow gets one parent run with the rounds as steps and a nested run per round; a third
    round resumes after the first two, which DVC kept (persist) and the stage reuses."""
    import mlflow

    root = checkout
    sh(root, "dvc", "repro")
    one_shot = (root / "artifacts" / "finetuned.pt").read_bytes()
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["schedule"].update(rounds=2, epochs=1)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh(root, "dvc", "repro")
    assert ran(out.stdout) == ["validate", "schedule", "export", "track"]  # the last round
    assert (root / "artifacts" / "finetuned.pt").read_bytes() == one_shot
    entries = json.loads((root / "metrics" / "rounds.json").read_text())
    assert [e["round"] for e in entries] == [1, 2]
    assert [round(e["sparsity"], 3) for e in entries] == [0.2, 0.36]

    runs = mlflow_runs(root)
    (parent,) = [
        r
        for r in runs
        if r.data.tags.get("rdprune.stage") == "schedule"
        and "mlflow.parentRunId" not in r.data.tags
    ]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(c.data.params["round"] for c in children) == ["1", "2"]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    history = client.get_metric_history(parent.info.run_id, "round_accuracy")
    assert sorted(m.step for m in history) == [1, 2]

    shown = json.loads(sh(root, "dvc", "plots", "show", "--json").stdout)
    assert "metrics/rounds.json" in shown["data"]  # accuracy vs sparsity over the rounds

    first = (root / "artifacts" / "rounds" / "round_001" / "model.pt").read_bytes()
    edit_params(root, "schedule", "rounds", 3)
    out = sh(root, "dvc", "repro")
    assert ran(out.stdout) == ["validate", "schedule", "export", "track"]  # the last round
    assert "round 1: reused" in out.stdout + out.stderr
    assert "round 2: reused" in out.stdout + out.stderr
    assert (root / "artifacts" / "rounds" / "round_001" / "model.pt").read_bytes() == first
    assert len(json.loads((root / "metrics" / "rounds.json").read_text())) == 3
    status = sh(root, "dvc", "status").stdout
    assert [line for line in status.splitlines() if line.strip().endswith(":")] == [
        f"{s}:" for s in ALWAYS
    ]
