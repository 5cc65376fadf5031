"""The benchmark as a dependency graph: its units of work, what each reserves, the order they start in.

A unit is a pre-training (``meta``, ``transfer``, ``scratch``), the 2023
pipeline's ``pretext`` θ′ of a pre-trained model, or a ``cell``. Each is a pure
function of its configuration and of the checkpoints it depends on, so the order
units run in never changes a result: :mod:`fsmeta.benchmark` runs the graph on
Ray (``study.scheduler=graph``) and ``bench/cluster_schedule.py`` replays it in
:func:`simulate` with modelled durations.

What a unit reserves (``bundles``; the first is the unit's own process):

- a meta-training with ``meta.backend=ray``: its driver (``study.cell_cpus``
  CPUs) plus one bundle per source actor, sized by
  :func:`fsmeta.meta.resources.actor_bundle` — the layout of a Tune trial's
  placement group, so the Ray backend finds its bundles the same way;
- a meta-training on the sequential backend, a transfer training: one process
  with ``study.cell_cpus`` CPUs and one GPU when the cluster has one;
- a pretext θ′ and a cell: ``study.cell_cpus`` / ``study.cell_gpus``;
- scratch (a saved random initialisation): ``study.cell_cpus`` CPUs, no GPU.

Order (:func:`launchable`): ready units start by priority — meta-trainings
first (the longest chains: many GPUs for long, then their cells), then the
other pre-trainings and the θ′ that gate cells, then the cells of finished
models — and in grid order within a priority. Cells fill whatever the
pre-trainings leave free, and a transfer training no longer waits behind every
cell of the meta-trained models (that order left its training and its cells as
the schedule's tail: 1.22–1.28× the lower bound when replayed on measured
durations, against 1.02–1.03× for this one; docs/benchmarks.md). When the first ready unit
does not fit the free resources nothing behind it starts (so a meta-training
waiting for four GPUs is not starved by cells taking each GPU as it frees),
except units that need no GPU. ``study.max_gpus`` / ``study.max_cpus`` cap
what the study holds at once on a shared cluster.

Plain arithmetic: no ray, no torch.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from fsmeta.config import Config
from fsmeta.errors import FsmetaError
from fsmeta.meta.resources import actor_bundle

PRIORITY = {"meta": 0, "transfer": 1, "scratch": 1, "pretext": 1, "cell": 2}
RESOURCES = ("CPU", "GPU")


def pretraining_kind(pretraining: str) -> str:
    return "meta" if pretraining.startswith("meta-") else pretraining


@dataclass(frozen=True)
class Unit:
    key: str  # "meta/T/A/P", "pretext/T/A/P", ... or the cell's key
    kind: str  # meta, transfer, scratch, pretext, cell
    bundles: tuple[dict[str, float], ...]  # the unit's own process first, then one per source actor
    deps: tuple[str, ...] = ()  # keys of the units whose checkpoints it reads
    order: int = 0  # position in the grid: the tie-break within a priority

    @property
    def demand(self) -> dict[str, float]:
        return {r: sum(b.get(r, 0.0) for b in self.bundles) for r in RESOURCES}

    @property
    def rank(self) -> tuple[int, int]:
        return PRIORITY[self.kind], self.order


def unit_bundles(cfg: Config, kind: str, n_sources: int, cluster: dict[str, float]) -> list[dict[str, float]]:
    """The bundles one unit of ``kind`` reserves on ``cluster`` (module docstring)."""
    st = cfg.study
    gpu = 1.0 if cluster.get("GPU", 0.0) >= 1 else 0.0
    if kind in ("cell", "pretext"):
        own = {"CPU": st.cell_cpus, "GPU": st.cell_gpus}
    elif kind == "scratch":
        own = {"CPU": st.cell_cpus}
    elif kind == "meta" and cfg.meta.backend == "ray" and n_sources > 0:
        own = {"CPU": st.cell_cpus}
        actor = actor_bundle(cfg.ray, cluster, n_sources, reserved_cpus=st.cell_cpus)
        if actor["CPU"] <= 0:
            raise FsmetaError(f"a meta-training's driver takes study.cell_cpus={st.cell_cpus} of the cluster's "
                              f"{cluster.get('CPU', 0.0):g} CPUs, leaving none for its {n_sources} source actors; "
                              "lower study.cell_cpus or set ray.cpus_per_worker")
        return [own] + [dict(actor) for _ in range(n_sources)]
    elif kind in ("meta", "transfer"):
        own = {"CPU": st.cell_cpus, "GPU": gpu}
    else:
        raise FsmetaError(f"unknown unit kind {kind!r}")
    return [{k: v for k, v in own.items() if v > 0}]


def capacity(cfg: Config, cluster: dict[str, float]) -> dict[str, float]:
    """What the study may hold at once: the cluster, capped by ``study.max_gpus`` / ``study.max_cpus``."""
    caps = {"CPU": cfg.study.max_cpus, "GPU": cfg.study.max_gpus}
    return {r: min(cluster.get(r, 0.0), caps[r]) if caps[r] > 0 else cluster.get(r, 0.0) for r in RESOURCES}


def fits(demand: dict[str, float], free: dict[str, float]) -> bool:
    return all(demand.get(r, 0.0) <= free.get(r, 0.0) + 1e-9 for r in RESOURCES)


def check_fits(units: list[Unit], cap: dict[str, float]) -> None:
    """Every unit must fit what the study may hold, or it would wait forever."""
    for u in units:
        if not fits(u.demand, cap):
            need = {r: round(v, 4) for r, v in u.demand.items() if v}
            raise FsmetaError(f"{u.key} needs {need} but the study may hold {cap} at once (cluster, study.max_gpus, "
                              "study.max_cpus); add nodes, raise the cap or lower ray.gpus_per_worker / study.cell_gpus")


def launchable(ready: list[Unit], free: dict[str, float]) -> list[Unit]:
    """The ready units to start now, in order, with ``free`` resources (module docstring)."""
    out: list[Unit] = []
    left = dict(free)
    blocked = False
    for u in sorted(ready, key=lambda u: u.rank):
        demand = u.demand
        if blocked and demand["GPU"] > 0:
            continue
        if fits(demand, left):
            out.append(u)
            for r in RESOURCES:
                left[r] -= demand[r]
        else:
            blocked = True
    return out


@dataclass
class Graph:
    """Units, what is done, and what may start: the bookkeeping of a run, shared by Ray and :func:`simulate`."""

    units: dict[str, Unit]
    done: set[str] = field(default_factory=set)
    running: set[str] = field(default_factory=set)

    def ready(self) -> list[Unit]:
        # A dependency outside the graph counts as done (its checkpoint came from elsewhere).
        return [u for k, u in self.units.items() if k not in self.done and k not in self.running
                and all(d in self.done or d not in self.units for d in u.deps)]

    def free(self, cap: dict[str, float]) -> dict[str, float]:
        used = {r: sum(self.units[k].demand[r] for k in self.running) for r in RESOURCES}
        return {r: cap[r] - used[r] for r in RESOURCES}

    def start(self, cap: dict[str, float]) -> list[Unit]:
        units = launchable(self.ready(), self.free(cap))
        self.running.update(u.key for u in units)
        return units

    def finish(self, key: str) -> None:
        self.running.discard(key)
        self.done.add(key)

    def finished(self) -> bool:
        return len(self.done) == len(self.units)


def simulate(units: list[Unit], seconds: dict[str, float], cap: dict[str, float]) -> dict[str, tuple[float, float]]:
    """(start, end) of every unit under the graph scheduler, each taking ``seconds[key]``, on ``cap``."""
    graph = Graph({u.key: u for u in units})
    now, events, spans = 0.0, [], {}
    while not graph.finished():
        for u in graph.start(cap):
            spans[u.key] = (now, now + seconds[u.key])
            heapq.heappush(events, (now + seconds[u.key], u.key))
        if not events:
            raise FsmetaError("the simulated graph is stuck: a unit fits nowhere")
        now, key = heapq.heappop(events)
        graph.finish(key)
        while events and events[0][0] <= now + 1e-12:
            graph.finish(heapq.heappop(events)[1])
    return spans


def simulate_sequential(units: list[Unit], seconds: dict[str, float], cap: dict[str, float]) -> dict[str, tuple[float, float]]:
    """(start, end) of every unit under the sequential scheduler: pre-trainings (and θ′) one after
    another, then every cell, as many at once as fit."""
    spans: dict[str, tuple[float, float]] = {}
    now = 0.0
    for u in units:
        if u.kind != "cell":
            spans[u.key] = (now, now + seconds[u.key])
            now += seconds[u.key]
    cells = [u for u in units if u.kind == "cell"]
    rest = simulate(cells, seconds, cap)
    spans.update({k: (now + a, now + b) for k, (a, b) in rest.items()})
    return spans


def critical_path(units: list[Unit], seconds: dict[str, float]) -> float:
    """The longest chain of dependent units: no schedule is shorter."""
    finish: dict[str, float] = {}
    by_key = {u.key: u for u in units}

    def end(key: str) -> float:
        if key not in finish:
            u = by_key[key]
            finish[key] = max((end(d) for d in u.deps if d in by_key), default=0.0) + seconds[key]
        return finish[key]

    return max((end(u.key) for u in units), default=0.0)


def lower_bound(units: list[Unit], seconds: dict[str, float], cap: dict[str, float]) -> float:
    """max(critical path, busy GPU-seconds / GPUs, busy CPU-seconds / CPUs)."""
    bound = critical_path(units, seconds)
    for r in RESOURCES:
        if cap.get(r, 0.0) > 0:
            bound = max(bound, sum(u.demand[r] * seconds[u.key] for u in units) / cap[r])
    return bound


__all__ = ["Graph", "Unit", "capacity", "check_fits", "critical_path", "launchable", "lower_bound", "pretraining_kind",
           "simulate", "simulate_sequential", "unit_bundles"]
