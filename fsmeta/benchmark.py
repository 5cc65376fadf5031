"""``fsmeta benchmark``: the leave-one-data-set-out study of the papers, on Ray, resumable.

For every target, architecture and pre-training the model is pre-trained once
(meta-training on the Ray source actors when ``meta.backend=ray``); then every
(selection, K, seed) cell fine-tunes from those same weights and is evaluated,
each cell a Ray task (``study.cell_cpus`` / ``study.cell_gpus``, so several cells
share a GPU) or, with ``study.executor=local``, one after another in-process.

Scheduling on Ray (``study.scheduler``): ``graph`` (the default) runs the study
as a dependency graph (:mod:`fsmeta.graph`): every pre-training and θ′ is a Ray
task with its declared resources, as many at once as the cluster (or
``study.max_gpus``/``study.max_cpus``) fits, and each cell starts as soon as its
checkpoint exists; the driver only schedules, replays the units' MLflow calls
and records. ``sequential`` pre-trains one model after another in the driver,
then runs the cells. Every unit is a pure function of its configuration and
inputs, so both give the in-process table bit for bit. ``OUT/schedule.jsonl``
records when each unit ran and what it held.

Resumability: each finished cell is recorded as ``OUT/cells/<key>.json``
(written atomically, with its MLflow run id) the moment its result reaches the
driver; ``--resume`` skips recorded cells and finished pre-trainings, resumes an
interrupted meta-training from its checkpoint, and continues the same MLflow
parent run. Since every cell is a pure function of (configuration, pre-trained
weights, cell), the final table equals that of an uninterrupted run.

Tracking: the driver alone logs. One parent run per benchmark; nested under it,
one run per pre-training (with its checkpoint as an artifact) and one per cell
with params (target, arch, pretraining, selection, shots, seed) and metrics
(iou = miou, pooled_iou, f1, precision, recall, n_test).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any


from fsmeta.atomic import atomic_write_bytes
from fsmeta.compute import compute_tags, describe_label
from fsmeta.compute import describe as describe_compute
from fsmeta.config import RUNTIME_KEYS, SELECT_COMMAND_KEYS, Config, changed_keys, config_from_dict, read_datasets
from fsmeta.data.registry import load_dataset, resolve_sources
from fsmeta.data.sampling import protocol_split
from fsmeta.data.store import ImageSet
from fsmeta.errors import FsmetaError
from fsmeta.evaluate import default_device, predict_probability
from fsmeta.graph import Graph, Unit, capacity, check_fits, pretraining_kind, unit_bundles
from fsmeta.progress import Progress
from fsmeta.report import (
    RESULT_COLUMNS, error_overlay, format_table, render_report, summarize, summary_metrics, write_png, write_results,
)
from fsmeta.study import Cell, run_cell, target_config
from fsmeta.tracking import RecordingTracker, Tracker
from fsmeta.train import apply_threads, meta_train, scratch_checkpoint, transfer_train

log = logging.getLogger(__name__)

STATE_FILE = "benchmark.json"
# Ray gives a task that asks for a GPU a fresh worker process each time (max_calls=1 by default), so
# every cell would pay a Python, torch and CUDA start-up (seconds; ~20 s on a loaded 2-core machine).
# A cell frees its model when it returns, so its worker may run the next one: 0 = no limit.
CELL_MAX_CALLS = 0
SCHEDULE_FILE = "schedule.jsonl"  # one line per unit of work run: kind, start and end (Unix seconds), CPUs and GPUs held
# Besides config.RUNTIME_KEYS (where and how fast cells run; a resumed benchmark may move
# to other hardware), the grid's axes may grow or shrink on --resume: a cell's result depends on its own
# coordinates and the rest of the configuration, so recorded cells stay valid and only
# the new ones run (e.g. add selection methods or seeds to a finished benchmark).
_GRID_AXES = ("study.targets", "study.archs", "study.pretrainings", "study.selections", "study.selection_pretrainings",
              "eval.shots", "eval.seeds", "study.overlays")


def grid_tags(cfg: Config, cells: list[Cell]) -> dict[str, str]:
    """The grid now run, as tags of the study's parent run: MLflow params cannot change when a
    grid grows on --resume, tags can (``fsmeta.grid.eval.seeds`` = ``0,1,2``, ``fsmeta.cells``)."""
    flat = cfg.flat()
    return {"fsmeta.cells": str(len(cells)),
            **{f"fsmeta.grid.{axis}": ",".join(str(v) for v in flat[axis]) if isinstance(flat[axis], list) else str(flat[axis])
               for axis in _GRID_AXES}}


def cell_key(cell: Cell) -> str:
    return f"{cell.target}__{cell.arch}__{cell.pretraining}__{cell.selection}__K{cell.shots}__s{cell.seed}"


def grid(cfg: Config) -> list[Cell]:
    targets = cfg.study.targets or [cfg.data.target]
    return [
        Cell(t, a, p, sel, k, s)
        for t in targets
        for a in cfg.study.archs
        for p in cfg.study.pretrainings
        for sel in cfg.study.selections
        if sel == "random" or not cfg.study.selection_pretrainings or p in cfg.study.selection_pretrainings
        for k in cfg.eval.shots
        for s in cfg.eval.seeds
    ]


def _check_resume(state: dict[str, Any], cfg: Config, out: Path) -> None:
    changed = changed_keys(state["config"], cfg.flat(), ignore=(*RUNTIME_KEYS, *_GRID_AXES, *SELECT_COMMAND_KEYS),
                           datasets=read_datasets(cfg))
    if changed:
        raise FsmetaError(f"cannot resume the benchmark in {out}: its configuration differs in {', '.join(changed[:5])}")


def _folder(out: Path, target: str, arch: str, pretraining: str) -> Path:
    return out / "pretrained" / target / arch / pretraining


def pretrained_path(out: Path, target: str, arch: str, pretraining: str) -> Path:
    """Where the pre-training's final checkpoint is kept (it exists once the pre-training is done)."""
    return _folder(out, target, arch, pretraining) / f"{pretraining_kind(pretraining)}.safetensors"


