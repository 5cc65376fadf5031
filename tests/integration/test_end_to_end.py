"""Tiny end-to-end runs on 64×64 crops: meta-train → fine-tune → evaluate, reproducibility, resume."""

import numpy as np
import pytest
import torch

from fsmeta.checkpoint import load_checkpoint, model_from_checkpoint
from fsmeta.meta import sequential
from fsmeta.benchmark import run_demo
from fsmeta.tracking import Tracker
from fsmeta.train import meta_train, transfer_train

OFF = Tracker(enabled=False)


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_same_config_and_seed_give_identical_weights(tiny_config, tmp_path):
    cfg = tiny_config()
    a, _ = load_checkpoint(meta_train(cfg, tmp_path / "a", OFF, progress=False))
    b, _ = load_checkpoint(meta_train(cfg, tmp_path / "b", OFF, progress=False))
    _assert_same_state(a, b)
    c, _ = load_checkpoint(meta_train(tiny_config("seed=1"), tmp_path / "c", OFF, progress=False))
    assert not torch.equal(a["head.weight"], c["head.weight"])
    t1, _ = load_checkpoint(transfer_train(cfg, tmp_path / "a", OFF, progress=False))
    t2, _ = load_checkpoint(transfer_train(cfg, tmp_path / "b", OFF, progress=False))
    _assert_same_state(t1, t2)


def test_resumed_meta_training_equals_uninterrupted(tiny_config, tmp_path, monkeypatch):
    cfg = tiny_config("meta.iterations=4", "meta.checkpoint_every=2")
    full, _ = load_checkpoint(meta_train(cfg, tmp_path / "full", OFF, progress=False))

    calls = {"n": 0}
    original = sequential.SequentialBackend.run

    def interrupted(self, theta, tasks):
        calls["n"] += 1
        if calls["n"] == 4:  # during iteration 4, after the checkpoint at iteration 2... and 3 ran
            raise KeyboardInterrupt
        return original(self, theta, tasks)

    monkeypatch.setattr(sequential.SequentialBackend, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        meta_train(cfg, tmp_path / "resumed", OFF, progress=False)
    _, last = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "meta-last.safetensors")
    assert last["iteration"] == 2
    monkeypatch.setattr(sequential.SequentialBackend, "run", original)
    resumed, meta = load_checkpoint(meta_train(cfg, tmp_path / "resumed", OFF, resume=True, progress=False))
    assert meta["iteration"] == 4
    _assert_same_state(full, resumed)


def test_resume_refuses_a_changed_configuration(tiny_config, tmp_path):
    meta_train(tiny_config("meta.iterations=1"), tmp_path, OFF, progress=False)
    from fsmeta.errors import FsmetaError

    with pytest.raises(FsmetaError, match="configuration differs in meta.inner_lr"):
        meta_train(tiny_config("meta.iterations=2", "meta.inner_lr=0.5"), tmp_path, OFF, resume=True, progress=False)
    # The inner loops' thread count changes θ (summation order): refused too. The driver's threads do not.
    with pytest.raises(FsmetaError, match="configuration differs in meta.inner_threads"):
        meta_train(tiny_config("meta.iterations=2", "meta.inner_threads=2"), tmp_path, OFF, resume=True, progress=False)
    resumed, _ = load_checkpoint(meta_train(tiny_config("meta.iterations=2", "threads=1"), tmp_path, OFF, resume=True, progress=False))
    # ... and the resumed run at --threads 1 ends on the weights of an uninterrupted run at 2 (issue 16, defect 4).
    whole, _ = load_checkpoint(meta_train(tiny_config("meta.iterations=2"), tmp_path / "whole", OFF, progress=False))
    _assert_same_state(whole, resumed)


def test_tiny_study_end_to_end(tiny_config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an sqlite store keeps artifacts in ./mlruns
    cfg = tiny_config("tracking.enabled=true", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}")
    from fsmeta.tracking import tracker_from_config

    tracker = tracker_from_config(cfg.tracking)
    rows = run_demo(cfg, tmp_path / "out", tracker, progress=False)
    # 3 pre-trainings × 2 shots × 2 seeds
    assert len(rows) == 12
    assert {r["pretraining"] for r in rows} == {"meta-all", "transfer", "scratch"}
    for r in rows:
        assert 0.0 <= r["miou"] <= 1.0 and 0.0 <= r["pooled_iou"] <= 1.0 and r["run_id"]
        assert r["n_test"] == 8 - r["shots"]  # 2020 protocol: every image but the support set
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "out" / "results.parquet")
    assert table.column_names == ["target", "arch", "pretraining", "selection", "shots", "seed", "miou",
                                  "pooled_iou", "f1", "n_test", "run_id"]
    assert (tmp_path / "out" / "results.csv").read_text().count("\n") == 13
    assert (tmp_path / "out" / "miou_vs_shots.png").stat().st_size > 1000
    # MLflow: one parent, meta/transfer runs and one child per cell, all nested and finished.
    client = tracker.client
    runs = client.search_runs([client.get_experiment_by_name("fsmeta").experiment_id])
    parents = [r for r in runs if r.data.tags.get("mlflow.runName") == "demo"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    cells = [r for r in children if r.data.tags.get("fsmeta.kind") == "cell"]
    assert len(cells) == 12 and {r.info.run_id for r in cells} == {r["run_id"] for r in rows}
    assert all(r.info.status == "FINISHED" for r in runs)
    meta_run = next(r for r in children if r.data.tags.get("fsmeta.kind") == "meta")
    assert len(client.get_metric_history(meta_run.info.run_id, "loss")) == cfg.meta.iterations
    # a cell's logged iou is the table's miou
    cell = next(r for r in cells if r.info.run_id == rows[0]["run_id"])
    assert cell.data.metrics["iou"] == pytest.approx(rows[0]["miou"])
    assert cell.data.params["shots"] == str(rows[0]["shots"])


def test_meta_checkpoint_describes_itself(tiny_config, tmp_path):
    path = meta_train(tiny_config(), tmp_path, OFF, progress=False)
    model, meta = model_from_checkpoint(path)
    assert meta["bn_affine"] is False and meta["arch"] == "fcrn" and meta["iteration"] == 3
    assert meta["sources"] == ["synth-fluo", "synth-nuclei"] and meta["target"] == "synth-he"
    x = torch.from_numpy(np.zeros((1, 1, 64, 64), np.float32))
    assert model.eval()(x).shape == (1, 1, 64, 64)
