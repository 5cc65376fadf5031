"""Ray Tune studies over the meta-learning hyper-parameters (α, β, ε, learning rates).

A search space is plain YAML, one configuration key per entry (``tune_spaces/``)::

    meta.alpha:    {loguniform: [0.001, 1.0]}
    meta.epsilon:  {uniform: [0.1, 1.0]}
    meta.variant:  {choice: [bce-er, all]}
    meta.inner_steps: {randint: [5, 31]}     # high bound excluded, as in Tune

Each trial meta-trains the target's sources with its own source actors. The trial
is reserved with ``tune.PlacementGroupFactory``: bundle 0 for the trial itself
(fine-tuning and validation), one bundle per source actor, so a trial never waits
for actors that a neighbour holds (an unreserved actor inside a trial hangs Tune).
Every ``tune.eval_every`` meta-iterations the trial fine-tunes copies of θ on K-shot
support sets and reports ``val_miou``, the mean mIoU over ``tune.shots`` ×
``tune.seeds`` on the **validation split**, so ASHA can stop weak trials early.

The splits (:func:`tune_split`): the target's fixed test split is the 2023
protocol's (``eval.test_fraction``, ``eval.split_seed``) and is never read; the
rest (the pool) is cut into validation images (``tune.val_fraction``) and the
images support sets are drawn from. A benchmark with ``eval.protocol=2023`` and
the same split then scores the tuned configuration on images tuning never saw.

MLflow: one parent run for the study; a nested run per trial with its sampled
values as params and ``val_miou`` per meta-iteration; the driver alone logs (a Tune
callback). ``OUT/best.yaml`` is the whole configuration with the best trial's
values, directly usable by ``fsmeta meta-train`` and ``fsmeta benchmark``;
``OUT/best.safetensors`` its last θ; ``OUT/trials.csv`` every trial.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml
from ray.tune import Callback

from fsmeta.atomic import atomic_write_bytes
from fsmeta.config import Config, ConfigError, changed_keys, config_from_dict, dump_config
from fsmeta.data.registry import load_dataset, resolve_sources
from fsmeta.data.sampling import protocol_split
from fsmeta.data.store import ImageSet
from fsmeta.errors import FsmetaError
from fsmeta.meta.driver import worker_gpus
from fsmeta.tracking import Tracker

log = logging.getLogger(__name__)

METRIC = "val_miou"
STATE_FILE = "study.json"
DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")
# Keys a trial may not change: they define the target, its splits or where things are.
_FIXED = ("data.target", "data.sources", "data.root", "eval.test_fraction", "eval.split_seed", "tune.", "tracking.", "ray.", "study.")


# ---------------------------------------------------------------- search spaces


@dataclasses.dataclass(frozen=True)
class Dimension:
    key: str  # a dotted configuration key, e.g. meta.alpha
    distribution: str
    args: tuple

    def domain(self):
        from ray import tune

        if self.distribution == "uniform":
            return tune.uniform(*self.args)
        if self.distribution == "loguniform":
            return tune.loguniform(*self.args)
        if self.distribution == "randint":
            return tune.randint(*self.args)
        return tune.choice(list(self.args))

    def contains(self, value: Any) -> bool:
        if self.distribution == "choice":
            return value in self.args
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        low, high = self.args
        return low <= value < high if self.distribution == "randint" else low <= value <= high


def parse_space(values: Any, cfg: Config, where: str = "search space") -> list[Dimension]:
    """Validate a search space (the mapping of a ``tune_spaces/*.yaml`` file) against ``cfg``.

    Raises:
        ConfigError: naming the file and key, for an unknown key or distribution, or bad bounds.
    """
    if not isinstance(values, dict) or not values:
        raise ConfigError(f"{where}: expected a mapping of configuration keys to distributions, e.g. 'meta.alpha: {{loguniform: [0.001, 1]}}'")
    flat = cfg.flat()
    dims = []
    for key, spec in values.items():
        key = str(key)
        at = f"{where}: {key}"
        if key not in flat:
            near = [k for k in flat if k.split(".")[-1] == key.split(".")[-1]]
            raise ConfigError(f"{at} is not a configuration key" + (f" (did you mean {', '.join(near)}?)" if near else ""))
        if any(key == f or key.startswith(f) for f in _FIXED):
            raise ConfigError(f"{at} cannot be tuned: it fixes the target, its splits or where the study runs")
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ConfigError(f"{at}: expected one distribution, e.g. {{loguniform: [0.001, 1]}}; got {spec!r}")
        ((dist, args),) = spec.items()
        if dist not in DISTRIBUTIONS:
            raise ConfigError(f"{at}: unknown distribution {dist!r}; use one of {', '.join(DISTRIBUTIONS)}")
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{at}: {dist} expects a list, got {args!r}")
        if dist == "choice":
            dims.append(Dimension(key, dist, tuple(args)))
            continue
        if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) for a in args):
            raise ConfigError(f"{at}: {dist} expects [low, high] as two finite numbers, got {args!r}")
        low, high = args
        if not low < high:
            raise ConfigError(f"{at}: {dist} bounds [{low}, {high}] need low < high")
        if dist == "loguniform" and low <= 0:
            raise ConfigError(f"{at}: loguniform bounds [{low}, {high}] must be positive")
        if dist == "randint" and not (isinstance(low, int) and isinstance(high, int)):
            raise ConfigError(f"{at}: randint bounds [{low}, {high}] must be integers (high excluded)")
        dims.append(Dimension(key, dist, (low, high)))
    return dims


def load_space(path: str | Path, cfg: Config) -> list[Dimension]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"search space {p} does not exist")
    try:
        values = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p} is not valid YAML: {exc}") from None
    return parse_space(values, cfg, where=str(p))


def with_values(cfg: Config, values: dict[str, Any]) -> Config:
    """``cfg`` with dotted keys replaced (a trial's sampled values), validated."""
    nested = cfg.to_dict()
    for key, value in values.items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        if leaf not in node:
            raise ConfigError(f"{key} is not a configuration key")
        node[leaf] = value.item() if isinstance(value, np.generic) else value
    return config_from_dict(nested)


def default_point(cfg: Config, dims: list[Dimension]) -> dict[str, Any] | None:
    """The base configuration's value of every dimension (α and β: the variant's paper values),
    or None when one lies outside its range (then no defaults trial is run)."""
    alpha, beta = cfg.meta.loss_weights()
    flat = {**cfg.flat(), "meta.alpha": alpha, "meta.beta": beta}
    point = {d.key: flat[d.key] for d in dims}
    outside = [d.key for d in dims if not d.contains(point[d.key])]
    if outside:
        log.warning("tune: the defaults trial is skipped, %s lie outside the search space", ", ".join(f"{k}={point[k]}" for k in outside))
        return None
    return point


# ---------------------------------------------------------------- the trial


@dataclasses.dataclass(frozen=True)
class TuneSplit:
    """Image indices of the target: support sets come from ``train``, scores from ``val``;
    ``test`` (the 2023 protocol's fixed split) is never read while tuning."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def tune_split(cfg: Config, n_images: int, target: str = "target") -> TuneSplit:
    pool, test = protocol_split(n_images, "2023", cfg.eval.test_fraction, cfg.eval.split_seed)
    n_val = max(1, int(round(cfg.tune.val_fraction * len(pool))))
    if n_val >= len(pool):
        raise FsmetaError(f"tune.val_fraction={cfg.tune.val_fraction} of the {len(pool)}-image pool of {target} leaves no images for support sets")
    order = np.random.default_rng([cfg.eval.split_seed, 4099]).permutation(len(pool))
    val, train = np.sort(pool[order[:n_val]]), np.sort(pool[order[n_val:]])
    if max(cfg.tune.shots) > len(train):
        raise FsmetaError(
            f"tune.shots K={max(cfg.tune.shots)} is larger than the {len(train)} images of {target} left for support sets "
            f"({len(test)} test, {len(val)} validation); lower tune.shots or tune.val_fraction"
        )
    assert test is not None
    return TuneSplit(train, val, test)


def eval_every(cfg: Config) -> int:
    return cfg.tune.eval_every or max(1, cfg.meta.iterations // 5)


def validation_score(cfg: Config, theta: dict, target: ImageSet, split: TuneSplit) -> dict[str, float]:
    """Fine-tune copies of θ on K-shot support sets drawn from ``split.train`` and score them on
    ``split.val``: ``val_miou`` (mean over shots × seeds) and ``val_miou_K<k>`` (mean over seeds)."""
    from fsmeta.evaluate import default_device, evaluate
    from fsmeta.finetune import finetune
    from fsmeta.models import build_model
    from fsmeta.study import Cell, _random_support

    per_k: dict[int, list[float]] = {}
    for k in cfg.tune.shots:
        for seed in cfg.tune.seeds:
            cell = Cell(cfg.data.target, cfg.arch, f"meta-{cfg.meta.variant}", "random", k, seed)
            x, y, _, _ = _random_support(cfg, target, split.train, cell)
            model = build_model(cfg.arch)
            model.load_state_dict(theta)
            model.to(default_device())
            finetune(model, x, y, cfg.finetune, seed=seed, where=f"tune {cell.name()}", compute=cfg.compute)
            summary, _ = evaluate(model, target, split.val, cfg.eval.threshold, compute=cfg.compute)
            per_k.setdefault(k, []).append(float(summary["miou"]))
    scores = {f"{METRIC}_K{k}": float(np.mean(v)) for k, v in per_k.items()}
    scores[METRIC] = float(np.mean([s for v in per_k.values() for s in v]))
    return scores


def run_trial(cfg: Config, report: Callable[[dict[str, float], dict, int], None],
              theta: dict | None = None, start: int = 0, fixed: bool = False) -> None:
    """Meta-train ``cfg`` from ``theta`` at iteration ``start`` (None, 0: a fresh start), calling
    ``report(metrics, θ, iteration)`` after every ``eval_every`` iterations and the last one.
    ``fixed``: ``theta`` is a finished pre-training; only fine-tuning is scored (one report).

    The same task draws as ``fsmeta meta-train`` (a pure function of seed, iteration and
    source), so a trial restored from its checkpoint continues to the same θ."""
    from fsmeta.train import initial_theta, load_sources, make_backend, meta_iteration

    target = load_dataset(cfg.data.target, cfg)
    split = tune_split(cfg, len(target), cfg.data.target)
    if fixed:
        assert theta is not None
        report({"meta_iteration": cfg.meta.iterations, **validation_score(cfg, theta, target, split)}, theta, cfg.meta.iterations)
        return
    sources = load_sources(cfg)
    pool_sizes = [len(s.crops) for s in sources]
    theta = theta if theta is not None else initial_theta(cfg.arch, cfg.seed)
    every = eval_every(cfg)
    backend = make_backend(cfg, sources)
    try:
        for it in range(start, cfg.meta.iterations):
            t0 = time.perf_counter()
            theta, results = meta_iteration(cfg, backend, theta, it, pool_sizes)
            done = it + 1
            if done % every == 0 or done == cfg.meta.iterations:
                metrics = {"meta_iteration": done, "meta_loss": float(np.mean([r.losses["loss"] for r in results])),
                           "sec_per_iter": time.perf_counter() - t0}
                metrics.update(validation_score(cfg, theta, target, split))
                report(metrics, theta, done)
    finally:
        backend.close()


def _trainable(config: dict[str, Any], base: dict[str, Any], weights: str = "") -> None:
    """One Tune trial: the base configuration with the trial's values; resumes from its checkpoint.
    With ``weights``, the pre-training is that checkpoint and only fine-tuning is tuned."""
    from ray import tune

    from fsmeta.checkpoint import load_checkpoint, save_checkpoint
    from fsmeta.train import apply_threads, checkpoint_meta

    cfg = with_values(config_from_dict(base), config)
    apply_threads(dataclasses.replace(cfg, threads=max(1, int(cfg.tune.trial_cpus))))
    theta, start = None, 0
    restored = tune.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as folder:
            theta, meta = load_checkpoint(Path(folder) / "theta.safetensors")
            start = int(meta["iteration"])
    if weights:
        theta, _ = load_checkpoint(weights)
    names = resolve_sources(cfg)

    def report(metrics: dict[str, float], state: dict, iteration: int) -> None:
        with tempfile.TemporaryDirectory() as folder:
            save_checkpoint(Path(folder) / "theta.safetensors", state, checkpoint_meta(cfg, "meta", names, iteration=iteration))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))

    run_trial(cfg, report, theta, start, fixed=bool(weights))


# ---------------------------------------------------------------- resources


def trial_resources(cfg: Config, n_sources: int, cluster: dict[str, float]) -> list[dict[str, float]]:
    """The bundles of one trial: the trial's own, then one per source actor (Ray backend).

    Source actors take ``ray.cpus_per_worker`` CPUs, or automatically
    min(1, (cluster CPUs − trial CPUs) / sources); GPUs: ``ray.gpus_per_worker``, or the
    automatic share of :func:`fsmeta.meta.driver.worker_gpus` (GPUs shared evenly).
    """
    own = {"CPU": cfg.tune.trial_cpus}
    if cfg.tune.trial_gpus > 0:
        own["GPU"] = cfg.tune.trial_gpus
    if cfg.meta.backend != "ray" or n_sources == 0:
        return [own]
    cpus = cfg.ray.cpus_per_worker or min(1.0, (cluster.get("CPU", 0.0) - cfg.tune.trial_cpus) / n_sources)
    if cpus <= 0:
        raise FsmetaError(
            f"a trial takes tune.trial_cpus={cfg.tune.trial_cpus} of the cluster's {cluster.get('CPU', 0.0):g} CPUs, "
            f"leaving none for its {n_sources} source actors; lower tune.trial_cpus or set ray.cpus_per_worker"
        )
    gpus = worker_gpus(cfg.ray.gpus_per_worker, cluster.get("GPU", 0.0), n_sources)
    # Rounded down to Ray's resolution (1e-4), so n bundles never add up to more than the cluster has.
    actor = {"CPU": math.floor(cpus * 1e4) / 1e4, **({"GPU": math.floor(gpus * 1e4) / 1e4} if gpus > 0 else {})}
    return [own] + [dict(actor) for _ in range(n_sources)]


def _fits(bundles: list[dict[str, float]], cluster: dict[str, float]) -> bool:
    return all(sum(b.get(r, 0.0) for b in bundles) <= cluster.get(r, 0.0) + 1e-9 for r in ("CPU", "GPU"))


# ---------------------------------------------------------------- MLflow, from the driver


class TrialRuns(Callback):
    """A Tune callback that gives every trial a nested MLflow run.

    Tune calls it in the driver, so the driver alone logs. It is pickled with the study
    (``Tuner.restore``), so it holds only plain values and opens its tracker lazily;
    the trial → run map lives in ``OUT/study.json`` so a resumed study continues the same runs.
    """

    def __init__(self, uri: str, experiment: str, enabled: bool, parent: str, state_path: str, iterations: int) -> None:
        self.uri, self.experiment, self.enabled = uri, experiment, enabled
        self.parent, self.state_path, self.iterations = parent, state_path, iterations
        self._tracker: Tracker | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tracker": None}

    @property
    def tracker(self) -> Tracker:
        if self._tracker is None:
            self._tracker = Tracker(self.uri, self.experiment, self.enabled)
        return self._tracker

    def _runs(self) -> dict[str, Any]:
        return json.loads(Path(self.state_path).read_text())

    def _run_id(self, trial) -> str:
        return self._runs().get("trials", {}).get(trial.trial_id, "")

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        state = self._runs()
        known = state.setdefault("trials", {}).get(trial.trial_id)
        if known:
            self.tracker.resume_run(known)
            return
        run_id = self.tracker.start_run(f"trial {trial.trial_id}", params=dict(trial.config), parent_run_id=self.parent,
                                        tags={"fsmeta.kind": "trial", "fsmeta.trial_id": trial.trial_id})
        state["trials"][trial.trial_id] = run_id
        atomic_write_bytes(Path(self.state_path), (json.dumps(state, indent=2) + "\n").encode())

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        metrics = {k: float(v) for k, v in result.items()
                   if k.startswith(METRIC) or k in ("meta_loss", "sec_per_iter")}
        self.tracker.log_metrics(self._run_id(trial), metrics, step=int(result.get("meta_iteration", 0)))

    def _finished(self, trial) -> None:
        # Tune calls on_trial_complete/on_trial_error only for a trial that ran to its end, was
        # stopped by the scheduler or failed for good — never for one cut off by Ctrl-C (which
        # Tune nevertheless marks TERMINATED), so this list is how run_study tells the two apart.
        state = self._runs()
        done = state.setdefault("finished", [])
        if trial.trial_id not in done:
            done.append(trial.trial_id)
            atomic_write_bytes(Path(self.state_path), (json.dumps(state, indent=2) + "\n").encode())

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        last = int((trial.last_result or {}).get("meta_iteration", 0))
        run_id = self._run_id(trial)
        self.tracker.set_tags(run_id, {"fsmeta.stopped_early": str(last < self.iterations).lower(), "fsmeta.iterations": str(last)})
        self.tracker.end_run(run_id, "FINISHED")
        self._finished(trial)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.tracker.end_run(self._run_id(trial), "FAILED")
        self._finished(trial)


# ---------------------------------------------------------------- the study


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
    from ray import tune

    from fsmeta.benchmark import target_config
    from fsmeta.meta.driver import connect

    import ray

    cfg = target_config(cfg, cfg.data.target, cfg.arch)
    dims = load_space(space_path, cfg)
    tuned = {d.key for d in dims}
    if weights:
        from fsmeta.checkpoint import read_checkpoint_meta

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
        changed = changed_keys(state["config"], cfg.flat())
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
        if not _fits(bundles, cluster):
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
    best = results.get_best_result(metric=METRIC, mode="max", scope="last", filter_nan_and_inf=True)
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


__all__ = ["Dimension", "parse_space", "load_space", "with_values", "tune_split", "run_trial", "validation_score",
           "trial_resources", "run_study", "TuneSplit"]
