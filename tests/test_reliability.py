"""Issue-9 promises: params reach the stages, bad input is one clear line, timings never sit in
a dependency, exactly one MLflow run per result, interrupts lose nothing."""

import ast
import http.server
import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.allocation.mckp import solve_mckp
from pipeline.allocation.problem import check_same_layers
from pipeline.edges import io, tables, tracking
from pipeline.edges.plots import allocations_figure, distortion_curves_figure, pareto_figure
from pipeline.errors import PipelineError
from pipeline.nn.models import build_model, normalize_state_dict, resolve_model
from stages import allocate, track, validate
from tests.conftest import resolved_dvc_yaml, write_params

REPO = Path(__file__).resolve().parents[1]


def copy_project(project: Path, dest: Path, **overrides) -> io.Paths:
    shutil.copytree(project, dest)
    write_params(dest, **overrides)
    return io.Paths(dest)


def runs_of(root: Path, deleted: bool = False):
    import mlflow
    from mlflow.entities import ViewType

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("rdprune")
    view = ViewType.ALL if deleted else ViewType.ACTIVE_ONLY
    return client.search_runs([experiment.experiment_id], run_view_type=view)


# ------------------------------------------------------------------ params reach the stages
@pytest.mark.parametrize(
    ("allocate_params", "ratio", "infeasible"),
    [({"exclude": ["fc"]}, 0.8, [0.99]), ({"limits": {"*": [0, 0.5]}}, 0.3, [0.55, 0.6, 0.99])],
)
def test_pareto_sweep_skips_and_reports_ratios_the_limits_forbid(
    project, tmp_path, allocate_params, ratio, infeasible
):
    sweep = [0.2, ratio, 0.55, 0.6, 0.99] if ratio == 0.3 else [0.5, ratio, 0.99]
    paths = copy_project(
        project,
        tmp_path / "p",
        prune={"ratio": ratio},
        allocate={**allocate_params, "pareto_ratios": sweep},
    )
    assert allocate.main(["--root", str(paths.root)]) == 0
    metrics = io.read_metrics(paths.metrics("allocate"))
    assert metrics["pareto_infeasible"] == [r for r in sweep if r in infeasible]
    front = io.read_csv(paths.plot("pareto"))
    assert [float(row["ratio"]) for row in front] == [r for r in sweep if r not in infeasible]


def test_progressive_allocation_recovers_only_as_the_prune_stage_does(
    project, tmp_path, monkeypatch
):
    import pipeline.pruning.repair

    calls = []
    real = pipeline.pruning.repair.Recovery.__call__

    def spy(self, *args):
        calls.append((self.objective, self.bn_rule))
        return real(self, *args)

    monkeypatch.setattr(pipeline.pruning.repair.Recovery, "__call__", spy)
    plain = {"reconstruct": None}
    off = {"prune": {"bn_recalibration": 0, **plain}, "profile": {"bn_correction": False}}
    bn_only = {"prune": plain}
    for name, overrides, expected in [
        ("off", off, []),
        ("bn", bn_only, [(None, "relative")] * 2),
        ("repair", {}, [("output", "relative")] * 2),
    ]:
        overrides = {**overrides, "profile": {**overrides.get("profile", {})}}
        if name != "repair":
            overrides["profile"]["reconstruct"] = False
        paths = copy_project(
            project,
            tmp_path / name,
            allocate={"steps": 2, "pareto_ratios": [0.5]},
            **overrides,
        )
        calls.clear()
        assert allocate.main(["--root", str(paths.root)]) == 0
        assert calls == expected, name
        assert io.read_metrics(paths.metrics("allocate"))["sparsity"] >= 0.6


def test_no_wall_clock_value_in_any_dvc_output(project):
    """Timings sit in timings/, which no stage depends on; every metrics file is data."""
    paths = io.Paths(project)
    for stage in ("validate", "baseline", "profile", "allocate", "prune", "finetune"):
        assert io.read_metrics(paths.timing(stage))["seconds"] >= 0
    for metrics in (project / "metrics").glob("*.json"):
        value = io.read_json(metrics)
        for entry in value if isinstance(value, list) else [value]:  # rounds.json: a list
            assert not [k for k in entry if "second" in k or "time" in k], metrics
    stages = resolved_dvc_yaml()["stages"]
    for name, stage in stages.items():
        assert not [d for d in stage["deps"] if d.startswith("timings")], name
        if name != "track":  # metrics are what people read; no stage's work may hinge on them
            assert not [d for d in stage["deps"] if d.startswith("metrics/")], name


