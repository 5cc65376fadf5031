"""Accuracy ablations of fine-tuning on one pre-trained checkpoint: benchmark cells under named
configuration variants, side by side (issue 19's levers: shot unit, crop size and stride, step
budget, augmentation, threshold).

Every variant runs the same cells — ``--target`` × ``--shots`` × ``--seeds`` (seed s is the
2023 protocol's split s, as in ``fsmeta benchmark``) — with :func:`fsmeta.study.run_cell`,
in this process, from the same ``--checkpoint`` (a benchmark's ``pretrained/.../meta.safetensors``
or its ``pretext.safetensors``). A variant is ``NAME=KEY=VALUE;KEY=VALUE`` (``--set``
syntax, ``;`` between overrides; ``NAME=`` alone is the base configuration). Prints, per
variant and K: mean mIoU over the seeds, pooled IoU, instance precision/recall/F1, support
crops, seconds per cell, the mean threshold and (with ``finetune.holdout``) the mean step the
held-out bands chose; then one line per split. ``--phases`` adds, per split, where the cell's
seconds went: choosing the support, fine-tuning (with the bands' evaluations), the decision rule
(the bands' TTA threshold and the pool's) and the test evaluation. Run it alone on the machine:
the cell uses the configuration's ``threads`` (``--set threads=1`` times a cell as the benchmark
runs two at once on 2 cores, ``study.cell_cpus=1``). ``--pretext DIR``: each variant first trains
its own θ′ from ``--checkpoint`` on the target's pseudo-labels, as ``fsmeta benchmark`` does
(``select.*`` of the variant: γ, polarity, epochs), kept as ``DIR/NAME.safetensors`` (an existing
file is reused), and its cells start from it — for levers that act through the pretext.

    python bench/ablate.py --config configs/real3.yaml --data-root ../data \\
        --checkpoint runs/real3/pretrained/em/fcrn/meta-all/pretext.safetensors --target em --shots 5 --seeds 0 \\
        --variant "patches=" --variant "images=select.unit=image" \\
        --variant "img128=select.unit=image;data.crop_size=128;data.finetune_stride={em: 64}" \\
        --variant "img128-2000=select.unit=image;data.crop_size=128;data.finetune_stride={em: 64};finetune.steps=2000"
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import fsmeta.study as study  # noqa: E402
from fsmeta.config import load_config  # noqa: E402
from fsmeta.data.registry import load_dataset  # noqa: E402
from fsmeta.study import Cell, run_cell, target_config  # noqa: E402
from fsmeta.train import apply_threads  # noqa: E402


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, rest = text.partition("=")
    if not name:
        raise SystemExit(f"--variant {text!r}: expected NAME=KEY=VALUE;KEY=VALUE (or NAME= for the base)")
    return name, [o.strip() for o in rest.split(";") if o.strip()]


PHASES = {"support": ("_selected_support", "random_support"), "fine-tune": ("finetune",),
          "decision rule": ("decision_rule",), "evaluate": ("evaluate",)}


@contextmanager
def phase_clock(seconds: dict[str, float]):
    """Time the phases of :func:`fsmeta.study.run_cell` into ``seconds`` (name → s) while inside:
    wraps the functions it calls by their module names and puts them back on the way out."""
    saved, inside = {}, set()

    def timed(phase: str, fn):
        def wrapper(*a, **k):
            if phase in inside:  # one phase calling another of its functions counts once
                return fn(*a, **k)
            inside.add(phase)
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                inside.discard(phase)
                seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - t0
        return wrapper

    for phase, names in PHASES.items():
        for n in names:
            saved[n] = getattr(study, n)
            setattr(study, n, timed(phase, saved[n]))
    try:
        yield seconds
    finally:
        for n, fn in saved.items():
            setattr(study, n, fn)


def variant_pretext(cfg, target, checkpoint: Path, out: Path) -> Path:
    """θ′ of ``checkpoint`` on ``target`` under ``cfg``, as ``fsmeta benchmark`` trains it
    (:func:`fsmeta.benchmark.train_pretext`, seed ``cfg.seed``); an existing ``out`` is reused."""
    from fsmeta.benchmark import train_pretext
    from fsmeta.checkpoint import read_checkpoint_meta
    from fsmeta.select.pretext import resolve_polarity

    if out.is_file():
        print(f"θ′ {out} (reused; pseudo-labels of polarity {read_checkpoint_meta(out).get('polarity', '?')})", flush=True)
        return out
    polarity, reason = resolve_polarity(cfg, target)
    t0 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    train_pretext(cfg, target, checkpoint, out, cfg.seed, polarity)
    print(f"θ′ {out}: polarity {polarity} ({reason}), {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="the run configuration, e.g. configs/real3.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="an override for every variant (repeatable)")
    p.add_argument("--data-root", help="prepared data sets (default: the config's)")
    p.add_argument("--checkpoint", required=True, help="the pre-trained (or pretext) checkpoint every cell starts from")
    p.add_argument("--target", required=True)
    p.add_argument("--pretraining", default="meta-all", help="the label of the checkpoint's pre-training (default: meta-all)")
    p.add_argument("--shots", type=int, nargs="+", default=[5])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--selection", default="random", help="the cells' selection method (default: random); rankings are cached "
                   "beside the checkpoint, as the benchmark does")
    p.add_argument("--variant", action="append", default=[], help="NAME=KEY=VALUE;KEY=VALUE (repeatable; default: the base alone)")
    p.add_argument("--phases", action="store_true", help="print, per split, the seconds of each phase of the cell")
    p.add_argument("--pretext", metavar="DIR", help="train each variant's θ′ from --checkpoint into DIR/NAME.safetensors first "
                   "(reused when there) and start its cells from it")
    args = p.parse_args(argv)

    variants = [parse_variant(v) for v in (args.variant or ["base="])]
    base = list(args.overrides) + ([f"data.root={args.data_root}"] if args.data_root else [])
    print(f"checkpoint {args.checkpoint}; target {args.target}; selection {args.selection}; K {args.shots}; seeds {args.seeds}")
    print(f"{'variant':<16}{'K':>3}{'mIoU %':>9}{'± std':>7}{'pooled':>8}{'P':>6}{'R':>6}{'F1':>6}{'crops':>7}{'s/cell':>8}{'thr':>6}{'step':>6}")
    for name, overrides in variants:
        cfg = load_config(args.config, [*base, *overrides])
        cfg = target_config(cfg, args.target, cfg.arch)
        apply_threads(cfg)
        target = load_dataset(args.target, cfg)
        checkpoint = Path(args.checkpoint)
        if args.pretext:
            checkpoint = variant_pretext(cfg, target, checkpoint, Path(args.pretext) / f"{name}.safetensors")
        for k in args.shots:
            rows, seconds, phases = [], [], []
            for s in args.seeds:
                t0 = time.perf_counter()
                cell = Cell(args.target, cfg.arch, args.pretraining, args.selection, k, s)
                with phase_clock({}) as spent:
                    metrics, _, _ = run_cell(cfg, target, checkpoint, cell, cache_rankings=True)
                seconds.append(time.perf_counter() - t0)
                rows.append(metrics)
                phases.append(spent)

            def mean(key: str) -> float:
                return float(np.mean([r[key] for r in rows]))

            std = float(np.std([100 * r["miou"] for r in rows]))
            print(f"{name:<16}{k:>3}{100 * mean('miou'):>9.1f}{std:>7.1f}{100 * mean('pooled_iou'):>8.1f}{mean('precision'):>6.2f}"
                  f"{mean('recall'):>6.2f}{mean('f1'):>6.2f}{mean('support_crops'):>7.0f}{np.mean(seconds):>8.1f}"
                  f"{mean('threshold'):>6.2f}{mean('holdout_step') if 'holdout_step' in rows[0] else float('nan'):>6.0f}", flush=True)
            for s, r, spent, total in zip(args.seeds, rows, phases, seconds):  # per split, for the record
                print(f"  split {s}: mIoU {100 * r['miou']:.1f}, threshold {r['threshold']:.2f}"
                      + (f", held-out step {r['holdout_step']} (band IoU {100 * r['holdout_iou']:.1f})" if "holdout_step" in r else ""), flush=True)
                if args.phases:
                    rest = total - sum(spent.values())
                    print("    seconds: " + ", ".join(f"{p} {spent.get(p, 0.0):.1f} ({100 * spent.get(p, 0.0) / total:.0f} %)" for p in PHASES)
                          + f", the rest (loading the checkpoint) {rest:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
