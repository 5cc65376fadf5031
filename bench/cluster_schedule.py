"""The study's two schedulers on a simulated multi-GPU cluster, and the paper study projected on 8 and 32 GPUs.

Ray lets a node declare GPUs it does not have, so ``ray.cluster_utils.Cluster``
starts a 4-node × 2-"GPU" cluster on this machine (torch runs on the CPU; a
"GPU" is a reservation). A scaled-down ``configs/paper.yaml`` grid (five
synthetic data sets, each target's sources the other four, so a meta-training
holds 4 "GPUs" as in the paper) runs there under ``study.scheduler=sequential``
(pre-trainings one after another in the driver, then the cells) and
``study.scheduler=graph``. From each run's ``OUT/schedule.jsonl`` (start and end
of every unit, what it held) it prints the wall time, the GPU-slot utilisation
(busy GPU-seconds / (GPUs × wall)) and the lower bound max(critical path, busy
GPU-seconds / GPUs) from that run's own unit durations; it checks that both runs
wrote the same results.csv and draws a Gantt chart per scheduler into docs/.

Then the projection: the units of the full ``configs/paper.yaml`` study with the
per-unit costs of ``bench/project_paper.py`` (rates given, or ``--measure``d on
this machine's device), scheduled by ``fsmeta.graph.simulate`` (the graph
scheduler's own policy) and ``simulate_sequential`` on 8 and 32 GPUs.

    python bench/cluster_schedule.py --measure            # simulated cluster + projection with rates measured here
    python bench/cluster_schedule.py --projection-only --train-crops-per-s fcrn=R unet=R \\
        --eval-mpx-per-s fcrn=R unet=R --inner-step-seconds fcrn=S unet=S --packing-gain G
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a loopback-only cluster of this process

from fsmeta import graph  # noqa: E402
from fsmeta.benchmark import SCHEDULE_FILE, grid, run_benchmark, study_graph  # noqa: E402
from fsmeta.config import Config, load_config  # noqa: E402
from fsmeta.tracking import Tracker  # noqa: E402

SYNTH = ["synth-fluo", "synth-nuclei", "synth-em", "synth-he", "synth-phase"]
# The paper's grid scaled down: 2 targets × 1 arch × (2 meta-trainings, transfer, scratch) × K {1, 3} × 3 seeds,
# tiny synthetic data (96² images, 64² crops), cells packed 2 per "GPU".
SCALED = [
    "threads=1", "data.crop_size=64", "data.min_foreground=10", "data.source_stride={default: 32}",
    "data.finetune_stride={default: 32}", "data.synth.images=8", "data.synth.size=96", "data.sources=[]",
    f"study.datasets=[{', '.join(SYNTH)}]", "study.targets=[synth-he, synth-fluo]", "study.archs=[fcrn]",
    "study.pretrainings=[meta-bce, meta-all, transfer, scratch]", "study.overlays=0", "study.executor=ray",
    "study.cell_cpus=1", "study.cell_gpus=0.5", "meta.backend=ray", "ray.cpus_per_worker=1", "meta.iterations=6",
    "meta.inner_steps=5", "meta.shots=2", "meta.checkpoint_every=3", "transfer.steps=40", "transfer.batch_size=8",
    "finetune.epochs=3", "finetune.steps=0", "finetune.crop_size=0", "finetune.holdout=0", "eval.tta=false",
    "eval.shots=[1, 3]", "eval.seeds=[0, 1, 2]", "tracking.enabled=false",
]


def read_schedule(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / SCHEDULE_FILE).read_text().splitlines()]


def analyse(spans: list[dict], units: list[graph.Unit], gpus: float, cap: dict[str, float]) -> dict[str, float]:
    t0 = min(s["start"] for s in spans)
    wall = max(s["end"] for s in spans) - t0
    busy = sum(s["gpus"] * (s["end"] - s["start"]) for s in spans)
    seconds = {s["unit"]: s["end"] - s["start"] for s in spans}
    bound = graph.lower_bound(units, seconds, cap)
    # The graph scheduler's policy replayed on the same durations (fsmeta.graph.simulate): the schedule
    # without this machine's overheads (worker start-up, a starved driver), to tell policy from load.
    replay = max(b for _, b in graph.simulate(units, seconds, cap).values())
    return {"wall": wall, "busy": busy, "util": busy / (gpus * wall), "critical": graph.critical_path(units, seconds),
            "bound": bound, "ratio": wall / bound, "replay": replay, "replay_util": busy / (gpus * replay)}


def gantt(spans: list[dict], gpus: float, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"meta": "tab:blue", "transfer": "tab:orange", "scratch": "tab:gray", "pretext": "tab:purple", "cell": "tab:green"}
    t0 = min(s["start"] for s in spans)
    models = []
    for s in sorted(spans, key=lambda s: s["start"]):
        m = s["unit"].split("/", 1)[1] if "/" in s["unit"] else "/".join(s["unit"].split("__")[:3])
        if m not in models:
            models.append(m)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for s in spans:
        m = s["unit"].split("/", 1)[1] if "/" in s["unit"] else "/".join(s["unit"].split("__")[:3])
        y = models.index(m)
        cell = s["kind"] == "cell"
        top.broken_barh([(s["start"] - t0, s["end"] - s["start"])], (y - (0.15 if cell else 0.4), 0.3 if cell else 0.8),
                        facecolors=colours[s["kind"]], alpha=0.5 if cell else 0.9, edgecolor="black" if cell else None, linewidth=0.3)
    top.set_yticks(range(len(models)), models, fontsize=7)
    top.invert_yaxis()
    top.set_title(title, fontsize=9)
    top.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()], labels=list(colours), fontsize=7, loc="lower right")
    times = sorted({t - t0 for s in spans for t in (s["start"], s["end"])})
    held = [sum(s["gpus"] for s in spans if s["start"] - t0 <= t < s["end"] - t0) for t in times]
    bottom.step(times, held, where="post", color="black")
    bottom.axhline(gpus, color="red", linestyle="--", linewidth=0.8)
    bottom.set_ylabel("GPUs held")
    bottom.set_xlabel("seconds")
    bottom.set_ylim(0, gpus * 1.1)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_simulated(args) -> None:
    import ray
    from ray.cluster_utils import Cluster

    work = Path(args.analyse or args.workdir or tempfile.mkdtemp(prefix="fsmeta-cluster-"))
    base = [*SCALED, f"data.root={work / 'data'}"]
    cluster = None
    if args.analyse:
        resources = {"CPU": float(args.nodes * args.cpus_per_node), "GPU": float(args.nodes * args.gpus_per_node)}
    else:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # the driver's node holds no unit
    try:
        if cluster is not None:
            for _ in range(args.nodes):
                cluster.add_node(num_cpus=args.cpus_per_node, num_gpus=args.gpus_per_node)
            ray.init(address=cluster.address, logging_level="WARNING")
            cluster.wait_for_nodes()
            resources = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
        gpus = resources["GPU"]
        print(f"simulated cluster: {args.nodes} nodes × ({args.cpus_per_node} CPUs, {args.gpus_per_node} GPUs) = {resources}; "
              f"this machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start")
        results = {}
        for scheduler in ("sequential", "graph"):
            cfg = load_config(None, [*base, f"study.scheduler={scheduler}"])
            out = work / scheduler
            t0 = time.time()
            if not args.analyse:
                run_benchmark(cfg, out, Tracker(enabled=False), progress=False)
            total = time.time() - t0
            spans = read_schedule(out)
            units = study_graph(cfg, grid(cfg), resources, n_sources={(t, a): 4 for t in cfg.study.targets for a in cfg.study.archs})
            r = results[scheduler] = analyse(spans, units, gpus, graph.capacity(cfg, resources))
            r["total"], r["units"], r["cells"] = total, len(spans), sum(s["kind"] == "cell" for s in spans)
            png = REPO / "docs" / f"schedule_{scheduler}.png"
            gantt(spans, gpus, f"study.scheduler={scheduler}: {len(spans)} units on {gpus:g} simulated GPUs, wall {r['wall']:.0f} s, "
                  f"GPU-slot utilisation {100 * r['util']:.0f} %", png)
            print(f"  {scheduler:<10}: {r['units']} units ({r['cells']} cells) in {r['wall']:.1f} s (run_benchmark {'—' if args.analyse else f'{total:.1f} s'}); "
                  f"GPU-slot utilisation {100 * r['util']:.1f} %; critical path {r['critical']:.1f} s; lower bound {r['bound']:.1f} s; "
                  f"wall / bound {r['ratio']:.2f}; Gantt → {png.relative_to(REPO)}", flush=True)
            print(f"  {'':<10}  the graph policy replayed on these durations: {r['replay']:.1f} s = {r['replay'] / r['bound']:.2f}× the bound, "
                  f"GPU-slot utilisation {100 * r['replay_util']:.1f} %")
        same = (work / "sequential" / "results.csv").read_bytes() == (work / "graph" / "results.csv").read_bytes()
        print(f"  results.csv of both runs identical: {same}")
        print(f"  graph vs sequential: {results['sequential']['wall'] / results['graph']['wall']:.2f}× shorter wall time; "
              f"load average {os.getloadavg()[0]:.1f} at the end")
    finally:
        if cluster is not None:
            ray.shutdown()
            cluster.shutdown()


def paper_units(cfg: Config, gpus: int, rates: dict[str, dict[str, float]], packing_gain: float) -> tuple[list[graph.Unit], dict[str, float], dict]:
    """The paper study's units on ``gpus`` GPUs (8 CPUs per GPU) with project_paper's per-unit costs."""
    from project_paper import cell_seconds

    cells = grid(cfg)
    cluster = {"CPU": 8.0 * gpus, "GPU": float(gpus)}
    n_sources = {(t, a): len([d for d in cfg.study.datasets if d != t]) for t in cfg.study.targets for a in cfg.study.archs}
    units = study_graph(cfg, cells, cluster, n_sources=n_sources)
    seconds: dict[str, float] = {}
    cell_of = {u.key: c for u, c in zip([u for u in units if u.kind == "cell"], cells)}
    for u in units:
        if u.kind == "cell":
            c = cell_of[u.key]
            alone, _, _ = cell_seconds(cfg, c.target, c.arch, c.shots, rates[c.arch])
            seconds[u.key] = alone / (max(cfg.study.cell_gpus, 1e-9) * packing_gain) if cfg.study.cell_gpus > 0 else alone
        else:
            arch = u.key.split("/")[2]
            r = rates[arch]
            if u.kind == "meta":  # one actor per GPU: an iteration lasts one actor's inner loop
                seconds[u.key] = cfg.meta.iterations * cfg.meta.inner_steps * r["inner"]
            elif u.kind == "transfer":
                seconds[u.key] = cfg.transfer.steps * cfg.transfer.batch_size / r["train"]
            else:
                seconds[u.key] = 1.0
    return units, seconds, cluster


def projection(args) -> None:
    from project_paper import given_rates, measure_rates, project

    from fsmeta.compute import default_device

    cfg = load_config(args.config)
    archs = list(cfg.study.archs)
    if args.measure:
        device = default_device()
        if device.type != "cuda":
            print("note: no GPU here — the rates are this CPU's, so the projection is for GPUs as fast as this CPU (machine loaded)")
        rates = measure_rates(archs, cfg, device, quick=False)
    else:
        rates = given_rates(args, archs)
    print(f"\nprojection of {args.config} ({len(grid(cfg))} cells) with bench/project_paper.py's per-unit costs, packing gain {args.packing_gain:g}:")
    print(f"{'GPUs':>4} {'sequential (sim)':>17} {'as run now (project_paper)':>27} {'graph (sim)':>12} {'lower bound':>12} "
          f"{'graph/bound':>12} {'util seq':>9} {'util graph':>11}")
    for g in args.project_gpus:
        units, seconds, cluster = paper_units(cfg, g, rates, args.packing_gain)
        cap = graph.capacity(cfg, cluster)
        seq = graph.simulate_sequential(units, seconds, cap)
        new = graph.simulate(units, seconds, cap)
        bound = graph.lower_bound(units, seconds, cap)
        busy = sum(u.demand["GPU"] * seconds[u.key] for u in units)
        wall_seq, wall_new = max(b for _, b in seq.values()), max(b for _, b in new.values())
        now = project(cfg, rates, g, args.packing_gain)["as_run_now"]
        print(f"{g:>4} {wall_seq / 3600:>15.2f} h {now / 3600:>25.2f} h {wall_new / 3600:>10.2f} h {bound / 3600:>10.2f} h "
              f"{wall_new / bound:>12.2f} {100 * busy / (g * wall_seq):>8.0f}% {100 * busy / (g * wall_new):>10.0f}%")
    print("(sequential (sim): the sequential scheduler with the graph's reservations — a transfer training counted as holding one "
          "GPU; util: busy GPU-seconds / (GPUs × wall))")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=4, help="simulated nodes (default: 4)")
    p.add_argument("--gpus-per-node", type=int, default=2, help="GPUs each simulated node declares (default: 2)")
    p.add_argument("--cpus-per-node", type=int, default=4, help="CPUs each simulated node declares (default: 4)")
    p.add_argument("--workdir", help="where the two studies write (default: a new temporary folder)")
    p.add_argument("--projection-only", action="store_true", help="skip the simulated cluster")
    p.add_argument("--analyse", metavar="DIR", help="analyse the two studies a previous run left in DIR (its --workdir) instead of running them")
    p.add_argument("--config", default=str(REPO / "configs" / "paper.yaml"), help="the study to project (default: configs/paper.yaml)")
    p.add_argument("--project-gpus", type=int, nargs="+", default=[8, 32], help="GPU counts to project for (default: 8 32)")
    p.add_argument("--measure", action="store_true", help="measure project_paper's rates on this machine's device")
    p.add_argument("--train-crops-per-s", nargs="+", default=[], metavar="ARCH=R")
    p.add_argument("--eval-mpx-per-s", nargs="+", default=[], metavar="ARCH=R")
    p.add_argument("--inner-step-seconds", nargs="+", default=[], metavar="ARCH=S")
    p.add_argument("--packing-gain", type=float, default=1.0, help="cells/s of a packed GPU over one cell at a time (default: 1)")
    args = p.parse_args(argv)
    if not args.projection_only:
        run_simulated(args)
    if args.measure or args.train_crops_per_s:
        projection(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
