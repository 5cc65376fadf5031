"""`ray job submit` of jobs/meta_train.py against a real Ray head on 127.0.0.1.

The head runs in its own temp dir, HOME and free ports, so it never meets the
session's in-process instance or a token in the user's ~/.ray. In the default
suite it uses token auth, the documented path for clusters (a client without the
token is refused); the loopback-only head without auth runs with ``-m slow``.
It is always stopped, even when the test fails, by killing exactly the processes
that carry its temp dir on their command line: `ray stop --force` would stop every
Ray on the machine, the test session's own instance included.
"""

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest
import yaml

from fsmeta.checkpoint import model_from_checkpoint

REPO = Path(__file__).resolve().parents[2]
EXCLUDES = ["data/", "mlflow.db", "mlruns/", "*.safetensors", "runs/", ".git/", ".venv/"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_head(temp_dir: str) -> None:
    """Stop the head started in ``temp_dir``: every process whose command line names it."""
    mine = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in arg for arg in proc.info["cmdline"] or ()):
                mine.append(proc)
        except psutil.Error:
            pass
    for proc in mine:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(mine, timeout=5)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


@pytest.fixture(params=["token", pytest.param("disabled", marks=pytest.mark.slow)])
def ray_head(request):
    """A `ray start --head` on loopback in its own temp dir; yields (dashboard URL, env, auth mode)."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    # A short temp dir: Ray's unix socket paths must stay under ~107 characters.
    temp_dir = tempfile.mkdtemp(prefix="fsmj-", dir="/tmp")
    port, dash, agent, agent_grpc, client, metrics, runtime_env = (free_port() for _ in range(7))
    # The job's `python` is found on the head's PATH: this interpreter, which has fsmeta's dependencies.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    home = Path(temp_dir) / "home"  # Ray reads and writes ~/.ray/auth_token; never the user's
    home.mkdir()
    env = {**os.environ, "PATH": path, "HOME": str(home), "RAY_AUTH_MODE": request.param, "RAY_USAGE_STATS_ENABLED": "0"}
    if request.param == "token":
        env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    env.pop("RAY_ADDRESS", None)
    start = [ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
             f"--ray-client-server-port={client}", f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
             "--num-cpus=2", "--include-dashboard=true", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    try:
        started = subprocess.run(start, env=env, capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        yield f"http://127.0.0.1:{dash}", env, request.param
    finally:
        stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_meta_train_job_submitted_to_a_real_head_writes_its_checkpoint(tiny_config, tmp_path, ray_head):
    address, env, auth = ray_head
    if auth == "token":  # the token is what keeps a reachable head from running anyone's code
        ray_bin = str(Path(sys.executable).parent / "ray")
        for token in ("", secrets.token_hex(32)):  # none at all, and a wrong one
            bad = {**env, "RAY_AUTH_TOKEN": token} if token else {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
            denied = subprocess.run([ray_bin, "job", "list", "--address", address], env=bad, capture_output=True, text=True, timeout=120)
            assert denied.returncode != 0 and "token" in (denied.stdout + denied.stderr).lower(), denied.stdout[-2000:]
    cfg = tiny_config("threads=1", "meta.iterations=2", "meta.backend=ray", "tracking.enabled=true")
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(cfg.to_dict()))
    out = tmp_path / "job-out"
    submit = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", address,
              "--working-dir", str(REPO), "--runtime-env-json", json.dumps({"excludes": EXCLUDES}), "--",
              "python", "jobs/meta_train.py", "--config", str(config_file), "--out", str(out),
              "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    done = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=400)
    log = done.stdout[-4000:] + done.stderr[-2000:]
    assert done.returncode == 0, log
    assert "succeeded" in log, log
    # The job attached to the head: its source actors are in the head's records. (fsmeta
    # initialises Ray at WARNING, so the absence of Ray's "Started a local Ray instance"
    # INFO line proved nothing.)
    listed = subprocess.run([str(Path(sys.executable).parent / "ray"), "list", "actors", "--address", address,
                             "--filter", "class_name=SourceWorker", "--format", "json", "--limit", "100"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stdout[-2000:] + listed.stderr[-2000:]
    actors = json.loads(listed.stdout)
    assert len(actors) >= len(cfg.data.sources) == 2, actors
    model, meta = model_from_checkpoint(out / "meta.safetensors")
    assert meta["iteration"] == 2 and meta["kind"] == "meta" and meta["mlflow_run_id"]
    assert (out / "checkpoints" / "meta-last.safetensors").is_file()