# ------------------------------------------------------------------ one MLflow run per result
def test_track_finds_the_run_of_a_result_and_tags_each_experiment(project, tmp_path, monkeypatch):
    paths = copy_project(project, tmp_path / "t")
    (run,) = runs_of(paths.root)
    for exp_name in ("", "exp-a", "exp-b", "exp-a"):
        monkeypatch.setenv("DVC_EXP_NAME", exp_name)
        assert track.main(["--root", str(paths.root)]) == 0
    (again,) = runs_of(paths.root)
    assert again.info.run_id == run.info.run_id
    assert again.data.tags[tracking.EXP_NAMES_TAG] == "exp-a,exp-b"
    # another result (a different fine-tune) is another run
    metrics = io.read_metrics(paths.metrics("finetune"))
    io.write_metrics(paths.metrics("finetune"), {**metrics, "epochs": 99})
    assert track.main(["--root", str(paths.root)]) == 0
    assert len(runs_of(paths.root)) == 2


def test_the_run_holds_the_model_and_registers_one_version_per_result(project, tmp_path):
    import mlflow

    paths = copy_project(project, tmp_path / "m", track={"registered_model": "digits-rd"})
    metrics = io.read_metrics(paths.metrics("finetune"))
    io.write_metrics(paths.metrics("finetune"), {**metrics, "epochs": 42})  # a new result
    for _ in range(2):  # the second finds the run: no second version
        assert track.main(["--root", str(paths.root)]) == 0
    uri = f"sqlite:///{paths.root / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    (version,) = client.search_model_versions("name = 'digits-rd'")
    mlflow.set_tracking_uri(uri)
    try:
        logged = mlflow.pytorch.load_model(f"models:/digits-rd/{version.version}")
    finally:
        mlflow.set_tracking_uri(None)
    finetuned = build_model("digits_cnn", 1, 10)
    finetuned.load_state_dict(torch.load(paths.finetuned))
    inputs, _, _ = io.read_calibration(paths.calibration)
    network = logged  # the module of a torch.export program: no pickled code ran to load it
    with torch.no_grad():  # 32 images: the batch dimension is dynamic (the example had 2)
        torch.testing.assert_close(network(inputs), finetuned.eval()(inputs), rtol=0, atol=1e-6)
    assert int(sum((p == 0).sum() for p in network.parameters())) > 0  # the zeros came along


def test_track_prints_the_full_address_of_its_run(project, tmp_path, caplog):
    import logging

    paths = copy_project(project, tmp_path / "u")
    caplog.set_level(logging.INFO)
    assert track.main(["--root", str(paths.root)]) == 0
    (run,) = runs_of(paths.root)
    link = f"http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    assert link in caplog.text and "mlflow ui --backend-store-uri sqlite:///" in caplog.text
    assert tracking.run_link("https://mlflow.example/", "3", "abc") == (
        "https://mlflow.example/#/experiments/3/runs/abc"
    )


def test_interrupted_logging_leaves_no_run_and_a_rerun_logs_it_once(project, tmp_path, monkeypatch):
    import mlflow

    paths = copy_project(project, tmp_path / "i")
    metrics = io.read_metrics(paths.metrics("finetune"))
    io.write_metrics(paths.metrics("finetune"), {**metrics, "epochs": 7})  # a new result

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mlflow, "log_artifact", interrupt)
    with pytest.raises(KeyboardInterrupt):
        track.main(["--root", str(paths.root)])
    failed = [r for r in runs_of(paths.root) if r.info.status != "FINISHED"]
    assert len(failed) == 1 and failed[0].info.status == "FAILED"
    monkeypatch.undo()
    assert track.main(["--root", str(paths.root)]) == 0
    runs = runs_of(paths.root)
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]  # old result + this
    assert failed[0].info.run_id not in {r.info.run_id for r in runs}


