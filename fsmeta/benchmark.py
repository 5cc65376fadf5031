"""``fsmeta benchmark``: the leave-one-data-set-out study of the papers, on Ray, resumable.

For every target, architecture and pre-training the model is pre-trained once
(meta-training on the Ray source actors when ``meta.backend=ray``); then every
(selection, K, seed) cell fine-tunes from those same weights and is evaluated,
each cell a Ray task (``study.cell_cpus`` / ``study.cell_gpus``, so several cells
share a GPU) or, with ``study.executor=local``, one after another in-process.

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
from pathlib import Path
from typing import Any


from fsmeta.atomic import atomic_write_bytes
from fsmeta.config import RUNTIME_KEYS, Config, changed_keys, config_from_dict
from fsmeta.data.registry import load_dataset, resolve_sources
from fsmeta.data.sampling import protocol_split
from fsmeta.errors import FsmetaError
from fsmeta.evaluate import default_device, predict_probability
from fsmeta.progress import Progress
from fsmeta.report import (
    RESULT_COLUMNS, error_overlay, format_table, render_report, summarize, summary_metrics, write_png, write_results,
)
from fsmeta.study import Cell, run_cell, target_config
from fsmeta.tracking import Tracker
from fsmeta.train import apply_threads, meta_train, scratch_checkpoint, transfer_train

log = logging.getLogger(__name__)

STATE_FILE = "benchmark.json"
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
    changed = changed_keys(state["config"], cfg.flat(), ignore=(*RUNTIME_KEYS, *_GRID_AXES))
    if changed:
        raise FsmetaError(f"cannot resume the benchmark in {out}: its configuration differs in {', '.join(changed[:5])}")


def pretrain(cfg: Config, target: str, arch: str, pretraining: str, out: Path, tracker: Tracker, parent: str, progress: bool = True) -> Path:
    """Pre-train once per (target, arch, pre-training); a finished checkpoint is reused, an interrupted
    meta-training resumes from its last checkpoint."""
    tcfg = target_config(cfg, target, arch, pretraining)
    folder = out / "pretrained" / target / arch / pretraining
    kind = "meta" if pretraining.startswith("meta-") else pretraining
    final = folder / f"{kind}.safetensors"
    if not final.is_file():
        if kind == "meta":
            final = meta_train(tcfg, folder, tracker, resume=True, parent_run_id=parent, progress=progress)
        elif kind == "transfer":
            final = transfer_train(tcfg, folder, tracker, parent_run_id=parent, progress=progress)
        else:
            final = scratch_checkpoint(tcfg, folder)
    if cfg.eval.protocol != "2023" or cfg.select.pretext_epochs == 0:
        return final  # select.pretext_epochs=0: selection scores and fine-tuning start from θ itself
    # The 2023 pipeline scores and fine-tunes θ′, the pre-trained model adapted to the
    # target's pseudo-labels; it sees only pixels, so one θ′ serves every split and method.
    pretext = folder / "pretext.safetensors"
    if not pretext.is_file():
        from fsmeta.checkpoint import Kind, describe_adapted, model_from_checkpoint, save_checkpoint
        from fsmeta.models import clone_state
        from fsmeta.select import pretext_finetune

        model, meta = model_from_checkpoint(final)
        model.to(default_device())
        with tracker.run(f"pretext/{target}/{arch}/{pretraining}", parent_run_id=parent,
                         params={"target": target, "arch": arch, "pretraining": pretraining, "epochs": cfg.select.pretext_epochs},
                         tags={"fsmeta.kind": "pretext"}) as run_id:
            pretext_finetune(model, load_dataset(target, tcfg), tcfg, seed=cfg.seed)
            save_checkpoint(pretext, clone_state(model), describe_adapted(Kind.PRETEXT, meta))
            tracker.log_artifact(run_id, pretext, "checkpoints")
    return pretext


def _cell_job(cfg_dict: dict[str, Any], checkpoint: str, cell: dict[str, Any], overlays: int) -> dict[str, Any]:
    """One cell, as run in a Ray task or in-process: metrics, plus overlays of the first test images."""
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
    return {"metrics": metrics, "overlays": drawn}


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
        self.remote = ray.remote(num_cpus=cfg.study.cell_cpus, num_gpus=cfg.study.cell_gpus, max_retries=3)(_cell_job)
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
        checkpoints = {}
        for t in targets:
            for a in cfg.study.archs:
                for p in cfg.study.pretrainings:
                    checkpoints[(t, a, p)] = pretrain(cfg, t, a, p, out, tracker, parent, progress)

        done = {cell_key(c) for c in cells if (cells_dir / f"{cell_key(c)}.json").is_file()}
        todo = [c for c in cells if cell_key(c) not in done]
        if done:
            log.info("benchmark: %d of %d cells already recorded, %d to run", len(done), len(cells), len(todo))
        executor = _RayCells(cfg) if cfg.study.executor == "ray" and todo else _LocalCells()
        first_seed = cfg.eval.seeds[0]
        max_k = max(cfg.eval.shots)
        for c in todo:
            n_overlays = cfg.study.overlays if (c.seed == first_seed and c.shots == max_k) else 0
            executor.submit(c, (_cell_config(cfg, c), str(checkpoints[(c.target, c.arch, c.pretraining)]), dataclasses.asdict(c), n_overlays))
        bar = Progress(len(cells), "benchmark cells", start=len(done), every=0.0, enabled=progress)
        for c, result in executor.results():
            if "error" in result:
                raise FsmetaError(result["error"])
            m = result["metrics"]
            with tracker.run(c.name(), params=c.params(), parent_run_id=parent, tags={"fsmeta.kind": "cell"}) as run_id:
                tracker.log_metrics(run_id, {"iou": m["miou"], **m})
            for image_id, rgb in result["overlays"]:
                write_png(out / "overlays" / c.target / f"{c.arch}-{c.pretraining}-{c.selection}-K{c.shots}-{image_id}.png", rgb)
            record = {**c.params(), **m, "run_id": run_id}
            atomic_write_bytes(cells_dir / f"{cell_key(c)}.json", (json.dumps(record, indent=2) + "\n").encode())
            bar.update(detail=f"{c.name()}: mIoU {m['miou']:.3f}")

        rows = [json.loads((cells_dir / f"{cell_key(c)}.json").read_text()) for c in cells]
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
        if isinstance(executor, _RayCells):
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
