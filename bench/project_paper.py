"""Projected wall time of the full ``configs/paper.yaml`` study on 1 and on 8 GPUs, from measured rates.

The work is counted from the configuration itself: the cells of
``fsmeta.benchmark.grid``, and per (target, arch) the pre-trainings — every
``meta-*`` one is ``meta.iterations`` Reptile iterations over the target's
sources, ``transfer`` is ``transfer.steps`` steps, ``scratch`` is free. A cell's
size follows its target's geometry (``fsmeta.data.prepare.PUBLIC``: image count
and shape) and the configured fine-tune stride: K support images give
K × (crops per image) crops, at most (the foreground filter may drop a few), fine-tuned
``finetune.epochs`` epochs in batches of ``finetune.batch_size``; every other image
is evaluated at full resolution (2020 protocol).

Rates, per architecture, given or measured here (``--measure``, a short run on
this machine's device with the compute defaults):

- ``--train-crops-per-s``: training throughput at 256×256 and the fine-tune batch
  (``bench/train_step.py``, the fsmeta default mode);
- ``--eval-mpx-per-s``: full-resolution inference, megapixels per second;
- ``--inner-step-seconds``: one Reptile inner step (K labelled crops plus K of two
  other sources: three forward passes, one backward), one actor alone on a GPU;
- ``--packing-gain``: how many times more cells per second a GPU completes with
  1/``study.cell_gpus`` cells sharing it than with one (``bench/cell.py --parallel``);
  1 (no gain) unless given.

Two projections per GPU count. "As run now": ``fsmeta benchmark`` pre-trains one
(target, arch, pre-training) after another — a meta-training's source actors take
one GPU each (sharing when there are fewer GPUs than sources, counted here as taking
turns), transfer training runs on one GPU — and then runs every cell, packed on all
GPUs. "All GPUs busy": the same GPU-seconds spread evenly over every GPU, the
bound for a scheduler that overlaps the pre-trainings. Issue 8's target: ≤ 1 h on 8 GPUs.

    python bench/project_paper.py --measure
    python bench/project_paper.py --train-crops-per-s fcrn=R unet=R --eval-mpx-per-s fcrn=R unet=R \\
        --inner-step-seconds fcrn=S unet=S --packing-gain G    # rates from bench/train_step.py and bench/cell.py
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fsmeta.benchmark import grid  # noqa: E402
from fsmeta.compute import default_device, prepare_model  # noqa: E402
from fsmeta.config import Config, load_config  # noqa: E402
from fsmeta.data.prepare import PUBLIC  # noqa: E402


def per_arch(values: list[str], label: str) -> dict[str, float]:
    """``["fcrn=1.5", "unet=2"]`` or ``["1.5"]`` (every architecture) → {arch: value}."""
    out: dict[str, float] = {}
    for v in values:
        arch, _, number = v.rpartition("=")
        try:
            out[arch or "*"] = float(number)
        except ValueError:
            raise SystemExit(f"{label}: {v!r} is not ARCH=NUMBER or NUMBER") from None
    return out


def rate(table: dict[str, float], arch: str, label: str) -> float:
    if arch in table:
        return table[arch]
    if "*" in table:
        return table["*"]
    raise SystemExit(f"no {label} for {arch}: pass {label} {arch}=VALUE or use --measure")


# ---------------------------------------------------------------- measuring


def given_rates(args: argparse.Namespace, archs: list[str]) -> dict[str, dict[str, float]]:
    """Per-architecture rates from --train-crops-per-s, --eval-mpx-per-s and --inner-step-seconds."""
    labels = {"train": "--train-crops-per-s", "eval": "--eval-mpx-per-s", "inner": "--inner-step-seconds"}
    tables = {"train": per_arch(args.train_crops_per_s, labels["train"]),
              "eval": per_arch(args.eval_mpx_per_s, labels["eval"]),
              "inner": per_arch(args.inner_step_seconds, labels["inner"])}
    return {a: {k: rate(tables[k], a, labels[k]) for k in tables} for a in archs}


def measure_rates(archs: list[str], cfg: Config, device: torch.device, quick: bool) -> dict[str, dict[str, float]]:
    """Training crops/s, inference MPx/s and seconds per inner step of each arch on ``device``."""
    from train_step import modes, throughput

    from fsmeta.evaluate import predict_probability
    from fsmeta.meta.reptile import InnerSettings, TaskBatch, adapt
    from fsmeta.models import build_model, clone_state

    cuda = device.type == "cuda"
    crop = cfg.data.crop_size
    batch = cfg.finetune.batch_size if cuda else 4
    steps = 10 if cuda else 2
    if quick:
        crop, batch, steps = min(crop, 64), min(batch, 4), 1
    out: dict[str, dict[str, float]] = {}
    fsmeta_mode = {"fsmeta": modes(device, False)["fsmeta default" if not cuda else "fsmeta bf16+CL"]}
    for arch in archs:
        crops_per_s = max(throughput(arch, device, crop, batch, steps, 1, fsmeta_mode)["fsmeta"])
        torch.manual_seed(0)
        model = prepare_model(build_model(arch, affine=True), device)
        side = 128 if quick else 512
        image = np.random.default_rng(0).random((side, side), dtype=np.float32)
        predict_probability(model, image)  # warm-up
        times = []
        for _ in range(2 if quick else 5):
            t0 = time.perf_counter()
            predict_probability(model, image)
            times.append(time.perf_counter() - t0)
        mpx_per_s = side * side / 1e6 / min(times)
        k = cfg.meta.shots
        rng = np.random.default_rng(1)
        x = [rng.uniform(-1, 1, (k, 1, crop, crop)).astype(np.float32) for _ in range(3)]
        batch_m = TaskBatch.from_numpy(x[0], (x[1] > 0.8).astype(np.float32), x[1], x[2])
        alpha, beta = cfg.meta.loss_weights()
        workspace = prepare_model(build_model(arch), device)
        theta = clone_state(workspace)
        adapt(workspace, theta, batch_m, InnerSettings(1, cfg.meta.inner_lr, cfg.meta.weight_decay, alpha, beta))  # warm-up
        n = 1 if quick else 5
        t0 = time.perf_counter()
        adapt(workspace, theta, batch_m, InnerSettings(n, cfg.meta.inner_lr, cfg.meta.weight_decay, alpha, beta))
        inner = (time.perf_counter() - t0) / n
        out[arch] = {"train": crops_per_s, "eval": mpx_per_s, "inner": inner}
        print(f"measured {arch}: {crops_per_s:.1f} training crops/s ({crop}², batch {batch}), {mpx_per_s:.2f} MPx/s inference "
              f"({side}²), {inner:.3f} s per inner step (K={k}, {crop}²)", flush=True)
    return out


# ---------------------------------------------------------------- projecting


def crops_per_image(shape: tuple[int, int], crop: int, stride: int) -> int:
    h, w = shape
    if h < crop or w < crop:
        return 0
    return ((h - crop) // stride + 1) * ((w - crop) // stride + 1)


def cell_seconds(cfg: Config, target: str, arch: str, shots: int, rates: dict[str, float]) -> tuple[float, int, int]:
    """Modelled seconds of one cell alone on a GPU; with its support crops and test images."""
    info = PUBLIC[target]
    crops = shots * crops_per_image(info.shape, cfg.data.crop_size, cfg.data.stride(target, "finetune"))
    b = cfg.finetune.batch_size
    train = cfg.finetune.epochs * math.ceil(crops / b) * b / rates["train"]  # partial batches cost as full ones
    test = info.pairs - shots
    evaluate = test * info.shape[0] * info.shape[1] / 1e6 / rates["eval"]
    return train + evaluate, crops, test


def project(cfg: Config, rates: dict[str, dict[str, float]], gpus: int, packing_gain: float) -> dict[str, float]:
    """GPU-seconds and wall seconds per phase on ``gpus`` GPUs."""
    cells = grid(cfg)
    targets = list(dict.fromkeys(c.target for c in cells))
    out = Counter()
    for t in targets:
        sources = len([d for d in cfg.study.datasets if d != t]) if cfg.study.datasets else len(cfg.data.sources)
        for a in cfg.study.archs:
            r = rates[a]
            for p in cfg.study.pretrainings:
                if p.startswith("meta-"):
                    iteration = cfg.meta.inner_steps * r["inner"]
                    turns = math.ceil(sources / min(gpus, sources))  # actors sharing a GPU take turns
                    out["meta_wall"] += cfg.meta.iterations * iteration * turns
                    out["meta_gpu"] += cfg.meta.iterations * iteration * sources
                elif p == "transfer":
                    seconds = cfg.transfer.steps * cfg.transfer.batch_size / r["train"]
                    out["transfer_wall"] += seconds
                    out["transfer_gpu"] += seconds
    for c in cells:
        seconds, _, _ = cell_seconds(cfg, c.target, c.arch, c.shots, rates[c.arch])
        out["cells_gpu"] += seconds / packing_gain
    out["cells_wall"] = out["cells_gpu"] / gpus
    out["as_run_now"] = out["meta_wall"] + out["transfer_wall"] + out["cells_wall"]
    out["all_busy"] = (out["meta_gpu"] + out["transfer_gpu"] + out["cells_gpu"]) / gpus
    return dict(out)


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h"


def main(argv: list[str] | None = None) -> int:
    from train_step import machine_line

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "paper.yaml"), help="study configuration (default: configs/paper.yaml)")
    p.add_argument("--measure", action="store_true", help="measure the rates on this machine's device (a few minutes on a CPU)")
    p.add_argument("--quick", action="store_true", help="with --measure: tiny sizes, only to check the script runs (figures meaningless)")
    p.add_argument("--train-crops-per-s", nargs="+", default=[], metavar="ARCH=R", help="training crops/s at the fine-tune batch")
    p.add_argument("--eval-mpx-per-s", nargs="+", default=[], metavar="ARCH=R", help="inference megapixels/s")
    p.add_argument("--inner-step-seconds", nargs="+", default=[], metavar="ARCH=S", help="seconds per Reptile inner step")
    p.add_argument("--packing-gain", type=float, default=1.0, help="cells/s of a packed GPU over one cell at a time (default: 1)")
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 8], help="GPU counts to project for (default: 1 8)")
    args = p.parse_args(argv)

    cfg = load_config(args.config)
    cells = grid(cfg)
    archs = list(cfg.study.archs)
    device = default_device()
    print(machine_line(device))
    unknown = sorted({c.target for c in cells} - set(PUBLIC))
    if unknown:
        raise SystemExit(f"{args.config}: no geometry for target(s) {unknown}; the projection knows {sorted(PUBLIC)}")
    if cfg.finetune.steps > 0 or cfg.finetune.holdout > 0 or cfg.eval.tta:
        raise SystemExit(f"{args.config}: the projection models the paper's fine-tune (finetune.epochs over every crop, "
                         f"finetune.steps=0, no held-out bands, no TTA); this configuration has finetune.steps={cfg.finetune.steps}, "
                         f"finetune.holdout={cfg.finetune.holdout}, eval.tta={cfg.eval.tta}")
    if args.measure:
        if device.type != "cuda":
            print("note: no GPU here — the rates below are this CPU's, so the projection is for GPUs as fast as this CPU")
        if args.quick:
            print("note: --quick measures at tiny sizes to check that the script runs; its projection means nothing")
        rates = measure_rates(archs, cfg, device, args.quick)
        source = "measured here"
    else:
        rates = given_rates(args, archs)
        source = "given"

    targets = list(dict.fromkeys(c.target for c in cells))
    metas = len(targets) * len(archs) * sum(q.startswith("meta-") for q in cfg.study.pretrainings)
    transfers = len(targets) * len(archs) * ("transfer" in cfg.study.pretrainings)
    print(f"\n{args.config}: {len(cells)} cells; {metas} meta-trainings × {cfg.meta.iterations} iterations "
          f"({metas * cfg.meta.iterations} iterations of {cfg.meta.inner_steps} inner steps); {transfers} transfer trainings × "
          f"{cfg.transfer.steps} steps; cells packed {1 / cfg.study.cell_gpus if cfg.study.cell_gpus else 1:g} per GPU "
          f"(study.cell_gpus={cfg.study.cell_gpus}), packing gain {args.packing_gain:g}")
    print("rates (" + source + "): " + "; ".join(
        f"{a}: {r['train']:.1f} crops/s, {r['eval']:.2f} MPx/s, {r['inner']:.4f} s/inner step" for a, r in rates.items()))

    print(f"\nmodelled seconds per cell, one cell alone on a GPU (K={max(cfg.eval.shots)} and K={min(cfg.eval.shots)}):")
    print(f"{'target':<7} {'crops/img':>9} {'test imgs':>9} " + " ".join(f"{a + ' K' + str(k):>12}" for a in archs for k in (max(cfg.eval.shots), min(cfg.eval.shots))))
    for t in targets:
        per_img = crops_per_image(PUBLIC[t].shape, cfg.data.crop_size, cfg.data.stride(t, "finetune"))
        row = [f"{cell_seconds(cfg, t, a, k, rates[a])[0]:>12.1f}" for a in archs for k in (max(cfg.eval.shots), min(cfg.eval.shots))]
        print(f"{t:<7} {per_img:>9} {PUBLIC[t].pairs - max(cfg.eval.shots):>9} " + " ".join(row))

    print(f"\n{'GPUs':>4} {'meta-training':>14} {'transfer':>9} {'cells':>9} {'as run now':>11} {'all GPUs busy':>14}")
    results = {}
    for g in args.gpus:
        r = results[g] = project(cfg, rates, g, args.packing_gain)
        print(f"{g:>4} {hours(r['meta_wall']):>14} {hours(r['transfer_wall']):>9} {hours(r['cells_wall']):>9} "
              f"{hours(r['as_run_now']):>11} {hours(r['all_busy']):>14}")
    print("\nratios (this run):")
    for g in args.gpus:
        r = results[g]
        verdict = "met" if r["as_run_now"] <= 3600 else "missed"
        print(f"  {g} GPU(s): as run now {hours(r['as_run_now'])} = {r['as_run_now'] / 3600:.2f}× the 1-hour target ({verdict}), "
              f"all GPUs busy {hours(r['all_busy'])}; meta-training {100 * r['meta_wall'] / r['as_run_now']:.0f} % of the wall time")
    if len(args.gpus) > 1:
        a, b = min(args.gpus), max(args.gpus)
        print(f"  {b} vs {a} GPU(s): {results[a]['as_run_now'] / results[b]['as_run_now']:.2f}× faster as run now, "
              f"{results[a]['all_busy'] / results[b]['all_busy']:.2f}× with all GPUs busy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
