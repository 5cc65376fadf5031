"""The selection table of a benchmark's out folder (docs/results.md, issue 15): every
(pre-training, method) × target × K as mean ± std mIoU over splits (population std, as fsmeta.report),
how many (K, split) cells each method wins against the baseline method's cell of the same split, its worst mean deficit,
what its supports hold (foreground share of the annotated pixels, share of windows with no
foreground) and the seconds per ranking and per cell.

    python bench/selection_table.py runs/real3-v3 [--baseline random]

Cells recorded before the composition was kept in each record get it from the ranking file
beside the pre-trained checkpoint (the same ranking the cell used). Reads masks only to report,
after the fact; it runs nothing heavy (no model is evaluated).
"""

from __future__ import annotations

import argparse
import json
import statistics as st
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fsmeta.config import config_from_dict  # noqa: E402
from fsmeta.data.registry import load_dataset  # noqa: E402
from fsmeta.select import patch_budget  # noqa: E402
from fsmeta.study import Cell, _ranking_file, annotation_composition  # noqa: E402


def unflatten(flat: dict) -> dict:
    """``{"meta.alpha": 0.1}`` → ``{"meta": {"alpha": 0.1}}`` (the inverse of config.flatten)."""
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def composition_from_ranking(cfg, out: Path, rec: dict, images_of) -> tuple[dict | None, float | None]:
    """(support_foreground/support_empty, ranking seconds) of an older record, from its ranking file."""
    cell = Cell(rec["target"], rec["arch"], rec["pretraining"], rec["selection"], int(rec["shots"]), int(rec["seed"]))
    folder = out / "pretrained" / cell.target / cell.arch / cell.pretraining
    checkpoint = folder / "pretext.safetensors"
    if not checkpoint.is_file():
        return None, None
    path = _ranking_file(cfg, checkpoint, cell)
    if not path.is_file():
        from fsmeta.config import SELECT_METHODS

        path = next((p for p in (_ranking_file(cfg, checkpoint, cell, legacy_method=m) for m in SELECT_METHODS) if p.is_file()), path)
    if not path.is_file():
        return None, None
    saved = json.loads(path.read_text())
    budget = cell.shots if cfg.select.unit == "image" else patch_budget(cell.target, cell.shots, cfg)
    windows = [tuple(int(v) for v in row[:5]) for row in saved["ranking"][:budget]]
    return annotation_composition(images_of(cell.target), windows), saved.get("seconds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="a benchmark's --out folder")
    parser.add_argument("--baseline", default="random")
    args = parser.parse_args()
    out: Path = args.out
    cfg = config_from_dict(unflatten(json.loads((out / "benchmark.json").read_text())["config"]))
    spans = {}
    if (out / "schedule.jsonl").is_file():
        for line in (out / "schedule.jsonl").read_text().splitlines():
            unit = json.loads(line)
            spans[unit["unit"]] = unit["end"] - unit["start"]
    cache: dict = {}

    def images_of(name: str):
        if name not in cache:
            cache[name] = load_dataset(name, cfg)
        return cache[name]

    rows = {}
    for path in sorted((out / "cells").glob("*.json")):
        rec = json.loads(path.read_text())
        if "support_foreground" not in rec:
            comp, seconds = composition_from_ranking(cfg, out, rec, images_of)
            rec.update(comp or {})
            rec["ranking_seconds"] = seconds
        rec["cell_seconds"] = spans.get(path.stem)
        rows[(rec["target"], rec["arch"], rec["pretraining"], rec["selection"], int(rec["shots"]), int(rec["seed"]))] = rec

    shots = sorted({k[4] for k in rows})
    groups = sorted({k[:4] for k in rows}, key=lambda g: (g[0], g[1], g[2], g[3] != args.baseline, g[3]))
    head = " | ".join(f"K={k}" for k in shots)
    print(f"| target | pre-training | method | {head} | beats {args.baseline} | worst mean Δ | foreground | empty | s/ranking | s/cell |")
    print("|---|---|---|" + "---|" * len(shots) + "---|---|---|---|---|---|")
    for target, arch, pre, method in groups:
        cells, wins, n, worst = [], 0, 0, None
        fg, empty, rank_s, cell_s = [], [], [], []
        for k in shots:
            ious = []
            for (t, a, p, m, kk, s), rec in rows.items():
                if (t, a, p, m, kk) != (target, arch, pre, method, k):
                    continue
                ious.append(100 * rec["miou"])
                fg += [rec["support_foreground"]] if rec.get("support_foreground") is not None else []
                empty += [rec["support_empty"]] if rec.get("support_empty") is not None else []
                rank_s += [rec["ranking_seconds"]] if rec.get("ranking_seconds") is not None else []
                cell_s += [rec["cell_seconds"]] if rec.get("cell_seconds") else []
                base = rows.get((t, a, p, args.baseline, kk, s))
                if method != args.baseline and base is not None:
                    n += 1
                    wins += rec["miou"] > base["miou"]
            base_ious = [100 * r["miou"] for (t, a, p, m, kk, s), r in rows.items() if (t, a, p, m, kk) == (target, arch, pre, args.baseline, k)]
            if method != args.baseline and ious and base_ious:
                delta = st.mean(ious) - st.mean(base_ious)
                worst = delta if worst is None else min(worst, delta)
            cells.append("–" if not ious else f"{st.mean(ious):.1f} ± {st.pstdev(ious):.1f}" if len(ious) > 1 else f"{ious[0]:.1f}")
        beats = f"{wins}/{n}" if n else "–"
        worst_s = "–" if worst is None else f"{worst:+.1f}"
        mean = lambda v, f: f.format(st.mean(v)) if v else "–"  # noqa: E731
        print(f"| {target} | {pre} | {method} | {' | '.join(cells)} | {beats} | {worst_s} | {mean(fg, '{:.1%}')} | "
              f"{mean(empty, '{:.0%}')} | {mean(rank_s, '{:.1f}')} | {mean(cell_s, '{:.0f}')} |")


if __name__ == "__main__":
    main()
