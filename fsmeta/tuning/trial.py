"""One Ray Tune trial: meta-train with the trial's values and report validation mIoU.

Every ``tune.eval_every`` meta-iterations the trial fine-tunes copies of θ on K-shot
support sets and reports ``val_miou``, the mean mIoU over ``tune.shots`` ×
``tune.seeds`` on the **validation split**, so ASHA can stop weak trials early.

The splits (:func:`tune_split`): the target's fixed test split is the 2023
protocol's (``eval.test_fraction``, ``eval.split_seed``) and is never read; the
rest (the pool) is cut into validation images (``tune.val_fraction``) and the
images support sets are drawn from.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fsmeta.checkpoint import Kind, describe_pretraining, load_checkpoint, save_checkpoint
from fsmeta.compute import default_device
from fsmeta.compute import describe as describe_compute
from fsmeta.config import Config, config_from_dict
from fsmeta.data.registry import load_dataset, resolve_sources
from fsmeta.data.sampling import protocol_split
from fsmeta.data.store import ImageSet
from fsmeta.errors import FsmetaError
from fsmeta.evaluate import evaluate
from fsmeta.finetune import finetune
from fsmeta.meta.sources import load_sources
from fsmeta.models import build_model
from fsmeta.study import Cell, decision_rule, random_support, support_masks, unannotated_images
from fsmeta.train import apply_threads, initial_theta, make_backend, meta_iteration
from fsmeta.tuning.space import with_values

METRIC = "val_miou"


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
    per_k: dict[int, list[float]] = {}
    for k in cfg.tune.shots:
        for seed in cfg.tune.seeds:
            cell = Cell(cfg.data.target, cfg.arch, f"meta-{cfg.meta.variant}", "random", k, seed)
            support = random_support(cfg, target, split.train, cell)
            model = build_model(cfg.arch)
            model.load_state_dict(theta)
            model.to(default_device())
            finetune(model, support.x, support.y, cfg.finetune, seed=seed, where=f"tune {cell.name()}", compute=cfg.compute,
                     augment=cfg.augment, holdout=support.holdout, shots=k)
            # the benchmark's threshold (eval.threshold_rule or the held-out bands') and smallest object, so a
            # trial scores what a cell would
            # the trial's support pool outside the support, never a validation image
            unannotated = unannotated_images(cfg, target, split.train, split.test, support.images, seed, f"tune {cell.name()}")
            threshold, min_size = decision_rule(cfg, model, support.y, support.holdout, support_masks(target, support.windows),
                                                unannotated)
            summary, _ = evaluate(model, target, split.val, threshold, compute=cfg.compute, min_size=min_size,
                                  tta=cfg.eval.tta)
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
    from ray import tune  # only inside a trial: the rest of this module runs without ray

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
    how = describe_compute(default_device(), cfg.compute)  # the trial's MLflow run is tagged with it

    def report(metrics: dict[str, float], state: dict, iteration: int) -> None:
        with tempfile.TemporaryDirectory() as folder:
            save_checkpoint(Path(folder) / "theta.safetensors", state, describe_pretraining(Kind.META, cfg, names, iteration=iteration))
            tune.report({**metrics, "compute": how}, checkpoint=tune.Checkpoint.from_directory(folder))

    run_trial(cfg, report, theta, start, fixed=bool(weights))
