"""Prediction speed and peak memory on CPU: tiled (512-px tiles, 64-px overlap, 4 per batch) vs one
whole-image forward pass, on a square test image.

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


def run_one(mode: str, size: int, arch: str, repeats: int, tile: int, overlap: int, batch: int, save: str | None, threads: int = 0) -> dict:
    import numpy as np
    import torch

    if threads:
        torch.set_num_threads(threads)

    from fsmeta.models import build_model
    from fsmeta.predict import predict_tiled, predict_whole

    torch.manual_seed(0)
    model = build_model(arch).eval()
    image = (np.random.default_rng(0).random((size, size)) * 255).astype(np.uint8)
    base = _rss_mb()

    def once():
        if mode == "tiled":
            return predict_tiled(model, image, tile=tile, overlap=overlap, batch=batch)
        return predict_whole(model, image)

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
            "peak_rss_mb": _rss_mb(), "rss_before_mb": base, "threads": torch.get_num_threads()}


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
    parser.add_argument("--one", choices=["tiled", "whole"], help=argparse.SUPPRESS)  # child process
    parser.add_argument("--tile", type=int, default=512, help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.size, args.arch, args.repeats, args.tile, args.overlap, args.batch, args.save, args.threads)))
        return

    import tempfile

    import numpy as np

    modes = [("tiled", t) for t in args.tiles] + ([] if args.no_whole else [("whole", 0)])
    results: dict[tuple[str, int], dict] = {}
    diffs: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for mode, tile in (modes if r % 2 == 0 else modes[::-1]):
                out = Path(tmp) / f"{mode}{tile}.npy"
                cmd = [sys.executable, __file__, "--one", mode, "--size", str(args.size), "--arch", args.arch, "--repeats", str(args.repeats),
                       "--tile", str(tile or 512), "--overlap", str(args.overlap), "--batch", str(args.batch), "--save", str(out),
                       "--threads", str(args.threads)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
                if proc.returncode != 0:
                    print(f"{mode} {tile}: failed (exit {proc.returncode})\n{proc.stderr[-2000:]}")
                    continue
                got = json.loads(proc.stdout.strip().splitlines()[-1])
                prev = results.get((mode, tile))
                if prev is None or got["seconds"] < prev["seconds"]:
                    got["peak_rss_mb"] = max(got["peak_rss_mb"], prev["peak_rss_mb"]) if prev else got["peak_rss_mb"]
                    results[(mode, tile)] = got
        if not args.no_whole and (Path(tmp) / "whole0.npy").is_file():
            whole = np.load(Path(tmp) / "whole0.npy")
            for t in args.tiles:
                if (Path(tmp) / f"tiled{t}.npy").is_file():
                    diffs[t] = float(np.abs(np.load(Path(tmp) / f"tiled{t}.npy") - whole).max())

    print(f"predict on CPU: {args.arch}, {args.size}×{args.size} image, overlap {args.overlap}, batch {args.batch}, "
          f"best of {args.repeats} runs × {args.rounds} rounds")
    print(f"machine: {platform.machine()}, {os.cpu_count()} logical CPUs, load average {os.getloadavg()[0]:.1f}, python {platform.python_version()}")
    print(f"{'mode':<12}{'threads':>8}{'seconds':>9}{'MPx/s':>8}{'CPU s':>8}{'MPx/CPU-s':>11}{'peak RSS':>11}{'growth':>10}{'max |Δp|':>11}")
    for (mode, tile), r in results.items():
        label = f"tiled {tile}" if mode == "tiled" else "whole"
        d = f"{diffs[tile]:.2g}" if mode == "tiled" and tile in diffs else "-"
        print(f"{label:<12}{r['threads']:>8}{r['seconds']:>9.2f}{r['mpx_per_s']:>8.3f}{r['cpu_seconds']:>8.1f}{r['mpx_per_cpu_s']:>11.3f}{r['peak_rss_mb']:>9.0f}MB"
              f"{r['peak_rss_mb'] - r['rss_before_mb']:>8.0f}MB{d:>11}")
    w = results.get(("whole", 0))
    for t in args.tiles:
        r = results.get(("tiled", t))
        if r and w:
            print(f"tiled {t} / whole: speed {r['mpx_per_s'] / w['mpx_per_s']:.2f}× (wall), {r['mpx_per_cpu_s'] / w['mpx_per_cpu_s']:.2f}× (CPU time), peak memory growth "
                  f"{(r['peak_rss_mb'] - r['rss_before_mb']) / max(w['peak_rss_mb'] - w['rss_before_mb'], 1e-9):.2f}×")


if __name__ == "__main__":
    main()
