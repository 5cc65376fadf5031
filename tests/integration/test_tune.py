"""Ray Tune studies: search spaces, the validation split that never reads test images,
and a tiny study on the local Ray with nested MLflow runs and best.yaml."""

from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest
import torch

from fsmeta.compute import describe as describe_compute
from fsmeta.config import ConfigError, load_config
from fsmeta.data.registry import load_dataset
from fsmeta.data.store import Record, write_store
from fsmeta.errors import FsmetaError
from fsmeta.tracking import Tracker
from fsmeta.tuning import parse_space, run_study, run_trial, trial_resources, tune_split

SPACE = {
    "meta.alpha": {"loguniform": [0.001, 1.0]},
    "meta.epsilon": {"uniform": [0.1, 1.0]},
    "meta.inner_steps": {"randint": [1, 4]},
    "finetune.epochs": {"choice": [1, 2]},
}


@pytest.mark.parametrize(
    "space, message",
    [
        ({"meta.alpha": {"gaussian": [0, 1]}}, "meta.alpha: unknown distribution 'gaussian'"),
        ({"meta.alpha": {"loguniform": [0.0, 1.0]}}, "loguniform bounds [0.0, 1.0] must be positive"),
        ({"meta.epsilon": {"uniform": [1.0, 0.1]}}, "uniform bounds [1.0, 0.1] need low < high"),
        ({"meta.epsilon": {"uniform": [0.1]}}, "uniform expects [low, high] as two finite numbers"),
        ({"meta.inner_steps": {"randint": [1.5, 4]}}, "randint bounds [1.5, 4] must be integers"),
        ({"meta.alfa": {"uniform": [0, 1]}}, "meta.alfa is not a configuration key"),
        ({"alpha": {"uniform": [0, 1]}}, "did you mean meta.alpha"),
        ({"eval.split_seed": {"randint": [0, 3]}}, "eval.split_seed cannot be tuned"),
        ({"meta.alpha": [0.1, 0.01]}, "expected one distribution"),
        ([], "expected a mapping"),
        ({"finetune.epochs": {"choice": [10, 20]}}, "finetune.epochs has no effect while finetune.steps=500"),
    ],
)
def test_bad_search_spaces_are_named(space, message):
    with pytest.raises(ConfigError) as err:
        parse_space(space, load_config(), where="tune_spaces/x.yaml")
    assert message in str(err.value) and "tune_spaces/x.yaml" in str(err.value)



def test_epochs_are_tunable_where_they_set_the_budget():
    space = {"finetune.epochs": {"choice": [10, 20]}}
    assert [d.key for d in parse_space(space, load_config(None, ["finetune.steps=0"]))] == ["finetune.epochs"]
    both = {**space, "finetune.steps": {"choice": [0, 500]}}  # a space that decides the budget itself
    assert {d.key for d in parse_space(both, load_config())} == {"finetune.epochs", "finetune.steps"}


def test_a_per_shot_budget_is_tunable_only_beside_a_step_budget():
    space = {"finetune.steps_per_shot": {"choice": [50, 100, 200]}}
    assert [d.key for d in parse_space(space, load_config())] == ["finetune.steps_per_shot"]
    with pytest.raises(ConfigError, match="x.yaml: finetune.steps_per_shot has no effect while finetune.steps=0"):
        parse_space(space, load_config(None, ["finetune.steps=0"]), where="x.yaml")


def test_shipped_spaces_parse_and_contain_the_paper_defaults():
    from fsmeta.tuning import default_point, load_space

    cfg = load_config()
    for name in ("reptile", "finetune"):
        dims = load_space(f"tune_spaces/{name}.yaml", cfg)
        assert default_point(cfg, dims) is not None, name  # the defaults trial runs the default values
    dims = load_space("tune_spaces/reptile.yaml", cfg)
    assert default_point(cfg, dims) == {"meta.alpha": 0.01, "meta.beta": 0.01, "meta.epsilon": 1.0, "meta.inner_lr": 1e-3, "finetune.lr": 3e-4}


def test_trial_resources_reserve_the_trial_and_one_bundle_per_source(tiny_config):
    cfg = tiny_config("meta.backend=ray", "tune.trial_cpus=0.5")
    assert trial_resources(cfg, 2, {"CPU": 2.0}) == [{"CPU": 0.5}, {"CPU": 0.75}, {"CPU": 0.75}]
    assert trial_resources(cfg, 4, {"CPU": 16.0, "GPU": 2.0}) == [{"CPU": 0.5}] + [{"CPU": 1.0, "GPU": 0.5}] * 4
    assert trial_resources(tiny_config("meta.backend=sequential", "tune.trial_cpus=2"), 3, {"CPU": 8.0}) == [{"CPU": 2.0}]
    seven = trial_resources(tiny_config("meta.backend=ray", "tune.trial_cpus=1"), 7, {"CPU": 2.0})
    assert seven[1] == {"CPU": 0.1428} and sum(b["CPU"] for b in seven) <= 2.0  # rounded down: the trial fits
    with pytest.raises(FsmetaError, match="leaving none for its 2 source actors"):
        trial_resources(tiny_config("meta.backend=ray", "tune.trial_cpus=2"), 2, {"CPU": 2.0})