# ------------------------------------------------------------------ the store, checked first
class NotMlflow(http.server.BaseHTTPRequestHandler):
    """A web server that is not MLflow, though it serves a file at /health."""

    def do_GET(self):  # noqa: N802
        body = b"a file named health"
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("kind", ["proc", "relative", "refused", "not-mlflow", "bogus"])
def test_unusable_tracking_store_is_one_line_at_the_start(project, tmp_path, capsys, kind):
    server = None
    if kind == "not-mlflow":
        server = http.server.HTTPServer(("127.0.0.1", 0), NotMlflow)
        threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = {
        "proc": "sqlite:////proc/x.db",
        "relative": "sqlite:///rel/x.db",
        "refused": "http://127.0.0.1:1",
        "not-mlflow": f"http://127.0.0.1:{server.server_port if server else 0}",
        "bogus": "bogus://x",
    }[kind]
    paths = copy_project(project, tmp_path / kind)
    write_params(paths.root)
    text = (paths.params.read_text()).replace(f"sqlite:///{paths.root / 'mlflow.db'}", uri)
    paths.params.write_text(text)
    start = time.monotonic()
    assert validate.main(["--root", str(paths.root)]) == 2
    assert time.monotonic() - start < 20
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: track.tracking_uri = '{uri}'")
    assert not (paths.root / "rel").exists()  # nothing written where it should not be
    if server:
        server.shutdown()


