"""``fsmeta tune``: run (or resume) a Ray Tune study and write its outputs.

MLflow: one parent run for the study; a nested run per trial (:mod:`fsmeta.tuning.callback`).
``OUT/best.yaml`` is the whole configuration with the best trial's values, directly
usable by ``fsmeta meta-train`` and ``fsmeta benchmark``; ``OUT/best.safetensors``
its last θ; ``OUT/trials.csv`` every trial.
"""

from __future__ import annotations

import csv
import io
import math
import json
import shutil
from pathlib import Path
from typing import Any

import ray
from ray import tune

from fsmeta.atomic import atomic_write_bytes
from fsmeta.checkpoint import read_checkpoint_meta
from fsmeta.config import RUNTIME_KEYS, SELECT_COMMAND_KEYS, Config, ConfigError, changed_keys, dump_config, read_datasets
from fsmeta.data.registry import load_dataset, resolve_sources
from fsmeta.errors import FsmetaError
from fsmeta.meta.driver import connect
from fsmeta.study import target_config
from fsmeta.tracking import Tracker
from fsmeta.tuning.callback import TrialRuns
from fsmeta.tuning.resources import fits, trial_resources
from fsmeta.tuning.space import Dimension, default_point, load_space, with_values
from fsmeta.tuning.trial import METRIC, _trainable, eval_every, tune_split

STATE_FILE = "study.json"


def _searcher(cfg: Config, points: list[dict[str, Any]]):
    if cfg.tune.search == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as exc:
            raise FsmetaError(f"tune.search=optuna needs optuna ({exc}); pip install optuna, or use --search random") from None
        try:
            return OptunaSearch(points_to_evaluate=points or None, seed=cfg.seed)
        except AssertionError as exc:  # Tune asserts that optuna is importable
            raise FsmetaError(f"tune.search=optuna needs optuna ({exc}); pip install optuna, or use --search random") from None
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(points_to_evaluate=points or None, random_state=cfg.seed)


def _scheduler(cfg: Config):
    if cfg.tune.scheduler == "fifo":
        return None
    from ray.tune.schedulers import ASHAScheduler

    every = eval_every(cfg)
    return ASHAScheduler(time_attr="meta_iteration", max_t=cfg.meta.iterations, grace_period=min(every, cfg.meta.iterations),
                         reduction_factor=cfg.tune.reduction_factor)


