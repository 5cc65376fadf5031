"""Results of a study: the table (one row per cell), its summary, plots and overlays.

Everything here works from the results alone, so ``fsmeta report DIR`` can
re-render a finished or interrupted study without re-running anything.
Files are written to a temporary name and renamed into place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from fsmeta.atomic import atomic_write

RESULT_COLUMNS = ["target", "arch", "pretraining", "selection", "shots", "seed", "miou", "pooled_iou", "f1", "n_test", "run_id"]


def results_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.table({c: [r[c] for r in rows] for c in RESULT_COLUMNS})


def write_results(rows: list[dict[str, Any]], out_dir: str | Path) -> tuple[Path, Path]:
    """``results.csv`` and ``results.parquet`` (one row per cell), written atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = results_table(rows)
    csv_path, pq_path = out / "results.csv", out / "results.parquet"
    atomic_write(csv_path, lambda p: pacsv.write_csv(table, p))
    atomic_write(pq_path, lambda p: pq.write_table(table, p))
    return csv_path, pq_path


def summarize(rows: list[dict[str, Any]], metric: str = "miou") -> list[dict[str, Any]]:
    """Mean ± std (population std over seeds, as the paper's error bands) per (target, arch, pre-training, selection, K)."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        key = (r["target"], r["arch"], r["pretraining"], r.get("selection", "random"), r["shots"])
        groups.setdefault(key, []).append(float(r[metric]))
    return [
        {"target": t, "arch": a, "pretraining": p, "selection": sel, "shots": k,
         "mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v)}
        for (t, a, p, sel, k), v in groups.items()
    ]


def summary_metrics(summary: list[dict[str, Any]]) -> dict[str, float]:
    """The summary as MLflow metrics of the study's parent run:
    ``miou_mean/<target>/<arch>/<pre-training>/<selection>/K<k>`` and ``miou_std/…`` (fractions, not %).
    MLflow's UI groups charts by the key up to its last ``/``: one section per combination, a chart per K."""
    import re

    def clean(value: Any) -> str:  # MLflow keys allow letters, digits, _ - . space : /
        return re.sub(r"[^A-Za-z0-9_.\- :]", "_", str(value))

    metrics: dict[str, float] = {}
    for s in summary:
        path = "/".join(clean(s[k]) for k in ("target", "arch", "pretraining", "selection")) + f"/K{s['shots']}"
        metrics[f"miou_mean/{path}"] = float(s["mean"])
        metrics[f"miou_std/{path}"] = float(s["std"])
    return metrics


def format_table(summary: list[dict[str, Any]]) -> str:
    """mIoU (%) mean ± std, one column per K, one line per combination of the
    fields that vary (just the pre-training in a single-target study)."""
    keys = [k for k in ("target", "arch", "pretraining", "selection") if k in summary[0]]
    varying = [k for k in keys if len({s[k] for s in summary}) > 1] or ["pretraining"]
    shots = sorted({s["shots"] for s in summary})
    labels = list(dict.fromkeys("/".join(str(s[k]) for k in varying) for s in summary))
    cell = {("/".join(str(s[k]) for k in varying), s["shots"]): s for s in summary}
    width = max(14, *(len(l) + 2 for l in labels))
    head = f"{'/'.join(v.replace('pretraining', 'pre-training') for v in varying):<{width}}" + "".join(f"{'K=' + str(k):>16}" for k in shots)
    lines = [head, "-" * len(head)]
    for label in labels:
        parts = []
        for k in shots:
            s = cell.get((label, k))
            parts.append(f"{100 * s['mean']:>8.1f} ± {100 * s['std']:<5.1f}" if s else f"{'-':>16}")
        lines.append(f"{label:<{width}}" + "".join(parts))
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
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
    return path


SUMMARY_COLUMNS = ["target", "arch", "pretraining", "selection", "shots", "mean", "std", "n"]


def write_summary(rows: list[dict[str, Any]], out_dir: str | Path) -> Path:
    """``summary.csv``: mIoU mean ± std over seeds per (target, arch, pre-training, selection, K)."""
    summary = summarize(rows)
    table = pa.table({c: [s[c] for s in summary] for c in SUMMARY_COLUMNS})
    path = Path(out_dir) / "summary.csv"
    atomic_write(path, lambda p: pacsv.write_csv(table, p))
    return path