def pretext_path(out: Path, target: str, arch: str, pretraining: str) -> Path:
    return _folder(out, target, arch, pretraining) / "pretext.safetensors"


def uses_pretext(cfg: Config) -> bool:
    """The 2023 pipeline scores and fine-tunes θ′; select.pretext_epochs=0: θ itself."""
    return cfg.eval.protocol == "2023" and cfg.select.pretext_epochs > 0


def pretrain_base(cfg: Config, target: str, arch: str, pretraining: str, out: Path, tracker: Tracker, parent: str | None,
                  progress: bool = True) -> Path:
    """Pre-train once per (target, arch, pre-training); a finished checkpoint is reused, an interrupted
    meta-training resumes from its last checkpoint."""
    tcfg = target_config(cfg, target, arch, pretraining)
    folder = _folder(out, target, arch, pretraining)
    kind = pretraining_kind(pretraining)
    final = pretrained_path(out, target, arch, pretraining)
    if not final.is_file():
        if kind == "meta":
            final = meta_train(tcfg, folder, tracker, resume=True, parent_run_id=parent, progress=progress)
        elif kind == "transfer":
            final = transfer_train(tcfg, folder, tracker, parent_run_id=parent, progress=progress)
        else:
            final = scratch_checkpoint(tcfg, folder)
    return final


