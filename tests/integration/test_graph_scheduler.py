"""study.scheduler=graph: the study as a dependency graph on Ray gives the in-process table bit for bit,
and resumes with only the missing work after a killed driver and after a lost node."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from fsmeta import benchmark
from fsmeta.tracking import Tracker

OFF = Tracker(enabled=False)
REPO = Path(__file__).resolve().parents[2]
GRID = [
    "data.sources=[]",
    "study.datasets=[synth-fluo, synth-nuclei, synth-he]",
    "study.targets=[synth-he]",
    "study.pretrainings=[meta-bce, transfer, scratch]",
    "study.overlays=0",
    "eval.seeds=[0, 1]",
    "threads=1",
]


def records(out: Path) -> list[Path]:
    """The recorded cells (not the temporary file of a write the kill interrupted)."""
    return [p for p in (out / "cells").glob("*.json") if not p.name.startswith(".")]


def schedule(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / benchmark.SCHEDULE_FILE).read_text().splitlines()]


def test_graph_scheduler_equals_the_in_process_run_bit_for_bit(tiny_config, tmp_path, ray_session):
    ray_session()
    local = tiny_config(*GRID, "study.executor=local")
    benchmark.run_benchmark(local, tmp_path / "local", OFF, progress=False)
    # The meta-training runs its two source actors inside the unit's placement group.
    on_graph = tiny_config(*GRID, "study.executor=ray", "study.scheduler=graph", "meta.backend=ray")
    benchmark.run_benchmark(on_graph, tmp_path / "graph", OFF, progress=False)
    assert (tmp_path / "graph" / "results.csv").read_bytes() == (tmp_path / "local" / "results.csv").read_bytes()
    spans = {s["unit"]: s for s in schedule(tmp_path / "graph")}
    assert len(spans) == 3 + 12  # every pre-training and cell once
    assert spans["meta/synth-he/fcrn/meta-bce"]["cpus"] == pytest.approx(1.0 + 2 * 0.5)  # driver + 2 actors of (2 − 1) / 2 CPUs
    for s in spans.values():  # each cell after its model
        if s["kind"] == "cell":
            model = s["unit"].split("__")[2]
            kind = "meta" if model.startswith("meta-") else model
            assert s["start"] >= spans[f"{kind}/synth-he/fcrn/{model}"]["end"]


def test_a_killed_driver_resumes_with_only_the_missing_work(tiny_config, tmp_path, ray_session):
    ray = ray_session()
    benchmark.run_benchmark(tiny_config(*GRID, "study.executor=local"), tmp_path / "local", OFF, progress=False)
    cfg = tiny_config(*GRID, "study.executor=ray", "study.scheduler=graph", "meta.iterations=6")
    ref = tiny_config(*GRID, "study.executor=local", "meta.iterations=6")
    benchmark.run_benchmark(ref, tmp_path / "ref", OFF, progress=False)
    config_file = tmp_path / "graph.yaml"
    config_file.write_text(yaml.safe_dump(cfg.to_dict()))
    out = tmp_path / "graph"
    script = ("import sys; from fsmeta.config import load_config; from fsmeta.benchmark import run_benchmark; "
              "from fsmeta.tracking import Tracker; run_benchmark(load_config(sys.argv[1]), sys.argv[2], Tracker(enabled=False), progress=False)")
    # The driver attaches to the session's instance, so its own death is the only fault.
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-c", script, str(config_file), str(out)], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while proc.poll() is None and time.monotonic() < deadline and len(records(out)) < 2:
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    recorded = {p.name: p.stat().st_mtime_ns for p in records(out)}
    finished = {p: p.stat().st_mtime_ns for p in (out / "pretrained").rglob("*.safetensors") if p.parent.name != "checkpoints"}
    assert 2 <= len(recorded) < 12 and finished
    before = len(schedule(out))

    rows = benchmark.run_benchmark(cfg, out, OFF, resume=True, progress=False)
    assert len(rows) == 12
    assert (out / "results.csv").read_bytes() == (tmp_path / "ref" / "results.csv").read_bytes()
    assert {p.name: p.stat().st_mtime_ns for p in records(out) if p.name in recorded} == recorded
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # finished pre-trainings are not re-run
    rerun = {s["unit"] for s in schedule(out)[before:]}
    assert not rerun & {name[: -len(".json")] for name in recorded}
    assert len([u for u in rerun if "__" in u]) == 12 - len(recorded)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_node_lost_mid_study_reruns_only_its_work(tiny_config, tmp_path, ray_session):
    import ray
    from ray.cluster_utils import Cluster

    longer = ["meta.iterations=8", "meta.inner_steps=10"]  # long enough for the node loss to land inside the meta-training
    benchmark.run_benchmark(tiny_config(*GRID, *longer, "study.executor=local"), tmp_path / "local", OFF, progress=False)
    ray.shutdown()  # this test needs a cluster of its own; the next user restarts the session's instance
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    outcome: dict = {}
    out = tmp_path / "graph"
    try:
        nodes = [cluster.add_node(num_cpus=2), cluster.add_node(num_cpus=2)]
        ray.init(address=cluster.address, logging_level="WARNING")
        cluster.wait_for_nodes()
        cfg = tiny_config(*GRID, *longer, "study.executor=ray", "study.scheduler=graph", "meta.backend=ray", "ray.cpus_per_worker=1")

        def run():
            try:
                outcome["rows"] = benchmark.run_benchmark(cfg, out, OFF, progress=False)
            except BaseException as exc:  # handed to the main thread
                outcome["error"] = exc

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        last = out / "pretrained" / "synth-he" / "fcrn" / "meta-bce" / "checkpoints" / "meta-last.safetensors"
        deadline = time.monotonic() + 180
        while not last.is_file() and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert last.is_file(), outcome.get("error", "no meta-training checkpoint in 180 s")
        # Lose a node mid-study (in the main thread: add_node installs signal handlers), then replace it.
        cluster.remove_node(nodes[0], allow_graceful=False)
        nodes.append(cluster.add_node(num_cpus=2))
        thread.join(480)
        assert not thread.is_alive(), "the study did not finish within 480 s of the node loss"
        if "error" in outcome:
            raise outcome["error"]
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert (out / "results.csv").read_bytes() == (tmp_path / "local" / "results.csv").read_bytes()
    cells = [s["unit"] for s in schedule(out) if s["kind"] == "cell"]
    assert len(cells) == len(set(cells)) == 12  # every cell recorded once
