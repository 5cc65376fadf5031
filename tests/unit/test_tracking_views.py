"""MLflow as a person uses it: a model-training experiment (the UI opens on the runs table), a
study's summary as parent-run metrics and a table, and fine-tuned weights in the model registry
that `fsmeta predict --weights models:/NAME/1` loads."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fsmeta.checkpoint import save_checkpoint
from fsmeta.cli import main
from fsmeta.models import build_model
from fsmeta.report import summarize, summary_metrics
from fsmeta.tracking import EXPERIMENT_KIND_TAG, MODEL_TRAINING, Tracker


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store for the module (each new store costs seconds of schema migrations)."""
    folder = tmp_path_factory.mktemp("mlflow")
    return folder, f"sqlite:///{folder / 'mlflow.db'}"


@pytest.fixture
def uri(store, monkeypatch):
    monkeypatch.chdir(store[0])  # the sqlite store keeps artifacts in ./mlruns
    return store[1]


def test_experiments_are_model_training_experiments(uri):
    tracker = Tracker(uri, "fresh")
    assert tracker.client.get_experiment_by_name("fresh").tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING
    client = tracker.client
    client.create_experiment("old")  # made by an fsmeta before the tag
    client.create_experiment("chosen", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    Tracker(uri, "old").client, Tracker(uri, "chosen").client
    assert client.get_experiment_by_name("old").tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING
    assert client.get_experiment_by_name("chosen").tags[EXPERIMENT_KIND_TAG] == "genai_development"  # a user's choice stays


def test_summary_metrics_and_table_on_the_parent_run(uri, tmp_path):
    rows = [{"target": "synth-he", "arch": "fcrn", "pretraining": p, "selection": "random", "shots": k, "seed": s, "miou": m}
            for p, k, s, m in [("meta-bce", 1, 0, 0.5), ("meta-bce", 1, 1, 0.7), ("scratch", 1, 0, 0.2), ("scratch", 1, 1, 0.2)]]
    summary = summarize(rows)
    metrics = summary_metrics(summary)
    assert metrics == pytest.approx({"miou_mean/synth-he/fcrn/meta-bce/random/K1": 0.6, "miou_std/synth-he/fcrn/meta-bce/random/K1": 0.1,
                                     "miou_mean/synth-he/fcrn/scratch/random/K1": 0.2, "miou_std/synth-he/fcrn/scratch/random/K1": 0.0})
    tracker = Tracker(uri, "study")
    with tracker.run("benchmark") as parent:
        tracker.log_metrics(parent, metrics)
        tracker.log_table(parent, summary, "summary_table.json")
    client = tracker.client
    assert client.get_run(parent).data.metrics == pytest.approx(metrics)
    local = client.download_artifacts(parent, "summary_table.json", str(tmp_path))
    table = json.loads(open(local).read())  # MLflow's table format: columns and rows
    assert table["columns"][:3] == ["target", "arch", "pretraining"] and len(table["data"]) == 2


def test_registered_weights_predict_as_models_uri(uri, tmp_path, capsys):
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "ft.safetensors", build_model("unet", affine=True).state_dict(),
                           {"arch": "unet", "bn_affine": True, "kind": "finetuned"})
    tracker = Tracker(uri, "fsmeta")
    with tracker.run("finetune/x") as run_id:
        assert tracker.register_model(run_id, ckpt, "nuclei") == 1
    with tracker.run("finetune/y") as run_id:
        assert tracker.register_model(run_id, ckpt, "nuclei") == 2  # a second version of the same name
    Image.fromarray((np.random.default_rng(0).random((48, 48)) * 255).astype(np.uint8)).save(tmp_path / "one.png")
    for weights in ("models:/nuclei/1", "models:/nuclei/latest"):
        args = ["predict", "--weights", weights, "--tracking-uri", uri, "--input", str(tmp_path / "one.png"),
                "--output", str(tmp_path / "out")]
        assert main(args) == 0 and (tmp_path / "out" / "counts.csv").is_file()
    capsys.readouterr()
    args[2] = "models:/nuclei/7"
    assert main(args) == 2 and "models:/nuclei/7" in capsys.readouterr().err


def test_register_needs_tracking(tmp_path, capsys):
    ckpt = save_checkpoint(tmp_path / "w.safetensors", build_model("unet").state_dict(), {"arch": "unet", "bn_affine": False, "kind": "meta"})
    code = main(["finetune", "--weights", str(ckpt), "--no-tracking", "--register", "nuclei", "--out", str(tmp_path / "ft.safetensors"),
                 "--data-root", str(tmp_path / "data")])
    assert code == 2 and "--register nuclei needs MLflow tracking" in capsys.readouterr().err


def test_runs_page_opens_the_runs_table_of_this_experiment(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "lab-study")
    page = tracker.runs_page(port=5123)
    experiment = tracker.client.get_experiment_by_name("lab-study")
    assert page == f"http://127.0.0.1:5123/#/experiments/{experiment.experiment_id}?workflowType=machine_learning"
