"""Studies: fine-tune and evaluate every (pre-training, K, seed) cell of a target, and
write the results table, its summary and the mIoU-vs-K plot. ``fsmeta demo`` is
the smallest such study; the benchmark grid builds on the same cells.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from fsmeta.checkpoint import model_from_checkpoint
from fsmeta.config import Config, load_config
from fsmeta.data.crops import build_crop_index
from fsmeta.data.registry import load_dataset, resolve_sources
from fsmeta.data.sampling import draw_support, protocol_split, held_out_images
from fsmeta.data.store import ImageSet
from fsmeta.errors import DataError, FsmetaError
from fsmeta.evaluate import evaluate
from fsmeta.finetune import finetune, support_crops
from fsmeta.progress import Progress
from fsmeta.tracking import Tracker
from fsmeta.train import apply_threads, meta_train, scratch_checkpoint, transfer_train

log = logging.getLogger(__name__)

RESULT_COLUMNS = ["target", "arch", "pretraining", "selection", "shots", "seed", "miou", "pooled_iou", "f1", "n_test", "run_id"]

# The demo's reduced scale, also written out as configs/demo.yaml (a test keeps the two equal).
# min_foreground scales the paper's 360 pixels of a 256×256 crop to a 64×64 crop: 360 / 16 ≈ 22.
DEMO_OVERRIDES = [
    "threads=2",
    "data.target=synth-he",
    "data.crop_size=64",
    "data.min_foreground=22",
    "data.source_stride={default: 32}",
    "data.finetune_stride={default: 32}",
    "data.synth.images=40",
    "data.synth.size=128",
    "meta.variant=all",
    "meta.iterations=40",
    "meta.inner_steps=5",
    "meta.checkpoint_every=10",
    "transfer.steps=60",
    "eval.shots=[1, 3, 5]",
    "eval.seeds=[0, 1, 2]",
]


def demo_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The demo's configuration: its reduced-scale defaults, then a file, then overrides."""
    if path is None:
        return load_config(None, [*DEMO_OVERRIDES, *overrides])
    return load_config(path, overrides)


@dataclass(frozen=True)
class Cell:
    target: str
    arch: str
    pretraining: str
    selection: str
    shots: int
    seed: int

    def name(self) -> str:
        return f"{self.target}/{self.arch}/{self.pretraining}/{self.selection}/K{self.shots}/s{self.seed}"

    def params(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("target", "arch", "pretraining", "selection", "shots", "seed")}


def run_cell(cfg: Config, target: ImageSet, checkpoint: Path, cell: Cell) -> dict[str, Any]:
    """Fine-tune the checkpoint on the cell's K-shot support set and evaluate on its test images."""
    pool, fixed_test = protocol_split(len(target), cfg.eval.protocol, cfg.eval.test_fraction, cfg.eval.split_seed)
    support = draw_support(pool, cell.shots, cell.seed, target=cell.target)
    try:
        index = build_crop_index(target, cfg.data.crop_size, cfg.data.stride(cell.target, "finetune"),
                                 cfg.data.min_foreground, subset=support)
    except DataError as exc:
        ids = ", ".join(target.ids[i] for i in support)
        raise DataError(f"{cell.name()}: support images [{ids}] give no crops: {exc}") from None
    x, y = support_crops(target, index)
    model, _ = model_from_checkpoint(checkpoint)
    finetune(model, x, y, cfg.finetune, seed=cell.seed, where=cell.name())
    test = held_out_images(len(target), pool, fixed_test, support)
    summary, _ = evaluate(model, target, test, cfg.eval.threshold)
    return {
        "miou": summary["miou"], "pooled_iou": summary["pooled_iou"], "f1": summary["f1"],
        "precision": summary["precision"], "recall": summary["recall"], "n_test": int(summary["n_images"]),
        "support_crops": int(len(x)),
    }


