"""Check what a person sees of a finished run in a real (headless Chromium) browser.

Starts ``mlflow ui`` on loopback against ``<root>/mlflow.db``, then with headless Chromium
screenshots and DOM-dumps:

* the link the README and the track stage give, ``#/experiments/<id>?workflowType=
  machine_learning``: must NOT be the GenAI overview ("No data available ..." traces/tokens
  dashboard) but the training runs, listing every run;
* the bare ``#/experiments/<id>``, only reported: MLflow 3.17's UI picks that page by the
  browser's own GenAI / Model-training switch (localStorage, default GenAI), not by the
  experiment's ``mlflow.experimentKind`` tag, which the project sets all the same;
* the runs page ``#/experiments/<id>/runs``: must list every run name of the experiment;
* the ``dvc plots show`` page (written to --out, not into the project): must show the PNG
  figures, whose files must exist and be PNGs. Vega (CSV) plots load vega from a CDN and are
  only reported.

Run: ``python benchmarks/ui_check.py [--root PROJECT] [--out DIR]``; exit 1 on any failure.
Needs ``chromium`` (``apt-get install -y chromium``) and the project's venv (mlflow, dvc).
"""

from __future__ import annotations

import argparse
import contextlib
import html
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from mlflow import MlflowClient

GENAI_MARKERS = ("No data available for the selected time range", "Token Usage", "Overview - ")
PNG_FIGURES = ("distortion_curves", "allocation", "pareto", "joint_distortion")
CHROMIUM_FLAGS = [f"--{f}" for f in ("headless", "no-sandbox", "disable-gpu", "disable-quic")]
CHROMIUM_FLAGS += [f"--{f}" for f in ("no-first-run", "disable-background-networking")]
CHROMIUM_FLAGS += [f"--{f}" for f in ("disable-component-update", "disable-sync")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(root: Path, port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, *f"-m mlflow ui --host 127.0.0.1 --port {port}".split()]
    cmd += ["--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"]
    with log.open("w") as fh:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow ui exited with {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(2)
    stop_ui(proc)
    raise RuntimeError(f"mlflow ui did not answer /health within 120 s; see {log}")


def stop_ui(proc: subprocess.Popen) -> None:
    """SIGTERM the UI's process group (its PID), then SIGKILL what lingers (job consumers)."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)


def browse(url: str, png: Path, budget_ms: int, size: str = "1400,900") -> str:
    """Screenshot ``url`` into ``png`` and return the rendered DOM."""
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        cmd = ["chromium", *CHROMIUM_FLAGS, f"--window-size={size}", "--dump-dom"]
        cmd += [f"--virtual-time-budget={budget_ms}", f"--user-data-dir={profile}"]
        out = subprocess.run([*cmd, f"--screenshot={png}", url], capture_output=True, text=True)
    if not png.is_file():
        raise RuntimeError(f"chromium wrote no screenshot for {url}: {out.stderr[-500:]}")
    return out.stdout


def text_of(dom: str) -> str:
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom))).strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "ui_check")
    args = ap.parse_args()
    root, out = args.root.resolve(), args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    t0 = time.monotonic()

    def check(ok: bool, what: str, why: str) -> None:
        print(f"{'PASS' if ok else 'FAIL'}: {what}" + ("" if ok else f" -- {why}"))
        if not ok:
            failures.append(what)

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("rdprune")
    if exp is None:
        print("FAIL: no experiment 'rdprune' in", root / "mlflow.db")
        return 1
    names = [r.info.run_name for r in client.search_runs([exp.experiment_id])]
    print(f"experiment rdprune id={exp.experiment_id} tags={exp.tags} runs={names}")
    port = free_port()
    proc = start_ui(root, port, out / "mlflow_ui.log")
    try:
        base = f"http://127.0.0.1:{port}/#/experiments/{exp.experiment_id}"
        pages = {
            "landing": base,
            "landing_ml": f"{base}?workflowType=machine_learning",
            "runs": f"{base}/runs",
        }
        for page, url in pages.items():
            text = text_of(browse(url, out / f"mlflow_{page}.png", 25000))
            print(f"{page}: {url} -> {out / f'mlflow_{page}.png'}\n  DOM text: {text[:160]!r}")
            genai = [m for m in GENAI_MARKERS if m in text]
            missing = [n for n in names if n not in text]
            if page == "landing":
                # 3.17 picks this page by the sidebar's workflowType (localStorage
                # mlflow.workflowType_v1, default genai), not by the experimentKind tag.
                print(f"INFO: bare landing page is {'GenAI' if genai else 'training runs'}")
                continue
            if page != "runs":
                check(not genai, f"{page} is not the GenAI overview", f"DOM has {genai}")
            check(bool(names) and not missing, f"{page} lists all runs", f"missing {missing}")
    finally:
        stop_ui(proc)

    plots = out / "dvc_plots"
    res = subprocess.run(
        ["dvc", "plots", "show", "--out", str(plots)], cwd=root, capture_output=True, text=True
    )
    check(res.returncode == 0, "dvc plots show", res.stderr[-500:])
    dom = browse((plots / "index.html").as_uri(), out / "dvc_plots.png", 8000, "1400,2400")
    print(f"dvc plots: {plots / 'index.html'} -> {out / 'dvc_plots.png'}")
    for fig in PNG_FIGURES:
        m = re.search(rf'<img[^>]*src="([^"]*[/_]{fig}\.png)"', dom)
        src = plots / m.group(1) if m else None
        data = src.read_bytes() if src is not None and src.is_file() else b""
        ok = (
            data[:8] == b"\x89PNG\r\n\x1a\n"
            and data == (root / "plots" / f"{fig}.png").read_bytes()
        )
        check(ok, f"plots page shows {fig}.png", f"<img> missing, or not plots/{fig}.png: {src}")
    for div_id, body in re.findall(r'<div id="(plots_\w+_csv)"[^>]*>(.*?)</div>', dom, flags=re.S):
        drawn = "<svg" in body or "<canvas" in body  # vega-embed draws one of these
        state = "INFO: drawn" if drawn else "WARN: not drawn (vega.js comes from a CDN)"
        print(f"{state}: vega plot {div_id}")
    print(
        f"{'PASS' if not failures else 'FAIL'} ({len(failures)} failed) in "
        f"{time.monotonic() - t0:.0f} s; screenshots in {out}"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