def test_validation_split_is_disjoint_from_the_fixed_test_split(tiny_config):
    from fsmeta.data.sampling import protocol_split

    cfg = tiny_config("tune.val_fraction=0.34", "tune.shots=[1]")
    split = tune_split(cfg, 12)
    _, test = protocol_split(12, "2023", cfg.eval.test_fraction, cfg.eval.split_seed)
    assert np.array_equal(split.test, test)
    parts = [set(split.train), set(split.val), set(split.test)]
    assert sum(map(len, parts)) == 12 and set.union(*parts) == set(range(12))
    assert len(split.test) == 2 and len(split.val) == 3  # round(0.2 × 12), round(0.34 × 10)
    with pytest.raises(FsmetaError, match="K=8 is larger than the 7 images"):
        tune_split(tiny_config("tune.val_fraction=0.34", "tune.shots=[1, 8]"), 12)


def _copy_with(cfg, name, replace):
    """The target store under a new name, images ``replace`` swapped for seeded noise."""
    ds = load_dataset(cfg.data.target, cfg)
    rng = np.random.default_rng(0)
    records = []
    for i in range(len(ds)):
        image, mask = np.asarray(ds.images[i]), np.asarray(ds.masks[i])
        if i in replace:
            image = rng.integers(0, 256, image.shape, dtype=np.uint8)
            mask = (rng.random(mask.shape) < 0.5).astype(mask.dtype)
        records.append(Record(ds.ids[i], image, mask))
    write_store(cfg.data.data_root(), name, records, kind="imported")


def test_tuning_never_reads_the_test_images(tiny_config):
    """The reported scores are the same bit for bit when every test image is replaced by noise,
    and change when a validation image is — so the test split is never read."""
    base = ["tune.shots=[1]", "tune.seeds=[0]", "tune.eval_every=2", "meta.iterations=2", "data.synth.images=10"]
    cfg = tiny_config(*base)
    split = tune_split(cfg, len(load_dataset(cfg.data.target, cfg)))
    _copy_with(cfg, "poisoned-test", set(split.test.tolist()))
    _copy_with(cfg, "poisoned-val", {int(split.val[0])})

    def scores(target):
        out = []
        run_trial(tiny_config(*base, f"data.target={target}"), lambda m, theta, it: out.append(m["val_miou"]))
        return out

    original = scores("synth-he")
    assert len(original) == 1
    assert scores("poisoned-test") == original
    assert scores("poisoned-val") != original


@pytest.fixture
def sqlite_tracker(tmp_path):
    return Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "tune-test")


def test_tiny_study_nests_one_run_per_trial_and_writes_best_yaml(tiny_config, tmp_path, ray_session, sqlite_tracker):
    ray_session()
    import yaml

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    cfg = tiny_config(
        "meta.backend=ray", "meta.variant=all", "meta.iterations=4", "tune.eval_every=2", "tune.trials=4",
        "tune.shots=[1]", "tune.seeds=[0]", "tune.trial_cpus=0.5", "tracking.enabled=true", "data.synth.images=10",
    )
    out = tmp_path / "study"
    best = run_study(cfg, space, out, sqlite_tracker, progress=False)

    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert len(rows) == 4
    client = sqlite_tracker.client
    exp = client.get_experiment_by_name("tune-test")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("fsmeta.kind") == "tune"]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(trials) == 4 and all(r.data.tags["fsmeta.kind"] == "trial" for r in trials)
    here = describe_compute(torch.device("cpu"), cfg.compute)  # how each trial computed, as a cell run is tagged
    assert all(r.data.tags["fsmeta.compute.precision"] == here["precision"]
               and r.data.tags["fsmeta.compute.cpu_capability"] == here["cpu_capability"] for r in trials)
    assert all(r.info.status == "FINISHED" for r in runs)
    assert all(set(SPACE) <= set(r.data.params) for r in trials)
    # intermediate validation reports, one per evaluation, for ASHA and the MLflow charts
    histories = {r.info.run_id: client.get_metric_history(r.info.run_id, "val_miou") for r in trials}
    assert all(1 <= len(h) <= 2 and [m.step for m in h] == [2, 4][: len(h)] for h in histories.values())
    assert max(len(h) for h in histories.values()) == 2  # at least the best trial ran to the end
    # the defaults trial: the paper's values for variant all (α = β = 0.01, ε = 1, …) within the space
    assert any(float(r.data.params["meta.alpha"]) == 0.01 and float(r.data.params["meta.epsilon"]) == 1.0 for r in trials)
    # best.yaml is a whole configuration with the best trial's values, loadable as is
    tuned = load_config(out / "best.yaml")
    by_id = {r.data.tags["fsmeta.trial_id"]: r for r in trials}
    winner = by_id[best["trial_id"]]
    assert tuned.meta.alpha == pytest.approx(float(winner.data.params["meta.alpha"]))
    assert tuned.meta.inner_steps == int(winner.data.params["meta.inner_steps"])
    assert tuned.finetune.epochs == int(winner.data.params["finetune.epochs"])
    assert best["val_miou"] == pytest.approx(max(float(r["val_miou"]) for r in rows if r["meta_iterations"] == "4"))
    assert (out / "best.safetensors").is_file()
    state = json.loads((out / "study.json").read_text())
    assert sorted(state["trials"].values()) == sorted(r.info.run_id for r in trials)

    with pytest.raises(FsmetaError, match="already holds a study; pass --resume"):
        run_study(cfg, space, out, sqlite_tracker, progress=False)
    # --resume of a finished study restores Tune's state: no trial runs again, the same best
    again = run_study(cfg, space, out, sqlite_tracker, resume=True, progress=False)
    assert again == best
    assert len(client.search_runs([exp.experiment_id])) == len(runs)
    # a study started before a configuration field existed resumes (the field counts as its
    # default); a changed setting does not
    state["config"] = {k: v for k, v in state["config"].items() if k != "eval.vary_split"}
    (out / "study.json").write_text(json.dumps(state))
    assert run_study(cfg, space, out, sqlite_tracker, resume=True, progress=False) == best
    with pytest.raises(FsmetaError, match="configuration differs in finetune.lr"):
        run_study(dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, lr=0.5)), space, out, sqlite_tracker, resume=True, progress=False)