def run_study(cfg: Config, space_path: str | Path, out_dir: str | Path, tracker: Tracker, *,
              resume: bool = False, progress: bool = True, weights: str | Path | None = None) -> dict[str, Any]:
    """Run (or, with ``resume``, continue) a study; returns the best trial's values and score.

    ``cfg.data.target`` is tuned for; it is left out of the sources as in the benchmark.
    ``weights``: a pre-trained (non-affine) checkpoint; trials then only fine-tune it
    (e.g. ``tune_spaces/finetune.yaml``) and meta-training keys may not be tuned.
    """
    cfg = target_config(cfg, cfg.data.target, cfg.arch)
    dims = load_space(space_path, cfg)
    tuned = {d.key for d in dims}
    if weights:
        weights = str(Path(weights).resolve())
        meta = read_checkpoint_meta(weights)
        if meta.get("bn_affine"):
            raise FsmetaError(f"{weights} is already fine-tuned (affine batch norm); tune from a pre-trained checkpoint")
        if meta.get("arch") != cfg.arch:
            raise FsmetaError(f"{weights} is a {meta.get('arch')} checkpoint but arch={cfg.arch}")
        pre = sorted(k for k in tuned if k.startswith(("meta.", "transfer.", "data.", "arch", "seed")))
        if pre:
            raise ConfigError(f"{space_path}: {', '.join(pre)} cannot be tuned with --weights (the pre-training is fixed)")
    if "meta.variant" not in tuned:
        for key, term in (("meta.alpha", "er"), ("meta.beta", "d")):
            if key in tuned and cfg.meta.loss_weights()[0 if term == "er" else 1] == 0.0:
                raise ConfigError(f"{space_path}: {key} has no effect with meta.variant={cfg.meta.variant}; tune it with variant all")
    space_text = Path(space_path).read_text()
    out = Path(out_dir).resolve()
    state_path = out / STATE_FILE
    sources = resolve_sources(cfg)
    if not sources:
        raise FsmetaError(f"target {cfg.data.target} has no sources to meta-train on")
    # Prepare every data set before trials start, so no two trials generate the same store.
    for name in [cfg.data.target, *sources]:
        load_dataset(name, cfg)
    tune_split(cfg, len(load_dataset(cfg.data.target, cfg)), cfg.data.target)  # fails early on a bad split

    experiment = out / "study"
    if state_path.is_file():
        if not resume:
            raise FsmetaError(f"{out} already holds a study; pass --resume to continue it or choose another --out")
        state = json.loads(state_path.read_text())
        changed = changed_keys(state["config"], cfg.flat(), ignore=(*RUNTIME_KEYS, *SELECT_COMMAND_KEYS),
                               datasets=read_datasets(cfg))
        if state.get("weights", "") != (weights or ""):
            changed.append("--weights")
        if changed or state.get("space") != space_text:
            raise FsmetaError(f"cannot resume the study in {out}: its " + (f"configuration differs in {', '.join(changed[:5])}" if changed else "search space differs"))
        parent = tracker.resume_run(state["parent_run_id"])
    else:
        out.mkdir(parents=True, exist_ok=True)
        parent = tracker.start_run(f"tune {cfg.data.target}", params={**cfg.flat(), "tune.space": space_text},
                                   tags={"fsmeta.kind": "tune", "fsmeta.target": cfg.data.target})
        state = {"parent_run_id": parent, "config": cfg.flat(), "space": space_text, "weights": weights or "", "trials": {}}
        atomic_write_bytes(state_path, (json.dumps(state, indent=2, default=str) + "\n").encode())

    started = connect(cfg)
    status = "FAILED"
    try:
        cluster = ray.cluster_resources()
        bundles = trial_resources(cfg, 0 if weights else len(sources), cluster)
        if not fits(bundles, cluster):
            raise FsmetaError(f"one trial needs {bundles} but the Ray cluster has {cluster.get('CPU', 0):g} CPUs and "
                              f"{cluster.get('GPU', 0):g} GPUs; lower tune.trial_cpus / ray.cpus_per_worker")
        resources = tune.PlacementGroupFactory(bundles, strategy=cfg.ray.placement_strategy)
        trainable = tune.with_resources(tune.with_parameters(_trainable, base=cfg.to_dict(), weights=weights or ""), resources)
        callback = TrialRuns(tracker.uri, tracker.experiment, tracker.enabled, parent, str(state_path), cfg.meta.iterations)
        if resume and tune.Tuner.can_restore(str(experiment)):
            tuner = tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True, resume_errored=True)
        else:
            point = default_point(cfg, dims) if cfg.tune.include_defaults else None
            tuner = tune.Tuner(
                trainable,
                param_space={d.key: d.domain() for d in dims},
                tune_config=tune.TuneConfig(metric=METRIC, mode="max", num_samples=cfg.tune.trials,
                                            search_alg=_searcher(cfg, [point] if point else []), scheduler=_scheduler(cfg),
                                            max_concurrent_trials=cfg.tune.max_concurrent or None),
                run_config=tune.RunConfig(name=experiment.name, storage_path=str(out), callbacks=[callback],
                                          checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                          failure_config=tune.FailureConfig(max_failures=2), verbose=1 if progress else 0),
            )
        results = tuner.fit()
        finished = len(json.loads(state_path.read_text()).get("finished", []))
        if finished < cfg.tune.trials:
            # Tune stops gracefully on Ctrl-C and returns what it has: say so, write no best.yaml.
            status = "KILLED"
            raise FsmetaError(f"the study was interrupted with {finished} of {cfg.tune.trials} trials finished; "
                              f"continue it with --resume --out {out}")
        best = _write_outputs(cfg, dims, results, out, tracker, parent)
        status = "FINISHED"
        return best
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.end_run(parent, status)
        if status != "FINISHED":
            _end_open_trials(tracker, state_path, status)
        if started and ray.is_initialized():
            ray.shutdown()


