"""Prediction speed and peak memory on CPU: tiled (512-px tiles, 64-px overlap, 4 per batch) vs one
whole-image forward pass, on a square test image, in exact fp32 and with fsmeta's default
precision (``compute.amp=auto``: bf16 autocast + channels_last on a CPU with native bf16).

Each mode runs in its own subprocess so that its peak resident memory
(``resource.getrusage(...).ru_maxrss``; tracemalloc does not see torch's allocations)
is its own. Reported per mode: megapixels per second of wall-clock time and per
CPU-second of the process (best of ``--repeats`` runs of the probability map after
one warm-up; on a shared machine the CPU-time figure is the steadier one), peak
RSS, and the peak's growth over the process before inference (interpreter, torch,
model and image). Also the largest probability difference between the modes.

    python bench/predict.py                          # 2048×2048, FCRN, torch's default threads
    python bench/predict.py --tiles 512 256
    python bench/predict.py --size 4096 --no-whole   # bounded memory on a large image
    python bench/predict.py --precisions fp32 default --no-whole   # default / fp32, tiled
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


PRECISIONS = ("fp32", "default", "default+fold")  # +fold: batch norm folded into the convolutions first


def run_one(mode: str, size: int, arch: str, repeats: int, tile: int, overlap: int, batch: int, save: str | None, threads: int = 0,
            precision: str = "fp32") -> dict:
    import numpy as np
    import torch

    if threads:
        torch.set_num_threads(threads)

    from fsmeta.compute import autocast_dtype, channels_last, prepare_model
    from fsmeta.config import ComputeConfig
    from fsmeta.models import build_model, fold_batch_norm
    from fsmeta.predict import predict_tiled, predict_whole

    compute = ComputeConfig(amp="off", channels_last="off") if precision == "fp32" else ComputeConfig()
    torch.manual_seed(0)
    model = build_model(arch).eval()
    if precision.endswith("+fold"):
        model = fold_batch_norm(model)
    model = prepare_model(model, torch.device("cpu"), compute)
    image = (np.random.default_rng(0).random((size, size)) * 255).astype(np.uint8)
    base = _rss_mb()

    def once():
        if mode == "tiled":
            return predict_tiled(model, image, tile=tile, overlap=overlap, batch=batch, compute=compute)
        return predict_whole(model, image, compute=compute)

    prob = once()  # warm-up (allocator, kernels)
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        prob = once()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    if save:
        np.save(save, prob)
    best = min(times)
    return {"mode": mode, "size": size, "seconds": best, "mpx_per_s": size * size / 1e6 / best,
            "cpu_seconds": min(cpu), "mpx_per_cpu_s": size * size / 1e6 / min(cpu),
            "peak_rss_mb": _rss_mb(), "rss_before_mb": base, "threads": torch.get_num_threads(),
            "precision": str(autocast_dtype(torch.device("cpu"), compute) or "fp32").replace("torch.", "")
            + ("+CL" if channels_last(torch.device("cpu"), compute) else "") + ("+fold" if precision.endswith("+fold") else "")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=2048, help="image side in pixels (default: 2048)")
    parser.add_argument("--arch", default="fcrn", help="model architecture (default: fcrn)")
    parser.add_argument("--tiles", type=int, nargs="+", default=[512], help="tile sides to time (default: 512)")
    parser.add_argument("--no-whole", action="store_true", help="skip the whole-image pass, e.g. for huge images (default: run it)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per mode and round, best reported (default: 3)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over all modes, alternating their order; best time kept (default: 2)")
    parser.add_argument("--overlap", type=int, default=64, help="tile overlap (default: 64)")
    parser.add_argument("--batch", type=int, default=4, help="tiles per forward pass (default: 4)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (default: 0, torch's choice)")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=["fp32", "default"],
                        help="fp32 (compute.amp=off), default (compute.amp=auto), default+fold (and batch norm folded "
                             "into the convolutions) (default: fp32 default)")
    parser.add_argument("--one", choices=["tiled", "whole"], help=argparse.SUPPRESS)  # child process
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--tile", type=int, default=512, help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.size, args.arch, args.repeats, args.tile, args.overlap, args.batch, args.save, args.threads,
                                 args.precision)))
        return

    import tempfile

    import numpy as np

    modes = [(m, t, p) for p in args.precisions for m, t in [("tiled", t) for t in args.tiles] + ([] if args.no_whole else [("whole", 0)])]
    results: dict[tuple[str, int, str], dict] = {}
    diffs: dict[tuple[str, int, str], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for mode, tile, precision in (modes if r % 2 == 0 else modes[::-1]):
                out = Path(tmp) / f"{mode}{tile}{precision}.npy"
                cmd = [sys.executable, __file__, "--one", mode, "--size", str(args.size), "--arch", args.arch, "--repeats", str(args.repeats),
                       "--tile", str(tile or 512), "--overlap", str(args.overlap), "--batch", str(args.batch), "--save", str(out),
                       "--threads", str(args.threads), "--precision", precision]
                proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
                if proc.returncode != 0:
                    print(f"{mode} {tile} {precision}: failed (exit {proc.returncode})\n{proc.stderr[-2000:]}")
                    continue
                got = json.loads(proc.stdout.strip().splitlines()[-1])
                prev = results.get((mode, tile, precision))
                if prev is None or got["seconds"] < prev["seconds"]:
                    got["peak_rss_mb"] = max(got["peak_rss_mb"], prev["peak_rss_mb"]) if prev else got["peak_rss_mb"]
                    results[(mode, tile, precision)] = got
        # |Δp| against the whole-image pass in the same precision (tiling), and against fp32 (precision).
        for mode, tile, precision in modes:
            path = Path(tmp) / f"{mode}{tile}{precision}.npy"
            if not path.is_file():
                continue
            prob = np.load(path)
            whole = Path(tmp) / f"whole0{precision}.npy"
            if mode == "tiled" and whole.is_file():
                diffs[(mode, tile, precision)] = float(np.abs(prob - np.load(whole)).max())
            fp32 = Path(tmp) / f"{mode}{tile}fp32.npy"
            if precision != "fp32" and fp32.is_file():
                ref = np.load(fp32)
                diffs[(mode, tile, precision + " vs fp32")] = float(np.abs(prob - ref).max())
                diffs[(mode, tile, precision + " mask agreement")] = float(((prob >= 0.5) == (ref >= 0.5)).mean())

    print(f"predict on CPU: {args.arch}, {args.size}×{args.size} image, overlap {args.overlap}, batch {args.batch}, "
          f"best of {args.repeats} runs × {args.rounds} rounds")
    print(f"machine: {platform.machine()}, {os.cpu_count()} logical CPUs, load average {os.getloadavg()[0]:.1f}, python {platform.python_version()}")
    print(f"{'mode':<12}{'precision':<18}{'threads':>8}{'seconds':>9}{'MPx/s':>8}{'CPU s':>8}{'MPx/CPU-s':>11}{'peak RSS':>11}{'growth':>10}"
          f"{'|Δp| tiled':>12}{'|Δp| fp32':>11}{'mask =':>10}")
    for (mode, tile, precision), r in results.items():
        label = f"tiled {tile}" if mode == "tiled" else "whole"
        d = f"{diffs[(mode, tile, precision)]:.2g}" if (mode, tile, precision) in diffs else "-"
        dp = f"{diffs[(mode, tile, precision + ' vs fp32')]:.2g}" if (mode, tile, precision + " vs fp32") in diffs else "-"
        agree = f"{100 * diffs[(mode, tile, precision + ' mask agreement')]:.3f}%" if (mode, tile, precision + " mask agreement") in diffs else "-"
        print(f"{label:<12}{r['precision']:<18}{r['threads']:>8}{r['seconds']:>9.2f}{r['mpx_per_s']:>8.3f}{r['cpu_seconds']:>8.1f}{r['mpx_per_cpu_s']:>11.3f}"
              f"{r['peak_rss_mb']:>9.0f}MB{r['peak_rss_mb'] - r['rss_before_mb']:>8.0f}MB{d:>12}{dp:>11}{agree:>10}")
    for precision in args.precisions:
        w = results.get(("whole", 0, precision))
        for t in args.tiles:
            r = results.get(("tiled", t, precision))
            if r and w:
                print(f"{precision}: tiled {t} / whole: speed {r['mpx_per_s'] / w['mpx_per_s']:.2f}× (wall), {r['mpx_per_cpu_s'] / w['mpx_per_cpu_s']:.2f}× "
                      f"(CPU time), peak memory growth {(r['peak_rss_mb'] - r['rss_before_mb']) / max(w['peak_rss_mb'] - w['rss_before_mb'], 1e-9):.2f}×")
    for other in [p for p in args.precisions if p != "fp32"] if "fp32" in args.precisions else []:
        for mode, tile in [("tiled", t) for t in args.tiles] + ([] if args.no_whole else [("whole", 0)]):
            a, b = results.get((mode, tile, other)), results.get((mode, tile, "fp32"))
            if a and b:
                label = f"tiled {tile}" if mode == "tiled" else "whole"
                print(f"{label}: {other} / fp32 = {a['mpx_per_s'] / b['mpx_per_s']:.2f}× (wall), {a['mpx_per_cpu_s'] / b['mpx_per_cpu_s']:.2f}× (CPU time) "
                      f"(target ≥ 2×)")


if __name__ == "__main__":
    main()