def test_fixed_split_benchmark_scores_on_the_tuning_test_images(tiny_config):
    """eval.vary_split=false: every seed uses the split tuning held out, so a benchmark of the
    tuned configuration is scored on images tuning never read; by default seeds vary the split."""
    from fsmeta.study import cell_split

    fixed = tiny_config("eval.protocol=2023", "eval.vary_split=false")
    split = tune_split(fixed, 20)
    tests = [cell_split(fixed, 20, seed)[1] for seed in range(3)]
    assert all(np.array_equal(t, split.test) for t in tests)
    varying = [cell_split(tiny_config("eval.protocol=2023"), 20, seed)[1] for seed in range(3)]
    assert not np.array_equal(varying[0], varying[1])


def test_searchers_start_from_the_defaults_point(tiny_config):
    """Random search is seeded; Optuna (the `tune` extra) gets the defaults trial too."""
    from ray.tune.search.basic_variant import BasicVariantGenerator
    from ray.tune.search.optuna import OptunaSearch

    from fsmeta.tuning.study import _searcher

    point = [{"meta.alpha": 0.01}]
    random = _searcher(tiny_config("tune.search=random"), point)
    assert isinstance(random, BasicVariantGenerator) and random._points_to_evaluate == point
    optuna = _searcher(tiny_config("tune.search=optuna"), point)
    assert isinstance(optuna, OptunaSearch) and optuna._points_to_evaluate == point


@pytest.mark.slow
def test_interrupted_study_resumes_with_the_same_runs(tiny_config, tmp_path, ray_session):
    """Ctrl-C stops the study (no best.yaml, runs KILLED); --resume finishes it with Tune's
    restore, each trial keeping its one MLflow run."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import yaml

    ray = ray_session()
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    cfg = tiny_config("meta.backend=ray", "meta.iterations=6", "tune.eval_every=2", "tune.trials=3", "tune.scheduler=fifo",
                      "tune.shots=[1]", "tune.seeds=[0]", "tune.trial_cpus=0.5", "tracking.enabled=true",
                      "data.synth.images=10", "meta.inner_steps=10")
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(cfg.to_dict()))
    out, db = tmp_path / "study", tmp_path / "mlflow.db"
    command = [str(Path(sys.executable).parent / "fsmeta"), "tune", "--space", str(space), "--config", str(config_file),
               "--out", str(out), "--tracking-uri", f"sqlite:///{db}", "--experiment", "resume"]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline and not list(out.glob("study/*/checkpoint_*")):
            time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        proc.send_signal(signal.SIGINT)
        text = proc.communicate(timeout=180)[0].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and "the study was interrupted" in text, text[-3000:]
    assert not (out / "best.yaml").exists()

    done = subprocess.run([*command, "--resume"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (out / "best.yaml").is_file()
    client = Tracker(f"sqlite:///{db}", "resume").client
    runs = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    trials = [r for r in runs if r.data.tags.get("fsmeta.kind") == "trial"]
    assert len(trials) == 3 and all(r.info.status == "FINISHED" for r in runs)
    for r in trials:  # every trial reached the end, each validation logged once in its one run
        assert [m.step for m in client.get_metric_history(r.info.run_id, "val_miou")] == [2, 4, 6]
