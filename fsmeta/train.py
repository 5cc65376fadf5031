"""Pre-training: Reptile meta-training (§4.3) and the transfer-learning baseline (§4.4).

Both write a checkpoint with non-affine batch norm; fine-tuning later makes it
affine. Meta-training checkpoints θ and the iteration every
``meta.checkpoint_every`` iterations; since every task is a pure function of
(seed, iteration, source), that is all a resumed run needs to reach the same θ.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from fsmeta.augment import augmentation
from fsmeta.checkpoint import Kind, describe_pretraining, load_checkpoint, resume_point, save_checkpoint
from fsmeta.compute import default_device, host_buffer
from fsmeta.config import Config, changed_keys, flatten, read_datasets
from fsmeta.data.crops import gather
from fsmeta.data.sampling import TaskSpec, batch_stream, make_task
from fsmeta.errors import FsmetaError
from fsmeta.finetune import supervised_loss
from fsmeta.meta.reptile import AdaptResult, InnerSettings, meta_update
from fsmeta.meta.sequential import SequentialBackend
from fsmeta.meta.sources import SourceData, load_sources
from fsmeta.models import StateDict, build_model, clone_state
from fsmeta.progress import Progress
from fsmeta.step import TrainingStep
from fsmeta.tracking import Tracker

log = logging.getLogger(__name__)

# Settings that change the meaning of a meta-training checkpoint: resuming with
# any of them changed would silently mix two runs.
_RESUME_KEYS = ("seed", "arch", "data", "meta.variant", "meta.alpha", "meta.beta", "meta.entropy", "meta.shots",
                "meta.inner_steps", "meta.inner_lr", "meta.weight_decay", "meta.epsilon", "meta.inner_threads")


class Backend(Protocol):
    name: str

    def run(self, theta: StateDict, tasks: list[TaskSpec]) -> list[AdaptResult]: ...

    def close(self) -> None: ...


def apply_threads(cfg: Config) -> None:
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)


def initial_theta(arch: str, seed: int) -> StateDict:
    """Seeded random initialisation, non-affine batch norm."""
    torch.manual_seed(seed)
    return clone_state(build_model(arch))


def make_backend(cfg: Config, sources: list[SourceData]) -> Backend:
    if cfg.meta.backend == "sequential":
        return SequentialBackend(cfg.arch, sources, InnerSettings.from_config(cfg), cfg.compute, cfg.meta.inner_threads)
    if cfg.meta.backend == "ray":
        try:
            # Imported here, not at the top: ray is needed only for this backend, and the rest of
            # fsmeta (the sequential backend, fine-tuning, predict, bench/) runs where ray is absent.
            from fsmeta.meta.driver import RayBackend
        except ImportError as exc:
            raise FsmetaError(f"meta.backend=ray is not available in this build ({exc}); use sequential") from None
        return RayBackend(cfg, sources)
    raise FsmetaError(f"unknown meta.backend {cfg.meta.backend!r}")


def meta_iteration(cfg: Config, backend: Backend, theta: StateDict, iteration: int,
                   pool_sizes: list[int]) -> tuple[StateDict, list[AdaptResult]]:
    """One Reptile meta-iteration: a task per source (a pure function of seed, iteration and
    source), adapted on ``backend``, then θ moved towards the adapted weights."""
    tasks = [make_task(cfg.seed, iteration, m, pool_sizes, cfg.meta.shots) for m in range(len(pool_sizes))]
    results = backend.run(theta, tasks)
    return meta_update(theta, [r.theta for r in results], cfg.meta.epsilon), results


def meta_train(
    cfg: Config,
    out_dir: str | Path,
    tracker: Tracker,
    *,
    resume: bool = False,
    parent_run_id: str | None = None,
    progress: bool = True,
) -> Path:
    """Reptile meta-training on the sources of ``cfg``; returns the final checkpoint ``OUT/meta.safetensors``.

    With ``resume``, continues from ``OUT/checkpoints/meta-last.safetensors`` and
    the MLflow run recorded in it, to the same final θ as an uninterrupted run.
    """
    apply_threads(cfg)
    out = Path(out_dir)
    last = out / "checkpoints" / "meta-last.safetensors"
    final = out / "meta.safetensors"
    sources = load_sources(cfg)
    names = [s.name for s in sources]
    pool_sizes = [len(s.crops) for s in sources]
    flat = cfg.flat()
    start, run_id = 0, ""
    if resume and last.is_file():
        theta, meta = load_checkpoint(last)
        changed = changed_keys(flatten(meta.get("config", {})), flat, ignore=("data.root",), only=_RESUME_KEYS,
                               datasets=read_datasets(cfg))
        if changed:
            raise FsmetaError(f"cannot resume {last}: configuration differs in {', '.join(changed[:5])}")
        start, run_id = resume_point(meta, cfg.meta.iterations, last), meta.get("mlflow_run_id", "")
        tracker.resume_run(run_id, system_metrics=True)
        log.info("resuming meta-training at iteration %d of %d from %s", start, cfg.meta.iterations, last)
    else:
        if resume:
            log.info("no checkpoint at %s; starting meta-training from scratch", last)
        theta = initial_theta(cfg.arch, cfg.seed)
        params = {**flat, "sources": ",".join(names), "crops": ",".join(map(str, pool_sizes))}
        run_id = tracker.start_run("meta-train", params=params, parent_run_id=parent_run_id,
                                   tags={"fsmeta.kind": "meta", "fsmeta.target": cfg.data.target}, system_metrics=True)
    status = "FAILED"
    backend = make_backend(cfg, sources)
    bar = Progress(cfg.meta.iterations, f"meta-train {cfg.meta.variant} → {cfg.data.target}", start=start, enabled=progress)
    try:
        for it in range(start, cfg.meta.iterations):
            t0 = time.perf_counter()
            theta, results = meta_iteration(cfg, backend, theta, it, pool_sizes)
            seconds = time.perf_counter() - t0
            metrics = {k: float(np.mean([r.losses[k] for r in results])) for k in ("loss", "bce", "er", "d")}
            metrics.update({f"loss.{names[r_i]}": r.losses["loss"] for r_i, r in enumerate(results)})
            metrics["sec_per_iter"] = seconds
            tracker.log_metrics(run_id, metrics, step=it + 1)
            done = it + 1
            if done % cfg.meta.checkpoint_every == 0 or done == cfg.meta.iterations:
                save_checkpoint(last, theta, describe_pretraining(Kind.META, cfg, names, iteration=done, mlflow_run_id=run_id))
            per_source = " ".join(f"{n}={r.losses['loss']:.3f}" for n, r in zip(names, results))
            bar.update(detail=f"loss {metrics['loss']:.4f} (bce {metrics['bce']:.4f} er {metrics['er']:.4f} d {metrics['d']:.4f}) [{per_source}]")
        save_checkpoint(final, theta, describe_pretraining(Kind.META, cfg, names, iteration=cfg.meta.iterations, mlflow_run_id=run_id))
        tracker.log_artifact(run_id, final, "checkpoints")
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        backend.close()
        tracker.end_run(run_id, status)
    return final


def transfer_train(
    cfg: Config,
    out_dir: str | Path,
    tracker: Tracker,
    *,
    parent_run_id: str | None = None,
    progress: bool = True,
) -> Path:
    """Train one model on the union of the source crops (§4.4); returns ``OUT/transfer.safetensors``.

    Epochs are seeded permutations of the union; ``transfer.steps`` Adam steps of
    ``transfer.batch_size`` crops, on CUDA when this process sees a GPU (``cfg.compute``
    says how), else on the CPU.
    """
    apply_threads(cfg)
    sources = load_sources(cfg)
    names = [s.name for s in sources]
    sizes = np.array([len(s.crops) for s in sources])
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    total = int(offsets[-1])
    model = build_model(cfg.arch)
    model.load_state_dict(initial_theta(cfg.arch, cfg.seed))
    model.train()
    device = default_device()
    model.to(device)
    tc = cfg.transfer
    transform = augmentation(cfg.augment, (cfg.seed, 4242)) if cfg.augment.transfer else None
    step = TrainingStep(model, lr=tc.lr, weight_decay=tc.weight_decay, compute=cfg.compute, transform=transform)
    size = cfg.data.crop_size
    run_id = tracker.start_run("transfer-train", params={**cfg.flat(), "sources": ",".join(names), "crops": total},
                               parent_run_id=parent_run_id, tags={"fsmeta.kind": "transfer", "fsmeta.target": cfg.data.target})
    bar = Progress(tc.steps, f"transfer-train → {cfg.data.target}", enabled=progress)
    out = Path(out_dir) / "transfer.safetensors"
    status = "FAILED"
    try:
        batches = batch_stream(total, tc.batch_size, (cfg.seed, 4242))
        value: float | None = None  # the last loss read back
        for i in range(tc.steps):
            batch = next(batches)
            # The batch is assembled source by source, straight from each memory-mapped store
            # into one (pinned, on CUDA) buffer: no per-source arrays, no concatenation.
            x_t, y_t = host_buffer((len(batch), 1, size, size), device), host_buffer((len(batch), 1, size, size), device)
            x_np, y_np = x_t.numpy(), y_t.numpy()
            which = np.searchsorted(offsets, batch, side="right") - 1
            filled = 0
            for s in np.unique(which):
                rows = batch[which == s] - offsets[s]
                part = slice(filled, filled + len(rows))
                gather(sources[s].images, sources[s].crops, rows, out=(x_np[part], y_np[part]))
                filled += len(rows)
            step(supervised_loss, x_t, y_t)
            if (i + 1) % 10 == 0 or i + 1 == tc.steps:  # losses read every 10 steps: one GPU sync, not ten
                losses = step.read_losses(lambda k, terms: f"transfer training loss is {terms[0]} at step {k}; lower transfer.lr")
                value = losses[-1][0]
                tracker.log_metrics(run_id, {"loss": value}, step=i + 1)
            bar.update(detail=f"loss {value:.4f}" if value is not None else "")
        save_checkpoint(out, clone_state(model), describe_pretraining(Kind.TRANSFER, cfg, names, steps=tc.steps, mlflow_run_id=run_id))
        tracker.log_artifact(run_id, out, "checkpoints")
        status = "FINISHED"
    finally:
        tracker.end_run(run_id, status)
    return out


def scratch_checkpoint(cfg: Config, out_dir: str | Path) -> Path:
    """The lower bound's starting point: the seeded random initialisation, saved like a pre-training."""
    out = Path(out_dir) / "scratch.safetensors"
    return save_checkpoint(out, initial_theta(cfg.arch, cfg.seed), describe_pretraining(Kind.SCRATCH, cfg, []))