def _end_open_trials(tracker: Tracker, state_path: Path, status: str) -> None:
    """Trials cut off by an interruption: their runs end KILLED (``--resume`` marks them RUNNING again)."""
    if not tracker.enabled or not state_path.is_file():
        return
    for run_id in json.loads(state_path.read_text()).get("trials", {}).values():
        if tracker.client.get_run(run_id).info.status == "RUNNING":
            tracker.end_run(run_id, "KILLED" if status == "KILLED" else "FAILED")


def _write_outputs(cfg: Config, dims: list[Dimension], results, out: Path, tracker: Tracker, parent: str) -> dict[str, Any]:
    keys = [d.key for d in dims]
    rows = []
    for r in results:
        m = r.metrics or {}
        rows.append({"trial_id": m.get("trial_id", ""), **{k: (r.config or {}).get(k) for k in keys},
                     METRIC: m.get(METRIC, float("nan")), "meta_iterations": m.get("meta_iteration", 0),
                     "error": "" if r.error is None else type(r.error).__name__})
    rows.sort(key=lambda row: (-(row[METRIC] if row[METRIC] == row[METRIC] else -1.0), row["trial_id"]))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["trial_id"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(out / "trials.csv", buf.getvalue().encode())
    ok = [r for r in results if r.error is None and r.metrics and METRIC in r.metrics]
    if not ok:
        raise FsmetaError(f"no trial of the study in {out} reported {METRIC}; see {out / 'study'} for the trials' errors")
    finite = [r for r in ok if math.isfinite(float(r.metrics[METRIC]))]
    if not finite:
        raise FsmetaError(f"every trial of the study in {out} reported a non-finite {METRIC}; see {out / 'study'}")
    # The last report of each trial, best first; equal scores go to the lowest trial id, so a
    # resumed study names the same best whatever order Tune restores its trials in.
    best = min(finite, key=lambda r: (-float(r.metrics[METRIC]), str(r.metrics.get("trial_id", ""))))
    values = {k: best.config[k] for k in keys}
    best_cfg = with_values(cfg, values)
    header = (f"# fsmeta tune: best of {len(rows)} trial(s) for target {cfg.data.target}, "
              f"{METRIC}={best.metrics[METRIC]:.4f} after {best.metrics['meta_iteration']} meta-iterations "
              f"(trial {best.metrics.get('trial_id', '')}).\n# Tuned: " + ", ".join(f"{k}={v}" for k, v in values.items()) + "\n")
    atomic_write_bytes(out / "best.yaml", (header + dump_config(best_cfg)).encode())
    if best.checkpoint is not None:
        with best.checkpoint.as_directory() as folder:
            src = Path(folder) / "theta.safetensors"
            tmp = out / ".best.safetensors.tmp"
            shutil.copyfile(src, tmp)
            tmp.replace(out / "best.safetensors")
    tracker.log_metrics(parent, {f"best_{METRIC}": float(best.metrics[METRIC]), "trials": float(len(rows))})
    tracker.set_tags(parent, {"fsmeta.best_trial": str(best.metrics.get("trial_id", ""))})
    for name in ("best.yaml", "trials.csv"):
        tracker.log_artifact(parent, out / name)
    return {"values": values, METRIC: float(best.metrics[METRIC]), "trial_id": best.metrics.get("trial_id", ""),
            "meta_iterations": int(best.metrics["meta_iteration"]), "trials": len(rows)}

