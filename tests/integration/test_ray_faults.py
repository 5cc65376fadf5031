"""Faults during Ray meta-training never change the result: actor kill, node loss, driver kill + resume.

Every task is a pure function of (θ, task spec), so a re-run task returns the
same θ_m; the reference is the sequential backend with the same thread count
(one torch thread, as in each actor), which the ray backend matches bit for bit.
"""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from fsmeta.checkpoint import load_checkpoint
from fsmeta.tracking import Tracker
from fsmeta.train import meta_train

OFF = Tracker(enabled=False)
REPO = Path(__file__).resolve().parents[2]


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def reference(cfg, out: Path):
    """The uninterrupted sequential run of the same configuration."""
    cfg.meta.backend = "sequential"
    state, _ = load_checkpoint(meta_train(cfg, out, OFF, progress=False))
    return state


def train_with_fault(monkeypatch, cfg, out: Path, iteration: int, fault) -> tuple[dict, dict]:
    """Meta-train in a thread and call ``fault(backend)`` from this (main) thread while ``iteration`` is in flight.

    The fault runs in the main thread because ``Cluster.add_node`` installs signal
    handlers. Returns the final θ and the workers' pids before the fault and after
    that iteration.
    """
    from fsmeta.meta import driver

    seen: dict = {}
    started, outcome = threading.Event(), {}
    original = driver.RayBackend.run

    def run(self, theta, tasks):
        if tasks[0].iteration != iteration:
            return original(self, theta, tasks)
        seen["before"] = [w["pid"] for w in self.worker_info()]
        seen["backend"] = self
        started.set()
        out = original(self, theta, tasks)
        seen["after"] = [w["pid"] for w in self.worker_info()]
        return out

    def train():
        try:
            outcome["path"] = meta_train(cfg, out, OFF, progress=False)
        except BaseException as exc:  # handed to the main thread
            outcome["error"] = exc
            started.set()

    monkeypatch.setattr(driver.RayBackend, "run", run)
    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    assert started.wait(120), "iteration never started"
    if "error" not in outcome:
        time.sleep(0.3)  # into the iteration: each call runs for about a second
        fault(seen["backend"])
    thread.join(240)
    assert not thread.is_alive(), "meta-training did not finish within 240 s of the fault"
    if "error" in outcome:
        raise outcome["error"]
    state, _ = load_checkpoint(outcome["path"])
    return state, seen


def test_worker_killed_mid_iteration_is_restarted_with_the_same_result(tiny_config, tmp_path, ray_session, monkeypatch):
    ray = ray_session()
    # 30 inner steps make each call last long enough that the kill lands inside it.
    cfg = tiny_config("meta.backend=ray", "threads=1", "meta.iterations=2", "meta.inner_steps=30")

    def kill_second_worker(backend):
        ray.kill(backend.workers[1], no_restart=False)

    faulty, seen = train_with_fault(monkeypatch, cfg, tmp_path / "ray", 1, kill_second_worker)
    assert seen["before"][0] == seen["after"][0] and seen["before"][1] != seen["after"][1]  # restarted
    assert_same_state(faulty, reference(cfg, tmp_path / "seq"))


# The head's health checks at their fastest: a lost node is declared dead in about a
# second instead of Ray's ~16 s default, so the default suite can afford the test.
FAST_NODE_LOSS = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 300,
                  "health_check_timeout_ms": 300, "health_check_failure_threshold": 3}


@pytest.mark.parametrize("iterations,system_config", [
    pytest.param(4, {}, marks=pytest.mark.slow, id="ray-defaults"),
    pytest.param(2, FAST_NODE_LOSS, id="fast-health-checks"),
])
@pytest.mark.timeout(400)
def test_node_lost_mid_run_is_survived_with_the_same_result(tiny_config, tmp_path, ray_session, monkeypatch,
                                                            iterations, system_config):
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # this test needs a cluster of its own; the next user restarts the session's instance
    head_args = {"num_cpus": 0, **({"_system_config": system_config} if system_config else {})}
    cluster = Cluster(initialize_head=True, head_node_args=head_args)
    try:
        nodes = [cluster.add_node(num_cpus=2)]
        ray.init(address=cluster.address, logging_level="WARNING")
        cluster.wait_for_nodes()
        cfg = tiny_config("meta.backend=ray", "threads=1", f"meta.iterations={iterations}", "meta.inner_steps=30")

        def lose_the_worker_node(backend):
            cluster.remove_node(nodes[0], allow_graceful=False)
            nodes.append(cluster.add_node(num_cpus=2))

        faulty, seen = train_with_fault(monkeypatch, cfg, tmp_path / "ray", 1, lose_the_worker_node)
        assert set(seen["before"]).isdisjoint(seen["after"])  # both actors now live on the new node
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert_same_state(faulty, reference(cfg, tmp_path / "seq"))


def test_driver_killed_after_a_checkpoint_resumes_to_the_same_weights_and_run(tiny_config, tmp_path, ray_session):
    ray = ray_session()
    out, db = tmp_path / "out", tmp_path / "mlflow.db"
    cfg = tiny_config("threads=1", "meta.iterations=5", "meta.checkpoint_every=1", "meta.inner_steps=10",
                      "tracking.enabled=true")
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(cfg.to_dict()))
    fsmeta = Path(sys.executable).parent / "fsmeta"
    command = [str(fsmeta), "meta-train", "--config", str(config_file), "--backend", "ray", "--out", str(out),
               "--tracking-uri", f"sqlite:///{db}"]
    # The driver attaches to the session's instance, so its own death is the only fault.
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    last = out / "checkpoints" / "meta-last.safetensors"

    proc = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not last.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert last.is_file(), proc.stderr.read().decode()[-3000:] if proc.poll() is not None else "no checkpoint in 120 s"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    _, killed_at = load_checkpoint(last)
    assert killed_at["mlflow_run_id"] and killed_at["iteration"] < 5 and not (out / "meta.safetensors").exists()

    done = subprocess.run([*command, "--resume"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed, meta = load_checkpoint(out / "meta.safetensors")
    assert meta["iteration"] == 5 and meta["mlflow_run_id"] == killed_at["mlflow_run_id"]
    assert_same_state(resumed, reference(cfg, tmp_path / "seq"))

    from fsmeta.tracking import Tracker as MlflowTracker

    client = MlflowTracker(uri=f"sqlite:///{db}").client
    run = client.get_run(meta["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert {m.step for m in client.get_metric_history(run.info.run_id, "loss")} == set(range(1, 6))
    assert len(client.search_runs([run.info.experiment_id])) == 1  # continued, not a second run
