"""The benchmark grid: resumable to the same table, Ray cells equal in-process cells,
and a real MLflow server receiving one nested child run per cell."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch

from fsmeta import benchmark
from fsmeta.compute import describe as describe_compute
from fsmeta.compute import describe_label
from fsmeta.errors import FsmetaError
from fsmeta.tracking import Tracker

OFF = Tracker(enabled=False)
GRID = [
    "data.sources=[]",
    "study.datasets=[synth-fluo, synth-nuclei, synth-he]",
    "study.targets=[synth-he, synth-fluo]",
    "study.pretrainings=[meta-bce, scratch]",
    "study.overlays=1",
    "eval.seeds=[0, 1]",
]


def _without_run_ids(rows):
    return [{k: v for k, v in r.items() if k != "run_id"} for r in rows]


def test_interrupted_benchmark_resumes_to_the_same_table(tiny_config, tmp_path, monkeypatch, caplog):
    cfg = tiny_config(*GRID, "study.executor=local")
    full = benchmark.run_benchmark(cfg, tmp_path / "full", OFF, progress=False)
    assert len(full) == 2 * 2 * 2 * 2  # targets × pre-trainings × K × seeds
    here = describe_compute(torch.device("cpu"), cfg.compute)  # every cell records how it computed
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "full" / "cells").glob("*.json"))]
    assert len(records) == len(full) and all(r["compute"] == here for r in records)
    assert (tmp_path / "full" / "summary.csv").is_file() and (tmp_path / "full" / "fig3_fcrn.png").is_file()
    assert len(list((tmp_path / "full" / "overlays" / "synth-he").glob("*.png"))) == 2  # K=2, seed 0, 1 image per pre-training

    calls, crashed = [], []
    original = benchmark._cell_job

    class Crash(Exception):
        pass

    def flaky(*args):
        calls.append(args[2])
        if len(calls) == 6 and not crashed:
            crashed.append(True)
            raise Crash("the machine went away")
        return original(*args)

    monkeypatch.setattr(benchmark, "_cell_job", flaky)
    with pytest.raises(Crash):
        benchmark.run_benchmark(cfg, tmp_path / "resumed", OFF, progress=False)
    assert len(list((tmp_path / "resumed" / "cells").glob("*.json"))) == 5
    with pytest.raises(FsmetaError, match="already holds a benchmark; pass --resume"):
        benchmark.run_benchmark(cfg, tmp_path / "resumed", OFF, progress=False)
    calls.clear()
    # one recorded cell as if it had been computed on another kind of machine before the crash
    other = sorted((tmp_path / "resumed" / "cells").glob("*.json"))[0]
    record = json.loads(other.read_text())
    record["compute"] = {**here, "precision": "bf16", "cpu_capability": "AVX512", "native_bf16": "yes"}
    other.write_text(json.dumps(record))
    with caplog.at_level("WARNING", logger="fsmeta.benchmark"):
        resumed = benchmark.run_benchmark(cfg, tmp_path / "resumed", OFF, resume=True, progress=False)
    assert len(calls) == len(full) - 5  # recorded cells are never recomputed
    assert _without_run_ids(resumed) == _without_run_ids(full)
    mixed = [r.getMessage() for r in caplog.records if "did not all compute the same way" in r.getMessage()]
    assert mixed and f"{describe_label(here)}: 15 cells; bf16" in mixed[0] and "(AVX512): 1 cells" in mixed[0]
    with pytest.raises(FsmetaError, match="configuration differs in finetune.lr"):
        benchmark.run_benchmark(tiny_config(*GRID, "finetune.lr=0.5"), tmp_path / "resumed", OFF, resume=True, progress=False)


def test_ray_cells_equal_in_process_cells(tiny_config, tmp_path, ray_session):
    grid = [*GRID, "study.targets=[synth-he]", "study.overlays=0"]
    local = benchmark.run_benchmark(tiny_config(*grid, "study.executor=local"), tmp_path / "local", OFF, progress=False)
    on_ray = benchmark.run_benchmark(tiny_config(*grid, "study.executor=ray"), tmp_path / "ray", OFF, progress=False)
    assert _without_run_ids(on_ray) == _without_run_ids(local)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    log = open(tmp_path / "mlflow-server.log", "w")
    mlflow = os.path.join(os.path.dirname(sys.executable), "mlflow")
    proc = subprocess.Popen(
        [mlflow, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", str(tmp_path / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"mlflow server exited: {(tmp_path / 'mlflow-server.log').read_text()[-2000:]}")
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not answer within 60 s")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_benchmark_logs_one_child_run_per_cell_to_a_real_server(tiny_config, tmp_path, mlflow_server):
    cfg = tiny_config(*GRID, "study.targets=[synth-he]", "study.executor=local", "tracking.enabled=true",
                      f"tracking.uri={mlflow_server}", "tracking.experiment=bench-test")
    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment)
    rows = benchmark.run_benchmark(cfg, tmp_path / "out", tracker, progress=False)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("bench-test")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    (parent,) = [r for r in runs if r.data.tags.get("fsmeta.kind") == "study"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    cells = [r for r in children if r.data.tags.get("fsmeta.kind") == "cell"]
    assert len(cells) == len(rows) == 8
    assert sorted(r.info.run_id for r in cells) == sorted(r["run_id"] for r in rows)
    keys = {(r.data.params["pretraining"], r.data.params["shots"], r.data.params["seed"]) for r in cells}
    assert len(keys) == 8  # exactly one child per cell
    assert all({"iou", "pooled_iou", "f1"} <= set(r.data.metrics) for r in cells)
    assert [r for r in children if r.data.tags.get("fsmeta.kind") == "meta"]  # the pre-training is nested too
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.csv", "results.parquet", "summary.csv", "summary_table.json", "fig3_fcrn.png", "fig4_fcrn.png"} <= artifacts
    # the parent run carries the summary: mean and std mIoU per pre-training × selection × K
    assert parent.data.metrics["miou_mean/synth-he/fcrn/scratch/random/K2"] == pytest.approx(
        np.mean([r["miou"] for r in rows if r["pretraining"] == "scratch" and r["shots"] == 2]))
    assert len([k for k in parent.data.metrics if k.startswith("miou_std/")]) == 4  # 2 pre-trainings × 2 K
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on the runs table
    assert all(r.info.status == "FINISHED" for r in runs)
    assert parent.data.tags["fsmeta.cells"] == "8" and parent.data.tags["fsmeta.grid.eval.seeds"] == "0,1"
    assert parent.data.tags["fsmeta.grid.study.pretrainings"] == "meta-bce,scratch"
    here = describe_compute(torch.device("cpu"), cfg.compute)  # how the cells computed, filterable in the UI
    assert all(r.data.tags["fsmeta.compute.precision"] == here["precision"]
               and r.data.tags["fsmeta.compute.cpu_capability"] == here["cpu_capability"] for r in cells)
    assert parent.data.tags["fsmeta.compute"] == describe_label(here)

    # a grid grown on --resume: the parent's params stay as logged (immutable), its grid tags follow
    grown = tiny_config(*GRID, "study.targets=[synth-he]", "study.executor=local", "tracking.enabled=true",
                        f"tracking.uri={mlflow_server}", "tracking.experiment=bench-test", "eval.seeds=[0, 1, 2]")
    assert len(benchmark.run_benchmark(grown, tmp_path / "out", tracker, resume=True, progress=False)) == 12
    after = client.get_run(parent.info.run_id).data
    assert after.tags["fsmeta.cells"] == "12" and after.tags["fsmeta.grid.eval.seeds"] == "0,1,2"
    assert after.params["eval.seeds"] == parent.data.params["eval.seeds"]


def test_selection_axis_runs_the_2023_pipeline(tiny_config, tmp_path):
    cfg = tiny_config(
        *GRID, "study.targets=[synth-he]", "study.pretrainings=[meta-all]", "study.executor=local", "study.overlays=0",
        "study.selections=[random, entropy, mc-dropout, consistency]", "eval.protocol=2023", "eval.test_fraction=0.25",
        "eval.shots=[1]", "select.unit=image", "select.patch_size=32", "select.pretext_epochs=1", "select.mc_passes=2",
    )
    rows = benchmark.run_benchmark(cfg, tmp_path / "sel", OFF, progress=False)
    assert len(rows) == 4 * 2  # selections × seeds
    assert {r["selection"] for r in rows} == {"random", "entropy", "mc-dropout", "consistency"}
    assert all(r["n_test"] == 2 for r in rows)  # 25% of 8 images, fixed per split
    assert (tmp_path / "sel" / "pretrained" / "synth-he" / "fcrn" / "meta-all" / "pretext.safetensors").is_file()
    import json

    from fsmeta.data.registry import load_dataset

    images = load_dataset("synth-he", cfg)
    shares = [float(np.count_nonzero(m)) / m.size for m in images.masks]
    for path in (tmp_path / "sel" / "cells").glob("*.json"):
        record = json.loads(path.read_text())
        assert record["support_images"] == 1  # unit=image, K=1
        # the whole chosen image's annotation: its mask's foreground share, one of the pool's
        share = min(shares, key=lambda s: abs(record["support_foreground"] - s))
        assert abs(record["support_foreground"] - share) < 1e-12
        assert record["support_empty"] == float(share == 0)
        assert record["ranking_seconds"] > 0  # each split's ranking, timed when computed (the cache keeps the time)


def test_selection_needs_the_2023_protocol(tiny_config, tmp_path):
    with pytest.raises(FsmetaError, match="need eval.protocol=2023"):
        benchmark.run_benchmark(tiny_config(*GRID, "study.selections=[consistency]"), tmp_path, OFF, progress=False)


def test_a_grown_grid_resumes_and_shares_rankings_across_budgets(tiny_config, tmp_path, monkeypatch):
    """--resume with more selections, shots and seeds runs only the new cells; selection methods
    other than random go to study.selection_pretrainings alone; one ranking per split serves every
    K; and the table equals a benchmark of the grown grid run from nothing."""
    import fsmeta.select as selection_module

    base = [*GRID, "study.targets=[synth-he]", "study.pretrainings=[meta-bce, scratch]", "study.executor=local",
            "study.overlays=0", "eval.protocol=2023", "eval.test_fraction=0.25", "select.patch_size=32",
            "select.pretext_epochs=1", "select.mc_passes=2", "select.patches_per_shot={default: 2}"]
    grown = [*base, "study.selections=[random, mc-dropout]", "study.selection_pretrainings=[meta-bce]",
             "eval.shots=[1, 2]", "eval.seeds=[0, 1]"]
    small = benchmark.run_benchmark(tiny_config(*base, "eval.shots=[1]", "eval.seeds=[0]"), tmp_path / "b", OFF, progress=False)
    assert len(small) == 2  # two pre-trainings, random, K=1, seed 0

    scored, calls = [], []
    real_select, real_job = selection_module.select_support, benchmark._cell_job
    monkeypatch.setattr(selection_module, "select_support", lambda *a, **k: scored.append(a[4]) or real_select(*a, **k))
    monkeypatch.setattr(benchmark, "_cell_job", lambda *a: calls.append(a[2]) or real_job(*a))
    rows = benchmark.run_benchmark(tiny_config(*grown), tmp_path / "b", OFF, resume=True, progress=False)
    # meta-bce: 2 selections × 2 K × 2 seeds; scratch: random only, 2 K × 2 seeds
    assert len(rows) == 8 + 4 and len(calls) == 12 - 2
    assert {(r["pretraining"], r["selection"]) for r in rows} == {("meta-bce", "random"), ("meta-bce", "mc-dropout"), ("scratch", "random")}
    # one scoring per (pre-training, method, seed): the cached K=1 ranking of (meta-bce, random, seed 0) is reused
    assert len(scored) == 2 * 2 + 2 - 2  # (meta-bce: random, mc-dropout; scratch: random) × 2 seeds, less the 2 recorded
    fresh = benchmark.run_benchmark(tiny_config(*grown), tmp_path / "fresh", OFF, progress=False)
    assert _without_run_ids(rows) == _without_run_ids(fresh)


def test_resume_ignores_settings_a_benchmark_never_reads(tiny_config, tmp_path):
    """select.method is `fsmeta select`'s default (a benchmark's methods are study.selections):
    flipping it does not block a resume, while a setting the cells read does."""
    state = {"config": tiny_config("select.method=consistency").flat()}
    benchmark._check_resume(state, tiny_config("select.method=typiclust"), tmp_path)
    with pytest.raises(FsmetaError, match="select.patch_size"):
        benchmark._check_resume(state, tiny_config("select.method=typiclust", "select.patch_size=48"), tmp_path)


def test_resume_ignores_table_entries_of_data_sets_no_cell_reads(tiny_config, tmp_path):
    """TINY's cells read synth-he (target) and synth-fluo, synth-nuclei (sources): an entry for b39
    changes none of them; one for a source or the target does, and so does `default`; with every
    known data set as a source (no data.sources), any entry may be read and blocks."""
    state = {"config": tiny_config().flat()}
    benchmark._check_resume(state, tiny_config("data.finetune_stride={default: 32, b39: 64}",
                                               "data.source_stride={default: 32, b5: 99}"), tmp_path)
    for override, key in (("data.finetune_stride={default: 32, synth-he: 16}", "data.finetune_stride.synth-he"),
                          ("data.source_stride={default: 32, synth-fluo: 16}", "data.source_stride.synth-fluo"),
                          ("data.finetune_stride={default: 16}", "data.finetune_stride.default")):
        with pytest.raises(FsmetaError, match=key):
            benchmark._check_resume(state, tiny_config(override), tmp_path)
    # meta-training's own resume check (fsmeta.train, the "data" keys) reads the same rule
    from fsmeta.config import changed_keys, read_datasets

    b39 = tiny_config("data.finetune_stride={default: 32, b39: 64}")
    assert changed_keys(state["config"], b39.flat(), only=("data",), datasets=read_datasets(b39)) == []
    assert changed_keys(state["config"], b39.flat(), only=("data",)) == ["data.finetune_stride.b39"]
    assert benchmark.read_datasets(tiny_config()) == {"synth-he", "synth-fluo", "synth-nuclei"}
    assert benchmark.read_datasets(tiny_config("data.sources=[]", "study.datasets=[synth-fluo, em]",
                                               "study.targets=[em, tnbc]")) == {"synth-fluo", "em", "tnbc"}
    every = {"config": tiny_config("data.sources=[]").flat()}
    with pytest.raises(FsmetaError, match="data.finetune_stride.b39"):
        benchmark._check_resume(every, tiny_config("data.sources=[]", "data.finetune_stride={default: 32, b39: 64}"), tmp_path)


def test_a_target_outside_study_datasets_is_scored_with_every_listed_data_set_as_a_source(tiny_config, tmp_path):
    # a lab's own data set under a study's configuration: --set "study.targets=[mylab]" alone
    cfg = tiny_config("data.sources=[]", "study.datasets=[synth-fluo, synth-nuclei]", "study.targets=[synth-he]",
                      "study.pretrainings=[transfer]", "eval.shots=[1]", "eval.seeds=[0]", "study.executor=local")
    rows = benchmark.run_benchmark(cfg, tmp_path / "b", OFF, progress=False)
    assert [(r["target"], r["pretraining"], r["shots"]) for r in rows] == [("synth-he", "transfer", 1)]
    meta = json.loads((tmp_path / "b" / "pretrained" / "synth-he" / "fcrn" / "transfer" / "transfer.json").read_text())
    assert (meta["target"], meta["sources"]) == ("synth-he", ["synth-fluo", "synth-nuclei"])
    # a name that is no data set is refused before anything is written
    bad = tiny_config("data.sources=[]", "study.datasets=[synth-fluo, synth-nuclei]", "study.targets=[mylab]",
                      "study.pretrainings=[transfer]", "eval.shots=[1]", "eval.seeds=[0]", "study.executor=local")
    with pytest.raises(FsmetaError, match="unknown target 'mylab'"):
        benchmark.run_benchmark(bad, tmp_path / "bad", OFF, progress=False)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("protocol", ["2023", "2020"])
def test_a_target_of_images_smaller_than_the_crops_is_scored(tiny_config, tmp_path, protocol):
    # a lab's data set of 48×60 images under a study whose crops are 64 px (the pretext's data.crop_size
    # and fine-tuning's): every step cuts 48-px crops, as `fsmeta finetune` does on such folders
    from fsmeta.data.io import import_folder
    import tifffile

    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    yy, xx = np.ogrid[:48, :60]
    for i in range(8):
        mask = np.zeros((48, 60), np.uint8)
        for y, x in rng.integers(6, 42, (4, 2)):
            mask[(yy - y) ** 2 + (xx - x) ** 2 < 25] = 1
        tifffile.imwrite(tmp_path / "img" / f"a{i}.tif", (rng.normal(60, 10, mask.shape) + 120 * mask).clip(0, 255).astype(np.uint8))
        tifffile.imwrite(tmp_path / "msk" / f"a{i}.tif", mask * 255)
    import_folder(tmp_path / "data", "mylab", tmp_path / "img", tmp_path / "msk")
    # 2023: the pretext θ′, then random and typiclust supports; 2020: the seeded K-image draw
    selections = ["random", "typiclust"] if protocol == "2023" else ["random"]
    cfg = tiny_config("data.sources=[]", "study.datasets=[synth-fluo]", "study.targets=[mylab]", "study.pretrainings=[scratch]",
                      f"eval.protocol={protocol}", "select.unit=image", "select.pretext_epochs=1",
                      f"study.selections=[{', '.join(selections)}]", "finetune.holdout=0.2", "eval.shots=[1, 2]", "eval.seeds=[0]",
                      "study.executor=local")
    rows = benchmark.run_benchmark(cfg, tmp_path / "b", OFF, progress=False)
    assert sorted((r["selection"], r["shots"]) for r in rows) == [(s, k) for s in selections for k in (1, 2)]
    cells = [json.loads(f.read_text()) for f in (tmp_path / "b" / "cells").glob("*.json")]
    assert len(cells) == len(rows) and {c["crop_size"] for c in cells} == {48}
    assert benchmark.pretext_path(tmp_path / "b", "mylab", "fcrn", "scratch").is_file() == (protocol == "2023")
