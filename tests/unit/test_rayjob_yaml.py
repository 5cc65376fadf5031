"""k8s/rayjob.yaml: a KubeRay RayJob that runs the paper study, with what the job needs written out."""

import re
from pathlib import Path

import yaml

from fsmeta.config import load_config

REPO = Path(__file__).resolve().parents[2]


def documents():
    docs = list(yaml.safe_load_all((REPO / "k8s" / "rayjob.yaml").read_text()))
    job = next(d for d in docs if d["kind"] == "RayJob")
    claims = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PersistentVolumeClaim"}
    return job, claims


def pods(job):
    cluster = job["spec"]["rayClusterSpec"]
    return [("head", cluster["headGroupSpec"], 1)] + [(g["groupName"], g, g["replicas"]) for g in cluster["workerGroupSpecs"]]


def test_the_job_runs_the_paper_study_and_resumes_when_retried():
    job, _ = documents()
    assert job["apiVersion"] == "ray.io/v1" and job["metadata"]["name"]
    entry = job["spec"]["entrypoint"].split()
    assert entry[:2] == ["python", "/opt/fsmeta/jobs/benchmark.py"] and (REPO / "jobs" / "benchmark.py").is_file()
    config = entry[entry.index("--config") + 1]
    assert config == "/opt/fsmeta/configs/paper.yaml" and (REPO / "configs" / "paper.yaml").is_file()
    assert "--resume" in entry  # a retried job (backoffLimit) continues with only the missing work
    assert entry[entry.index("--out") + 1].startswith("/shared/") and entry[entry.index("--data-root") + 1].startswith("/shared/")
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    assert env["MLFLOW_TRACKING_URI"].startswith("http")  # a server: the driver logs, sqlite does not belong on NFS


def test_every_pod_runs_one_image_with_the_installed_ray_and_mounts_the_shared_storage():
    job, claims = documents()
    import ray

    assert job["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__
    images = set()
    for name, group, _ in pods(job):
        spec = group["template"]["spec"]
        (container,) = spec["containers"]
        images.add(container["image"])
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts.get("shared") == "/shared", name
        volume = next(v for v in spec["volumes"] if v["name"] == "shared")
        claim = claims[volume["persistentVolumeClaim"]["claimName"]]
        assert "ReadWriteMany" in claim["spec"]["accessModes"], name
    assert len(images) == 1
    dockerfile = (REPO / "k8s" / "Dockerfile").read_text()
    assert f"rayproject/ray:{ray.__version__}" in dockerfile and '"torch==2.13.0"' in dockerfile


def test_the_workers_hold_the_gpus_the_study_asks_for():
    job, _ = documents()
    cfg = load_config(REPO / "configs" / "paper.yaml")
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"  # the driver does no GPU work
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"].get("limits", {})
    gpus = 0
    for name, group, replicas in pods(job)[1:]:
        (container,) = group["template"]["spec"]["containers"]
        res = container["resources"]
        assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"], name
        per_pod = int(res["limits"]["nvidia.com/gpu"])
        cells_per_pod = per_pod / cfg.study.cell_gpus
        assert float(re.sub("[^0-9.]", "", res["limits"]["cpu"])) >= cells_per_pod * cfg.study.cell_cpus, name  # GPUs full of cells
        gpus += replicas * per_pod
    sources = len(cfg.study.datasets) - 1
    assert gpus >= 8 and gpus >= sources  # a meta-training's source actors take one GPU each