def test_a_deleted_experiment_is_one_line_at_the_start(project, tmp_path, capsys):
    import mlflow

    paths = copy_project(project, tmp_path / "deleted", track={"experiment": "gone"})
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{paths.root / 'mlflow.db'}")
    client.delete_experiment(client.create_experiment("gone"))
    assert validate.main(["--root", str(paths.root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: track.experiment = 'gone': experiment 'gone' is deleted in "
        f"sqlite:///{paths.root / 'mlflow.db'}; allowed: an active experiment or a new name "
        "(or `mlflow experiments restore`)"
    ]


# ------------------------------------------------------------------ readers reject clearly
def test_distortion_table_of_another_model_is_one_line(project, tmp_path, capsys):
    paths = copy_project(project, tmp_path / "d")
    curves = tables.read_distortion(paths.distortion)
    meta = tables.read_table_metadata(paths.distortion)
    renamed = type(curves)(**{**curves.__dict__, "layers": ["x", *curves.layers[1:]]})
    tables.write_distortion(paths.distortion, renamed, meta)
    before = paths.allocation.read_bytes()
    assert allocate.main(["--root", str(paths.root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: the distortion table was made for a different model")
    assert "'conv1'" in err[-1] or "'x'" in err[-1]
    assert paths.allocation.read_bytes() == before


def test_negative_distortion_is_rejected(project, tmp_path, capsys):
    paths = copy_project(project, tmp_path / "n")
    curves = tables.read_distortion(paths.distortion)
    mean = curves.mean.copy()
    mean[1, 2] = -999.0
    bad = type(curves)(**{**curves.__dict__, "mean": mean})
    tables.write_distortion(paths.distortion, bad, tables.read_table_metadata(paths.distortion))
    assert allocate.main(["--root", str(paths.root)]) == 2
    assert re.search(
        r"error: .*distortion of layer .* is -999.0; allowed: finite values >= 0",
        capsys.readouterr().err,
    )


def test_bad_model_import_path_and_non_state_dict_name_what_is_wrong():
    with pytest.raises(
        PipelineError, match=r"model.arch = 'math:pi' names a float, not a callable"
    ):
        resolve_model("math:pi")(1, 10)
    with pytest.raises(PipelineError, match=r"checkpoint /tmp/w.pt does not hold a state_dict"):
        normalize_state_dict([1, 2], "/tmp/w.pt")
    with pytest.raises(PipelineError, match=r"different model .*'b': None vs 5 weights"):
        check_same_layers(["a"], [3], {"a": 3, "b": 5}, "the table")


def test_infeasible_budget_says_what_is_kept_and_what_to_change():
    with pytest.raises(PipelineError) as info:
        solve_mckp(np.array([[10, 5], [10, 5]]), np.array([[0.0, 1.0], [0.0, 1.0]]), [4])
    assert str(info.value) == (
        "keeping at most 4 is infeasible: the sparsest levels the limits allow keep 10; "
        "allowed: a lower ratio, or looser allocate.limits / allocate.exclude"
    )


# ------------------------------------------------------------------ what people look at
def test_figures_are_written_byte_deterministically(project):
    paths = io.Paths(project)
    for figure in paths.figures():
        assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", figure
    curves = tables.read_distortion(paths.distortion)
    fig = distortion_curves_figure(curves)
    assert len(fig.axes[0].lines) == len(curves.layers) and fig.axes[0].get_yscale() == "log"
    allocation = tables.read_allocation(paths.allocation)
    fig = allocations_figure({"rd": allocation, "same": allocation}, 0.6)
    assert len(fig.axes[0].patches) == 2 * len(allocation.layers)
    fig = pareto_figure([0.5, 0.6], [1.0, 2.0], 0.6)
    assert list(fig.axes[0].lines[0].get_xdata()) == [0.5, 0.6]
    out = project.parent / "again.png"
    io.write_figure(out, distortion_curves_figure(curves))
    assert out.read_bytes() == paths.figure("distortion_curves").read_bytes()


def test_training_reports_each_epoch_as_it_ends():
    import torch
    from torch.utils.data import TensorDataset

    from pipeline.config.sections import TrainParams
    from pipeline.nn.training import train

    events = []
    data = TensorDataset(torch.randn(32, 4), torch.randint(0, 3, (32,)))
    model = torch.nn.Linear(4, 3)
    train(
        model,
        data,
        TrainParams(epochs=3, batch_size=8),
        seed=0,
        evaluate=lambda m: events.append(("evaluate", m.weight.detach().clone())) or 0.5,
        on_epoch=lambda stats: events.append(("epoch", stats.epoch)),
    )
    assert [e[0] for e in events] == ["evaluate", "epoch"] * 3
    assert [e[1] for e in events if e[0] == "epoch"] == [1, 2, 3]


def test_every_imported_package_is_declared():
    """Install noise: a module the code imports must be a declared dependency."""
    from importlib.metadata import metadata

    meta = metadata("rdprune")  # as installed from pyproject.toml
    requires = [r for r in meta.get_all("Requires-Dist") if "extra ==" not in r]
    declared = {re.split(r"[\[<>=!~ ;(]", r)[0].lower() for r in requires}
    assert meta["License-Expression"] == "MIT"  # SPDX, not the deprecated table
    aliases = {"sklearn": "scikit-learn", "yaml": "pyyaml", "PIL": "pillow", "grpc": "grpcio"}
    own = {"pipeline", "stages", "tests"}
    imported = set()
    for folder in ("pipeline", "stages"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    imported |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    imported.add(node.module.split(".")[0])
    import sys

    third_party = {m for m in imported if m not in sys.stdlib_module_names and m not in own}
    transitive = {"pillow"}  # torchvision's own dependency, imported only through it
    missing = {aliases.get(m, m).lower() for m in third_party} - declared - transitive
    assert not missing


def test_tracking_uri_resolution_and_project_root(tmp_path, monkeypatch):
    queued = tmp_path / "proj" / ".dvc" / "tmp" / "exps" / "tmpabc123"
    queued.mkdir(parents=True)
    assert tracking.project_root(queued) == tmp_path / "proj"  # a queued copy logs home
    assert tracking.project_root(tmp_path / "proj") == tmp_path / "proj"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    default = f"sqlite:///{tmp_path / 'proj' / 'mlflow.db'}"
    assert tracking.resolve_tracking_uri(None, queued) == default
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert tracking.resolve_tracking_uri(None, queued) == "http://mlflow.example:5000"
    assert tracking.resolve_tracking_uri("sqlite:////x.db", queued) == "sqlite:////x.db"


def test_a_second_sigterm_cannot_cut_the_clean_up_short():
    """The parent-death signal and the watchdog may both send SIGTERM: the first unwinds the
    stage, later ones are ignored while it cleans up (e.g. ends its MLflow run FAILED)."""
    import signal

    from pipeline.edges.supervise import raise_on_sigterm

    previous = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, raise_on_sigterm)
        with pytest.raises(SystemExit) as info:
            raise_on_sigterm(signal.SIGTERM, None)
        assert info.value.code == 128 + signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_dvc_yaml_names_its_paths_once_and_its_stages_in_order():
    """Every artifact path comes from pipeline/paths.yaml (``${paths.*}``), and the stages are
    those the code lists (timings, MLflow), in the same order."""
    import pipeline.edges.stage

    text = (REPO / "dvc.yaml").read_text()
    body = text[text.index("stages:") :]
    assert not re.findall(r"(?<![\w/{.])(artifacts|metrics|plots|timings)/", body)
    assert list(resolved_dvc_yaml()["stages"]) == list(pipeline.edges.stage.STAGES)
