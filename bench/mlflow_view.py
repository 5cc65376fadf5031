"""A documented check of what a person sees in MLflow's UI: headless Chromium screenshots of a study.

Seeds a throw-away sqlite store with a small study as fsmeta logs it (a parent run
with the summary metrics and table, cells nested under it), serves it with
``mlflow server`` on 127.0.0.1, and screenshots three pages into ``--out``:

- ``experiment.png``: the experiment's bare link, ``#/experiments/<id>``;
- ``runs.png``: the same with ``?workflowType=machine_learning`` (the runs table);
- ``parent-metrics.png``: the parent run's Model metrics tab (the summary charts).

Needs Debian's ``chromium`` (``apt-get install chromium``). ``runs.png`` of a run on
2026-12-01 (MLflow 3.17.2) is docs/mlflow_runs.png; docs/user-guide.md says what the
three show.

    python bench/mlflow_view.py --out /tmp/mlflow-view
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def seed(uri: str) -> tuple[str, str]:
    from fsmeta.report import summarize, summary_metrics
    from fsmeta.tracking import Tracker

    tracker = Tracker(uri, "fsmeta")
    rows = [{"target": "synth-he", "arch": "fcrn", "pretraining": p, "selection": "random", "shots": k, "seed": s,
             "miou": base + (0.02 + 0.01 * s) * k}
            for p, base in (("meta-bce", 0.6), ("transfer", 0.5), ("scratch", 0.3)) for k in (1, 5) for s in (0, 1)]
    summary = summarize(rows)
    with tracker.run("demo", tags={"fsmeta.kind": "study"}) as parent:
        tracker.log_metrics(parent, summary_metrics(summary))
        tracker.log_table(parent, summary, "summary_table.json")
        for r in rows:
            with tracker.run(f"{r['pretraining']}/K{r['shots']}/s{r['seed']}", parent_run_id=parent,
                             tags={"fsmeta.kind": "cell"}) as cell:
                tracker.log_metrics(cell, {"iou": r["miou"]})
    return tracker._experiment_id, parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for the PNG screenshots")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("chromium is not installed (apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="fsmeta-mlflow-view-") as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        os.chdir(tmp)  # the store's artifacts go to ./mlruns
        experiment, parent = seed(uri)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
                                   "--port", str(port), "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            base = f"http://127.0.0.1:{port}"
            for _ in range(60):
                try:
                    urllib.request.urlopen(f"{base}/health", timeout=2)
                    break
                except OSError:
                    time.sleep(2)
            pages = {
                "experiment.png": f"{base}/#/experiments/{experiment}",
                "runs.png": f"{base}/#/experiments/{experiment}?workflowType=machine_learning",
                "parent-metrics.png": f"{base}/#/experiments/{experiment}/runs/{parent}/model-metrics?workflowType=machine_learning",
            }
            for name, url in pages.items():
                subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1500,1000",
                                "--virtual-time-budget=30000", f"--screenshot={out / name}", url],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120, check=True)
                print(f"{out / name}: {url}")
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
