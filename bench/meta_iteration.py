"""Seconds per Reptile meta-iteration: the ``sequential`` backend vs the ``ray`` backend (one actor per source).

Measured in one run, on one machine, for 2 and 4 synthetic sources at 128×128
crops and at the paper's scale (256×256 crops); K=5 and 30 inner steps for both.
Prints per setting the mean seconds per meta-iteration of each backend, the ratio
sequential / ray, and the share of a Ray iteration that is not inner-loop compute
(θ put, scheduling, transfer of θ_m, gathering the task's pixels, meta-update):
(wall − max over actors of the seconds inside ``adapt``) / wall.

Fair use of the cores: sequential runs with torch's default thread count (all
cores); each Ray actor reserves cores / sources CPUs and runs one torch thread.
Actor start-up (once per run, not per iteration) is not timed.

    python bench/meta_iteration.py                   # 38 min on the loaded 2-core machine of docs/benchmarks.md
    python bench/meta_iteration.py --crops 128 --sources 2 --iterations 3
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from fsmeta.config import Config, load_config  # noqa: E402
from fsmeta.data.sampling import make_task  # noqa: E402
from fsmeta.meta.reptile import meta_update  # noqa: E402
from fsmeta.meta.sequential import SequentialBackend  # noqa: E402
from fsmeta.meta.reptile import InnerSettings  # noqa: E402
from fsmeta.meta.sources import load_sources  # noqa: E402
from fsmeta.train import initial_theta  # noqa: E402

DOMAINS = ["synth-fluo", "synth-nuclei", "synth-em", "synth-phase"]


def bench_config(root: Path, n_sources: int, crop: int, cores: int) -> Config:
    return load_config(None, [
        f"data.root={root}",
        "data.target=synth-he",
        f"data.sources=[{', '.join(DOMAINS[:n_sources])}]",
        f"data.crop_size={crop}",
        "data.source_stride={default: 64}",
        f"data.min_foreground={360 * crop * crop // (256 * 256)}",
        "data.synth.images=12",
        "data.synth.size=256",
        "meta.shots=5",
        "meta.inner_steps=30",
        "threads=0",  # sequential: torch's default, all cores
        f"ray.cpus_per_worker={cores / n_sources}",
        "tracking.enabled=false",
    ])


def time_iterations(backend, cfg: Config, sources, iterations: int) -> tuple[list[float], list[float]]:
    """Wall seconds of each meta-iteration (run + meta-update), and for Ray the non-compute share of each."""
    theta = initial_theta(cfg.arch, cfg.seed)
    sizes = [len(s.crops) for s in sources]
    walls, shares = [], []
    for it in range(iterations):
        tasks = [make_task(cfg.seed, it, m, sizes, cfg.meta.shots) for m in range(len(sources))]
        start = time.perf_counter()
        results = backend.run(theta, tasks)
        theta = meta_update(theta, [r.theta for r in results], cfg.meta.epsilon)
        wall = time.perf_counter() - start
        walls.append(wall)
        compute = getattr(backend, "last_compute_seconds", None)
        if compute:
            shares.append((wall - max(compute)) / wall)
    return walls, shares


def load_average() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iterations", type=int, default=1, help="timed meta-iterations at 128×128 (default: 1)")
    p.add_argument("--paper-iterations", type=int, default=1, help="timed meta-iterations at 256×256 (default: 1)")
    p.add_argument("--sources", type=int, nargs="+", default=[2, 4], help="numbers of sources (default: 2 4)")
    p.add_argument("--crops", type=int, nargs="+", default=[128, 256], help="crop sides (default: 128 256)")
    p.add_argument("--data-root", help="where to generate the synthetic domains (default: a temporary folder)")
    args = p.parse_args(argv)

    import ray

    from fsmeta.meta.driver import RayBackend

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    default_threads = torch.get_num_threads()
    print(f"machine: {platform.processor() or platform.machine()}, {cores} cores, torch {torch.__version__} "
          f"({default_threads} threads by default), ray {ray.__version__}, Python {platform.python_version()}")
    print("K=5, 30 inner steps, FCRN, BCE+ER+D; sequential: torch default threads; ray: one actor per source, "
          f"{cores}/n CPUs and 1 torch thread each\n")
    ray.init(address="local", num_cpus=cores, include_dashboard=False, logging_level="WARNING")
    rows = []
    with tempfile.TemporaryDirectory(prefix="fsmeta-bench-") as tmp:
        root = Path(args.data_root or tmp)
        header = f"{'crop':>5} {'sources':>7} {'iters':>5} {'sequential s/it':>16} {'ray s/it':>9} {'seq/ray':>8} {'ray non-compute':>16}  load avg"
        print(header)
        for crop in args.crops:
            iterations = args.paper_iterations if crop >= 256 else args.iterations
            for n in args.sources:
                cfg = bench_config(root, n, crop, cores)
                sources = load_sources(cfg)
                before = load_average()
                torch.set_num_threads(default_threads)
                seq = SequentialBackend(cfg.arch, sources, InnerSettings.from_config(cfg))
                seq_walls, _ = time_iterations(seq, cfg, sources, iterations)
                backend = RayBackend(cfg, sources)
                try:
                    ray_walls, shares = time_iterations(backend, cfg, sources, iterations)
                finally:
                    backend.close()
                s, r = statistics.mean(seq_walls), statistics.mean(ray_walls)
                share = statistics.mean(shares)
                rows.append((crop, n, s, r, share))
                print(f"{crop:>5} {n:>7} {iterations:>5} {s:>16.2f} {r:>9.2f} {s / r:>7.2f}× {100 * share:>15.1f}%  "
                      f"{before} → {load_average()}", flush=True)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