def pretrain_pretext(cfg: Config, target: str, arch: str, pretraining: str, out: Path, tracker: Tracker, parent: str | None) -> Path:
    """The 2023 pipeline's θ′: the pre-trained model adapted to the target's pseudo-labels. It sees
    only pixels, so one θ′ serves every split and method."""
    tcfg = target_config(cfg, target, arch, pretraining)
    final = pretrained_path(out, target, arch, pretraining)
    pretext = pretext_path(out, target, arch, pretraining)
    if not pretext.is_file():
        from fsmeta.select.pretext import resolve_polarity

        apply_threads(tcfg)  # the same torch threads wherever θ′ is trained: in the driver or in a Ray task
        images = load_dataset(target, tcfg)
        polarity, _ = resolve_polarity(tcfg, images)
        with tracker.run(f"pretext/{target}/{arch}/{pretraining}", parent_run_id=parent,
                         params={"target": target, "arch": arch, "pretraining": pretraining, "epochs": cfg.select.pretext_epochs,
                                 "polarity": polarity},
                         tags={"fsmeta.kind": "pretext"}) as run_id:
            train_pretext(tcfg, images, final, pretext, cfg.seed, polarity)
            tracker.log_artifact(run_id, pretext, "checkpoints")
    return pretext


def train_pretext(cfg: Config, images: ImageSet, base: Path, out: Path, seed: int, polarity: str) -> Path:
    """θ′: the checkpoint ``base`` fine-tuned on the pseudo-labels of ``images`` (``polarity``, as
    :func:`fsmeta.select.pretext.resolve_polarity` reads it, is recorded), saved to ``out``."""
    from fsmeta.checkpoint import Kind, describe_adapted, model_from_checkpoint, save_checkpoint
    from fsmeta.models import clone_state
    from fsmeta.select import pretext_finetune

    model, meta = model_from_checkpoint(base)
    model.to(default_device())
    pretext_finetune(model, images, cfg, seed=seed)
    return save_checkpoint(out, clone_state(model), describe_adapted(Kind.PRETEXT, meta, polarity=polarity))


def pretrain(cfg: Config, target: str, arch: str, pretraining: str, out: Path, tracker: Tracker, parent: str, progress: bool = True) -> Path:
    """The checkpoint the cells of (target, arch, pre-training) start from: the pre-trained θ, or
    in the 2023 pipeline its θ′ (:func:`pretrain_pretext`)."""
    final = pretrain_base(cfg, target, arch, pretraining, out, tracker, parent, progress)
    if not uses_pretext(cfg):
        return final
    return pretrain_pretext(cfg, target, arch, pretraining, out, tracker, parent)


def _cell_job(cfg_dict: dict[str, Any], checkpoint: str, cell: dict[str, Any], overlays: int) -> dict[str, Any]:
    """One cell, as run in a Ray task or in-process: metrics, plus overlays of the first test images."""
    start = time.time()
    cfg = config_from_dict(cfg_dict)
    apply_threads(cfg)
    c = Cell(**cell)
    try:
        target = load_dataset(c.target, cfg)
        metrics, model, test = run_cell(cfg, target, Path(checkpoint), c, cache_rankings=True)
    except FsmetaError as exc:
        return {"error": f"{c.name()}: {exc}"}
    drawn = []
    for i in test[:overlays]:
        prob = predict_probability(model, target.image(int(i)))
        drawn.append((target.ids[int(i)], error_overlay(prob >= metrics["threshold"], target.masks[int(i)])))
    return {"metrics": metrics, "overlays": drawn, "span": [start, time.time()],
            "compute": describe_compute(default_device(), cfg.compute)}