def run_grid(
    cfg: Config,
    checkpoints: dict[str, Path],
    tracker: Tracker,
    parent_run_id: str | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Every (pre-training, K, seed) cell of the configured target; one MLflow child run per cell."""
    target = load_dataset(cfg.data.target, cfg)
    pool, _ = protocol_split(len(target), cfg.eval.protocol, cfg.eval.test_fraction, cfg.eval.split_seed)
    too_many = [k for k in cfg.eval.shots if k > len(pool)]
    if too_many:
        raise FsmetaError(f"K={max(too_many)} is larger than the pool of {len(pool)} image(s) of target {cfg.data.target}")
    cells = [Cell(cfg.data.target, cfg.arch, name, "random", k, s)
             for name in checkpoints for k in cfg.eval.shots for s in cfg.eval.seeds]
    bar = Progress(len(cells), f"fine-tune + evaluate {cfg.data.target}", every=0.0, enabled=progress)
    rows = []
    for cell in cells:
        with tracker.run(cell.name(), params=cell.params(), parent_run_id=parent_run_id,
                         tags={"fsmeta.kind": "cell"}) as run_id:
            metrics = run_cell(cfg, target, checkpoints[cell.pretraining], cell)
            tracker.log_metrics(run_id, {"iou": metrics["miou"], **{k: v for k, v in metrics.items()}})
        rows.append({**cell.params(), **{k: metrics[k] for k in ("miou", "pooled_iou", "f1", "n_test")}, "run_id": run_id})
        bar.update(detail=f"{cell.pretraining} K={cell.shots} seed={cell.seed}: mIoU {metrics['miou']:.3f}")
    return rows


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def results_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.table({c: [r[c] for r in rows] for c in RESULT_COLUMNS})


def write_results(rows: list[dict[str, Any]], out_dir: str | Path) -> tuple[Path, Path]:
    """``results.csv`` and ``results.parquet`` (one row per cell), written atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = results_table(rows)
    csv_path, pq_path = out / "results.csv", out / "results.parquet"
    _atomic(csv_path, lambda p: pacsv.write_csv(table, p))
    _atomic(pq_path, lambda p: pq.write_table(table, p))
    return csv_path, pq_path


def summarize(rows: list[dict[str, Any]], metric: str = "miou") -> list[dict[str, Any]]:
    """Mean ± std (population std over seeds, as the paper's error bands) per (target, arch, pre-training, K)."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        groups.setdefault((r["target"], r["arch"], r["pretraining"], r["shots"]), []).append(float(r[metric]))
    return [
        {"target": t, "arch": a, "pretraining": p, "shots": k, "mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v)}
        for (t, a, p, k), v in groups.items()
    ]


def format_table(summary: list[dict[str, Any]]) -> str:
    """mIoU (%) mean ± std: one line per pre-training, one column per K."""
    shots = sorted({s["shots"] for s in summary})
    methods = list(dict.fromkeys(s["pretraining"] for s in summary))
    cell = {(s["pretraining"], s["shots"]): s for s in summary}
    head = f"{'pre-training':<14}" + "".join(f"{'K=' + str(k):>16}" for k in shots)
    lines = [head, "-" * len(head)]
    for m in methods:
        parts = []
        for k in shots:
            s = cell.get((m, k))
            parts.append(f"{100 * s['mean']:>8.1f} ± {100 * s['std']:<5.1f}" if s else f"{'-':>16}")
        lines.append(f"{m:<14}" + "".join(parts))
    return "\n".join(lines)


def plot_miou_vs_shots(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """mIoU against K, mean with a ±std band per pre-training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(rows)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for method in dict.fromkeys(s["pretraining"] for s in summary):
        pts = sorted((s["shots"], s["mean"], s["std"]) for s in summary if s["pretraining"] == method)
        k, mean, std = (np.array(v) for v in zip(*pts))
        ax.plot(k, 100 * mean, marker="o", label=method)
        ax.fill_between(k, 100 * (mean - std), 100 * (mean + std), alpha=0.2)
    ax.set_xlabel("K (annotated target images)")
    ax.set_ylabel("mIoU (%)")
    ax.set_xticks(sorted({s["shots"] for s in summary}))
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    _atomic(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
    return path


def run_demo(cfg: Config, out_dir: str | Path, tracker: Tracker, progress: bool = True) -> list[dict[str, Any]]:
    """Leave one synthetic domain out; meta-train, transfer-train, fine-tune and evaluate everything."""
    apply_threads(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sources = resolve_sources(cfg)
    log.info("demo: target %s, sources %s", cfg.data.target, ", ".join(sources))
    with tracker.run("demo", params={**cfg.flat(), "sources": ",".join(sources)}, tags={"fsmeta.kind": "study"}) as parent:
        checkpoints = {
            f"meta-{cfg.meta.variant}": meta_train(cfg, out / "pretrained", tracker, parent_run_id=parent, progress=progress),
            "transfer": transfer_train(cfg, out / "pretrained", tracker, parent_run_id=parent, progress=progress),
            "scratch": scratch_checkpoint(cfg, out / "pretrained"),
        }
        rows = run_grid(cfg, checkpoints, tracker, parent_run_id=parent, progress=progress)
        csv_path, pq_path = write_results(rows, out)
        plot = plot_miou_vs_shots(rows, out / "miou_vs_shots.png", title=f"{cfg.arch}, target {cfg.data.target}")
        for path in (csv_path, pq_path, plot):
            tracker.log_artifact(parent, path)
    return rows