def read_results(out_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(out_dir) / "results.parquet"
    if not path.is_file():
        from fsmeta.errors import FsmetaError

        raise FsmetaError(f"{path} does not exist: no results to report in {out_dir}")
    return pq.read_table(path).to_pylist()


def _curves(ax, curves: dict[str, list[tuple[int, float, float]]]) -> None:
    for label, pts in curves.items():
        k, mean, std = (np.array(v) for v in zip(*sorted(pts)))
        ax.plot(k, 100 * mean, marker="o", label=label)
        ax.fill_between(k, 100 * (mean - std), 100 * (mean + std), alpha=0.15)
    ax.set_xlabel("K (annotated target images)")
    ax.set_ylabel("mIoU (%)")
    ax.grid(alpha=0.3)


def _label(r: dict[str, Any], selections: int) -> str:
    return r["pretraining"] + (f" / {r['selection']}" if selections > 1 else "")


def plot_study(rows: list[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """The 2020 paper's figures from a results table.

    ``fig3_<arch>.png``: mIoU against K averaged over targets, one line per
    pre-training (band: std over seeds of the target-averaged mIoU).
    ``fig4_<arch>.png``: one panel per target, mean ± std over seeds.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    paths = []
    selections = len({r["selection"] for r in rows})
    for arch in dict.fromkeys(r["arch"] for r in rows):
        sub = [r for r in rows if r["arch"] == arch]
        targets = list(dict.fromkeys(r["target"] for r in sub))
        # Fig. 3: average over targets per seed first, then mean/std over seeds.
        per_seed: dict[tuple[str, int, int], list[float]] = {}
        for r in sub:
            per_seed.setdefault((_label(r, selections), r["shots"], r["seed"]), []).append(r["miou"])
        curves: dict[str, list[tuple[int, float, float]]] = {}
        by_k: dict[tuple[str, int], list[float]] = {}
        for (label, k, _), values in per_seed.items():
            if len(values) == len(targets):  # only seeds that every target has finished
                by_k.setdefault((label, k), []).append(float(np.mean(values)))
        for (label, k), values in by_k.items():
            curves.setdefault(label, []).append((k, float(np.mean(values)), float(np.std(values))))
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        _curves(ax, curves)
        ax.set_title(f"{arch}: mIoU averaged over {len(targets)} target(s)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"fig3_{arch}.png"
        atomic_write(path, lambda p: fig.savefig(p, format="png"))
        plt.close(fig)
        paths.append(path)
        # Fig. 4: one panel per target.
        cols = min(3, len(targets))
        nrows = -(-len(targets) // cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.4 * nrows), dpi=110, squeeze=False)
        for ax, target in zip(axes.flat, targets):
            curves = {}
            for s in summarize([r for r in sub if r["target"] == target]):
                curves.setdefault(_label(s, selections), []).append((s["shots"], s["mean"], s["std"]))
            _curves(ax, curves)
            ax.set_title(f"{target} ({arch})")
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(targets):]:
            ax.axis("off")
        fig.tight_layout()
        path = out / f"fig4_{arch}.png"
        atomic_write(path, lambda p: fig.savefig(p, format="png"))
        plt.close(fig)
        paths.append(path)
    return paths


def error_overlay(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """RGB uint8 comparison of a binary prediction with the ground truth:
    true positives white, false positives red, false negatives green, true negatives black."""
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    p, g = pred.astype(bool), gt.astype(bool)
    rgb = np.zeros((*p.shape, 3), dtype=np.uint8)
    rgb[p & g] = (255, 255, 255)
    rgb[p & ~g] = (255, 0, 0)
    rgb[~p & g] = (0, 255, 0)
    return rgb


def write_png(path: Path, rgb: np.ndarray) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: Image.fromarray(rgb).save(p, format="PNG"))
    return path


def render_report(out_dir: str | Path, rows: list[dict[str, Any]] | None = None) -> list[Path]:
    """Summary and figures of a study folder, from ``results.parquet`` (or the given rows)."""
    rows = rows if rows is not None else read_results(out_dir)
    paths = [write_summary(rows, out_dir)]
    paths += plot_study(rows, out_dir)
    pairs = {(r["target"], r["arch"]) for r in rows}
    if len(pairs) == 1:
        ((target, arch),) = pairs
        paths.append(plot_miou_vs_shots(rows, Path(out_dir) / "miou_vs_shots.png", title=f"{arch}, target {target}"))
    return paths