def study_compute(rows: list[dict[str, Any]]) -> str:
    """How a study's cells computed, in one line (the parent run's ``fsmeta.compute`` tag): the one
    path they share, or each path with its number of cells. A study resumed on another kind of
    machine mixes paths (``auto`` is bf16 where the processor computes it natively, fp32 elsewhere);
    its cells then differ by rounding as well as by what the grid varies, so that is logged as a
    warning. Cells recorded before fsmeta recorded this count as ``unrecorded``."""
    counts = Counter(describe_label(r.get("compute") or {}) for r in rows)
    if len(counts) == 1:
        return next(iter(counts))
    text = "; ".join(f"{label}: {n} cells" for label, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    log.warning("the cells of this study did not all compute the same way (%s): bf16 and fp32 round differently, "
                "so their scores differ within rounding beside what the grid varies (docs/results.md, 'Issue 14'); "
                "compare cells computed alike (each cell's 'compute' in OUT/cells/*.json)", text)
    return "mixed: " + text


def _record_span(out: Path, key: str, kind: str, span: list[float], demand: dict[str, float]) -> None:
    """One line of OUT/schedule.jsonl: where a study's time went (bench/cluster_schedule.py reads it)."""
    line = {"unit": key, "kind": kind, "start": span[0], "end": span[1], "cpus": demand.get("CPU", 0.0), "gpus": demand.get("GPU", 0.0)}
    with open(out / SCHEDULE_FILE, "a") as f:
        f.write(json.dumps(line) + "\n")


def _cell_config(cfg: Config, cell: Cell) -> dict[str, Any]:
    tcfg = target_config(cfg, cell.target, cell.arch)
    threads = max(1, int(cfg.study.cell_cpus))
    return dataclasses.replace(tcfg, threads=threads).to_dict()


class _LocalCells:
    def __init__(self) -> None:
        self.queue: list[tuple[Any, tuple]] = []

    def submit(self, token: Any, args: tuple) -> None:
        self.queue.append((token, args))

    def results(self):
        for token, args in self.queue:
            yield token, _cell_job(*args)


class _RayCells:
    def __init__(self, cfg: Config) -> None:
        from fsmeta.meta.driver import connect

        import ray

        self.ray = ray
        self.started = connect(cfg)
        gpus = ray.cluster_resources().get("GPU", 0.0)
        if cfg.study.cell_gpus > 0 and gpus == 0:
            if self.started:
                ray.shutdown()
            # A task asking for a GPU on a cluster without one would wait forever.
            raise FsmetaError(f"study.cell_gpus={cfg.study.cell_gpus} but the Ray cluster has no GPU; set study.cell_gpus=0")
        self.remote = ray.remote(num_cpus=cfg.study.cell_cpus, num_gpus=cfg.study.cell_gpus, max_retries=3,
                                 max_calls=CELL_MAX_CALLS)(_cell_job)
        self.refs: dict[Any, Any] = {}

    def submit(self, token: Any, args: tuple) -> None:
        self.refs[self.remote.remote(*args)] = token

    def results(self):
        while self.refs:
            done, _ = self.ray.wait(list(self.refs), num_returns=1)
            for ref in done:
                yield self.refs.pop(ref), self.ray.get(ref)

    def close(self) -> None:
        for ref in self.refs:
            self.ray.cancel(ref, force=True)
        if self.started:
            self.ray.shutdown()


def study_graph(cfg: Config, cells: list[Cell], cluster: dict[str, float],
                n_sources: dict[tuple[str, str], int] | None = None) -> list[Unit]:
    """The study as units of work (:mod:`fsmeta.graph`): per (target, arch, pre-training) its
    pre-training, in the 2023 pipeline its θ′, and every cell depending on the checkpoint it
    starts from. ``n_sources`` (source data sets per (target, arch)) is read from the
    configuration when not given."""
    units: list[Unit] = []
    targets = list(dict.fromkeys(c.target for c in cells))
    final: dict[tuple[str, str, str], str] = {}
    for t in targets:
        for a in cfg.study.archs:
            n = n_sources[(t, a)] if n_sources is not None else len(resolve_sources(target_config(cfg, t, a)))
            for p in cfg.study.pretrainings:
                kind = pretraining_kind(p)
                base = Unit(f"{kind}/{t}/{a}/{p}", kind, tuple(unit_bundles(cfg, kind, n, cluster)), (), len(units))
                units.append(base)
                final[(t, a, p)] = base.key
                if uses_pretext(cfg):
                    pretext = Unit(f"pretext/{t}/{a}/{p}", "pretext", tuple(unit_bundles(cfg, "pretext", n, cluster)), (base.key,), len(units))
                    units.append(pretext)
                    final[(t, a, p)] = pretext.key
    cell_bundles = tuple(unit_bundles(cfg, "cell", 0, cluster))
    units += [Unit(cell_key(c), "cell", cell_bundles, (final[(c.target, c.arch, c.pretraining)],), len(units) + i)
              for i, c in enumerate(cells)]
    return units


def _unit_job(cfg_dict: dict[str, Any], kind: str, model: list[str], out: str, run_id: str) -> dict[str, Any]:
    """One pre-training or θ′, as run in a Ray task of the graph scheduler: its checkpoint, and the
    tracking calls for the driver to replay (the driver alone talks to MLflow)."""
    start = time.time()
    cfg = config_from_dict(cfg_dict)
    apply_threads(cfg)
    tracker = RecordingTracker(run_id)
    t, a, p = model
    if kind == "pretext":
        path = pretrain_pretext(cfg, t, a, p, Path(out), tracker, None)
    else:
        path = pretrain_base(cfg, t, a, p, Path(out), tracker, None, progress=False)
    return {"checkpoint": str(path), "calls": tracker.calls, "span": [start, time.time()]}


_RUN_NAMES = {"meta": "meta-train", "transfer": "transfer-train"}


class _RayGraph:
    """The graph scheduler (``study.scheduler=graph``): every unit a Ray task with its declared
    resources, started by :func:`fsmeta.graph.launchable` as they fit and as their inputs exist;
    cells come back through :meth:`results` to be recorded by the driver.

    A meta-training with the Ray backend runs in a placement group of its driver's bundle and one
    per source actor (bundle 0 for the task, the actors find theirs by
    :func:`fsmeta.meta.resources.actor_bundle_offset`). A unit lost with its node is re-run by
    Ray (``ray.max_task_retries``); an interrupted meta-training resumes from its checkpoint."""

    def __init__(self, cfg: Config, out: Path, tracker: Tracker, parent: str, cells: list[Cell], todo: list[Cell],
                 cell_args) -> None:
        from fsmeta.meta.driver import connect

        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.ray, self._pg, self._remove_pg, self._in_pg = ray, placement_group, remove_placement_group, PlacementGroupSchedulingStrategy
        self.cfg, self.out, self.tracker, self.parent = cfg, out, tracker, parent
        self.started = connect(cfg)
        cluster = ray.cluster_resources()
        if cfg.study.cell_gpus > 0 and cluster.get("GPU", 0.0) == 0:
            if self.started:
                ray.shutdown()
            raise FsmetaError(f"study.cell_gpus={cfg.study.cell_gpus} but the Ray cluster has no GPU; set study.cell_gpus=0")
        self.cap = capacity(cfg, cluster)
        units = study_graph(cfg, cells, cluster)
        check_fits(units, self.cap)
        self.graph = Graph({u.key: u for u in units})
        self.models: dict[str, tuple[str, str, str]] = {}
        for c in cells:
            for kind in ("pretext", pretraining_kind(c.pretraining)):
                self.models[f"{kind}/{c.target}/{c.arch}/{c.pretraining}"] = (c.target, c.arch, c.pretraining)
        pending = {cell_key(c) for c in todo}
        self.cells = {cell_key(c): c for c in cells}
        for u in units:  # resume: what exists is done
            if u.kind == "cell":
                if u.key not in pending:
                    self.graph.done.add(u.key)
            elif self._checkpoint(u).is_file():
                self.graph.done.add(u.key)
        self.cell_args = cell_args
        retries = cfg.ray.max_task_retries
        # A pre-training's worker exits when it returns (max_calls=1): it started source actors and a
        # placement group, and a cell must not inherit that state; a unit is long, its start-up negligible.
        self.unit_remote = ray.remote(max_retries=-1 if retries < 0 else retries, max_calls=1)(_unit_job)
        self.cell_remote = ray.remote(num_cpus=cfg.study.cell_cpus, num_gpus=cfg.study.cell_gpus, max_retries=3,
                                      max_calls=CELL_MAX_CALLS)(_cell_job)
        self.refs: dict[Any, tuple[Unit, str, Any]] = {}  # ref → (unit, MLflow run id, placement group)

    def _checkpoint(self, u: Unit) -> Path:
        t, a, p = self.models[u.key]
        return pretext_path(self.out, t, a, p) if u.kind == "pretext" else pretrained_path(self.out, t, a, p)

    def _run_id(self, u: Unit) -> str:
        """The MLflow run a pre-training logs to: created here (the driver), or for an interrupted
        meta-training the run its last checkpoint names."""
        t, a, p = self.models[u.key]
        if u.kind == "scratch":
            return ""
        if u.kind == "meta":
            last = self.out / "pretrained" / t / a / p / "checkpoints" / "meta-last.safetensors"
            if last.is_file():
                from fsmeta.checkpoint import read_checkpoint_meta

                run_id = read_checkpoint_meta(last).get("mlflow_run_id", "")
                if run_id:
                    return self.tracker.resume_run(run_id)
        name = _RUN_NAMES.get(u.kind, f"{u.kind}/{t}/{a}/{p}")
        return self.tracker.start_run(name, parent_run_id=self.parent, tags={"fsmeta.kind": u.kind, "fsmeta.target": t})

    def _launch(self, u: Unit) -> None:
        if u.kind == "cell":
            c = self.cells[u.key]
            self.refs[self.cell_remote.remote(*self.cell_args(c))] = (u, "", None)
            return
        run_id = self._run_id(u)
        own = u.bundles[0]
        options: dict[str, Any] = {"num_cpus": own.get("CPU", 0.0), "num_gpus": own.get("GPU", 0.0)}
        pg = None
        if len(u.bundles) > 1:  # a meta-training's driver and its source actors, reserved together
            pg = self._pg([dict(b) for b in u.bundles], strategy=self.cfg.ray.placement_strategy, name=f"fsmeta-{u.key}")
            options["scheduling_strategy"] = self._in_pg(pg, placement_group_bundle_index=0)
        ref = self.unit_remote.options(**options).remote(self.cfg.to_dict(), u.kind, list(self.models[u.key]), str(self.out), run_id)
        self.refs[ref] = (u, run_id, pg)

    def results(self):
        """Run the graph; yield (cell, result) as cells finish."""
        while not self.graph.finished():
            for u in self.graph.start(self.cap):
                self._launch(u)
            if not self.refs:
                raise FsmetaError("the study graph is stuck: no unit running and none can start")
            done, _ = self.ray.wait(list(self.refs), num_returns=1)
            for ref in done:
                u, run_id, pg = self.refs.pop(ref)
                try:
                    result = self.ray.get(ref)
                except self.ray.exceptions.RayTaskError as exc:
                    self.tracker.end_run(run_id, "FAILED")
                    cause = exc.cause if isinstance(exc.cause, BaseException) else None
                    raise (cause or exc) from None
                finally:
                    if pg is not None:
                        self._remove_pg(pg)
                _record_span(self.out, u.key, u.kind, result["span"], u.demand)
                if u.kind == "cell":
                    yield self.cells[u.key], result
                else:
                    RecordingTracker.replay(self.tracker, run_id, result["calls"])
                self.graph.finish(u.key)

    def close(self) -> None:
        for ref, (_, run_id, pg) in self.refs.items():
            self.ray.cancel(ref, force=True)
            self.tracker.end_run(run_id, "KILLED")
            if pg is not None:
                self._remove_pg(pg)
        self.refs = {}
        if self.started:
            self.ray.shutdown()


def _driver_demand(cfg: Config, target: str, arch: str, pretraining: str) -> dict[str, float]:
    """What a pre-training run in the driver (study.scheduler=sequential) holds, for schedule.jsonl:
    a meta-training's source actors on the Ray backend; nothing reserved otherwise."""
    if pretraining_kind(pretraining) != "meta" or cfg.meta.backend != "ray":
        return {}
    from fsmeta.meta.resources import actor_bundle

    import ray

    tcfg = target_config(cfg, target, arch, pretraining)
    n = len(resolve_sources(tcfg))
    bundle = actor_bundle(tcfg.ray, ray.cluster_resources() if ray.is_initialized() else {}, n)
    return {r: n * bundle.get(r, 0.0) for r in ("CPU", "GPU")}


def run_benchmark(
    cfg: Config,
    out_dir: str | Path,
    tracker: Tracker,
    *,
    resume: bool = False,
    progress: bool = True,
    name: str = "benchmark",
) -> list[dict[str, Any]]:
    """Run (or resume) the whole grid and write the results, summary and figures into ``out_dir``."""
    out = Path(out_dir)
    cells_dir = out / "cells"
    state_path = out / STATE_FILE
    cells = grid(cfg)
    targets = list(dict.fromkeys(c.target for c in cells))
    if cfg.eval.protocol != "2023" and cfg.study.selections != ["random"]:
        raise FsmetaError(f"study.selections={cfg.study.selections}: selection methods other than random need eval.protocol=2023")
    if cfg.eval.protocol != "2023" and cfg.eval.pool_threshold and cfg.finetune.holdout > 0:
        log.info("eval.pool_threshold: the %s protocol tests on every image outside the support, so no unannotated "
                 "image is left to read; the held-out bands choose the threshold alone", cfg.eval.protocol)
    # Validate every target's sources and prepare every data set before any work starts
    # (and before tasks run in parallel, so no two of them generate the same synthetic store).
    for t in targets:
        for a in cfg.study.archs:
            tcfg = target_config(cfg, t, a)
            for dataset in [t, *resolve_sources(tcfg)]:
                load_dataset(dataset, tcfg)
        n_images = len(load_dataset(t, cfg))
        pool, _ = protocol_split(n_images, cfg.eval.protocol, cfg.eval.test_fraction, cfg.eval.split_seed)
        if max(cfg.eval.shots) > len(pool):
            raise FsmetaError(f"K={max(cfg.eval.shots)} is larger than the pool of {len(pool)} image(s) of target {t}")

    if state_path.is_file():
        if not resume:
            raise FsmetaError(f"{out} already holds a benchmark; pass --resume to continue it or choose another --out")
        state = json.loads(state_path.read_text())
        _check_resume(state, cfg, out)
        parent = tracker.resume_run(state.get("parent_run_id", ""))
        if state["config"] != cfg.flat():
            state["config"] = cfg.flat()  # the grid grew or shrank: the state names the grid now run
            atomic_write_bytes(state_path, (json.dumps(state, indent=2, default=str) + "\n").encode())
            tracker.set_tags(parent, grid_tags(cfg, cells))
    else:
        out.mkdir(parents=True, exist_ok=True)
        parent = tracker.start_run(name, params={**cfg.flat(), "cells": len(cells)},
                                   tags={"fsmeta.kind": "study", **grid_tags(cfg, cells)})
        state = {"parent_run_id": parent, "config": cfg.flat()}
        atomic_write_bytes(state_path, (json.dumps(state, indent=2, default=str) + "\n").encode())

    status = "FAILED"
    executor: Any = None
    try:
        done = {cell_key(c) for c in cells if (cells_dir / f"{cell_key(c)}.json").is_file()}
        todo = [c for c in cells if cell_key(c) not in done]
        if done:
            log.info("benchmark: %d of %d cells already recorded, %d to run", len(done), len(cells), len(todo))
        first_seed = cfg.eval.seeds[0]
        max_k = max(cfg.eval.shots)

        def cell_args(c: Cell, checkpoint: Path) -> tuple:
            n_overlays = cfg.study.overlays if (c.seed == first_seed and c.shots == max_k) else 0
            return (_cell_config(cfg, c), str(checkpoint), dataclasses.asdict(c), n_overlays)

        if cfg.study.executor == "ray" and cfg.study.scheduler == "graph":
            where = out.resolve()  # Ray tasks may run in another working directory, or on another node
            final = {(c.target, c.arch, c.pretraining): (pretext_path if uses_pretext(cfg) else pretrained_path)(where, c.target, c.arch, c.pretraining)
                     for c in cells}
            executor = _RayGraph(cfg, where, tracker, parent, cells, todo,
                                 lambda c: cell_args(c, final[(c.target, c.arch, c.pretraining)]))
        else:
            checkpoints = {}
            for t in targets:
                for a in cfg.study.archs:
                    for p in cfg.study.pretrainings:
                        start = time.time()
                        have = pretrained_path(out, t, a, p).is_file() and (not uses_pretext(cfg) or pretext_path(out, t, a, p).is_file())
                        checkpoints[(t, a, p)] = pretrain(cfg, t, a, p, out, tracker, parent, progress)
                        if not have:
                            _record_span(out, f"{pretraining_kind(p)}/{t}/{a}/{p}", pretraining_kind(p), [start, time.time()],
                                         _driver_demand(cfg, t, a, p))
            executor = _RayCells(cfg) if cfg.study.executor == "ray" and todo else _LocalCells()
            for c in todo:
                executor.submit(c, cell_args(c, checkpoints[(c.target, c.arch, c.pretraining)]))
        bar = Progress(len(cells), "benchmark cells", start=len(done), every=0.0, enabled=progress)
        for c, result in executor.results():
            if "error" in result:
                raise FsmetaError(result["error"])
            m = result["metrics"]
            how = result["compute"]
            with tracker.run(c.name(), params=c.params(), parent_run_id=parent,
                             tags={"fsmeta.kind": "cell", **compute_tags(how)}) as run_id:
                tracker.log_metrics(run_id, {"iou": m["miou"], **m})
            for image_id, rgb in result["overlays"]:
                write_png(out / "overlays" / c.target / f"{c.arch}-{c.pretraining}-{c.selection}-K{c.shots}-{image_id}.png", rgb)
            record = {**c.params(), **m, "compute": how, "run_id": run_id}
            atomic_write_bytes(cells_dir / f"{cell_key(c)}.json", (json.dumps(record, indent=2) + "\n").encode())
            if not isinstance(executor, _RayGraph):
                _record_span(out, cell_key(c), "cell", result["span"], {"CPU": cfg.study.cell_cpus, "GPU": cfg.study.cell_gpus})
            bar.update(detail=f"{c.name()}: mIoU {m['miou']:.3f}")

        rows = [json.loads((cells_dir / f"{cell_key(c)}.json").read_text()) for c in cells]
        tracker.set_tags(parent, {"fsmeta.compute": study_compute(rows)})
        rows = [{k: r[k] for k in RESULT_COLUMNS} for r in rows]
        paths = [*write_results(rows, out), *render_report(out, rows)]
        for path in paths:
            tracker.log_artifact(parent, path)
        # What a person opening the parent run looks for: the summary as metrics and as a table.
        summary = summarize(rows)
        tracker.log_metrics(parent, summary_metrics(summary))
        tracker.log_table(parent, summary, "summary_table.json")
        if (out / "overlays").is_dir():
            tracker.log_artifact(parent, out / "overlays", "overlays")
        status = "FINISHED"
        return rows
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if isinstance(executor, (_RayCells, _RayGraph)):
            executor.close()
        tracker.end_run(parent, status)


def run_demo(cfg: Config, out_dir: str | Path, tracker: Tracker, progress: bool = True) -> list[dict[str, Any]]:
    """``fsmeta demo``: the benchmark of one target with the meta-learned, transfer and
    from-scratch pre-trainings. A re-run in the same folder continues it (or says why it can't)."""
    study = dataclasses.replace(
        cfg.study, targets=[cfg.data.target], archs=[cfg.arch], pretrainings=[f"meta-{cfg.meta.variant}", "transfer", "scratch"]
    )
    return run_benchmark(dataclasses.replace(cfg, study=study), out_dir, tracker, resume=True, progress=progress, name="demo")


def benchmark_table(rows: list[dict[str, Any]]) -> str:
    return format_table(summarize(rows))


__all__ = ["run_benchmark", "grid", "cell_key", "benchmark_table", "run_demo"]
